//! The core's side of replication: which backends a store has (`44 backend`), and the queue
//! entries and pending-snapshot records it writes for them in its own batches (txn.rs,
//! snap.rs). The replicator (`src/replica/`) drains them; the core never talks to a backend.

use std::sync::Arc;

use super::{Fs, Txn};
use crate::error::Result;
use crate::storage::engine::{Batch, Cf};
use crate::storage::keys::{self, ChunkId, QueueEntry, ReplSnap};

/// What [`Fs::reconcile_replica`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub absent_chunks: u64,
    pub forgotten_metas: u64,
    pub pruned_snapshots: Vec<String>,
}

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
        for s in self.snapshot_records()? {
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

    /// The last prune generation of backend `id` this store reconciled with (0: none).
    pub fn replica_pruned_generation(&self, id: u32) -> Result<u64> {
        let k = keys::repl_key(keys::P_REPL_PRUNED, id, &[]);
        Ok(self
            .eng
            .get(Cf::Meta, &k)?
            .filter(|v| v.len() == 8)
            .map_or(0, |v| keys::le_u64(&v)))
    }

    /// Whether any chunk is recorded as pruned from backend `id` (`47 id`).
    pub fn replica_has_absent(&self, id: u32) -> Result<bool> {
        let prefix = keys::repl_key(keys::P_REPL_ABSENT, id, &[]);
        Ok(self.eng.seek(Cf::Meta, &prefix, &prefix)?.is_some())
    }

    pub fn replica_chunk_absent(&self, id: u32, chunk: &ChunkId) -> Result<bool> {
        self.eng
            .exists(Cf::Meta, &keys::repl_key(keys::P_REPL_ABSENT, id, chunk))
    }

    /// Brings the store's records of backend `id` in line with what the backend holds after
    /// a prune (its listing, as the predicates): chunks the store holds and the backend lost
    /// are recorded absent (`47`), so that the next snapshot that needs them queues them
    /// again; metadata objects it lost are forgotten (`42`), so that they are uploaded again;
    /// complete snapshots whose marker is gone are marked pruned. With `generation`, records
    /// it as reconciled (`46`). Runs beside writers and uploads: a chunk sealed meanwhile is
    /// queued by its own batch, one uploaded meanwhile is at worst uploaded once more.
    pub fn reconcile_replica(
        &self,
        id: u32,
        chunk_present: &dyn Fn(&ChunkId) -> bool,
        meta_present: &dyn Fn(&[u8; 32]) -> bool,
        marker_present: &dyn Fn(&str) -> bool,
        generation: Option<u64>,
    ) -> Result<Reconciled> {
        let mut r = Reconciled::default();
        self.delete_prefix(&keys::repl_key(keys::P_REPL_ABSENT, id, &[]))?;
        let mut from = vec![keys::P_REFCOUNT];
        loop {
            let page: Vec<(Vec<u8>, Vec<u8>)> = self
                .eng
                .reader()?
                .scan(Cf::Meta, &[keys::P_REFCOUNT], &from)
                .take(4096)
                .collect::<Result<_>>()?;
            let Some((last, _)) = page.last() else { break };
            from = keys::prefix_end(last);
            let mut b = Batch::new();
            for (k, v) in &page {
                let live = super::txn::decode_ref(v).is_some_and(|(count, _, _)| count > 0);
                let chunk: ChunkId = k[1..33].try_into().expect("32-byte id");
                if live && !chunk_present(&chunk) {
                    let ak = keys::repl_key(keys::P_REPL_ABSENT, id, &chunk);
                    self.eng.put(&mut b, Cf::Meta, &ak, &[]);
                    r.absent_chunks += 1;
                }
            }
            self.eng.write(b, false)?;
        }
        let prefix = keys::repl_key(keys::P_REPL_META, id, &[]);
        let mut from = prefix.clone();
        loop {
            let page: Vec<Vec<u8>> = self
                .eng
                .reader()?
                .scan(Cf::Meta, &prefix, &from)
                .take(4096)
                .map(|x| x.map(|(k, _)| k))
                .collect::<Result<_>>()?;
            let Some(last) = page.last() else { break };
            from = keys::prefix_end(last);
            let mut b = Batch::new();
            for k in &page {
                let gone = <[u8; 32]>::try_from(&k[5..]).map_or(true, |h| !meta_present(&h));
                if gone {
                    self.eng.delete(&mut b, Cf::Meta, k);
                    r.forgotten_metas += 1;
                }
            }
            self.eng.write(b, false)?;
        }
        // Under the lock that snapshot deletion takes, so that no record is brought back.
        let _meta = self.meta.lock();
        let prefix = keys::repl_key(keys::P_REPL_SNAP, id, &[]);
        let records: Vec<(Vec<u8>, Vec<u8>)> = self
            .eng
            .reader()?
            .scan(Cf::Meta, &prefix, &prefix)
            .collect::<Result<_>>()?;
        let mut b = Batch::new();
        for (k, v) in records {
            let Some(mut s) = ReplSnap::decode(&v) else {
                continue;
            };
            let name = String::from_utf8_lossy(&k[5..]).into_owned();
            if s.completed_ms > 0 && !s.pruned && !marker_present(&name) {
                s.pruned = true;
                self.eng.put(&mut b, Cf::Meta, &k, &s.encode());
                r.pruned_snapshots.push(name);
            }
        }
        if let Some(g) = generation {
            let k = keys::repl_key(keys::P_REPL_PRUNED, id, &[]);
            self.eng.put(&mut b, Cf::Meta, &k, &g.to_le_bytes());
        }
        self.eng.write(b, true)?;
        Ok(r)
    }

    /// Queues again, for backend `id`, the chunks of `chunks` that a prune removed from it
    /// and the store still holds, and moves snapshot `name`'s barrier past them, in one
    /// batch. Returns the number queued.
    pub fn requeue_absent(&self, id: u32, name: &str, chunks: &[ChunkId]) -> Result<u64> {
        let mut meta = self.meta.lock();
        let mut txn = Txn::new(self);
        let mut seq = meta.repl_seq;
        let now = super::now_ms();
        for c in chunks {
            let ak = keys::repl_key(keys::P_REPL_ABSENT, id, c);
            if !self.eng.exists(Cf::Meta, &ak)? {
                continue;
            }
            txn.delete_raw(&ak);
            let held = self.eng.get(Cf::Meta, &keys::refcount_key(c))?;
            let Some((count, _, stored)) = held.as_deref().and_then(super::txn::decode_ref) else {
                continue;
            };
            if count == 0 {
                continue;
            }
            seq += 1;
            let e = QueueEntry {
                id: *c,
                sealed_ms: now,
                stored_len: stored,
            };
            txn.put_raw(&keys::queue_key(id, seq), &e.encode());
        }
        let queued = seq - meta.repl_seq;
        let k = keys::repl_key(keys::P_REPL_SNAP, id, name.as_bytes());
        if let Some(mut s) = self
            .eng
            .get(Cf::Meta, &k)?
            .as_deref()
            .and_then(ReplSnap::decode)
        {
            s.barrier_seq = s.barrier_seq.max(seq);
            txn.put_raw(&k, &s.encode());
        }
        txn.put_counter("repl_seq", seq);
        txn.commit(&mut meta, true)?;
        meta.repl_seq = seq;
        Ok(queued)
    }

    fn delete_prefix(&self, prefix: &[u8]) -> Result<()> {
        loop {
            let page: Vec<Vec<u8>> = self
                .eng
                .reader()?
                .scan(Cf::Meta, prefix, prefix)
                .take(4096)
                .map(|r| r.map(|(k, _)| k))
                .collect::<Result<_>>()?;
            if page.is_empty() {
                return Ok(());
            }
            let mut b = Batch::new();
            for k in &page {
                self.eng.delete(&mut b, Cf::Meta, k);
            }
            self.eng.write(b, false)?;
        }
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
            keys::P_REPL_PRUNED,
            keys::P_REPL_ABSENT,
        ];
        for p in prefixes {
            self.delete_prefix(&keys::repl_key(p, id, &[]))?;
        }
        self.eng.sync()
    }
}
