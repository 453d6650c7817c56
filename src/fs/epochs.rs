//! Pending snapshots: the seal jobs still outstanding per epoch, and the snapshots waiting
//! for them.
//!
//! A snapshot moves the epoch at once (`snap.rs`); the seal jobs of the epoch it closes (full
//! chunks in the sealer queues, chunks parked for a group commit, the partial buffers the
//! snapshot froze) commit at that epoch afterwards, each at its own pace. The snapshot's
//! record is written only when no job of its epoch or an older one is outstanding: until
//! then the snapshot is *pending*, known only to this process (listed, counted as retained
//! by version GC, waited for by views). A crash before its record is written loses it
//! whole, never a part of it.
//!
//! Every job holds a `Ticket` for its epoch; dropping the ticket (after the job's commit, or
//! its failure, was finished) counts the job out and wakes the completer when a pending
//! snapshot may be ready. The state lock is a leaf: nothing else is locked under it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::snap::SnapshotInfo;

#[derive(Default)]
struct State {
    /// Epoch -> seal jobs of that epoch not yet finished.
    jobs: BTreeMap<u64, usize>,
    /// Epoch -> snapshot whose record waits for the jobs of its epoch and older ones.
    pending: BTreeMap<u64, SnapshotInfo>,
    /// Pending snapshots a job of theirs failed to commit: they are dropped, not recorded.
    failed: std::collections::BTreeSet<u64>,
}

impl State {
    /// Whether the pending snapshot at `epoch` has no job left at or below it.
    fn ready(&self, epoch: u64) -> bool {
        self.jobs.keys().next().is_none_or(|oldest| *oldest > epoch)
    }
}

#[derive(Default)]
pub(crate) struct Epochs {
    state: Mutex<State>,
    /// Signalled when a pending snapshot may be ready (to the completer) and when one was
    /// completed or dropped (to waiters).
    changed: Condvar,
}

/// A seal job's hold on its epoch.
pub(crate) struct Ticket {
    epochs: Arc<Epochs>,
    epoch: u64,
}

impl Ticket {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The job failed (its file has a sticky error): every pending snapshot that should
    /// hold its chunk is incomplete and will be dropped rather than recorded.
    pub(crate) fn failed(&self) {
        let mut st = self.epochs.state.lock();
        let hit: Vec<u64> = st.pending.range(self.epoch..).map(|(e, _)| *e).collect();
        st.failed.extend(hit);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.epochs.state.lock();
        if let Some(n) = st.jobs.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                st.jobs.remove(&self.epoch);
                if st.pending.keys().next().is_some_and(|e| st.ready(*e)) {
                    self.epochs.changed.notify_all();
                }
            }
        }
    }
}

impl Epochs {
    /// Counts a new job of `epoch` in.
    pub(crate) fn ticket(self: &Arc<Self>, epoch: u64) -> Ticket {
        *self.state.lock().jobs.entry(epoch).or_insert(0) += 1;
        Ticket {
            epochs: self.clone(),
            epoch,
        }
    }

    /// Whether a snapshot at `epoch` must be pending: jobs at or below it are outstanding,
    /// or an older snapshot is still pending (records are written oldest first).
    pub(crate) fn must_wait(&self, epoch: u64) -> bool {
        let st = self.state.lock();
        !st.ready(epoch) || !st.pending.is_empty()
    }

    pub(crate) fn add_pending(&self, info: SnapshotInfo) {
        self.state.lock().pending.insert(info.epoch, info);
    }

    /// Pending snapshots, oldest first.
    pub(crate) fn pending(&self) -> Vec<SnapshotInfo> {
        self.state.lock().pending.values().cloned().collect()
    }

    pub(crate) fn pending_named(&self, name: &str) -> Option<SnapshotInfo> {
        self.state
            .lock()
            .pending
            .values()
            .find(|s| s.name == name)
            .cloned()
    }

    /// Pending snapshots whose jobs are all finished, oldest first (still listed as pending
    /// until `completed`), each with whether one of its jobs failed.
    pub(crate) fn ready(&self) -> Vec<(SnapshotInfo, bool)> {
        let st = self.state.lock();
        st.pending
            .values()
            .take_while(|s| st.ready(s.epoch))
            .map(|s| (s.clone(), st.failed.contains(&s.epoch)))
            .collect()
    }

    /// A pending snapshot's record is written (or it could not be): no longer pending.
    pub(crate) fn completed(&self, epoch: u64) {
        let mut st = self.state.lock();
        st.pending.remove(&epoch);
        st.failed.remove(&epoch);
        self.changed.notify_all();
    }

    /// Waits until the snapshot `name` is no longer pending, or `limit` passed (false).
    pub(crate) fn wait_named(&self, name: &str, limit: Duration) -> bool {
        self.wait_while(limit, |p| p.values().any(|s| s.name == name))
    }

    /// Waits until no snapshot is pending, or `limit` passed (false).
    pub(crate) fn wait_all(&self, limit: Duration) -> bool {
        self.wait_while(limit, |p| !p.is_empty())
    }

    /// Waits while `busy` holds of the pending snapshots, at most `limit`; false if it still does.
    fn wait_while(
        &self,
        limit: Duration,
        busy: impl Fn(&BTreeMap<u64, SnapshotInfo>) -> bool,
    ) -> bool {
        let end = Instant::now() + limit;
        let mut st = self.state.lock();
        while busy(&st.pending) {
            if self.changed.wait_until(&mut st, end).timed_out() {
                return !busy(&st.pending);
            }
        }
        true
    }

    /// Wakes the completer (a snapshot was registered pending).
    pub(crate) fn wake(&self) {
        self.changed.notify_all();
    }

    /// The completer's wait: until a pending snapshot is ready, or `limit` passed.
    pub(crate) fn wait_ready(&self, limit: Duration) {
        let mut st = self.state.lock();
        if st.pending.keys().next().is_some_and(|e| st.ready(*e)) {
            return;
        }
        let _ = self.changed.wait_for(&mut st, limit);
    }
}
