//! `dir:/ABS/PATH`: objects are files under a root directory, at their name's path.
//!
//! Guarantees of `put` when it returns Ok: the bytes were written to a new temporary file
//! in the object's directory (`.tmp.<pid>.<n>`, O_EXCL, mode 0600), fsynced, renamed over
//! the object's name, and the directory fsynced; directories created on the way (mode
//! 0700) were fsynced into their parents. A reader sees the old object or the new one,
//! never a part; after a crash the object is there whole (or, if `put` had not returned,
//! the old one is, plus maybe a stale temporary file that `list` never shows and that the
//! replicator's sweep deletes once it is a day old).
//!
//! The root is the operator's path and is opened as given; everything inside it is walked
//! one component at a time with `openat(O_NOFOLLOW)`, so a symlink planted inside the root
//! is never followed, on reads, writes or listings: it is refused (a `Permanent` error), or
//! replaced itself when it is an object's own name and that object is put.
//!
//! A missing root, or one that is not a directory, is a `Transient` error (a backup disk
//! that is not mounted yet), and so are EIO, ENOSPC, EACCES, EROFS and the like: the
//! directory may come back. The backend never creates its root by itself: see
//! [`DirBackend::create_root`].

use super::{check_name, keep_listed, split_prefix, Backend, BackendError, MAX_NAME, TMP_PREFIX};
use crate::sys;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Makes temporary file names unique within this process (the pid tells processes apart).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Age after which a listing deletes a temporary file: a day.
const STALE_TEMP_SECS: i64 = 24 * 3600;

pub struct DirBackend {
    root: PathBuf,
    /// Whether object bytes still go around the page cache (`direct.rs`).
    direct: AtomicBool,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// The default mapping of an io error: Permanent for errors that name a problem with the
/// name or the tree's shape, Transient for everything else (the directory may come back).
fn map_io(what: &str, e: io::Error) -> BackendError {
    match errno(&e) {
        libc::ENOENT => BackendError::NotFound,
        libc::ELOOP => BackendError::Permanent(format!("{what}: a symlink, not followed")),
        libc::ENAMETOOLONG | libc::EINVAL | libc::EISDIR | libc::ENOTDIR | libc::EEXIST => {
            BackendError::Permanent(format!("{what}: {e}"))
        }
        _ => BackendError::Transient(format!("{what}: {e}")),
    }
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl DirBackend {
    /// A backend rooted at `root`, which must be absolute. Touches nothing on disk.
    pub fn new(root: &Path) -> Result<Self, String> {
        if !root.is_absolute() {
            return Err(format!("dir: needs an absolute path, not {:?}", root));
        }
        Ok(DirBackend {
            root: root.to_path_buf(),
            direct: AtomicBool::new(true),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the root and its missing parents (mode 0700), for `backend add`: the
    /// backend's operations never create it, so that an unmounted disk is an error rather
    /// than a new, empty directory on the wrong filesystem.
    pub fn create_root(&self) -> Result<(), BackendError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| BackendError::Transient(format!("creating {}: {e}", self.root.display())))
    }

    fn open_root(&self) -> Result<File, BackendError> {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.root)
            .map_err(|e| {
                BackendError::Transient(format!(
                    "backend directory {} is not usable: {e}",
                    self.root.display()
                ))
            })
    }

    /// The directory holding `name` (which has passed `check_name`) and its last component.
    /// Without `create`, `None` when a directory on the way is missing or is a file (then
    /// there is no such object). With `create`, missing directories are made (0700) and
    /// fsynced into their parents. A symlink on the way is a Permanent error either way.
    fn parent_of<'n>(
        &self,
        name: &'n str,
        create: bool,
    ) -> Result<Option<(File, &'n str)>, BackendError> {
        let mut dir = self.open_root()?;
        let mut comps: Vec<&str> = name.split('/').collect();
        let last = comps.pop().expect("split yields at least one piece");
        for (i, comp) in comps.iter().enumerate() {
            let path = comps[..=i].join("/");
            let next = match sys::openat_nofollow(&dir, os(comp), true) {
                Ok(f) => f,
                Err(e) if errno(&e) == libc::ENOENT && create => {
                    match sys::mkdirat(&dir, os(comp), 0o700) {
                        Ok(()) => dir.sync_all().map_err(|e| map_io(&path, e))?,
                        Err(e) if errno(&e) == libc::EEXIST => {} // made by a concurrent put
                        Err(e) => return Err(map_io(&format!("creating directory {path}"), e)),
                    }
                    sys::openat_nofollow(&dir, os(comp), true).map_err(|e| map_io(&path, e))?
                }
                Err(e) if !create && matches!(errno(&e), libc::ENOENT | libc::ENOTDIR) => {
                    // ENOTDIR is also what O_DIRECTORY|O_NOFOLLOW gives for a symlink: tell.
                    if self.is_symlink(&dir, comp) {
                        return Err(symlink_refused(&path));
                    }
                    return Ok(None);
                }
                Err(e) if errno(&e) == libc::ENOTDIR && self.is_symlink(&dir, comp) => {
                    return Err(symlink_refused(&path));
                }
                Err(e) => return Err(map_io(&path, e)),
            };
            dir = next;
        }
        Ok(Some((dir, last)))
    }

    fn is_symlink(&self, dir: &File, comp: &str) -> bool {
        sys::fstatat_nofollow(dir, os(comp))
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
            .unwrap_or(false)
    }

    /// Writes `parts`, one after the other, to a new temporary file in `dir`, fsynced;
    /// returns its name.
    fn write_temp(&self, dir: &File, name: &str, parts: &[&[u8]]) -> Result<String, BackendError> {
        let pid = std::process::id();
        for _ in 0..100 {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = format!("{TMP_PREFIX}{pid}.{n}");
            let mut f = match sys::openat_create_excl(dir, os(&tmp), 0o600) {
                Ok(f) => f,
                Err(e) if errno(&e) == libc::EEXIST => continue, // left by a dead process
                Err(e) => return Err(map_io(&format!("creating a temporary file for {name}"), e)),
            };
            let written =
                super::direct::write_parts(&mut f, parts, &self.direct).and_then(|()| f.sync_all());
            if let Err(e) = written {
                let _ = sys::unlinkat(dir, os(&tmp));
                return Err(map_io(&format!("writing {name}"), e));
            }
            return Ok(tmp);
        }
        Err(BackendError::Transient(format!(
            "no free temporary file name for {name}"
        )))
    }

    /// A temporary file older than [`STALE_TEMP_SECS`] is left by a put that never finished
    /// (the process was killed between its create and its rename): the replicator's sweep
    /// (`sweep_temporaries`) deletes it, so that kill -9 mid-upload leaks no space for long. No put takes that long (a chunk is
    /// at most a few MiB).
    fn sweep_stale_temp(&self, dir: &File, rel: &str, n: &str) -> bool {
        let Ok(st) = sys::fstatat_nofollow(dir, os(n)) else {
            return false;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || now.saturating_sub(st.st_mtime) < STALE_TEMP_SECS
        {
            return false;
        }
        match sys::unlinkat(dir, os(n)) {
            Ok(()) => {
                log::info!(
                    "{}: deleted {rel}/{n}, a temporary file an interrupted upload left",
                    self.describe()
                );
                true
            }
            Err(e) => {
                log::debug!("{}: cannot delete {rel}/{n}: {e}", self.describe());
                false
            }
        }
    }

    fn collect(
        &self,
        dir: &File,
        rel: &str,
        out: &mut Vec<String>,
        prefix: &str,
    ) -> Result<(), BackendError> {
        let names = sys::read_dir_fd(dir).map_err(|e| map_io(&format!("listing {rel:?}"), e))?;
        for n in names {
            let Some(n) = n.to_str() else {
                log::warn!("{}: skipping a non-UTF-8 name in {rel:?}", self.describe());
                continue;
            };
            if n.starts_with(TMP_PREFIX) {
                continue;
            }
            let full = if rel.is_empty() {
                n.to_string()
            } else {
                format!("{rel}/{n}")
            };
            // The walk starts in the prefix's directory part: below it everything matches.
            if !full.starts_with(prefix) {
                continue;
            }
            if full.len() > MAX_NAME {
                log::warn!("{}: skipping {full:?}: name too long", self.describe());
                continue;
            }
            let st = match sys::fstatat_nofollow(dir, os(n)) {
                Ok(st) => st,
                Err(e) if errno(&e) == libc::ENOENT => continue, // deleted meanwhile
                Err(e) => return Err(map_io(&full, e)),
            };
            match st.st_mode & libc::S_IFMT {
                libc::S_IFREG => {
                    if keep_listed(&self.describe(), &full, prefix) {
                        out.push(full);
                    }
                }
                libc::S_IFDIR => {
                    if let Err(e) = check_name(&full) {
                        log::warn!("{}: skipping a directory: {e}", self.describe());
                        continue;
                    }
                    let sub = match sys::openat_nofollow(dir, os(n), true) {
                        Ok(f) => f,
                        Err(e) if matches!(errno(&e), libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => continue,
                        Err(e) => return Err(map_io(&full, e)),
                    };
                    self.collect(&sub, &full, out, prefix)?;
                }
                _ => log::warn!(
                    "{}: skipping {full:?}: not a regular file or directory (a symlink is never followed)",
                    self.describe()
                ),
            }
        }
        Ok(())
    }
}

fn symlink_refused(path: &str) -> BackendError {
    BackendError::Permanent(format!(
        "{path} is a symlink inside the backend directory; not followed"
    ))
}

impl Backend for DirBackend {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.put_parts(name, &[data])
    }

    fn put_parts(&self, name: &str, parts: &[&[u8]]) -> Result<(), BackendError> {
        check_name(name)?;
        let (dir, last) = self
            .parent_of(name, true)?
            .expect("create never yields None");
        let tmp = self.write_temp(&dir, name, parts)?;
        if let Err(e) = sys::renameat(&dir, os(&tmp), os(last)) {
            let _ = sys::unlinkat(&dir, os(&tmp));
            return Err(match errno(&e) {
                libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST => {
                    BackendError::Permanent(format!("{name} is a directory in the backend"))
                }
                _ => map_io(&format!("renaming into {name}"), e),
            });
        }
        dir.sync_all()
            .map_err(|e| map_io(&format!("fsync of the directory of {name}"), e))
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        check_name(name)?;
        let Some((dir, last)) = self.parent_of(name, false)? else {
            return Err(BackendError::NotFound);
        };
        let mut f = sys::openat_nofollow(&dir, os(last), false).map_err(|e| map_io(name, e))?;
        let md = f.metadata().map_err(|e| map_io(name, e))?;
        if md.is_dir() {
            return Err(BackendError::NotFound);
        }
        if !md.is_file() {
            return Err(BackendError::Permanent(format!(
                "{name} is not a regular file"
            )));
        }
        let mut buf = Vec::with_capacity(md.len() as usize);
        f.read_to_end(&mut buf).map_err(|e| map_io(name, e))?;
        Ok(buf)
    }

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        check_name(name)?;
        let Some((dir, last)) = self.parent_of(name, false)? else {
            return Ok(false);
        };
        match sys::fstatat_nofollow(&dir, os(last)) {
            Ok(st) => match st.st_mode & libc::S_IFMT {
                libc::S_IFREG => Ok(true),
                libc::S_IFDIR => Ok(false),
                _ => {
                    // A symlink or special file: not an object. A put replaces the entry.
                    log::warn!("{}: {name} is not a regular file", self.describe());
                    Ok(false)
                }
            },
            Err(e) if errno(&e) == libc::ENOENT => Ok(false),
            Err(e) => Err(map_io(name, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let (dir_part, _) = split_prefix(prefix)?;
        let mut out = Vec::new();
        if dir_part.is_empty() {
            let root = self.open_root()?;
            self.collect(&root, "", &mut out, prefix)?;
        } else {
            // parent_of walks to the directory holding `dir_part`'s last component.
            let Some((parent, last)) = self.parent_of(dir_part, false)? else {
                return Ok(out);
            };
            let dir = match sys::openat_nofollow(&parent, os(last), true) {
                Ok(d) => d,
                Err(e) if matches!(errno(&e), libc::ENOENT | libc::ENOTDIR) => {
                    if self.is_symlink(&parent, last) {
                        return Err(symlink_refused(dir_part));
                    }
                    return Ok(out);
                }
                Err(e) => return Err(map_io(dir_part, e)),
            };
            self.collect(&dir, dir_part, &mut out, prefix)?;
        }
        Ok(out)
    }

    fn sweep_temporaries(&self, dirs: &[String]) -> u64 {
        let mut swept = 0;
        for d in dirs {
            // Only the names are read; only temporary files are looked at more closely.
            let dir = if d.is_empty() {
                self.open_root().ok()
            } else {
                // The directory `d` is the parent of any name inside it (walked with the
                // same no-symlink rules as every access).
                self.parent_of(&format!("{d}/x"), false)
                    .ok()
                    .flatten()
                    .map(|(f, _)| f)
            };
            let Some(dir) = dir else { continue };
            let Ok(names) = sys::read_dir_fd(&dir) else {
                continue;
            };
            for n in names {
                if let Some(n) = n.to_str().filter(|n| n.starts_with(TMP_PREFIX)) {
                    swept += self.sweep_stale_temp(&dir, d, n) as u64;
                }
            }
        }
        swept
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        check_name(name)?;
        let Some((dir, last)) = self.parent_of(name, false)? else {
            return Ok(());
        };
        match sys::unlinkat(&dir, os(last)) {
            Ok(()) => dir
                .sync_all()
                .map_err(|e| map_io(&format!("fsync after deleting {name}"), e)),
            Err(e) if matches!(errno(&e), libc::ENOENT | libc::EISDIR) => Ok(()),
            Err(e) => Err(map_io(&format!("deleting {name}"), e)),
        }
    }
}

#[cfg(test)]
#[path = "dir_tests.rs"]
mod tests;
