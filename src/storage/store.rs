//! A store directory: its lock, its engine, its superblock.
//!
//! ```text
//! STORE_DIR/       0700, owned by the user running snapfs (or root)
//!   snapfs.lock    0600; exclusive flock held by the one process that has the store open; its pid
//!   db/            0700; RocksDB (column families `meta` and `chunks`), files 0600
//!   control.sock   0600; the running daemon's control socket
//!   reserve        0600; space held back for a full disk (`storage::space`), released when
//!                  the disk fills and allocated again when space returns
//! ```
//!
//! Privacy (docs/design.md, "Security"): a new store directory is made 0700; a store others
//! can write, or owned by someone else, is refused; one only readable by others (0755, as
//! earlier snapfs versions made them) is tightened to 0700 and everything in it to owner-only.
//! Files RocksDB creates later are owner-only through the process umask (main sets 077).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fs::{Creds, Fs};
use crate::storage::engine::{Batch, Cf, Engine};
use crate::storage::keys::{self, le_u32};
use crate::storage::space::Space;

/// Version of the on-disk format this build writes and reads (docs/format.md).
/// 2: chunk bodies of format 2 (a `check` at the end; docs/format.md). Stores of version 1
/// are upgraded at open.
pub const FORMAT_VERSION: u32 = 2;
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
const MAGIC: &[u8; 8] = b"SNAPFS\0\0";

pub struct Store {
    pub dir: PathBuf,
    pub fs: Arc<Fs>,
    pub chunk_size: usize,
    pub space: Arc<Space>,
    _lock: File,
}

pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join("snapfs.lock")
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

fn is_store(dir: &Path) -> bool {
    dir.join("db").is_dir()
}

/// Takes the store's lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, String> {
    let path = lock_path(dir);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let locked = crate::sys::try_lock_exclusive(&f)
        .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    if !locked {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let who = match pid.trim() {
            "" => String::new(),
            p => format!(" (pid {p})"),
        };
        return Err(format!(
            "store {} is in use by another snapfs process{who}; unmount it first \
             (snapfs umount MOUNTPOINT) or stop that process",
            dir.display()
        ));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}

impl Store {
    /// Drops this handle and waits (up to `limit`) until the database is closed: every
    /// other holder of the filesystem or of its engine (threads, views) has let go. The
    /// store lock is released only then, so no other process opens a database this one
    /// still has open. Returns whether it closed in time (if not, the database is left
    /// open until the process exits, after whatever flush the caller did).
    pub fn close(self, limit: std::time::Duration) -> bool {
        let Store { fs, _lock, .. } = self;
        let engine = Arc::downgrade(&fs.eng);
        drop(fs);
        let end = std::time::Instant::now() + limit;
        while engine.strong_count() > 0 {
            if std::time::Instant::now() >= end {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(_lock);
        true
    }

    /// Opens (and with `create`, creates) the store in `dir`. `chunk_size` applies only to a
    /// new store; an existing store keeps the chunk size it was created with.
    pub fn open(dir: &Path, create: bool, chunk_size: Option<usize>) -> Result<Store, String> {
        let made = if dir.symlink_metadata().is_err() {
            if !create {
                return Err(format!("store {} does not exist", dir.display()));
            }
            make_store_dir(dir)?
        } else {
            false
        };
        if !dir.is_dir() {
            return Err(format!("store {} is not a directory", dir.display()));
        }
        // A symlink the caller named is followed here, once; from here on the resolved path
        // is used, and its last component must not turn into a symlink (O_NOFOLLOW).
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
        let (fd, mode) = check_access(&dir)?;
        let dir = dir.as_path();
        let fresh = !is_store(dir);
        if fresh {
            if !create {
                return Err(format!("{} is not a snapfs store (no db/)", dir.display()));
            }
            let foreign = std::fs::read_dir(dir)
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name() != "snapfs.lock");
            if foreign {
                return Err(format!(
                    "{} is not empty and is not a snapfs store; choose an empty or new directory",
                    dir.display()
                ));
            }
        }
        // Only now that it is known to be a store (or empty): never chmod a foreign directory.
        make_private(&fd, dir, mode, made)?;
        drop(fd);
        let dir = dir.to_path_buf();
        let lock = lock(&dir)?;
        let space = Space::new(&dir)
            .map_err(|e| format!("cannot measure the free space of {}: {e}", dir.display()))?;
        // A store on a full disk must still open, so that files can be deleted from it: the
        // reserve is released if the open finds no space.
        let low = space.free().is_ok_and(|f| space.is_low(f.free_bytes));
        let eng = match Engine::open(&dir.join("db")) {
            Err(e) if e.contains("No space left") && space.release_reserve() => {
                Engine::open(&dir.join("db"))?
            }
            r => r?,
        };
        if fresh {
            // RocksDB syncs the files in db/ and db/ itself, not the entry `db` in the store
            // directory (nor the store's own entry in its parent): without these a power loss
            // soon after the first mount could lose the whole store, fsynced data included.
            sync_dir(&dir)?;
            if made {
                if let Some(parent) = dir.parent() {
                    sync_dir(parent)?;
                }
            }
        }
        let chunk_size = match read_super(&eng)? {
            Some((cs, version)) if version < FORMAT_VERSION => {
                // Before anything else is written: an older build then refuses the store
                // rather than reading the new format's chunk bodies as corrupt. A store on a
                // nearly full disk must still open: the reserve makes room first (a failed
                // write would wedge the engine, so there is no retry after one).
                if low {
                    space.release_reserve();
                }
                write_super(&eng, cs)?;
                log::info!(
                    "store {} upgraded from format version {version} to {FORMAT_VERSION}",
                    dir.display()
                );
                cs
            }
            Some((cs, _)) => cs,
            None => {
                let cs = chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
                if !(4096..=(16 << 20)).contains(&cs) || !cs.is_power_of_two() {
                    return Err(format!(
                        "chunk size {cs} is not a power of two between 4 KiB and 16 MiB"
                    ));
                }
                write_super(&eng, cs)?;
                cs
            }
        };
        let creator = Creds {
            uid: crate::sys::getuid(),
            gid: crate::sys::getgid(),
        };
        let fs = Fs::new(eng, chunk_size, creator)
            .map_err(|e| format!("cannot open the filesystem in {}: {e}", dir.display()))?;
        let fs = Arc::new(fs);
        let space = Arc::new(space);
        fs.eng.attach_space(space.clone());
        // The floor holds from the start.
        fs.eng.set_low_space(low);
        fs.start_sealer();
        Ok(Store {
            dir,
            fs,
            chunk_size,
            space,
            _lock: lock,
        })
    }
}

/// fsync of a directory: makes the entries created in it durable.
fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync directory {}: {e}", dir.display()))
}

/// Creates a new store directory 0700 (missing parents with the process umask, which the
/// snapfs binary sets to 077). `make_private` then sets 0700 explicitly on its descriptor:
/// no umask can widen it, and one that takes the owner's own bits away cannot lock the
/// owner out. Returns false if someone else made it first (it is then checked like any
/// existing store).
fn make_store_dir(dir: &Path) -> Result<bool, String> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(format!("cannot create store {}: {e}", dir.display())),
    }
    Ok(true)
}

/// The most a mode may give anyone but the owner, for directories and files of a store.
const OTHERS: u32 = 0o077;

/// Checks who may reach the store in `dir`, on an O_NOFOLLOW descriptor of the directory
/// (fstat: nothing is resolved again by path). Refuses a directory that group or others can
/// write (they could have replaced any file in it, and could again) and one owned by another
/// user than the caller or root (root opening a user's store would write, as root, into
/// files that user controls). Returns the descriptor and the directory's mode.
fn check_access(dir: &Path) -> Result<(File, u32), String> {
    let shown = dir.display();
    let fd = crate::sys::open_dir_nofollow(dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => format!("store {shown} was replaced by a symlink; refusing to open"),
        _ => format!("cannot open store {shown}: {e}"),
    })?;
    let st = fd
        .metadata()
        .map_err(|e| format!("cannot stat store {shown}: {e}"))?;
    let me = crate::sys::geteuid();
    if st.uid() != me && st.uid() != 0 {
        return Err(format!(
            "store {shown} is owned by uid {}, not by you (uid {me}) or root; run snapfs as \
             its owner, or take it over: chown -R {me} {shown}",
            st.uid()
        ));
    }
    let mode = st.mode() & 0o7777;
    let writable_by = if mode & 0o002 != 0 {
        Some("others")
    } else if mode & 0o020 != 0 {
        Some("group")
    } else {
        None
    };
    if let Some(who) = writable_by {
        return Err(format!(
            "store {shown} is writable by {who} (mode {mode:o}), who could have replaced its \
             files; if you trust its contents, make it private and retry: chmod 700 {shown}"
        ));
    }
    Ok((fd, mode))
}

/// Tightens the store directory (open as `fd`, mode `mode`) to 0700 if others can read or
/// enter it, and everything in it to owner-only (fchmod on descriptors). `made`: created
/// just now by `make_store_dir`, so set to 0700 whatever the umask made of it.
fn make_private(fd: &File, dir: &Path, mode: u32, made: bool) -> Result<(), String> {
    let shown = dir.display();
    if mode & OTHERS != 0 || made {
        fd.set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make store {shown} private (chmod 700): {e}"))?;
        if !made {
            log::warn!(
                "store {shown} was open to other users (mode {mode:o}, as older snapfs \
                 versions made it): tightened to 0700"
            );
        }
    }
    let n = tighten_tree(fd, dir, 0)
        .map_err(|e| format!("cannot make the files of store {shown} private: {e}"))?;
    if n > 0 {
        log::warn!("store {shown}: tightened {n} files and directories to owner-only");
    }
    Ok(())
}

/// Takes group and other bits off every directory and regular file under `dir` (an open
/// directory), depth first, descriptor-relative, never following a symlink. A directory is
/// tightened before its entries are looked at, so that whoever held a descriptor of it from
/// before can no longer add entries. Returns how many it changed.
fn tighten_tree(dir: &File, path: &Path, depth: u32) -> std::io::Result<usize> {
    let mut changed = 0;
    for name in crate::sys::read_dir_fd(dir)? {
        let st = match crate::sys::fstatat_nofollow(dir, &name) {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let kind = st.st_mode & libc::S_IFMT;
        let is_dir = kind == libc::S_IFDIR;
        // RocksDB's directory is flat; anything deeper than this is not ours to walk.
        if !(is_dir && depth < 8) && kind != libc::S_IFREG {
            continue; // symlinks, sockets (a stale control.sock is 0600 anyway), fifos
        }
        let f = match crate::sys::openat_nofollow(dir, &name, is_dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.join(&name).display()),
                ))
            }
        };
        let m = f.metadata()?;
        if m.ino() != st.st_ino || m.dev() != st.st_dev {
            continue; // replaced meanwhile; only the owner can do that now
        }
        if m.mode() & OTHERS != 0 {
            let mode = m.mode() & 0o700;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            changed += 1;
        }
        if is_dir {
            changed += tighten_tree(&f, &path.join(&name), depth + 1)?;
        }
    }
    Ok(changed)
}

/// Superblock payload: magic, format version u32, chunk size u32 (LE).
/// Returns (chunk size, format version).
fn read_super(eng: &Engine) -> Result<Option<(usize, u32)>, String> {
    let Some(v) = eng
        .get(Cf::Meta, keys::SUPER_KEY)
        .map_err(|e| format!("cannot read the superblock: {e}"))?
    else {
        return Ok(None);
    };
    if v.len() < 16 || &v[..8] != MAGIC {
        return Err("the superblock is damaged (bad magic); refusing to open".into());
    }
    let version = le_u32(&v[8..]);
    if version > FORMAT_VERSION {
        return Err(format!(
            "this store has format version {version}, newer than this snapfs supports \
             ({FORMAT_VERSION}); upgrade snapfs"
        ));
    }
    let cs = le_u32(&v[12..]) as usize;
    if !(4096..=(16 << 20)).contains(&cs) || !cs.is_power_of_two() {
        return Err(format!(
            "the superblock is damaged (chunk size {cs}); refusing to open"
        ));
    }
    Ok(Some((cs, version)))
}

fn write_super(eng: &Engine, chunk_size: usize) -> Result<(), String> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    v.extend_from_slice(&(chunk_size as u32).to_le_bytes());
    let mut b = Batch::new();
    eng.put(&mut b, Cf::Meta, keys::SUPER_KEY, &v);
    eng.write(b, true)
        .map_err(|e| format!("cannot write the superblock: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_version(dir: &Path, version: u32) {
        let s = Store::open(dir, false, None).unwrap();
        let mut v = s.fs.eng.get(Cf::Meta, keys::SUPER_KEY).unwrap().unwrap();
        v[8..12].copy_from_slice(&version.to_le_bytes());
        let mut b = Batch::new();
        s.fs.eng.put(&mut b, Cf::Meta, keys::SUPER_KEY, &v);
        s.fs.eng.write(b, true).unwrap();
        s.fs.shutdown().unwrap();
    }

    fn version(dir: &Path) -> u32 {
        let s = Store::open(dir, false, None).unwrap();
        let v = s.fs.eng.get(Cf::Meta, keys::SUPER_KEY).unwrap().unwrap();
        le_u32(&v[8..])
    }

    /// A version 1 store is upgraded at open (so older builds refuse it afterwards instead
    /// of reading chunk format 2 as corrupt); a newer one is refused with both versions named.
    #[test]
    fn older_stores_are_upgraded_and_newer_ones_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("s");
        drop(Store::open(&dir, true, Some(64 * 1024)).unwrap());
        set_version(&dir, 1);
        assert_eq!(version(&dir), FORMAT_VERSION);
        set_version(&dir, FORMAT_VERSION + 1);
        let err = Store::open(&dir, false, None).err().expect("refused");
        assert!(err.contains("newer than this snapfs supports"), "{err}");
        assert!(err.contains(&format!("({FORMAT_VERSION})")), "{err}");
    }
}
