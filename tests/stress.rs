//! Concurrent randomized stress of the core (no mount): writers (writes, truncates, fsyncs,
//! atomic replaces by rename, unlinks and re-creates, with handles kept open across
//! snapshots), a snapshotter (create, delete, prune to the newest few), a reader of pinned
//! snapshot views, a restorer, and version GC, all at once. Checked against what each writer
//! was acknowledged:
//!
//! - a writer reads back every operation it was acknowledged (live tree);
//! - each snapshot holds, for every file, one of the states the file had while the
//!   snapshot command ran (a write in flight wholly in or out), and keeps holding exactly
//!   that while other snapshots are deleted and GC runs;
//! - a view keeps reading its snapshot's bytes while that snapshot is deleted;
//! - a restore writes the snapshot's bytes;
//! - at the end, the store's refcounts equal its references (`Fs::check`).
//!
//! `SNAPFS_STRESS_SECS` sets the duration (default 20 s; `tools/stress.sh` runs it for
//! longer); `SNAPFS_TEST_SEED` replays a run.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use parking_lot::Mutex;
use snapfs::fs::{Creds, Fs, Handle, ROOT_INO};
use snapfs::storage::store::Store;

const ME: Creds = Creds { uid: 0, gid: 0 };
const CS: usize = 4096;
const WRITERS: usize = 3;
const SLOTS: usize = 3;
const MAX_LEN: u64 = 40 * 1024;

type Hash = Option<[u8; 32]>;

fn hash(content: Option<&[u8]>) -> Hash {
    content.map(|c| *blake3::hash(c).as_bytes())
}

/// One completed operation on a slot: the sequence numbers around it and the state after.
#[derive(Clone)]
struct Rec {
    start: u64,
    end: u64,
    state: Hash,
}

struct Shared {
    fs: Arc<Fs>,
    seq: AtomicU64,
    stop: AtomicBool,
    /// Per slot: the initial state (absent) and every completed operation.
    history: Vec<Mutex<Vec<Rec>>>,
    /// Held by a writer for the whole of an operation and its record.
    busy: Vec<Mutex<()>>,
    /// Snapshots taken and not deleted: name -> the state of every slot in it.
    snaps: Mutex<HashMap<String, Vec<Hash>>>,
    failures: Mutex<Vec<String>>,
    counts: [AtomicU64; 6],
}

impl Shared {
    fn fail(&self, msg: String) {
        eprintln!("FAILURE: {msg}");
        self.failures.lock().push(msg);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn tick(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }
}

fn slot_name(slot: usize) -> String {
    format!("w{}-f{}", slot / SLOTS, slot % SLOTS)
}

fn read_handle(fs: &Fs, h: &Handle, size: u64) -> snapfs::error::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        let d = fs.read(h, out.len() as u64, 1 << 20)?;
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    Ok(out)
}

/// A slot's content in `fs` (a view or the live tree), None if absent.
fn read_slot(fs: &Fs, slot: usize) -> Result<Option<Vec<u8>>, String> {
    let name = slot_name(slot);
    let a = match fs.lookup(ROOT_INO, name.as_bytes()) {
        Ok(a) => a,
        Err(snapfs::error::FsError::NotFound) => return Ok(None),
        Err(e) => return Err(format!("lookup {name}: {e}")),
    };
    let h = fs
        .open(a.ino, false)
        .map_err(|e| format!("open {name}: {e}"))?;
    let size = fs.getattr(a.ino).map_err(|e| format!("getattr: {e}"))?.size;
    let r = read_handle(fs, &h, size).map_err(|e| format!("read {name}: {e}"));
    let _ = fs.release(&h);
    r.map(Some)
}

struct Open {
    ino: u64,
    h: Handle,
}

fn writer(sh: Arc<Shared>, w: usize, seed: u64) {
    let fs = sh.fs.clone();
    let mut rng = Rng(seed | 1);
    let mut model: Vec<Option<Vec<u8>>> = vec![None; SLOTS];
    let mut open: Vec<Option<Open>> = (0..SLOTS).map(|_| None).collect();
    let tmp = format!("w{w}-tmp");
    while !sh.stop.load(Ordering::SeqCst) {
        let j = rng.below(SLOTS as u64) as usize;
        let slot = w * SLOTS + j;
        let name = slot_name(slot);
        let busy = sh.busy[slot].lock();
        let start = sh.tick();
        let op = rng.below(100);
        let r: Result<(), String> = (|| {
            let e = |what: &str, err: snapfs::error::FsError| format!("{name}: {what}: {err}");
            if model[j].is_none() {
                let a = fs
                    .mknod(ROOT_INO, name.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
                    .map_err(|x| e("create", x))?;
                let h = fs.open(a.ino, true).map_err(|x| e("open", x))?;
                open[j] = Some(Open { ino: a.ino, h });
                model[j] = Some(Vec::new());
                return Ok(());
            }
            let o = open[j].as_ref().expect("open while present");
            let m = model[j].as_mut().expect("present");
            match op {
                0..=54 => {
                    let off = rng.below(MAX_LEN);
                    let len = 1 + rng.below(3 * CS as u64) as usize;
                    let data = rng.bytes(len);
                    fs.write(&o.h, off, &data).map_err(|x| e("write", x))?;
                    let end = off as usize + len;
                    if m.len() < end {
                        m.resize(end, 0);
                    }
                    m[off as usize..end].copy_from_slice(&data);
                }
                55..=64 => {
                    let len = rng.below(MAX_LEN);
                    fs.truncate(o.ino, len).map_err(|x| e("truncate", x))?;
                    m.resize(len as usize, 0);
                }
                65..=74 => fs.fsync(&o.h).map_err(|x| e("fsync", x))?,
                75..=84 => {
                    // safetensors: write a temporary file, close it, rename it over.
                    let len = rng.below(MAX_LEN) as usize;
                    let data = rng.bytes(len);
                    let t = fs
                        .mknod(ROOT_INO, tmp.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
                        .map_err(|x| e("create tmp", x))?;
                    let th = fs.open(t.ino, true).map_err(|x| e("open tmp", x))?;
                    fs.write(&th, 0, &data).map_err(|x| e("write tmp", x))?;
                    fs.release(&th).map_err(|x| e("close tmp", x))?;
                    fs.rename(ROOT_INO, tmp.as_bytes(), ROOT_INO, name.as_bytes(), 0)
                        .map_err(|x| e("rename", x))?;
                    let old = open[j].take().expect("open");
                    fs.release(&old.h).map_err(|x| e("close", x))?;
                    let h = fs.open(t.ino, true).map_err(|x| e("reopen", x))?;
                    open[j] = Some(Open { ino: t.ino, h });
                    model[j] = Some(data);
                }
                85..=92 => {
                    fs.unlink(ROOT_INO, name.as_bytes())
                        .map_err(|x| e("unlink", x))?;
                    let old = open[j].take().expect("open");
                    fs.release(&old.h).map_err(|x| e("close unlinked", x))?;
                    model[j] = None;
                }
                _ => {
                    // Read back through the open handle: buffered bytes included.
                    let size = fs.getattr(o.ino).map_err(|x| e("getattr", x))?.size;
                    let got = read_handle(&fs, &o.h, size).map_err(|x| e("read", x))?;
                    if &got != m {
                        return Err(format!(
                            "{name}: live read of {} bytes differs from the {} acknowledged",
                            got.len(),
                            m.len()
                        ));
                    }
                }
            }
            Ok(())
        })();
        if let Err(msg) = r {
            sh.fail(msg);
            break;
        }
        let end = sh.tick();
        sh.history[slot].lock().push(Rec {
            start,
            end,
            state: hash(model[j].as_deref()),
        });
        drop(busy);
        sh.counts[0].fetch_add(1, Ordering::Relaxed);
    }
    for (j, o) in open.into_iter().enumerate() {
        if let Some(o) = o {
            let _ = fs.release(&o.h);
            let live = read_slot(&fs, w * SLOTS + j);
            if live.as_ref().ok() != Some(&model[j]) {
                sh.fail(format!(
                    "{}: final live content differs",
                    slot_name(w * SLOTS + j)
                ));
            }
        }
    }
}

/// The states slot `slot` may have in a snapshot whose command ran from `s0` to `s1`.
fn allowed(sh: &Shared, slot: usize, s0: u64, s1: u64) -> Vec<Hash> {
    // Wait for an operation in flight to finish recording.
    drop(sh.busy[slot].lock());
    let h = sh.history[slot].lock();
    let mut out = Vec::new();
    let before = h.iter().rposition(|r| r.end < s0);
    match before {
        Some(i) => out.push(h[i].state),
        None => out.push(None),
    }
    let from = before.map_or(0, |i| i + 1);
    for r in &h[from..] {
        if r.start < s1 {
            out.push(r.state);
        }
    }
    out
}

fn snapshotter(sh: Arc<Shared>, seed: u64) {
    let fs = sh.fs.clone();
    let mut rng = Rng(seed | 1);
    let mut n = 0u64;
    let mut order: Vec<String> = Vec::new();
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        let name = format!("s{n}");
        n += 1;
        let s0 = sh.tick();
        if let Err(e) = fs.snapshot_create(&name, false) {
            sh.fail(format!("snapshot create {name}: {e}"));
            return;
        }
        let s1 = sh.tick();
        let view = match fs.snapshot_view(&name) {
            Ok(v) => v,
            Err(e) => return sh.fail(format!("view {name}: {e}")),
        };
        let mut states = Vec::new();
        for slot in 0..WRITERS * SLOTS {
            let got = match read_slot(&view, slot) {
                Ok(c) => hash(c.as_deref()),
                Err(e) => return sh.fail(format!("snapshot {name}: {e}")),
            };
            if !allowed(&sh, slot, s0, s1).contains(&got) {
                return sh.fail(format!(
                    "snapshot {name}: {} holds a state it never had while the snapshot ran",
                    slot_name(slot)
                ));
            }
            states.push(got);
        }
        drop(view);
        sh.snaps.lock().insert(name.clone(), states);
        order.push(name);
        sh.counts[1].fetch_add(1, Ordering::Relaxed);
        // Delete a random one now and then; prune to the newest 6.
        if rng.below(3) == 0 && order.len() > 1 {
            let i = rng.below(order.len() as u64 - 1) as usize;
            let victim = order.remove(i);
            sh.snaps.lock().remove(&victim);
            if let Err(e) = fs.snapshot_delete(&victim) {
                return sh.fail(format!("delete {victim}: {e}"));
            }
            sh.counts[2].fetch_add(1, Ordering::Relaxed);
        }
        while order.len() > 6 {
            let victim = order.remove(0);
            sh.snaps.lock().remove(&victim);
            if let Err(e) = fs.snapshot_delete(&victim) {
                return sh.fail(format!("prune {victim}: {e}"));
            }
            sh.counts[2].fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = fs.run_pending_gc() {
            return sh.fail(format!("deferred gc: {e}"));
        }
    }
}

/// Re-reads snapshots through pinned views, slowly, while they may be deleted.
fn reader(sh: Arc<Shared>, seed: u64) {
    let fs = sh.fs.clone();
    let mut rng = Rng(seed | 1);
    while !sh.stop.load(Ordering::SeqCst) {
        let pick: Option<(String, Vec<Hash>)> = {
            let s = sh.snaps.lock();
            let names: Vec<&String> = s.keys().collect();
            (!names.is_empty()).then(|| {
                let n = names[rng.below(names.len() as u64) as usize].clone();
                let st = s[&n].clone();
                (n, st)
            })
        };
        let Some((name, states)) = pick else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let Ok(view) = fs.snapshot_view(&name) else {
            continue; // deleted in between: fine
        };
        for (slot, want) in states.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(rng.below(3)));
            match read_slot(&view, slot) {
                Ok(c) if hash(c.as_deref()) == *want => {}
                Ok(_) => {
                    return sh.fail(format!(
                        "pinned view of {name}: {} changed (snapshot deleted meanwhile: {})",
                        slot_name(slot),
                        !sh.snaps.lock().contains_key(&name)
                    ))
                }
                Err(e) => return sh.fail(format!("pinned view of {name}: {e}")),
            }
        }
        sh.counts[3].fetch_add(1, Ordering::Relaxed);
    }
}

/// Restores snapshots to a directory and compares every file.
fn restorer(sh: Arc<Shared>, dir: std::path::PathBuf, seed: u64) {
    let fs = sh.fs.clone();
    let mut rng = Rng(seed | 1);
    let mut n = 0;
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50 + rng.below(100)));
        let pick = {
            let s = sh.snaps.lock();
            s.iter().next().map(|(k, v)| (k.clone(), v.clone()))
        };
        let Some((name, states)) = pick else { continue };
        let Ok(view) = fs.snapshot_view(&name) else {
            continue;
        };
        n += 1;
        let dest = dir.join(format!("r{n}"));
        if let Err(e) = snapfs::restore::restore(&view, None, &dest, false, &mut |_| true) {
            return sh.fail(format!("restore {name}: {e}"));
        }
        for (slot, want) in states.iter().enumerate() {
            let got = std::fs::read(dest.join(slot_name(slot))).ok();
            if hash(got.as_deref()) != *want {
                return sh.fail(format!("restore of {name}: {} differs", slot_name(slot)));
            }
        }
        let _ = std::fs::remove_dir_all(&dest);
        sh.counts[4].fetch_add(1, Ordering::Relaxed);
    }
}

fn collector(sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(30));
        if let Err(e) = sh.fs.gc_versions().and_then(|_| sh.fs.collect_garbage()) {
            return sh.fail(format!("gc: {e}"));
        }
        sh.counts[5].fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn concurrent_writers_snapshots_gc_and_restores_keep_every_acknowledged_byte() {
    let secs: u64 = std::env::var("SNAPFS_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = Rng::from_env_or_time().0;
    eprintln!("stress: {secs} s, seed {seed}");
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store"), true, Some(CS)).unwrap();
    store.fs.start_sealer();
    let sh = Arc::new(Shared {
        fs: store.fs.clone(),
        seq: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        history: (0..WRITERS * SLOTS)
            .map(|_| Mutex::new(Vec::new()))
            .collect(),
        busy: (0..WRITERS * SLOTS).map(|_| Mutex::new(())).collect(),
        snaps: Mutex::new(HashMap::new()),
        failures: Mutex::new(Vec::new()),
        counts: Default::default(),
    });
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let sh = sh.clone();
        threads.push(std::thread::spawn(move || {
            writer(sh, w, seed.wrapping_add(w as u64 * 7919))
        }));
    }
    {
        let sh = sh.clone();
        threads.push(std::thread::spawn(move || snapshotter(sh, seed ^ 0x55)));
    }
    {
        let sh = sh.clone();
        threads.push(std::thread::spawn(move || reader(sh, seed ^ 0xAA)));
    }
    {
        let (sh, dir) = (sh.clone(), t.path().join("restores"));
        threads.push(std::thread::spawn(move || restorer(sh, dir, seed ^ 0x33)));
    }
    {
        let sh = sh.clone();
        threads.push(std::thread::spawn(move || collector(sh)));
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) && !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    sh.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("a stress thread panicked");
    }
    let c: Vec<u64> = sh
        .counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    eprintln!(
        "stress: {} operations, {} snapshots checked, {} deleted, {} pinned re-reads, {} restores, {} GC passes",
        c[0], c[1], c[2], c[3], c[4], c[5]
    );
    let failures = sh.failures.lock().clone();
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
    // Every snapshot still holds what it held when it was taken.
    for (name, states) in sh.snaps.lock().iter() {
        let view = store.fs.snapshot_view(name).unwrap();
        for (slot, want) in states.iter().enumerate() {
            let got = read_slot(&view, slot).unwrap();
            assert_eq!(
                hash(got.as_deref()),
                *want,
                "seed {seed}: final re-read of {name}"
            );
        }
    }
    store.fs.run_pending_gc().unwrap();
    store.fs.collect_garbage().unwrap();
    let r = store.fs.check(true).unwrap();
    assert!(
        r.problems.is_empty(),
        "seed {seed}: store check: {:#?}",
        r.problems
    );
    assert!(
        c[0] > 100 && c[1] > 5,
        "seed {seed}: the stress did too little: {c:?}"
    );
    eprintln!(
        "stress: store check clean: {} chunks, {} references, {} entries at {} epochs",
        r.chunks, r.references, r.entries_checked, r.epochs_checked
    );
}
