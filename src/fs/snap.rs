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
}

/// Parked bytes (uncompressed) up to which a snapshot copies them into the WAL under its
/// barrier instead of flushing them first.
const SNAPSHOT_COPY_MAX: u64 = 32 << 20;

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
    /// wholly in or wholly out (writers hold `barrier` shared for a whole call). The cost is
    /// sealing open buffers plus one batch, whatever the amount of data.
    ///
    /// On return the snapshot survives a crash of this process (the batch is in the WAL, in
    /// the OS page cache). With `durable`, it returns only after the WAL is fsynced, so it also
    /// survives power loss; otherwise that fsync starts in the background at once, because it
    /// writes back every unsynced byte a streaming writer produced and can take seconds.
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
        if self.eng.get(Cf::Meta, &key)?.is_some() {
            return Err(FsError::Exists);
        }
        // Seal the buffers of idle files while writers still run, so the barrier below is
        // short (streaming files, with seal jobs in flight, are sealed under it). A file with
        // a sticky seal error is logged and skipped: its writer is told on its next write,
        // flush or fsync, and the snapshot holds what the store holds.
        let mut phases = Phases::start();
        let _ = self.seal_open_files_but(true);
        phases.mark("seal idle files");
        // Parked chunks live only in the chunk memtable: before the snapshot returns they
        // must reach the kernel, by a flush (fsyncs: seconds on a slow disk under a streaming
        // writer) or by a copy of their bodies in the WAL (writers then write those bytes
        // twice, and the WAL sync after the snapshot has them to write). A few are copied,
        // under the barrier, without waiting for any flush; more than
        // `SNAPSHOT_COPY_MAX` are flushed first, while writers still run, as a group commit
        // would (docs/benchmarks.md, "Snapshots without a flush").
        if self.parked().1 > SNAPSHOT_COPY_MAX {
            self.commit_parked();
        }
        phases.mark("commit parked");
        let barrier = self.barrier.write();
        phases.mark("barrier");
        self.deferred.logged.store(true, Ordering::Release);
        let logged = LoggedUntilDrop(self);
        let _ = self.seal_open_files();
        phases.mark("seal under barrier");
        fail::fail_point!("snapshot-before-epoch-move");
        let meta = self.lock_meta();
        phases.mark("meta");
        if self.eng.get(Cf::Meta, &key)?.is_some() {
            return Err(FsError::Exists);
        }
        let e = self.write_epoch()?;
        let now = created.unwrap_or_else(Time::now);
        let info = SnapshotInfo {
            name: name.to_string(),
            epoch: e,
            created: now.secs,
            created_nanos: now.nanos,
            automatic,
        };
        let mut b = Batch::new();
        self.eng
            .put(&mut b, Cf::Meta, &key, &encode_snapshot(&info));
        self.eng.put(
            &mut b,
            Cf::Meta,
            &keys::counter_key("epoch"),
            &(e + 1).to_le_bytes(),
        );
        // Every chunk this snapshot needs was sealed before now, so it is queued at or below
        // `repl_seq`: the snapshot is complete on a backend once that backend's queue holds
        // nothing at or below it and its manifest is uploaded.
        let pending = keys::ReplSnap {
            barrier_seq: meta.repl_seq,
            created_ms: super::txn::now_ms(),
            ..Default::default()
        };
        for &backend in self.replicas().iter() {
            let k = keys::repl_key(keys::P_REPL_SNAP, backend, name.as_bytes());
            self.eng.put(&mut b, Cf::Meta, &k, &pending.encode());
        }
        self.eng.write(b, durable)?;
        self.epoch.store(e + 1, Ordering::Release);
        drop(logged);
        drop(meta);
        drop(barrier);
        phases.mark("record");
        log::debug!("snapshot {name}: {phases}");
        if !durable {
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
                Err(_) => self.eng.sync()?,
            }
        }
        Ok(info)
    }

    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>> {
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

    pub fn snapshot_get(&self, name: &str) -> Result<SnapshotInfo> {
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
        {
            let _meta = self.lock_meta();
            self.snapshot_get(name)?;
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
        for s in self.snapshot_list()? {
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

/// Ends the logged group commits of a snapshot's barrier on every way out of it.
struct LoggedUntilDrop<'a>(&'a Fs);

impl Drop for LoggedUntilDrop<'_> {
    fn drop(&mut self) {
        self.0.deferred.logged.store(false, Ordering::Release);
    }
}
