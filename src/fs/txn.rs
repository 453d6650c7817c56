//! One atomic metadata change: versioned record writes, chunk reference deltas and counters,
//! applied as a single engine batch.
//!
//! A `Txn` is built and committed while the caller holds `Fs::meta`, so the write epoch, the
//! refcounts it reads and the counters it updates cannot change underneath it. Reads go to the
//! engine, not to the batch: an operation reads everything it needs before it writes, and
//! touches each chunk-map record at most once (checked in every build: a second touch fails
//! the change with EIO and an error log line).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{FsError, Result};
use crate::storage::engine::{Batch, Cf};
use crate::storage::inode::Attr;
use crate::storage::keys::{self, ChunkId, MapEntry};

use super::{Fs, MetaState, FIRST_EPOCH};

pub(crate) enum Body {
    /// Already encoded (hashed and compressed outside the lock).
    Encoded(Vec<u8>),
    /// Raw bytes; encoded at commit only if the chunk turned out to be absent.
    Raw(std::sync::Arc<Vec<u8>>),
    /// No local body: the chunk (of this raw length) is served from the store's remote
    /// source (`ChunkCache::set_remote`: a snapshot mounted from a backend).
    Remote(u32),
    /// Already in the chunk column family, written without the WAL at engine generation
    /// `generation` with a free-queue marker logged before it, and made durable by a
    /// `flush_chunks` that returned before this commit (`fs::defer`). If the engine was
    /// reopened since, the body is written again from `raw`. `later`: it was stored raw,
    /// and the commit queues it for compression behind the writer (`fs::compress`).
    Written {
        raw: std::sync::Arc<Vec<u8>>,
        stored: u32,
        generation: u64,
        later: bool,
    },
}

pub(crate) struct Txn<'a> {
    fs: &'a Fs,
    /// The epoch this transaction reads attributes at and writes records to; None: the
    /// live write epoch. A seal job of an epoch a snapshot has closed commits at its own
    /// epoch (`epochs.rs`).
    at: Option<u64>,
    batch: Batch,
    attrs: BTreeMap<u64, Attr>,
    deleted: BTreeSet<u64>,
    refs: HashMap<ChunkId, i64>,
    bodies: HashMap<ChunkId, Body>,
    counters_dirty: bool,
    touched_maps: BTreeSet<(u64, u64)>,
    /// Chunks freed by this txn: count, raw bytes, stored bytes.
    freed: (u64, u64, u64),
    /// Chunks this txn queues for compression behind the writer: count, raw bytes.
    later: (u64, u64),
}

/// Refcount value: count, raw length, stored length.
pub(crate) fn decode_ref(v: &[u8]) -> Option<(u64, u32, u32)> {
    (v.len() == 16).then(|| {
        (
            keys::le_u64(v),
            keys::le_u32(&v[8..]),
            keys::le_u32(&v[12..]),
        )
    })
}

pub(crate) fn encode_ref(count: u64, raw: u32, stored: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&raw.to_le_bytes());
    v.extend_from_slice(&stored.to_le_bytes());
    v
}

impl<'a> Txn<'a> {
    pub fn new(fs: &'a Fs) -> Txn<'a> {
        Self::with_capacity(fs, 0)
    }

    /// A transaction expected to carry about `bytes` of chunk bodies.
    pub fn with_capacity(fs: &'a Fs, bytes: usize) -> Txn<'a> {
        Txn {
            fs,
            at: None,
            batch: if bytes == 0 {
                Batch::new()
            } else {
                Batch::with_capacity(bytes + 4096)
            },
            attrs: BTreeMap::new(),
            deleted: BTreeSet::new(),
            refs: HashMap::new(),
            bodies: HashMap::new(),
            counters_dirty: false,
            touched_maps: BTreeSet::new(),
            freed: (0, 0, 0),
            later: (0, 0),
        }
    }

    /// A transaction at `epoch` (at most the write epoch): what a seal job queued before a
    /// snapshot moved the epoch commits with.
    pub fn at_epoch(fs: &'a Fs, epoch: u64, bytes: usize) -> Txn<'a> {
        let mut t = Self::with_capacity(fs, bytes);
        t.at = Some(epoch);
        t
    }

    fn epoch(&self) -> Result<u64> {
        let live = self.fs.write_epoch()?;
        Ok(self.at.map_or(live, |e| e.min(live)))
    }

    /// Attributes as this transaction will leave them.
    pub fn attr(&self, ino: u64) -> Result<Attr> {
        if self.deleted.contains(&ino) {
            return Err(FsError::NotFound);
        }
        match self.attrs.get(&ino) {
            Some(a) => Ok(a.clone()),
            None => self.fs.stored_attr_at(ino, self.epoch()?),
        }
    }

    /// The versions of `ino`'s inode record newer than this transaction's epoch, up to the
    /// live one (none for a transaction at the live epoch): (epoch, attributes).
    pub fn newer_attrs(&self, ino: u64) -> Result<Vec<(u64, Attr)>> {
        let e = self.epoch()?;
        if e == self.fs.write_epoch()? {
            return Ok(Vec::new());
        }
        let rec = keys::inode_rec(ino);
        let mut out = Vec::new();
        for item in self.fs.eng.reader()?.scan(Cf::Meta, &rec, &rec) {
            let (k, v) = item?;
            if k.len() != rec.len() + keys::VERSION_LEN {
                continue;
            }
            let ve = keys::split_version(&k).1;
            if ve <= e {
                break; // newest first
            }
            if v.first() == Some(&keys::TAG_LIVE) {
                if let Some(a) = Attr::decode(ino, &v[1..]) {
                    out.push((ve, a));
                }
            }
        }
        Ok(out)
    }

    /// Rewrites an existing version of an inode record (at an epoch newer than this
    /// transaction's) in this transaction's batch.
    pub fn put_attr_version(&mut self, epoch: u64, a: &Attr) {
        let k = keys::versioned(&keys::inode_rec(a.ino), epoch);
        self.fs.eng.put(&mut self.batch, Cf::Meta, &k, &a.encode());
    }

    pub fn put_attr(&mut self, a: Attr) {
        self.deleted.remove(&a.ino);
        self.attrs.insert(a.ino, a);
    }

    pub fn put_rec(&mut self, rec: &[u8], value_with_tag: &[u8]) -> Result<()> {
        let k = keys::versioned(rec, self.epoch()?);
        self.fs
            .eng
            .put(&mut self.batch, Cf::Meta, &k, value_with_tag);
        Ok(())
    }

    /// Deletes a record at the write epoch: a tombstone if an older version is still visible
    /// to a snapshot, otherwise the key itself.
    pub fn del_rec(&mut self, rec: &[u8]) -> Result<()> {
        let e = self.epoch()?;
        let k = keys::versioned(rec, e);
        if e > FIRST_EPOCH && self.fs.get_rec_at(rec, e - 1)?.is_some() {
            self.fs
                .eng
                .put(&mut self.batch, Cf::Meta, &k, &[keys::TAG_TOMBSTONE]);
        } else {
            self.fs.eng.delete(&mut self.batch, Cf::Meta, &k);
        }
        Ok(())
    }

    fn map_at_write_epoch(&mut self, ino: u64, index: u64) -> Result<Option<MapEntry>> {
        let fresh = self.touched_maps.insert((ino, index));
        if !fresh {
            // Two changes of one record in one batch would drop the reference of the version
            // the first one wrote: refuse the whole change rather than leak or double-free.
            log::error!("internal: chunk-map record ({ino}, {index}) touched twice in one txn");
            return Err(FsError::Io);
        }
        let k = keys::versioned(&keys::map_rec(ino, index), self.epoch()?);
        Ok(match self.fs.eng.get(Cf::Meta, &k)? {
            Some(v) if v.first() == Some(&keys::TAG_LIVE) => MapEntry::decode(&v[1..]),
            _ => None,
        })
    }

    /// Points chunk `index` of `ino` at a chunk; the body must be supplied with `add_body`
    /// unless the chunk is known to exist.
    pub fn put_map(&mut self, ino: u64, index: u64, entry: MapEntry) -> Result<()> {
        if let Some(old) = self.map_at_write_epoch(ino, index)? {
            *self.refs.entry(old.id).or_default() -= 1;
        }
        *self.refs.entry(entry.id).or_default() += 1;
        self.put_rec(&keys::map_rec(ino, index), &entry.encode())
    }

    /// Makes chunk `index` of `ino` a hole.
    pub fn del_map(&mut self, ino: u64, index: u64) -> Result<()> {
        if let Some(old) = self.map_at_write_epoch(ino, index)? {
            *self.refs.entry(old.id).or_default() -= 1;
        }
        self.del_rec(&keys::map_rec(ino, index))
    }

    /// Drops one reference (a chunk-map version deleted by version GC).
    pub fn unref(&mut self, id: &ChunkId) {
        *self.refs.entry(*id).or_default() -= 1;
    }

    pub fn add_body(&mut self, id: ChunkId, body: Body) {
        self.bodies.insert(id, body);
    }

    /// Deletes a key that no record cache knows about (a snapshot record).
    pub fn del_raw(&mut self, key: &[u8]) {
        self.fs.eng.delete(&mut self.batch, Cf::Meta, key);
    }

    pub fn set_orphan(&mut self, ino: u64) {
        self.fs
            .eng
            .put(&mut self.batch, Cf::Meta, &keys::orphan_key(ino), &[]);
    }

    pub fn clear_orphan(&mut self, ino: u64) {
        self.fs
            .eng
            .delete(&mut self.batch, Cf::Meta, &keys::orphan_key(ino));
    }

    /// Removes an inode, its chunk map and its xattrs.
    pub fn purge_inode(&mut self, ino: u64) -> Result<()> {
        for (rec, _) in self.fs.scan_recs(&keys::map_prefix(ino))? {
            self.del_map(ino, keys::map_index(&rec))?;
        }
        for (rec, _) in self.fs.scan_recs(&keys::xattr_prefix(ino))? {
            self.del_rec(&rec)?;
        }
        self.attrs.remove(&ino);
        self.deleted.insert(ino);
        self.clear_orphan(ino);
        Ok(())
    }

    pub fn alloc_ino(&mut self, meta: &mut MetaState) -> Result<u64> {
        let ino = meta.next_ino;
        // FUSE inode numbers carry a snapshot slot above bit 48 (views.rs).
        if ino >= 1 << 48 {
            return Err(FsError::NoSpace);
        }
        meta.next_ino += 1;
        self.fs.eng.put(
            &mut self.batch,
            Cf::Meta,
            &keys::counter_key("next_ino"),
            &meta.next_ino.to_le_bytes(),
        );
        Ok(ino)
    }

    /// Writes a plain (unversioned) counter into this transaction.
    pub fn put_counter(&mut self, name: &str, value: u64) {
        self.fs.eng.put(
            &mut self.batch,
            Cf::Meta,
            &keys::counter_key(name),
            &value.to_le_bytes(),
        );
    }

    pub fn put_raw(&mut self, key: &[u8], value: &[u8]) {
        self.fs.eng.put(&mut self.batch, Cf::Meta, key, value);
    }

    pub fn delete_raw(&mut self, key: &[u8]) {
        self.fs.eng.delete(&mut self.batch, Cf::Meta, key);
    }

    /// Deletes a chunk whose count is zero (called by garbage collection).
    pub fn free_if_unreferenced(&mut self, id: &ChunkId) -> Result<bool> {
        let rk = keys::refcount_key(id);
        self.delete_raw(&keys::free_key(id));
        let Some((count, raw, stored)) =
            self.fs.eng.get(Cf::Meta, &rk)?.and_then(|v| decode_ref(&v))
        else {
            // A marker without a refcount is the intent of a body written ahead of a commit
            // that never came (a crash between the two, `defer.rs`): the body, if it
            // reached the disk, is garbage. The caller skips chunks still parked.
            if self.fs.eng.exists(Cf::Chunks, id)? {
                self.fs.eng.delete(&mut self.batch, Cf::Chunks, id);
                log::info!(
                    "freed chunk {}: written ahead of a commit that never happened",
                    crate::storage::chunk::hex(id)
                );
            }
            return Ok(false);
        };
        if count > 0 || self.refs.contains_key(id) {
            return Ok(false);
        }
        self.delete_raw(&rk);
        self.fs.eng.delete(&mut self.batch, Cf::Chunks, id);
        let c = &mut self.freed;
        c.0 += 1;
        c.1 += raw as u64;
        c.2 += stored as u64;
        Ok(true)
    }

    pub fn commit(mut self, meta: &mut MetaState, sync: bool) -> Result<()> {
        let attrs = std::mem::take(&mut self.attrs);
        for a in attrs.values() {
            self.put_rec(&crate::storage::keys::inode_rec(a.ino), &a.encode())?;
        }
        for ino in std::mem::take(&mut self.deleted) {
            self.del_rec(&crate::storage::keys::inode_rec(ino))?;
        }
        let mut counters = meta.counters;
        let replicas = self.fs.replicas();
        let mut repl_seq = meta.repl_seq;
        let sealed_ms = now_ms();
        let (freed, freed_raw, freed_stored) = self.freed;
        if freed > 0 {
            counters.chunks -= freed;
            counters.unique_bytes -= freed_raw;
            counters.stored_bytes -= freed_stored;
            self.counters_dirty = true;
        }
        for (id, delta) in std::mem::take(&mut self.refs) {
            if delta == 0 {
                continue;
            }
            let rk = keys::refcount_key(&id);
            let old = self.fs.eng.get(Cf::Meta, &rk)?.and_then(|v| decode_ref(&v));
            // A body written ahead of this commit left a free-queue marker (its intent).
            let marked = matches!(self.bodies.get(&id), Some(Body::Written { .. }));
            let (count, raw, stored) = match old {
                Some(r) => r,
                None if delta > 0 => {
                    let (raw, stored) = match self.bodies.remove(&id) {
                        Some(Body::Remote(raw)) => {
                            // Counted, never stored here, never queued (I2 does not hold
                            // in such a store; it is a cache, deleted at unmount).
                            counters.chunks += 1;
                            counters.unique_bytes += raw as u64;
                            self.put_raw(&rk, &encode_ref(delta.max(0) as u64, raw, 0));
                            counters.referenced_bytes += delta.max(0) as u64 * raw as u64;
                            self.counters_dirty = true;
                            continue;
                        }
                        None => {
                            log::error!(
                                "internal: new chunk {} has no body",
                                crate::storage::chunk::hex(&id)
                            );
                            return Err(FsError::Io);
                        }
                        Some(Body::Written {
                            raw,
                            stored,
                            generation,
                            later,
                        }) if generation == self.fs.eng.generation() => {
                            let raw = raw.len() as u32;
                            if later {
                                self.put_raw(&keys::compress_key(&id), &raw.to_le_bytes());
                                self.later.0 += 1;
                                self.later.1 += raw as u64;
                            }
                            (raw, stored)
                        }
                        Some(body) => {
                            let enc = match body {
                                Body::Encoded(e) => e,
                                // A Written body whose engine was reopened since (it may be
                                // gone): written again, into this batch.
                                Body::Raw(r) | Body::Written { raw: r, .. } => {
                                    crate::storage::chunk::encode(&id, &r)
                                }
                                Body::Remote(_) => unreachable!("handled above"),
                            };
                            let raw =
                                crate::storage::chunk::raw_len(&enc).expect("an encoded body");
                            let stored = enc.len() as u32;
                            self.fs.eng.put(&mut self.batch, Cf::Chunks, &id, &enc);
                            (raw, stored)
                        }
                    };
                    // Queued for every backend in the batch that seals it (docs/replication.md).
                    for &backend in replicas.iter() {
                        repl_seq += 1;
                        let entry = keys::QueueEntry {
                            id,
                            sealed_ms,
                            stored_len: stored,
                        };
                        self.fs.eng.put(
                            &mut self.batch,
                            Cf::Meta,
                            &keys::queue_key(backend, repl_seq),
                            &entry.encode(),
                        );
                    }
                    counters.chunks += 1;
                    counters.unique_bytes += raw as u64;
                    counters.stored_bytes += stored as u64;
                    (0, raw, stored)
                }
                None => {
                    log::error!(
                        "refcount of missing chunk {} would drop",
                        crate::storage::chunk::hex(&id)
                    );
                    continue;
                }
            };
            let new = count as i64 + delta;
            let new = if new < 0 {
                log::error!(
                    "refcount of chunk {} went negative",
                    crate::storage::chunk::hex(&id)
                );
                0
            } else {
                new as u64
            };
            counters.referenced_bytes = (counters.referenced_bytes as i64
                + (new as i64 - count as i64) * raw as i64)
                .max(0) as u64;
            self.put_raw(&rk, &encode_ref(new, raw, stored));
            if new == 0 {
                self.put_raw(&keys::free_key(&id), &[]);
            } else if (count == 0 && old.is_some()) || marked {
                self.delete_raw(&keys::free_key(&id));
            }
            self.counters_dirty = true;
        }
        if repl_seq != meta.repl_seq {
            self.put_counter("repl_seq", repl_seq);
        }
        // The first batch after a pending snapshot moved the epoch persists the move with it.
        let live = self.fs.epoch.load(std::sync::atomic::Ordering::Acquire);
        let epoch_moved = self.fs.view.is_none() && live > meta.epoch_on_disk;
        if epoch_moved {
            self.put_counter("epoch", live);
        }
        if self.counters_dirty {
            self.put_counter("chunks", counters.chunks);
            self.put_counter("unique_bytes", counters.unique_bytes);
            self.put_counter("stored_bytes", counters.stored_bytes);
            self.put_counter("referenced_bytes", counters.referenced_bytes);
        }
        self.fs.eng.write(self.batch, sync)?;
        if self.later.0 > 0 {
            self.fs.deferred.queued_for_compression(self.later);
        }
        meta.counters = counters;
        meta.repl_seq = repl_seq;
        if epoch_moved {
            meta.epoch_on_disk = live;
        }
        Ok(())
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
