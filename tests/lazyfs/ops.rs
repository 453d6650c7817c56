//! The FUSE operations of the lazy layer: each passes through to the generation's files and
//! records in `State` what a power loss would undo.

use super::*;

impl Fuse {
    fn lock(&self) -> Res<MutexGuard<'_, State>> {
        let s = self.0.lock().unwrap();
        if s.frozen {
            return Err(Errno::EIO);
        }
        Ok(s)
    }
}

macro_rules! tryr {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(e),
        }
    };
}

impl Filesystem for Fuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = tryr!(reply, self.lock());
        let a = tryr!(reply, s.entry(parent.0, name));
        reply.entry(&TTL, &a, Generation(0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = tryr!(reply, self.lock());
        let fd = tryr!(reply, s.fd(ino.0));
        let st = tryr!(reply, fstat(fd));
        reply.attr(&TTL, &attr(ino.0, &st));
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
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = tryr!(reply, self.lock());
        let id = ino.0;
        let fd = tryr!(reply, s.fd(id));
        let kind = tryr!(reply, s.node(id)).kind;
        if let Some(size) = size {
            tryr!(reply, s.truncate(id, size));
        }
        if let Some(m) = mode {
            if kind != FileType::Symlink {
                let p = proc_path(fd);
                tryr!(reply, check(unsafe { libc::chmod(p.as_ptr(), m & 0o7777) }));
            }
        }
        if uid.is_some() || gid.is_some() {
            let empty = CString::new("").unwrap();
            tryr!(
                reply,
                check(unsafe {
                    libc::fchownat(
                        fd,
                        empty.as_ptr(),
                        uid.unwrap_or(u32::MAX),
                        gid.unwrap_or(u32::MAX),
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })
            );
        }
        if (atime.is_some() || mtime.is_some()) && kind != FileType::Symlink {
            let ts = |t: Option<TimeOrNow>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    libc::timespec {
                        tv_sec: d.as_secs() as i64,
                        tv_nsec: d.subsec_nanos() as i64,
                    }
                }
            };
            let times = [ts(atime), ts(mtime)];
            let p = proc_path(fd);
            tryr!(
                reply,
                check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })
            );
        }
        let st = tryr!(reply, fstat(fd));
        reply.attr(&TTL, &attr(id, &st));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let s = tryr!(reply, self.lock());
        let fd = tryr!(reply, s.fd(ino.0));
        let mut buf = vec![0u8; 4096];
        let empty = CString::new("").unwrap();
        let n = unsafe { libc::readlinkat(fd, empty.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = tryr!(reply, check(n as libc::c_int));
        reply.data(&buf[..n as usize]);
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut s = tryr!(reply, self.lock());
        let pfd = tryr!(reply, s.fd(parent.0));
        let c = tryr!(reply, cstr(name));
        tryr!(
            reply,
            check(unsafe { libc::mknodat(pfd, c.as_ptr(), mode, rdev as libc::dev_t) })
        );
        let a = tryr!(reply, s.entry(parent.0, name));
        reply.entry(&TTL, &a, Generation(0));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = tryr!(reply, self.lock());
        let pfd = tryr!(reply, s.fd(parent.0));
        let c = tryr!(reply, cstr(name));
        tryr!(
            reply,
            check(unsafe { libc::mkdirat(pfd, c.as_ptr(), mode & 0o7777) })
        );
        let a = tryr!(reply, s.entry(parent.0, name));
        s.durable.insert(a.ino.0, BTreeMap::new());
        reply.entry(&TTL, &a, Generation(0));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = tryr!(reply, self.lock());
        if tryr!(reply, s.bury(parent.0, name)) {
            return reply.ok();
        }
        let pfd = tryr!(reply, s.fd(parent.0));
        let c = tryr!(reply, cstr(name));
        tryr!(reply, check(unsafe { libc::unlinkat(pfd, c.as_ptr(), 0) }));
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = tryr!(reply, self.lock());
        let (id, st) = tryr!(reply, s.child(parent.0, name));
        let pfd = tryr!(reply, s.fd(parent.0));
        let c = tryr!(reply, cstr(name));
        tryr!(
            reply,
            check(unsafe { libc::unlinkat(pfd, c.as_ptr(), libc::AT_REMOVEDIR) })
        );
        // The inode number is free for reuse; the node stays for the durable tree.
        if s.by_ino.get(&st.st_ino) == Some(&id) {
            s.by_ino.remove(&st.st_ino);
        }
        reply.ok();
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut s = tryr!(reply, self.lock());
        let pfd = tryr!(reply, s.fd(parent.0));
        let c = tryr!(reply, cstr(link_name));
        let t = tryr!(reply, cstr(target.as_os_str()));
        tryr!(
            reply,
            check(unsafe { libc::symlinkat(t.as_ptr(), pfd, c.as_ptr()) })
        );
        let a = tryr!(reply, s.entry(parent.0, link_name));
        reply.entry(&TTL, &a, Generation(0));
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
        let mut s = tryr!(reply, self.lock());
        let (src, _) = tryr!(reply, s.child(parent.0, name));
        let mut replaced_dir = None;
        if !flags.contains(RenameFlags::RENAME_EXCHANGE) {
            if let Ok((dst, st)) = s.child(newparent.0, newname) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return reply.error(Errno::EEXIST);
                }
                if dst != src {
                    if kind_of(st.st_mode) == FileType::Directory {
                        replaced_dir = Some((dst, st.st_ino));
                    } else if let Err(e) = s.bury(newparent.0, newname) {
                        return reply.error(e);
                    }
                }
            }
        }
        let pfd = tryr!(reply, s.fd(parent.0));
        let npfd = tryr!(reply, s.fd(newparent.0));
        let a = tryr!(reply, cstr(name));
        let b = tryr!(reply, cstr(newname));
        tryr!(
            reply,
            check(unsafe { libc::renameat2(pfd, a.as_ptr(), npfd, b.as_ptr(), flags.bits()) })
        );
        if let Some((id, ino)) = replaced_dir {
            if s.by_ino.get(&ino) == Some(&id) {
                s.by_ino.remove(&ino);
            }
        }
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = tryr!(reply, self.lock());
        let fd = tryr!(reply, s.fd(ino.0));
        let npfd = tryr!(reply, s.fd(newparent.0));
        let c = tryr!(reply, cstr(newname));
        let empty = CString::new("").unwrap();
        tryr!(
            reply,
            check(unsafe {
                libc::linkat(fd, empty.as_ptr(), npfd, c.as_ptr(), libc::AT_EMPTY_PATH)
            })
        );
        let a = tryr!(reply, s.entry(newparent.0, newname));
        reply.entry(&TTL, &a, Generation(0));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = tryr!(reply, self.lock());
        let f = flags.0;
        let clean = f & !(libc::O_APPEND
            | libc::O_TRUNC
            | libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOCTTY
            | libc::O_NOFOLLOW);
        if f & libc::O_TRUNC != 0 {
            tryr!(reply, s.truncate(ino.0, 0));
        }
        let fd = tryr!(reply, s.open_node(ino.0, clean));
        let fh = s.fh(ino.0, fd);
        reply.opened(FileHandle(fh), FopenFlags::empty());
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
        let s = tryr!(reply, self.lock());
        let (_, fd) = tryr!(reply, s.handle(fh.0));
        let data = tryr!(reply, pread_all(fd, offset, size as usize));
        reply.data(&data);
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
        let mut s = tryr!(reply, self.lock());
        let (id, fd) = tryr!(reply, s.handle(fh.0));
        tryr!(reply, s.record(id, fd, offset, data.len() as u64));
        tryr!(reply, pwrite_all(fd, offset, data));
        if !data.is_empty() {
            s.last_write.insert(id, (offset, data.to_vec()));
        }
        s.stats.writes += 1;
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
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
        let mut s = self.0.lock().unwrap();
        s.handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = tryr!(reply, self.lock());
        s.synced(ino.0);
        s.stats.fsyncs += 1;
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = tryr!(reply, self.lock());
        let fd = tryr!(reply, s.fd(ino.0));
        let list = tryr!(reply, list_dir(fd));
        let fh = s.next_fh;
        s.next_fh += 1;
        s.dirs.insert(fh, list);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = tryr!(reply, self.lock());
        let Some(list) = s.dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (name, kind)) in list.iter().enumerate().skip(offset as usize) {
            // The inode number in a listing is advisory; lookup gives the real one.
            if reply.add(
                INodeNo(ino.0 + 1_000_000 + i as u64),
                i as u64 + 1,
                *kind,
                name,
            ) {
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
        let mut s = self.0.lock().unwrap();
        s.dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = tryr!(reply, self.lock());
        let m = tryr!(reply, s.entries(ino.0));
        s.durable.insert(ino.0, m);
        s.stats.dir_fsyncs += 1;
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = tryr!(reply, self.lock());
        let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
        let p = proc_path(s.grave.as_raw_fd());
        tryr!(reply, check(unsafe { libc::statvfs(p.as_ptr(), &mut v) }));
        reply.statfs(
            v.f_blocks,
            v.f_bfree,
            v.f_bavail,
            v.f_files,
            v.f_ffree,
            v.f_bsize as u32,
            255,
            v.f_frsize as u32,
        );
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
        let mut s = tryr!(reply, self.lock());
        let pfd = tryr!(reply, s.fd(parent.0));
        let c = tryr!(reply, cstr(name));
        let existed = s.child(parent.0, name).ok().map(|(id, _)| id);
        if flags & libc::O_EXCL != 0 && existed.is_some() {
            return reply.error(Errno::EEXIST);
        }
        if let (Some(id), true) = (existed, flags & libc::O_TRUNC != 0) {
            tryr!(reply, s.truncate(id, 0));
        }
        let clean = flags
            & !(libc::O_APPEND | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
        let fd = unsafe {
            libc::openat(
                pfd,
                c.as_ptr(),
                clean | libc::O_CREAT | libc::O_CLOEXEC,
                mode & 0o7777,
            )
        };
        tryr!(reply, check(fd));
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let a = tryr!(reply, s.entry(parent.0, name));
        let fh = s.fh(a.ino.0, fd);
        reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty());
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
        let mut s = tryr!(reply, self.lock());
        let (id, fd) = tryr!(reply, s.handle(fh.0));
        tryr!(reply, s.record(id, fd, offset, length));
        tryr!(
            reply,
            check(unsafe { libc::fallocate(fd, mode, offset as i64, length as i64) })
        );
        reply.ok();
    }
}
