//! Compression behind the writer.
//!
//! zstd -1 compresses checkpoint tensors (bf16) at a few hundred MB/s per core; run in the
//! sealers, on the way to fsync, it capped a 2-core machine's write path near 0.5 GB/s for a
//! saving of about 12%. So the deferred path (`defer.rs`) judges each full chunk from a
//! 64 KiB trial (`chunk::plan_compression`):
//!
//! - it compresses to half or less (zeros, repeated tensors): compressed at once, which zstd
//!   does fast and which halves the bytes written;
//! - it would not save a sixteenth (random, already compressed): stored raw for good;
//! - anything between: stored raw, and the commit that makes it durable also writes a
//!   compression-queue key `23 id` (raw length as value) in the same batch.
//!
//! The thread here works through that queue once the write path has been idle for `IDLE_FOR`
//! (nothing parked, the sealer queues empty), and stops at the first sign of new writes. For
//! each queued chunk it reads the body and compresses it outside every lock, then under
//! `meta` writes one batch: the compressed body under the same key, the refcount's stored
//! length, the `stored_bytes` counter, and the queue key's deletion.
//!
//! Why this is safe:
//! - The id is the hash of the raw bytes, so both encodings decode to the same data, and a
//!   reader (or the replicator) that read the raw one is served the same bytes.
//! - Garbage collection frees bodies under `meta` too: a chunk freed in the meantime has no
//!   refcount (or a zero count) when the batch is built, and only its queue key goes.
//! - The batch is atomic: a crash before it leaves the raw body and its key (the work is
//!   redone), after it the compressed body (the raw record is garbage in its blob file).
//! - A chunk that fails verification is left as it is (`check` reports it) and its key is
//!   dropped; nothing is compressed while free space is below the floor.
//!
//! Until a chunk is compressed it takes its raw size on disk (`snapfs stat` shows the bytes
//! waiting), and a raw chunk replicated before that travels raw. The raw record's space in
//! its blob file returns when the whole blob file is garbage, as for any freed chunk.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{FsError, Result};
use crate::storage::chunk;
use crate::storage::engine::{Batch, Cf, Health};
use crate::storage::keys::{self, ChunkId};

use super::txn::{decode_ref, encode_ref};
use super::Fs;

/// How long the write path must have been idle before the queue is worked on.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(1);
/// How often the compressor looks at the write path.
const TICK: Duration = Duration::from_millis(250);
/// Chunks compressed between two looks at the write path (about 10 ms of work each).
const STEP: usize = 4;

impl Fs {
    /// Counts the compression queue (left by an earlier run) and starts the compressor.
    pub(crate) fn start_compressor(self: &Arc<Self>) {
        if self.view.is_some() {
            return;
        }
        if let Err(e) = self.count_compression_queue() {
            log::warn!("cannot count the compression queue: {e}");
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("snapfs-compress".into())
            .spawn(move || {
                let mut quiet = Duration::ZERO;
                let mut cursor = vec![keys::P_COMPRESS];
                loop {
                    std::thread::sleep(TICK);
                    let Some(fs) = weak.upgrade() else { return };
                    if fs.deferred.later_chunks.load(Ordering::Acquire) == 0 {
                        continue;
                    }
                    if !fs.may_compress() {
                        quiet = Duration::ZERO;
                        continue;
                    }
                    quiet += TICK;
                    if quiet < IDLE_FOR {
                        continue;
                    }
                    drop(fs);
                    // Small steps, each with its own strong reference, so that an unmount
                    // never waits for more than one step.
                    loop {
                        let Some(fs) = weak.upgrade() else { return };
                        if !fs.may_compress() {
                            quiet = Duration::ZERO;
                            break;
                        }
                        match fs.compress_queued(&cursor, STEP) {
                            Ok(Some(next)) => cursor = next,
                            Ok(None) => {
                                cursor = vec![keys::P_COMPRESS];
                                break;
                            }
                            Err(e) => {
                                log::warn!("compression behind the writer paused: {e}");
                                break;
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the compressor thread: {e}; chunks stay uncompressed");
        }
    }

    /// The write path is idle (nothing parked, no seal job queued) and the engine can take
    /// writes that add data.
    fn may_compress(&self) -> bool {
        let (parked, _) = self.parked();
        parked == 0
            && self
                .sealer
                .get()
                .is_none_or(|q| q.iter().all(|s| s.is_empty()))
            && !self.eng.low_space()
            && self.eng.health() == Health::Healthy
    }

    fn count_compression_queue(&self) -> Result<()> {
        let (mut n, mut bytes) = (0, 0);
        for item in self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_COMPRESS], &[keys::P_COMPRESS])
        {
            let (_, v) = item?;
            n += 1;
            bytes += raw_len(&v) as u64;
        }
        self.deferred.later_chunks.store(n, Ordering::Release);
        self.deferred.later_bytes.store(bytes, Ordering::Release);
        Ok(())
    }

    /// Compresses up to `max` queued chunks from `from` on; returns where to go on, or None
    /// when the queue was worked through to its end.
    pub(crate) fn compress_queued(&self, from: &[u8], max: usize) -> Result<Option<Vec<u8>>> {
        let queued: Vec<(Vec<u8>, u32)> = self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_COMPRESS], from)
            .take(max)
            .map(|r| r.map(|(k, v)| (k, raw_len(&v))))
            .collect::<Result<_>>()?;
        let Some(last) = queued.last().map(|(k, _)| k.clone()) else {
            return Ok(None);
        };
        for (k, raw) in queued {
            let Ok(id) = <ChunkId>::try_from(&k[1..]) else {
                log::error!("malformed compression-queue key of {} bytes", k.len());
                continue;
            };
            self.compress_one(&id, raw)?;
        }
        let mut next = last;
        next.push(0);
        Ok(Some(next))
    }

    /// Compresses one queued chunk in place (see the module's comment).
    fn compress_one(&self, id: &ChunkId, queued_raw: u32) -> Result<()> {
        let enc = self.compressed_body(id)?;
        self.replace_body(id, enc.as_deref(), queued_raw)
            .map(|_| ())
    }

    /// The replicator's hook: a chunk queued for compression is compressed before its upload
    /// if the write path is idle, so that the backend gets it compressed too; otherwise (a
    /// writer is busy, and the upload must not compete with it) it travels raw. Returns the
    /// compressed body, now also the local one.
    pub(crate) fn compress_before_upload(&self, id: &ChunkId) -> Option<Vec<u8>> {
        if self.deferred.later_chunks.load(Ordering::Acquire) == 0 || !self.may_compress() {
            return None;
        }
        let key = keys::compress_key(id);
        let queued = self.eng.get(Cf::Meta, &key).ok()??;
        let enc = self.compressed_body(id).ok()??;
        match self.replace_body(id, Some(&enc), raw_len(&queued)) {
            Ok(true) => Some(enc),
            Ok(false) => None,
            Err(e) => {
                log::warn!("chunk {}: compression before upload: {e}", chunk::hex(id));
                None
            }
        }
    }

    /// Reads a raw body and compresses it, outside every lock: None if it is gone, already
    /// compressed, does not compress, or fails verification (logged, left as it is).
    fn compressed_body(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let read = match self.eng.with_chunk(id, |stored| {
            let Some(raw) = chunk::raw_payload(stored) else {
                return Ok(None); // already compressed
            };
            chunk::verify(id, stored)?;
            Ok(chunk::compress(id, raw))
        }) {
            // The engine's own checksum caught it (a blob record's CRC).
            Err(FsError::Corrupt) => Some(Err(FsError::Corrupt)),
            r => r?,
        };
        Ok(match read {
            None => None, // freed
            Some(Ok(enc)) => enc,
            Some(Err(e)) => {
                log::error!(
                    "chunk {} queued for compression fails verification ({e}); left as it is",
                    chunk::hex(id)
                );
                None
            }
        })
    }

    /// Under `meta`, in one batch: deletes the queue key and, if the chunk is still
    /// referenced, puts `enc` in place of its body with the refcount's stored length and the
    /// counter. Ok(true) if the body was replaced.
    fn replace_body(&self, id: &ChunkId, enc: Option<&[u8]>, queued_raw: u32) -> Result<bool> {
        let mut meta = self.lock_meta();
        let key = keys::compress_key(id);
        if !self.eng.exists(Cf::Meta, &key)? {
            return Ok(false); // done by another pass meanwhile
        }
        let mut b = Batch::with_capacity(enc.map_or(0, |e| e.len()) + 256);
        self.eng.delete(&mut b, Cf::Meta, &key);
        let rk = keys::refcount_key(id);
        let mut stored_bytes = meta.counters.stored_bytes;
        let mut replaced = false;
        if let Some(enc) = enc {
            let current = self.eng.get(Cf::Meta, &rk)?.and_then(|v| decode_ref(&v));
            if let Some((count, raw, stored)) = current.filter(|r| r.0 > 0) {
                let new = enc.len() as u32;
                self.eng.put(&mut b, Cf::Chunks, id, enc);
                self.eng
                    .put(&mut b, Cf::Meta, &rk, &encode_ref(count, raw, new));
                stored_bytes = stored_bytes.saturating_sub(stored as u64) + new as u64;
                self.eng.put(
                    &mut b,
                    Cf::Meta,
                    &keys::counter_key("stored_bytes"),
                    &stored_bytes.to_le_bytes(),
                );
                replaced = true;
            }
        }
        self.eng.write(b, false)?;
        meta.counters.stored_bytes = stored_bytes;
        drop(meta);
        self.deferred.compressed(queued_raw);
        Ok(replaced)
    }
}

fn raw_len(v: &[u8]) -> u32 {
    v.get(..4)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}
