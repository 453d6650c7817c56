//! The core's side of replication: which backends a store has (`44 backend`), and the queue
//! entries and pending-snapshot records it writes for them in its own batches (txn.rs,
//! snap.rs). The replicator (`src/replica/`) drains them; the core never talks to a backend.

use std::sync::Arc;

use super::{Fs, Txn};
use crate::error::Result;
use crate::storage::engine::{Batch, Cf};
use crate::storage::keys::{self, QueueEntry, ReplSnap};

fn backfilled_counter(id: u32) -> String {
    format!("repl_backfilled_{id}")
}

/// Refcount entries queued per batch when a backend is added to a store with data.
const BACKFILL_BATCH: usize = 512;

impl Fs {
    /// Loads the backend list at open.
    pub(super) fn load_replicas(&self) -> Result<()> {
        let ids: Vec<u32> = self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_REPL_BACKEND], &[keys::P_REPL_BACKEND])
            .map(|r| r.map(|(k, _)| u32::from_be_bytes(k[1..5].try_into().expect("4 bytes"))))
            .collect::<Result<_>>()?;
        *self.replicas.write() = Arc::from(ids);
        Ok(())
    }

    /// Ids of the backends new chunks and snapshots are queued for.
    pub fn replicas(&self) -> Arc<[u32]> {
        self.replicas.read().clone()
    }

    /// The last replication sequence number handed out: every chunk sealed before this call
    /// is queued at or below it.
    pub fn repl_seq(&self) -> u64 {
        self.meta.lock().repl_seq
    }

    /// Adds backend `id` (named `name`) to the store, durably, and queues for it everything
    /// the store holds: every referenced chunk, and a pending record for every snapshot with
    /// a barrier after the last of them. Chunks sealed while this runs are queued by their
    /// own batches (the backend is registered first), so none is missed; a few may be queued
    /// twice, which costs one idempotent upload. Returns the number of chunks queued.
    pub fn add_replica(&self, id: u32, name: &str) -> Result<u64> {
        {
            let _meta = self.meta.lock();
            let mut b = Batch::new();
            let k = keys::repl_key(keys::P_REPL_BACKEND, id, &[]);
            self.eng.put(&mut b, Cf::Meta, &k, name.as_bytes());
            self.eng.write(b, true)?;
            let mut ids = self.replicas.read().to_vec();
            if !ids.contains(&id) {
                ids.push(id);
            }
            *self.replicas.write() = Arc::from(ids);
        }
        let mut from = vec![keys::P_REFCOUNT];
        let mut queued = 0u64;
        let now = super::now_ms();
        loop {
            let mut meta = self.meta.lock();
            let page: Vec<(Vec<u8>, Vec<u8>)> = self
                .eng
                .reader()?
                .scan(Cf::Meta, &[keys::P_REFCOUNT], &from)
                .take(BACKFILL_BATCH)
                .collect::<Result<_>>()?;
            let Some((last, _)) = page.last() else { break };
            from = keys::prefix_end(last);
            let mut txn = Txn::new(self);
            let mut seq = meta.repl_seq;
            for (k, v) in &page {
                let Some((count, _raw, stored)) = super::txn::decode_ref(v) else {
                    continue;
                };
                if count == 0 {
                    continue;
                }
                seq += 1;
                let e = QueueEntry {
                    id: k[1..33].try_into().expect("32-byte id"),
                    sealed_ms: now,
                    stored_len: stored,
                };
                txn.put_raw(&keys::queue_key(id, seq), &e.encode());
                queued += 1;
            }
            txn.put_counter("repl_seq", seq);
            txn.commit(&mut meta, false)?;
            meta.repl_seq = seq;
        }
        let mut meta = self.meta.lock();
        let mut txn = Txn::new(self);
        let pending = ReplSnap {
            barrier_seq: meta.repl_seq,
            created_ms: now,
            ..Default::default()
        };
        for s in self.snapshot_list()? {
            let k = keys::repl_key(keys::P_REPL_SNAP, id, s.name.as_bytes());
            txn.put_raw(&k, &pending.encode());
        }
        // Written last: a backend without it was interrupted while being added, and is
        // backfilled again at the next start (`replica::Replicator::start`).
        txn.put_counter(&backfilled_counter(id), 1);
        txn.commit(&mut meta, true)?;
        Ok(queued)
    }

    /// Whether `add_replica` ran to its end for backend `id`.
    pub fn replica_backfilled(&self, id: u32) -> Result<bool> {
        Ok(self
            .eng
            .get(Cf::Meta, &keys::counter_key(&backfilled_counter(id)))?
            .is_some())
    }

    /// Removes backend `id` from the store with everything queued or recorded for it.
    pub fn remove_replica(&self, id: u32) -> Result<()> {
        {
            let _meta = self.meta.lock();
            let ids: Vec<u32> = self
                .replicas
                .read()
                .iter()
                .copied()
                .filter(|x| *x != id)
                .collect();
            *self.replicas.write() = Arc::from(ids);
        }
        let prefixes = [
            keys::P_REPL_BACKEND,
            keys::P_REPL_QUEUE,
            keys::P_REPL_SNAP,
            keys::P_REPL_META,
            keys::P_REPL_BAD,
            keys::P_REPL_HEAL,
        ];
        for p in prefixes {
            let prefix = keys::repl_key(p, id, &[]);
            loop {
                let page: Vec<Vec<u8>> = self
                    .eng
                    .reader()?
                    .scan(Cf::Meta, &prefix, &prefix)
                    .take(4096)
                    .map(|r| r.map(|(k, _)| k))
                    .collect::<Result<_>>()?;
                if page.is_empty() {
                    break;
                }
                let mut b = Batch::new();
                for k in &page {
                    self.eng.delete(&mut b, Cf::Meta, k);
                }
                self.eng.write(b, false)?;
            }
        }
        self.eng.sync()
    }
}
