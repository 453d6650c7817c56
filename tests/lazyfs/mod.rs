//! A lazy filesystem for power-loss tests, in the manner of LazyFS (which Jepsen uses) and of
//! SQLite's crash VFS: a FUSE passthrough that forgets, on command, everything that was not
//! made durable.
//!
//! Every operation goes through to a real directory at once (`base/genN`), so reads see the
//! live state. Beside it the layer keeps what a power loss would leave:
//! - **file data**: an undo record for every write, truncate and fallocate that the file has
//!   not been fsynced (or fdatasynced) since; the old bytes it replaced and the old size;
//! - **directory entries**: for each directory, the entries it had when it was last fsynced
//!   (or when the layer started); entries made or removed since are not durable;
//! - unlinked files are moved to `base/graveN/` instead of being removed, so that an unlink
//!   which was never made durable can be undone.
//!
//! [`LazyFs::power_loss`] freezes the layer (every later operation fails with EIO), rolls each
//! file back to its last fsync, optionally re-applies a 512-byte-aligned prefix of the very
//! last unsynced write (a torn write), and builds `base/genN+1` from the durable directory
//! entries alone. Metadata other than names and sizes (modes, owners, times) is treated as
//! durable at once: snapfs does not depend on it.
//!
//! This is stricter than ext4 (which commits a new file's directory entry with its fsync):
//! whatever survives here survives on any POSIX filesystem that honours fsync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// One undo record: restore `old` at `off`, then truncate to `old_size`. A write, a
/// truncate and a fallocate all undo this way.
struct Undo {
    old_size: u64,
    off: u64,
    old: Vec<u8>,
}

struct Node {
    /// `O_PATH | O_NOFOLLOW`: names the inode whatever happens to its names.
    fd: OwnedFd,
    kind: FileType,
}

/// What the layer did, for the test's log.
#[derive(Default, Debug, Clone)]
pub struct Stats {
    pub writes: u64,
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub files_rolled_back: u64,
    pub bytes_rolled_back: u64,
    pub torn_bytes: u64,
    pub entries_lost: u64,
}

struct State {
    base: PathBuf,
    gen: u32,
    frozen: bool,
    grave: OwnedFd,
    nodes: HashMap<u64, Node>,
    /// The underlying inode number of every live inode, to its node.
    by_ino: HashMap<u64, u64>,
    next_id: u64,
    /// Unsynced changes per file node, oldest first.
    undo: HashMap<u64, Vec<Undo>>,
    /// The last unsynced write (node, offset, bytes), the candidate for a torn write.
    /// The last unsynced write of each file (offset, bytes): what a power loss may tear.
    last_write: BTreeMap<u64, (u64, Vec<u8>)>,
    /// Durable entries of each directory node.
    durable: HashMap<u64, BTreeMap<OsString, u64>>,
    handles: HashMap<u64, (u64, OwnedFd)>,
    dirs: HashMap<u64, Vec<(OsString, FileType)>>,
    next_fh: u64,
    stats: Stats,
}

type Res<T> = Result<T, Errno>;

fn errno() -> Errno {
    Errno::from(std::io::Error::last_os_error())
}

fn cstr(name: &OsStr) -> Res<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

fn check(r: libc::c_int) -> Res<libc::c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap()
}

fn open_path(dirfd: RawFd, name: &CString) -> Res<OwnedFd> {
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty = CString::new("").unwrap();
    check(unsafe {
        libc::fstatat(
            fd,
            empty.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn kind_of(mode: libc::mode_t) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFREG => FileType::RegularFile,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        _ => FileType::BlockDevice,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr(id: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn pread_all(fd: RawFd, off: u64, len: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                len - done,
                (off + done as u64) as i64,
            )
        };
        if n < 0 {
            return Err(errno());
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    buf.truncate(done);
    Ok(buf)
}

fn pwrite_all(fd: RawFd, off: u64, data: &[u8]) -> Res<()> {
    let mut done = 0;
    while done < data.len() {
        let n = unsafe {
            libc::pwrite(
                fd,
                data[done..].as_ptr().cast(),
                data.len() - done,
                (off + done as u64) as i64,
            )
        };
        if n <= 0 {
            return Err(errno());
        }
        done += n as usize;
    }
    Ok(())
}

fn list_dir(fd: RawFd) -> Res<Vec<(OsString, FileType)>> {
    let path = format!("/proc/self/fd/{fd}");
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).map_err(Errno::from)? {
        let e = e.map_err(Errno::from)?;
        let ft = e.file_type().map_err(Errno::from)?;
        let kind = if ft.is_dir() {
            FileType::Directory
        } else if ft.is_symlink() {
            FileType::Symlink
        } else if ft.is_file() {
            FileType::RegularFile
        } else {
            FileType::Socket
        };
        out.push((e.file_name(), kind));
    }
    Ok(out)
}

impl State {
    fn node(&self, id: u64) -> Res<&Node> {
        self.nodes.get(&id).ok_or(Errno::ESTALE)
    }

    fn fd(&self, id: u64) -> Res<RawFd> {
        Ok(self.node(id)?.fd.as_raw_fd())
    }

    /// The node of `name` in directory `parent` (registering it if new) and its stat.
    fn child(&mut self, parent: u64, name: &OsStr) -> Res<(u64, libc::stat)> {
        let pfd = self.fd(parent)?;
        let fd = open_path(pfd, &cstr(name)?)?;
        let st = fstat(fd.as_raw_fd())?;
        if let Some(&id) = self.by_ino.get(&st.st_ino) {
            return Ok((id, st));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_ino.insert(st.st_ino, id);
        self.nodes.insert(
            id,
            Node {
                fd,
                kind: kind_of(st.st_mode),
            },
        );
        Ok((id, st))
    }

    fn entries(&mut self, dir: u64) -> Res<BTreeMap<OsString, u64>> {
        let listing = list_dir(self.fd(dir)?)?;
        let mut m = BTreeMap::new();
        for (name, _) in listing {
            let (id, _) = self.child(dir, &name)?;
            m.insert(name, id);
        }
        Ok(m)
    }

    /// Registers the whole tree under `dir` as durable (the state the layer starts from).
    fn scan(&mut self, dir: u64) -> Res<()> {
        let m = self.entries(dir)?;
        for id in m.values() {
            if self.node(*id)?.kind == FileType::Directory {
                self.scan(*id)?;
            }
        }
        self.durable.insert(dir, m);
        Ok(())
    }

    /// Records an undo for a change to `[off, off+len)` of `id` (whose fd is `fd`).
    fn record(&mut self, id: u64, fd: RawFd, off: u64, len: u64) -> Res<()> {
        let size = fstat(fd)?.st_size as u64;
        let end = (off + len).min(size);
        let old = if end > off {
            // `fd` may be write-only: read the old bytes through a descriptor of our own.
            let r = self.open_node(id, libc::O_RDONLY)?;
            pread_all(r.as_raw_fd(), off, (end - off) as usize)?
        } else {
            Vec::new()
        };
        self.undo.entry(id).or_default().push(Undo {
            old_size: size,
            off,
            old,
        });
        Ok(())
    }

    fn truncate(&mut self, id: u64, size: u64) -> Res<()> {
        let fd = self.open_node(id, libc::O_RDWR)?;
        let cur = fstat(fd.as_raw_fd())?.st_size as u64;
        if cur == size {
            return Ok(());
        }
        self.record(id, fd.as_raw_fd(), size.min(cur), cur.abs_diff(size))?;
        check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) })?;
        Ok(())
    }

    fn open_node(&self, id: u64, flags: i32) -> Res<OwnedFd> {
        let p = proc_path(self.fd(id)?);
        let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
        check(fd)?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn synced(&mut self, id: u64) {
        self.undo.remove(&id);
        self.last_write.remove(&id);
    }

    /// Moves a non-directory whose last name is about to go into the graveyard, so that an
    /// unlink which never became durable can be undone.
    fn bury(&mut self, parent: u64, name: &OsStr) -> Res<bool> {
        let (id, st) = self.child(parent, name)?;
        if self.node(id)?.kind == FileType::Directory {
            return Ok(false);
        }
        if st.st_nlink > 1 {
            return Ok(false);
        }
        let to = CString::new(format!("{id}")).unwrap();
        check(unsafe {
            libc::renameat(
                self.fd(parent)?,
                cstr(name)?.as_ptr(),
                self.grave.as_raw_fd(),
                to.as_ptr(),
            )
        })?;
        Ok(true)
    }

    fn entry(&mut self, parent: u64, name: &OsStr) -> Res<FileAttr> {
        let (id, st) = self.child(parent, name)?;
        Ok(attr(id, &st))
    }

    fn fh(&mut self, id: u64, fd: OwnedFd) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, (id, fd));
        fh
    }

    fn handle(&self, fh: u64) -> Res<(u64, RawFd)> {
        self.handles
            .get(&fh)
            .map(|(id, fd)| (*id, fd.as_raw_fd()))
            .ok_or(Errno::EBADF)
    }
}

/// Handle to a mounted lazy filesystem.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
}

struct Fuse(Arc<Mutex<State>>);

impl LazyFs {
    /// Mounts a lazy layer at `mountpoint` over `base/gen{gen}`; all of it starts durable.
    pub fn mount(base: &Path, gen: u32, mountpoint: &Path) -> LazyFs {
        let root = base.join(format!("gen{gen}"));
        let grave = base.join(format!("grave{gen}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&grave).unwrap();
        // The previous generation's layer may still be attached (its unmount is lazy).
        let mp = CString::new(mountpoint.as_os_str().as_bytes()).unwrap();
        unsafe { libc::umount2(mp.as_ptr(), libc::MNT_DETACH) };
        std::fs::create_dir_all(mountpoint)
            .unwrap_or_else(|e| panic!("mountpoint {}: {e}", mountpoint.display()));
        let open = |p: &Path| {
            let c = CString::new(p.as_os_str().as_bytes()).unwrap();
            open_path(libc::AT_FDCWD, &c).unwrap()
        };
        let rootfd = open(&root);
        let st = fstat(rootfd.as_raw_fd()).unwrap();
        let mut s = State {
            base: base.to_path_buf(),
            gen,
            frozen: false,
            grave: open(&grave),
            nodes: HashMap::new(),
            by_ino: HashMap::new(),
            next_id: ROOT + 1,
            undo: HashMap::new(),
            last_write: BTreeMap::new(),
            durable: HashMap::new(),
            handles: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
            stats: Stats::default(),
        };
        s.by_ino.insert(st.st_ino, ROOT);
        s.nodes.insert(
            ROOT,
            Node {
                fd: rootfd,
                kind: FileType::Directory,
            },
        );
        s.scan(ROOT).unwrap();
        let state = Arc::new(Mutex::new(s));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lazyfs".into()),
            MountOption::Subtype("lazyfs".into()),
            MountOption::Dev,
            MountOption::Suid,
        ];
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(Fuse(state.clone()), mountpoint, &config)
            .unwrap_or_else(|e| panic!("cannot mount the lazy layer: {e}"));
        LazyFs {
            state,
            session: Some(session),
        }
    }

    /// Loses power: freezes the layer, rolls every file back to its last fsync (tearing the
    /// last unsynced write at a 512-byte boundary chosen by `tear`, if given), builds
    /// `base/gen{N+1}` from the durable directory entries, and unmounts. Returns N+1.
    pub fn power_loss(mut self, tear: Option<u64>) -> (u32, Stats) {
        let (gen, stats) = {
            let mut s = self.state.lock().unwrap();
            s.frozen = true;
            s.handles.clear();
            s.dirs.clear();
            let undo = std::mem::take(&mut s.undo);
            for (id, list) in &undo {
                let fd = s.open_node(*id, libc::O_RDWR).expect("open for rollback");
                s.stats.files_rolled_back += 1;
                let before = fstat(fd.as_raw_fd()).expect("stat for rollback").st_size as u64;
                for u in list.iter().rev() {
                    pwrite_all(fd.as_raw_fd(), u.off, &u.old).expect("rollback write");
                    check(unsafe { libc::ftruncate(fd.as_raw_fd(), u.old_size as i64) })
                        .expect("rollback truncate");
                    s.stats.bytes_rolled_back += u.old.len() as u64;
                }
                let after = fstat(fd.as_raw_fd()).expect("stat after rollback").st_size as u64;
                // Appended bytes that never reached the disk.
                s.stats.bytes_rolled_back += before.saturating_sub(after);
            }
            let last = std::mem::take(&mut s.last_write);
            let torn = tear.and_then(|r| {
                let n = last.len();
                (n > 0).then(|| (r, last.into_iter().nth((r % n as u64) as usize).unwrap()))
            });
            if let Some((r, (id, (off, data)))) = torn {
                // The disk kept the write up to a 512-byte sector boundary of the file (or
                // all of it): one of the boundaries inside the write, chosen by `r`.
                let end = off + data.len() as u64;
                let cuts: Vec<u64> = (off / 512 + 1..=end.div_ceil(512))
                    .map(|k| (k * 512).min(end))
                    .collect();
                let keep = (cuts[((r / 7) % cuts.len() as u64) as usize] - off) as usize;
                if keep > 0 {
                    let fd = s.open_node(id, libc::O_RDWR).expect("open for tear");
                    pwrite_all(fd.as_raw_fd(), off, &data[..keep]).expect("torn write");
                    s.stats.torn_bytes += keep as u64;
                }
            }
            let next = s.gen + 1;
            let root = s.base.join(format!("gen{next}"));
            std::fs::create_dir(&root).expect("create the next generation");
            let c = CString::new(root.as_os_str().as_bytes()).unwrap();
            let dirfd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            assert!(dirfd >= 0, "open {}", root.display());
            let dirfd = unsafe { OwnedFd::from_raw_fd(dirfd) };
            let mut seen = HashSet::new();
            rebuild(&mut s, ROOT, dirfd.as_raw_fd(), &mut seen).expect("rebuild");
            (next, s.stats.clone())
        };
        if let Some(session) = self.session.take() {
            drop(session);
        }
        (gen, stats)
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            drop(session);
        }
    }
}

/// Recreates directory `id`'s durable entries inside `to`.
fn rebuild(s: &mut State, id: u64, to: RawFd, seen: &mut HashSet<u64>) -> Res<()> {
    seen.insert(id);
    let entries = s.durable.get(&id).cloned().unwrap_or_default();
    // Entries made since the last fsync of this directory are lost.
    let live = list_dir(s.fd(id)?).map(|l| l.len()).unwrap_or(0);
    s.stats.entries_lost += live.saturating_sub(entries.len()) as u64;
    for (name, child) in entries {
        let c = cstr(&name)?;
        let (kind, fd) = {
            let n = s.node(child)?;
            (n.kind, n.fd.as_raw_fd())
        };
        let st = fstat(fd)?;
        match kind {
            FileType::Directory => {
                if !seen.insert(child) {
                    continue;
                }
                check(unsafe { libc::mkdirat(to, c.as_ptr(), st.st_mode & 0o7777) })?;
                let sub = unsafe {
                    libc::openat(
                        to,
                        c.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                check(sub)?;
                let sub = unsafe { OwnedFd::from_raw_fd(sub) };
                rebuild(s, child, sub.as_raw_fd(), seen)?;
            }
            FileType::RegularFile => {
                let empty = CString::new("").unwrap();
                check(unsafe {
                    libc::linkat(fd, empty.as_ptr(), to, c.as_ptr(), libc::AT_EMPTY_PATH)
                })?;
            }
            FileType::Symlink => {
                let mut buf = vec![0u8; 4096];
                let empty = CString::new("").unwrap();
                let n = unsafe {
                    libc::readlinkat(fd, empty.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                };
                let n = check(n as libc::c_int)? as usize;
                buf.truncate(n);
                let target = CString::new(buf).map_err(|_| Errno::EINVAL)?;
                check(unsafe { libc::symlinkat(target.as_ptr(), to, c.as_ptr()) })?;
            }
            _ => {
                check(unsafe { libc::mknodat(to, c.as_ptr(), st.st_mode, st.st_rdev) })?;
            }
        }
    }
    Ok(())
}

mod ops;
