//! The storage engine boundary: the only module that names RocksDB.
//!
//! Two column families: `meta` (every key of `keys.rs`) and `chunks` (sealed chunk bodies,
//! kept out of compaction by integrated BlobDB). Writes go through `Batch`, which is applied
//! atomically; `sync = true` returns only after the WAL is fsynced.
//!
//! Recovery from a failed write (docs/design.md, "A full disk"): once a write, WAL sync or
//! flush fails, RocksDB refuses every later write ("Writer has previous error") and this
//! build of it offers no `Resume()`. The engine then marks itself *wedged*: writes fail fast
//! with the error that wedged it, reads go on. `reopen` closes and reopens the database in
//! place (the WAL replays what was acknowledged); the filesystem above reloads its in-memory
//! counters and only then calls `resume`, so no commit runs on stale counters. The database
//! sits behind a reader-writer lock for that: every call holds it shared (recursively, so a
//! scan may nest a get), `reopen` holds it exclusively.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use parking_lot::{RwLock, RwLockReadGuard};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    DBRecoveryMode, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::error::{FsError, Result};
use crate::storage::space::Space;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cf {
    Meta,
    Chunks,
}

const CF_META: &str = "meta";
const CF_CHUNKS: &str = "chunks";

/// Values at least this large go to blob files, not SSTs.
const MIN_BLOB_SIZE: u64 = 16 * 1024;

/// Blob garbage below which live blobs are never relocated (`reclaim_chunk_space`).
const RELOCATE_MIN_GARBAGE: u64 = 256 << 20;

/// Engine health (`Engine::health`).
const HEALTHY: u8 = 0;
/// A write failed for want of space; writes fail with ENOSPC until `resume`.
const WEDGED_NO_SPACE: u8 = 1;
/// A write failed with another I/O error; writes fail with EIO until `resume`.
const WEDGED_IO: u8 = 2;

/// Below this much free space a metadata write releases the reserve before it runs.
const DELETE_HEADROOM: u64 = 1 << 20;

/// What the engine can do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Writes are refused since a write failed; `reopen` then `resume` recover.
    Wedged(FsError),
}

pub struct Engine {
    path: PathBuf,
    /// None only between the close and the open of a `reopen` that failed.
    db: RwLock<Option<DB>>,
    health: AtomicU8,
    /// Free space is below the floor (`storage::space`): operations that add data are refused.
    low_space: AtomicBool,
    /// The store's free-space guard, whose reserve a deletion or a reopen may need.
    space: std::sync::OnceLock<std::sync::Arc<Space>>,
    /// Incremented by every `reopen`: what was written without the WAL and not flushed
    /// before a reopen is gone (`write_unlogged`).
    generation: AtomicU64,
    /// `RELOCATE_MIN_GARBAGE`, settable for tests.
    relocate_min_garbage: AtomicU64,
}

pub struct Batch {
    wb: WriteBatch,
    /// An operation could not be added (the database was closed for a reopen).
    broken: Option<FsError>,
    /// The batch adds a chunk body: refused while free space is below the floor.
    grows: bool,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            wb: WriteBatch::default(),
            broken: None,
            grows: false,
        }
    }

    /// A batch whose buffer is allocated once (a chunk body would otherwise regrow it).
    pub fn with_capacity(bytes: usize) -> Batch {
        Batch {
            wb: WriteBatch::with_capacity_bytes(bytes),
            broken: None,
            grows: false,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.wb.size_in_bytes()
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}

impl From<rocksdb::Error> for FsError {
    fn from(e: rocksdb::Error) -> Self {
        let msg = e.to_string();
        log::error!("storage engine error: {msg}");
        if msg.contains("No space left") {
            FsError::NoSpace
        } else if e.kind() == rocksdb::ErrorKind::Corruption {
            FsError::Corrupt
        } else {
            FsError::Io
        }
    }
}

fn base_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Never skip corrupted WAL records: recovery stops at the first bad record.
    o.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    o.set_paranoid_checks(true);
    o.increase_parallelism(2);
    o.set_max_background_jobs(2);
    o.set_bytes_per_sync(8 << 20);
    o.set_wal_bytes_per_sync(8 << 20);
    o
}

/// The database-wide options. Recovery replays the WAL into memtables without flushing
/// them, so an open needs only a few KiB (a MANIFEST, an OPTIONS file, a new WAL): a store
/// on a full disk still opens, and its files can be deleted to make room.
fn db_options(max_wal: u64) -> std::result::Result<Options, String> {
    let mut o = base_options();
    // A WAL file goes only when every column family has flushed past it; past this total the
    // oldest is forced out (the metadata memtable fills slowly and would keep them all).
    o.set_max_total_wal_size(max_wal);
    o.get_options_from_string("avoid_flush_during_recovery=true")
        .map_err(|e| format!("internal: RocksDB rejected an option: {e}"))
        .map(|mut o| {
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            o
        })
}

/// Memtable sizes for a store on a filesystem of `fs_bytes`: 128 MiB for chunks (64 for
/// metadata) on any disk of 16 GiB or more, less on a smaller one (at most 1/128 of it, so
/// four of them fit in half of `storage::space`'s reserve). What the memtables hold lives only
/// in the WAL until a flush, and a flush needs free space for whatever is still live in them:
/// on a small filesystem large memtables would make a full disk unrecoverable, because
/// deleting a file frees nothing until the flush that cannot run.
fn memtable_bytes(fs_bytes: u64) -> (usize, usize) {
    let chunks = (fs_bytes / 128).clamp(1 << 20, 128 << 20) as usize;
    (chunks, (chunks / 2).max(1 << 20))
}

fn meta_options(write_buffer: usize) -> Options {
    let mut o = base_options();
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_write_buffer_size(write_buffer);
    let mut bb = BlockBasedOptions::default();
    bb.set_block_cache(&Cache::new_lru_cache(64 << 20));
    bb.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&bb);
    o
}

fn chunk_options(write_buffer: usize) -> Options {
    let mut o = base_options();
    // Chunks are compressed (or found incompressible) before they get here.
    o.set_compression_type(DBCompressionType::None);
    o.set_enable_blob_files(true);
    o.set_min_blob_size(MIN_BLOB_SIZE);
    o.set_blob_file_size(256 << 20);
    o.set_blob_compression_type(DBCompressionType::None);
    // Blob GC relocates live blobs during every compaction that touches old blob files: on a
    // fresh 1 GiB write that was a full second copy of the data (perf). Space is reclaimed
    // explicitly instead (`reclaim_chunk_space`), which turns it on for one compaction when
    // the garbage it would free is worth the copy.
    o.set_enable_blob_gc(false);
    o.set_write_buffer_size(write_buffer);
    o.set_max_write_buffer_number(4);
    o
}

fn open_db(path: &Path) -> std::result::Result<DB, String> {
    // The size of the filesystem the store is on (the directory may not exist yet).
    let fs_bytes = path
        .ancestors()
        .find_map(|p| crate::sys::statvfs(p).ok())
        .map_or(u64::MAX, |st| st.f_blocks * st.f_frsize);
    let (chunk_buf, meta_buf) = memtable_bytes(fs_bytes);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_META, meta_options(meta_buf)),
        ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_options(chunk_buf)),
    ];
    DB::open_cf_descriptors(&db_options(4 * chunk_buf as u64)?, path, cfs)
        .map_err(|e| format!("cannot open the RocksDB store at {}: {e}", path.display()))
}

/// A shared hold on the open database; scans borrow from it, so a `reopen` waits for them.
pub struct Reader<'a> {
    db: RwLockReadGuard<'a, Option<DB>>,
}

impl Reader<'_> {
    fn db(&self) -> &DB {
        self.db
            .as_ref()
            .expect("a Reader exists only over an open database")
    }

    fn cf(&self, cf: Cf) -> &ColumnFamily {
        let name = match cf {
            Cf::Meta => CF_META,
            Cf::Chunks => CF_CHUNKS,
        };
        self.db()
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Iterates the entries whose key starts with `prefix`, beginning at `from`.
    pub fn scan(&self, cf: Cf, prefix: &[u8], from: &[u8]) -> Scan<'_> {
        self.scan_range(cf, from, &crate::storage::keys::prefix_end(prefix))
    }

    /// Iterates the entries with keys in `[start, end)`.
    pub fn scan_range(&self, cf: Cf, start: &[u8], end: &[u8]) -> Scan<'_> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let it = self.db().iterator_cf_opt(
            self.cf(cf),
            ro,
            IteratorMode::From(start, Direction::Forward),
        );
        Scan { it }
    }
}

impl Engine {
    pub fn open(path: &Path) -> std::result::Result<Engine, String> {
        let db = open_db(path)?;
        Ok(Engine {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            health: AtomicU8::new(HEALTHY),
            low_space: AtomicBool::new(false),
            space: std::sync::OnceLock::new(),
            generation: AtomicU64::new(0),
            relocate_min_garbage: AtomicU64::new(RELOCATE_MIN_GARBAGE),
        })
    }

    /// The directory RocksDB lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A shared hold on the database, for scans. Fails only while a failed `reopen` left
    /// the database closed.
    pub fn reader(&self) -> Result<Reader<'_>> {
        let db = self.db.read_recursive();
        if db.is_none() {
            return Err(self.wedge_error().unwrap_or(FsError::Io));
        }
        Ok(Reader { db })
    }

    pub fn health(&self) -> Health {
        match self.wedge_error() {
            None => Health::Healthy,
            Some(e) => Health::Wedged(e),
        }
    }

    fn wedge_error(&self) -> Option<FsError> {
        match self.health.load(Ordering::Acquire) {
            HEALTHY => None,
            WEDGED_NO_SPACE => Some(FsError::NoSpace),
            _ => Some(FsError::Io),
        }
    }

    /// Refuses an operation that would add data while the engine is wedged or free space is
    /// below the floor; deletions do not ask, so they go on while the disk is full.
    pub fn admit_growth(&self) -> Result<()> {
        self.check_writable()?;
        if self.low_space.load(Ordering::Acquire) {
            return Err(FsError::NoSpace);
        }
        Ok(())
    }

    /// Set by whoever watches free space (the daemon); returns the previous value.
    pub fn set_low_space(&self, low: bool) -> bool {
        self.low_space.swap(low, Ordering::AcqRel)
    }

    pub fn low_space(&self) -> bool {
        self.low_space.load(Ordering::Acquire)
    }

    /// Fails fast while wedged: RocksDB would refuse the write anyway.
    fn check_writable(&self) -> Result<()> {
        match self.wedge_error() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// A write-path error: the engine is wedged from here on (see the module doc).
    fn failed(&self, e: rocksdb::Error) -> FsError {
        let fe = FsError::from(e);
        let state = if fe == FsError::NoSpace {
            WEDGED_NO_SPACE
        } else {
            WEDGED_IO
        };
        if self
            .health
            .compare_exchange(HEALTHY, state, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            log::error!(
                "storage engine: a write failed ({fe}); writes are refused until it is reopened"
            );
        }
        fe
    }

    /// Gives the engine the store's free-space guard (`Store::open`).
    pub fn attach_space(&self, space: std::sync::Arc<Space>) {
        let _ = self.space.set(space);
    }

    /// Deletes the reserve file, if there is one (a deletion or a reopen needs its space).
    fn release_reserve(&self) -> bool {
        self.space.get().is_some_and(|s| s.release_reserve())
    }

    /// Closes and reopens the database in place, waiting for every reader to finish. The
    /// engine stays wedged (writes refused) until `resume`. An open needs a few KiB: on a
    /// disk with none, the reserve is released for it.
    pub fn reopen(&self) -> std::result::Result<(), String> {
        let mut db = self.db.write();
        drop(db.take());
        let opened = match open_db(&self.path) {
            Err(e) if e.contains("No space left") && self.release_reserve() => open_db(&self.path),
            r => r,
        };
        *db = Some(opened?);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Counts reopens: a body written by `write_unlogged` at one generation is in the
    /// database at a later one only if `flush_chunks` returned between the two.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Accepts writes again (after `reopen`, once the layer above has reloaded its state).
    pub fn resume(&self) {
        if self.health.swap(HEALTHY, Ordering::AcqRel) != HEALTHY {
            log::info!("storage engine: writes accepted again");
        }
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let r = self.reader()?;
        Ok(r.db().get_cf(r.cf(cf), key)?)
    }

    /// Runs `f` on a value in place (no copy out of RocksDB's buffer).
    pub fn with_value<R>(
        &self,
        cf: Cf,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        let r = self.reader()?;
        let v = r.db().get_pinned_cf(r.cf(cf), key)?;
        Ok(v.map(|v| f(&v)))
    }

    /// `with_value` for a chunk body that `f` verifies itself (its `check`, and its blake3 id
    /// where the caller needs it; `storage::chunk`), read without RocksDB's record checksum (a
    /// CRC32C over every byte): the body's own checks catch every corruption the CRC would, so
    /// the CRC was a second pass over each byte read, 10% of the daemon's CPU in a cold read
    /// (docs/benchmarks.md, "Cold reads"). A body that does not verify is corruption either
    /// way; a blob index or record damaged past parsing is still an error from RocksDB.
    pub fn with_chunk<R>(&self, id: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        let r = self.reader()?;
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(false);
        let v = r.db().get_pinned_cf_opt(r.cf(Cf::Chunks), id, &ro)?;
        Ok(v.map(|v| f(&v)))
    }

    pub fn exists(&self, cf: Cf, key: &[u8]) -> Result<bool> {
        let r = self.reader()?;
        let found = r.db().get_pinned_cf(r.cf(cf), key)?.is_some();
        Ok(found)
    }

    /// The first entry with key in `[from, end of prefix)`.
    pub fn seek(&self, cf: Cf, prefix: &[u8], from: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let r = self.reader()?;
        let mut it = r.scan(cf, prefix, from);
        it.next().transpose()
    }

    pub fn put(&self, b: &mut Batch, cf: Cf, key: &[u8], value: &[u8]) {
        b.grows |= cf == Cf::Chunks;
        match self.reader() {
            Ok(r) => b.wb.put_cf(r.cf(cf), key, value),
            Err(e) => b.broken = Some(e),
        }
    }

    pub fn delete(&self, b: &mut Batch, cf: Cf, key: &[u8]) {
        match self.reader() {
            Ok(r) => b.wb.delete_cf(r.cf(cf), key),
            Err(e) => b.broken = Some(e),
        }
    }

    /// Applies a batch atomically. Below the floor a batch that adds a chunk body is refused
    /// (ENOSPC, the engine stays healthy), so the space left is for metadata and deletions;
    /// when one of those fails for want of space, the reserve is released for its retry.
    pub fn write(&self, b: Batch, sync: bool) -> Result<()> {
        self.write_with(b, sync, false)
    }

    /// Applies a batch of chunk bodies without writing it to the WAL: the bytes reach the
    /// disk once, in the blob file of the next flush of the chunk column family. A crash
    /// before `flush_chunks` returns loses them (and `reopen` does too: `generation`), so
    /// nothing may reference them until it has (the deferred commit, `fs::defer`).
    pub fn write_unlogged(&self, b: Batch) -> Result<()> {
        self.write_with(b, false, true)
    }

    fn write_with(&self, b: Batch, sync: bool, no_wal: bool) -> Result<()> {
        self.check_writable()?;
        if let Some(e) = b.broken {
            return Err(e);
        }
        if let Some(space) = self.space.get() {
            let free = space.free().map_or(u64::MAX, |f| f.free_bytes);
            if b.grows {
                // Measured for every chunk: the daemon's once-a-second watch is too slow to
                // stop a streaming writer before the disk is full.
                let low = space.is_low(free);
                self.low_space.store(low, Ordering::Release);
                if low {
                    return Err(FsError::NoSpace);
                }
            } else if self.low_space() && free < DELETE_HEADROOM {
                // A deletion (or any metadata change) on a disk that something else filled:
                // the reserve is for this.
                space.release_reserve();
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        wo.disable_wal(no_wal);
        let r = self.reader()?;
        let grows = b.grows;
        r.db().write_opt(b.wb, &wo).map_err(|e| {
            let fe = self.failed(e);
            if fe == FsError::NoSpace && !grows {
                self.release_reserve();
            }
            fe
        })
    }

    /// Makes every write applied so far durable.
    pub fn sync(&self) -> Result<()> {
        self.check_writable()?;
        // A deliberately broken build for tests/powerloss.rs, which must catch it: fsync
        // acknowledged without syncing. Compiled only with the `failpoints` feature.
        #[cfg(feature = "failpoints")]
        if std::env::var_os("SNAPFS_TEST_UNSAFE_FSYNC").is_some() {
            return Ok(());
        }
        let r = self.reader()?;
        r.db().flush_wal(true).map_err(|e| self.failed(e))
    }

    /// Flushes the chunk column family's memtables to blob and SST files and waits until the
    /// flush is installed: every body written before it, with or without the WAL, is then on
    /// stable storage (RocksDB syncs the files and the MANIFEST; with more than one column
    /// family it also syncs the WAL files the flush closes, so every record logged before a
    /// body is as durable as the body).
    pub fn flush_chunks(&self) -> Result<()> {
        self.check_writable()?;
        let r = self.reader()?;
        r.db()
            .flush_cf(r.cf(Cf::Chunks))
            .map_err(|e| self.failed(e))
    }

    /// Flushes memtables to SST and blob files, so a clean shutdown leaves an empty WAL.
    pub fn flush_all(&self) -> Result<()> {
        self.check_writable()?;
        let r = self.reader()?;
        let db = r.db();
        db.flush_wal(true).map_err(|e| self.failed(e))?;
        db.flush_cf(r.cf(Cf::Meta)).map_err(|e| self.failed(e))?;
        db.flush_cf(r.cf(Cf::Chunks)).map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// Returns the space of deleted chunks to the disk: a compaction of the chunk column
    /// family drops the deleted entries, and RocksDB deletes every blob file whose blobs are
    /// all garbage. Live blobs are not rewritten (blob GC stays off), so this costs the size
    /// of the chunk index, not of the data; a blob file that still holds one live chunk keeps
    /// its space until that chunk goes.
    ///
    /// That last case is what `relocate_live_blobs` bounds: once the garbage in blob files
    /// that also hold live chunks is at least half of all blob bytes (and at least
    /// `RELOCATE_MIN_GARBAGE`), the live blobs are copied to new files and the old ones go.
    /// A small file written beside a large one (a training log beside a checkpoint) would
    /// otherwise keep the deleted checkpoint's blob files forever. Disk use of the chunks
    /// stays under about twice their live bytes, plus that minimum.
    pub fn reclaim_chunk_space(&self) -> Result<()> {
        self.check_writable()?;
        {
            let r = self.reader()?;
            let cf = r.cf(Cf::Chunks);
            r.db().flush_cf(cf).map_err(|e| self.failed(e))?;
            // The deleted chunks' bytes also sit in WAL files, which go only once every column
            // family with entries in them has flushed.
            r.db()
                .flush_cf(r.cf(Cf::Meta))
                .map_err(|e| self.failed(e))?;
            r.db().compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        let (total, garbage) = self.blob_space();
        let min = self.relocate_min_garbage.load(Ordering::Relaxed);
        if garbage >= min && garbage.saturating_mul(2) >= total {
            self.relocate_live_blobs(total, garbage)?;
        }
        Ok(())
    }

    /// Bytes of the chunk column family's blob files, and how many of them are garbage
    /// (deleted chunks whose files still hold live ones), as RocksDB accounts them.
    pub fn blob_space(&self) -> (u64, u64) {
        let [total, garbage] = self.chunk_props([
            "rocksdb.live-blob-file-size",
            "rocksdb.live-blob-file-garbage-size",
        ]);
        (total, garbage)
    }

    /// Integer properties of the chunk column family (0 where RocksDB has none, or while the
    /// database is closed).
    fn chunk_props<const N: usize>(&self, names: [&str; N]) -> [u64; N] {
        let Ok(r) = self.reader() else {
            return [0; N];
        };
        let cf = r.cf(Cf::Chunks);
        names.map(|n| {
            r.db()
                .property_int_value_cf(cf, n)
                .ok()
                .flatten()
                .unwrap_or(0)
        })
    }

    /// Sets the garbage below which `reclaim_chunk_space` never relocates (tests use less).
    pub fn set_relocate_min_garbage(&self, bytes: u64) {
        self.relocate_min_garbage.store(bytes, Ordering::Relaxed);
    }

    /// One compaction of the whole chunk column family with blob GC on for every blob file:
    /// each live blob is written to a new file, and the old files, now all garbage, are
    /// deleted. Costs a write of the live bytes; skipped (logged) while free space could not
    /// hold them twice. While it runs (seconds per GiB of live chunks), blob GC is on for the
    /// column family, so background compactions that run meanwhile relocate the blobs they
    /// meet too, and a `reopen` waits for it. The setting is not persisted: a crash in the
    /// middle reopens with blob GC off.
    fn relocate_live_blobs(&self, total: u64, garbage: u64) -> Result<()> {
        let live = total.saturating_sub(garbage);
        let free = crate::sys::statvfs(&self.path)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0);
        if self.low_space() || free < live.saturating_add(1 << 30) {
            // Said once at warning level; every GC pass would repeat it.
            static SAID: AtomicBool = AtomicBool::new(false);
            let level = if SAID.swap(true, Ordering::Relaxed) {
                log::Level::Debug
            } else {
                log::Level::Warn
            };
            log::log!(
                level,
                "chunk space: {garbage} bytes of garbage share blob files with {live} live \
                 bytes; not relocating them with only {free} bytes free"
            );
            return Ok(());
        }
        log::info!(
            "chunk space: {garbage} of {total} blob bytes are garbage kept by live chunks in \
             the same files; relocating the {live} live bytes"
        );
        let r = self.reader()?;
        let cf = r.cf(Cf::Chunks);
        let set = |on: &str, cutoff: &str| {
            r.db().set_options_cf(
                cf,
                &[
                    ("enable_blob_garbage_collection", on),
                    ("blob_garbage_collection_age_cutoff", cutoff),
                ],
            )
        };
        set("true", "1.0").map_err(|e| self.failed(e))?;
        let mut co = rocksdb::CompactOptions::default();
        co.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        // Background compactions go on meanwhile, so writers are not held up by L0 files.
        co.set_exclusive_manual_compaction(false);
        r.db()
            .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &co);
        let reset = set("false", "0.25");
        drop(r);
        reset.map_err(|e| self.failed(e))?;
        let (total2, garbage2) = self.blob_space();
        log::info!(
            "chunk space: blob files {total} -> {total2} bytes ({garbage2} bytes of garbage left)"
        );
        Ok(())
    }

    /// Bytes on disk held by the chunk column family (SSTs and blob files).
    pub fn chunk_disk_bytes(&self) -> u64 {
        let [sst, blob] = self.chunk_props([
            "rocksdb.total-sst-files-size",
            "rocksdb.total-blob-file-size",
        ]);
        sst + blob
    }
}

pub struct Scan<'a> {
    it: rocksdb::DBIteratorWithThreadMode<'a, DB>,
}

impl Iterator for Scan<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.it.next().map(|r| {
            r.map(|(k, v)| (k.into_vec(), v.into_vec()))
                .map_err(FsError::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> [u8; 32] {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    fn val(i: u32) -> Vec<u8> {
        vec![(i % 251) as u8; 64 << 10]
    }

    /// Ten blob files, each with one live chunk among nine deleted ones: compaction alone
    /// frees nothing (every file holds a live blob); relocation frees the files.
    #[test]
    fn live_blobs_sharing_files_with_garbage_are_relocated() {
        let t = tempfile::tempdir().unwrap();
        let e = Engine::open(&t.path().join("db")).unwrap();
        for round in 0..10u32 {
            let mut b = Batch::new();
            for i in round * 10..round * 10 + 10 {
                e.put(&mut b, Cf::Chunks, &key(i), &val(i));
            }
            e.write(b, false).unwrap();
            e.flush_chunks().unwrap();
        }
        let full = e.chunk_disk_bytes();
        let mut b = Batch::new();
        for i in (0..100u32).filter(|i| i % 10 != 0) {
            e.delete(&mut b, Cf::Chunks, &key(i));
        }
        e.write(b, false).unwrap();
        // Below the default minimum of garbage: compacted, not relocated.
        e.reclaim_chunk_space().unwrap();
        let (total, garbage) = e.blob_space();
        assert!(
            garbage * 10 >= total * 8,
            "RocksDB accounts the deleted blobs as garbage: {garbage} of {total}"
        );
        assert!(e.chunk_disk_bytes() * 10 >= full * 9, "nothing freed yet");
        e.set_relocate_min_garbage(1 << 20);
        e.reclaim_chunk_space().unwrap();
        let after = e.chunk_disk_bytes();
        assert!(
            after * 5 <= full,
            "relocation frees the shared files: {full} -> {after} bytes"
        );
        for i in (0..100u32).step_by(10) {
            assert_eq!(
                e.get(Cf::Chunks, &key(i)).unwrap().unwrap(),
                val(i),
                "chunk {i}"
            );
        }
        for i in (0..100u32).filter(|i| i % 10 != 0) {
            assert!(e.get(Cf::Chunks, &key(i)).unwrap().is_none());
        }
    }
}
