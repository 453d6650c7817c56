//! Rollback (issue 7, defect 5): atomic under kill -9, and it does not resurrect a file that
//! was open but unlinked when the snapshot was taken.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, Rng};
use snapfs::fs::{Creds, Fs, ROOT_INO};
use snapfs::storage::store::Store;

const ME: Creds = Creds { uid: 0, gid: 0 };
const FILES: usize = 30_000;

fn write_file(fs: &Fs, parent: u64, name: &str, content: &[u8]) -> u64 {
    let a = fs
        .mknod(parent, name.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
        .unwrap();
    let h = fs.open(a.ino, true).unwrap();
    fs.write(&h, 0, content).unwrap();
    fs.release(&h).unwrap();
    a.ino
}

fn clean(fs: &Fs) {
    let r = fs.check(false).unwrap();
    assert_eq!(r.problem_count, 0, "check: {:?}", r.problems);
}

#[test]
fn rollback_frees_a_file_that_was_open_and_unlinked_at_the_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(t.path(), true, Some(64 * 1024)).unwrap();
    let fs = &s.fs;
    fs.snapshot_create("s2", false).unwrap();
    // A file open and unlinked at the moment "s3" is taken: at s3 it has no name, nlink 0.
    let ino = write_file(fs, ROOT_INO, "tmp2", &vec![9u8; 256 * 1024]);
    let h = fs.open(ino, false).unwrap();
    fs.unlink(ROOT_INO, b"tmp2").unwrap();
    fs.snapshot_create("s3", false).unwrap();
    fs.release(&h).unwrap();
    fs.rollback("s3", true).unwrap();
    // The file has no name at s3; after the rollback its inode must be gone, not leaked.
    assert!(fs.getattr(ino).is_err(), "inode {ino} was resurrected");
    fs.snapshot_delete("s2").unwrap();
    fs.snapshot_delete("s3").unwrap();
    fs.collect_garbage().unwrap();
    clean(fs);
    assert_eq!(fs.counters().chunks, 0, "the unlinked file's chunks leaked");
}

/// Builds a store where rolling back to `s` brings back FILES files in `d`.
fn big_store(dir: &std::path::Path) {
    let s = Store::open(dir, true, Some(64 * 1024)).unwrap();
    let fs = &s.fs;
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap().ino;
    for i in 0..FILES {
        fs.mknod(d, format!("f{i}").as_bytes(), libc::S_IFREG | 0o644, 0, ME)
            .unwrap();
    }
    fs.snapshot_create("s", true).unwrap();
    for i in 0..FILES {
        fs.unlink(d, format!("f{i}").as_bytes()).unwrap();
    }
    fs.rmdir(ROOT_INO, b"d").unwrap();
    fs.shutdown().unwrap();
}

#[test]
fn rollback_killed_at_any_moment_leaves_one_tree_or_the_other() {
    let mut rng = Rng::from_env_or_time();
    let mut outcomes = [0usize; 2];
    // How long an uninterrupted rollback runs (process start included): the kills below
    // fall anywhere in that window.
    let t = tempfile::tempdir().unwrap();
    big_store(t.path());
    let start = std::time::Instant::now();
    let st = Command::new(bin())
        .args(["rollback", "--yes"])
        .arg(t.path())
        .arg("s")
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let full = start.elapsed().as_millis() as u64;
    eprintln!("an uninterrupted rollback of {FILES} files took {full} ms");
    for round in 0..8 {
        let t = tempfile::tempdir().unwrap();
        big_store(t.path());
        let mut child = Command::new(bin())
            .args(["rollback", "--yes"])
            .arg(t.path())
            .arg("s")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(full + 1)));
        let _ = child.kill();
        let _ = child.wait();
        let s = Store::open(t.path(), false, None).unwrap();
        let fs = &s.fs;
        match fs.lookup(ROOT_INO, b"d") {
            Err(_) => outcomes[0] += 1,
            Ok(a) => {
                let n = fs.readdir(a.ino).unwrap().len() - 2;
                assert_eq!(n, FILES, "round {round}: half a rollback ({n} files)");
                for i in (0..FILES).step_by(997) {
                    fs.lookup(a.ino, format!("f{i}").as_bytes())
                        .unwrap_or_else(|e| panic!("round {round}: f{i} listed but {e:?}"));
                }
                outcomes[1] += 1;
            }
        }
        clean(fs);
        fs.shutdown().unwrap();
    }
    eprintln!(
        "outcomes: {} before, {} after the rollback",
        outcomes[0], outcomes[1]
    );
}

#[test]
fn destroy_newer_refuses_to_delete_a_mounted_snapshot() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let m = common::Mount::start(&store, &t.path().join("mnt"));
    std::fs::write(m.path("f"), b"one").unwrap();
    let snap = |name: &str| {
        let o = Command::new(bin())
            .args(["snapshot", "create"])
            .arg(&m.mnt)
            .arg(name)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    snap("s1");
    std::fs::write(m.path("f"), b"two").unwrap();
    snap("s2");
    m.stop();
    let sm = common::Mount::start_with(&store, &t.path().join("snap"), &["--snapshot", "s2"]);
    assert_eq!(std::fs::read(sm.path("f")).unwrap(), b"two");
    let o = Command::new(bin())
        .args(["rollback", "--yes", "--destroy-newer"])
        .arg(&store)
        .arg("s1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "rollback destroyed a mounted snapshot");
    assert!(err.contains("mounted"), "{err}");
    assert_eq!(std::fs::read(sm.path("f")).unwrap(), b"two");
    sm.stop();
    let o = Command::new(bin())
        .args(["snapshot", "list"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("s2"), "{o:?}");
}
