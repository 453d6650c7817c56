//! `mount --from`'s disk cache: a file read twice through a snapshot served from a backend is
//! fetched once; the second read is served from the disk cache even with the backend gone.
//! With `--disk-cache 0` the same second read fails, which shows that the first part tests the
//! cache and not the memory cache or the kernel's page cache. A temporary store that a killed
//! `mount --from` left is removed by the next one.

mod common;

use std::fs;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use common::{bin, ok, seeded_bytes as bytes, Mount};

fn mount_from(tmp: &Path, spec: &str, mnt: &Path, extra: &[&str]) -> Mount {
    let mut cmd = Command::new(bin());
    cmd.args(["mount", "--from", spec, "--snapshot", "s1"]);
    cmd.args(["--cache-size", "8MiB", "--cache-dir"]).arg(tmp);
    cmd.args(extra).arg(mnt);
    Mount::spawn(cmd, &tmp.join("from-store"), mnt)
}

/// Reads `p` with the page cache dropped first (the kernel would answer a second read itself).
fn read_cold(p: &Path) -> std::io::Result<Vec<u8>> {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    fs::read(p)
}

/// Reads `ckpt.bin` (checking it), then again with the backend directory moved away; returns
/// the second read.
fn read_twice(f: &Mount, data: &[u8], backend: &Path, away: &Path) -> std::io::Result<Vec<u8>> {
    assert!(
        read_cold(&f.path("ckpt.bin")).unwrap() == data,
        "first read"
    );
    fs::rename(backend, away).unwrap();
    let second = read_cold(&f.path("ckpt.bin"));
    fs::rename(away, backend).unwrap();
    second
}

#[test]
fn mount_from_keeps_fetched_chunks_on_disk() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let backend = tmp.path().join("backend");
    let away = tmp.path().join("backend-away");
    let spec = format!("dir:{}", backend.display());
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let mut cmd = Command::new(bin());
    cmd.arg("mount")
        .arg(&store)
        .arg(&mnt)
        .args(["--replicate", &spec]);
    let m = Mount::spawn(cmd, &store, &mnt);
    // 40 MiB: five times the memory cache.
    let data = bytes(11, 40 << 20);
    fs::write(m.path("ckpt.bin"), &data).unwrap();
    let mp = mnt.to_str().unwrap();
    ok(&["snapshot", "create", mp, "s1"]);
    ok(&["snapshot", "wait", mp, "s1", "--timeout", "120s"]);
    m.stop();

    // What a killed `mount --from` left (its store lock free, untouched for 10 minutes)
    // goes when the next one starts; one whose lock is held, or a fresh one, stays.
    let dead = tmp.path().join("snapfs-from-1-5");
    let running = tmp.path().join("snapfs-from-1-6");
    let fresh = tmp.path().join("snapfs-from-1-7");
    for d in [&dead, &running, &fresh] {
        fs::create_dir_all(d.join("fetched/ab")).unwrap();
        fs::write(d.join("fetched/ab/x"), b"plaintext").unwrap();
        fs::write(d.join("snapfs.lock"), b"").unwrap();
    }
    let held = fs::File::open(running.join("snapfs.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    for d in [&dead, &running] {
        let st = Command::new("touch")
            .args(["-d", "1 hour ago"])
            .arg(d)
            .status()
            .unwrap();
        assert!(st.success());
    }

    // With the disk cache (its default size): the second read needs no backend.
    let from = tmp.path().join("from");
    let f = mount_from(tmp.path(), &spec, &from, &[]);
    assert!(!dead.exists(), "a dead mount's temporary store is removed");
    assert!(running.exists(), "one whose lock is held is not");
    assert!(fresh.exists(), "nor a fresh one");
    drop(held);
    let second = read_twice(&f, &data, &backend, &away);
    assert!(
        second.expect("second read with the backend gone") == data,
        "second read, from the disk cache"
    );
    f.stop();
    let log = fs::read_to_string(tmp.path().join("from-store.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("disk cache:"))
        .unwrap_or("");
    println!("{line}");
    assert!(line.contains(" 0 dropped as damaged"), "{log}");

    // Without it, the same second read has to go to the backend, and fails.
    let f = mount_from(tmp.path(), &spec, &from, &["--disk-cache", "0"]);
    let second = read_twice(&f, &data, &backend, &away);
    assert!(
        second.is_err(),
        "with no disk cache, a second read with the backend gone must fail"
    );
    f.stop();
}
