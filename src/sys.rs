//! The one module with `unsafe`: thin wrappers over libc calls that std does not offer.
//! Each wrapper checks its arguments and turns the C result into an `io::Result`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

pub fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = cstr(p)?;
    // SAFETY: `st` is a plain C struct that statvfs fills in; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Takes an exclusive, non-blocking advisory lock on an open file.
pub fn try_lock_exclusive(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid, owned descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// umount2(2); `lazy` detaches a busy mount.
pub fn umount(p: &Path, lazy: bool) -> io::Result<()> {
    let c = cstr(p)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string, plain flags.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// syncfs(2) on the filesystem holding `p`: the kernel writes back its dirty pages.
pub fn syncfs(p: &Path) -> io::Result<()> {
    let f = File::open(p)?;
    // SAFETY: syncfs on a valid, owned descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fallocate(2) of `len` bytes from offset 0: the blocks are allocated, not a sparse hole.
pub fn fallocate(f: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    // SAFETY: fallocate on a valid, owned descriptor, mode 0.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and threads it spawns later), so
/// that `wait_for_signal` can take them synchronously.
pub fn block_exit_signals() -> io::Result<()> {
    let set = exit_sigset();
    // SAFETY: `set` is initialised by exit_sigset; old set not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for one of the signals blocked by `block_exit_signals` and returns its number.
pub fn wait_for_signal() -> io::Result<i32> {
    let set = exit_sigset();
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised; `sig` is a valid out pointer.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

fn exit_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

pub fn getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

pub fn getgid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}

/// lchown(2): owner of a path, not following a final symlink.
pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(p)?;
    // SAFETY: valid C string.
    if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// utimensat(2) with AT_SYMLINK_NOFOLLOW: atime and mtime as (seconds, nanoseconds).
pub fn set_times(p: &Path, atime: (i64, u32), mtime: (i64, u32)) -> io::Result<()> {
    let c = cstr(p)?;
    let ts = [
        libc::timespec {
            tv_sec: atime.0 as libc::time_t,
            tv_nsec: atime.1 as libc::c_long,
        },
        libc::timespec {
            tv_sec: mtime.0 as libc::time_t,
            tv_nsec: mtime.1 as libc::c_long,
        },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// mknod(2) for fifos, sockets and device nodes.
pub fn mknod(p: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(p)?;
    // SAFETY: valid C string, plain integers.
    if unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// lsetxattr(2).
pub fn lsetxattr(p: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cstr(p)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: valid C strings; value pointer and length describe a live slice.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The thread id of the caller (what FUSE puts in a request's `pid` field).
pub fn gettid() -> u64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() as u64 }
}

/// Makes the calling thread a background one: CPU nice +10 and the lowest best-effort I/O
/// priority, so that it yields the cores and the disk to foreground work (replication
/// uploads yield to the training job's writes). Best effort: failures are ignored.
pub fn background_thread() {
    let tid = gettid() as libc::id_t;
    // SAFETY: setpriority on this thread's own id; no pointers.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    let prio = (IOPRIO_CLASS_BE << 13) | 7;
    // SAFETY: ioprio_set(2) with integer arguments only, on this thread's own id.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            prio,
        );
    }
}

/// Opens the live inode `nodeid` of the FUSE mount whose root is `mount` by its file handle
/// (the kernel's FUSE handle: node id in two 32-bit halves, generation 0, type 0x81), and
/// fsyncs it. For FUSE, fsync(2) first writes back the inode's dirty page-cache pages (mmap
/// writes) and waits until the daemon has answered every WRITE: unlike syncfs(2), which on
/// this kernel returns before those WRITEs reach the daemon. Needs CAP_DAC_READ_SEARCH; the
/// kernel finds the inode in its cache (an open file always is), so no export support is
/// needed. `Ok(false)`: the kernel no longer knows the inode (nothing to write back).
pub fn fsync_fuse_inode(mount: &File, nodeid: u64) -> io::Result<bool> {
    #[repr(C)]
    struct FuseHandle {
        handle_bytes: libc::c_uint,
        handle_type: libc::c_int,
        f_handle: [u32; 3],
    }
    let mut h = FuseHandle {
        handle_bytes: 12,
        handle_type: 0x81,
        f_handle: [(nodeid >> 32) as u32, nodeid as u32, 0],
    };
    // SAFETY: `h` has the layout of `struct file_handle` followed by 12 handle bytes, as
    // `handle_bytes` says; the kernel only reads it. The descriptor is owned and closed below.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&mut h as *mut FuseHandle).cast::<libc::file_handle>(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESTALE) | Some(libc::ENOENT) => Ok(false),
            _ => Err(e),
        };
    }
    // SAFETY: `fd` was just returned by open_by_handle_at and is owned here.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.sync_all()?;
    Ok(true)
}

/// Adds 0o077 to the process umask (never loosens it) and returns the previous umask. Every
/// file and directory this process creates from now on is owner-only unless it sets a mode
/// explicitly: RocksDB creates its files with fixed modes (0644 files, 0755 directories)
/// for as long as a store is open, so only the process umask reaches them (docs/design.md).
pub fn tighten_umask() -> u32 {
    // SAFETY: umask(2) cannot fail; it is read by setting it, then set again at once.
    unsafe {
        let old = libc::umask(0o077);
        if old | 0o077 != 0o077 {
            libc::umask(old | 0o077);
        }
        old as u32
    }
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn cname(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

/// Opens a directory read-only with O_NOFOLLOW: a final component that is a symlink fails
/// with ELOOP instead of being followed.
pub fn open_dir_nofollow(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(p)
}

/// openat(2) of `name` in `dir`, read-only, never following a symlink (O_NOFOLLOW), never
/// blocking on a fifo or taking a terminal; `directory` adds O_DIRECTORY.
pub fn openat_nofollow(dir: &File, name: &std::ffi::OsStr, directory: bool) -> io::Result<File> {
    let c = cname(name)?;
    let mut flags =
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    if directory {
        flags |= libc::O_DIRECTORY;
    }
    // SAFETY: valid descriptor and C string; the returned descriptor is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and nothing else owns it.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// fstatat(2) of `name` in `dir` with AT_SYMLINK_NOFOLLOW.
pub fn fstatat_nofollow(dir: &File, name: &std::ffi::OsStr) -> io::Result<libc::stat> {
    let c = cname(name)?;
    // SAFETY: `st` is a plain C struct that fstatat fills in; valid descriptor and C string.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The names in an open directory (without `.` and `..`), read through a duplicate of its
/// descriptor: no path is resolved again.
pub fn read_dir_fd(dir: &File) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: dup of a valid descriptor; fdopendir takes ownership of the duplicate (closed
    // by closedir, also on the error path below).
    let fd = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let d = unsafe { libc::fdopendir(fd) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        unsafe { libc::close(fd) };
        return Err(e);
    }
    // The duplicate shares the file offset: start from the beginning.
    unsafe { libc::rewinddir(d) };
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: readdir on the live stream; errno is cleared first to tell the end of the
        // directory (NULL, errno 0) from an error.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break match e.raw_os_error() {
                Some(0) | None => Ok(()),
                _ => Err(e),
            };
        }
        // SAFETY: d_name is a NUL-terminated array inside the entry readdir returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b != b"." && b != b".." {
            names.push(std::ffi::OsStr::from_bytes(b).to_os_string());
        }
    };
    // SAFETY: the stream was opened above and is closed once.
    unsafe { libc::closedir(d) };
    result.map(|()| names)
}

/// The credentials of the process at the other end of a connected Unix socket, as the
/// kernel recorded them at connect(2) (SO_PEERCRED): (pid, uid, gid).
pub fn peer_cred(sock: &impl AsRawFd) -> io::Result<(i32, u32, u32)> {
    // SAFETY: `cred` is a plain C struct of the size passed; getsockopt fills it in.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("SO_PEERCRED returned a short answer"));
    }
    Ok((cred.pid, cred.uid, cred.gid))
}

/// openat(2) of `name` in `dir` for writing, creating it with `mode` (less the umask):
/// O_CREAT|O_EXCL|O_NOFOLLOW, so it fails with EEXIST if any entry of that name exists,
/// a symlink included: nothing is followed and nothing existing is opened.
pub fn openat_create_excl(dir: &File, name: &std::ffi::OsStr, mode: u32) -> io::Result<File> {
    let c = cname(name)?;
    let flags = libc::O_WRONLY
        | libc::O_CREAT
        | libc::O_EXCL
        | libc::O_NOFOLLOW
        | libc::O_NOCTTY
        | libc::O_CLOEXEC;
    // SAFETY: valid descriptor and C string; the mode is passed as the variadic argument
    // O_CREAT requires; the returned descriptor is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and nothing else owns it.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Turns O_DIRECT on or off for an open file (fcntl F_SETFL; Linux lets O_DIRECT change on
/// an open descriptor). EINVAL: the filesystem does not support it.
pub fn set_direct(f: &File, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid descriptor that `f` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    if want != flags {
        // SAFETY: as above.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, want) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// mkdirat(2): a directory `name` in `dir` with `mode` (less the umask). Never follows a
/// symlink: an existing entry of that name, a symlink included, fails with EEXIST.
pub fn mkdirat(dir: &File, name: &std::ffi::OsStr, mode: u32) -> io::Result<()> {
    let c = cname(name)?;
    // SAFETY: valid descriptor and C string, plain mode.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// renameat(2) of `from` to `to`, both in `dir`: atomically replaces the entry `to` (a
/// symlink there is replaced itself, never followed).
pub fn renameat(dir: &File, from: &std::ffi::OsStr, to: &std::ffi::OsStr) -> io::Result<()> {
    let (f, t) = (cname(from)?, cname(to)?);
    let d = dir.as_raw_fd();
    // SAFETY: valid descriptor and C strings.
    if unsafe { libc::renameat(d, f.as_ptr(), d, t.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// unlinkat(2) of the non-directory entry `name` in `dir` (a symlink is removed itself).
pub fn unlinkat(dir: &File, name: &std::ffi::OsStr) -> io::Result<()> {
    let c = cname(name)?;
    // SAFETY: valid descriptor and C string, no flags.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for a secret on the controlling terminal (`/dev/tty`) with echo off, and reads one
/// line (without its newline). Errors if there is no terminal.
pub fn read_secret(prompt: &str) -> io::Result<String> {
    use std::io::{BufRead, Write};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open terminal descriptor, &mut old is valid for writes.
    if unsafe { libc::tcgetattr(fd, &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut quiet = old;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above; the settings are restored below on every path.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut w = &tty;
    let mut line = String::new();
    let r = w
        .write_all(prompt.as_bytes())
        .and_then(|()| w.flush())
        .and_then(|()| io::BufReader::new(&tty).read_line(&mut line));
    // SAFETY: restores the settings read above on the same descriptor.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    r?;
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    Ok(line)
}
