//! Version GC pass cost and the stall it causes a writer, through the core (no mount).
//!
//! Builds a store with 4 KiB chunks, a file of N chunk-map records (zeros: one chunk body,
//! N references), snapshots it, truncates the file to 0 (N versions only the snapshot sees),
//! then deletes the snapshot while a writer thread appends 4 KiB and fsyncs in a loop. Prints
//! the pass time, its CPU seconds, and the writer's median and worst write+fsync latency
//! during the pass.
//!
//!     SNAPFS_GC_RECORDS=300000 cargo bench --bench gc_pass
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapfs::fs::{Creds, ROOT_INO};
use snapfs::storage::store::Store;

const ME: Creds = Creds { uid: 0, gid: 0 };
const CS: usize = 4096;

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc/self/stat (fields 14 and 15, in ticks).
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() {
    let records: u64 = std::env::var("SNAPFS_GC_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    let dir = tempfile::tempdir_in(std::env::var("SNAPFS_BENCH_DIR").unwrap_or("/var/tmp".into()))
        .unwrap();
    let s = Store::open(dir.path(), true, Some(CS)).unwrap();
    let fs = s.fs.clone();
    let f = fs
        .mknod(ROOT_INO, b"filler", libc::S_IFREG | 0o644, 0, ME)
        .unwrap();
    let h = fs.open(f.ino, true).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < records * CS as u64 {
        let n = (records * CS as u64 - off).min(zeros.len() as u64) as usize;
        fs.write(&h, off, &zeros[..n]).unwrap();
        off += n as u64;
    }
    fs.fsync(&h).unwrap();
    fs.release(&h).unwrap();
    fs.snapshot_create("s", false).unwrap();
    fs.truncate(f.ino, 0).unwrap();
    let w = fs
        .mknod(ROOT_INO, b"writer", libc::S_IFREG | 0o644, 0, ME)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::spawn(move || {
            let h = fs.open(w.ino, true).unwrap();
            let buf = vec![7u8; CS];
            let mut lat = Vec::new();
            let mut off = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                fs.write(&h, off, &buf).unwrap();
                fs.fsync(&h).unwrap();
                lat.push(t.elapsed());
                off += CS as u64;
                std::thread::sleep(Duration::from_millis(1));
            }
            fs.release(&h).unwrap();
            lat
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let (t, c) = (Instant::now(), cpu_seconds());
    let r = fs.snapshot_delete("s").unwrap();
    let (secs, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
    stop.store(true, Ordering::Relaxed);
    let mut lat = writer.join().unwrap();
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "gc_pass: {records} records: snapshot delete {secs:.2} s ({cpu:.2} CPU-s for the process), \
         {} versions deleted, {} chunks freed; writer write+fsync during it: n={} p50 {:.2} ms \
         max {:.2} ms",
        r.versions_deleted,
        r.chunks_freed,
        lat.len(),
        ms(lat[lat.len() / 2]),
        ms(*lat.last().unwrap())
    );
}
