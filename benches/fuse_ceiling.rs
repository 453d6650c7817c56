//! The FUSE transport's own ceiling, for the kernel-option measurements of docs/benchmarks.md
//! (issue 9, item 3). Not part of snapfs: a flat directory of regular files mirrored 1:1 onto a
//! backing directory, with no chunking, hashing, compression or metadata store, served in one of
//! two ways:
//!
//! - `copy` (default): every READ and WRITE goes through this daemon, which answers it with
//!   pread/pwrite on the backing file. This is the best any FUSE filesystem can do that sees its
//!   data (snapfs must, to chunk and hash it): the kernel's copy into the request, the daemon's
//!   syscall, the reply.
//! - `--passthrough`: open and create answer with a kernel backing file (FUSE_PASSTHROUGH,
//!   Linux 6.9+, root only): reads and writes go from the kernel straight to the backing file and
//!   never reach the daemon. The ceiling of a design that stages written data in plain files.
//!
//! ```text
//! cargo bench --bench fuse_ceiling --no-run          # prints the binary's path
//! BIN BACKING_DIR MOUNTPOINT [--passthrough] [--threads N] [--writeback-cache]
//! ```
//!
//! It runs in the foreground until the mountpoint is unmounted (`fusermount3 -u` / `umount`).
//! `tools/bench.sh` starts it when `BENCH_CEILING=BIN` is set (sides `copy` and `passthrough`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

struct Node {
    name: OsString,
    /// Open handles and, with passthrough, the backing id they share (one per inode).
    opens: usize,
    backing: Option<Arc<BackingId>>,
}

#[derive(Default)]
struct State {
    by_name: HashMap<OsString, u64>,
    nodes: HashMap<u64, Node>,
    files: HashMap<u64, (u64, Arc<File>)>,
    next_ino: u64,
    next_fh: u64,
}

struct Ceiling {
    dir: PathBuf,
    passthrough: bool,
    writeback_cache: bool,
    st: Mutex<State>,
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn file_attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
    FileAttr {
        ino: INodeNo(ino),
        size: m.len(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: t(m.mtime(), m.mtime_nsec()),
        kind: if m.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Ceiling {
    fn path_of(&self, ino: u64) -> Option<PathBuf> {
        if ino == ROOT {
            return Some(self.dir.clone());
        }
        let st = self.st.lock();
        st.nodes.get(&ino).map(|n| self.dir.join(&n.name))
    }

    fn ino_for(&self, name: &OsStr) -> u64 {
        let mut st = self.st.lock();
        if let Some(&i) = st.by_name.get(name) {
            return i;
        }
        st.next_ino += 1;
        let ino = st.next_ino;
        st.by_name.insert(name.to_owned(), ino);
        st.nodes.insert(
            ino,
            Node {
                name: name.to_owned(),
                opens: 0,
                backing: None,
            },
        );
        ino
    }

    fn attr_of(&self, ino: u64) -> Result<FileAttr, Errno> {
        let p = self.path_of(ino).ok_or(Errno::ENOENT)?;
        std::fs::metadata(p)
            .map(|m| file_attr(ino, &m))
            .map_err(|e| errno(&e))
    }

    /// Registers an open handle; with passthrough, the inode's backing id (created on first open).
    fn register(
        &self,
        ino: u64,
        f: File,
        open_backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Result<(u64, Option<Arc<BackingId>>), Errno> {
        let f = Arc::new(f);
        let mut st = self.st.lock();
        let backing = if self.passthrough {
            let node = st.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
            if node.backing.is_none() {
                node.backing = Some(Arc::new(open_backing(&f).map_err(|e| errno(&e))?));
            }
            node.backing.clone()
        } else {
            None
        };
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.opens += 1;
        }
        st.next_fh += 1;
        let fh = st.next_fh;
        st.files.insert(fh, (ino, f));
        Ok((fh, backing))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        let st = self.st.lock();
        st.files
            .get(&fh.0)
            .map(|(_, f)| f.clone())
            .ok_or(Errno::EBADF)
    }

    fn open_flags(flags: i32) -> OpenOptions {
        let mut o = OpenOptions::new();
        let acc = flags & libc::O_ACCMODE;
        o.read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
            .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
            .custom_flags(flags & (libc::O_APPEND | libc::O_TRUNC));
        o
    }
}

impl fuser::Filesystem for Ceiling {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_readahead(1 << 20);
        if self.passthrough {
            config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .map_err(|_| std::io::Error::other("the kernel does not offer FUSE_PASSTHROUGH"))?;
            config
                .set_max_stack_depth(1)
                .map_err(|_| std::io::Error::other("max_stack_depth 1 refused"))?;
        }
        if self.writeback_cache {
            config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .map_err(|_| std::io::Error::other("the kernel does not offer writeback cache"))?;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match std::fs::symlink_metadata(self.dir.join(name)) {
            Ok(m) if m.is_file() => {
                let ino = self.ino_for(name);
                reply.entry(&TTL, &file_attr(ino, &m), Generation(0))
            }
            Ok(_) => reply.error(Errno::EPERM),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let (Some(size), Some(p)) = (size, self.path_of(ino.0)) {
            let r = OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|f| f.set_len(size));
            if let Err(e) = r {
                return reply.error(errno(&e));
            }
        }
        match self.attr_of(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let mut o = Self::open_flags(flags);
        o.create(true).mode(mode & 0o7777);
        if self.writeback_cache {
            o.read(true); // the kernel reads pages around partial writes
        }
        let f = match o.open(self.dir.join(name)) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        let m = match f.metadata() {
            Ok(m) => m,
            Err(e) => return reply.error(errno(&e)),
        };
        let ino = self.ino_for(name);
        match self.register(ino, f, |f| reply.open_backing(f)) {
            Ok((fh, Some(b))) => reply.created_passthrough(
                &TTL,
                &file_attr(ino, &m),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &b,
            ),
            Ok((fh, None)) => reply.created(
                &TTL,
                &file_attr(ino, &m),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(p) = self.path_of(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut o = Self::open_flags(flags.0);
        if self.writeback_cache {
            o.read(true);
        }
        let f = match o.open(p) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        match self.register(ino.0, f, |f| reply.open_backing(f)) {
            Ok((fh, Some(b))) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b),
            Ok((fh, None)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match f.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..n])
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .file(fh)
            .and_then(|f| f.write_all_at(data, offset).map_err(|e| errno(&e)))
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: LockOwner, r: ReplyEmpty) {
        r.ok()
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, r: ReplyEmpty) {
        match self.file(fh) {
            Ok(f) => match if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            } {
                Ok(()) => r.ok(),
                Err(e) => r.error(errno(&e)),
            },
            Err(e) => r.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st.lock();
        if let Some((ino, _)) = st.files.remove(&fh.0) {
            if let Some(n) = st.nodes.get_mut(&ino) {
                n.opens -= 1;
                if n.opens == 0 {
                    n.backing = None; // closes the kernel's backing id
                }
            }
        }
        reply.ok()
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => {
                let mut st = self.st.lock();
                if let Some(ino) = st.by_name.remove(name) {
                    if st.nodes.get(&ino).is_some_and(|n| n.opens == 0) {
                        st.nodes.remove(&ino);
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut names: Vec<OsString> = match std::fs::read_dir(&self.dir) {
            Ok(d) => d.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) => return reply.error(errno(&e)),
        };
        names.sort();
        let mut entries = vec![
            (ROOT, FileType::Directory, OsString::from(".")),
            (ROOT, FileType::Directory, OsString::from("..")),
        ];
        for n in names {
            let ino = self.ino_for(&n);
            entries.push((ino, FileType::RegularFile, n));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }
}

fn main() {
    let mut pos = Vec::new();
    let (mut passthrough, mut writeback_cache, mut threads) = (false, false, 2usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--passthrough" => passthrough = true,
            "--writeback-cache" => writeback_cache = true,
            "--threads" => {
                threads = match args.next().and_then(|v| v.parse().ok()) {
                    Some(n) if n > 0 => n,
                    _ => {
                        eprintln!("fuse_ceiling: --threads needs a positive number");
                        std::process::exit(2);
                    }
                }
            }
            _ => pos.push(PathBuf::from(a)),
        }
    }
    let [dir, mnt] = match <[PathBuf; 2]>::try_from(pos) {
        Ok(p) => p,
        Err(_) => {
            eprintln!(
                "usage: fuse_ceiling BACKING_DIR MOUNTPOINT [--passthrough] [--writeback-cache] \
                 [--threads N]"
            );
            std::process::exit(2);
        }
    };
    let fs = Ceiling {
        dir,
        passthrough,
        writeback_cache,
        st: Mutex::new(State {
            next_ino: ROOT,
            ..State::default()
        }),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("fuse_ceiling".into()),
        MountOption::NoAtime,
    ];
    config.n_threads = Some(threads);
    config.clone_fd = true;
    if let Err(e) = fuser::mount(fs, &mnt, &config) {
        eprintln!("fuse_ceiling: mount {}: {e}", mnt.display());
        std::process::exit(1);
    }
}
