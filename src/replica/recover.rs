//! Reading a backend back, with no local store: listing its complete snapshots, and
//! rebuilding a store from them (`snapfs recover`). Everything read is untrusted: markers
//! carry a checksum, metadata objects are checked against the hash in their name, chunks are
//! decompressed and checked against their id, and names are validated before they become
//! directory entries (format.rs).

use std::collections::HashMap;
use std::path::Path;

use crate::fs::{Creds, Fs, InstallChunk, SetAttr, TimeSet, ROOT_INO};
use crate::replica::backend::{Backend, BackendError};
use crate::replica::format::{self, Body, Entry, Hash, Marker};
use crate::storage::inode::Kind;
use crate::storage::store::Store;

/// Chunks fetched per installed batch (at most this many bodies in memory).
const INSTALL_BATCH: usize = 16;

fn get(b: &dyn Backend, name: &str) -> Result<Vec<u8>, String> {
    b.get(name).map_err(|e| match e {
        BackendError::NotFound => {
            format!("the backend has no object {name} (incomplete or damaged backup)")
        }
        e => format!("cannot read {name} from the backend: {e}"),
    })
}

/// The complete snapshots on a backend, oldest first. A marker that does not verify is an
/// error naming it, never skipped silently.
pub fn list_snapshots(b: &dyn Backend) -> Result<Vec<Marker>, String> {
    if let Ok(obj) = b.get(format::REPO_NAME) {
        format::open_repo(&obj).map_err(|e| format!("{}: {e}", format::REPO_NAME))?;
    }
    let names = b
        .list("snapshots/")
        .map_err(|e| format!("cannot list snapshots on the backend: {e}"))?;
    let mut out = Vec::new();
    for n in names {
        let obj = get(b, &n)?;
        let m = format::open_marker(&obj).map_err(|e| format!("{n}: {e}"))?;
        if format::marker_name(&m.name) != n {
            return Err(format!(
                "{n}: the marker names snapshot {:?} (moved or forged)",
                m.name
            ));
        }
        out.push(m);
    }
    out.sort_by_key(|m| m.epoch);
    Ok(out)
}

/// Progress of a recovery, for a progress bar or plain lines.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub snapshot: String,
    pub snapshots_done: usize,
    pub snapshots_total: usize,
    pub files: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub snapshots: Vec<String>,
    pub files: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
}

struct Rebuild<'a> {
    fs: &'a Fs,
    b: &'a dyn Backend,
    chunk_size: u32,
    /// Chunks are not fetched: the store serves them from the backend (`mount --from`).
    lazy: bool,
    /// Inodes of the snapshot being rebuilt (its numbers) → inodes here: hard links.
    links: HashMap<u64, u64>,
    progress: Progress,
    report: &'a mut dyn FnMut(&Progress),
}

fn fs_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Rebuild<'_> {
    fn tree(&mut self, hash: &Hash) -> Result<Vec<Entry>, String> {
        let name = format::meta_name(hash);
        format::open_tree(hash, &get(self.b, &name)?).map_err(|e| format!("{name}: {e}"))
    }

    /// Empties the live tree (the previous snapshot's), so the next one is built whole.
    fn clear(&self, dir: u64) -> Result<(), String> {
        for d in self.fs.readdir(dir).map_err(|e| fs_err("readdir", e))? {
            if d.name == b"." || d.name == b".." {
                continue;
            }
            if d.kind == Kind::Dir {
                self.clear(d.ino)?;
                self.fs
                    .rmdir(dir, &d.name)
                    .map_err(|e| fs_err("rmdir", e))?;
            } else {
                self.fs
                    .unlink(dir, &d.name)
                    .map_err(|e| fs_err("unlink", e))?;
            }
        }
        Ok(())
    }

    fn dir(&mut self, ino: u64, hash: &Hash, depth: usize) -> Result<(), String> {
        if depth > 4096 {
            return Err("directory tree deeper than 4096 levels on the backend".into());
        }
        for e in self.tree(hash)? {
            self.entry(ino, &e, depth)?;
        }
        Ok(())
    }

    fn entry(&mut self, parent: u64, e: &Entry, depth: usize) -> Result<(), String> {
        let c = Creds {
            uid: e.uid,
            gid: e.gid,
        };
        if e.kind != Kind::Dir && e.nlink > 1 {
            if let Some(&local) = self.links.get(&e.ino) {
                self.fs
                    .link(local, parent, &e.name)
                    .map_err(|err| fs_err("link", err))?;
                return Ok(());
            }
        }
        let name = &e.name;
        let a = match &e.body {
            Body::Dir(h) => {
                let a = self
                    .fs
                    .mkdir(parent, name, e.perm as u32, c)
                    .map_err(|err| fs_err("mkdir", err))?;
                self.dir(a.ino, h, depth + 1)?;
                a
            }
            Body::File(map) => {
                let a = self
                    .fs
                    .mknod(parent, name, libc::S_IFREG | e.perm as u32, 0, c)
                    .map_err(|err| fs_err("create", err))?;
                self.file(a.ino, map.as_ref(), e.size)?;
                self.progress.files += 1;
                a
            }
            Body::Symlink(t) => self
                .fs
                .symlink(parent, name, t, c)
                .map_err(|err| fs_err("symlink", err))?,
            Body::Special => {
                let fmt = match e.kind {
                    Kind::Fifo => libc::S_IFIFO,
                    Kind::Socket => libc::S_IFSOCK,
                    Kind::CharDev => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                self.fs
                    .mknod(parent, name, fmt | e.perm as u32, e.rdev, c)
                    .map_err(|err| fs_err("mknod", err))?
            }
        };
        self.links.insert(e.ino, a.ino);
        self.attrs(a.ino, e)
    }

    fn attrs(&self, ino: u64, e: &Entry) -> Result<(), String> {
        for (n, v) in &e.xattrs {
            self.fs
                .setxattr(ino, n, v, 0)
                .map_err(|err| fs_err("setxattr", err))?;
        }
        let s = SetAttr {
            mode: (e.kind != Kind::Symlink).then_some(e.perm as u32),
            uid: Some(e.uid),
            gid: Some(e.gid),
            size: None,
            atime: Some(TimeSet::At(e.atime)),
            mtime: Some(TimeSet::At(e.mtime)),
            ctime: Some(e.ctime),
        };
        self.fs
            .setattr(ino, s)
            .map_err(|err| fs_err("setattr", err))?;
        Ok(())
    }

    fn file(&mut self, ino: u64, map: Option<&Hash>, size: u64) -> Result<(), String> {
        let items = match map {
            Some(h) => {
                let name = format::meta_name(h);
                format::open_map(h, &get(self.b, &name)?, self.chunk_size)
                    .map_err(|e| format!("{name}: {e}"))?
            }
            None => Vec::new(),
        };
        let max_end = items
            .last()
            .map_or(0, |m| m.index * self.chunk_size as u64 + m.len as u64);
        if max_end > size {
            return Err(format!(
                "inode {ino}: the file map reaches past the file's size"
            ));
        }
        if items.is_empty() {
            return self
                .fs
                .install_chunks(ino, Vec::new(), size)
                .map_err(|e| fs_err("install", e));
        }
        for batch in items.chunks(INSTALL_BATCH) {
            let mut chunks = Vec::with_capacity(batch.len());
            for m in batch {
                let have = self.lazy || self.fs.has_chunk(&m.id).map_err(|e| fs_err("read", e))?;
                let stored = if have {
                    None
                } else {
                    let name = format::chunk_name(&m.id);
                    let obj = get(self.b, &name)?;
                    let (stored, data) =
                        format::open_chunk(&m.id, &obj).map_err(|e| format!("{name}: {e}"))?;
                    if data.len() != m.len as usize {
                        return Err(format!("{name}: length differs from the file map"));
                    }
                    self.progress.chunks_fetched += 1;
                    self.progress.bytes_fetched += obj.len() as u64;
                    Some(stored)
                };
                chunks.push(InstallChunk {
                    index: m.index,
                    id: m.id,
                    len: m.len,
                    stored,
                });
            }
            self.fs
                .install_chunks(ino, chunks, size)
                .map_err(|e| fs_err("install", e))?;
            (self.report)(&self.progress);
        }
        Ok(())
    }
}

/// Serves chunks from a backend, verified (`mount --from`).
pub struct BackendChunks(pub std::sync::Arc<dyn Backend>);

impl crate::fs::ChunkSource for BackendChunks {
    fn fetch(&self, id: &crate::storage::keys::ChunkId) -> Result<Vec<u8>, String> {
        let name = format::chunk_name(id);
        let obj = get(self.0.as_ref(), &name)?;
        format::open_chunk(id, &obj)
            .map(|(_, data)| data)
            .map_err(|e| format!("{name}: {e}"))
    }
}

/// Builds, in the new directory `dir`, a store that holds snapshot `name` of the backend
/// with its metadata only: every chunk is fetched from the backend when first read (into the
/// bounded chunk cache), never stored here. The store is closed on return; open it with the
/// same source (`ChunkCache::set_remote`) to serve it.
pub fn build_remote(b: std::sync::Arc<dyn Backend>, dir: &Path, name: &str) -> Result<(), String> {
    let m = list_snapshots(b.as_ref())?
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| format!("the backend has no complete snapshot named {name}"))?;
    let store = Store::open(dir, true, Some(m.chunk_size as usize))?;
    store
        .fs
        .chunk_cache()
        .set_remote(std::sync::Arc::new(BackendChunks(b.clone())));
    let mut quiet = |_: &Progress| {};
    let mut rb = Rebuild {
        fs: &store.fs,
        b: b.as_ref(),
        chunk_size: m.chunk_size,
        lazy: true,
        links: HashMap::new(),
        progress: Progress::default(),
        report: &mut quiet,
    };
    let Body::Dir(root) = m.root.body else {
        return Err(format!("snapshot {}: the root is not a directory", m.name));
    };
    rb.dir(ROOT_INO, &root, 0)?;
    rb.attrs(ROOT_INO, &m.root)?;
    store
        .fs
        .snapshot_create_full(&m.name, true, m.automatic, Some(m.created))
        .map_err(|e| format!("cannot create snapshot {}: {e}", m.name))?;
    store
        .fs
        .shutdown()
        .map_err(|e| format!("cannot close the cache store: {e}"))
}

/// Rebuilds a store in `dir` (new or empty) from the complete snapshots on a backend (or only
/// `only`), oldest first: each becomes a snapshot of the new store, and the live tree equals
/// the last one. Only chunks the new store lacks are fetched.
pub fn recover(
    b: &dyn Backend,
    dir: &Path,
    only: Option<&str>,
    report: &mut dyn FnMut(&Progress),
) -> Result<Report, String> {
    let existed = dir.exists();
    let r = recover_into(b, dir, only, report);
    if r.is_err() && dir.join("db").exists() {
        // Nothing half-built is left to look like a store: what recover made goes.
        let cleaned = if existed {
            std::fs::read_dir(dir).and_then(|rd| {
                rd.filter_map(|e| e.ok()).try_for_each(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    }
                })
            })
        } else {
            std::fs::remove_dir_all(dir)
        };
        if let Err(e) = cleaned {
            log::warn!("cannot remove the partial store {}: {e}", dir.display());
        }
    }
    r.map_err(|e| format!("{e} (nothing was recovered)"))
}

fn recover_into(
    b: &dyn Backend,
    dir: &Path,
    only: Option<&str>,
    report: &mut dyn FnMut(&Progress),
) -> Result<Report, String> {
    let mut markers = list_snapshots(b)?;
    if let Some(n) = only {
        markers.retain(|m| m.name == n);
        if markers.is_empty() {
            return Err(format!("the backend has no complete snapshot named {n}"));
        }
    }
    let Some(first) = markers.first() else {
        return Err("the backend holds no complete snapshot".into());
    };
    let chunk_size = first.chunk_size;
    if markers.iter().any(|m| m.chunk_size != chunk_size) {
        return Err("the backend's snapshots disagree on the chunk size".into());
    }
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .next()
            .is_some()
    {
        return Err(format!(
            "{} is not empty: recover builds a new store; choose a new or empty directory",
            dir.display()
        ));
    }
    let store = Store::open(dir, true, Some(chunk_size as usize))?;
    let fs = &store.fs;
    let mut out = Report::default();
    let total = markers.len();
    let mut rb = Rebuild {
        fs,
        b,
        chunk_size,
        lazy: false,
        links: HashMap::new(),
        progress: Progress {
            snapshots_total: total,
            ..Default::default()
        },
        report,
    };
    for m in &markers {
        rb.progress.snapshot = m.name.clone();
        (rb.report)(&rb.progress);
        rb.clear(ROOT_INO)?;
        rb.links.clear();
        let Body::Dir(root) = m.root.body else {
            return Err(format!("snapshot {}: the root is not a directory", m.name));
        };
        rb.dir(ROOT_INO, &root, 0)?;
        rb.attrs(ROOT_INO, &m.root)?;
        fs.snapshot_create_full(&m.name, true, m.automatic, Some(m.created))
            .map_err(|e| format!("cannot create snapshot {}: {e}", m.name))?;
        rb.progress.snapshots_done += 1;
        (rb.report)(&rb.progress);
        out.snapshots.push(m.name.clone());
    }
    out.files = rb.progress.files;
    out.chunks_fetched = rb.progress.chunks_fetched;
    out.bytes_fetched = rb.progress.bytes_fetched;
    fs.shutdown()
        .map_err(|e| format!("cannot close the new store: {e}"))?;
    Ok(out)
}
