//! Export of a snapshot (or a subtree of it) to a plain directory, through the core API:
//! modes, owners, times, symlinks, hard links, special files and xattrs are preserved.
//! Names come from the store, where they cannot contain `/` and are never `.` or `..`, so
//! every created path stays below the destination.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use crate::fs::{Fs, ROOT_INO};
use crate::inode::{Attr, Kind};

#[derive(Default, Debug, Clone, Copy)]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
}

fn err(p: &Path, what: &str, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", p.display())
}

/// Resolves `sub` (relative, no `..`) inside the view; returns its inode.
fn resolve(fs: &Fs, sub: &str) -> Result<u64, String> {
    let mut ino = ROOT_INO;
    for c in Path::new(sub).components() {
        match c {
            Component::Normal(n) => {
                ino = fs
                    .lookup(ino, n.as_encoded_bytes())
                    .map_err(|e| format!("{sub}: not in the snapshot ({e})"))?
                    .ino
            }
            Component::CurDir | Component::RootDir => {}
            _ => return Err(format!("--path {sub:?} may not contain \"..\"")),
        }
    }
    Ok(ino)
}

pub fn restore(
    fs: &Fs,
    sub: Option<&str>,
    dest: &Path,
    progress: &mut dyn FnMut(String),
) -> Result<RestoreStats, String> {
    let start_ino = resolve(fs, sub.unwrap_or(""))?;
    let top = fs
        .getattr(start_ino)
        .map_err(|e| format!("cannot read the snapshot: {e}"))?;
    if dest.exists() {
        let empty = dest.is_dir()
            && std::fs::read_dir(dest)
                .map_err(|e| err(dest, "cannot read", e))?
                .next()
                .is_none();
        if !empty {
            return Err(format!(
                "destination {} exists and is not an empty directory",
                dest.display()
            ));
        }
    }
    let mut r = Restorer {
        fs,
        links: HashMap::new(),
        dirs_to_finish: Vec::new(),
        stats: RestoreStats::default(),
        last_report: Instant::now(),
        started: Instant::now(),
        progress,
    };
    if top.kind == Kind::Dir {
        if !dest.exists() {
            std::fs::create_dir_all(dest).map_err(|e| err(dest, "cannot create", e))?;
        }
        r.dir(start_ino, dest, &top)?;
    } else {
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(|e| err(p, "cannot create", e))?;
        }
        r.node(&top, dest)?;
    }
    // Directory times last: creating entries inside a directory changes its mtime.
    for (path, a) in r.dirs_to_finish.drain(..).rev() {
        finish(&path, &a)?;
    }
    Ok(r.stats)
}

struct Restorer<'a> {
    fs: &'a Fs,
    /// Inode -> first restored path, for hard links.
    links: HashMap<u64, PathBuf>,
    dirs_to_finish: Vec<(PathBuf, Attr)>,
    stats: RestoreStats,
    last_report: Instant,
    started: Instant,
    progress: &'a mut dyn FnMut(String),
}

impl Restorer<'_> {
    fn dir(&mut self, ino: u64, path: &Path, a: &Attr) -> Result<(), String> {
        self.stats.dirs += 1;
        let entries = self
            .fs
            .readdir(ino)
            .map_err(|e| err(path, "cannot list snapshot directory for", e))?;
        for e in entries.into_iter().skip(2) {
            let name = std::ffi::OsStr::from_encoded_bytes_checked(&e.name)?;
            let child = path.join(name);
            let ca = self
                .fs
                .getattr(e.ino)
                .map_err(|x| err(&child, "cannot read snapshot entry for", x))?;
            self.node(&ca, &child)?;
        }
        self.xattrs(a, path)?;
        self.dirs_to_finish.push((path.to_path_buf(), a.clone()));
        Ok(())
    }

    fn node(&mut self, a: &Attr, path: &Path) -> Result<(), String> {
        if a.kind != Kind::Dir && a.nlink > 1 {
            if let Some(first) = self.links.get(&a.ino) {
                std::fs::hard_link(first, path).map_err(|e| err(path, "cannot link", e))?;
                self.stats.links += 1;
                return Ok(());
            }
            self.links.insert(a.ino, path.to_path_buf());
        }
        match a.kind {
            Kind::Dir => {
                std::fs::create_dir(path).map_err(|e| err(path, "cannot create", e))?;
                return self.dir(a.ino, path, a);
            }
            Kind::File => self.file(a, path)?,
            Kind::Symlink => {
                let t: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(&a.target);
                std::os::unix::fs::symlink(t, path).map_err(|e| err(path, "cannot create", e))?;
            }
            _ => crate::sys::mknod(path, a.mode(), a.rdev as u64)
                .map_err(|e| err(path, "cannot create", e))?,
        }
        self.xattrs(a, path)?;
        finish(path, a)
    }

    fn xattrs(&self, a: &Attr, path: &Path) -> Result<(), String> {
        let names = self
            .fs
            .listxattr(a.ino)
            .map_err(|e| err(path, "cannot list xattrs for", e))?;
        for n in names {
            let v = self
                .fs
                .getxattr(a.ino, &n)
                .map_err(|e| err(path, "cannot read xattr for", e))?;
            crate::sys::lsetxattr(path, &n, &v).map_err(|e| {
                err(
                    path,
                    &format!("cannot set xattr {}", String::from_utf8_lossy(&n)),
                    e,
                )
            })?;
        }
        Ok(())
    }

    fn file(&mut self, a: &Attr, path: &Path) -> Result<(), String> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(path, "cannot create", e))?;
        let h = self
            .fs
            .open(a.ino, false)
            .map_err(|e| err(path, "cannot open snapshot file for", e))?;
        let mut off = 0u64;
        let step = self.fs.chunk_size.max(1 << 20) as u32;
        let r = (|| {
            while off < a.size {
                let d = self
                    .fs
                    .read(&h, off, step)
                    .map_err(|e| err(path, "cannot read snapshot data for", e))?;
                if d.is_empty() {
                    break;
                }
                out.write_all(&d)
                    .map_err(|e| err(path, "cannot write", e))?;
                off += d.len() as u64;
                self.stats.bytes += d.len() as u64;
                self.report();
            }
            Ok::<(), String>(())
        })();
        let _ = self.fs.release(&h);
        r?;
        out.set_len(a.size)
            .map_err(|e| err(path, "cannot size", e))?;
        out.sync_all().map_err(|e| err(path, "cannot sync", e))?;
        drop::<File>(out);
        self.stats.files += 1;
        Ok(())
    }

    fn report(&mut self) {
        if self.last_report.elapsed().as_secs_f64() >= 1.0 {
            self.last_report = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            (self.progress)(format!(
                "restored {} files, {:.1} MiB ({:.0} MiB/s)",
                self.stats.files,
                self.stats.bytes as f64 / 1048576.0,
                self.stats.bytes as f64 / 1048576.0 / secs
            ));
        }
    }
}

/// Owner, xattrs, mode, then times (in that order: chown clears set-id bits, and every
/// change but the last would update the times).
fn finish(path: &Path, a: &Attr) -> Result<(), String> {
    crate::sys::lchown(path, a.uid, a.gid).map_err(|e| err(path, "cannot chown", e))?;
    if a.kind != Kind::Symlink {
        std::fs::set_permissions(
            path,
            std::os::unix::fs::PermissionsExt::from_mode(a.perm as u32),
        )
        .map_err(|e| err(path, "cannot chmod", e))?;
    }
    crate::sys::set_times(
        path,
        (a.atime.secs, a.atime.nanos),
        (a.mtime.secs, a.mtime.nanos),
    )
    .map_err(|e| err(path, "cannot set times of", e))
}

trait FromBytes {
    fn from_encoded_bytes_checked(b: &[u8]) -> Result<&std::ffi::OsStr, String>;
}

impl FromBytes for std::ffi::OsStr {
    fn from_encoded_bytes_checked(b: &[u8]) -> Result<&std::ffi::OsStr, String> {
        if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." {
            return Err(format!(
                "refusing unsafe name {:?} from the store",
                String::from_utf8_lossy(b)
            ));
        }
        Ok(std::os::unix::ffi::OsStrExt::from_bytes(b))
    }
}
