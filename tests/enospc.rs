//! The full-disk cycle (issue 7, defect 3) on a small tmpfs under the store: the disk fills
//! from outside and from inside; acknowledged data survives; deletions work while the disk is
//! full; once space is back, create, write, fsync, rm and snapshot work again without a
//! remount; `stat` reports the state; and a store on a full disk still mounts.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{cli, ok, Mount};

const ENOSPC: i32 = 28;

/// The daemon's log, printed when a step fails.
static LOG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn log_tail() -> String {
    let s = LOG
        .get()
        .and_then(|p| fs::read_to_string(p).ok())
        .unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A 64 MiB tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(dir: &Path) -> SmallFs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs failed");
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` in 256 KiB pieces (each fsynced) until an error; returns the bytes that
/// were acknowledged by fsync and the error.
fn fill(path: &Path, seed: u8) -> (u64, std::io::Error) {
    let mut f = match fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return (0, e),
    };
    let mut n = 0u64;
    loop {
        let piece = pattern(seed, n, 256 << 10);
        if let Err(e) = f.write_all(&piece).and_then(|_| f.sync_all()) {
            return (n, e);
        }
        n += piece.len() as u64;
    }
}

/// Bytes that differ at every offset and with every seed (no dedup, little compression).
fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    let mut x = (seed as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ offset;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Retries `f` until it succeeds or `secs` pass; panics with the last error.
fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> std::io::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: not yet: {e}");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!(
                "{what}: still failing after {secs} s: {e}\ndaemon log:\n{}",
                log_tail()
            ),
        }
    }
}

fn space_state(mnt: &Path) -> String {
    let out = ok(&["stat".as_ref(), mnt.as_os_str(), "--json".as_ref()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["space"]["state"].as_str().unwrap().to_string()
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[test]
fn full_disk_cycle_recovers_without_remount() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let small = SmallFs::new(&t.path().join("small"));
    let store = small.0.join("store");
    let mnt = t.path().join("mnt");
    // The daemon's log goes outside the small filesystem.
    let log = t.path().join("daemon.log");
    LOG.set(log.clone()).unwrap();
    let start = || {
        let mut cmd = Command::new(common::bin());
        cmd.arg("mount").arg(&store).arg(&mnt);
        Mount::spawn_logged(cmd, &store, &mnt, &log)
    };
    let m = start();
    let keep = pattern(1, 0, 3 << 20);
    write_synced(&m.path("keep"), &keep).unwrap();
    assert_eq!(space_state(&mnt), "ok");
    // The reserve is allocated within a second or two of the mount.
    eventually("reserve allocated", 10, || {
        match store.join("reserve").metadata() {
            Ok(md) if md.len() > 0 => Ok(()),
            _ => Err(std::io::Error::other("no reserve file yet")),
        }
    });

    // 1. Fill from inside: the writer gets ENOSPC, from write or fsync.
    let (inside, e) = fill(&m.path("filler"), 2);
    assert_eq!(e.raw_os_error(), Some(ENOSPC), "inside: {e}");
    assert!(inside > 10 << 20, "only {inside} bytes fitted inside");
    eprintln!("inside: {inside} bytes acknowledged, then {e}");
    let state = space_state(&mnt);
    assert!(state == "low" || state == "full", "stat says {state}");
    // 2. snapfs filled it itself: deleting inside gives the space back, without a remount.
    eventually("rm after filling from inside", 20, || {
        fs::remove_file(m.path("filler"))
    });
    let own = pattern(7, 0, 4 << 20);
    eventually("write after rm", 20, || write_synced(&m.path("own"), &own));
    let (_, e) = fill(&m.path("filler"), 8);
    assert_eq!(e.raw_os_error(), Some(ENOSPC), "inside again: {e}");
    // 3. Then from outside, to the last byte.
    let ballast = small.0.join("ballast");
    let (_, e) = fill(&ballast, 3);
    assert_eq!(e.raw_os_error(), Some(ENOSPC), "ballast: {e}");
    // Every create and write is refused now.
    let e = write_synced(&m.path("refused"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(ENOSPC), "write on a full disk: {e}");
    let _ = fs::remove_file(m.path("refused"));
    // Acknowledged bytes read back while the disk is full.
    assert_eq!(fs::read(m.path("keep")).unwrap(), keep);

    // 4. Deletion works on the full disk (the reserve is released for it), and gives space
    // back to snapfs.
    eventually("rm on a full disk", 20, || {
        fs::remove_file(m.path("filler"))
    });
    let after_rm = pattern(4, 0, 4 << 20);
    eventually("write after rm, ballast still there", 20, || {
        write_synced(&m.path("after-rm"), &after_rm)
    });

    // 5. Free outside: everything works again without a remount.
    fs::remove_file(&ballast).unwrap();
    let after = pattern(5, 0, 8 << 20);
    eventually("write after space came back", 20, || {
        write_synced(&m.path("after"), &after)
    });
    fs::File::open(m.path("keep")).unwrap().sync_all().unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    fs::rename(m.path("after-rm"), m.path("dir/after-rm")).unwrap();
    eventually("state ok", 10, || match space_state(&mnt).as_str() {
        "ok" => Ok(()),
        s => Err(std::io::Error::other(format!("state {s}"))),
    });
    let (okay, _, err) = cli(&[
        "snapshot".as_ref(),
        "create".as_ref(),
        mnt.as_os_str(),
        "after-full".as_ref(),
    ]);
    assert!(okay, "snapshot after recovery: {err}");
    m.stop();

    // 6. A fresh mount reads every acknowledged byte.
    let m = start();
    assert_eq!(fs::read(m.path("keep")).unwrap(), keep);
    assert_eq!(fs::read(m.path("own")).unwrap(), own);
    assert_eq!(fs::read(m.path("dir/after-rm")).unwrap(), after_rm);
    assert_eq!(fs::read(m.path("after")).unwrap(), after);
    m.stop();

    // 7. A store on a disk that is full to the last byte still mounts, reads, and deletes.
    let (_, e) = fill(&ballast, 6);
    assert_eq!(e.raw_os_error(), Some(ENOSPC), "ballast: {e}");
    let m = start();
    assert_eq!(fs::read(m.path("keep")).unwrap(), keep);
    let e = write_synced(&m.path("refused"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(ENOSPC), "write on a full disk: {e}");
    let _ = fs::remove_file(m.path("refused"));
    eventually("rm on a full disk after mount", 20, || {
        fs::remove_file(m.path("after"))
    });
    m.stop();
    drop(small);
}
