//! A snapshot's manifest: its tree as content-addressed metadata objects (format.rs), built
//! from a pinned view of the snapshot, bottom-up, and uploaded in parallel batches of
//! `BATCH` objects on `PARALLEL` threads (a batch is durable before the next one starts, and
//! children come before their parents, so a parent is in the same batch as its children or a
//! later one). The marker, which alone makes a snapshot complete, is written by the caller
//! after `build` has returned, so after every object. An object whose hash the backend is known
//! to hold (`Known`) is not uploaded again: a snapshot that changed one file uploads that
//! file's map and the trees on its path to the root, O(depth) objects.

use std::collections::HashSet;

/// Metadata objects held back for one parallel upload, and the threads that upload them.
const BATCH: usize = 256;
const PARALLEL: usize = 8;

use crate::fs::Fs;
use crate::replica::backend::Backend;
use crate::replica::format::{self, Body, Entry, Hash, MapItem};
use crate::storage::inode::{Attr, Kind};
use crate::storage::keys::{self, ChunkId};

/// Which metadata objects a backend already holds, and which chunks it must not be asked for.
pub trait Known {
    fn has_meta(&mut self, hash: &Hash) -> Result<bool, String>;
    fn add_meta(&mut self, hash: &Hash) -> Result<(), String>;
    /// A chunk that failed verification before upload: a snapshot that needs it cannot
    /// complete on this backend.
    fn is_bad_chunk(&mut self, id: &ChunkId) -> Result<bool, String>;
    /// A chunk a prune removed from the backend while the store kept it: the caller queues
    /// it again before the snapshot can complete.
    fn is_absent(&mut self, _id: &ChunkId) -> Result<bool, String> {
        Ok(false)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub uploaded: u32,
    pub skipped: u32,
    pub files: u64,
    pub bytes: u64,
}

pub struct Builder<'a> {
    view: &'a Fs,
    backend: &'a dyn Backend,
    known: &'a mut dyn Known,
    /// Objects uploaded or found during this build (hard links, repeated maps).
    seen: HashSet<Hash>,
    /// Objects waiting for the next parallel upload.
    pending: Vec<(Hash, Vec<u8>)>,
    pub stats: Stats,
    /// Chunks the snapshot needs that [`Known::is_absent`] says the backend lost.
    pub absent: HashSet<ChunkId>,
}

fn fs_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl<'a> Builder<'a> {
    pub fn new(view: &'a Fs, backend: &'a dyn Backend, known: &'a mut dyn Known) -> Builder<'a> {
        Builder {
            view,
            backend,
            known,
            seen: HashSet::new(),
            pending: Vec::new(),
            stats: Stats::default(),
            absent: HashSet::new(),
        }
    }

    /// Uploads every object under the root and returns the root's entry (for the marker).
    pub fn build(&mut self) -> Result<Entry, String> {
        let attr = self
            .view
            .getattr(crate::fs::ROOT_INO)
            .map_err(|e| fs_err("cannot read the root", e))?;
        let root = self.entry(Vec::new(), &attr, 0)?;
        self.flush()?;
        Ok(root)
    }

    /// Uploads the pending objects, `PARALLEL` at a time, and records them as known.
    fn flush(&mut self) -> Result<(), String> {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(());
        }
        let backend = self.backend;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let first_error = parking_lot::Mutex::new(None::<String>);
        std::thread::scope(|s| {
            for _ in 0..PARALLEL.min(pending.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((hash, obj)) = pending.get(i) else {
                        return;
                    };
                    if first_error.lock().is_some() {
                        return;
                    }
                    if let Err(e) = backend.put(&format::meta_name(hash), obj) {
                        first_error.lock().get_or_insert(format!(
                            "upload of metadata object {}: {e}",
                            format::hex(hash)
                        ));
                        return;
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner() {
            return Err(e);
        }
        for (hash, _) in &pending {
            self.known.add_meta(hash)?;
        }
        self.stats.uploaded += pending.len() as u32;
        Ok(())
    }

    fn put_meta(&mut self, hash: Hash, obj: Vec<u8>) -> Result<(), String> {
        if !self.seen.insert(hash) {
            return Ok(());
        }
        if self.known.has_meta(&hash)? {
            self.stats.skipped += 1;
            return Ok(());
        }
        self.pending.push((hash, obj));
        if self.pending.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn entry(&mut self, name: Vec<u8>, a: &Attr, depth: usize) -> Result<Entry, String> {
        if depth > 4096 {
            return Err("directory tree deeper than 4096 levels".into());
        }
        let ino = a.ino;
        let mut xattrs = Vec::new();
        for n in self
            .view
            .listxattr(ino)
            .map_err(|e| fs_err("cannot list xattrs", e))?
        {
            let v = self
                .view
                .getxattr(ino, &n)
                .map_err(|e| fs_err("cannot read an xattr", e))?;
            xattrs.push((n, v));
        }
        xattrs.sort();
        let body = match a.kind {
            Kind::Dir => Body::Dir(self.tree(ino, depth)?),
            Kind::File => {
                self.stats.files += 1;
                self.stats.bytes += a.size;
                Body::File(self.map(ino)?)
            }
            Kind::Symlink => Body::Symlink(a.target.clone()),
            _ => Body::Special,
        };
        Ok(Entry {
            name,
            kind: a.kind,
            ino,
            perm: a.perm,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            nlink: a.nlink,
            rdev: a.rdev,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            xattrs,
            body,
        })
    }

    fn tree(&mut self, ino: u64, depth: usize) -> Result<Hash, String> {
        let mut children = self
            .view
            .readdir(ino)
            .map_err(|e| fs_err("cannot list a directory", e))?;
        children.retain(|d| d.name != b"." && d.name != b"..");
        children.sort_by(|a, b| a.name.cmp(&b.name));
        let mut entries = Vec::with_capacity(children.len());
        for d in children {
            let a = self
                .view
                .getattr(d.ino)
                .map_err(|e| fs_err("cannot read an inode", e))?;
            entries.push(self.entry(d.name, &a, depth + 1)?);
        }
        let (hash, obj) = format::tree_object(&entries);
        self.put_meta(hash, obj)?;
        Ok(hash)
    }

    fn map(&mut self, ino: u64) -> Result<Option<Hash>, String> {
        let mut items = Vec::new();
        for (rec, p) in self
            .view
            .scan_recs(&keys::map_prefix(ino))
            .map_err(|e| fs_err("cannot read a chunk map", e))?
        {
            let m = keys::MapEntry::decode(&p)
                .ok_or_else(|| format!("inode {ino}: a chunk-map entry does not decode"))?;
            if self.known.is_bad_chunk(&m.id)? {
                return Err(format!(
                    "inode {ino} needs chunk {}, which failed verification and was not uploaded",
                    format::hex(&m.id)
                ));
            }
            if self.known.is_absent(&m.id)? {
                self.absent.insert(m.id);
            }
            items.push(MapItem {
                index: keys::map_index(&rec),
                id: m.id,
                len: m.len,
            });
        }
        if items.is_empty() {
            return Ok(None);
        }
        let (hash, obj) = format::map_object(&items);
        self.put_meta(hash, obj)?;
        Ok(Some(hash))
    }
}
