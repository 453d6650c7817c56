//! Tests through the kernel: a real FUSE mount of the snapfs binary.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use common::{bin, ok, Mount, Rng};

fn xattr_get(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", name])
        .arg(p)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

#[test]
fn data_and_metadata_survive_remount() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let mut rng = Rng::from_env_or_time();
    let big = rng.bytes(5 * 1024 * 1024 + 12345);
    let m = Mount::start(&store, &mnt);
    fs::create_dir_all(m.path("a/b")).unwrap();
    fs::write(m.path("a/b/big"), &big).unwrap();
    fs::write(m.path("small"), b"hello").unwrap();
    fs::set_permissions(m.path("small"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("a/b/big", m.path("link")).unwrap();
    fs::hard_link(m.path("small"), m.path("a/hard")).unwrap();
    std::os::unix::fs::chown(m.path("small"), Some(1234), Some(5678)).unwrap();
    let st = Command::new("setfattr")
        .args(["-n", "user.note", "-v", "kept"])
        .arg(m.path("small"))
        .status();
    let have_attr_tools = st.map(|s| s.success()).unwrap_or(false);
    // A sparse file.
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(m.path("sparse"))
        .unwrap();
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let before: Vec<(String, fs::Metadata)> = ["a/b/big", "small", "a/hard", "sparse", "a"]
        .iter()
        .map(|p| (p.to_string(), fs::symlink_metadata(m.path(p)).unwrap()))
        .collect();
    m.stop();

    let m = Mount::start(&store, &mnt);
    assert_eq!(fs::read(m.path("a/b/big")).unwrap(), big);
    assert_eq!(fs::read(m.path("small")).unwrap(), b"hello");
    assert_eq!(
        fs::read_link(m.path("link")).unwrap().to_str(),
        Some("a/b/big")
    );
    for (p, old) in &before {
        let new = fs::symlink_metadata(m.path(p)).unwrap();
        assert_eq!(new.size(), old.size(), "{p} size");
        assert_eq!(new.mode(), old.mode(), "{p} mode");
        assert_eq!(new.nlink(), old.nlink(), "{p} nlink");
        assert_eq!((new.uid(), new.gid()), (old.uid(), old.gid()), "{p} owner");
        assert_eq!(
            (new.mtime(), new.mtime_nsec()),
            (old.mtime(), old.mtime_nsec()),
            "{p} mtime"
        );
        assert_eq!(new.ino(), old.ino(), "{p} ino");
    }
    let small = fs::metadata(m.path("small")).unwrap();
    assert_eq!(small.mode() & 0o7777, 0o640);
    assert_eq!(small.nlink(), 2);
    assert_eq!((small.uid(), small.gid()), (1234, 5678));
    let sparse = fs::read(m.path("sparse")).unwrap();
    assert_eq!(sparse.len(), (3 << 20) + 3);
    assert!(sparse[..3 << 20].iter().all(|b| *b == 0));
    if have_attr_tools {
        assert_eq!(
            xattr_get(&m.path("small"), "user.note").as_deref(),
            Some(&b"kept"[..])
        );
    } else {
        eprintln!("note: setfattr/getfattr not installed; xattrs are covered by core tests");
    }
    m.stop();
}

#[test]
fn corrupted_store_reads_as_eio() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let mut rng = Rng::from_env_or_time();
    let content = rng.bytes(8 << 20);
    let m = Mount::start(&store, &mnt);
    fs::write(m.path("victim"), &content).unwrap();
    m.stop();
    // After a clean unmount the chunks live in blob files: flip one byte inside the file's
    // bytes there. (A byte flipped in a blob record's header or key, outside every chunk's
    // bytes, is not read: a chunk is read without the record's CRC and verified by its hash,
    // docs/design.md §8.)
    let needle = &content[(4 << 20) + 1000..(4 << 20) + 1064];
    assert!(
        common::corrupt_blob(&store, needle),
        "the file's bytes were not found in any blob file"
    );
    let m = Mount::start(&store, &mnt);
    let mut f = fs::File::open(m.path("victim")).unwrap();
    let mut buf = Vec::new();
    let err = f
        .read_to_end(&mut buf)
        .expect_err("corrupt data was returned");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_ne!(buf, content);
    drop(f);
    m.stop();
}

#[test]
fn clear_errors_for_bad_mounts() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let run = |args: &[&std::path::Path]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = t.path().join("missing");
    let (code, err) = run(&["mount".as_ref(), store.as_path(), missing.as_path()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("does not exist"), "{err}");
    let full = t.path().join("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("x"), b"x").unwrap();
    let (code, err) = run(&["mount".as_ref(), store.as_path(), full.as_path()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not empty"), "{err}");
    let m = Mount::start(&store, &mnt);
    let other = t.path().join("other");
    fs::create_dir_all(&other).unwrap();
    let (code, err) = run(&["mount".as_ref(), store.as_path(), other.as_path()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("in use"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    m.stop();
}

#[test]
fn stat_reports_dedup_online_and_offline() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let mut rng = Rng::from_env_or_time();
    let content = rng.bytes(16 << 20);
    let m = Mount::start(&store, &mnt);
    fs::write(m.path("one"), &content).unwrap();
    fs::write(m.path("two"), &content).unwrap();
    let stat = |target: &std::path::Path| -> serde_json::Value {
        let out = Command::new(bin())
            .arg("stat")
            .arg(target)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let online = stat(&m.mnt);
    assert_eq!(online["logical_bytes"], 32 << 20);
    assert_eq!(online["unique_bytes"], 16 << 20);
    assert!(online["dedup_ratio"].as_f64().unwrap() > 1.99);
    m.stop();
    let offline = stat(&store);
    assert_eq!(offline["unique_bytes"], 16 << 20);
    assert_eq!(offline["files"], 2);
}

#[test]
fn fsync_and_rename_patterns_of_training_jobs() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let mut rng = Rng::from_env_or_time();
    let m = Mount::start(&store, &mnt);
    // safetensors: write a temp file, rename over the target.
    let v1 = rng.bytes(3 << 20);
    let v2 = rng.bytes(2 << 20);
    fs::write(m.path("model.safetensors"), &v1).unwrap();
    fs::write(m.path("model.safetensors.tmp"), &v2).unwrap();
    fs::rename(m.path("model.safetensors.tmp"), m.path("model.safetensors")).unwrap();
    assert_eq!(fs::read(m.path("model.safetensors")).unwrap(), v2);
    // torch.save in place: truncate and rewrite an existing file.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("model.safetensors"))
        .unwrap();
    f.write_all(&v1[..1000]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("model.safetensors")).unwrap(), &v1[..1000]);
    // DCP: fsync each shard, then rename .metadata into place, fsync the directory.
    fs::create_dir(m.path("ckpt")).unwrap();
    for i in 0..3 {
        let mut f = fs::File::create(m.path(&format!("ckpt/__{i}_0.distcp"))).unwrap();
        f.write_all(&rng.bytes(1 << 20)).unwrap();
        f.sync_all().unwrap();
    }
    fs::write(m.path("ckpt/.metadata.tmp"), b"meta").unwrap();
    fs::rename(m.path("ckpt/.metadata.tmp"), m.path("ckpt/.metadata")).unwrap();
    fs::File::open(m.path("ckpt")).unwrap().sync_all().unwrap();
    let names: Vec<String> = fs::read_dir(m.path("ckpt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    m.stop();
}

/// Unmount closes the database: every thread of the daemon lets go of the filesystem (the
/// control socket's and the metrics' threads hold it weakly), and RocksDB's own log records
/// its shutdown. Before, the database was only abandoned after a full flush.
#[test]
fn unmount_closes_the_database() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let m = Mount::start_with(
        &store,
        &t.path().join("mnt"),
        &["--metrics-addr", "127.0.0.1:0", "--snapshot-every", "1h"],
    );
    std::fs::write(m.path("f"), vec![7u8; 3 << 20]).unwrap();
    ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s"]);
    ok(&["stat", m.mnt.to_str().unwrap()]);
    m.stop();
    let log = std::fs::read_to_string(store.join("db/LOG")).unwrap();
    assert!(
        log.contains("Shutdown complete"),
        "RocksDB did not log its shutdown: the daemon exited with the database open"
    );
}
