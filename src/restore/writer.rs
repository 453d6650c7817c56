//! A tree writer that never resolves a path twice: every entry is created relative to the
//! descriptor of its parent directory, and every piece of metadata is applied to a
//! descriptor (or to a name inside a directory only this process can write). Used by
//! `restore`, and meant for `recover`, which writes trees from untrusted backend data.
//!
//! Discipline (see docs/design.md, "Restore safety"):
//! - DEST is opened once with `O_DIRECTORY|O_NOFOLLOW`.
//! - A directory is made with `mkdirat(parent, name, 0700)` and opened with
//!   `openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)`; it stays root-owned
//!   and 0700 (nobody else can enter it) until it is left, when its owner, xattrs, mode and
//!   times are applied on its descriptor. Only the descriptors of the current path are open.
//! - Files: `openat(O_CREAT|O_EXCL|O_NOFOLLOW)`, data, `fchown`, xattrs (after chown, which
//!   clears `security.capability`), `fchmod`, `futimens`.
//! - Symlinks and special files: `symlinkat`/`mknodat`, then an `O_PATH|O_NOFOLLOW`
//!   descriptor checked with `fstat`; metadata through that descriptor.
//! - Names are untrusted: empty, `.`, `..`, or containing `/` or NUL are refused.

#![allow(unsafe_code)]
#![allow(clippy::type_complexity)]

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::storage::inode::{Attr, Kind};

fn last() -> io::Error {
    io::Error::last_os_error()
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(last())
    } else {
        Ok(r)
    }
}

/// Refuses names that could leave the directory they are created in.
pub fn check_name(b: &[u8]) -> Result<CString, String> {
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(format!(
            "refusing unsafe name {:?} from the source",
            String::from_utf8_lossy(b)
        ));
    }
    CString::new(b).map_err(|_| "refusing a name with NUL".to_string())
}

/// Opens `dir` (an absolute or relative path chosen by the caller) as a directory, never
/// following a final symlink.
pub fn open_dest(dir: &std::path::Path) -> io::Result<OwnedFd> {
    let c = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    Ok(unsafe { OwnedFd::from_raw_fd(cvt(fd)?) })
}

/// `openat2(dirfd, name, flags | O_NOFOLLOW | O_CLOEXEC)` beneath `dirfd`, no symlinks at all.
fn openat2(dirfd: RawFd, name: &CString, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // struct open_how { u64 flags, mode, resolve } (libc's is non-exhaustive).
    let how: [u64; 3] = [
        (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode as u64,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    ];
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            name.as_ptr(),
            how.as_ptr(),
            std::mem::size_of_val(&how),
        )
    };
    if r < 0 {
        return Err(last());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap()
}

fn timespecs(a: &Attr) -> [libc::timespec; 2] {
    let t = |s: i64, n: u32| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: n as _,
    };
    [
        t(a.atime.secs, a.atime.nanos),
        t(a.mtime.secs, a.mtime.nanos),
    ]
}

/// One open directory on the current path, with the metadata to apply when it is left.
struct OpenDir {
    fd: OwnedFd,
    attr: Option<(Attr, Vec<(Vec<u8>, Vec<u8>)>)>,
    what: String,
}

/// The descriptor-relative tree writer. `enter_dir`/`leave_dir` nest; the other calls create
/// one entry in the innermost directory.
pub struct TreeWriter {
    stack: Vec<OpenDir>,
    /// Source inode -> (O_PATH descriptor of the first restored link, links still to come).
    links: HashMap<u64, (OwnedFd, u32)>,
    /// Replace existing entries (`--overwrite`) instead of failing with EEXIST.
    overwrite: bool,
}

fn e(what: &str, name: &str, x: impl std::fmt::Display) -> String {
    format!("{what} {name}: {x}")
}

impl TreeWriter {
    /// Starts writing into the directory `dest` (already opened with [`open_dest`]).
    pub fn new(dest: OwnedFd, shown: String, overwrite: bool) -> TreeWriter {
        TreeWriter {
            stack: vec![OpenDir {
                fd: dest,
                attr: None,
                what: shown,
            }],
            links: HashMap::new(),
            overwrite,
        }
    }

    /// Runs `create`; if it fails with EEXIST and overwriting is on, removes the existing entry
    /// (descriptor-relative, never following a symlink) and runs it once more.
    fn create_or_replace<T>(
        &self,
        dfd: RawFd,
        c: &CString,
        mut create: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        match create() {
            Err(x) if self.overwrite && x.raw_os_error() == Some(libc::EEXIST) => {
                remove_entry(dfd, c)?;
                create()
            }
            r => r,
        }
    }

    fn top(&self) -> (RawFd, String) {
        let d = self.stack.last().expect("the destination stays open");
        (d.fd.as_raw_fd(), d.what.clone())
    }

    /// Applies `a` and `xattrs` to the directory DEST itself when the writer finishes.
    pub fn set_root_meta(&mut self, a: Attr, xattrs: Vec<(Vec<u8>, Vec<u8>)>) {
        self.stack[0].attr = Some((a, xattrs));
    }

    /// Creates the directory `name` (0700, owned by this process until it is left) and makes it
    /// the current one.
    pub fn enter_dir(
        &mut self,
        name: &[u8],
        a: Attr,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), String> {
        let c = check_name(name)?;
        let (dfd, parent) = self.top();
        let shown = format!("{parent}/{}", String::from_utf8_lossy(name));
        let made = cvt(unsafe { libc::mkdirat(dfd, c.as_ptr(), 0o700) });
        let fd = match made {
            Err(x) if self.overwrite && x.raw_os_error() == Some(libc::EEXIST) => {
                // An existing real directory is reused (taken over: 0700, ours, until it is
                // left); anything else, a symlink included, is removed and replaced.
                match openat2(dfd, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                    Ok(fd) => {
                        let r = fd.as_raw_fd();
                        cvt(unsafe { libc::fchmod(r, 0o700) })
                            .and_then(|_| {
                                cvt(unsafe { libc::fchown(r, libc::geteuid(), libc::getegid()) })
                            })
                            .map_err(|x| e("cannot take over", &shown, x))?;
                        fd
                    }
                    Err(_) => {
                        remove_entry(dfd, &c).map_err(|x| e("cannot replace", &shown, x))?;
                        cvt(unsafe { libc::mkdirat(dfd, c.as_ptr(), 0o700) })
                            .map_err(|x| e("cannot create", &shown, x))?;
                        openat2(dfd, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                            .map_err(|x| e("cannot open", &shown, x))?
                    }
                }
            }
            Err(x) => return Err(e("cannot create", &shown, x)),
            Ok(_) => openat2(dfd, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(|x| e("cannot open", &shown, x))?,
        };
        self.stack.push(OpenDir {
            fd,
            attr: Some((a, xattrs)),
            what: shown,
        });
        Ok(())
    }

    /// Leaves the current directory, applying its final metadata (its mtime is final now that
    /// all of its entries exist) on the descriptor it was created with.
    pub fn leave_dir(&mut self) -> Result<(), String> {
        if self.stack.len() < 2 {
            return Err("restore: leave_dir at the top".into());
        }
        let d = self.stack.pop().unwrap();
        Self::finish_dir(d)
    }

    fn finish_dir(d: OpenDir) -> Result<(), String> {
        if let Some((a, x)) = d.attr {
            apply_fd(d.fd.as_raw_fd(), &a, &x, &d.what)?;
        }
        Ok(())
    }

    /// Finishes the whole tree: leaves every open directory, DEST last.
    pub fn finish(mut self) -> Result<(), String> {
        while let Some(d) = self.stack.pop() {
            Self::finish_dir(d)?;
        }
        Ok(())
    }

    /// Makes `name` a hard link to an earlier entry for `src_ino`, if one was restored.
    /// Returns false if this is the first link (then the caller creates the entry and calls
    /// [`TreeWriter::remember_link`]).
    pub fn link(&mut self, src_ino: u64, name: &[u8]) -> Result<bool, String> {
        let c = check_name(name)?;
        let (dfd, parent) = self.top();
        let shown = format!("{parent}/{}", String::from_utf8_lossy(name));
        let Some((fd, left)) = self.links.get_mut(&src_ino) else {
            return Ok(false);
        };
        let src = fd.as_raw_fd();
        let overwrite = self.overwrite;
        let linked = || {
            let empty = CString::new("").unwrap();
            let r =
                unsafe { libc::linkat(src, empty.as_ptr(), dfd, c.as_ptr(), libc::AT_EMPTY_PATH) };
            if r == 0 {
                return Ok(());
            }
            let x = last();
            if x.raw_os_error() == Some(libc::EEXIST) {
                return Err(x);
            }
            // Without CAP_DAC_READ_SEARCH: through the descriptor's /proc magic link, which
            // names exactly this inode.
            let p = proc_path(src);
            cvt(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    dfd,
                    c.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
            .map(|_| ())
        };
        match linked() {
            Err(x) if overwrite && x.raw_os_error() == Some(libc::EEXIST) => {
                remove_entry(dfd, &c).and_then(|_| linked())
            }
            r => r,
        }
        .map_err(|x| e("cannot link", &shown, x))?;
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.links.remove(&src_ino);
        }
        Ok(true)
    }

    fn remember_link(&mut self, a: &Attr, dfd: RawFd, c: &CString) -> Result<(), String> {
        if a.kind == Kind::Dir || a.nlink < 2 {
            return Ok(());
        }
        let fd = openat2(dfd, c, libc::O_PATH, 0).map_err(|x| e("cannot reopen", "link", x))?;
        self.links.insert(a.ino, (fd, a.nlink - 1));
        Ok(())
    }

    /// Creates the regular file `name`; `fill` writes its data through the `FileOut` it gets.
    pub fn file(
        &mut self,
        name: &[u8],
        a: &Attr,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        fill: &mut dyn FnMut(&mut FileOut) -> Result<(), String>,
    ) -> Result<(), String> {
        let c = check_name(name)?;
        let (dfd, parent) = self.top();
        let shown = format!("{parent}/{}", String::from_utf8_lossy(name));
        let fd = self
            .create_or_replace(dfd, &c, || {
                openat2(
                    dfd,
                    &c,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
            })
            .map_err(|x| e("cannot create", &shown, x))?;
        let mut out = FileOut {
            fd,
            shown: shown.clone(),
        };
        fill(&mut out)?;
        cvt(unsafe { libc::ftruncate(out.fd.as_raw_fd(), a.size as libc::off_t) })
            .map_err(|x| e("cannot size", &shown, x))?;
        cvt(unsafe { libc::fsync(out.fd.as_raw_fd()) }).map_err(|x| e("cannot sync", &shown, x))?;
        apply_fd(out.fd.as_raw_fd(), a, xattrs, &shown)?;
        self.remember_link(a, dfd, &c)
    }

    /// Creates a symlink, FIFO, socket or device node `name`.
    pub fn special(
        &mut self,
        name: &[u8],
        a: &Attr,
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), String> {
        let c = check_name(name)?;
        let (dfd, parent) = self.top();
        let shown = format!("{parent}/{}", String::from_utf8_lossy(name));
        let want = match a.kind {
            Kind::Symlink => {
                let t = CString::new(a.target.clone())
                    .map_err(|_| format!("refusing a symlink target with NUL for {shown}"))?;
                self.create_or_replace(dfd, &c, || {
                    cvt(unsafe { libc::symlinkat(t.as_ptr(), dfd, c.as_ptr()) })
                })
                .map_err(|x| e("cannot create", &shown, x))?;
                libc::S_IFLNK
            }
            _ => {
                let fmt = a.mode() & libc::S_IFMT;
                self.create_or_replace(dfd, &c, || {
                    cvt(unsafe {
                        libc::mknodat(dfd, c.as_ptr(), 0o600 | fmt, a.rdev as libc::dev_t)
                    })
                })
                .map_err(|x| e("cannot create", &shown, x))?;
                fmt
            }
        };
        let fd = openat2(dfd, &c, libc::O_PATH, 0).map_err(|x| e("cannot open", &shown, x))?;
        let st = fstat(fd.as_raw_fd()).map_err(|x| e("cannot stat", &shown, x))?;
        if st.st_mode & libc::S_IFMT != want {
            return Err(format!("{shown} was replaced while it was restored"));
        }
        let fdr = fd.as_raw_fd();
        let empty = CString::new("").unwrap();
        cvt(unsafe {
            libc::fchownat(
                fdr,
                empty.as_ptr(),
                a.uid,
                a.gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|x| e("cannot chown", &shown, x))?;
        let ts = timespecs(a);
        if a.kind == Kind::Symlink {
            // Linux refuses user.* xattrs on symlinks and has no fsetxattr for O_PATH: the
            // remaining ones go through the name, in a directory only this process writes
            // (DEST's top level excepted: there a replaced name is detected above).
            for (n, v) in xattrs {
                set_xattr_at(dfd, &c, n, v, true)
                    .map_err(|x| e("cannot set xattr on", &shown, x))?;
            }
            cvt(unsafe {
                libc::utimensat(dfd, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
            })
            .map_err(|x| e("cannot set times of", &shown, x))?;
        } else {
            // A device or FIFO: through the descriptor's magic link, which is that inode.
            let p = proc_path(fdr);
            for (n, v) in xattrs {
                let nc = CString::new(n.clone()).map_err(|_| "xattr name with NUL".to_string())?;
                cvt(unsafe {
                    libc::setxattr(p.as_ptr(), nc.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                })
                .map_err(|x| e("cannot set xattr on", &shown, x))?;
            }
            cvt(unsafe { libc::chmod(p.as_ptr(), a.perm as libc::mode_t) })
                .map_err(|x| e("cannot chmod", &shown, x))?;
            cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) })
                .map_err(|x| e("cannot set times of", &shown, x))?;
        }
        self.remember_link(a, dfd, &c)
    }
}

/// Removes the entry `c` of `dfd`: unlinked, or if it is a directory, emptied through
/// descriptors opened beneath it (never following a symlink) and removed.
fn remove_entry(dfd: RawFd, c: &CString) -> io::Result<()> {
    if unsafe { libc::unlinkat(dfd, c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let x = last();
    if x.raw_os_error() != Some(libc::EISDIR) && x.raw_os_error() != Some(libc::EPERM) {
        return Err(x);
    }
    let dir = openat2(dfd, c, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let names = list_dir(&dir)?;
    for n in names {
        remove_entry(dir.as_raw_fd(), &n)?;
    }
    drop(dir);
    cvt(unsafe { libc::unlinkat(dfd, c.as_ptr(), libc::AT_REMOVEDIR) })?;
    Ok(())
}

/// The names in an open directory, without `.` and `..`.
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let dup = cvt(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    let d = unsafe { libc::fdopendir(dup) };
    if d.is_null() {
        let x = last();
        unsafe { libc::close(dup) };
        return Err(x);
    }
    let mut out = Vec::new();
    loop {
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    }
    unsafe { libc::closedir(d) };
    Ok(out)
}

fn set_xattr_at(dfd: RawFd, c: &CString, n: &[u8], v: &[u8], nofollow: bool) -> io::Result<()> {
    if nofollow && n.starts_with(b"user.") {
        return Ok(());
    }
    let p = CString::new(format!(
        "/proc/self/fd/{dfd}/{}",
        String::from_utf8_lossy(c.as_bytes())
    ))
    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let nc = CString::new(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    cvt(unsafe { libc::lsetxattr(p.as_ptr(), nc.as_ptr(), v.as_ptr().cast(), v.len(), 0) })?;
    Ok(())
}

/// Owner, xattrs (after chown, which clears security.capability and set-id bits), mode, times.
fn apply_fd(fd: RawFd, a: &Attr, xattrs: &[(Vec<u8>, Vec<u8>)], shown: &str) -> Result<(), String> {
    cvt(unsafe { libc::fchown(fd, a.uid, a.gid) }).map_err(|x| e("cannot chown", shown, x))?;
    for (n, v) in xattrs {
        let nc = CString::new(n.clone()).map_err(|_| "xattr name with NUL".to_string())?;
        cvt(unsafe { libc::fsetxattr(fd, nc.as_ptr(), v.as_ptr().cast(), v.len(), 0) }).map_err(
            |x| {
                e(
                    &format!("cannot set xattr {} on", String::from_utf8_lossy(n)),
                    shown,
                    x,
                )
            },
        )?;
    }
    cvt(unsafe { libc::fchmod(fd, a.perm as libc::mode_t) })
        .map_err(|x| e("cannot chmod", shown, x))?;
    let ts = timespecs(a);
    cvt(unsafe { libc::futimens(fd, ts.as_ptr()) })
        .map_err(|x| e("cannot set times of", shown, x))?;
    Ok(())
}

/// The data side of a file being written: holes are left where the source has none.
pub struct FileOut {
    fd: OwnedFd,
    shown: String,
}

impl FileOut {
    /// Writes `data` at `off`, skipping all-zero runs (they stay holes; `ftruncate` to the
    /// size at the end makes a trailing hole).
    pub fn write_at(&mut self, mut off: u64, data: &[u8]) -> Result<(), String> {
        const BLK: usize = 4096;
        let mut i = 0;
        while i < data.len() {
            let end = (i + BLK).min(data.len());
            let piece = &data[i..end];
            if piece.iter().any(|&b| b != 0) {
                let mut p = piece;
                let mut o = off;
                while !p.is_empty() {
                    let n = unsafe {
                        libc::pwrite(
                            self.fd.as_raw_fd(),
                            p.as_ptr().cast(),
                            p.len(),
                            o as libc::off_t,
                        )
                    };
                    if n < 0 {
                        let x = last();
                        if x.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e("cannot write", &self.shown, x));
                    }
                    p = &p[n as usize..];
                    o += n as u64;
                }
            }
            off += piece.len() as u64;
            i = end;
        }
        Ok(())
    }
}
