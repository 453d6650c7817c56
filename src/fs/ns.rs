//! The namespace: lookups, directory entries, links, renames, attributes, xattrs.
//!
//! Every change is one `Txn` built and committed under `meta`. Permission checks are the
//! kernel's (the mount uses `default_permissions`); this module enforces the structural rules
//! (types, emptiness, loops, name limits) so that it is correct without a kernel too.

use crate::error::{FsError, Result};
use crate::storage::inode::{Attr, Kind, Time};
use crate::storage::keys::{self, Dirent};

use super::{check_name, Creds, Fs, MetaState, Txn, ROOT_INO};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Time),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Time>,
}

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;
const XATTR_SIZE_MAX: usize = 65536;

fn dirent_of(p: &[u8]) -> Result<Dirent> {
    Dirent::decode(p).ok_or_else(|| {
        log::error!("directory entry does not decode");
        FsError::Corrupt
    })
}

impl Fs {
    fn find(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>> {
        match self.get_rec(&keys::dirent_rec(parent, name))? {
            Some(p) => Ok(Some(dirent_of(&p)?)),
            None => Ok(None),
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > super::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let dir = self.stored_attr(parent)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let d = self.find(parent, name)?.ok_or(FsError::NotFound)?;
        self.getattr(d.ino)
    }

    /// Creates a regular file, fifo, socket or device node.
    pub fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, c: Creds) -> Result<Attr> {
        let kind = Kind::from_mode(mode).ok_or(FsError::Invalid)?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid);
        }
        self.create_node(parent, name, kind, mode, rdev, &[], c)
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, c: Creds) -> Result<Attr> {
        self.create_node(parent, name, Kind::Dir, mode, 0, &[], c)
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], c: Creds) -> Result<Attr> {
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() >= 4096 {
            return Err(FsError::NameTooLong);
        }
        self.create_node(parent, name, Kind::Symlink, 0o777, 0, target, c)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        parent: u64,
        name: &[u8],
        kind: Kind,
        mode: u32,
        rdev: u32,
        target: &[u8],
        c: Creds,
    ) -> Result<Attr> {
        check_name(name)?;
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        let mut dir = txn.attr(parent)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if dir.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if self.find(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        self.eng.admit_growth()?;
        let now = Time::now();
        let ino = txn.alloc_ino(&mut meta)?;
        let mut a = Attr::new(ino, kind, (mode & 0o7777) as u16, c.uid, c.gid, now);
        if dir.perm & libc::S_ISGID as u16 != 0 {
            // BSD group semantics in set-group-ID directories, as ext4 does.
            a.gid = dir.gid;
            if kind == Kind::Dir {
                a.perm |= libc::S_ISGID as u16;
            }
        }
        a.rdev = rdev;
        a.target = target.to_vec();
        a.size = target.len() as u64;
        if kind == Kind::Dir {
            a.parent = parent;
            dir.nlink += 1;
        }
        txn.put_rec(
            &keys::dirent_rec(parent, name),
            &Dirent {
                ino,
                kind: kind.to_byte(),
            }
            .encode(),
        )?;
        dir.mtime = now;
        dir.ctime = now;
        txn.put_attr(dir);
        txn.put_attr(a.clone());
        txn.commit(&mut meta, false)?;
        Ok(a)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        check_name(newname)?;
        self.eng.admit_growth()?;
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        let mut a = txn.attr(ino)?;
        if a.kind == Kind::Dir {
            return Err(FsError::Perm);
        }
        if a.nlink == 0 {
            return Err(FsError::NotFound);
        }
        let mut dir = txn.attr(newparent)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if self.find(newparent, newname)?.is_some() {
            return Err(FsError::Exists);
        }
        let now = Time::now();
        a.nlink += 1;
        a.ctime = now;
        dir.mtime = now;
        dir.ctime = now;
        txn.put_rec(
            &keys::dirent_rec(newparent, newname),
            &Dirent {
                ino,
                kind: a.kind.to_byte(),
            }
            .encode(),
        )?;
        txn.put_attr(dir);
        txn.put_attr(a);
        txn.commit(&mut meta, false)?;
        drop(meta);
        self.getattr(ino)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        if name == b"." {
            return Err(FsError::Invalid);
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], dir_wanted: bool) -> Result<()> {
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        let mut dir = txn.attr(parent)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let d = self.find(parent, name)?.ok_or(FsError::NotFound)?;
        let victim = txn.attr(d.ino)?;
        match (dir_wanted, victim.kind == Kind::Dir) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            (true, true) if !self.dir_is_empty(d.ino)? => return Err(FsError::NotEmpty),
            _ => {}
        }
        let now = Time::now();
        txn.del_rec(&keys::dirent_rec(parent, name))?;
        if victim.kind == Kind::Dir {
            dir.nlink -= 1;
        }
        dir.mtime = now;
        dir.ctime = now;
        txn.put_attr(dir);
        self.drop_link(&mut txn, victim, now)?;
        txn.commit(&mut meta, false)
    }

    /// Removes one name of an inode; deletes the inode when no name and no user is left.
    fn drop_link(&self, txn: &mut Txn<'_>, mut a: Attr, now: Time) -> Result<()> {
        a.nlink = if a.kind == Kind::Dir {
            0
        } else {
            a.nlink.saturating_sub(1)
        };
        a.ctime = now;
        if a.nlink > 0 {
            txn.put_attr(a);
        } else if a.kind != Kind::Dir && self.is_open(a.ino) {
            // Still open: keep the data until the last release; a crash before then leaves
            // an orphan marker that the next mount cleans.
            txn.set_orphan(a.ino);
            txn.put_attr(a);
        } else {
            txn.purge_inode(a.ino)?;
        }
        Ok(())
    }

    fn dir_is_empty(&self, ino: u64) -> Result<bool> {
        let p = keys::dirent_prefix(ino);
        Ok(self.scan_recs_from(&p, &p, 1)?.is_empty())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(FsError::Invalid);
        }
        check_name(newname)?;
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        for p in [parent, newparent] {
            if txn.attr(p)?.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
        }
        let src = self.find(parent, name)?.ok_or(FsError::NotFound)?;
        let dst = self.find(newparent, newname)?;
        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(FsError::NotFound)?;
            return self.exchange(
                txn,
                &mut meta,
                (parent, name, src),
                (newparent, newname, dst),
            );
        }
        if let Some(d) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(FsError::Exists);
            }
            if d.ino == src.ino {
                // Two names of one inode: POSIX says do nothing.
                return Ok(());
            }
        }
        let mut moved = txn.attr(src.ino)?;
        let is_dir = moved.kind == Kind::Dir;
        if is_dir && parent != newparent {
            self.check_not_ancestor(&txn, src.ino, newparent)?;
        }
        let now = Time::now();
        let mut replaced_dir = false;
        if let Some(d) = dst {
            let victim = txn.attr(d.ino)?;
            match (is_dir, victim.kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.dir_is_empty(d.ino)? => return Err(FsError::NotEmpty),
                _ => {}
            }
            replaced_dir = victim.kind == Kind::Dir;
            self.drop_link(&mut txn, victim, now)?;
        }
        txn.del_rec(&keys::dirent_rec(parent, name))?;
        txn.put_rec(
            &keys::dirent_rec(newparent, newname),
            &Dirent {
                ino: src.ino,
                kind: moved.kind.to_byte(),
            }
            .encode(),
        )?;
        let mut from = txn.attr(parent)?;
        from.mtime = now;
        from.ctime = now;
        if is_dir {
            from.nlink -= 1;
        }
        txn.put_attr(from);
        let mut to = txn.attr(newparent)?;
        to.mtime = now;
        to.ctime = now;
        if is_dir {
            to.nlink += 1;
        }
        if replaced_dir {
            to.nlink -= 1;
        }
        txn.put_attr(to);
        moved = txn.attr(src.ino)?;
        moved.ctime = now;
        if is_dir {
            moved.parent = newparent;
        }
        txn.put_attr(moved);
        txn.commit(&mut meta, false)
    }

    fn exchange(
        &self,
        mut txn: Txn<'_>,
        meta: &mut MetaState,
        (p1, n1, d1): (u64, &[u8], Dirent),
        (p2, n2, d2): (u64, &[u8], Dirent),
    ) -> Result<()> {
        let mut a1 = txn.attr(d1.ino)?;
        let mut a2 = txn.attr(d2.ino)?;
        if p1 != p2 {
            if a1.kind == Kind::Dir {
                self.check_not_ancestor(&txn, d1.ino, p2)?;
            }
            if a2.kind == Kind::Dir {
                self.check_not_ancestor(&txn, d2.ino, p1)?;
            }
        }
        let now = Time::now();
        txn.put_rec(&keys::dirent_rec(p1, n1), &d2.encode())?;
        txn.put_rec(&keys::dirent_rec(p2, n2), &d1.encode())?;
        let dirs = (a1.kind == Kind::Dir) as i64 - (a2.kind == Kind::Dir) as i64;
        if a1.kind == Kind::Dir {
            a1.parent = p2;
        }
        if a2.kind == Kind::Dir {
            a2.parent = p1;
        }
        a1.ctime = now;
        a2.ctime = now;
        txn.put_attr(a1);
        txn.put_attr(a2);
        let mut dp1 = txn.attr(p1)?;
        dp1.mtime = now;
        dp1.ctime = now;
        if p1 != p2 {
            dp1.nlink = (dp1.nlink as i64 - dirs) as u32;
        }
        txn.put_attr(dp1);
        let mut dp2 = txn.attr(p2)?;
        dp2.mtime = now;
        dp2.ctime = now;
        if p1 != p2 {
            dp2.nlink = (dp2.nlink as i64 + dirs) as u32;
        }
        txn.put_attr(dp2);
        txn.commit(meta, false)
    }

    /// EINVAL if `dir` is `ancestor` or lies below it.
    fn check_not_ancestor(&self, txn: &Txn<'_>, ancestor: u64, dir: u64) -> Result<()> {
        let mut cur = dir;
        loop {
            if cur == ancestor {
                return Err(FsError::Invalid);
            }
            if cur == ROOT_INO {
                return Ok(());
            }
            let next = txn.attr(cur)?.parent;
            if next == cur || next == 0 {
                return Ok(());
            }
            cur = next;
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let a = self.stored_attr(ino)?;
        if a.kind != Kind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(a.target)
    }

    /// All entries of a directory, with `.` and `..` first.
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let a = self.stored_attr(ino)?;
        if a.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: if a.parent == 0 { ino } else { a.parent },
                kind: Kind::Dir,
                name: b"..".to_vec(),
            },
        ];
        for (rec, p) in self.scan_recs(&keys::dirent_prefix(ino))? {
            let d = dirent_of(&p)?;
            out.push(DirEntry {
                ino: d.ino,
                kind: Kind::from_byte(d.kind).ok_or(FsError::Corrupt)?,
                name: keys::dirent_name(&rec).to_vec(),
            });
        }
        Ok(out)
    }

    pub fn setattr(&self, ino: u64, s: SetAttr) -> Result<Attr> {
        self.write_epoch()?;
        if let Some(size) = s.size {
            match self.stored_attr(ino)?.kind {
                Kind::File => self.truncate(ino, size)?,
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
        }
        let has_other = s.mode.is_some()
            || s.uid.is_some()
            || s.gid.is_some()
            || s.atime.is_some()
            || s.mtime.is_some()
            || s.ctime.is_some();
        if has_other {
            let file = if self.is_open(ino) {
                Some(self.acquire(ino)?)
            } else {
                None
            };
            // Pending write times are persisted first, so explicit times win over them.
            let sealed = match &file {
                Some(f) => self.seal_all(ino, f),
                None => Ok(()),
            };
            let r = sealed.and_then(|_| self.apply_attrs(ino, &s));
            if let Some(f) = file {
                self.unacquire(ino, &f)?;
            }
            r?;
        }
        self.getattr(ino)
    }

    fn apply_attrs(&self, ino: u64, s: &SetAttr) -> Result<()> {
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        let mut a = txn.attr(ino)?;
        let now = Time::now();
        if let Some(m) = s.mode {
            a.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = s.uid {
            a.uid = u;
        }
        if let Some(g) = s.gid {
            a.gid = g;
        }
        let resolve = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(t) => t,
        };
        if let Some(t) = s.atime {
            a.atime = resolve(t);
        }
        if let Some(t) = s.mtime {
            a.mtime = resolve(t);
        }
        a.ctime = s.ctime.unwrap_or(now);
        txn.put_attr(a);
        txn.commit(&mut meta, false)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        self.eng.admit_growth()?;
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        let mut a = txn.attr(ino)?;
        let rec = keys::xattr_rec(ino, name);
        let exists = self.get_rec(&rec)?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoData);
        }
        let mut v = Vec::with_capacity(1 + value.len());
        v.push(keys::TAG_LIVE);
        v.extend_from_slice(value);
        txn.put_rec(&rec, &v)?;
        a.ctime = Time::now();
        txn.put_attr(a);
        txn.commit(&mut meta, false)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        check_xattr_name(name)?;
        self.stored_attr(ino)?;
        self.get_rec(&keys::xattr_rec(ino, name))?
            .ok_or(FsError::NoData)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        self.stored_attr(ino)?;
        Ok(self
            .scan_recs(&keys::xattr_prefix(ino))?
            .into_iter()
            .map(|(rec, _)| keys::xattr_name(&rec).to_vec())
            .collect())
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        let mut a = txn.attr(ino)?;
        let rec = keys::xattr_rec(ino, name);
        if self.get_rec(&rec)?.is_none() {
            return Err(FsError::NoData);
        }
        txn.del_rec(&rec)?;
        a.ctime = Time::now();
        txn.put_attr(a);
        txn.commit(&mut meta, false)
    }
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.contains(&0) {
        return Err(FsError::Invalid);
    }
    if name.len() > 255 {
        return Err(FsError::Range);
    }
    // POSIX ACLs would need the kernel's FUSE_POSIX_ACL mode; refuse rather than store
    // ACLs that nothing enforces.
    if name.starts_with(b"system.posix_acl_") {
        return Err(FsError::Unsupported);
    }
    Ok(())
}
