//! The storage core: a POSIX filesystem over the engine, with no FUSE types.
//!
//! Concurrency: one metadata mutex (`Fs::meta`) serializes every commit that reads and then
//! writes metadata (namespace changes, chunk-map changes, refcounts, counters). Each open file
//! has a reader-writer lock over its write buffers; the lock order is file state, then `meta`,
//! then the open-file table (the sealing map, in-flight count and error of a file are leaf
//! locks). Full chunks are hashed, compressed and committed by background sealer threads
//! (one chunk index always on the same thread, so in order) while the writer goes on; partial chunks are sealed inline by flush and fsync, and handed to the sealers by a snapshot. Every seal job commits at the epoch it was written in (`epochs.rs`).

mod cache;
mod check;
mod compress;
mod data;
mod defer;
mod epochs;
mod heal;
mod install;
pub mod keep;
mod ns;
mod pending;
mod queue;
mod snap;
mod txn;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::error::{FsError, Result};
use crate::storage::engine::{Cf, Engine};
use crate::storage::inode::{Attr, Time};
use crate::storage::keys::{self, ChunkId, TAG_LIVE, TAG_TOMBSTONE};
pub use cache::{ChunkCache, ChunkSource, DEFAULT_CACHE_BYTES};
pub use heal::{Counts as ScrubCounts, LocalChunk};

pub use check::CheckReport;
pub use data::{Handle, ReadBuf, MAX_FILE_SIZE};
pub use install::InstallChunk;
pub use ns::{DirEntry, SetAttr, TimeSet};
pub use pending::WritePath;
pub use queue::Reconciled;
pub use snap::{check_snapshot_name, Rollback, SnapshotInfo, VersionGc};
pub use txn::now_ms;
pub(crate) use txn::Txn;

pub const ROOT_INO: u64 = 1;
/// The epoch of a store that has never been snapshotted.
pub const FIRST_EPOCH: u64 = 1;
pub const NAME_MAX: usize = 255;

/// Caller credentials for operations that create inodes.
#[derive(Clone, Copy, Debug)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
}

/// Space accounting kept in the same batches as the references they count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Unique chunks stored (including chunks waiting for garbage collection).
    pub chunks: u64,
    /// Sum of the uncompressed lengths of unique chunks.
    pub unique_bytes: u64,
    /// Sum of the stored (compressed) lengths of unique chunks.
    pub stored_bytes: u64,
    /// Sum over every chunk-map entry version of the bytes it references.
    pub referenced_bytes: u64,
}

pub(crate) struct MetaState {
    pub next_ino: u64,
    pub counters: Counters,
    /// The last sequence number given to a replication queue entry (0: none yet).
    pub repl_seq: u64,
    /// The live epoch as the database holds it (`02 epoch`). A snapshot that has to wait
    /// for its chunks moves the epoch in memory only; the first batch that writes at the new
    /// epoch (any `Txn::commit`) or records a snapshot carries the key, so the database never
    /// holds a version above its live epoch.
    pub epoch_on_disk: u64,
    /// Chunks whose body was written without the WAL and whose commit is still parked
    /// (`defer.rs`), with the number of parked jobs that wrote them. Garbage collection
    /// leaves their free-queue markers and bodies alone.
    pub unflushed: HashMap<ChunkId, usize>,
}

pub(crate) struct FileState {
    /// Authoritative size while the file is open (buffers may extend the stored size).
    pub size: u64,
    /// mtime/ctime of buffered writes not yet persisted.
    pub times_dirty: Option<Time>,
    /// Unsealed chunks by index; each holds the chunk's bytes from its start.
    pub buffers: BTreeMap<u64, Vec<u8>>,
}

pub(crate) struct OpenFile {
    pub state: RwLock<FileState>,
    /// Full chunks handed to the sealer and not yet committed, readable here until they are.
    /// A leaf lock: the sealer takes it without the file state lock.
    pub sealing: Mutex<BTreeMap<u64, Arc<Vec<u8>>>>,
    /// Seal jobs of this file in the sealer's queue or parked; `idle` is signalled when it
    /// drops to 0, and when a job of this file is parked.
    pub inflight: Mutex<usize>,
    pub idle: Condvar,
    /// Of `inflight`, the jobs parked for a group commit (`defer.rs`). Changed under
    /// `inflight`'s lock.
    pub parked: std::sync::atomic::AtomicUsize,
    /// The first error of an asynchronous seal, reported by the next write, flush or fsync.
    pub error: Mutex<Option<FsError>>,
    /// Handles open O_RDWR (through which the file may be mapped shared and writable).
    pub read_write: std::sync::atomic::AtomicUsize,
}

impl OpenFile {
    fn new(size: u64) -> OpenFile {
        OpenFile {
            state: RwLock::new(FileState {
                size,
                times_dirty: None,
                buffers: BTreeMap::new(),
            }),
            sealing: Mutex::new(BTreeMap::new()),
            inflight: Mutex::new(0),
            idle: Condvar::new(),
            parked: std::sync::atomic::AtomicUsize::new(0),
            error: Mutex::new(None),
            read_write: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Waits until the sealer has committed every chunk queued for this file, then reports
    /// a seal error. Jobs of the file that are parked for a group commit are committed now
    /// (with everything else parked).
    pub fn wait_sealed(&self, fs: &Fs) -> Result<()> {
        let mut n = self.inflight.lock();
        while *n > 0 {
            if self.parked.load(Ordering::Acquire) > 0 {
                drop(n);
                fs.commit_parked_for(Some(self));
                n = self.inflight.lock();
                continue;
            }
            self.idle.wait(&mut n);
        }
        drop(n);
        self.check_error()
    }

    /// A failed seal lost buffered data: the error is sticky, so every later write, flush and
    /// fsync of this file fails too, and no fsync ever reports success over lost data. It
    /// clears only when the last user closes the file.
    pub fn check_error(&self) -> Result<()> {
        match *self.error.lock() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn set_error(&self, e: FsError) {
        self.error.lock().get_or_insert(e);
    }
}

struct OpenEntry {
    file: Arc<OpenFile>,
    users: usize,
}

/// Epochs read by live views (snapshot browsing, restore, diff): epoch -> number of views.
/// Version GC retains them like snapshot epochs, so a view never reads another epoch's bytes.
pub(crate) type Pins = Arc<Mutex<BTreeMap<u64, usize>>>;

/// A view's hold on its epoch; released when the view is dropped.
struct Pin {
    pins: Pins,
    epoch: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut p = self.pins.lock();
        if let Some(n) = p.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.epoch);
            }
        }
    }
}

pub struct Fs {
    pub(crate) eng: Arc<Engine>,
    pub(crate) chunk_size: usize,
    /// The epoch live writes go to.
    epoch: AtomicU64,
    /// Some(e): this instance shows the read-only view at epoch e.
    view: Option<u64>,
    meta: Mutex<MetaState>,
    open: Mutex<HashMap<u64, OpenEntry>>,
    /// Decoded chunks: one cache shared by the live instance and all its views.
    cache: Arc<ChunkCache>,
    /// Queue of the background sealer (absent until `start_sealer`; sealing is then inline).
    sealer: std::sync::OnceLock<Vec<crossbeam_channel::Sender<data::SealJob>>>,
    /// Signalled by a sealer when it takes a job off its queue (`data::wait_for_sealers`).
    sealer_room: Arc<(Mutex<()>, Condvar)>,
    /// Seal jobs whose bodies were written without the WAL, waiting for one flush of the
    /// chunk column family and then their metadata commit (`defer.rs`).
    deferred: defer::Deferred,
    /// Unsealed buffers over all open files, in chunks (each buffer holds up to one chunk),
    /// and the budget in bytes (`mount --write-buffer`): a write that finds the budget used
    /// up seals its own file's buffers inline (`data.rs`).
    dirty_chunks: AtomicU64,
    write_budget: AtomicU64,
    /// Serializes garbage-collection passes (each reference is dropped once).
    gc_lock: Mutex<()>,
    /// Background WAL syncs started by snapshots; joined before the engine can close.
    background: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Shared by the live instance and all its views.
    pins: Pins,
    /// This view's pin (None for the live instance).
    _pin: Option<Pin>,
    /// Makes a snapshot one instant: every `write` holds it shared for its whole call, and
    /// `snapshot_create` holds it exclusively while it hands the buffers to seal jobs and moves
    /// the epoch. No write is half applied, or applied but in no job, when the epoch moves.
    barrier: RwLock<()>,
    /// A pass of version GC was held back by a pinned epoch; the background GC runs it.
    gc_pending: AtomicBool,
    /// Seal jobs outstanding per epoch, and the snapshots waiting for them (`epochs.rs`).
    epochs: Arc<epochs::Epochs>,
    /// Ids of the backends that replicate this store: every new chunk is queued for each in
    /// the batch that seals it, every snapshot gets a pending record for each in its batch.
    replicas: RwLock<Arc<[u32]>>,
}

impl Drop for Fs {
    fn drop(&mut self) {
        for t in self.background.get_mut().drain(..) {
            let _ = t.join();
        }
    }
}

fn counter(eng: &Engine, name: &str) -> Result<Option<u64>> {
    Ok(eng
        .get(Cf::Meta, &keys::counter_key(name))?
        .filter(|v| v.len() == 8)
        .map(|v| keys::le_u64(&v)))
}

/// The epoch and the counters as the database holds them.
fn load_state(eng: &Engine) -> Result<(u64, MetaState)> {
    let epoch = counter(eng, "epoch")?.unwrap_or(FIRST_EPOCH);
    let next_ino = counter(eng, "next_ino")?.unwrap_or(ROOT_INO + 1);
    let counters = Counters {
        chunks: counter(eng, "chunks")?.unwrap_or(0),
        unique_bytes: counter(eng, "unique_bytes")?.unwrap_or(0),
        stored_bytes: counter(eng, "stored_bytes")?.unwrap_or(0),
        referenced_bytes: counter(eng, "referenced_bytes")?.unwrap_or(0),
    };
    let repl_seq = counter(eng, "repl_seq")?.unwrap_or(0);
    Ok((
        epoch,
        MetaState {
            next_ino,
            counters,
            repl_seq,
            epoch_on_disk: epoch,
            unflushed: HashMap::new(),
        },
    ))
}

impl Fs {
    /// Opens the filesystem on an engine. Creates the root directory on a new store.
    pub fn new(eng: Engine, chunk_size: usize, creator: Creds) -> Result<Fs> {
        Fs::with_cache(eng, chunk_size, creator, DEFAULT_CACHE_BYTES)
    }

    /// `new`, with a decoded-chunk cache of `cache_bytes` shared by the instance and its views.
    pub fn with_cache(
        eng: Engine,
        chunk_size: usize,
        creator: Creds,
        cache_bytes: usize,
    ) -> Result<Fs> {
        let (epoch, meta) = load_state(&eng)?;
        let fs = Fs::assemble(
            Arc::new(eng),
            chunk_size,
            epoch,
            None,
            meta,
            Pins::default(),
            None,
            Arc::new(ChunkCache::new(cache_bytes)),
        );
        if fs.get_rec(&keys::inode_rec(ROOT_INO))?.is_none() {
            let mut root = Attr::new(
                ROOT_INO,
                crate::storage::inode::Kind::Dir,
                0o755,
                0,
                0,
                Time::now(),
            );
            root.uid = creator.uid;
            root.gid = creator.gid;
            root.parent = ROOT_INO;
            let mut txn = Txn::new(&fs);
            txn.put_attr(root);
            let mut meta = fs.meta.lock();
            txn.commit(&mut meta, true)?;
        }
        fs.clean_orphans()?;
        fs.load_replicas()?;
        Ok(fs)
    }

    /// The one place that lists every field: the live instance and views both come here.
    #[allow(clippy::too_many_arguments)] // one argument per field a caller decides
    fn assemble(
        eng: Arc<Engine>,
        chunk_size: usize,
        epoch: u64,
        view: Option<u64>,
        meta: MetaState,
        pins: Pins,
        pin: Option<Pin>,
        cache: Arc<ChunkCache>,
    ) -> Fs {
        Fs {
            eng,
            chunk_size,
            epoch: AtomicU64::new(epoch),
            view,
            meta: Mutex::new(meta),
            open: Mutex::new(HashMap::new()),
            cache,
            sealer: std::sync::OnceLock::new(),
            sealer_room: Arc::default(),
            deferred: defer::Deferred::default(),
            dirty_chunks: AtomicU64::new(0),
            write_budget: AtomicU64::new(data::DEFAULT_WRITE_BUDGET as u64),
            gc_lock: Mutex::new(()),
            background: Mutex::new(Vec::new()),
            pins,
            _pin: pin,
            barrier: RwLock::new(()),
            gc_pending: AtomicBool::new(false),
            epochs: Arc::default(),
            replicas: RwLock::new(Arc::from(Vec::new())),
        }
    }

    /// A read-only view of the tree at `epoch`, sharing the engine. The view pins its epoch:
    /// version GC keeps what it reads until it is dropped.
    pub fn view(&self, epoch: u64) -> Fs {
        let _meta = self.meta.lock();
        self.view_locked(epoch)
    }

    /// `view`, with `meta` held by the caller (the pin and GC's retained set agree).
    fn view_locked(&self, epoch: u64) -> Fs {
        *self.pins.lock().entry(epoch).or_insert(0) += 1;
        let pin = Pin {
            pins: self.pins.clone(),
            epoch,
        };
        let meta = MetaState {
            next_ino: 0,
            counters: Counters::default(),
            repl_seq: 0,
            epoch_on_disk: 0,
            unflushed: HashMap::new(),
        };
        Fs::assemble(
            self.eng.clone(),
            self.chunk_size,
            epoch,
            Some(epoch),
            meta,
            self.pins.clone(),
            Some(pin),
            self.cache.clone(),
        )
    }

    /// A pinned view of snapshot `name`: it reads the snapshot's bytes even if the snapshot
    /// is deleted while the view lives.
    pub fn snapshot_view(&self, name: &str) -> Result<Fs> {
        // A pending snapshot is waited for before `meta`: its completion takes `meta`.
        self.wait_snapshot(name)?;
        let _meta = self.meta.lock();
        let s = self.snapshot_record(name)?;
        Ok(self.view_locked(s.epoch))
    }

    /// The decoded-chunk cache (shared with every view).
    pub fn chunk_cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Epochs pinned by live views.
    pub(crate) fn pinned_epochs(&self) -> Vec<u64> {
        self.pins.lock().keys().copied().collect()
    }

    /// The epoch reads see.
    pub(crate) fn view_epoch(&self) -> u64 {
        self.view
            .unwrap_or_else(|| self.epoch.load(Ordering::Acquire))
    }

    /// The epoch writes go to.
    pub(crate) fn write_epoch(&self) -> Result<u64> {
        if self.view.is_some() {
            return Err(FsError::ReadOnly);
        }
        Ok(self.epoch.load(Ordering::Acquire))
    }

    pub(crate) fn lock_meta(&self) -> MutexGuard<'_, MetaState> {
        self.meta.lock()
    }

    /// A counter as the database holds it (`02 name`); 0 if absent or unreadable.
    pub fn stored_counter(&self, name: &str) -> u64 {
        counter(&self.eng, name).ok().flatten().unwrap_or(0)
    }

    pub fn counters(&self) -> Counters {
        self.meta.lock().counters
    }

    /// The live payload of a versioned record at the view epoch, without its tag byte.
    pub(crate) fn get_rec(&self, rec: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_rec_at(rec, self.view_epoch())
    }

    pub(crate) fn get_rec_at(&self, rec: &[u8], epoch: u64) -> Result<Option<Vec<u8>>> {
        let exact = keys::versioned(rec, epoch);
        let found = match self.eng.get(Cf::Meta, &exact)? {
            Some(v) => Some(v),
            // Nothing older than the first epoch can exist: skip the seek.
            None if epoch == FIRST_EPOCH => None,
            None => match self.eng.seek(Cf::Meta, rec, &exact)? {
                Some((k, v)) if k.len() == rec.len() + keys::VERSION_LEN => Some(v),
                _ => None,
            },
        };
        Ok(found.and_then(untag))
    }

    /// Live records under `prefix` at the view epoch: (record part, payload).
    pub(crate) fn scan_recs(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_recs_from(prefix, prefix, usize::MAX)
    }

    /// Like `scan_recs`, starting at record part `from`, returning at most `limit` records.
    pub(crate) fn scan_recs_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let view = self.view_epoch();
        let mut out = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        for item in self.eng.reader()?.scan(Cf::Meta, prefix, from) {
            let (k, v) = item?;
            let (rec, epoch) = keys::split_version(&k);
            if epoch > view || last.as_deref() == Some(rec) {
                continue;
            }
            last = Some(rec.to_vec());
            if let Some(p) = untag(v) {
                out.push((rec.to_vec(), p));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The stored attributes of an inode (without the overlay of an open file's buffers).
    pub(crate) fn stored_attr(&self, ino: u64) -> Result<Attr> {
        self.stored_attr_at(ino, self.view_epoch())
    }

    /// `stored_attr` at `epoch`.
    pub(crate) fn stored_attr_at(&self, ino: u64, epoch: u64) -> Result<Attr> {
        let p = self
            .get_rec_at(&keys::inode_rec(ino), epoch)?
            .ok_or(FsError::NotFound)?;
        Attr::decode(ino, &p).ok_or_else(|| {
            log::error!("inode {ino}: record does not decode");
            FsError::Corrupt
        })
    }

    /// Current attributes, including the size and times of unsealed writes.
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let mut a = self.stored_attr(ino)?;
        if let Some(f) = self.open_file(ino) {
            let st = f.state.read();
            a.size = st.size;
            if let Some(t) = st.times_dirty {
                a.mtime = t;
                a.ctime = t;
            }
        }
        Ok(a)
    }

    /// Every open file, with its inode number.
    pub(crate) fn open_files(&self) -> Vec<(u64, Arc<OpenFile>)> {
        self.open
            .lock()
            .iter()
            .map(|(k, e)| (*k, e.file.clone()))
            .collect()
    }

    fn open_file(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.open.lock().get(&ino).map(|e| e.file.clone())
    }

    /// Registers a user of an inode's file state (an open handle or a transient operation).
    pub(crate) fn acquire(&self, ino: u64) -> Result<Arc<OpenFile>> {
        if let Some(f) = self.bump(ino) {
            return Ok(f);
        }
        // Creating the state happens under `meta`, so unlink sees a consistent table.
        let _meta = self.meta.lock();
        if let Some(f) = self.bump(ino) {
            return Ok(f);
        }
        let attr = self.stored_attr(ino)?;
        let file = Arc::new(OpenFile::new(attr.size));
        self.open.lock().insert(
            ino,
            OpenEntry {
                file: file.clone(),
                users: 1,
            },
        );
        Ok(file)
    }

    fn bump(&self, ino: u64) -> Option<Arc<OpenFile>> {
        let mut open = self.open.lock();
        let e = open.get_mut(&ino)?;
        e.users += 1;
        Some(e.file.clone())
    }

    pub(crate) fn is_open(&self, ino: u64) -> bool {
        self.open.lock().contains_key(&ino)
    }

    /// Drops one user; the last one seals buffers and purges an unlinked inode.
    pub(crate) fn unacquire(&self, ino: u64, file: &Arc<OpenFile>) -> Result<()> {
        self.unacquire_opt(ino, file, true)
    }

    /// `unacquire`; without `seal`, the buffers are sealed only if this is the last user.
    pub(crate) fn unacquire_opt(&self, ino: u64, file: &Arc<OpenFile>, seal: bool) -> Result<()> {
        let others = !seal && self.open.lock().get(&ino).is_some_and(|e| e.users > 1);
        let sealed = if others {
            Ok(())
        } else {
            self.seal_all(ino, file)
        };
        let mut meta = self.meta.lock();
        let last = {
            let mut open = self.open.lock();
            let e = open.get_mut(&ino).expect("acquired inode is in the table");
            e.users -= 1;
            if e.users == 0 {
                open.remove(&ino);
                true
            } else {
                false
            }
        };
        if last && self.view.is_none() {
            if let Ok(a) = self.stored_attr(ino) {
                if a.nlink == 0 {
                    let mut txn = Txn::new(self);
                    txn.purge_inode(ino)?;
                    txn.commit(&mut meta, false)?;
                }
            }
        }
        drop(meta);
        if last {
            // Buffers a failed seal left behind (its error was reported) leave the global
            // count with the file. After `meta`: the file state lock comes first.
            let mut st = file.state.write();
            let left = std::mem::take(&mut st.buffers).len();
            self.dirty_chunks.fetch_sub(left as u64, Ordering::AcqRel);
        }
        sealed
    }

    /// Deletes inodes that were unlinked while open when the last daemon stopped.
    fn clean_orphans(&self) -> Result<()> {
        let orphans: Vec<u64> = self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_ORPHAN], &[keys::P_ORPHAN])
            .map(|r| r.map(|(k, _)| keys::be_u64(&k[1..])))
            .collect::<Result<_>>()?;
        for ino in orphans {
            let mut meta = self.meta.lock();
            let mut txn = Txn::new(self);
            if matches!(self.stored_attr(ino), Ok(a) if a.nlink == 0) {
                txn.purge_inode(ino)?;
            }
            txn.clear_orphan(ino);
            txn.commit(&mut meta, true)?;
            log::info!("removed orphan inode {ino} (unlinked while open)");
        }
        Ok(())
    }

    /// Reads and verifies a chunk body.
    pub(crate) fn load_chunk(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.cache.get(id) {
            return Ok(d);
        }
        // Kernel readahead sends several requests inside one chunk at once: one of them loads
        // and verifies it, the others wait for that result.
        let slot = self.cache.loading.lock().entry(*id).or_default().clone();
        let mut guard = slot.lock();
        if let Some(d) = guard.as_ref() {
            return Ok(d.clone());
        }
        if let Some(d) = self.cache.get(id) {
            return Ok(d);
        }
        let r = self
            .eng
            .with_chunk(id, |stored| crate::storage::chunk::decode_local(id, stored))
            .map(|v| match (v, self.cache.remote.get()) {
                (None, Some(src)) => Some(self.fetch_remote(src.as_ref(), id)),
                (v, _) => v,
            })
            .and_then(|v| {
                v.ok_or_else(|| {
                    log::error!(
                        "chunk {} is referenced but missing",
                        crate::storage::chunk::hex(id)
                    );
                    FsError::Corrupt
                })
            })
            .and_then(|r| r)
            .or_else(|e| self.self_heal(id, e))
            .map(Arc::new);
        if let Ok(d) = &r {
            self.cache.insert(*id, d.clone());
            *guard = Some(d.clone());
        }
        drop(guard);
        self.cache.loading.lock().remove(id);
        r
    }

    /// A chunk from the store's remote source, checked against its id.
    fn fetch_remote(&self, src: &dyn ChunkSource, id: &ChunkId) -> Result<Vec<u8>> {
        let data = src.fetch(id).map_err(|e| {
            log::error!("chunk {}: {e}", crate::storage::chunk::hex(id));
            FsError::Io
        })?;
        if crate::storage::chunk::chunk_id(&data) != *id {
            log::error!(
                "chunk {} from the backend does not match its id",
                crate::storage::chunk::hex(id)
            );
            return Err(FsError::Corrupt);
        }
        Ok(data)
    }

    /// Seals every open file's buffers and makes everything durable. A file whose seal
    /// failed does not stop the others; the first error is returned after all were tried.
    pub fn sync_all(&self) -> Result<()> {
        let sealed = self.seal_open_files();
        // Every seal job has committed: pending snapshots can be recorded now (synced below).
        self.complete_pending();
        self.eng.sync()?;
        sealed
    }

    /// Seals the buffers of every open file (not synced). Every file is tried: one file with
    /// a sticky seal error (already reported to its writer) neither leaves the files after it
    /// unsealed nor hides them. Returns the first error.
    pub(crate) fn seal_open_files(&self) -> Result<()> {
        let mut first = Ok(());
        for (ino, f) in self.open_files() {
            if let Err(e) = self.seal_all(ino, &f) {
                log::warn!("inode {ino}: cannot seal its buffers: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Regular files with a handle open O_RDWR: the only ones a process can have mapped
    /// `MAP_SHARED` and writable, so the only ones whose dirty pages may still be in the
    /// kernel (the snapshot's writeback barrier; a mapping keeps its file open).
    pub fn mappable_inodes(&self) -> Vec<u64> {
        self.open
            .lock()
            .iter()
            .filter(|(_, e)| e.file.read_write.load(Ordering::Acquire) > 0)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Makes every metadata change applied so far durable (fsyncdir).
    pub fn sync_metadata(&self) -> Result<()> {
        self.eng.sync()
    }

    /// Seals, collects garbage and flushes memtables; the store is clean after this.
    pub fn shutdown(&self) -> Result<()> {
        self.sync_all()?;
        self.collect_garbage()?;
        self.eng.flush_all()
    }

    /// After a failed write wedged the engine (a full disk): reopens it in place, reloads
    /// what this instance keeps of the database in memory (the epoch, the inode counter and
    /// the space counters: a batch whose write reported an error may still have reached the
    /// WAL), and only then accepts writes again. Ok(false) if the engine was healthy.
    /// Open files keep their unsealed buffers; a file whose seal failed keeps its sticky
    /// error until it is closed.
    pub fn recover_engine(&self) -> std::result::Result<bool, String> {
        if self.eng.health() == crate::storage::engine::Health::Healthy {
            return Ok(false);
        }
        self.eng.reopen()?;
        let mut meta = self.meta.lock();
        let (epoch, stored) = load_state(&self.eng)
            .map_err(|e| format!("cannot reload the counters after a reopen: {e}"))?;
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        meta.epoch_on_disk = epoch;
        meta.next_ino = meta.next_ino.max(stored.next_ino);
        meta.counters = stored.counters;
        meta.repl_seq = meta.repl_seq.max(stored.repl_seq);
        self.eng.resume();
        Ok(true)
    }

    /// Bytes of the blob files that hold chunk bodies, and how many of them are garbage
    /// (deleted chunks in files that still hold live ones; `Engine::reclaim_chunk_space`).
    pub fn blob_space(&self) -> (u64, u64) {
        self.eng.blob_space()
    }

    /// Frees chunks whose reference count dropped to zero.
    pub fn collect_garbage(&self) -> Result<u64> {
        if self.view.is_some() {
            return Ok(0);
        }
        let _gc = self.gc_lock.lock();
        let ids: Vec<ChunkId> = self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_FREE], &[keys::P_FREE])
            .map(|r| r.map(|(k, _)| k[1..33].try_into().expect("32-byte id")))
            .collect::<Result<_>>()?;
        let mut freed = 0;
        for batch in ids.chunks(256) {
            let mut meta = self.meta.lock();
            let mut txn = Txn::new(self);
            for id in batch {
                // A body written ahead of its parked commit: its marker is its intent.
                if meta.unflushed.contains_key(id) {
                    continue;
                }
                if txn.free_if_unreferenced(id)? {
                    freed += 1;
                }
            }
            txn.commit(&mut meta, false)?;
        }
        if freed > 0 {
            self.eng.reclaim_chunk_space()?;
        }
        Ok(freed)
    }
}

/// Strips the tag byte; None for a tombstone.
fn untag(mut v: Vec<u8>) -> Option<Vec<u8>> {
    match v.first() {
        Some(&TAG_LIVE) => {
            v.remove(0);
            Some(v)
        }
        Some(&TAG_TOMBSTONE) | None => None,
        Some(t) => {
            log::error!("record with unknown tag {t}");
            None
        }
    }
}

/// Validates a name for a new directory entry.
pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
