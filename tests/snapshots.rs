//! Snapshots through the kernel and the CLI: isolation under a concurrent writer, durability
//! across kill -9, read-only views, restore, and garbage collection.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli, ok, Mount, Rng};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The byte at offset `i` of the writer's stream.
fn stream_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i as u8)
}

#[test]
fn snapshots_hold_a_prefix_of_acknowledged_appends() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let m = Mount::start(&store, &t.path().join("mnt"));
    // `acked`: bytes whose write(2) has returned. `issued`: bytes whose write(2) has started.
    // A snapshot must hold at least what was acked before the command started, and at most
    // what was issued before it returned (a write that returned just before the snapshot may
    // not have been counted as acked yet), as an exact prefix of the stream. It need not end
    // on a write(2) boundary: the kernel splits one write(2) into several FUSE requests at
    // page boundaries, so a write in flight during the snapshot can be in it in part (as on a
    // local filesystem that crashes mid-write); docs/snapshots.md says so.
    let acked = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, acked, issued, stop) =
            (m.path("log"), acked.clone(), issued.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut f = fs::File::create(path).unwrap();
            let mut off = 0u64;
            let mut n = 1usize;
            while !stop.load(Ordering::Relaxed) {
                // Odd sizes so appends straddle chunk boundaries.
                n = (n * 7 + 13_001) % 100_000 + 1;
                std::thread::sleep(Duration::from_millis(3));
                let buf: Vec<u8> = (off..off + n as u64).map(stream_byte).collect();
                issued.store(off + n as u64, Ordering::SeqCst);
                f.write_all(&buf).unwrap();
                off += n as u64;
                acked.store(off, Ordering::SeqCst);
            }
        })
    };
    let mut taken = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut i = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let before = acked.load(Ordering::SeqCst);
        let name = format!("iso{i}");
        ok(&["snapshot", "create", s(&m.mnt), &name]);
        let after = issued.load(Ordering::SeqCst);
        taken.push((name, before, after));
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(taken.len() >= 20, "only {} snapshots taken", taken.len());
    for (name, before, after) in &taken {
        let data = fs::read(m.path(&format!(".snapshots/{name}/log"))).unwrap();
        let len = data.len() as u64;
        assert!(
            len >= *before && len <= *after,
            "{name}: holds {len} bytes; acknowledged before the command: {before}, \
             issued before it returned: {after}"
        );
        let bad = data
            .iter()
            .enumerate()
            .position(|(i, b)| *b != stream_byte(i as u64));
        assert_eq!(bad, None, "{name}: torn or foreign byte");
    }
    eprintln!(
        "{} snapshots verified against a concurrent appender",
        taken.len()
    );
    m.stop();
}

/// kill -9 right after `snapshot create` under a streaming writer: a snapshot whose chunks
/// were still committing (pending) may be lost, but only whole: if it is listed after the
/// restart, it holds every byte written before it. With `--durable` it is always there. The
/// checked file stays open and is never fsynced (and ends in a partial chunk), so the
/// snapshot alone is what makes its bytes durable.
#[test]
fn snapshot_is_whole_or_absent_after_kill9_right_after_create() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let mut rng = Rng::from_env_or_time();
    let (mut kept, mut lost, mut pending) = (0, 0, 0);
    for round in 0..8 {
        let durable = round % 4 == 3;
        let data = rng.bytes((8 << 20) + 1000);
        let m = Mount::start(&store, &mnt);
        // A streaming writer on another file keeps chunks in flight (sealing, parked for a
        // group commit) at every moment, as a training job's checkpoint save would.
        let stop = Arc::new(AtomicBool::new(false));
        let noise = {
            let (path, stop) = (m.path(&format!("stream{round}")), stop.clone());
            let block = rng.bytes(1 << 20);
            std::thread::spawn(move || {
                let Ok(mut f) = fs::File::create(path) else {
                    return;
                };
                while !stop.load(Ordering::Relaxed) && f.write_all(&block).is_ok() {}
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let name = format!("before-crash-{round}");
        let mut f = fs::File::create(m.path(&format!("ckpt{round}"))).unwrap();
        f.write_all(&data).unwrap();
        let mut args = vec!["snapshot", "create", s(&m.mnt), &name];
        if durable {
            args.push("--durable");
        }
        let said = ok(&args);
        m.kill();
        stop.store(true, Ordering::Relaxed);
        drop(f);
        noise.join().unwrap();
        pending += usize::from(said.contains("pending"));
        let m = Mount::start(&store, &mnt);
        let list = ok(&["snapshot", "list", s(&m.mnt), "--json"]);
        if !list.contains(&format!("\"{name}\"")) {
            assert!(!durable, "durable snapshot {name} lost by kill -9: {list}");
            lost += 1;
            m.stop();
            continue;
        }
        kept += 1;
        let back = fs::read(m.path(&format!(".snapshots/{name}/ckpt{round}"))).unwrap();
        assert!(
            back == data,
            "snapshot {name} is listed but its content differs"
        );
        m.stop();
    }
    eprintln!(
        "kill -9 right after snapshot create: {pending} of 8 returned pending; \
         {kept} snapshots whole after the restart, {lost} lost whole"
    );
}

#[test]
fn snapshot_views_are_read_only_and_deletion_of_mounted_is_refused() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let m = Mount::start(&store, &t.path().join("mnt"));
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"version one").unwrap();
    ok(&["snapshot", "create", s(&m.mnt), "v1"]);
    fs::write(m.path("d/f"), b"version two!").unwrap();
    // Hidden from readdir, reachable by name.
    let root: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!root.contains(&".snapshots".to_string()), "{root:?}");
    assert_eq!(
        fs::read(m.path(".snapshots/v1/d/f")).unwrap(),
        b"version one"
    );
    assert_eq!(fs::read(m.path("d/f")).unwrap(), b"version two!");
    let erofs = |r: std::io::Result<()>| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    };
    erofs(fs::write(m.path(".snapshots/v1/d/f"), b"x"));
    erofs(fs::write(m.path(".snapshots/v1/new"), b"x"));
    erofs(fs::remove_file(m.path(".snapshots/v1/d/f")));
    erofs(fs::create_dir(m.path(".snapshots/v1/x")));
    erofs(fs::rename(
        m.path(".snapshots/v1/d/f"),
        m.path(".snapshots/v1/g"),
    ));
    // Its own read-only mount, served by the running daemon.
    let smnt = t.path().join("snapmnt");
    fs::create_dir(&smnt).unwrap();
    ok(&["mount", s(&store), s(&smnt), "--snapshot", "v1"]);
    assert_eq!(fs::read(smnt.join("d/f")).unwrap(), b"version one");
    erofs(fs::write(smnt.join("d/f"), b"x"));
    erofs(fs::write(smnt.join("new"), b"x"));
    let (success, _, err) = cli(&["snapshot", "delete", s(&m.mnt), "v1"]);
    assert!(!success && err.contains("mounted"), "{err}");
    ok(&["umount", s(&smnt)]);
    std::thread::sleep(Duration::from_millis(300));
    ok(&["snapshot", "delete", s(&m.mnt), "v1"]);
    assert!(fs::metadata(m.path(".snapshots/v1")).is_err());
    // Names are validated.
    for bad in ["a/b", "..", "x\u{1}y", ""] {
        let (success, _, err) = cli(&["snapshot", "create", s(&m.mnt), bad]);
        assert!(!success && !err.contains("panicked"), "{bad:?}: {err}");
    }
    m.stop();
}

#[test]
fn restore_preserves_metadata_and_gc_frees_only_unreferenced_chunks() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let mut rng = Rng::from_env_or_time();
    let m = Mount::start(&store, &t.path().join("mnt"));
    let a = rng.bytes(6 << 20);
    let b = rng.bytes(3 << 20);
    fs::create_dir(m.path("ck")).unwrap();
    fs::write(m.path("ck/a"), &a).unwrap();
    fs::write(m.path("ck/b"), &b).unwrap();
    fs::hard_link(m.path("ck/a"), m.path("ck/a-link")).unwrap();
    std::os::unix::fs::symlink("a", m.path("ck/sym")).unwrap();
    std::os::unix::fs::chown(m.path("ck/b"), Some(4321), Some(8765)).unwrap();
    ok(&["snapshot", "create", s(&m.mnt), "keep"]);
    // Overwrite everything, snapshot, overwrite again.
    fs::write(m.path("ck/a"), rng.bytes(6 << 20)).unwrap();
    ok(&["snapshot", "create", s(&m.mnt), "drop"]);
    fs::write(m.path("ck/a"), rng.bytes(6 << 20)).unwrap();
    fs::remove_file(m.path("ck/b")).unwrap();
    let chunks = |m: &Mount| -> u64 {
        let j: serde_json::Value =
            serde_json::from_str(&ok(&["stat", s(&m.mnt), "--json"])).unwrap();
        j["chunks"].as_u64().unwrap()
    };
    let before = chunks(&m);
    ok(&["snapshot", "delete", s(&m.mnt), "drop"]);
    let after = chunks(&m);
    assert!(
        after + 6 <= before,
        "deleting a snapshot freed {} chunks",
        before - after
    );
    // The surviving snapshot is intact.
    assert!(fs::read(m.path(".snapshots/keep/ck/a")).unwrap() == a);
    assert!(fs::read(m.path(".snapshots/keep/ck/b")).unwrap() == b);
    // Restore it and compare.
    let dest = t.path().join("restored");
    ok(&["restore", s(&m.mnt), "keep", s(&dest)]);
    assert!(fs::read(dest.join("ck/a")).unwrap() == a);
    assert!(fs::read(dest.join("ck/b")).unwrap() == b);
    assert_eq!(
        fs::read_link(dest.join("ck/sym")).unwrap().to_str(),
        Some("a")
    );
    let (ma, ml) = (
        fs::metadata(dest.join("ck/a")).unwrap(),
        fs::metadata(dest.join("ck/a-link")).unwrap(),
    );
    assert_eq!(ma.ino(), ml.ino(), "hard link not preserved");
    let mb = fs::metadata(dest.join("ck/b")).unwrap();
    assert_eq!((mb.uid(), mb.gid()), (4321, 8765));
    let orig = fs::metadata(m.path(".snapshots/keep/ck/b")).unwrap();
    assert_eq!(
        (mb.mtime(), mb.mtime_nsec()),
        (orig.mtime(), orig.mtime_nsec())
    );
    assert_eq!(mb.mode(), orig.mode());
    // A non-empty destination is refused; a subpath restores alone.
    let (success, _, err) = cli(&["restore", s(&m.mnt), "keep", s(&dest)]);
    assert!(!success && err.contains("not an empty"), "{err}");
    let one = t.path().join("one");
    ok(&["restore", s(&m.mnt), "keep", s(&one), "--path", "ck/b"]);
    let mut got = Vec::new();
    fs::File::open(&one).unwrap().read_to_end(&mut got).unwrap();
    assert!(got == b);
    let (success, _, err) = cli(&[
        "restore",
        s(&m.mnt),
        "keep",
        s(&t.path().join("x")),
        "--path",
        "../etc",
    ]);
    assert!(!success && err.contains(".."), "{err}");
    // Delete the last snapshot and all files: the store returns to (almost) nothing.
    ok(&["snapshot", "delete", s(&m.mnt), "keep"]);
    fs::remove_dir_all(m.path("ck")).unwrap();
    m.stop();
    let j: serde_json::Value = serde_json::from_str(&ok(&["stat", s(&store), "--json"])).unwrap();
    assert_eq!(j["chunks"], 0, "{j}");
    assert_eq!(j["referenced_bytes"], 0, "{j}");
}

/// The pjdfstest `erofs` cases need a read-only remount, which a FUSE mount cannot do; this is
/// the same battery of calls against a read-only snapshot mount and `.snapshots`.
#[test]
fn every_modifying_call_on_a_snapshot_is_erofs() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let m = Mount::start(&store, &t.path().join("mnt"));
    fs::create_dir(m.path("dir")).unwrap();
    fs::create_dir(m.path("dir/empty")).unwrap();
    fs::write(m.path("dir/file"), b"data").unwrap();
    std::os::unix::fs::symlink("file", m.path("dir/sym")).unwrap();
    ok(&["snapshot", "create", s(&m.mnt), "ro"]);
    let smnt = t.path().join("smnt");
    fs::create_dir(&smnt).unwrap();
    ok(&["mount", s(&store), s(&smnt), "--snapshot", "ro"]);
    let mut checked = 0;
    for base in [smnt.clone(), m.path(".snapshots/ro")] {
        let p = |rel: &str| base.join(rel);
        let erofs = |what: &str, r: std::io::Result<()>| match r {
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
            other => panic!(
                "{what} under {}: expected EROFS, got {other:?}",
                base.display()
            ),
        };
        let open = |rel: &str, o: &mut fs::OpenOptions| o.open(p(rel)).map(|_| ());
        erofs(
            "open O_WRONLY",
            open("dir/file", fs::OpenOptions::new().write(true)),
        );
        erofs(
            "open O_RDWR",
            open("dir/file", fs::OpenOptions::new().read(true).write(true)),
        );
        erofs(
            "open O_APPEND",
            open("dir/file", fs::OpenOptions::new().append(true)),
        );
        erofs(
            "open O_TRUNC",
            open(
                "dir/file",
                fs::OpenOptions::new().write(true).truncate(true),
            ),
        );
        erofs(
            "open O_CREAT",
            open("dir/new", fs::OpenOptions::new().write(true).create(true)),
        );
        erofs("mkdir", fs::create_dir(p("dir/newdir")));
        erofs("rmdir", fs::remove_dir(p("dir/empty")));
        erofs("unlink", fs::remove_file(p("dir/file")));
        erofs("unlink symlink", fs::remove_file(p("dir/sym")));
        erofs("rename", fs::rename(p("dir/file"), p("dir/file2")));
        erofs("rename dir", fs::rename(p("dir/empty"), p("dir/empty2")));
        erofs("link", fs::hard_link(p("dir/file"), p("dir/link")));
        erofs("symlink", std::os::unix::fs::symlink("x", p("dir/sym2")));
        erofs(
            "chmod",
            fs::set_permissions(
                p("dir/file"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            ),
        );
        erofs(
            "chown",
            std::os::unix::fs::chown(p("dir/file"), Some(1), Some(1)),
        );
        erofs(
            "lchown",
            std::os::unix::fs::lchown(p("dir/sym"), Some(1), Some(1)),
        );
        for (what, cmd, args) in [
            ("truncate", "truncate", vec!["-s", "0"]),
            ("utimes", "touch", vec!["-d", "2001-01-01"]),
            ("setxattr", "setfattr", vec!["-n", "user.x", "-v", "1"]),
        ] {
            if let Ok(out) = Command::new(cmd).args(&args).arg(p("dir/file")).output() {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    !out.status.success() && err.contains("Read-only file system"),
                    "{what} under {}: {err}",
                    base.display()
                );
            }
        }
        if let Ok(out) = Command::new("mkfifo").arg(p("dir/fifo")).output() {
            assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"));
        }
        // Reads still work.
        assert_eq!(fs::read(p("dir/file")).unwrap(), b"data");
        assert_eq!(fs::read_link(p("dir/sym")).unwrap().to_str(), Some("file"));
        checked += 1;
    }
    assert_eq!(checked, 2);
    ok(&["umount", s(&smnt)]);
    m.stop();
}

#[test]
fn automatic_snapshots_follow_the_retention_policy() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let m = Mount::start_with(
        &store,
        &t.path().join("mnt"),
        &["--snapshot-every", "1s", "--keep-last", "2"],
    );
    let mut rng = Rng::from_env_or_time();
    for i in 0..4 {
        fs::write(m.path("f"), rng.bytes(2 << 20)).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let _ = i;
    }
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["snapshot", "list", s(&m.mnt), "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(!names.is_empty(), "no automatic snapshot was taken");
    assert!(names.len() <= 3, "retention kept {names:?}");
    assert!(names.iter().all(|n| n.starts_with("auto-")), "{names:?}");
    // Overwritten data held only by snapshots shows in stat.
    let st: serde_json::Value = serde_json::from_str(&ok(&["stat", s(&m.mnt), "--json"])).unwrap();
    assert_eq!(st["snapshots"].as_u64().unwrap() as usize, names.len());
    assert!(st["snapshot_only_bytes"].as_u64().unwrap() > 0, "{st}");
    m.stop();
}

/// The child half of the mmap test: maps FILE shared, and for each line on stdin dirties
/// every page with the next round's byte, then prints "mmap-dirty". Keeps the mapping (and the
/// file) open throughout, as a training job does, so no close flushes the pages.
#[test]
#[ignore = "helper: run by pages_dirtied_through_a_shared_mmap_are_in_the_snapshot"]
fn mmap_writer_child() {
    let Some(path) = std::env::var_os("SNAPFS_MMAP_FILE") else {
        return;
    };
    let size: usize = std::env::var("SNAPFS_MMAP_SIZE").unwrap().parse().unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    use std::os::fd::AsRawFd;
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let pages = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), size) };
    let mut round = 0u8;
    let stdin = std::io::stdin();
    let mut line = String::new();
    while stdin.read_line(&mut line).unwrap() > 0 {
        line.clear();
        round += 1;
        for page in pages.chunks_mut(4096) {
            page.fill(round);
        }
        // The harness has printed "test ... " without a newline: start a line of our own.
        println!("\nmmap-dirty");
        std::io::stdout().flush().unwrap();
    }
    unsafe { libc::munmap(p, size) };
}

/// Issue 6, defect 3: pages dirtied through a MAP_SHARED mapping by another process, and not
/// msync'd, are in a snapshot taken after they were dirtied (syncfs alone returned before the
/// kernel's WRITEs reached the daemon, and snapshots missed thousands of pages).
#[test]
fn pages_dirtied_through_a_shared_mmap_are_in_the_snapshot() {
    require_fuse!();
    const SIZE: usize = 128 << 20;
    let t = tempfile::tempdir().unwrap();
    let m = Mount::start(&t.path().join("store"), &t.path().join("mnt"));
    let file = m.path("mapped");
    fs::File::create(&file)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "mmap_writer_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("SNAPFS_MMAP_FILE", &file)
        .env("SNAPFS_MMAP_SIZE", SIZE.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = std::io::BufReader::new(child.stdout.take().unwrap());
    use std::io::BufRead;
    for round in 1..=4u8 {
        to_child.write_all(b"go\n").unwrap();
        to_child.flush().unwrap();
        loop {
            let mut l = String::new();
            assert!(from_child.read_line(&mut l).unwrap() > 0, "mmap child died");
            if l.trim() == "mmap-dirty" {
                break;
            }
        }
        let name = format!("mmap{round}");
        ok(&["snapshot", "create", s(&m.mnt), &name]);
        let mut snap = fs::File::open(m.path(&format!(".snapshots/{name}/mapped"))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let (mut stale, mut pos) = (0usize, 0usize);
        while pos < SIZE {
            snap.read_exact(&mut buf).unwrap();
            stale += buf
                .chunks(4096)
                .filter(|p| p.iter().any(|b| *b != round))
                .count();
            pos += buf.len();
        }
        assert_eq!(
            stale,
            0,
            "round {round}: {stale} of {} pages dirtied before the snapshot are missing from it",
            SIZE / 4096
        );
    }
    drop(to_child);
    assert!(child.wait().unwrap().success());
    m.stop();
}
