//! The deferred commit: chunk bodies written once, without the WAL, and their metadata
//! committed only after one flush has made them durable.
//!
//! Before, a sealed chunk went into one batch with its metadata: RocksDB wrote the body to the
//! WAL and then, at the memtable flush, again to a blob file, so every byte reached the disk
//! twice. Now a full chunk of a file past its first `DEFER_FROM_INDEX` chunks takes this path:
//!
//! 1. The sealer hashes it. Under `meta` it asks whether the chunk exists (refcount) or is
//!    already being written ahead by another job (`MetaState::unflushed`); if neither, it
//!    records the id in `unflushed`, so garbage collection leaves it alone.
//! 2. Outside every lock it compresses the chunk, logs a free-queue marker `22 id` (a small
//!    WAL record: the intent), and writes the body into the chunk column family without the
//!    WAL (`Engine::write_unlogged`).
//! 3. It parks the job: the chunk stays in the file's `sealing` map (readers find it there)
//!    and the job stays counted in the file's `inflight`.
//! 4. A group commit (`take_and_commit`) takes every parked job, flushes the chunk column
//!    family once (`Engine::flush_chunks`: the bodies reach blob files and the MANIFEST, both
//!    synced), and then commits each job's metadata as before: map entry, reference, inode
//!    size and times, with `Body::Written` in place of the bytes. The refcount's creation
//!    deletes the marker. Then the job is finished as any other.
//!
//! A group commit runs when the parked bytes reach `DEFER_BYTES`, when a sealer has had no
//! job for `IDLE_COMMIT`, and whenever someone waits for a file's jobs (`wait_sealed`: flush,
//! fsync, release, truncate, snapshot). So close(2) still returns only after the file's data
//! is committed (and survives kill -9), and fsync's WAL sync covers it.
//!
//! Crash analysis (docs/design.md §7 has it with the rest):
//! - Before the flush: the bodies were only in the memtable and are gone; no metadata names
//!   them; a marker whose WAL record survived has neither refcount nor body, and garbage
//!   collection deletes it.
//! - After the flush, before the metadata commit: a durable body without a refcount. Its marker
//!   is durable too: it was logged before the body, and a flush of one column family of
//!   several first syncs the WAL files it closes. Garbage collection frees such a body
//!   (`Txn::free_if_unreferenced`).
//! - After the commit: as an ordinary seal. Power loss keeps a prefix of the WAL, and every
//!   commit naming a written-ahead body was logged after the flush that made it durable, so
//!   no prefix holds a reference to a missing body.
//! - An engine reopen (ENOSPC recovery) drops unflushed memtables: a job written ahead at an
//!   older engine generation is committed with its body in the batch (`Body::Written`).

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::error::Result;
use crate::storage::chunk;
use crate::storage::engine::{Batch, Cf};
use crate::storage::keys::{self, MapEntry};

use super::data::SealJob;
use super::txn::Body;
use super::{Fs, MetaState};

/// Chunks of a file below this index are committed with their body in the batch, as
/// before: small files (most of a dataset's) never wait for a flush at close(2).
pub(crate) const DEFER_FROM_INDEX: u64 = 4;
/// Parked bytes (uncompressed) that start a group commit on the committer thread.
pub(crate) const DEFER_BYTES: usize = 64 << 20;
/// Parked bytes at which a sealer commits itself, holding its writers back.
pub(crate) const BACKPRESSURE_BYTES: usize = 4 * DEFER_BYTES;
/// A sealer that had no job for this long commits what is parked.
pub(crate) const IDLE_COMMIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A seal job whose body was written ahead (or already existed), waiting for its commit.
struct Parked {
    job: SealJob,
    entry: MapEntry,
    body: Body,
    /// This job wrote the body without the WAL (and holds its `unflushed` entry).
    ahead: bool,
}

#[derive(Default)]
pub(crate) struct Deferred {
    /// Parked jobs in the order they were parked (two jobs of one chunk park in the order
    /// they were queued: one sealer thread handles both).
    jobs: Mutex<Vec<Parked>>,
    /// Wakes the committer thread when `DEFER_BYTES` are parked. Shared with that thread,
    /// which waits on it without holding the filesystem (whose drop closes the engine).
    wake: std::sync::Arc<(Mutex<()>, parking_lot::Condvar)>,
    /// Uncompressed bytes of the parked jobs.
    bytes: AtomicUsize,
    /// Serializes group commits, so they commit in the order their jobs parked.
    commit: Mutex<()>,
    /// Chunks stored raw and queued for compression behind the writer (`compress.rs`), and
    /// their raw bytes: counted at the commit that queues them, recounted from the queue
    /// when the compressor starts.
    pub(crate) later_chunks: std::sync::atomic::AtomicU64,
    pub(crate) later_bytes: std::sync::atomic::AtomicU64,
}

impl Deferred {
    pub(crate) fn queued_for_compression(&self, (chunks, bytes): (u64, u64)) {
        self.later_chunks.fetch_add(chunks, Ordering::AcqRel);
        self.later_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    /// One queued chunk of `raw` bytes left the compression queue.
    pub(crate) fn compressed(&self, raw: u32) {
        let sub = |n: u64| move |v: u64| Some(v.saturating_sub(n));
        let _ = self
            .later_chunks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, sub(1));
        let _ = self
            .later_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, sub(raw as u64));
    }
}

/// Jobs done by a group commit, to be finished (`data::finish_job`) by the caller.
pub(crate) type Done = Vec<(SealJob, Result<()>)>;

impl Fs {
    /// Whether a job takes the deferred path.
    pub(crate) fn defers(&self, job: &SealJob) -> bool {
        job.idx >= DEFER_FROM_INDEX && self.view.is_none()
    }

    /// Parked jobs and their uncompressed bytes (the write path's figures).
    pub(crate) fn parked(&self) -> (u64, u64) {
        (
            self.deferred.jobs.lock().len() as u64,
            self.deferred.bytes.load(Ordering::Acquire) as u64,
        )
    }

    /// Writes a job's body ahead and parks it; returns the jobs a group commit (started when
    /// the parked bytes reached `DEFER_BYTES`) or a failure finished.
    pub(crate) fn park(&self, job: SealJob) -> Done {
        let (entry, body, ahead) = match self.write_ahead(&job) {
            Ok(p) => p,
            Err(e) => return vec![(job, Err(e))],
        };
        let n = job.data.len();
        let parked = {
            // The list, then the file's count: `take_and_commit` takes them in the same order,
            // so a job is never taken before it is counted.
            let mut jobs = self.deferred.jobs.lock();
            // Counted before the list lock is released: a group commit that takes this job
            // subtracts its bytes after this (counted outside the lock, a commit on another
            // thread could subtract first; the counter wrapped and the add below overflowed:
            // a sealer panicked and its queued jobs were never finished).
            let parked = self.deferred.bytes.fetch_add(n, Ordering::AcqRel) + n;
            let file = job.file.clone();
            jobs.push(Parked {
                job,
                entry,
                body,
                ahead,
            });
            let _n = file.inflight.lock();
            file.parked.fetch_add(1, Ordering::AcqRel);
            file.idle.notify_all();
            parked
        };
        if parked >= BACKPRESSURE_BYTES {
            // The committer is behind (a slow disk): this sealer commits, and its writers wait.
            return self.take_and_commit();
        }
        if parked >= DEFER_BYTES {
            self.deferred.wake.1.notify_one();
        }
        Vec::new()
    }

    /// Starts the committer thread: it runs a group commit when `DEFER_BYTES` are parked, and
    /// every `IDLE_COMMIT` if anything is, so the sealers go on hashing and writing ahead
    /// while a flush is synced. It ends when the filesystem is dropped.
    pub(crate) fn start_committer(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        let wake = self.deferred.wake.clone();
        let spawned = std::thread::Builder::new()
            .name("snapfs-commit".into())
            .spawn(move || loop {
                {
                    // A wake-up lost between the check and the wait costs one IDLE_COMMIT.
                    let mut g = wake.0.lock();
                    wake.1.wait_for(&mut g, IDLE_COMMIT);
                }
                let Some(fs) = weak.upgrade() else { return };
                if fs.deferred.bytes.load(Ordering::Acquire) == 0 {
                    continue;
                }
                let done = fs.take_and_commit();
                // The strong reference ends before the jobs are marked done (as in the
                // sealers): a waiter may drop the last one and close the engine.
                drop(fs);
                for (job, r) in done {
                    super::data::finish_job(job, r);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the group-commit thread: {e}; sealers commit instead");
        }
    }

    /// Hashes the chunk and, if the store lacks it, writes its body without the WAL.
    fn write_ahead(&self, job: &SealJob) -> Result<(MapEntry, Body, bool)> {
        let id = chunk::chunk_id(&job.data);
        let entry = MapEntry {
            id,
            len: job.data.len() as u32,
        };
        {
            let mut meta = self.lock_meta();
            if meta.unflushed.contains_key(&id)
                || self.eng.exists(Cf::Meta, &keys::refcount_key(&id))?
            {
                // Stored, or being written ahead by another job: the commit adds a
                // reference (and writes the body itself if the chunk is gone by then).
                return Ok((entry, Body::Raw(job.data.clone()), false));
            }
            meta.unflushed.insert(id, 1);
        }
        // Read before the write: a reopen after this point makes the commit write it again.
        let generation = self.eng.generation();
        match self.write_body_unlogged(&id, &job.data) {
            Ok((stored, later)) => Ok((
                entry,
                Body::Written {
                    raw: job.data.clone(),
                    stored,
                    generation,
                    later,
                },
                true,
            )),
            Err(e) => {
                self.lock_meta().unflushed.remove(&id);
                Err(e)
            }
        }
    }

    /// The intent (a logged free-queue marker), then the body without the WAL. Returns the
    /// stored length, and whether the body was stored raw to be compressed behind the
    /// writer: only a chunk that compresses to half or less is compressed here.
    pub(super) fn write_body_unlogged(
        &self,
        id: &keys::ChunkId,
        raw: &[u8],
    ) -> Result<(u32, bool)> {
        let plan = chunk::plan_compression(raw);
        let compressed = match plan {
            chunk::Compression::Now => chunk::compress(id, raw),
            chunk::Compression::Later | chunk::Compression::Never => None,
        };
        let later = plan == chunk::Compression::Later;
        let enc = compressed.unwrap_or_else(|| chunk::encode_raw(id, raw));
        let mut intent = Batch::new();
        self.eng
            .put(&mut intent, Cf::Meta, &keys::free_key(id), &[]);
        self.eng.write(intent, false)?;
        let mut body = Batch::with_capacity(enc.len() + 128);
        self.eng.put(&mut body, Cf::Chunks, id, &enc);
        self.eng.write_unlogged(body)?;
        Ok((enc.len() as u32, later))
    }

    /// `commit_parked` for a waiter on `file`'s jobs: if the group commit it waited for
    /// committed all of them, it starts none of its own.
    pub(crate) fn commit_parked_for(&self, file: Option<&super::OpenFile>) {
        for (job, r) in self.take_and_commit_for(file) {
            super::data::finish_job(job, r);
        }
    }

    /// Commits every parked job: one flush of the chunk column family, then each job's
    /// metadata, in the order they parked. The caller finishes the returned jobs.
    pub(crate) fn take_and_commit(&self) -> Done {
        self.take_and_commit_for(None)
    }

    fn take_and_commit_for(&self, file: Option<&super::OpenFile>) -> Done {
        let _one = self.deferred.commit.lock();
        if file.is_some_and(|f| f.parked.load(Ordering::Acquire) == 0) {
            // The group commit waited for committed the file's jobs.
            return Vec::new();
        }
        let jobs = self.take_parked();
        if jobs.is_empty() {
            return Vec::new();
        }
        let ahead = jobs.iter().filter(|p| p.ahead).count();
        fail::fail_point!("group-commit-before-flush");
        let flushed = if ahead > 0 {
            self.eng.flush_chunks()
        } else {
            Ok(())
        };
        if let Err(e) = flushed {
            log::error!("flushing {ahead} written-ahead chunks failed: {e}");
        }
        // One job per hold of `meta`, so writers' commits interleave with a long group commit.
        jobs.into_iter()
            .map(|p| self.commit_one(&mut self.lock_meta(), p, flushed))
            .collect()
    }

    /// The parked list, emptied; its bytes uncounted.
    fn take_parked(&self) -> Vec<Parked> {
        let jobs = std::mem::take(&mut *self.deferred.jobs.lock());
        let bytes: usize = jobs.iter().map(|p| p.job.data.len()).sum();
        self.deferred.bytes.fetch_sub(bytes, Ordering::AcqRel);
        jobs
    }

    fn commit_one(
        &self,
        meta: &mut MetaState,
        p: Parked,
        flushed: Result<()>,
    ) -> (SealJob, Result<()>) {
        let Parked {
            job,
            entry,
            body,
            ahead,
        } = p;
        let r = flushed.and_then(|()| {
            let mut txn = job.txn(self, 0);
            txn.put_map(job.ino, job.idx, entry)?;
            txn.add_body(entry.id, body);
            job.apply_attr(&mut txn)?;
            txn.commit(meta, false)
        });
        if ahead {
            // Committed, or failed: either way garbage collection may judge it now (a
            // failed commit leaves a marker without a refcount: the body is freed).
            meta.unflushed.remove(&entry.id);
        }
        {
            // Parked until committed (`OpenFile::wait_sealed` commits while it is not 0).
            let _n = job.file.inflight.lock();
            job.file.parked.fetch_sub(1, Ordering::AcqRel);
        }
        (job, r)
    }
}
