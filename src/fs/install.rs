//! Installing files whose chunks are known by id (recover): the chunk map is written
//! directly, a chunk the store already holds gains a reference, a new one is stored from the
//! verified body the caller supplies. Nothing is hashed or compressed again.

use super::txn::Body;
use super::{Fs, Txn};
use crate::error::{FsError, Result};
use crate::storage::engine::Cf;
use crate::storage::keys::{self, ChunkId, MapEntry};

/// One chunk of a file to install.
pub struct InstallChunk {
    pub index: u64,
    pub id: ChunkId,
    pub len: u32,
    /// The stored encoding (already verified against `id`), for a chunk the store lacks.
    pub stored: Option<Vec<u8>>,
}

impl Fs {
    /// Whether the store holds chunk `id`.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.eng.exists(Cf::Meta, &keys::refcount_key(id))
    }

    /// Points chunks of regular file `ino` (which must not be open) at the given chunks and
    /// sets its size, in one atomic change.
    pub fn install_chunks(&self, ino: u64, chunks: Vec<InstallChunk>, size: u64) -> Result<()> {
        if self.is_open(ino) {
            return Err(FsError::Busy);
        }
        let bytes = chunks
            .iter()
            .map(|c| c.stored.as_ref().map_or(0, |s| s.len()))
            .sum();
        let mut meta = self.lock_meta();
        let mut txn = Txn::with_capacity(self, bytes);
        for c in chunks {
            if c.len == 0 || c.len as usize > self.chunk_size {
                return Err(FsError::Invalid);
            }
            txn.put_map(
                ino,
                c.index,
                MapEntry {
                    id: c.id,
                    len: c.len,
                },
            )?;
            match c.stored {
                Some(s) => txn.add_body(c.id, Body::Encoded(s)),
                // A store served from a backend keeps no bodies.
                None if self.cache.remote.get().is_some() => {
                    txn.add_body(c.id, Body::Remote(c.len))
                }
                None => {}
            }
        }
        let mut a = txn.attr(ino)?;
        a.size = size;
        txn.put_attr(a);
        txn.commit(&mut meta, false)
    }
}
