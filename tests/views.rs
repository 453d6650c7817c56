//! Snapshot views under `/.snapshots`: the daemon's memory stays bounded however many views
//! are read, unused views are dropped and reopened, the synthetic directory answers xattr
//! calls like a directory without xattrs, snapshot mounts served by the daemon honour their
//! flags, and `snapshot diff` sees xattrs and non-UTF-8 names.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, ok, Mount};

fn rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// A file of `mib` MiB whose every 1 MiB chunk differs with `seed` (and compresses well,
/// so the store stays small while each decoded chunk is a full MiB).
fn pattern(mib: usize, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(mib << 20);
    let mut line = 0u32;
    while v.len() < mib << 20 {
        v.extend_from_slice(format!("snapshot {seed:06} line {line:09}\n").as_bytes());
        line += 1;
    }
    v.truncate(mib << 20);
    v
}

fn read_all(p: &Path) -> Vec<u8> {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    out
}

/// Drops the kernel's page cache, so reads reach the daemon.
fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn reading_many_snapshot_views_keeps_daemon_memory_bounded() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(&store, &mnt); // default --cache-size: 64 MiB
    let pid = m.child.as_ref().unwrap().id();
    const VIEWS: u32 = 40;
    const MIB: usize = 8;
    for i in 0..VIEWS {
        fs::write(m.path("big"), pattern(MIB, i)).unwrap();
        ok(&[
            "snapshot",
            "create",
            m.mnt.to_str().unwrap(),
            &format!("s{i:02}"),
        ]);
    }
    drop_caches();
    // Warm up one view, so the baseline includes what any single view costs.
    let first = read_all(&m.path(".snapshots/s00/big"));
    assert!(first == pattern(MIB, 0), "s00 content");
    let before = rss_kib(pid);
    for i in 0..VIEWS {
        let got = read_all(&m.path(&format!(".snapshots/s{i:02}/big")));
        assert!(got == pattern(MIB, i), "snapshot s{i:02} content differs");
    }
    let after = rss_kib(pid);
    let growth_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "daemon RSS: {} MiB before, {} MiB after reading {VIEWS} views of an {MIB} MiB file \
         (growth {growth_mib} MiB, cache bound 64 MiB)",
        before / 1024,
        after / 1024
    );
    assert!(
        growth_mib < 150,
        "daemon RSS grew by {growth_mib} MiB reading {VIEWS} views (bound: 64 MiB cache + margin)"
    );
    m.stop();
}

fn start_env(store: &Path, mnt: &Path, env: &[(&str, &str)]) -> Mount {
    // Mount::start_with inherits the environment: spawn through `env` to add variables.
    fs::create_dir_all(mnt).unwrap();
    let log = store.with_extension("log");
    let logf = fs::File::create(&log).unwrap();
    let mut cmd = Command::new("env");
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    let child = cmd
        .arg(bin())
        .arg("mount")
        .arg(store)
        .arg(mnt)
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    let m = Mount {
        child: Some(child),
        store: store.to_path_buf(),
        mnt: mnt.canonicalize().unwrap(),
        log,
    };
    let start = Instant::now();
    while !common::is_mounted(&m.mnt) {
        assert!(start.elapsed() < Duration::from_secs(60), "mount timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
    m
}

#[test]
fn unused_views_are_dropped_and_reopen_with_the_same_inodes() {
    require_fuse!();
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    let m = start_env(&store, &mnt, &[("SNAPFS_VIEW_IDLE_SECS", "1")]);
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"old").unwrap();
    ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "one"]);
    fs::write(m.path("d/f"), b"new").unwrap();
    let dir = m.path(".snapshots/one/d");
    let ino = fs::metadata(dir.join("f")).unwrap().ino();
    // An open handle keeps its view: it still reads after the idle time.
    let mut held = fs::File::open(dir.join("f")).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let mut s = String::new();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "old");
    drop(held);
    let start = Instant::now();
    while !fs::read_to_string(&m.log)
        .unwrap()
        .contains("unused snapshot views")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no view was dropped: {}",
            m.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The kernel still holds the dropped view's inode numbers: they keep working.
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"old");
    assert_eq!(fs::metadata(dir.join("f")).unwrap().ino(), ino);
    drop_caches();
    assert_eq!(fs::read(m.path(".snapshots/one/d/f")).unwrap(), b"old");
    m.stop();
}

fn xattr_call(path: &Path, list: bool) -> (isize, i32) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let name = CString::new("user.x").unwrap();
    let r = unsafe {
        if list {
            libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        } else {
            libc::getxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    };
    (
        r,
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
    )
}

#[test]
fn snapshots_dir_answers_xattr_calls_and_copies_cleanly() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(&store, &mnt);
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"hello").unwrap();
    ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
    let snapdir = m.path(".snapshots");
    assert_eq!(xattr_call(&snapdir, true).0, 0, "listxattr: empty list");
    let (r, e) = xattr_call(&snapdir, false);
    assert_eq!((r, e), (-1, libc::ENODATA), "getxattr: ENODATA");
    let c = CString::new(snapdir.as_os_str().as_bytes()).unwrap();
    let n = CString::new("user.x").unwrap();
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    let e = std::io::Error::last_os_error().raw_os_error().unwrap();
    assert!(
        r == -1 && (e == libc::EROFS || e == libc::EPERM),
        "setxattr: errno {e}"
    );
    let out = Command::new("ls")
        .arg("-la")
        .arg(&snapdir)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ls -la: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("getfattr")
        .arg("-d")
        .arg(&snapdir)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "getfattr -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dest = tmp.path().join("copy");
    let out = Command::new("cp")
        .arg("-a")
        .arg(m.path(".snapshots/s1"))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "cp -a: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(dest.join("d/f")).unwrap(), b"hello");
    m.stop();
}

/// Runs `cat PATH` as uid/gid 65534; true if it read the file.
fn nobody_reads(p: &Path) -> bool {
    Command::new("timeout")
        .args([
            "20",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
        ])
        .arg(p)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn daemon_served_snapshot_mount_honours_allow_other_and_threads() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    // nobody must reach the mountpoints: a world-searchable parent.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    let m = Mount::start_with(&store, &mnt, &["--allow-other"]);
    fs::write(m.path("f"), b"data").unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o644)).unwrap();
    ok(&["snapshot", "create", m.mnt.to_str().unwrap(), "s1"]);
    let (open, closed) = (tmp.path().join("open"), tmp.path().join("closed"));
    fs::create_dir(&open).unwrap();
    fs::create_dir(&closed).unwrap();
    let st = store.to_str().unwrap();
    ok(&[
        "mount",
        st,
        open.to_str().unwrap(),
        "--snapshot",
        "s1",
        "--allow-other",
        "--threads",
        "8",
    ]);
    ok(&["mount", st, closed.to_str().unwrap(), "--snapshot", "s1"]);
    assert!(common::is_mounted(&open) && common::is_mounted(&closed));
    let with = nobody_reads(&open.join("f"));
    let without = nobody_reads(&closed.join("f"));
    ok(&["umount", open.to_str().unwrap()]);
    ok(&["umount", closed.to_str().unwrap()]);
    assert!(
        with,
        "with --allow-other, uid 65534 cannot read the snapshot mount"
    );
    assert!(
        !without,
        "without --allow-other, uid 65534 read the snapshot mount"
    );
    m.stop();
}

#[test]
fn diff_sees_xattr_changes_and_non_utf8_names() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(&store, &mnt);
    let target = m.mnt.to_str().unwrap().to_string();
    fs::write(m.path("x"), b"same").unwrap();
    let ff = m.mnt.join(std::ffi::OsStr::from_bytes(b"\xff"));
    let fe = m.mnt.join(std::ffi::OsStr::from_bytes(b"\xfe"));
    fs::write(&ff, b"one").unwrap();
    fs::write(&fe, b"two").unwrap();
    ok(&["snapshot", "create", &target, "a"]);
    let st = Command::new("setfattr")
        .args(["-n", "user.tag", "-v", "v1"])
        .arg(m.path("x"))
        .status()
        .unwrap();
    assert!(st.success());
    fs::write(&fe, b"TWO").unwrap();
    ok(&["snapshot", "create", &target, "b"]);
    let out = ok(&["snapshot", "diff", &target, "a", "b"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec!["M /x (file)", "M /\\xfe (file)"],
        "diff output:\n{out}"
    );
    let js = ok(&["snapshot", "diff", &target, "a", "b", "--json"]);
    assert!(js.contains("\"/\\\\xfe\""), "json: {js}");
    assert!(!js.contains("xff"), "json: {js}");
    m.stop();
}
