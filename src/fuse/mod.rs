//! The `fuser` adapter: translate arguments, call the core, translate the answer.
//! All error mapping goes through `FsError::to_errno`.

pub mod views;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::error::FsError;
use crate::fs::{Creds, Fs, Handle, SetAttr, TimeSet, ROOT_INO};
use crate::fuse::views::Views;
use crate::storage::inode::{Attr, Kind, Time};

/// Attribute and entry cache lifetime granted to the kernel. Every operation that changes an
/// inode returns its fresh attributes, and the kernel invalidates what it changed itself.
const TTL: Duration = Duration::from_secs(1);
/// Largest write request the kernel may send (it also caps this at its max_pages).
pub const MAX_WRITE: u32 = 1 << 20;

/// An open file: the tree it belongs to and its core handle.
type OpenHandle = (Arc<Fs>, Arc<Handle>);
/// A directory listing taken at opendir: (FUSE inode, type, name).
type Listing = Vec<(u64, FileType, Vec<u8>)>;

pub struct FuseFs {
    /// The tree in slot 0: the live filesystem, or one snapshot for `mount --snapshot`.
    root: Arc<Fs>,
    views: Arc<Views>,
    /// Serve `/.snapshots` (live mounts), and list it in the root directory.
    snapdir: bool,
    list_snapdir: bool,
    store_dir: PathBuf,
    files: Mutex<HashMap<u64, OpenHandle>>,
    /// Handles opened by the snapshot's writeback barrier (`ops::writeback_barrier`).
    barrier_fhs: Mutex<std::collections::HashSet<u64>>,
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
}

impl FuseFs {
    pub fn new(root: Arc<Fs>, views: Arc<Views>, store_dir: &Path, list_snapdir: bool) -> FuseFs {
        FuseFs {
            snapdir: !root.is_view(),
            list_snapdir,
            root,
            views,
            store_dir: store_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            barrier_fhs: Mutex::new(std::collections::HashSet::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    fn handle(&self, fh: FileHandle) -> Result<OpenHandle, FsError> {
        self.files
            .lock()
            .get(&fh.0)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    fn register(&self, fs: Arc<Fs>, h: Handle) -> u64 {
        let fh = self.fh();
        self.files.lock().insert(fh, (fs, Arc::new(h)));
        fh
    }

    /// The filesystem and store inode behind a FUSE inode number.
    fn target(&self, ino: INodeNo) -> Result<(Arc<Fs>, u64, u16), FsError> {
        match views::split(ino.0) {
            (0, i) => Ok((self.root.clone(), i, 0)),
            (views::SNAPDIR_SLOT, _) => Err(FsError::IsDir),
            (slot, i) => Ok((self.views.view(slot)?, i, slot)),
        }
    }

    /// The filesystem for a change under `ino`: only the live tree of a live mount.
    fn writable(&self, ino: INodeNo) -> Result<(&Arc<Fs>, u64), FsError> {
        match views::split(ino.0) {
            (0, i) if !self.root.is_view() => Ok((&self.root, i)),
            _ => Err(FsError::ReadOnly),
        }
    }

    fn is_snapdir_name(&self, parent: INodeNo, name: &OsStr) -> bool {
        self.snapdir && parent.0 == ROOT_INO && name.as_bytes() == views::SNAPDIR_NAME
    }

    fn lookup_attr(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, FsError> {
        if self.is_snapdir_name(parent, name) {
            return Ok(attr(&self.views.snapdir_attr()?, views::SNAPDIR_SLOT));
        }
        if parent.0 == views::SNAPDIR_INO {
            let name = name.to_str().ok_or(FsError::NotFound)?;
            let slot = self.views.slot_of(name)?;
            let a = self.views.view(slot)?.getattr(ROOT_INO)?;
            return Ok(attr(&a, slot));
        }
        let (fs, ino, slot) = self.target(parent)?;
        Ok(attr(&fs.lookup(ino, name.as_bytes())?, slot))
    }

    fn dir_listing(&self, ino: INodeNo) -> Result<Listing, FsError> {
        if ino.0 == views::SNAPDIR_INO {
            let mut out = vec![
                (views::SNAPDIR_INO, FileType::Directory, b".".to_vec()),
                (ROOT_INO, FileType::Directory, b"..".to_vec()),
            ];
            // A pending snapshot appears once it is complete (a lookup of it waits for it).
            for s in self
                .root
                .snapshot_list()?
                .into_iter()
                .filter(|s| !s.pending)
            {
                let slot = self.views.slot_of(&s.name)?;
                out.push((
                    views::join(slot, ROOT_INO),
                    FileType::Directory,
                    s.name.into_bytes(),
                ));
            }
            return Ok(out);
        }
        let (fs, i, slot) = self.target(ino)?;
        let mut out: Vec<(u64, FileType, Vec<u8>)> = fs
            .readdir(i)?
            .into_iter()
            .map(|e| (views::join(slot, e.ino), kind(e.kind), e.name))
            .collect();
        if slot != 0 && i == ROOT_INO {
            out[1].0 = views::SNAPDIR_INO;
        }
        if self.snapdir && self.list_snapdir && ino.0 == ROOT_INO {
            out.push((
                views::SNAPDIR_INO,
                FileType::Directory,
                views::SNAPDIR_NAME.to_vec(),
            ));
        }
        Ok(out)
    }
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.to_errno())
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr, slot: u16) -> FileAttr {
    FileAttr {
        ino: INodeNo(views::join(slot, a.ino)),
        size: a.size,
        blocks: a.blocks(),
        atime: a.atime.to_system(),
        mtime: a.mtime.to_system(),
        ctime: a.ctime.to_system(),
        crtime: a.crtime.to_system(),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn creds(req: &Request) -> Creds {
    Creds {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(Time::from_system(s)),
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, FsError>) {
    reply_fattr(reply, r.map(|a| attr(&a, 0)))
}

fn reply_fattr(reply: ReplyEntry, r: Result<FileAttr, FsError>) {
    match r {
        // Names in `.snapshots` are never cached: a deleted snapshot vanishes at once.
        Ok(a) if a.ino.0 >> views::SLOT_SHIFT != 0 && a.ino.0 & views::INO_MASK == ROOT_INO => {
            reply.entry(&Duration::ZERO, &a, Generation(0))
        }
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: Result<Vec<u8>, FsError>) {
    match data {
        Err(e) => reply.error(errno(e)),
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(d) => reply.data(&d),
    }
}

/// Background requests (readahead) the kernel keeps in flight to the daemon; it stops reading
/// ahead once 3/4 of them are in flight. fuser's default, 16, is reached by four sequential
/// readers with four-chunk windows: 64 read 11% faster with four readers and no slower with one
/// (docs/benchmarks.md, "Reads verified by a checksum"). `SNAPFS_MAX_BACKGROUND` (environment of
/// `snapfs mount`, 1 to 1024) overrides it, for measuring. The kernel lowers both for a
/// daemon without CAP_SYS_ADMIN to its `max_user_bgreq` (about RAM / 3 MiB), far above 64.
const MAX_BACKGROUND: u16 = 64;

fn wants_write(flags: OpenFlags) -> bool {
    flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // SNAPFS_MAX_WRITE=BYTES: a smaller request size, for the kernel-option measurements
        // of docs/benchmarks.md only.
        let max_write = std::env::var("SNAPFS_MAX_WRITE")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&v| (4096..=MAX_WRITE).contains(&v))
            .unwrap_or(MAX_WRITE);
        if let Err(max) = config.set_max_write(max_write) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_readahead(MAX_WRITE);
        let bg = std::env::var("SNAPFS_MAX_BACKGROUND")
            .ok()
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|&v| (1..=1024).contains(&v))
            .unwrap_or(MAX_BACKGROUND);
        let _ = config.set_max_background(bg);
        let _ = config.set_congestion_threshold((bg * 3 / 4).max(1));
        // SNAPFS_WRITEBACK_CACHE=1: the kernel's writeback cache, for the same measurements
        // only. write(2) then returns once the bytes are in the page cache, so the daemon no
        // longer sees every acknowledged write before a snapshot (docs/benchmarks.md).
        if std::env::var_os("SNAPFS_WRITEBACK_CACHE").is_some_and(|v| v == "1") {
            match config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE) {
                Ok(()) => log::warn!(
                    "SNAPFS_WRITEBACK_CACHE=1: kernel writeback cache on (measurement only: \
                     snapshots may miss acknowledged writes)"
                ),
                Err(_) => log::warn!("SNAPFS_WRITEBACK_CACHE=1: the kernel does not offer it"),
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.root.sync_all() {
            log::error!("final sync failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_fattr(reply, self.lookup_attr(parent, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = if ino.0 == views::SNAPDIR_INO {
            self.views
                .snapdir_attr()
                .map(|a| attr(&a, views::SNAPDIR_SLOT))
        } else {
            self.target(ino)
                .and_then(|(fs, i, slot)| Ok(attr(&fs.getattr(i)?, slot)))
        };
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(Time::from_system),
        };
        match self.writable(ino).and_then(|(fs, i)| fs.setattr(i, s)) {
            Ok(a) => reply.attr(&TTL, &attr(&a, 0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.target(ino).and_then(|(fs, i, _)| fs.readlink(i)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        if self.is_snapdir_name(parent, name) {
            return reply.error(errno(FsError::Exists));
        }
        let r = self
            .writable(parent)
            .and_then(|(fs, p)| fs.mknod(p, name.as_bytes(), mode, rdev, creds(req)));
        reply_entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        if self.is_snapdir_name(parent, name) {
            return reply.error(errno(FsError::Exists));
        }
        let r = self
            .writable(parent)
            .and_then(|(fs, p)| fs.mkdir(p, name.as_bytes(), mode, creds(req)));
        reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .writable(parent)
            .and_then(|(fs, p)| fs.unlink(p, name.as_bytes()));
        reply_empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if self.is_snapdir_name(parent, name) {
            return reply.error(errno(FsError::ReadOnly));
        }
        let r = self
            .writable(parent)
            .and_then(|(fs, p)| fs.rmdir(p, name.as_bytes()));
        reply_empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        if self.is_snapdir_name(parent, link_name) {
            return reply.error(errno(FsError::Exists));
        }
        let r = self.writable(parent).and_then(|(fs, p)| {
            fs.symlink(
                p,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                creds(req),
            )
        });
        reply_entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if self.is_snapdir_name(parent, name) || self.is_snapdir_name(newparent, newname) {
            return reply.error(errno(FsError::ReadOnly));
        }
        let r = self.writable(parent).and_then(|(fs, p)| {
            let (_, np) = self.writable(newparent)?;
            fs.rename(p, name.as_bytes(), np, newname.as_bytes(), flags.bits())
        });
        reply_empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if self.is_snapdir_name(newparent, newname) {
            return reply.error(errno(FsError::Exists));
        }
        let r = self.writable(ino).and_then(|(fs, i)| {
            let (_, np) = self.writable(newparent)?;
            fs.link(i, np, newname.as_bytes())
        });
        reply_entry(reply, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.target(ino).and_then(|(fs, i, slot)| {
            if wants_write(flags) && slot != 0 {
                return Err(FsError::ReadOnly);
            }
            let rdwr = flags.acc_mode() == OpenAccMode::O_RDWR;
            let h = fs.open_with(i, wants_write(flags), rdwr)?;
            let fh = self.register(fs, h);
            if self.views.is_barrier_thread(u64::from(req.pid())) {
                self.barrier_fhs.lock().insert(fh);
            }
            Ok(fh)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
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
        match self
            .handle(fh)
            .and_then(|(fs, h)| fs.read(&h, offset, size))
        {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
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
            .handle(fh)
            .and_then(|(fs, h)| fs.write(&h, offset, data))
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.views.is_barrier_thread(u64::from(req.pid())) {
            // The close of the snapshot's writeback barrier (see fsync): the snapshot seals.
            return reply.ok();
        }
        reply_empty(reply, self.handle(fh).and_then(|(fs, h)| fs.flush(&h)));
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
        let h = self.files.lock().remove(&fh.0);
        let barrier = self.barrier_fhs.lock().remove(&fh.0);
        match h {
            // A handle of the snapshot's writeback barrier: sealing is the snapshot's job.
            Some((fs, h)) if barrier => reply_empty(reply, fs.release_unsealed(&h)),
            Some((fs, h)) => reply_empty(reply, fs.release(&h)),
            None => reply.error(errno(FsError::BadHandle)),
        }
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.views.is_barrier_thread(u64::from(req.pid())) {
            // The snapshot's writeback barrier: the kernel has written back the file's dirty
            // pages and waited for our answers before sending this; the snapshot seals.
            return reply.ok();
        }
        reply_empty(reply, self.handle(fh).and_then(|(fs, h)| fs.fsync(&h)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.dir_listing(ino) {
            Ok(entries) => {
                let fh = self.fh();
                self.dirs.lock().insert(fh, Arc::new(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.dirs.lock().get(&fh.0).cloned() else {
            return reply.error(errno(FsError::BadHandle));
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.root.sync_metadata());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match crate::sys::statvfs(&self.store_dir) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files.max(1 << 32),
                s.f_ffree.max(1 << 31),
                s.f_bsize as u32,
                crate::fs::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(_) => reply.error(errno(FsError::Io)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .writable(ino)
            .and_then(|(fs, i)| fs.setxattr(i, name.as_bytes(), value, flags));
        reply_empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // The synthetic `.snapshots` has no extended attributes.
        let r = if ino.0 == views::SNAPDIR_INO {
            Err(FsError::NoData)
        } else {
            self.target(ino)
                .and_then(|(fs, i, _)| fs.getxattr(i, name.as_bytes()))
        };
        reply_xattr(reply, size, r);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = if ino.0 == views::SNAPDIR_INO {
            Ok(Vec::new())
        } else {
            self.target(ino).and_then(|(fs, i, _)| fs.listxattr(i))
        };
        let list = names.map(|names| {
            let mut out = Vec::new();
            for n in names {
                out.extend_from_slice(&n);
                out.push(0);
            }
            out
        });
        reply_xattr(reply, size, list);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .writable(ino)
            .and_then(|(fs, i)| fs.removexattr(i, name.as_bytes()));
        reply_empty(reply, r);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only reached without default_permissions; the kernel checks modes otherwise.
        let r = if ino.0 == views::SNAPDIR_INO {
            Ok(())
        } else {
            self.target(ino)
                .and_then(|(fs, i, _)| fs.getattr(i).map(|_| ()))
        };
        reply_empty(reply, r);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if self.is_snapdir_name(parent, name) {
            return reply.error(errno(FsError::Exists));
        }
        let r = self.writable(parent).and_then(|(fs, p)| {
            let a = fs.mknod(
                p,
                name.as_bytes(),
                libc::S_IFREG | (mode & 0o7777),
                0,
                creds(req),
            )?;
            let rdwr = OpenFlags(flags).acc_mode() == OpenAccMode::O_RDWR;
            let h = fs.open_with(a.ino, wants_write(OpenFlags(flags)), rdwr)?;
            Ok((a, self.register(fs.clone(), h)))
        });
        match r {
            Ok((a, fh)) => reply.created(
                &TTL,
                &attr(&a, 0),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .handle(fh)
            .and_then(|(fs, h)| fs.fallocate(&h, offset, length, mode));
        reply_empty(reply, r);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = self.handle(fh_in).and_then(|(fs, src)| {
            let (dfs, dst) = self.handle(fh_out)?;
            if !Arc::ptr_eq(&fs, &dfs) {
                // Between a snapshot and the live tree: the kernel falls back to read/write.
                return Err(FsError::XDev);
            }
            fs.copy_range(&src, offset_in, &dst, offset_out, len.min(u32::MAX as u64))
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }
}
