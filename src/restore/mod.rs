//! Export of a snapshot (or a subtree of it) to a plain directory: modes, owners, times,
//! symlinks, hard links, special files and xattrs are preserved. The tree is written by
//! [`writer::TreeWriter`], which works on directory descriptors only (no path is resolved
//! twice), from any [`Source`] of nodes: the core [`Fs`] here, backend data for `recover`.
#![allow(clippy::type_complexity)]

pub mod writer;

use std::path::{Component, Path};
use std::time::{Duration, Instant};

use crate::fs::{Fs, ROOT_INO};
use crate::storage::inode::{Attr, Kind};
use writer::TreeWriter;

#[derive(Default, Debug, Clone, Copy)]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
}

/// Where the nodes of a tree come from. Names and data are untrusted: the writer checks them.
pub trait Source {
    fn attr(&self, id: u64) -> Result<Attr, String>;
    /// The entries of a directory, without `.` and `..`: (name, id).
    fn entries(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64)>, String>;
    fn xattrs(&self, id: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String>;
    /// Calls `sink(offset, data)` for the file's data in order; holes may be left out or
    /// given as zeros. `sink` returns false to stop.
    fn read(
        &self,
        id: u64,
        size: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<bool, String>,
    ) -> Result<(), String>;
}

impl Source for Fs {
    fn attr(&self, id: u64) -> Result<Attr, String> {
        self.getattr(id)
            .map_err(|e| format!("cannot read the snapshot: {e}"))
    }
    fn entries(&self, dir: u64) -> Result<Vec<(Vec<u8>, u64)>, String> {
        let v = self
            .readdir(dir)
            .map_err(|e| format!("cannot list a snapshot directory: {e}"))?;
        Ok(v.into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .map(|e| (e.name, e.ino))
            .collect())
    }
    fn xattrs(&self, id: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
        let names = self
            .listxattr(id)
            .map_err(|e| format!("cannot list xattrs: {e}"))?;
        let mut out = Vec::new();
        for n in names {
            let v = self
                .getxattr(id, &n)
                .map_err(|e| format!("cannot read xattr: {e}"))?;
            out.push((n, v));
        }
        Ok(out)
    }
    fn read(
        &self,
        id: u64,
        size: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<bool, String>,
    ) -> Result<(), String> {
        let h = self
            .open(id, false)
            .map_err(|e| format!("cannot open a snapshot file: {e}"))?;
        let step = self.chunk_size.max(1 << 20) as u32;
        let mut off = 0u64;
        let r = (|| {
            while off < size {
                let d = self
                    .read(&h, off, step)
                    .map_err(|e| format!("cannot read snapshot data: {e}"))?;
                if d.is_empty() {
                    break;
                }
                if !sink(off, &d)? {
                    break;
                }
                off += d.len() as u64;
            }
            Ok::<(), String>(())
        })();
        let _ = self.release(&h);
        r
    }
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

/// Progress callback: gets a line, returns false when the requester went away.
pub type Progress<'a> = &'a mut dyn FnMut(String) -> bool;

/// Restores `sub` (or the whole view) of `fs` to `dest`.
///
/// A directory is restored *into* `dest` (created if missing; it must be empty unless
/// `overwrite`). A single non-directory goes to `dest/basename` if `dest` is an existing
/// directory, else to `dest` itself (as `cp` does).
pub fn restore(
    fs: &Fs,
    sub: Option<&str>,
    dest: &Path,
    overwrite: bool,
    progress: Progress,
) -> Result<RestoreStats, String> {
    let sub = sub.unwrap_or("");
    let start = resolve(fs, sub)?;
    let top = fs.attr(start)?;
    let shown = dest.display().to_string();
    let mut d = Driver {
        src: fs,
        stats: RestoreStats::default(),
        last_report: Instant::now(),
        started: Instant::now(),
        progress,
    };
    if top.kind == Kind::Dir {
        match std::fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => {
                let nonempty = std::fs::read_dir(dest)
                    .map_err(|e| format!("cannot read {shown}: {e}"))?
                    .next()
                    .is_some();
                if nonempty && !overwrite {
                    return Err(format!(
                        "destination {shown} is not an empty directory (--overwrite replaces its entries by the snapshot's)"
                    ));
                }
            }
            Ok(_) => return Err(format!("destination {shown} exists and is not a directory")),
            Err(_) => {
                std::fs::create_dir_all(dest).map_err(|e| format!("cannot create {shown}: {e}"))?
            }
        }
        let fd = writer::open_dest(dest).map_err(|e| format!("cannot open {shown}: {e}"))?;
        let mut w = TreeWriter::new(fd, shown, overwrite);
        let x = fs.xattrs(start)?;
        w.set_root_meta(top.clone(), x);
        d.stats.dirs += 1;
        d.dir(&mut w, start)?;
        w.finish()?;
    } else {
        // A single entry: into an existing directory under its own name, else as `dest`.
        let (parent, name) = match std::fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => {
                let base = Path::new(sub)
                    .file_name()
                    .ok_or_else(|| format!("--path {sub:?} has no file name"))?;
                (dest.to_path_buf(), base.as_encoded_bytes().to_vec())
            }
            Ok(_) if overwrite => {
                let name = dest
                    .file_name()
                    .ok_or_else(|| format!("destination {shown} has no file name"))?;
                let p = match dest.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => ".".into(),
                };
                (p, name.as_encoded_bytes().to_vec())
            }
            Ok(_) => {
                return Err(format!(
                    "destination {shown} already exists (--overwrite replaces it)"
                ))
            }
            Err(_) => {
                let name = dest
                    .file_name()
                    .ok_or_else(|| format!("destination {shown} has no file name"))?;
                let p = match dest.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => ".".into(),
                };
                std::fs::create_dir_all(&p)
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
                (p, name.as_encoded_bytes().to_vec())
            }
        };
        let fd = writer::open_dest(&parent)
            .map_err(|e| format!("cannot open {}: {e}", parent.display()))?;
        let mut w = TreeWriter::new(fd, parent.display().to_string(), overwrite);
        d.node(&mut w, &name, &top)?;
        // The parent of a single restored entry keeps its own metadata.
        drop(w);
    }
    Ok(d.stats)
}

struct Driver<'a, S: Source + ?Sized> {
    src: &'a S,
    stats: RestoreStats,
    last_report: Instant,
    started: Instant,
    progress: Progress<'a>,
}

impl<S: Source + ?Sized> Driver<'_, S> {
    /// Depth first: only the descriptors of the current path are open.
    fn dir(&mut self, w: &mut TreeWriter, id: u64) -> Result<(), String> {
        for (name, child) in self.src.entries(id)? {
            let a = self.src.attr(child)?;
            self.node(w, &name, &a)?;
        }
        Ok(())
    }

    fn node(&mut self, w: &mut TreeWriter, name: &[u8], a: &Attr) -> Result<(), String> {
        self.check_cancel(false)?;
        if a.kind != Kind::Dir && a.nlink > 1 && w.link(a.ino, name)? {
            self.stats.links += 1;
            return Ok(());
        }
        let x = self.src.xattrs(a.ino)?;
        match a.kind {
            Kind::Dir => {
                self.stats.dirs += 1;
                w.enter_dir(name, a.clone(), x)?;
                self.dir(w, a.ino)?;
                w.leave_dir()
            }
            Kind::File => {
                let src = self.src;
                let mut cancelled = None;
                w.file(name, a, &x, &mut |out| {
                    src.read(a.ino, a.size, &mut |off, data| {
                        out.write_at(off, data)?;
                        self.stats.bytes += data.len() as u64;
                        match self.check_cancel(false) {
                            Ok(()) => Ok(true),
                            Err(e) => {
                                cancelled = Some(e);
                                Ok(false)
                            }
                        }
                    })
                })?;
                if let Some(e) = cancelled {
                    return Err(e);
                }
                self.stats.files += 1;
                Ok(())
            }
            _ => w.special(name, a, &x),
        }
    }

    /// Sends progress at least every second (so a client that went away is noticed) and stops
    /// when the requester is gone.
    fn check_cancel(&mut self, force: bool) -> Result<(), String> {
        if !force && self.last_report.elapsed() < Duration::from_millis(500) {
            return Ok(());
        }
        self.last_report = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let line = format!(
            "restored {} files, {:.1} MiB ({:.0} MiB/s)",
            self.stats.files,
            self.stats.bytes as f64 / 1048576.0,
            self.stats.bytes as f64 / 1048576.0 / secs
        );
        if (self.progress)(line) {
            Ok(())
        } else {
            Err("restore cancelled: the client went away".into())
        }
    }
}
