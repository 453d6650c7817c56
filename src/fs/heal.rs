//! Local chunks checked and healed from a good copy elsewhere (a backend), as ZFS heals a
//! bad block from its mirror: by the read path when a body fails verification (self-healing
//! reads), and by `snapfs scrub` for every chunk.
//!
//! The core knows the copies only as a [`ChunkSource`] that the replicator installs
//! ([`ChunkCache::set_healer`](super::ChunkCache::set_healer)); it returns decoded bytes,
//! which are hashed here again before anything is written. A healed body is written under
//! `meta` (garbage collection frees bodies under `meta` too, so a chunk freed meanwhile is
//! left alone), in one synced batch with its refcount's stored length and the
//! `stored_bytes` counter.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::error::{FsError, Result};
use crate::storage::chunk;
use crate::storage::engine::{Batch, Cf};
use crate::storage::keys::{self, ChunkId};

use super::txn::{decode_ref, encode_ref};
use super::Fs;

/// What one local chunk turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalChunk {
    Good,
    /// Freed since it was listed.
    Gone,
    /// Fails verification; healed from a copy (true) or not (false, with why).
    Bad {
        healed: bool,
        why: String,
    },
}

/// `scrub`'s figures for the local store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub checked: u64,
    pub bytes: u64,
    pub bad: u64,
    pub repaired: u64,
    pub unrepairable: u64,
}

impl Fs {
    /// Up to `n` referenced chunks after `after`, in id order, with their stored lengths.
    pub fn chunks_after(&self, after: Option<&ChunkId>, n: usize) -> Result<Vec<(ChunkId, u32)>> {
        let prefix = [keys::P_REFCOUNT];
        let from = match after {
            Some(id) => {
                let mut k = keys::refcount_key(id);
                k.push(0);
                k
            }
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.eng.reader()?.scan(Cf::Meta, &prefix, &from) {
            let (k, v) = item?;
            let Ok(id) = ChunkId::try_from(&k[1..]) else {
                continue;
            };
            if let Some((count, _, stored)) = decode_ref(&v) {
                if count > 0 {
                    out.push((id, stored));
                    if out.len() >= n {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads and verifies one chunk; a bad one is healed from the healer when `repair`.
    pub fn scrub_chunk(&self, id: &ChunkId, repair: bool) -> Result<LocalChunk> {
        let why: String = match self.eng.with_chunk(id, |s| chunk::verify(id, s)) {
            Ok(None) => {
                if !self.has_chunk(id)? {
                    return Ok(LocalChunk::Gone);
                }
                "body missing".to_string()
            }
            Ok(Some(Ok(()))) => return Ok(LocalChunk::Good),
            Ok(Some(Err(e))) => format!("fails verification: {e}"),
            Err(FsError::Corrupt) => "the engine's checksum fails".to_string(),
            Err(e) => return Err(e),
        };
        if !repair {
            return Ok(LocalChunk::Bad { healed: false, why });
        }
        Ok(match self.heal_chunk(id) {
            Ok(_) => LocalChunk::Bad { healed: true, why },
            Err(e) => LocalChunk::Bad {
                healed: false,
                why: format!("{why}; no good copy: {e}"),
            },
        })
    }

    /// Fetches a good copy of a chunk from the healer, rewrites the local body and returns
    /// the decoded bytes. Counted in `self_heals`.
    pub(crate) fn heal_chunk(&self, id: &ChunkId) -> std::result::Result<Vec<u8>, String> {
        let src = self
            .cache
            .healer
            .get()
            .ok_or("no backend to heal from")?
            .clone();
        let data = src.fetch(id)?;
        if chunk::chunk_id(&data) != *id {
            return Err("the copy does not match the chunk's id".into());
        }
        let enc = chunk::encode(id, &data);
        match self.replace_bad_body(id, &enc) {
            Ok(true) => {
                self.cache.healed.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "chunk {} failed verification and was healed from a backend copy",
                    chunk::hex(id)
                );
                Ok(data)
            }
            Ok(false) => Ok(data), // freed meanwhile: nothing to rewrite
            Err(e) => Err(format!("cannot rewrite the local copy: {e}")),
        }
    }

    /// The read path's last resort for a body that failed verification.
    pub(crate) fn self_heal(&self, id: &ChunkId, e: FsError) -> Result<Vec<u8>> {
        if e != FsError::Corrupt || self.cache.healer.get().is_none() {
            return Err(e);
        }
        self.heal_chunk(id).map_err(|why| {
            log::error!(
                "chunk {} is corrupt and cannot be healed: {why}",
                chunk::hex(id)
            );
            FsError::Corrupt
        })
    }

    /// Heals chunks whose local body fails verification from `src` (the first call wins).
    pub fn set_healer(&self, src: std::sync::Arc<dyn super::ChunkSource>) {
        self.cache.set_healer(src);
    }

    /// Chunks healed (by reads or scrub) since the store was opened.
    pub fn self_heals(&self) -> u64 {
        self.cache.healed.load(Ordering::Relaxed)
    }

    fn replace_bad_body(&self, id: &ChunkId, enc: &[u8]) -> Result<bool> {
        let mut meta = self.lock_meta();
        let rk = keys::refcount_key(id);
        let Some((count, raw, stored)) = self.eng.get(Cf::Meta, &rk)?.and_then(|v| decode_ref(&v))
        else {
            return Ok(false);
        };
        if count == 0 {
            return Ok(false);
        }
        let mut b = Batch::with_capacity(enc.len() + 256);
        let new = enc.len() as u32;
        self.eng.put(&mut b, Cf::Chunks, id, enc);
        self.eng
            .put(&mut b, Cf::Meta, &rk, &encode_ref(count, raw, new));
        let stored_bytes = meta.counters.stored_bytes.saturating_sub(stored as u64) + new as u64;
        self.eng.put(
            &mut b,
            Cf::Meta,
            &keys::counter_key("stored_bytes"),
            &stored_bytes.to_le_bytes(),
        );
        self.eng.write(b, true)?;
        meta.counters.stored_bytes = stored_bytes;
        Ok(true)
    }
}
