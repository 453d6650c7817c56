//! Snapshots: O(1) creation by advancing the epoch, read-only views at a fixed epoch, and the
//! garbage collection of versions that no retained epoch can see any more.
//!
//! A version of a record written at epoch `e` is visible at every view `v` with
//! `e <= v < e_next`, where `e_next` is the epoch of the next newer version of the same record
//! (or infinity). The retained views are the epochs of the existing snapshots and the live
//! epoch. A version whose interval holds no retained view is garbage.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::error::{FsError, Result};
use crate::storage::engine::{Batch, Cf};
use crate::storage::inode::{Attr, Kind, Time};
use crate::storage::keys::{self, ChunkId, MapEntry, TAG_LIVE};

use super::{Fs, Txn};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The epoch the snapshot reads at; also its id (unique, increasing).
    pub epoch: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    pub created_nanos: u32,
    /// Taken by the daemon's automatic snapshots (`mount --snapshot-every`): the only ones
    /// its retention may delete.
    pub automatic: bool,
    /// Its seal jobs are still committing: no record yet (known to this process only), lost
    /// whole if the process dies first (`epochs.rs`).
    #[serde(default)]
    pub pending: bool,
}

/// How long anything that reads a snapshot waits for a pending one to complete.
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Snapshot names: 1..=200 bytes of printable UTF-8, no `/`, not `.` or `..`.
pub fn check_snapshot_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "snapshot name must be 1 to 200 bytes, not {}",
            name.len()
        ));
    }
    if name == "." || name == ".." || name.contains("..") {
        return Err(format!("snapshot name {name:?} may not contain \"..\""));
    }
    if let Some(c) = name.chars().find(|c| *c == '/' || c.is_control()) {
        return Err(format!(
            "snapshot name {name:?} contains {c:?}; use letters, digits, '-', '_', '.', ':'"
        ));
    }
    Ok(())
}

fn encode_snapshot(s: &SnapshotInfo) -> Vec<u8> {
    let mut v = Vec::with_capacity(21);
    v.extend_from_slice(&s.epoch.to_le_bytes());
    v.extend_from_slice(&s.created.to_le_bytes());
    v.extend_from_slice(&s.created_nanos.to_le_bytes());
    v.push(if s.automatic { SNAP_AUTOMATIC } else { 0 });
    v
}

/// Flag bit of the snapshot record's byte 20 (absent in records of earlier builds: manual).
const SNAP_AUTOMATIC: u8 = 1;

fn decode_snapshot(name: &[u8], v: &[u8]) -> Option<SnapshotInfo> {
    (v.len() >= 20).then(|| SnapshotInfo {
        name: String::from_utf8_lossy(name).into_owned(),
        epoch: keys::le_u64(v),
        created: keys::le_u64(&v[8..]) as i64,
        created_nanos: keys::le_u32(&v[16..]),
        automatic: v.get(20).is_some_and(|f| f & SNAP_AUTOMATIC != 0),
        pending: false,
    })
}

/// One version of a record: full key, epoch, value (tag included).
type Version = (Vec<u8>, u64, Vec<u8>);

/// What version GC deletes from the versions of one record (newest first): the versions no
/// retained epoch sees, and tombstones with nothing older kept. With the chunk a deleted
/// chunk-map version referenced.
fn victims(group: &[Version], retained: &[u64]) -> Vec<(Vec<u8>, u64, Option<ChunkId>)> {
    let sees = |lo: u64, hi: u64| retained.iter().any(|r| *r >= lo && *r < hi);
    // Newest first; version i is visible on [e_i, e_{i-1}).
    let mut keep = vec![false; group.len()];
    let mut upper = u64::MAX;
    for (i, (_, e, _)) in group.iter().enumerate() {
        keep[i] = sees(*e, upper);
        upper = *e;
    }
    // A tombstone with nothing older kept says nothing that absence does not.
    for i in (0..group.len()).rev() {
        if !keep[i] {
            continue;
        }
        if group[i].2.first() == Some(&TAG_LIVE) {
            break;
        }
        keep[i] = false;
    }
    let mut out = Vec::new();
    for (i, (k, e, v)) in group.iter().enumerate() {
        if !keep[i] {
            let chunk = (k[0] == keys::P_MAP && v.first() == Some(&TAG_LIVE))
                .then(|| MapEntry::decode(&v[1..]).map(|m| m.id))
                .flatten();
            out.push((k.clone(), *e, chunk));
        }
    }
    out
}

/// What one pass over the versioned records found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VersionGc {
    pub versions_deleted: u64,
    pub chunks_freed: u64,
}

impl Fs {
    pub fn epoch(&self) -> u64 {
        self.view_epoch()
    }

    pub fn is_view(&self) -> bool {
        self.view.is_some()
    }

    /// Takes a snapshot of the live tree: one instant. Every write acknowledged before the
    /// call is in it; no write that started after the epoch moved is; a write in flight is
    /// wholly in or wholly out (writers hold `barrier` shared for a whole call).
    ///
    /// Under the barrier it only moves each open file's unsealed buffers into seal jobs (no
    /// hashing, no I/O) and moves the epoch, in one small batch: O(1) in the data, and in
    /// the bytes writers have in flight. The seal jobs of the closed epoch commit at that
    /// epoch behind the call (`epochs.rs`); the snapshot's record is written when the last
    /// of them has committed. Until then the snapshot is *pending*: listed as such, waited
    /// for by anything that reads it, and lost whole (never in part) if the process dies
    /// first. With nothing in flight the record is written at once. With `durable`, the call
    /// waits for the record and then for the WAL fsync, so the snapshot survives power loss
    /// when it returns; otherwise that fsync starts in the background when the record is
    /// written, because it writes back every unsynced byte a streaming writer produced.
    pub fn snapshot_create(&self, name: &str, durable: bool) -> Result<SnapshotInfo> {
        self.snapshot_create_as(name, durable, false)
    }

    /// `snapshot_create`, recording whether automatic snapshotting took it.
    pub fn snapshot_create_as(
        &self,
        name: &str,
        durable: bool,
        automatic: bool,
    ) -> Result<SnapshotInfo> {
        self.snapshot_create_full(name, durable, automatic, None)
    }

    /// `snapshot_create_as` with the creation time given rather than now: `recover` rebuilds
    /// a snapshot with the time its marker records, so that retention (`--keep-daily` and
    /// the like) and `snapshot list` see the original. Epochs still order snapshots.
    pub fn snapshot_create_full(
        &self,
        name: &str,
        durable: bool,
        automatic: bool,
        created: Option<Time>,
    ) -> Result<SnapshotInfo> {
        check_snapshot_name(name).map_err(|_| FsError::Invalid)?;
        self.write_epoch()?;
        // A snapshot adds little, but it pins what deletions would free on a full disk.
        self.eng.admit_growth()?;
        let key = keys::snapshot_key(name.as_bytes());
        if self.eng.get(Cf::Meta, &key)?.is_some() || self.epochs.pending_named(name).is_some() {
            return Err(FsError::Exists);
        }
        let mut phases = Phases::start();
        let barrier = self.barrier.write();
        phases.mark("barrier");
        // A file with a sticky seal error keeps its buffers: its writer is told on its next
        // write, flush or fsync, and the snapshot holds what the store holds.
        if let Err(e) = self.freeze_open_files() {
            log::warn!("snapshot {name}: some buffers could not be queued: {e}");
        }
        phases.mark("freeze");
        fail::fail_point!("snapshot-before-epoch-move");
        let mut meta = self.lock_meta();
        phases.mark("meta");
        if self.eng.get(Cf::Meta, &key)?.is_some() || self.epochs.pending_named(name).is_some() {
            return Err(FsError::Exists);
        }
        let e = self.write_epoch()?;
        let now = created.unwrap_or_else(Time::now);
        let mut info = SnapshotInfo {
            name: name.to_string(),
            epoch: e,
            created: now.secs,
            created_nanos: now.nanos,
            automatic,
            // Also behind an older pending one: records are written oldest first, so a
            // crash never keeps a newer snapshot and loses an older one.
            pending: self.epochs.must_wait(e),
        };
        if info.pending {
            // No I/O: the first batch that writes at E + 1 persists the move
            // (`MetaState::epoch_on_disk`), the record's batch at the latest.
            self.epochs.add_pending(info.clone());
        } else {
            let mut b = Batch::new();
            self.eng.put(
                &mut b,
                Cf::Meta,
                &keys::counter_key("epoch"),
                &(e + 1).to_le_bytes(),
            );
            self.put_snapshot_record(&mut b, &meta, &info, super::txn::now_ms());
            self.eng.write(b, false)?;
            meta.epoch_on_disk = e + 1;
        }
        self.epoch.store(e + 1, Ordering::Release);
        drop(barrier);
        drop(meta);
        phases.mark("epoch");
        if info.pending {
            // The completer may have found nothing ready before this was registered.
            self.epochs.wake();
        }
        log::debug!(
            "snapshot {name}: {phases}{}",
            if info.pending { " (pending)" } else { "" }
        );
        if durable {
            if info.pending {
                self.wait_snapshot(name)?;
                // Absent: dropped, because a chunk written before it could not be stored.
                info = self.snapshot_record(name).map_err(|e| match e {
                    FsError::NotFound => FsError::Io,
                    e => e,
                })?;
            }
            self.eng.sync()?;
        } else if !info.pending {
            self.sync_in_background();
        }
        Ok(info)
    }

    /// The record of a completed snapshot and, for each backend, its replication marker:
    /// every chunk it needs was sealed before now, so it is queued at or below `repl_seq`,
    /// and the snapshot is complete on a backend once that backend's queue holds nothing at
    /// or below it and its manifest is uploaded.
    /// `created_ms` starts the backup window on each backend.
    fn put_snapshot_record(
        &self,
        b: &mut Batch,
        meta: &super::MetaState,
        info: &SnapshotInfo,
        created_ms: u64,
    ) {
        let key = keys::snapshot_key(info.name.as_bytes());
        self.eng.put(b, Cf::Meta, &key, &encode_snapshot(info));
        let marker = keys::ReplSnap {
            barrier_seq: meta.repl_seq,
            created_ms,
            ..Default::default()
        };
        for &backend in self.replicas().iter() {
            let k = keys::repl_key(keys::P_REPL_SNAP, backend, info.name.as_bytes());
            self.eng.put(b, Cf::Meta, &k, &marker.encode());
        }
    }

    /// Writes the records of the pending snapshots whose seal jobs have all committed, oldest
    /// first, then starts the WAL fsync. Called by the completer thread.
    pub(crate) fn complete_pending(&self) {
        {
            // Read under `meta`, and marked completed before it is released: two callers
            // (the completer, `sync_all`) never record one snapshot twice, and a create
            // (which registers under `meta`) is never seen half done.
            let mut meta = self.lock_meta();
            let ready = self.epochs.ready();
            if ready.is_empty() {
                return;
            }
            let mut b = Batch::new();
            // A record at E must never be durable with the live epoch still E on disk.
            let live = self.epoch.load(Ordering::Acquire);
            if live > meta.epoch_on_disk {
                let k = keys::counter_key("epoch");
                self.eng.put(&mut b, Cf::Meta, &k, &live.to_le_bytes());
            }
            for (info, failed) in &ready {
                if *failed {
                    // Never a record without its data: an operator finds the gap in the
                    // log and the list, not a snapshot that lacks acknowledged writes.
                    log::error!(
                        "snapshot {} is dropped: a chunk written before it could not be \
                         stored (its file reported the error to its writer)",
                        info.name
                    );
                    continue;
                }
                let mut info = info.clone();
                info.pending = false;
                // The backup window counts from the snapshot's creation, pending time included.
                let created_ms =
                    (info.created.max(0) as u64) * 1000 + u64::from(info.created_nanos) / 1_000_000;
                self.put_snapshot_record(&mut b, &meta, &info, created_ms);
            }
            match self.eng.write(b, false) {
                Ok(()) => meta.epoch_on_disk = meta.epoch_on_disk.max(live),
                Err(e) => {
                    for (info, _) in &ready {
                        log::error!(
                            "snapshot {}: cannot write its record: {e}; it is lost",
                            info.name
                        );
                    }
                }
            }
            for (info, _) in &ready {
                self.epochs.completed(info.epoch);
                log::debug!("snapshot {}: complete", info.name);
            }
        }
        self.sync_in_background();
    }

    /// Starts the thread that writes the records of pending snapshots once their jobs have
    /// committed. It ends when the filesystem is dropped.
    pub(crate) fn start_completer(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        let epochs = self.epochs.clone();
        let spawned = std::thread::Builder::new()
            .name("snapfs-snapdone".into())
            .spawn(move || loop {
                epochs.wait_ready(std::time::Duration::from_millis(500));
                let Some(fs) = weak.upgrade() else { return };
                fs.complete_pending();
            });
        if let Err(e) = spawned {
            log::error!("cannot start the snapshot completer thread: {e}");
        }
    }

    /// The WAL fsync after a snapshot's record, on a thread of its own.
    fn sync_in_background(&self) {
        let eng = self.eng.clone();
        let spawned = std::thread::Builder::new()
            .name("snapfs-snapsync".into())
            .spawn(move || {
                if let Err(e) = eng.sync() {
                    log::error!("background WAL sync after a snapshot failed: {e}");
                }
            });
        let mut bg = self.background.lock();
        bg.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => bg.push(t),
            Err(_) => {
                if let Err(e) = self.eng.sync() {
                    log::error!("WAL sync after a snapshot failed: {e}");
                }
            }
        }
    }

    /// Waits until snapshot `name` is no longer pending (its record written). Busy if that
    /// takes more than a minute (its seal jobs stuck behind a failing disk).
    pub(crate) fn wait_snapshot(&self, name: &str) -> Result<()> {
        if self.view.is_some() || self.epochs.wait_named(name, PENDING_WAIT) {
            return Ok(());
        }
        log::warn!("snapshot {name} is still pending after {PENDING_WAIT:?}");
        Err(FsError::Busy)
    }

    /// Waits until no snapshot is pending.
    pub(crate) fn wait_all_snapshots(&self) -> Result<()> {
        if self.view.is_some() || self.epochs.wait_all(PENDING_WAIT) {
            return Ok(());
        }
        Err(FsError::Busy)
    }

    /// Every snapshot, oldest first: the recorded ones and the pending ones.
    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = self.snapshot_records()?;
        for p in self.epochs.pending() {
            if !out.iter().any(|s| s.name == p.name) {
                out.push(p);
            }
        }
        out.sort_by_key(|s| s.epoch);
        Ok(out)
    }

    /// The recorded snapshots (not the pending ones), oldest first.
    pub fn snapshot_records(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out: Vec<SnapshotInfo> = self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_SNAPSHOT], &[keys::P_SNAPSHOT])
            .map(|r| r.map(|(k, v)| decode_snapshot(&k[1..], &v)))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        out.sort_by_key(|s| s.epoch);
        Ok(out)
    }

    /// A snapshot, once complete: a pending one is waited for.
    pub fn snapshot_get(&self, name: &str) -> Result<SnapshotInfo> {
        self.wait_snapshot(name)?;
        self.snapshot_record(name)
    }

    /// A snapshot's record, without waiting (NotFound while it is pending).
    pub(crate) fn snapshot_record(&self, name: &str) -> Result<SnapshotInfo> {
        let v = self
            .eng
            .get(Cf::Meta, &keys::snapshot_key(name.as_bytes()))?
            .ok_or(FsError::NotFound)?;
        decode_snapshot(name.as_bytes(), &v).ok_or(FsError::Corrupt)
    }

    /// Deletes a snapshot record (synced), then collects the versions only it could see.
    /// Versions that a live view of the snapshot still reads (an open file under
    /// `.snapshots/NAME`, a restore, a diff) stay until the view is dropped; the background
    /// GC collects them then (`run_pending_gc`).
    pub fn snapshot_delete(&self, name: &str) -> Result<VersionGc> {
        self.write_epoch()?;
        self.wait_snapshot(name)?;
        {
            let _meta = self.lock_meta();
            self.snapshot_record(name)?;
            let mut b = Batch::new();
            self.eng
                .delete(&mut b, Cf::Meta, &keys::snapshot_key(name.as_bytes()));
            self.eng.write(b, true)?;
        }
        let mut r = self.gc_versions()?;
        r.chunks_freed = self.collect_garbage()?;
        Ok(r)
    }

    /// Epochs pinned by views that no snapshot and not the live tree account for: versions
    /// only they see are garbage as soon as they are released.
    pub fn orphan_pins(&self) -> Result<usize> {
        let _meta = self.lock_meta();
        let snaps: Vec<u64> = self.snapshot_list()?.iter().map(|s| s.epoch).collect();
        let live = self.write_epoch()?;
        Ok(self
            .pinned_epochs()
            .into_iter()
            .filter(|p| *p != live && !snaps.contains(p))
            .count())
    }

    /// Runs a version GC pass that an earlier pass could not finish because views pinned
    /// epochs of deleted snapshots, once those views are gone. Called by the background GC.
    pub fn run_pending_gc(&self) -> Result<Option<VersionGc>> {
        if self.view.is_some() || !self.gc_pending.load(Ordering::Acquire) {
            return Ok(None);
        }
        if self.orphan_pins()? > 0 {
            return Ok(None);
        }
        self.gc_pending.store(false, Ordering::Release);
        let mut r = self.gc_versions()?;
        r.chunks_freed = self.collect_garbage()?;
        Ok(Some(r))
    }

    /// The epochs some view may still read at: every snapshot's, the live one and every
    /// epoch pinned by a live view. The caller holds `meta`, so no snapshot, epoch move or
    /// pin can slip in between (each of those takes `meta`).
    fn retained_epochs_locked(&self) -> Result<Vec<u64>> {
        let mut r: Vec<u64> = self.snapshot_list()?.iter().map(|s| s.epoch).collect();
        r.push(self.write_epoch()?);
        r.extend(self.pinned_epochs());
        r.sort_unstable();
        r.dedup();
        Ok(r)
    }

    fn retained_epochs(&self) -> Result<Vec<u64>> {
        let _meta = self.lock_meta();
        self.retained_epochs_locked()
    }

    /// Deletes every version of every record that no retained epoch can see, and drops the
    /// chunk references of deleted chunk-map versions. O(metadata), not O(data).
    ///
    /// Two phases. The scan, without `meta`, only nominates records that may hold garbage.
    /// Each batch then takes `meta`, reads the retained epochs afresh, re-reads every version
    /// of each nominated record and decides again (`victims`). Every writer, snapshot and
    /// pin takes `meta` too, so what a batch deletes is garbage at the moment it commits:
    /// a version written, replaced or newly hidden since the scan is judged on what the
    /// store holds now, never on the scan's stale picture. Passes are serialized
    /// (`gc_lock`), so a reference is dropped once.
    pub fn gc_versions(&self) -> Result<VersionGc> {
        let _gc = self.gc_lock.lock();
        let retained = self.retained_epochs()?;
        let mut nominated: Vec<Vec<u8>> = Vec::new();
        let mut group: Vec<Version> = Vec::new();
        let mut consider = |group: &mut Vec<Version>| {
            if !victims(group, &retained).is_empty() {
                let (rec, _) = keys::split_version(&group[0].0);
                nominated.push(rec.to_vec());
            }
            group.clear();
        };
        let start = [keys::P_INODE];
        let end = [keys::P_XATTR + 1];
        for item in self.eng.reader()?.scan_range(Cf::Meta, &start, &end) {
            let (k, v) = item?;
            let (rec, e) = keys::split_version(&k);
            if group
                .first()
                .is_some_and(|(gk, _, _)| keys::split_version(gk).0 != rec)
            {
                consider(&mut group);
            }
            group.push((k.clone(), e, v));
        }
        consider(&mut group);
        fail::fail_point!("gc-after-scan");
        let mut result = VersionGc::default();
        for part in nominated.chunks(256) {
            let mut meta = self.lock_meta();
            let retained = self.retained_epochs_locked()?;
            let live = self.write_epoch()?;
            let mut txn = Txn::new(self);
            let mut n = 0;
            for rec in part {
                let mut versions: Vec<Version> = Vec::new();
                for item in self.eng.reader()?.scan(Cf::Meta, rec, rec) {
                    let (k, v) = item?;
                    if k.len() == rec.len() + keys::VERSION_LEN {
                        let e = keys::split_version(&k).1;
                        versions.push((k, e, v));
                    }
                }
                for (k, e, chunk) in victims(&versions, &retained) {
                    if e >= live {
                        continue; // the live epoch's keys belong to writers
                    }
                    txn.delete_raw(&k);
                    if let Some(id) = chunk {
                        txn.unref(&id);
                    }
                    n += 1;
                }
            }
            txn.commit(&mut meta, false)?;
            result.versions_deleted += n as u64;
        }
        if self.orphan_pins()? > 0 {
            self.gc_pending.store(true, Ordering::Release);
        }
        Ok(result)
    }

    /// Per snapshot: logical bytes (file sizes at its epoch) and bytes only it references.
    pub fn snapshot_usage(&self) -> Result<BTreeMap<u64, (u64, u64)>> {
        let retained = self.retained_epochs()?;
        let mut usage: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for s in self.snapshot_records()? {
            let view = self.view(s.epoch);
            let mut logical = 0;
            for (rec, p) in view.scan_recs(&[keys::P_INODE])? {
                if let Some(a) = Attr::decode(keys::be_u64(&rec[1..]), &p) {
                    if a.kind == Kind::File {
                        logical += a.size;
                    }
                }
            }
            usage.insert(s.epoch, (logical, 0));
        }
        let prefix = [keys::P_MAP];
        let mut upper = u64::MAX;
        let mut last: Vec<u8> = Vec::new();
        for item in self.eng.reader()?.scan(Cf::Meta, &prefix, &prefix) {
            let (k, v) = item?;
            let (rec, e) = keys::split_version(&k);
            if rec != last.as_slice() {
                last = rec.to_vec();
                upper = u64::MAX;
            }
            let seen: Vec<u64> = retained
                .iter()
                .copied()
                .filter(|r| *r >= e && *r < upper)
                .collect();
            upper = e;
            if let ([only], Some(&TAG_LIVE)) = (seen.as_slice(), v.first()) {
                if let (Some(u), Some(m)) = (usage.get_mut(only), MapEntry::decode(&v[1..])) {
                    if self.refcount(&m.id)? == 1 {
                        u.1 += m.len as u64;
                    }
                }
            }
        }
        Ok(usage)
    }

    fn refcount(&self, id: &ChunkId) -> Result<u64> {
        Ok(self
            .eng
            .get(Cf::Meta, &keys::refcount_key(id))?
            .filter(|v| v.len() >= 8)
            .map(|v| keys::le_u64(&v))
            .unwrap_or(0))
    }
}

impl Fs {
    /// The chunk map of a file at the view epoch, as bytes: equal signatures mean equal
    /// contents (used by diff without reading data).
    pub fn content_signature(&self, ino: u64) -> Result<Vec<u8>> {
        let mut sig = Vec::new();
        for (rec, p) in self.scan_recs(&keys::map_prefix(ino))? {
            sig.extend_from_slice(&rec[9..17]);
            sig.extend_from_slice(&p);
        }
        Ok(sig)
    }
}

/// What a rollback changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rollback {
    pub records_changed: u64,
    pub snapshots_destroyed: u64,
}

impl Fs {
    /// Turns the live tree back to snapshot `name`: every record whose live version differs
    /// from the snapshot's gets the snapshot's version (or a deletion) at the live epoch.
    /// O(metadata). Snapshots newer than `name` stay unless `destroy_newer`. Requires that no
    /// file is open (the daemon must not be serving the store), so no cached state goes stale.
    ///
    /// Atomic: every change, the deletion of the newer snapshots included, goes into one
    /// batch written with sync, so a crash leaves either the old live tree or the snapshot's
    /// (RocksDB applies a batch whole or not at all; a batch of 100,000 records is tens of
    /// MB, well within what it takes). A file that was open but unlinked when the snapshot was
    /// taken comes back with nlink 0: it gets an orphan marker in the same batch and is freed
    /// at once after the commit (or at the next open if the process dies first).
    pub fn rollback(&self, name: &str, destroy_newer: bool) -> Result<Rollback> {
        // Late seal jobs would write into the epochs the rollback replaces.
        self.wait_all_snapshots()?;
        let target = self.snapshot_get(name)?;
        if !self.open.lock().is_empty() {
            return Err(FsError::Busy);
        }
        let mut out = Rollback::default();
        let newer: Vec<SnapshotInfo> = if destroy_newer {
            self.snapshot_list()?
                .into_iter()
                .filter(|s| s.epoch > target.epoch)
                .collect()
        } else {
            Vec::new()
        };
        let gc = self.gc_lock.lock();
        let mut meta = self.lock_meta();
        struct Rec {
            key: Vec<u8>,
            live: Option<Vec<u8>>,
            snap: Option<Vec<u8>>,
            snap_found: bool,
        }
        let visible = |v: &[u8]| (v.first() == Some(&TAG_LIVE)).then(|| v.to_vec());
        let mut changes: Vec<Rec> = Vec::new();
        let mut cur: Option<Rec> = None;
        let finish = |c: Option<Rec>, changes: &mut Vec<Rec>| {
            if let Some(c) = c {
                if c.live != c.snap {
                    changes.push(c);
                }
            }
        };
        for item in self
            .eng
            .reader()?
            .scan_range(Cf::Meta, &[keys::P_INODE], &[keys::P_XATTR + 1])
        {
            let (k, v) = item?;
            let (rec, e) = keys::split_version(&k);
            if cur.as_ref().is_none_or(|c| c.key != rec) {
                finish(cur.take(), &mut changes);
                // Versions come newest first: the first one is the live version.
                cur = Some(Rec {
                    key: rec.to_vec(),
                    live: visible(&v),
                    snap: None,
                    snap_found: false,
                });
            }
            let c = cur.as_mut().expect("set above");
            if !c.snap_found && e <= target.epoch {
                c.snap = visible(&v);
                c.snap_found = true;
            }
        }
        finish(cur.take(), &mut changes);
        let mut txn = Txn::new(self);
        for s in &newer {
            txn.del_raw(&keys::snapshot_key(s.name.as_bytes()));
            out.snapshots_destroyed += 1;
        }
        for c in &changes {
            apply_rollback(&mut txn, &c.key, c.snap.as_deref())?;
            out.records_changed += 1;
            if c.key[0] == keys::P_INODE {
                let ino = keys::be_u64(&c.key[1..9]);
                let unlinked = c
                    .snap
                    .as_deref()
                    .and_then(|v| Attr::decode(ino, &v[1..]))
                    .is_some_and(|a| a.nlink == 0);
                if unlinked {
                    txn.set_orphan(ino);
                }
            }
        }
        fail::fail_point!("rollback-before-commit");
        txn.commit(&mut meta, true)?;
        drop(meta);
        drop(gc);
        self.clean_orphans()?;
        self.gc_versions()?;
        self.collect_garbage()?;
        Ok(out)
    }
}

/// Writes the snapshot's version of one record (tag included; None: absent) at the live epoch.
fn apply_rollback(txn: &mut Txn<'_>, rec: &[u8], snap: Option<&[u8]>) -> Result<()> {
    if rec[0] == keys::P_MAP {
        let ino = keys::be_u64(&rec[1..9]);
        let idx = keys::map_index(rec);
        return match snap.and_then(|v| MapEntry::decode(&v[1..])) {
            Some(m) => txn.put_map(ino, idx, m),
            None => txn.del_map(ino, idx),
        };
    }
    match snap {
        Some(v) => txn.put_rec(rec, v),
        None => txn.del_rec(rec),
    }
}

/// Where a snapshot's time went, for the debug log.
struct Phases {
    last: std::time::Instant,
    spent: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn start() -> Phases {
        Phases {
            last: std::time::Instant::now(),
            spent: Vec::with_capacity(8),
        }
    }

    fn mark(&mut self, what: &'static str) {
        let now = std::time::Instant::now();
        self.spent.push((what, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (what, d)) in self.spent.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{what} {:.2} ms", d.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}
