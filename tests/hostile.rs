//! Hostile input over the FUSE boundary, from an unprivileged owner on an `--allow-other`
//! mount: extreme times, offsets and sizes, maximal names, symlink targets and xattrs. Each
//! call may fail, but with an errno: never a panic, and the mount keeps serving.
//!
//! The unprivileged part runs in a child process (this test binary re-executed with
//! `SNAPFS_HOSTILE_DIR` set) that drops to uid/gid 65534 before its first call.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::Mount;

const NOBODY: u32 = 65534;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The result of a libc call: Ok(value) or Err(errno).
fn r(ret: i64) -> Result<i64, i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// Runs as uid 65534 inside `dir` (a directory it owns on the mount). Prints one line per
/// call; fails only if the mount stops answering.
fn hostile_calls(dir: &Path) {
    let f = dir.join("f");
    let fc = c(&f);
    let fd = unsafe { libc::open(fc.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
    assert!(fd >= 0, "create as nobody: errno {}", errno());
    let mut out = Vec::new();
    let mut note = |what: &str, res: Result<i64, i32>| out.push(format!("{what}: {res:?}"));

    // Times: the extremes of a 64-bit timespec, past and future, with and without nanos.
    for (s, n) in [
        (i64::MIN, 0),
        (i64::MIN, 999_999_999),
        (i64::MIN + 1, 1),
        (i64::MAX, 999_999_999),
        (i64::MAX, 0),
        (-1, 999_999_999),
        (-(1 << 62), 5),
    ] {
        let t = [ts(s, n), ts(s, n)];
        for _ in 0..4 {
            note(
                &format!("utimensat({s}, {n})"),
                r(unsafe { libc::utimensat(libc::AT_FDCWD, fc.as_ptr(), t.as_ptr(), 0) } as i64),
            );
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            note(
                "stat",
                r(unsafe { libc::stat(fc.as_ptr(), &mut st) } as i64),
            );
        }
        let t = [ts(s, n), ts(0, libc::UTIME_OMIT)];
        note(
            "futimens",
            r(unsafe { libc::futimens(fd, t.as_ptr()) } as i64),
        );
    }
    // Offsets and sizes at and past the largest file.
    let buf = [7u8; 4096];
    for off in [
        i64::MAX,
        i64::MAX - 1,
        i64::MAX - 4096,
        1 << 62,
        (1 << 62) + 4095,
        -1,
    ] {
        note(
            &format!("pwrite at {off}"),
            r(unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off) } as i64),
        );
        let mut rb = [0u8; 4096];
        note(
            &format!("pread at {off}"),
            r(unsafe { libc::pread(fd, rb.as_mut_ptr().cast(), rb.len(), off) } as i64),
        );
        note(
            &format!("ftruncate {off}"),
            r(unsafe { libc::ftruncate(fd, off) } as i64),
        );
        for whence in [libc::SEEK_DATA, libc::SEEK_HOLE, libc::SEEK_END] {
            note(
                &format!("lseek {off} {whence}"),
                r(unsafe { libc::lseek(fd, off, whence) }),
            );
        }
        for (mode, len) in [
            (0, i64::MAX),
            (libc::FALLOC_FL_KEEP_SIZE, 1 << 40),
            (
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                i64::MAX,
            ),
            (libc::FALLOC_FL_ZERO_RANGE, 4096),
        ] {
            note(
                &format!("fallocate {mode} {off} {len}"),
                r(unsafe { libc::fallocate(fd, mode, off.max(0), len) } as i64),
            );
        }
    }
    note("ftruncate 0", r(unsafe { libc::ftruncate(fd, 0) } as i64));
    // copy_file_range with extreme offsets and lengths.
    let g = c(&dir.join("g"));
    let gd = unsafe { libc::open(g.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
    for (a, b, len) in [
        (0i64, i64::MAX - 10, 1usize << 30),
        (i64::MAX - 10, 0, usize::MAX >> 1),
        (0, 0, usize::MAX),
    ] {
        let (mut a, mut b) = (a, b);
        note(
            &format!("copy_file_range {a} {b} {len}"),
            r(unsafe { libc::copy_file_range(fd, &mut a, gd, &mut b, len, 0) } as i64),
        );
    }
    // Names: 255 bytes is the limit, 256 is ENAMETOOLONG; symlink targets up to 4095 bytes.
    for n in [255usize, 256, 1024] {
        let p = c(&dir.join("n".repeat(n)));
        let fd2 = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
        note(&format!("create name of {n} bytes"), r(fd2 as i64));
        if fd2 >= 0 {
            unsafe { libc::close(fd2) };
        }
    }
    for n in [4095usize, 4096, 10000] {
        let target = CString::new("t".repeat(n)).unwrap();
        let p = c(&dir.join(format!("l{n}")));
        note(
            &format!("symlink target of {n} bytes"),
            r(unsafe { libc::symlink(target.as_ptr(), p.as_ptr()) } as i64),
        );
    }
    // Xattrs: the largest value, one byte more, long names, a short list buffer.
    for (name_len, value_len) in [
        (10usize, 65536usize),
        (10, 65537),
        (250, 10),
        (255, 10),
        (256, 10),
    ] {
        let name = CString::new(format!("user.{}", "x".repeat(name_len - 5))).unwrap();
        let v = vec![1u8; value_len];
        note(
            &format!("setxattr name {name_len} value {value_len}"),
            r(unsafe { libc::fsetxattr(fd, name.as_ptr(), v.as_ptr().cast(), v.len(), 0) } as i64),
        );
        let mut small = [0u8; 1];
        note(
            "getxattr into 1 byte",
            r(unsafe { libc::fgetxattr(fd, name.as_ptr(), small.as_mut_ptr().cast(), 1) } as i64),
        );
    }
    let mut small = [0u8; 2];
    note(
        "listxattr into 2 bytes",
        r(unsafe { libc::flistxattr(fd, small.as_mut_ptr().cast(), 2) } as i64),
    );
    // Permissions an owner may not take.
    note(
        "fchown to root",
        r(unsafe { libc::fchown(fd, 0, 0) } as i64),
    );
    note(
        "fchmod 07777",
        r(unsafe { libc::fchmod(fd, 0o7777) } as i64),
    );
    unsafe { libc::close(fd) };
    unsafe { libc::close(gd) };
    for l in &out {
        println!("{l}");
    }
    // The mount still serves this user.
    let p = dir.join("after");
    std::fs::write(&p, b"still serving").expect("write after the hostile calls");
    assert_eq!(std::fs::read(&p).unwrap(), b"still serving");
}

/// The child half: drops privileges and runs the calls (run only by the test below).
#[test]
#[ignore = "helper: run as uid 65534 by hostile_calls_from_an_unprivileged_user_..."]
fn hostile_child() {
    let Some(dir) = std::env::var_os("SNAPFS_HOSTILE_DIR") else {
        return;
    };
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setgid(NOBODY), 0);
        assert_eq!(libc::setuid(NOBODY), 0);
    }
    assert_eq!(unsafe { libc::geteuid() }, NOBODY);
    hostile_calls(Path::new(&dir));
}

fn run_child_as_nobody(dir: &Path) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hostile_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("SNAPFS_HOSTILE_DIR", dir)
        .output()
        .unwrap()
}

fn setup(t: &Path) -> (Mount, std::path::PathBuf) {
    // tempdir is 0700: nobody must be able to reach the mountpoint.
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = Mount::start_with(&t.join("store"), &t.join("mnt"), &["--allow-other"]);
    let dir = m.path("nobody");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    (m, dir)
}

fn assert_serving(m: &mut Mount) {
    let alive = m.child.as_mut().unwrap().try_wait().unwrap().is_none();
    assert!(alive, "the daemon exited: {}", m.log_tail());
    std::fs::write(m.path("root-after"), b"ok").expect("the mount stopped serving");
    assert_eq!(std::fs::read(m.path("root-after")).unwrap(), b"ok");
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(
        !log.contains("panicked"),
        "a thread panicked: {}",
        m.log_tail()
    );
}

/// Issue 6, defect 4: `os.utime(path, (-2**63, -2**63))` by a file owner panicked a fuser
/// worker; three such calls ended the session.
#[test]
fn extreme_times_from_an_unprivileged_owner_do_not_take_the_mount_down() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let (mut m, dir) = setup(t.path());
    let f = dir.join("t");
    std::fs::write(&f, b"x").unwrap();
    std::os::unix::fs::chown(&f, Some(NOBODY), Some(NOBODY)).unwrap();
    // On a thread, with a deadline: a mount whose workers died stops answering, and the
    // calls would block instead of failing.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let fc = c(&f);
        for _ in 0..8 {
            let times = [ts(i64::MIN, 0), ts(i64::MIN, 0)];
            // Success or an errno; what matters is that the mount survives.
            unsafe { libc::utimensat(libc::AT_FDCWD, fc.as_ptr(), times.as_ptr(), 0) };
        }
        let md = std::fs::metadata(&f).map(|m| m.len());
        let _ = tx.send(md);
    });
    let md = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "the mount stopped answering after utimensat(i64::MIN): {}",
                m.log_tail()
            )
        });
    assert_eq!(md.expect("stat after extreme times"), 1);
    assert_serving(&mut m);
    m.stop();
}

#[test]
fn hostile_calls_from_an_unprivileged_user_get_errnos_never_a_panic() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let (mut m, dir) = setup(t.path());
    let out = run_child_as_nobody(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the unprivileged child failed:\n{stdout}\n{stderr}\ndaemon log:\n{}",
        m.log_tail()
    );
    assert!(
        stdout.contains("1 passed"),
        "the child did not run its calls:\n{stdout}"
    );
    // Spot checks of the errnos a POSIX filesystem gives.
    let line = |p: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no line {p:?} in:\n{stdout}"))
            .to_string()
    };
    assert!(line("create name of 255 bytes").contains("Ok("));
    assert!(line("create name of 256 bytes").contains(&format!("Err({})", libc::ENAMETOOLONG)));
    assert!(line("fchown to root").contains(&format!("Err({})", libc::EPERM)));
    assert!(line("pwrite at 9223372036854775807").contains("Err("));
    eprintln!("{stdout}");
    assert_serving(&mut m);
    m.stop();
}
