//! ENOSPC cycle (issue 7, defect 3) on a small tmpfs store filesystem.
//!
//! Known failing on this branch: the engine stays in RocksDB's background-error state after
//! space is freed, so the test is `#[ignore]`d until recovery is implemented. Run it with
//! `cargo test --release --locked --test enospc -- --ignored`.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Mount;

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

/// Writes `path` in 1 MiB pieces until an error; returns the bytes written.
fn fill(path: &Path) -> (u64, std::io::Error) {
    let mut f = fs::File::create(path).unwrap();
    let piece = vec![0x5au8; 1 << 20];
    let mut n = 0u64;
    loop {
        if let Err(e) = f.write_all(&piece).and_then(|_| f.sync_all()) {
            return (n, e);
        }
        n += piece.len() as u64;
    }
}

#[test]
#[ignore = "known failing: ENOSPC recovery is not implemented yet (issue 7, defect 3)"]
fn enospc_cycle_recovers_without_remount() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let small = SmallFs::new(&t.path().join("small"));
    let store = small.0.join("store");
    let mnt = t.path().join("mnt");
    let m = Mount::start(&store, &mnt);
    fs::write(m.path("keep"), b"acknowledged").unwrap();
    fs::File::open(m.path("keep")).unwrap().sync_all().unwrap();
    // Fill the small filesystem from outside the store, then from inside.
    let ballast = small.0.join("ballast");
    let (_, e) = fill(&ballast);
    assert_eq!(e.raw_os_error(), Some(libc_enospc()), "ballast: {e}");
    let (_, e) = fill(&m.path("filler"));
    assert_eq!(e.raw_os_error(), Some(libc_enospc()), "inside: {e}");
    // Free space outside; without a remount the mount must work again.
    fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let data = vec![0xa5u8; 256 << 10];
    loop {
        let r = (|| -> std::io::Result<()> {
            let _ = fs::remove_file(m.path("filler"));
            let mut f = fs::File::create(m.path("after"))?;
            f.write_all(&data)?;
            f.sync_all()
        })();
        match r {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not recovered yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the mount did not recover after space was freed: {e}"),
        }
    }
    m.stop();
    let m = Mount::start(&store, &mnt);
    assert_eq!(fs::read(m.path("keep")).unwrap(), b"acknowledged");
    assert_eq!(fs::read(m.path("after")).unwrap(), data);
    m.stop();
    drop(small);
}

fn libc_enospc() -> i32 {
    28
}
