//! Model test: random sequences of write / truncate / rename / unlink / mkdir / rmdir /
//! snapshot / delete-snapshot / rollback / remount against an in-memory model. After every step the live
//! tree, and every surviving snapshot, must read back exactly what the model says.
//!
//! A background thread runs version GC and chunk GC concurrently with every step (stopped only
//! around a remount), and every 25 steps the store's refcounts are checked against its
//! references (`Fs::check`).
//!
//! SNAPFS_MODEL_STEPS sets the steps per seed (default 400); SNAPFS_TEST_SEED replays a seed.

mod common;

use std::collections::BTreeMap;

use common::Rng;
use snapfs::fs::{Creds, Fs, ROOT_INO};
use snapfs::storage::inode::Kind;
use snapfs::storage::store::Store;

const ME: Creds = Creds { uid: 0, gid: 0 };

#[derive(Clone, Debug, PartialEq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

type Model = BTreeMap<String, Node>;

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

fn name_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(_, n)| n).unwrap_or(path)
}

fn resolve(fs: &Fs, path: &str) -> Option<u64> {
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = fs.lookup(ino, part.as_bytes()).ok()?.ino;
    }
    Some(ino)
}

/// Reads a whole tree through the core API into a model.
fn dump(fs: &Fs) -> Model {
    let mut out = Model::new();
    let mut stack = vec![(String::new(), ROOT_INO)];
    while let Some((path, ino)) = stack.pop() {
        for e in fs.readdir(ino).unwrap().into_iter().skip(2) {
            let name = String::from_utf8(e.name).unwrap();
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            match e.kind {
                Kind::Dir => {
                    out.insert(p.clone(), Node::Dir);
                    stack.push((p, e.ino));
                }
                _ => {
                    let size = fs.getattr(e.ino).unwrap().size;
                    let h = fs.open(e.ino, false).unwrap();
                    let mut data = Vec::new();
                    while (data.len() as u64) < size {
                        let d = fs.read(&h, data.len() as u64, 1 << 20).unwrap();
                        assert!(!d.is_empty(), "short read of {p}");
                        data.extend_from_slice(&d);
                    }
                    fs.release(&h).unwrap();
                    out.insert(p, Node::File(data));
                }
            }
        }
    }
    out
}

fn pick<'a>(rng: &mut Rng, items: &'a [&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

const DIRS: [&str; 4] = ["", "a", "b", "a/c"];
const NAMES: [&str; 4] = ["x", "y", "z", "w"];

/// Version GC and chunk GC in a loop on another thread, as the daemon's snapshot deletes,
/// retention and background GC run beside writers.
struct BackgroundGc {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl BackgroundGc {
    fn start(fs: std::sync::Arc<Fs>) -> BackgroundGc {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut passes = 0;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                fs.gc_versions().unwrap();
                fs.collect_garbage().unwrap();
                passes += 1;
                std::thread::yield_now();
            }
            passes
        });
        BackgroundGc {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("background GC panicked")
    }
}

fn run_seed(rng: &mut Rng, steps: usize) {
    let t = tempfile::tempdir().unwrap();
    let cs = 4096usize;
    let mut store = Some(Store::open(t.path(), true, Some(cs)).unwrap());
    let mut gc = Some(BackgroundGc::start(store.as_ref().unwrap().fs.clone()));
    let mut gc_passes = 0;
    let mut model = Model::new();
    let mut snaps: BTreeMap<String, Model> = BTreeMap::new();
    let mut snap_counter = 0;
    for step in 0..steps {
        let fs = store.as_ref().unwrap().fs.clone();
        let dir = pick(rng, &DIRS);
        let file = if dir.is_empty() {
            pick(rng, &NAMES).to_string()
        } else {
            format!("{dir}/{}", pick(rng, &NAMES))
        };
        let op = rng.below(100);
        let what;
        match op {
            0..=34 => {
                // write (creating the file if needed), sizes spanning several chunks
                let parent_ok = dir.is_empty() || model.get(dir) == Some(&Node::Dir);
                if !parent_ok || model.get(&file) == Some(&Node::Dir) {
                    continue;
                }
                let off = rng.below(6 * cs as u64) as usize;
                let len = 1 + rng.below(3 * cs as u64) as usize;
                let data = if rng.below(3) == 0 {
                    vec![7u8; len]
                } else {
                    rng.bytes(len)
                };
                let pino = resolve(&fs, dir).unwrap();
                let ino = match fs.lookup(pino, name_of(&file).as_bytes()) {
                    Ok(a) => a.ino,
                    Err(_) => {
                        fs.mknod(
                            pino,
                            name_of(&file).as_bytes(),
                            libc::S_IFREG | 0o644,
                            0,
                            ME,
                        )
                        .unwrap()
                        .ino
                    }
                };
                let h = fs.open(ino, true).unwrap();
                fs.write(&h, off as u64, &data).unwrap();
                if rng.below(2) == 0 {
                    fs.fsync(&h).unwrap();
                }
                fs.release(&h).unwrap();
                let Node::File(content) = model.entry(file.clone()).or_insert(Node::File(vec![]))
                else {
                    unreachable!()
                };
                if content.len() < off + len {
                    content.resize(off + len, 0);
                }
                content[off..off + len].copy_from_slice(&data);
                what = format!("write {file} @{off}+{len}");
            }
            35..=44 => {
                let Some(Node::File(content)) = model.get_mut(&file) else {
                    continue;
                };
                let size = rng.below(5 * cs as u64) as usize;
                fs.truncate(resolve(&fs, &file).unwrap(), size as u64)
                    .unwrap();
                content.resize(size, 0);
                what = format!("truncate {file} {size}");
            }
            45..=54 => {
                let Some(Node::File(_)) = model.get(&file) else {
                    continue;
                };
                let to_dir = pick(rng, &DIRS);
                if !(to_dir.is_empty() || model.get(to_dir) == Some(&Node::Dir)) {
                    continue;
                }
                let to = if to_dir.is_empty() {
                    pick(rng, &NAMES).to_string()
                } else {
                    format!("{to_dir}/{}", pick(rng, &NAMES))
                };
                if model.get(&to) == Some(&Node::Dir) {
                    continue;
                }
                let (p1, p2) = (resolve(&fs, dir).unwrap(), resolve(&fs, to_dir).unwrap());
                fs.rename(
                    p1,
                    name_of(&file).as_bytes(),
                    p2,
                    name_of(&to).as_bytes(),
                    0,
                )
                .unwrap();
                let node = model.remove(&file).unwrap();
                model.insert(to.clone(), node);
                what = format!("rename {file} {to}");
            }
            55..=62 => {
                let Some(Node::File(_)) = model.get(&file) else {
                    continue;
                };
                fs.unlink(resolve(&fs, dir).unwrap(), name_of(&file).as_bytes())
                    .unwrap();
                model.remove(&file);
                what = format!("unlink {file}");
            }
            63..=70 => {
                let d = pick(rng, &DIRS[1..]);
                let parent = parent_of(d);
                if model.contains_key(d)
                    || !(parent.is_empty() || model.get(parent) == Some(&Node::Dir))
                {
                    continue;
                }
                fs.mkdir(
                    resolve(&fs, parent).unwrap(),
                    name_of(d).as_bytes(),
                    0o755,
                    ME,
                )
                .unwrap();
                model.insert(d.to_string(), Node::Dir);
                what = format!("mkdir {d}");
            }
            71..=74 => {
                let d = pick(rng, &DIRS[1..]);
                if model.get(d) != Some(&Node::Dir)
                    || model.keys().any(|k| k.starts_with(&format!("{d}/")))
                {
                    continue;
                }
                fs.rmdir(resolve(&fs, parent_of(d)).unwrap(), name_of(d).as_bytes())
                    .unwrap();
                model.remove(d);
                what = format!("rmdir {d}");
            }
            75..=86 => {
                snap_counter += 1;
                let name = format!("s{snap_counter}");
                fs.snapshot_create(&name, rng.below(2) == 0).unwrap();
                snaps.insert(name.clone(), model.clone());
                what = format!("snapshot {name}");
            }
            92..=94 => {
                let Some(name) = snaps
                    .keys()
                    .nth(rng.below(snaps.len().max(1) as u64) as usize)
                    .cloned()
                else {
                    continue;
                };
                let destroy = rng.below(2) == 0;
                fs.rollback(&name, destroy).unwrap();
                model = snaps[&name].clone();
                if destroy {
                    let n: u32 = name[1..].parse().unwrap();
                    snaps.retain(|k, _| k[1..].parse::<u32>().unwrap() <= n);
                }
                what = format!("rollback to {name} (destroy newer: {destroy})");
            }
            87..=91 => {
                let Some(name) = snaps
                    .keys()
                    .nth(rng.below(snaps.len().max(1) as u64) as usize)
                    .cloned()
                else {
                    continue;
                };
                fs.snapshot_delete(&name).unwrap();
                snaps.remove(&name);
                what = format!("delete snapshot {name}");
            }
            _ => {
                let clean = rng.below(2) == 0;
                gc_passes += gc.take().unwrap().stop();
                let s = store.take().unwrap();
                if clean {
                    s.fs.shutdown().unwrap();
                }
                drop(fs);
                drop(s);
                store = Some(Store::open(t.path(), true, None).unwrap());
                gc = Some(BackgroundGc::start(store.as_ref().unwrap().fs.clone()));
                what = format!("remount (clean: {clean})");
            }
        }
        let fs = store.as_ref().unwrap().fs.clone();
        assert_eq!(
            dump(&fs),
            model,
            "live tree differs after step {step}: {what}"
        );
        let mut listed: Vec<String> = fs
            .snapshot_list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            snaps.keys().cloned().collect::<Vec<_>>(),
            "after {what}"
        );
        for info in fs.snapshot_list().unwrap() {
            let view = fs.view(info.epoch);
            assert_eq!(
                &dump(&view),
                &snaps[&info.name],
                "snapshot {} differs after step {step}: {what}",
                info.name
            );
        }
        if step % 25 == 24 {
            let r = fs.check(false).unwrap();
            assert!(
                r.problems.is_empty(),
                "after step {step} ({what}): {:#?}",
                r.problems
            );
        }
    }
    gc_passes += gc.take().unwrap().stop();
    eprintln!("{gc_passes} concurrent GC passes");
    // Deleting every snapshot and every file returns the store to (almost) nothing.
    let fs = store.as_ref().unwrap().fs.clone();
    for s in fs.snapshot_list().unwrap() {
        fs.snapshot_delete(&s.name).unwrap();
    }
    let paths: Vec<String> = model.keys().rev().cloned().collect();
    for p in paths {
        let parent = resolve(&fs, parent_of(&p)).unwrap();
        match model[&p] {
            Node::Dir => fs.rmdir(parent, name_of(&p).as_bytes()).unwrap(),
            Node::File(_) => fs.unlink(parent, name_of(&p).as_bytes()).unwrap(),
        }
    }
    fs.gc_versions().unwrap();
    fs.collect_garbage().unwrap();
    let c = fs.counters();
    assert_eq!((c.chunks, c.referenced_bytes), (0, 0), "{c:?}");
    let r = fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "at the end: {:#?}", r.problems);
}

#[test]
fn random_operations_match_the_model_live_and_in_snapshots() {
    let steps: usize = std::env::var("SNAPFS_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let mut rng = Rng::from_env_or_time();
    for _ in 0..4 {
        let mut seed_rng = Rng(rng.next() | 1);
        eprintln!("sub-seed {}", seed_rng.0);
        run_seed(&mut seed_rng, steps);
    }
}
