//! Crash test through the kernel: a writer fsyncs files and their directory and only then
//! records their hashes in a manifest outside the mount; the daemon is SIGKILLed at a random
//! moment; after `umount -l` and a remount every manifest entry must read back byte for byte.
//!
//! SNAPFS_CRASH_CYCLES sets the number of kill cycles (default 20).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Mount, Rng};

type Manifest = Arc<Mutex<BTreeMap<PathBuf, [u8; 32]>>>;

fn writer(mnt: PathBuf, cycle: u32, seed: u64, manifest: Manifest, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed | 1);
    let dir = mnt.join(format!("cycle{cycle}"));
    if fs::create_dir(&dir).is_err() {
        return;
    }
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        // Sizes from a few bytes to 24 MiB, skewed small.
        let size = match rng.below(4) {
            0 => rng.below(4096),
            1 => rng.below(1 << 20),
            2 => rng.below(8 << 20),
            _ => rng.below(24 << 20),
        } as usize;
        let data = rng.bytes(size);
        let path = dir.join(format!("f{i}"));
        let ok = (|| -> std::io::Result<()> {
            let mut f = fs::File::create(&path)?;
            for part in data.chunks(1 << 20) {
                f.write_all(part)?;
            }
            f.sync_all()?;
            fs::File::open(&dir)?.sync_all()?;
            Ok(())
        })();
        if ok.is_err() {
            return; // the daemon is gone
        }
        let rel = path.strip_prefix(&mnt).unwrap().to_path_buf();
        manifest
            .lock()
            .unwrap()
            .insert(rel, *blake3::hash(&data).as_bytes());
        i += 1;
    }
}

fn verify(mnt: &Path, manifest: &Manifest) -> usize {
    let m = manifest.lock().unwrap();
    for (rel, hash) in m.iter() {
        let data = fs::read(mnt.join(rel)).unwrap_or_else(|e| {
            panic!(
                "LOST: {} acknowledged by fsync is unreadable: {e}",
                rel.display()
            )
        });
        assert_eq!(
            blake3::hash(&data).as_bytes(),
            hash,
            "LOST: {} differs from what fsync acknowledged",
            rel.display()
        );
    }
    m.len()
}

#[test]
fn kill9_loses_nothing_that_was_fsynced() {
    require_fuse!();
    let cycles: u32 = std::env::var("SNAPFS_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let mut rng = Rng::from_env_or_time();
    let manifest: Manifest = Arc::new(Mutex::new(BTreeMap::new()));
    for cycle in 0..cycles {
        let m = Mount::start(&store, &mnt);
        let checked = verify(&m.mnt, &manifest);
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (mnt, manifest, stop) = (m.mnt.clone(), manifest.clone(), stop.clone());
            let seed = rng.next();
            std::thread::spawn(move || writer(mnt, cycle, seed, manifest, stop))
        };
        std::thread::sleep(Duration::from_millis(300 + rng.below(2500)));
        m.kill();
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        eprintln!(
            "cycle {cycle}: verified {checked} files, manifest now {}",
            manifest.lock().unwrap().len()
        );
    }
    let m = Mount::start(&store, &mnt);
    let n = verify(&m.mnt, &manifest);
    m.stop();
    assert!(
        n > 0,
        "the writer recorded nothing: the test proved nothing"
    );
    eprintln!("{n} fsynced files verified after {cycles} kill -9 cycles, 0 lost");
}
