//! File data: write buffers, sealing, reads, truncation, fsync.
//!
//! Seal path, for one chunk of one file:
//! 1. A write fills a chunk buffer. The writer moves it into the file's `sealing` map and the
//!    sealer's queue, and returns (backpressure: the queue is short). Reads find it there.
//! 2. The sealer thread hashes it (blake3) and, if the chunk store may lack it, compresses it
//!    (zstd), outside every lock. One thread keeps the jobs in order.
//! 3. It locks `meta`; in one batch: point the chunk-map record at the id (dropping the
//!    reference of the version it replaces at this epoch), add the reference, insert the body
//!    if the chunk is new, and store the inode's size and times. Then it drops the chunk from
//!    `sealing`: from now on readers find it through the chunk map.
//! 4. flush, fsync, release and truncate first wait for the file's queued jobs, then seal the
//!    partial buffers the same way inline; fsync then syncs the WAL before it returns.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{FsError, Result};
use crate::storage::chunk;
use crate::storage::engine::Cf;
use crate::storage::inode::{Kind, Time};
use crate::storage::keys::{self, MapEntry};

use super::txn::Body;
use super::{FileState, Fs, OpenFile, Txn};

/// A full chunk on its way to the sealer thread.
pub(crate) struct SealJob {
    pub(super) ino: u64,
    pub(super) file: Arc<OpenFile>,
    pub(super) idx: u64,
    pub(super) data: Arc<Vec<u8>>,
    pub(super) size: u64,
    pub(super) time: Time,
    /// The epoch the chunk was written in (it commits there), counted as outstanding until
    /// the job is dropped.
    pub(super) ticket: super::epochs::Ticket,
}

impl SealJob {
    pub(super) fn epoch(&self) -> u64 {
        self.ticket.epoch()
    }

    /// A transaction at this job's epoch.
    pub(super) fn txn<'a>(&self, fs: &'a Fs, bytes: usize) -> Txn<'a> {
        Txn::at_epoch(fs, self.epoch(), bytes)
    }

    /// The job's size and times into the inode. Sealers (and group commits) may commit out
    /// of order across chunks; sizes only shrink through truncate, which waits for every
    /// queued job first. A job committed after a snapshot moved the epoch also merges them
    /// into every newer version of the inode (written meanwhile by a chmod, a rename, a job
    /// of the newer epoch that committed first), which would otherwise lack them.
    pub(super) fn apply_attr(&self, txn: &mut Txn<'_>) -> Result<()> {
        let merge = |a: &mut crate::storage::inode::Attr| {
            a.size = a.size.max(self.size);
            a.mtime = a.mtime.max(self.time);
            a.ctime = a.ctime.max(self.time);
        };
        let mut a = txn.attr(self.ino)?;
        merge(&mut a);
        txn.put_attr(a);
        for (e, mut a) in txn.newer_attrs(self.ino)? {
            merge(&mut a);
            txn.put_attr_version(e, &a);
        }
        Ok(())
    }
}

/// Chunks queued per sealer thread (backpressure on fast writers). The queues themselves are
/// unbounded: a writer waits for room *before* it takes the snapshot barrier
/// (`wait_for_sealers`), so that a sealer held in a slow group commit never holds a snapshot
/// behind a writer blocked under the barrier, and a snapshot queues its frozen buffers
/// without waiting.
const SEAL_QUEUE: usize = 2;
/// Sealer threads. A chunk index always goes to the same thread, so two seals of one chunk
/// commit in the order they were queued; hashing and compression of different chunks overlap.
const SEALERS: usize = 2;

pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Unsealed buffers all open files may hold (`mount --write-buffer`) before a write seals
/// its own file's buffers inline (back-pressure on the writers that hold them).
pub const DEFAULT_WRITE_BUDGET: usize = 1 << 30;

/// The most one copy_file_range request copies (`copy_range`).
const COPY_MAX: u64 = 64 << 20;

pub const FALLOC_KEEP_SIZE: i32 = 0x01;
pub const FALLOC_PUNCH_HOLE: i32 = 0x02;

/// Bytes returned by a read: a window into a shared, verified chunk, or an assembled buffer.
pub struct ReadBuf {
    data: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn empty() -> ReadBuf {
        ReadBuf {
            data: Arc::new(Vec::new()),
            start: 0,
            end: 0,
        }
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
}

/// An open file handle as the core sees it.
pub struct Handle {
    pub ino: u64,
    file: Arc<OpenFile>,
    /// Counted in `OpenFile::read_write`.
    read_write: bool,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.read_write {
            self.file
                .read_write
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

impl Fs {
    pub fn open(&self, ino: u64, write: bool) -> Result<Handle> {
        self.open_with(ino, write, false)
    }

    /// `open`; `read_write` says the descriptor was opened O_RDWR, the only kind through
    /// which a process can map the file `MAP_SHARED` with `PROT_WRITE` (so the kernel may
    /// hold dirty pages of it: `mappable_inodes`).
    pub fn open_with(&self, ino: u64, write: bool, read_write: bool) -> Result<Handle> {
        let a = self.stored_attr(ino)?;
        if a.kind == Kind::Dir && write {
            return Err(FsError::IsDir);
        }
        if write {
            self.write_epoch()?;
        }
        let file = self.acquire(ino)?;
        let read_write = read_write && a.kind == Kind::File;
        if read_write {
            file.read_write
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(Handle {
            ino,
            file,
            read_write,
        })
    }

    /// Closes a handle: seals its buffers, and deletes the inode if it was the last user of
    /// an unlinked file.
    pub fn release(&self, h: &Handle) -> Result<()> {
        self.unacquire(h.ino, &h.file)
    }

    /// Closes a handle that wrote nothing, without sealing the file's buffers unless it was
    /// the file's last user (the snapshot's writeback barrier, which seals them itself).
    pub fn release_unsealed(&self, h: &Handle) -> Result<()> {
        self.unacquire_opt(h.ino, &h.file, false)
    }

    /// Seals the file's buffers (on close(2) of any descriptor).
    pub fn flush(&self, h: &Handle) -> Result<()> {
        self.seal_all(h.ino, &h.file)
    }

    /// Makes the file's data and metadata durable before returning.
    pub fn fsync(&self, h: &Handle) -> Result<()> {
        self.seal_all(h.ino, &h.file)?;
        self.eng.sync()
    }

    pub fn read(&self, h: &Handle, offset: u64, size: u32) -> Result<ReadBuf> {
        let st = h.file.state.read();
        if offset >= st.size {
            return Ok(ReadBuf::empty());
        }
        let end = st.size.min(offset.saturating_add(size as u64));
        let cs = self.chunk_size as u64;
        let (first, last) = (offset / cs, (end - 1) / cs);
        if first == last && !st.buffers.contains_key(&first) {
            // The common case (aligned reads inside one sealed chunk): answer from the
            // verified chunk itself, without assembling a copy.
            let within = (offset % cs) as usize;
            let n = (end - offset) as usize;
            if !h.file.sealing.lock().contains_key(&first) {
                if let Some(p) = self.get_rec(&keys::map_rec(h.ino, first))? {
                    let e = MapEntry::decode(&p).ok_or(FsError::Corrupt)?;
                    let data = self.load_chunk(&e.id)?;
                    if within + n <= data.len() {
                        return Ok(ReadBuf {
                            data,
                            start: within,
                            end: within + n,
                        });
                    }
                }
            }
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let n = ((cs - within as u64).min(end - pos)) as usize;
            let sealing;
            let pending: Option<&[u8]> = match st.buffers.get(&idx) {
                Some(b) => Some(b),
                None => {
                    sealing = h.file.sealing.lock().get(&idx).cloned();
                    sealing.as_deref().map(|v| v.as_slice())
                }
            };
            match pending {
                Some(buf) => copy_padded(&mut out, buf, within, n),
                None => match self.get_rec(&keys::map_rec(h.ino, idx))? {
                    None => out.resize(out.len() + n, 0),
                    Some(p) => {
                        let e = MapEntry::decode(&p).ok_or(FsError::Corrupt)?;
                        let data = self.load_chunk(&e.id)?;
                        copy_padded(&mut out, &data, within, n);
                    }
                },
            }
            pos += n as u64;
        }
        let n = out.len();
        Ok(ReadBuf {
            data: Arc::new(out),
            start: 0,
            end: n,
        })
    }

    pub fn write(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<u32> {
        self.write_epoch()?;
        self.eng.admit_growth()?;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        h.file.check_error()?;
        self.wait_for_sealers();
        // Held for the whole call: a snapshot sees this write wholly or not at all.
        let _barrier = self.barrier.read();
        let mut st = h.file.state.write();
        let before = st.buffers.len();
        let r = self.write_locked(h, &mut st, offset, end, data);
        self.account(before, st.buffers.len());
        let n = r?;
        // Partial chunks past the budget (many files, or random writes into new regions):
        // this writer seals its own file's buffers before it returns.
        if !st.buffers.is_empty() && self.over_budget() {
            let before = st.buffers.len();
            let all: Vec<u64> = st.buffers.keys().copied().collect();
            let r = h
                .file
                .wait_sealed(self)
                .and_then(|()| self.seal(h.ino, &h.file, &mut st, &all));
            self.account(before, st.buffers.len());
            r?;
        }
        Ok(n)
    }

    /// Back-pressure: waits while the sealer queues hold `SEAL_QUEUE` jobs per sealer. Racy by
    /// design (writers that pass together may overfill by a write's worth of chunks); the
    /// point is that no writer waits for a sealer while it holds the snapshot barrier.
    fn wait_for_sealers(&self) {
        let Some(queues) = self.sealer.get() else {
            return;
        };
        let full = || queues.iter().map(|q| q.len()).sum::<usize>() >= SEAL_QUEUE * queues.len();
        if !full() {
            return;
        }
        let (lock, room) = &*self.sealer_room;
        let mut g = lock.lock();
        while full() {
            // A wake-up lost between the check and the wait costs at most this long.
            room.wait_for(&mut g, std::time::Duration::from_millis(5));
        }
    }

    /// Moves every unsealed buffer of every open file into a seal job of the current epoch
    /// and queues it: a snapshot's work under its barrier, a move per buffer, no hashing, no
    /// waiting. The jobs commit at this epoch later (`epochs.rs`). Without sealer threads,
    /// seals them inline instead.
    pub(super) fn freeze_open_files(&self) -> Result<()> {
        let Some(queues) = self.sealer.get() else {
            return self.seal_open_files();
        };
        for (ino, file) in self.open_files() {
            let mut st = file.state.write();
            if st.buffers.is_empty() {
                continue;
            }
            let all: Vec<u64> = st.buffers.keys().copied().collect();
            let before = st.buffers.len();
            let r = self.enqueue_for(queues, ino, &file, &mut st, &all);
            self.account(before, st.buffers.len());
            r?;
        }
        Ok(())
    }

    /// The budget of unsealed buffers over all open files, in bytes.
    pub fn set_write_budget(&self, bytes: usize) {
        self.write_budget.store(bytes as u64, Ordering::Release);
    }

    /// Counts a file's buffers that came or went while its state was locked.
    fn account(&self, before: usize, after: usize) {
        if after >= before {
            self.dirty_chunks
                .fetch_add((after - before) as u64, Ordering::AcqRel);
        } else {
            self.dirty_chunks
                .fetch_sub((before - after) as u64, Ordering::AcqRel);
        }
    }

    fn over_budget(&self) -> bool {
        self.dirty_chunks.load(Ordering::Acquire) * self.chunk_size as u64
            > self.write_budget.load(Ordering::Acquire)
    }

    fn write_locked(
        &self,
        h: &Handle,
        st: &mut FileState,
        offset: u64,
        end: u64,
        data: &[u8],
    ) -> Result<u32> {
        // First load every chunk this write only partly covers, so that a failed load (a
        // corrupt or unreadable chunk) returns before any buffer or the size has changed.
        for (idx, within, _, n) in chunk_spans(offset, data.len(), self.chunk_size) {
            // A chunk the write covers whole needs no old bytes; it gets its buffer below.
            let whole = within == 0 && n == self.chunk_size;
            if !whole && !st.buffers.contains_key(&idx) {
                let initial = self.current_chunk(h.ino, &h.file, idx)?;
                st.buffers.insert(idx, initial);
            }
        }
        let mut full = Vec::new();
        for (idx, within, pos, n) in chunk_spans(offset, data.len(), self.chunk_size) {
            let cs_len = self.chunk_size;
            let buf = st
                .buffers
                .entry(idx)
                .or_insert_with(|| Vec::with_capacity(cs_len));
            if buf.len() < within {
                buf.resize(within, 0);
            }
            let overlap = (buf.len() - within).min(n);
            buf[within..within + overlap].copy_from_slice(&data[pos..pos + overlap]);
            buf.extend_from_slice(&data[pos + overlap..pos + n]);
            if buf.len() == self.chunk_size {
                full.push(idx);
            }
        }
        st.size = st.size.max(end);
        st.times_dirty = Some(Time::now());
        if !full.is_empty() {
            match self.sealer.get() {
                Some(q) => self.enqueue_for(q, h.ino, &h.file, st, &full)?,
                None => self.seal(h.ino, &h.file, st, &full)?,
            }
        }
        Ok(data.len() as u32)
    }

    /// Hands buffers (full ones, or every one a snapshot freezes) to the sealer threads, as
    /// jobs of the current epoch. The caller holds the barrier (shared or exclusive), so the
    /// epoch cannot move under it.
    fn enqueue_for(
        &self,
        queues: &[crossbeam_channel::Sender<SealJob>],
        ino: u64,
        file: &Arc<OpenFile>,
        st: &mut FileState,
        full: &[u64],
    ) -> Result<()> {
        let time = st.times_dirty.unwrap_or_else(Time::now);
        let epoch = self.write_epoch()?;
        for idx in full {
            let Some(buf) = st.buffers.remove(idx) else {
                continue;
            };
            let data = Arc::new(buf);
            file.sealing.lock().insert(*idx, data.clone());
            *file.inflight.lock() += 1;
            // The size this chunk makes good: never past its own end, so a committed size
            // never covers bytes still in a buffer (they would read as zeros after a crash).
            let chunk_end = (*idx + 1).saturating_mul(self.chunk_size as u64);
            let job = SealJob {
                ino,
                file: file.clone(),
                idx: *idx,
                data,
                size: st.size.min(chunk_end),
                time,
                ticket: self.epochs.ticket(epoch),
            };
            let q =
                &queues[(ino.wrapping_mul(31).wrapping_add(*idx) % queues.len() as u64) as usize];
            if let Err(e) = q.send(job) {
                // The sealer is gone (shutting down): seal inline instead.
                let job = e.into_inner();
                let r = self.commit_job(&job);
                finish_job(job, r);
            }
        }
        Ok(())
    }

    /// Starts the background sealers. Without them, full chunks are sealed inline.
    pub fn start_sealer(self: &Arc<Self>) {
        let mut queues = Vec::with_capacity(SEALERS);
        let mut receivers = Vec::with_capacity(SEALERS);
        for _ in 0..SEALERS {
            let (tx, rx) = crossbeam_channel::unbounded::<SealJob>();
            queues.push(tx);
            receivers.push(rx);
        }
        if self.sealer.set(queues).is_err() {
            return;
        }
        self.start_committer();
        self.start_compressor();
        self.start_completer();
        for (i, rx) in receivers.into_iter().enumerate() {
            let weak = Arc::downgrade(self);
            let room = self.sealer_room.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("snapfs-sealer-{i}"))
                .spawn(move || loop {
                    // The strong reference ends before any job is marked done, so whoever
                    // waits for a job may drop the last one and close the engine.
                    let got = rx.recv_timeout(super::defer::IDLE_COMMIT);
                    if got.is_ok() {
                        room.1.notify_all();
                    }
                    let done = match got {
                        Ok(job) => match weak.upgrade() {
                            Some(fs) if fs.defers(&job) => fs.park(job),
                            Some(fs) => {
                                let r = fs.commit_job(&job);
                                vec![(job, r)]
                            }
                            None => vec![(job, Err(FsError::Io))],
                        },
                        // Idle: commit what is parked rather than hold it in memory.
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => weak
                            .upgrade()
                            .map(|fs| fs.take_and_commit())
                            .unwrap_or_default(),
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                    };
                    for (job, r) in done {
                        finish_job(job, r);
                    }
                });
            if let Err(e) = spawned {
                log::error!("cannot start a sealer thread: {e}");
            }
        }
    }

    fn commit_job(&self, job: &SealJob) -> Result<()> {
        let prepared = self.prepare_chunk_shared(job.data.clone())?;
        let body_len = match &prepared.1 {
            Body::Encoded(e) => e.len(),
            Body::Raw(_) | Body::Remote(_) | Body::Written { .. } => 0,
        };
        let mut meta = self.lock_meta();
        let mut txn = job.txn(self, body_len);
        self.add_prepared(&mut txn, job.ino, vec![(job.idx, prepared)])?;
        job.apply_attr(&mut txn)?;
        txn.commit(&mut meta, false)
    }

    /// The current bytes of chunk `idx`: queued for sealing, or stored.
    fn current_chunk(&self, ino: u64, file: &OpenFile, idx: u64) -> Result<Vec<u8>> {
        if let Some(d) = file.sealing.lock().get(&idx) {
            let mut v = Vec::with_capacity(self.chunk_size);
            v.extend_from_slice(d);
            return Ok(v);
        }
        self.stored_chunk(ino, idx)
    }

    /// The bytes of a stored chunk (empty for a hole).
    fn stored_chunk(&self, ino: u64, idx: u64) -> Result<Vec<u8>> {
        match self.get_rec(&keys::map_rec(ino, idx))? {
            None => Ok(Vec::with_capacity(self.chunk_size)),
            Some(p) => {
                let e = MapEntry::decode(&p).ok_or(FsError::Corrupt)?;
                let mut v = Vec::with_capacity(self.chunk_size);
                v.extend_from_slice(&self.load_chunk(&e.id)?);
                Ok(v)
            }
        }
    }

    pub(crate) fn seal_all(&self, ino: u64, file: &OpenFile) -> Result<()> {
        let mut st = file.state.write();
        // No new job can be queued while the state is locked; wait for the queued ones.
        file.wait_sealed(self)?;
        if st.buffers.is_empty() && st.times_dirty.is_none() {
            return Ok(());
        }
        let all: Vec<u64> = st.buffers.keys().copied().collect();
        let before = st.buffers.len();
        let r = self.seal(ino, file, &mut st, &all);
        self.account(before, st.buffers.len());
        r
    }

    /// Seals the given buffers and persists the file's size and times, in one batch.
    fn seal(&self, ino: u64, file: &OpenFile, st: &mut FileState, indices: &[u64]) -> Result<()> {
        let r = self.seal_inner(ino, st, indices);
        if let Err(e) = r {
            file.set_error(e);
        }
        r
    }

    fn seal_inner(&self, ino: u64, st: &mut FileState, indices: &[u64]) -> Result<()> {
        let mut prepared = Vec::with_capacity(indices.len());
        for idx in indices {
            let Some(buf) = st.buffers.remove(idx) else {
                continue;
            };
            prepared.push((*idx, self.prepare_chunk(buf)?));
        }
        let body_len = prepared
            .iter()
            .map(|(_, (_, b))| match b {
                Body::Encoded(e) => e.len(),
                Body::Raw(_) | Body::Remote(_) | Body::Written { .. } => 0,
            })
            .sum();
        let mut meta = self.lock_meta();
        let mut txn = Txn::with_capacity(self, body_len);
        self.add_prepared(&mut txn, ino, prepared)?;
        let mut a = txn.attr(ino)?;
        a.size = st.size;
        if let Some(t) = st.times_dirty.take() {
            a.mtime = t;
            a.ctime = t;
        }
        txn.put_attr(a);
        txn.commit(&mut meta, false)
    }

    fn prepare_chunk(&self, buf: Vec<u8>) -> Result<(MapEntry, Body)> {
        self.prepare_chunk_shared(Arc::new(buf))
    }

    /// Hashes a buffer and, unless the store already holds it, compresses it.
    fn prepare_chunk_shared(&self, buf: Arc<Vec<u8>>) -> Result<(MapEntry, Body)> {
        let id = chunk::chunk_id(&buf);
        let entry = MapEntry {
            id,
            len: buf.len() as u32,
        };
        let body = if self.eng.exists(Cf::Meta, &keys::refcount_key(&id))? {
            Body::Raw(buf)
        } else {
            Body::Encoded(chunk::encode(&id, &buf))
        };
        Ok((entry, body))
    }

    fn add_prepared(
        &self,
        txn: &mut Txn<'_>,
        ino: u64,
        prepared: Vec<(u64, (MapEntry, Body))>,
    ) -> Result<()> {
        for (idx, (entry, body)) in prepared {
            if entry.len == 0 {
                txn.del_map(ino, idx)?;
                continue;
            }
            txn.put_map(ino, idx, entry)?;
            txn.add_body(entry.id, body);
        }
        Ok(())
    }

    /// Sets the size of a file (truncate(2), ftruncate(2), O_TRUNC).
    pub fn truncate(&self, ino: u64, size: u64) -> Result<()> {
        self.write_epoch()?;
        if size > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        if self.stored_attr(ino)?.kind != Kind::File {
            return Err(FsError::Invalid);
        }
        let file = self.acquire(ino)?;
        let r = self.truncate_locked(ino, &file, size);
        let u = self.unacquire(ino, &file);
        r.and(u)
    }

    fn truncate_locked(&self, ino: u64, file: &OpenFile, size: u64) -> Result<()> {
        let r = self.truncate_inner(ino, file, size);
        if let Err(e) = r {
            if e != FsError::ReadOnly && e != FsError::TooBig {
                file.set_error(e);
            }
        }
        r
    }

    fn truncate_inner(&self, ino: u64, file: &OpenFile, size: u64) -> Result<()> {
        let mut st = file.state.write();
        let before = st.buffers.len();
        let r = self.truncate_state(ino, file, &mut st, size);
        self.account(before, st.buffers.len());
        r
    }

    fn truncate_state(
        &self,
        ino: u64,
        file: &OpenFile,
        st: &mut FileState,
        size: u64,
    ) -> Result<()> {
        file.wait_sealed(self)?;
        let cs = self.chunk_size as u64;
        // Chunk indices at or past `keep` hold no byte below the new size.
        let keep = size.div_ceil(cs);
        let mut prepared = Vec::new();
        if size < st.size {
            st.buffers.retain(|idx, _| *idx < keep);
            let within = (size % cs) as usize;
            if within != 0 {
                // The chunk that straddles the new end is cut now, in the same batch, so no
                // stale byte past the end can reappear when the file grows again.
                let idx = size / cs;
                let mut buf = match st.buffers.remove(&idx) {
                    Some(b) => b,
                    None => self.stored_chunk(ino, idx)?,
                };
                if !buf.is_empty() {
                    buf.truncate(within);
                    prepared.push((idx, self.prepare_chunk(buf)?));
                }
            }
        }
        let now = Time::now();
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        if size < st.size {
            let stored: Vec<u64> = self
                .scan_recs_from(
                    &keys::map_prefix(ino),
                    &keys::map_rec(ino, keep),
                    usize::MAX,
                )?
                .iter()
                .map(|(rec, _)| keys::map_index(rec))
                .collect();
            for idx in stored {
                txn.del_map(ino, idx)?;
            }
        }
        self.add_prepared(&mut txn, ino, prepared)?;
        let mut a = txn.attr(ino)?;
        a.size = size;
        a.mtime = now;
        a.ctime = now;
        st.times_dirty = None;
        txn.put_attr(a);
        txn.commit(&mut meta, false)?;
        st.size = size;
        Ok(())
    }

    /// fallocate(2): mode 0 and KEEP_SIZE reserve nothing (copy-on-write stores allocate at
    /// seal time) but extend the size; PUNCH_HOLE|KEEP_SIZE zeroes the range.
    pub fn fallocate(&self, h: &Handle, offset: u64, len: u64, mode: i32) -> Result<()> {
        self.write_epoch()?;
        self.eng.admit_growth()?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        match mode {
            0 => {
                if end > h.file.state.read().size {
                    self.seal_all(h.ino, &h.file)?;
                    self.truncate_locked(h.ino, &h.file, end)?;
                }
                Ok(())
            }
            FALLOC_KEEP_SIZE => Ok(()),
            m if m == FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE => self.punch_hole(h, offset, end),
            _ => Err(FsError::Unsupported),
        }
    }

    /// Zeroes `[offset, end)`: chunks wholly inside become holes in one batch (O(mapped
    /// chunks), whatever the length: a caller may punch 2^63 bytes), the partial chunks at
    /// the two edges are written with zeros.
    fn punch_hole(&self, h: &Handle, offset: u64, end: u64) -> Result<()> {
        let size = h.file.state.read().size;
        let end = end.min(size);
        if offset >= end {
            return Ok(());
        }
        let cs = self.chunk_size as u64;
        let first_full = offset.div_ceil(cs);
        let end_full = end / cs;
        if first_full >= end_full {
            return self.write_zeros(h, offset, end);
        }
        self.write_zeros(h, offset, first_full * cs)?;
        self.write_zeros(h, end_full * cs, end)?;
        let mut st = h.file.state.write();
        h.file.wait_sealed(self)?;
        let before = st.buffers.len();
        st.buffers
            .retain(|idx, _| *idx < first_full || *idx >= end_full);
        self.account(before, st.buffers.len());
        let now = Time::now();
        let mut meta = self.lock_meta();
        let mut txn = Txn::new(self);
        let mapped: Vec<u64> = self
            .scan_recs_from(
                &keys::map_prefix(h.ino),
                &keys::map_rec(h.ino, first_full),
                usize::MAX,
            )?
            .iter()
            .map(|(rec, _)| keys::map_index(rec))
            .take_while(|idx| *idx < end_full)
            .collect();
        for idx in mapped {
            txn.del_map(h.ino, idx)?;
        }
        // The size is untouched (KEEP_SIZE); deleting entries never breaks I8.
        let mut a = txn.attr(h.ino)?;
        a.mtime = now;
        a.ctime = now;
        st.times_dirty = None;
        txn.put_attr(a);
        txn.commit(&mut meta, false)
    }

    fn write_zeros(&self, h: &Handle, mut pos: u64, end: u64) -> Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        while pos < end {
            let n = (end - pos).min(ZEROS.len() as u64) as usize;
            self.write(h, pos, &ZEROS[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    /// copy_file_range(2), by reading and writing; identical chunks deduplicate anyway.
    pub fn copy_range(
        &self,
        src: &Handle,
        src_off: u64,
        dst: &Handle,
        dst_off: u64,
        len: u64,
    ) -> Result<u64> {
        // One request copies at most COPY_MAX bytes: copy_file_range(2) may return a short
        // count and callers loop, so one request cannot keep a worker busy for minutes.
        let len = len.min(COPY_MAX);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.chunk_size as u64) as u32;
            let data = self.read(src, src_off + done, n)?;
            if data.is_empty() {
                break;
            }
            self.write(dst, dst_off + done, &data)?;
            done += data.len() as u64;
        }
        Ok(done)
    }
}

/// Marks a seal job done: drops its chunk from `sealing`, records an error, counts it out of
/// its epoch (before any waiter wakes: a waiter may then complete a pending snapshot), wakes
/// waiters.
pub(crate) fn finish_job(job: SealJob, r: Result<()>) {
    {
        let mut s = job.file.sealing.lock();
        if s.get(&job.idx).is_some_and(|d| Arc::ptr_eq(d, &job.data)) {
            s.remove(&job.idx);
        }
    }
    if let Err(e) = r {
        log::error!("sealing chunk {} of inode {} failed: {e}", job.idx, job.ino);
        job.file.set_error(e);
        job.ticket.failed();
    }
    let file = job.file.clone();
    drop(job);
    let mut n = file.inflight.lock();
    *n -= 1;
    if *n == 0 {
        file.idle.notify_all();
    }
}

/// The pieces of a write of `len` bytes at `offset`, one per chunk: (chunk index, offset
/// within the chunk, offset within the data, length).
fn chunk_spans(
    offset: u64,
    len: usize,
    chunk_size: usize,
) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let cs = chunk_size as u64;
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let off = offset + pos as u64;
        let within = (off % cs) as usize;
        let n = (chunk_size - within).min(len - pos);
        let span = (off / cs, within, pos, n);
        pos += n;
        Some(span)
    })
}

/// Appends `n` bytes of `src` from `within`, reading past the end of `src` as zeros.
fn copy_padded(out: &mut Vec<u8>, src: &[u8], within: usize, n: usize) {
    let avail = src.len().saturating_sub(within).min(n);
    if avail > 0 {
        out.extend_from_slice(&src[within..within + avail]);
    }
    out.resize(out.len() + (n - avail), 0);
}
