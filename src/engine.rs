//! The storage engine boundary: the only module that names RocksDB.
//!
//! Two column families: `meta` (every key of `keys.rs`) and `chunks` (sealed chunk bodies,
//! kept out of compaction by integrated BlobDB). Writes go through `Batch`, which is applied
//! atomically; `sync = true` returns only after the WAL is fsynced.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    DBRecoveryMode, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::error::{FsError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cf {
    Meta,
    Chunks,
}

const CF_META: &str = "meta";
const CF_CHUNKS: &str = "chunks";

/// Values at least this large go to blob files, not SSTs.
const MIN_BLOB_SIZE: u64 = 16 * 1024;

pub struct Engine {
    db: DB,
}

pub struct Batch {
    wb: WriteBatch,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            wb: WriteBatch::default(),
        }
    }

    /// A batch whose buffer is allocated once (a chunk body would otherwise regrow it).
    pub fn with_capacity(bytes: usize) -> Batch {
        Batch {
            wb: WriteBatch::with_capacity_bytes(bytes),
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
    o.set_max_total_wal_size(512 << 20);
    o.set_bytes_per_sync(8 << 20);
    o.set_wal_bytes_per_sync(8 << 20);
    o
}

fn meta_options() -> Options {
    let mut o = base_options();
    o.set_compression_type(DBCompressionType::Lz4);
    o.set_write_buffer_size(64 << 20);
    let mut bb = BlockBasedOptions::default();
    bb.set_block_cache(&Cache::new_lru_cache(64 << 20));
    bb.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&bb);
    o
}

fn chunk_options() -> Options {
    let mut o = base_options();
    // Chunks are compressed (or found incompressible) before they get here.
    o.set_compression_type(DBCompressionType::None);
    o.set_enable_blob_files(true);
    o.set_min_blob_size(MIN_BLOB_SIZE);
    o.set_blob_file_size(256 << 20);
    o.set_blob_compression_type(DBCompressionType::None);
    // Blob GC relocates live blobs during every compaction that touches old blob files: on a
    // fresh 1 GiB write that was a full second copy of the data (perf). Space is reclaimed
    // explicitly instead (`reclaim_chunk_space`).
    o.set_enable_blob_gc(false);
    o.set_write_buffer_size(128 << 20);
    o.set_max_write_buffer_number(4);
    o
}

impl Engine {
    pub fn open(path: &Path) -> std::result::Result<Engine, String> {
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_META, meta_options()),
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_options()),
        ];
        let db = DB::open_cf_descriptors(&base_options(), path, cfs)
            .map_err(|e| format!("cannot open the RocksDB store at {}: {e}", path.display()))?;
        Ok(Engine { db })
    }

    fn cf(&self, cf: Cf) -> &ColumnFamily {
        let name = match cf {
            Cf::Meta => CF_META,
            Cf::Chunks => CF_CHUNKS,
        };
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Runs `f` on a value in place (no copy out of RocksDB's buffer).
    pub fn with_value<R>(
        &self,
        cf: Cf,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        Ok(self.db.get_pinned_cf(self.cf(cf), key)?.map(|v| f(&v)))
    }

    pub fn exists(&self, cf: Cf, key: &[u8]) -> Result<bool> {
        Ok(self.db.get_pinned_cf(self.cf(cf), key)?.is_some())
    }

    /// The first entry with key in `[from, end of prefix)`.
    pub fn seek(&self, cf: Cf, prefix: &[u8], from: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut it = self.scan(cf, prefix, from);
        it.next().transpose()
    }

    /// Iterates the entries whose key starts with `prefix`, beginning at `from`.
    pub fn scan<'a>(&'a self, cf: Cf, prefix: &[u8], from: &[u8]) -> Scan<'a> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(crate::keys::prefix_end(prefix));
        let it = self.db.iterator_cf_opt(
            self.cf(cf),
            ro,
            IteratorMode::From(from, Direction::Forward),
        );
        Scan { it }
    }

    /// Iterates the entries with keys in `[start, end)`.
    pub fn scan_range<'a>(&'a self, cf: Cf, start: &[u8], end: &[u8]) -> Scan<'a> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let it = self.db.iterator_cf_opt(
            self.cf(cf),
            ro,
            IteratorMode::From(start, Direction::Forward),
        );
        Scan { it }
    }

    pub fn put(&self, b: &mut Batch, cf: Cf, key: &[u8], value: &[u8]) {
        b.wb.put_cf(self.cf(cf), key, value);
    }

    pub fn delete(&self, b: &mut Batch, cf: Cf, key: &[u8]) {
        b.wb.delete_cf(self.cf(cf), key);
    }

    pub fn write(&self, b: Batch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(b.wb, &wo)?)
    }

    /// Makes every write applied so far durable.
    pub fn sync(&self) -> Result<()> {
        Ok(self.db.flush_wal(true)?)
    }

    /// Flushes memtables to SST and blob files, so a clean shutdown leaves an empty WAL.
    pub fn flush_all(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        self.db.flush_cf(self.cf(Cf::Meta))?;
        self.db.flush_cf(self.cf(Cf::Chunks))?;
        Ok(())
    }

    /// Returns the space of deleted chunks to the disk: a compaction of the chunk column
    /// family drops the deleted entries, and RocksDB deletes every blob file whose blobs are
    /// all garbage. Live blobs are not rewritten (blob GC stays off), so this costs the size
    /// of the chunk index, not of the data; a blob file that still holds one live chunk keeps
    /// its space until that chunk goes.
    pub fn reclaim_chunk_space(&self) -> Result<()> {
        let cf = self.cf(Cf::Chunks);
        self.db.flush_cf(cf)?;
        self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Bytes on disk held by the chunk column family (SSTs and blob files).
    pub fn chunk_disk_bytes(&self) -> u64 {
        let cf = self.cf(Cf::Chunks);
        let sst = self
            .db
            .property_int_value_cf(cf, "rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0);
        let blob = self
            .db
            .property_int_value_cf(cf, "rocksdb.total-blob-file-size")
            .ok()
            .flatten()
            .unwrap_or(0);
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
