//! Deterministic interleavings of version GC and snapshot creation with live writers,
//! through named failpoints (the `fail` crate): GC paused between its scan and its batches,
//! snapshot creation paused between its last seal and the epoch move, a group commit paused
//! before its flush. Each test is the regression test of one defect (of issue 6, or the
//! snapshot's wait for a flush of issue 9); each failed on the code before the fix (with the
//! failpoint added at the same place).
//!
//! Run with: `cargo test --release --features failpoints --test interleavings`.
#![cfg(feature = "failpoints")]

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use snapfs::fs::{Creds, Fs, VersionGc, ROOT_INO};
use snapfs::storage::store::Store;

const ME: Creds = Creds { uid: 0, gid: 0 };
const CS: usize = 4096;

/// The failpoint registry (one test at a time holds it), a directory and a new store in it.
fn fixture() -> (fail::FailScenario<'static>, tempfile::TempDir, Store) {
    let scenario = fail::FailScenario::setup();
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(t.path(), true, Some(CS)).unwrap();
    (scenario, t, s)
}

fn create(fs: &Fs, name: &str, content: &[u8]) -> u64 {
    let a = fs
        .mknod(ROOT_INO, name.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
        .unwrap();
    if !content.is_empty() {
        let h = fs.open(a.ino, true).unwrap();
        fs.write(&h, 0, content).unwrap();
        fs.fsync(&h).unwrap();
        fs.release(&h).unwrap();
    }
    a.ino
}

fn write_at(fs: &Fs, ino: u64, off: u64, content: &[u8]) {
    let h = fs.open(ino, true).unwrap();
    fs.write(&h, off, content).unwrap();
    fs.fsync(&h).unwrap();
    fs.release(&h).unwrap();
}

fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    let h = fs.open(ino, false).unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let d = fs.read(&h, out.len() as u64, 1 << 20).unwrap();
        assert!(!d.is_empty());
        out.extend_from_slice(&d);
    }
    fs.release(&h).unwrap();
    out
}

fn read_named(fs: &Fs, name: &str) -> Option<Vec<u8>> {
    let a = fs.lookup(ROOT_INO, name.as_bytes()).ok()?;
    Some(read_all(fs, a.ino))
}

/// Compares contents without printing megabytes: the length and the first differing byte.
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {at:?} (got {:?}, want {:?})",
            got.len(),
            want.len(),
            at.map(|i| got[i]),
            at.map(|i| want[i])
        );
    }
}

fn assert_consistent(fs: &Fs) {
    let r = fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "store check: {:#?}", r.problems);
}

/// Pauses the thread that reaches failpoint `name` until `go` is sent; `reached` says it
/// got there.
struct Pause {
    reached: Receiver<()>,
    go: Sender<()>,
}

impl Pause {
    fn at(name: &str) -> Pause {
        let (reached_tx, reached) = bounded::<()>(1);
        let (go, go_rx) = bounded::<()>(1);
        fail::cfg_callback(name, move || {
            let _ = reached_tx.send(());
            let _ = go_rx.recv_timeout(Duration::from_secs(30));
        })
        .unwrap();
        Pause { reached, go }
    }

    fn wait(&self) {
        self.reached
            .recv_timeout(Duration::from_secs(30))
            .expect("the paused thread never reached its failpoint");
    }

    fn release(&self) {
        self.go.send(()).unwrap();
    }
}

/// Deletes snapshot `name` with version GC paused between its scan and its batches, runs
/// `during` in that window, then lets GC finish.
fn delete_with_gc_paused(fs: &Arc<Fs>, name: &str, during: impl FnOnce()) -> VersionGc {
    let pause = Pause::at("gc-after-scan");
    let gc = {
        let (fs, name) = (fs.clone(), name.to_string());
        std::thread::spawn(move || fs.snapshot_delete(&name).unwrap())
    };
    pause.wait();
    during();
    pause.release();
    let r = gc.join().unwrap();
    fail::remove("gc-after-scan");
    r
}

/// Issue 6, defect 1, "lost write": GC's scan picks the live epoch's tombstone of M; an
/// fsync'd overwrite replaces it in place; a snapshot moves the epoch; the batch must not
/// delete the acknowledged data.
#[test]
fn gc_paused_after_scan_keeps_an_overwrite_fsynced_meanwhile() {
    let (scenario, _t, s) = fixture();
    let fs = s.fs.clone();
    let m = create(&fs, "m", &[b'O'; CS]);
    fs.snapshot_create("s1", false).unwrap();
    fs.truncate(m, 0).unwrap();
    delete_with_gc_paused(&fs, "s1", || {
        write_at(&fs, m, 0, &[b'N'; CS]);
        fs.snapshot_create("s3", false).unwrap();
    });
    assert_same(
        &read_all(&fs, m),
        &[b'N'; CS],
        "live file lost an fsync'd write",
    );
    let view = fs.snapshot_view("s3").unwrap();
    assert_same(
        &read_named(&view, "m").unwrap(),
        &[b'N'; CS],
        "snapshot s3 lost the write acknowledged before it",
    );
    drop(view);
    assert_consistent(&fs);
    scenario.teardown();
}

/// Issue 6, defect 1, "resurrection": GC nominates a tombstone that no retained epoch needed
/// at scan time; a truncate meanwhile deletes the newer version instead of writing a
/// tombstone (correct when that tombstone exists); the batch must not then delete the
/// tombstone and let bytes only snapshot S1 may see reappear in the live file.
#[test]
fn gc_paused_after_scan_does_not_resurrect_old_bytes() {
    let (scenario, _t, s) = fixture();
    let fs = s.fs.clone();
    let m = create(&fs, "m", &[b'O'; CS]);
    fs.snapshot_create("s1", false).unwrap();
    fs.truncate(m, 0).unwrap();
    fs.snapshot_create("s2", false).unwrap();
    write_at(&fs, m, 0, &[b'N'; CS]);
    delete_with_gc_paused(&fs, "s2", || fs.truncate(m, 0).unwrap());
    fs.truncate(m, CS as u64).unwrap();
    assert_same(
        &read_all(&fs, m),
        &[0u8; CS],
        "a truncated-then-extended file must read zeros, not a snapshot's old bytes",
    );
    let view = fs.snapshot_view("s1").unwrap();
    assert_same(&read_named(&view, "m").unwrap(), &[b'O'; CS], "snapshot s1");
    drop(view);
    assert_consistent(&fs);
    scenario.teardown();
}

/// The same race on a directory entry: an unlinked name must not come back naming an inode
/// that no longer exists.
#[test]
fn gc_paused_after_scan_does_not_resurrect_a_directory_entry() {
    let (scenario, _t, s) = fixture();
    let fs = s.fs.clone();
    create(&fs, "d", b"old");
    fs.snapshot_create("s1", false).unwrap();
    fs.unlink(ROOT_INO, b"d").unwrap();
    fs.snapshot_create("s2", false).unwrap();
    create(&fs, "d", b"new");
    delete_with_gc_paused(&fs, "s2", || fs.unlink(ROOT_INO, b"d").unwrap());
    assert!(
        fs.lookup(ROOT_INO, b"d").is_err(),
        "an unlinked name came back after version GC"
    );
    let listed: Vec<Vec<u8>> = fs
        .readdir(ROOT_INO)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        !listed.iter().any(|n| n == b"d"),
        "readdir lists an unlinked name that names a purged inode"
    );
    let view = fs.snapshot_view("s1").unwrap();
    assert_same(&read_named(&view, "d").unwrap(), b"old", "snapshot s1");
    drop(view);
    assert_consistent(&fs);
    scenario.teardown();
}

/// Issue 6, defect 2: a snapshot is one instant. Paused between its last seal and the epoch
/// move, writes issued meanwhile must be wholly out of it (or wholly in): no size that
/// covers bytes still in a buffer (a tail of zeros), and no later write to file A in while
/// an earlier one to file B is out.
#[test]
fn snapshot_paused_before_the_epoch_move_is_one_instant() {
    let (scenario, _t, s) = fixture();
    let fs = s.fs.clone();
    fs.start_sealer();
    let a = create(&fs, "a", b"");
    let b = create(&fs, "b", b"");
    let ha = fs.open(a, true).unwrap();
    let hb = fs.open(b, true).unwrap();
    let pause = Pause::at("snapshot-before-epoch-move");
    let snap = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.snapshot_create("s", false).unwrap())
    };
    pause.wait();
    let rec_b: Vec<u8> = (0..100u8).collect();
    let rec_a: Vec<u8> = (0..CS + 100).map(|i| (i % 251) as u8 + 1).collect();
    let writer = {
        let (fs, rec_a, rec_b) = (fs.clone(), rec_a.clone(), rec_b.clone());
        std::thread::spawn(move || {
            // B first (stays buffered), then A (a full chunk goes to the sealer at once).
            fs.write(&hb, 0, &rec_b).unwrap();
            fs.write(&ha, 0, &rec_a).unwrap();
            (ha, hb)
        })
    };
    // Long enough for the sealer to commit A's full chunk if nothing holds the write back.
    std::thread::sleep(Duration::from_millis(300));
    pause.release();
    snap.join().unwrap();
    let (ha, hb) = writer.join().unwrap();
    fail::remove("snapshot-before-epoch-move");
    fs.release(&ha).unwrap();
    fs.release(&hb).unwrap();
    let view = fs.snapshot_view("s").unwrap();
    let sa = read_named(&view, "a").unwrap();
    let sb = read_named(&view, "b").unwrap();
    assert!(
        sa.is_empty() || sa == rec_a,
        "snapshot holds {} bytes of A that are neither nothing nor the whole write \
         ({} trailing zero bytes)",
        sa.len(),
        sa.iter().rev().take_while(|b| **b == 0).count()
    );
    assert!(
        sb.is_empty() || sb == rec_b,
        "snapshot holds part of B's write"
    );
    assert!(
        sa.is_empty() || !sb.is_empty(),
        "snapshot holds the later write (to A) but not the earlier one (to B)"
    );
    assert_same(&read_named(&fs, "a").unwrap(), &rec_a, "live a");
    assert_same(&read_named(&fs, "b").unwrap(), &rec_b, "live b");
    drop(view);
    assert_consistent(&fs);
    scenario.teardown();
}

/// Issue 6, defect 5: a view of a snapshot (an open file under `.snapshots`, a restore, a
/// diff) keeps reading the snapshot's bytes while the snapshot is deleted; the versions are
/// freed when the view is gone.
#[test]
fn a_view_pins_a_snapshot_deleted_under_it() {
    let (scenario, _t, s) = fixture();
    let fs = s.fs.clone();
    let old: Vec<u8> = (0..3 * CS).map(|i| (i % 253) as u8).collect();
    let f = create(&fs, "f", &old);
    fs.snapshot_create("s", false).unwrap();
    write_at(&fs, f, 0, &vec![7u8; 3 * CS]);
    let view = Arc::new(fs.snapshot_view("s").unwrap());
    let gc = delete_with_gc_paused(&fs, "s", || {
        assert_same(
            &read_named(&view, "f").expect("the pinned view lost the file"),
            &old,
            "a pinned view read another epoch's bytes while GC ran",
        )
    });
    assert_same(
        &read_named(&view, "f").expect("the pinned view lost the file"),
        &old,
        "a pinned view read another epoch's bytes",
    );
    assert_eq!(fs.run_pending_gc().unwrap(), None, "GC ran while pinned");
    let before = fs.counters();
    drop(view);
    let later = fs.run_pending_gc().unwrap().expect("deferred GC runs");
    assert!(
        later.versions_deleted > 0 && later.chunks_freed == 3,
        "deferred GC freed {later:?} (first pass: {gc:?})"
    );
    assert!(fs.counters().chunks < before.chunks);
    assert_consistent(&fs);
    scenario.teardown();
}

/// Issue 9, "snapshots without a tail": a snapshot taken while a group commit is paused
/// before its flush (on a slow disk, seconds of fsyncs) returns at once, *pending*: the
/// epoch has moved, the chunks written before it commit at its epoch when the flush is done,
/// and its record follows them. Meanwhile it is listed as pending, a view of it waits, and
/// writes after it (an overwrite, an append, a hard link) stay out of it. Once the commit is let
/// go: the snapshot holds exactly the bytes written before it, the live tree the newer ones,
/// the inode version the link wrote after the snapshot carries the size the late commits
/// made good (not only what was committed when the link was made), and the store is consistent.
#[test]
fn a_pending_snapshot_completes_behind_a_paused_group_commit() {
    let (scenario, _t, s) = fixture();
    let fs = s.fs.clone();
    fs.start_sealer();
    let ino = create(&fs, "ckpt", b"");
    let h = fs.open(ino, true).unwrap();
    // Twelve full chunks and a partial one: from the fifth on they take the deferred path
    // (parked, their bodies written without the WAL); the committer picks them up within
    // 200 ms and stops at the failpoint.
    let data: Vec<u8> = (0..12 * CS + 100).map(|i| (i % 253) as u8 + 1).collect();
    let pause = Pause::at("group-commit-before-flush");
    fs.write(&h, 0, &data).unwrap();
    pause.wait();
    let (done_tx, done) = bounded::<()>(1);
    let snap = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            let info = fs.snapshot_create("s", false).unwrap();
            let _ = done_tx.send(());
            info
        })
    };
    let returned = done.recv_timeout(Duration::from_secs(10)).is_ok();
    if !returned {
        fail::remove("group-commit-before-flush");
        pause.release();
        panic!("snapshot_create waited for the group commit's flush (still paused after 10 s)");
    }
    let info = snap.join().unwrap();
    assert!(
        info.pending,
        "the snapshot's chunks are not committed, yet it is not pending"
    );
    let listed = fs.snapshot_list().unwrap();
    assert!(
        listed.iter().any(|l| l.name == "s" && l.pending),
        "a pending snapshot is not listed as pending: {listed:?}"
    );
    // After the snapshot: overwrite chunk 6, append a chunk, chmod.
    let mut live = data.clone();
    let over = vec![0xEEu8; CS];
    fs.write(&h, 6 * CS as u64, &over).unwrap();
    live[6 * CS..7 * CS].copy_from_slice(&over);
    // Short: stays in its buffer (a full chunk would commit a larger size itself).
    let tail = vec![0xAAu8; 10];
    fs.write(&h, live.len() as u64, &tail).unwrap();
    live.extend_from_slice(&tail);
    // The pending snapshot wrote nothing: the database's live epoch moves with the first
    // batch that writes at the new one.
    // (Absent on a store never snapshotted: the first epoch, 1.)
    let on_disk = || fs.stored_counter("epoch").max(1);
    assert_eq!(on_disk(), info.epoch, "a pending snapshot did I/O");
    // A new version of the inode (nlink, ctime) at the new epoch, written while the
    // snapshot's chunks are uncommitted (link, unlike chmod, does not wait for them).
    fs.link(ino, ROOT_INO, b"ckpt2").unwrap();
    assert_eq!(
        on_disk(),
        info.epoch + 1,
        "a batch wrote at the new epoch without persisting it"
    );
    let (view_tx, view_rx) = bounded(1);
    let viewer = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            let v = fs.snapshot_view("s");
            let _ = view_tx.send(());
            v
        })
    };
    let early = view_rx.recv_timeout(Duration::from_millis(300)).is_ok();
    fail::remove("group-commit-before-flush");
    pause.release();
    assert!(!early, "a view of a pending snapshot did not wait for it");
    let view = viewer.join().unwrap().unwrap();
    assert_same(&read_named(&view, "ckpt").unwrap(), &data, "snapshot");
    assert_eq!(
        view.getattr(ino).unwrap().nlink,
        1,
        "the link after the snapshot is in it"
    );
    assert!(
        read_named(&view, "ckpt2").is_none(),
        "the link after the snapshot is in it"
    );
    drop(view);
    // The live epoch's stored inode (no open-file overlay), before the file's last seal.
    let stored = fs.view(fs.epoch());
    let size = stored.getattr(ino).unwrap().size;
    drop(stored);
    assert!(
        size >= data.len() as u64,
        "the inode version written after the snapshot says {size} bytes: the chunks \
         committed late at the snapshot's epoch were not merged into it ({} expected)",
        data.len()
    );
    fs.release(&h).unwrap();
    assert_same(&read_named(&fs, "ckpt").unwrap(), &live, "live file");
    assert!(!fs.snapshot_list().unwrap()[0].pending);
    assert_consistent(&fs);
    scenario.teardown();
}
