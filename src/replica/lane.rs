//! One backend's replication: the uploaders that drain its queue, and the thread that writes
//! its snapshot manifests (docs/replication.md, "The queue").
//!
//! State machine of a queue entry (`40 backend seq`, written in the batch that sealed the
//! chunk): *queued* → *in flight* (an uploader read it; memory only) → deleted once the
//! backend acknowledged a durable put, or once the chunk turned out to be freed locally (GC
//! deleted it before its turn), or refused (it failed verification: `43 backend id` records
//! it, and every snapshot that needs it stays incomplete). A failed put leaves it queued,
//! with a per-entry backoff in memory; after a crash every entry still queued is tried again
//! (at-least-once; puts are idempotent).
//!
//! Memory is bounded whatever the queue's length: the dispatcher reads at most `SCAN` entries
//! from the head of the queue per pass, keeps at most `SCAN` backoff records, and hands at most
//! `CONCURRENCY` chunks to uploaders through a channel of that capacity (so at most
//! 2 × `CONCURRENCY` chunk bodies are in memory).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::fs::Fs;
use crate::replica::backend::{Backend, BackendError};
use crate::replica::format;
use crate::replica::manifest::{Builder, Known};
use crate::replica::prune::gate::{Gate, PruneGate, Token};
use crate::storage::engine::{Batch, Cf};
use crate::storage::keys::{self, ChunkId, QueueEntry, ReplSnap};

/// Uploads in flight per backend. 8 rather than 4: a `dir:` put is two fsyncs, and more of
/// them in flight share the disk's journal commits (docs/benchmarks.md, "Replication").
pub const CONCURRENCY: usize = 8;
/// Queue entries the dispatcher looks at per pass.
const SCAN: usize = 256;
/// How often an idle lane looks at its queue and its pending snapshots.
const IDLE_POLL: Duration = Duration::from_millis(10);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often an idle lane reads `prune/state`, to reconcile after a prune soon.
const PRUNE_POLL: Duration = Duration::from_secs(15);

/// A smooth bandwidth limit with small bursts: tokens accrue at `rate` bytes/s up to `burst`;
/// a put takes its size and may go into debt, which the next put waits off.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate_bytes_per_sec: u64) -> TokenBucket {
        let rate = rate_bytes_per_sec.max(1) as f64;
        // A tenth of a second of traffic, at least one 1 MiB chunk.
        let burst = (rate / 10.0).max(1048576.0);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock();
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.burst) - n as f64;
            s.1 = now;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Figures of one lane, in memory (the queue itself is the durable part).
#[derive(Default)]
pub struct LaneStats {
    pub uploaded_bytes: AtomicU64,
    pub uploaded_chunks: AtomicU64,
    /// Queue entries dropped because the chunk was freed locally before its turn.
    pub dropped_freed: AtomicU64,
    /// Failed puts (each retried).
    pub failed_puts: AtomicU64,
    pub last_error: Mutex<Option<(String, u64)>>,
    /// (bytes, at) samples of the last seconds, for the throughput figure.
    samples: Mutex<Vec<(u64, Instant)>>,
}

impl LaneStats {
    fn error(&self, msg: String) {
        log::warn!("{msg}");
        *self.last_error.lock() = Some((msg, crate::fs::now_ms()));
    }

    fn uploaded(&self, bytes: u64) {
        self.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.uploaded_chunks.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut s = self.samples.lock();
        s.push((bytes, now));
        s.retain(|(_, t)| now.duration_since(*t) < Duration::from_secs(10));
    }

    /// Bytes per second over the last 10 seconds.
    pub fn throughput(&self) -> f64 {
        let now = Instant::now();
        let s = self.samples.lock();
        let bytes: u64 = s
            .iter()
            .filter(|(_, t)| now.duration_since(*t) < Duration::from_secs(10))
            .map(|(b, _)| b)
            .sum();
        bytes as f64 / 10.0
    }
}

pub struct Lane {
    pub id: u32,
    pub name: String,
    pub spec: String,
    pub backend: Arc<dyn Backend>,
    pub stats: LaneStats,
    fs: Arc<Fs>,
    bucket: Option<TokenBucket>,
    stop: AtomicBool,
    /// seq -> (attempts, not before): entries in flight or waiting out a backoff.
    busy: Mutex<HashMap<u64, (u32, Option<Instant>)>>,
    /// The whole backend failed recently: no new puts before this.
    pause_until: Mutex<Option<Instant>>,
    consecutive_failures: AtomicU64,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Serializes acknowledgements, so the persistent byte counter only grows.
    ack_lock: Mutex<()>,
    /// Snapshots whose manifest failed, not retried before the time given.
    held_back: Mutex<HashMap<String, Instant>>,
    /// Prune's protocol (replica/prune/gate.rs); used by the manifest thread only.
    gate: Mutex<PruneGate>,
    /// Why markers are held back now (a prune is sweeping), for status.
    pub prune_wait: Mutex<Option<String>>,
}

/// What became of one attempt to complete a snapshot.
enum Outcome {
    Completed,
    /// Not now: a prune sweeps, or chunks it needs were queued again.
    Held,
}

/// The counter of bytes uploaded to backend `id`, kept in the batches that dequeue.
pub fn uploaded_counter(id: u32) -> String {
    format!("repl_uploaded_{id}")
}

fn jittered(base: Duration, attempts: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempts.min(16))
        .min(BACKOFF_MAX);
    // Jitter in [0.5, 1.5) from the clock's low bits: enough to spread retries.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    exp.mul_f64(0.5 + (nanos % 1000) as f64 / 1000.0)
}

impl Lane {
    pub fn new(
        fs: Arc<Fs>,
        id: u32,
        name: String,
        spec: String,
        backend: Arc<dyn Backend>,
        limit: Option<u64>,
    ) -> Arc<Lane> {
        let stats = LaneStats::default();
        let uploaded = fs.stored_counter(&uploaded_counter(id));
        let reconciled = fs.replica_pruned_generation(id).unwrap_or(0);
        stats.uploaded_bytes.store(uploaded, Ordering::Relaxed);
        Arc::new(Lane {
            id,
            name,
            spec,
            backend,
            stats,
            fs,
            bucket: limit.map(TokenBucket::new),
            stop: AtomicBool::new(false),
            busy: Mutex::new(HashMap::new()),
            pause_until: Mutex::new(None),
            consecutive_failures: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            ack_lock: Mutex::new(()),
            held_back: Mutex::new(HashMap::new()),
            gate: Mutex::new(PruneGate::new(reconciled)),
            prune_wait: Mutex::new(None),
        })
    }

    /// Starts the dispatcher, the uploaders and the manifest writer.
    pub fn start(self: &Arc<Self>) -> Result<(), String> {
        let (tx, rx) = crossbeam_channel::bounded::<(u64, QueueEntry)>(CONCURRENCY);
        let mut threads = self.threads.lock();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .stack_size(16 << 20)
                .spawn(f)
                .map_err(|e| format!("cannot start a replication thread: {e}"))
        };
        for i in 0..CONCURRENCY {
            let lane = self.clone();
            let rx = rx.clone();
            threads.push(spawn(
                format!("snapfs-up-{}-{i}", self.id),
                Box::new(move || {
                    crate::sys::background_thread();
                    while let Ok((seq, e)) = rx.recv() {
                        lane.upload(seq, e);
                    }
                }),
            )?);
        }
        let lane = self.clone();
        threads.push(spawn(
            format!("snapfs-queue-{}", self.id),
            Box::new(move || lane.dispatch(tx)),
        )?);
        let lane = self.clone();
        threads.push(spawn(
            format!("snapfs-manifest-{}", self.id),
            Box::new(move || lane.manifests()),
        )?);
        // What puts killed mid-way (an earlier process's) left behind: once per start, on a
        // thread of its own that stop does not wait for (a large network directory can take
        // minutes to walk; an unlink cut short by the exit is harmless). It holds the backend
        // only, not the lane or the store.
        let (backend, name) = (self.backend.clone(), self.name.clone());
        let swept = std::thread::Builder::new()
            .name(format!("snapfs-sweep-{}", self.id))
            .spawn(move || {
                crate::sys::background_thread();
                let mut dirs = vec![String::new()];
                dirs.extend(
                    format::listing_prefixes()
                        .iter()
                        .filter_map(|p| p.strip_suffix('/').map(str::to_string)),
                );
                let n = backend.sweep_temporaries(&dirs);
                if n > 0 {
                    log::info!(
                        "backend {name}: deleted {n} temporary files of interrupted uploads"
                    );
                }
            });
        if let Err(e) = swept {
            log::warn!(
                "backend {}: cannot start the sweep of temporary files: {e}",
                self.name
            );
        }
        Ok(())
    }

    /// Stops every thread of this lane and waits for them (in-flight puts finish first).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Uploads are failing now: no put has succeeded since the last failure.
    pub fn failing(&self) -> bool {
        self.consecutive_failures.load(Ordering::Acquire) > 0
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn dispatch(&self, tx: crossbeam_channel::Sender<(u64, QueueEntry)>) {
        let prefix = keys::repl_key(keys::P_REPL_QUEUE, self.id, &[]);
        while !self.stopped() {
            let paused = self.pause_until.lock().is_some_and(|t| Instant::now() < t);
            let mut sent = 0;
            if !paused {
                let now = Instant::now();
                let mut ready = Vec::new();
                if let Ok(r) = self.fs.eng.reader() {
                    for item in r.scan(Cf::Meta, &prefix, &prefix).take(SCAN) {
                        let Ok((k, v)) = item else { break };
                        let seq = keys::be_u64(&k[5..]);
                        let busy = self.busy.lock();
                        match busy.get(&seq) {
                            Some((_, None)) => continue,
                            Some((_, Some(t))) if *t > now => continue,
                            _ => {}
                        }
                        drop(busy);
                        match QueueEntry::decode(&v) {
                            Some(e) => ready.push((seq, e)),
                            None => {
                                log::error!(
                                    "backend {}: queue entry {seq} does not decode",
                                    self.name
                                );
                                self.ack(seq, 0);
                            }
                        }
                    }
                }
                for (seq, e) in ready {
                    {
                        let mut busy = self.busy.lock();
                        let attempts = busy.get(&seq).map_or(0, |b| b.0);
                        busy.insert(seq, (attempts, None));
                    }
                    if tx.send((seq, e)).is_err() {
                        return;
                    }
                    sent += 1;
                    if self.stopped() {
                        return;
                    }
                }
            }
            if sent == 0 {
                std::thread::sleep(IDLE_POLL);
            }
        }
    }

    /// Deletes a queue entry after `uploaded` bytes reached the backend (not synced: losing
    /// it in a crash means one more upload).
    fn ack(&self, seq: u64, uploaded: u64) {
        let _order = self.ack_lock.lock();
        let mut b = Batch::new();
        self.fs
            .eng
            .delete(&mut b, Cf::Meta, &keys::queue_key(self.id, seq));
        if uploaded > 0 {
            let total = self.stats.uploaded_bytes.load(Ordering::Relaxed) + uploaded;
            self.fs.eng.put(
                &mut b,
                Cf::Meta,
                &keys::counter_key(&uploaded_counter(self.id)),
                &total.to_le_bytes(),
            );
            self.stats.uploaded(uploaded);
        }
        if let Err(e) = self.fs.eng.write(b, false) {
            log::warn!(
                "backend {}: cannot remove queue entry {seq}: {e}",
                self.name
            );
        }
        self.busy.lock().remove(&seq);
    }

    fn retry_later(&self, seq: u64, msg: String) {
        self.stats.failed_puts.fetch_add(1, Ordering::Relaxed);
        self.stats.error(msg);
        // The whole lane pauses too (the backend is likely down): at most ~10 s, so that it
        // notices soon when the backend is back; each entry keeps its own longer backoff.
        let n = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) as u32 + 1;
        *self.pause_until.lock() = Some(Instant::now() + jittered(BACKOFF_MIN, n.min(5)));
        let mut busy = self.busy.lock();
        let attempts = busy.get(&seq).map_or(0, |b| b.0) + 1;
        busy.insert(
            seq,
            (
                attempts,
                Some(Instant::now() + jittered(BACKOFF_MIN, attempts)),
            ),
        );
        // Bounded: backoff records beyond the scan window are forgotten (and retried sooner).
        if busy.len() > 4 * SCAN {
            busy.retain(|_, (_, t)| t.is_none());
        }
    }

    fn upload(&self, seq: u64, e: QueueEntry) {
        if self.stopped() {
            self.busy.lock().remove(&seq);
            return;
        }
        // Read, verified and wrapped in place: one copy of the body, out of RocksDB's buffer
        // into the object (a raw chunk is hashed where it lies).
        let read = match self.fs.compress_before_upload(&e.id) {
            // Verified before it was compressed, and compressed from the verified bytes.
            Some(enc) => Ok(Some(Ok(format::chunk_object(&enc)))),
            None => self.fs.eng.with_chunk(&e.id, |stored| {
                crate::storage::chunk::verify(&e.id, stored).map(|_| format::chunk_object(stored))
            }),
        };
        let obj = match read {
            Ok(Some(Ok(obj))) => obj,
            Ok(Some(Err(_))) => {
                self.refuse(seq, &e.id);
                return;
            }
            Ok(None) => {
                // Freed locally (GC) before its turn: nothing needs it any more.
                self.stats.dropped_freed.fetch_add(1, Ordering::Relaxed);
                self.ack(seq, 0);
                return;
            }
            Err(crate::error::FsError::Corrupt) => {
                // The engine's own checksums caught it (a blob record's CRC).
                self.refuse(seq, &e.id);
                return;
            }
            Err(err) => {
                self.retry_later(
                    seq,
                    format!("cannot read chunk {}: {err}", format::hex(&e.id)),
                );
                return;
            }
        };
        if let Some(b) = &self.bucket {
            b.take(obj.len());
        }
        match self.backend.put(&format::chunk_name(&e.id), &obj) {
            Ok(()) => {
                self.consecutive_failures.store(0, Ordering::Release);
                *self.pause_until.lock() = None;
                self.ack(seq, obj.len() as u64);
            }
            Err(err) => {
                let kind = match err {
                    BackendError::Permanent(_) => " (retrying cannot help until it is fixed)",
                    _ => "",
                };
                self.retry_later(
                    seq,
                    format!(
                        "backend {}: upload of chunk {} failed{kind}: {err}",
                        self.name,
                        format::hex(&e.id)
                    ),
                );
            }
        }
    }

    /// A chunk that fails verification is never uploaded: recorded, reported, dequeued.
    fn refuse(&self, seq: u64, id: &ChunkId) {
        // The bad-chunk record is the count (`status` counts them): a chunk queued twice
        // (queueing is at-least-once) and refused twice is one record.
        let bad_key = keys::repl_key(keys::P_REPL_BAD, self.id, id);
        self.stats.error(format!(
            "backend {}: chunk {} failed verification (decompress + blake3) and was not \
             uploaded; snapshots that need it cannot complete",
            self.name,
            format::hex(id)
        ));
        let mut b = Batch::new();
        self.fs.eng.put(&mut b, Cf::Meta, &bad_key, &[]);
        self.fs
            .eng
            .delete(&mut b, Cf::Meta, &keys::queue_key(self.id, seq));
        if let Err(e) = self.fs.eng.write(b, true) {
            log::error!("backend {}: cannot record a bad chunk: {e}", self.name);
        }
        self.busy.lock().remove(&seq);
    }

    /// The sequence number of the oldest queued entry, if any.
    pub fn queue_head(&self) -> Result<Option<u64>, String> {
        let prefix = keys::repl_key(keys::P_REPL_QUEUE, self.id, &[]);
        let first = self
            .fs
            .eng
            .seek(Cf::Meta, &prefix, &prefix)
            .map_err(|e| e.to_string())?;
        Ok(first.map(|(k, _)| keys::be_u64(&k[5..])))
    }

    fn manifests(&self) {
        let mut last_error = String::new();
        let mut repo_written = false;
        let mut heal = Heal::new(self);
        let mut prune_checked = Instant::now() - PRUNE_POLL;
        while !self.stopped() {
            heal.step(self);
            let r = (|| -> Result<bool, String> {
                if !repo_written {
                    let obj = format::repo_object(self.fs.chunk_size as u32);
                    self.backend
                        .put(format::REPO_NAME, &obj)
                        .map_err(|e| format!("cannot write the repository descriptor: {e}"))?;
                    repo_written = true;
                }
                self.complete_one()
            })();
            match r {
                Ok(true) => {
                    last_error.clear();
                    continue;
                }
                Ok(false) => {
                    heal.run(self);
                    if prune_checked.elapsed() >= PRUNE_POLL {
                        prune_checked = Instant::now();
                        if let Err(e) = self.gate_check(PRUNE_POLL) {
                            self.stats.error(format!("backend {}: {e}", self.name));
                        }
                    }
                }
                Err(m) => {
                    if m != last_error {
                        self.stats.error(format!("backend {}: {m}", self.name));
                        last_error = m;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            std::thread::sleep(IDLE_POLL);
        }
    }

    /// Completes the oldest pending snapshot whose chunks are all uploaded. Ok(true) if it did.
    fn complete_one(&self) -> Result<bool, String> {
        let prefix = keys::repl_key(keys::P_REPL_SNAP, self.id, &[]);
        let mut pending: Vec<(String, ReplSnap)> = Vec::new();
        let r = self.fs.eng.reader().map_err(|e| e.to_string())?;
        for item in r.scan(Cf::Meta, &prefix, &prefix) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let Some(s) = ReplSnap::decode(&v) else {
                continue;
            };
            if s.completed_ms == 0 && !s.pruned {
                pending.push((String::from_utf8_lossy(&k[5..]).into_owned(), s));
            }
        }
        drop(r);
        pending.sort_by_key(|(_, s)| s.barrier_seq);
        let head = self.queue_head()?;
        let mut first_error = None;
        // prune/state is read once per pass, and only once a snapshot is ready to complete.
        let mut token = None;
        for (name, state) in pending {
            if head.is_some_and(|h| h <= state.barrier_seq) {
                break; // this one's chunks, and every later one's, are still queued
            }
            let now = Instant::now();
            if self.held_back.lock().get(&name).is_some_and(|t| *t > now) {
                continue;
            }
            let t = match token {
                Some(t) => t,
                None => match self.gate_check(Duration::from_secs(1))? {
                    Gate::Go(t) => *token.insert(t),
                    Gate::Hold(_) => return Ok(false),
                },
            };
            match self.complete(&name, state, t) {
                Ok(Outcome::Completed) => {
                    self.held_back.lock().remove(&name);
                    return Ok(true);
                }
                Ok(Outcome::Held) => return Ok(false),
                Err(e) => {
                    // One snapshot that cannot complete (it needs a chunk that failed
                    // verification) does not hold back the ones after it.
                    self.held_back
                        .lock()
                        .insert(name, now + Duration::from_secs(30));
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(false),
        }
    }

    /// Reads `prune/state` (a cached copy younger than `max_age`); records why markers wait.
    fn gate_check(&self, max_age: Duration) -> Result<Gate, String> {
        let g = self
            .gate
            .lock()
            .check(&self.fs, self.id, self.backend.as_ref(), max_age)?;
        *self.prune_wait.lock() = match &g {
            Gate::Hold(why) => Some(why.clone()),
            Gate::Go(_) => None,
        };
        Ok(g)
    }

    /// Uploads the manifest of snapshot `name`, then its marker, then records it complete;
    /// `token` is what prune's gate said before (replica/prune/gate.rs), checked again
    /// around the marker.
    fn complete(&self, name: &str, mut state: ReplSnap, token: Token) -> Result<Outcome, String> {
        let key = keys::repl_key(keys::P_REPL_SNAP, self.id, name.as_bytes());
        let view = match self.fs.snapshot_view(name) {
            Ok(v) => v,
            Err(crate::error::FsError::NotFound) => {
                // Deleted locally before it was complete here: nothing to send.
                let mut b = Batch::new();
                self.fs.eng.delete(&mut b, Cf::Meta, &key);
                self.fs.eng.write(b, false).map_err(|e| e.to_string())?;
                return Ok(Outcome::Completed);
            }
            Err(e) => return Err(format!("cannot read snapshot {name}: {e}")),
        };
        let info = self.fs.snapshot_get(name).map_err(|e| e.to_string())?;
        let mut known = LaneKnown {
            lane: self,
            any_absent: self
                .fs
                .replica_has_absent(self.id)
                .map_err(|e| e.to_string())?,
        };
        let built = Instant::now();
        let mut builder = Builder::new(&view, self.backend.as_ref(), &mut known);
        let root = builder.build()?;
        let stats = builder.stats;
        if !builder.absent.is_empty() {
            let absent: Vec<ChunkId> = builder.absent.iter().copied().collect();
            let n = self
                .fs
                .requeue_absent(self.id, name, &absent)
                .map_err(|e| e.to_string())?;
            log::warn!(
                "backend {}: snapshot {name} needs {n} chunks that a prune removed from the \
                 backend; queued them again",
                self.name
            );
            return Ok(Outcome::Held);
        }
        // Right before the marker: a prune announced since the first check must see it.
        if built.elapsed() > Duration::from_secs(1)
            && self.gate_check(Duration::ZERO)? != Gate::Go(token)
        {
            return Ok(Outcome::Held);
        }
        let marker = format::Marker {
            name: name.to_string(),
            epoch: info.epoch,
            created: crate::storage::inode::Time {
                secs: info.created,
                nanos: info.created_nanos,
            },
            automatic: info.automatic,
            chunk_size: self.fs.chunk_size as u32,
            root,
            files: stats.files,
            bytes: stats.bytes,
        };
        // Every object the marker leads to is durable on the backend: the marker goes last.
        self.backend
            .put(&format::marker_name(name), &format::marker_object(&marker))
            .map_err(|e| format!("cannot write the marker of snapshot {name}: {e}"))?;
        // And right after: a prune that began while the marker was in flight may have
        // listed the markers without it; then the snapshot is completed again after it.
        if self.gate_check(Duration::ZERO)? != Gate::Go(token) {
            log::warn!(
                "backend {}: a prune began while the marker of snapshot {name} was written; \
                 completing it again after the prune",
                self.name
            );
            return Ok(Outcome::Held);
        }
        let uploaded = self.stats.uploaded_bytes.load(Ordering::Relaxed);
        state.completed_ms = crate::fs::now_ms().max(state.created_ms);
        state.chunk_bytes = uploaded;
        state.meta_uploaded = stats.uploaded;
        state.meta_skipped = stats.skipped;
        if let format::Body::Dir(h) = marker.root.body {
            state.root = h;
        }
        let mut b = Batch::new();
        self.fs.eng.put(&mut b, Cf::Meta, &key, &state.encode());
        self.fs.eng.write(b, true).map_err(|e| e.to_string())?;
        log::info!(
            "snapshot {name} is complete on backend {} ({} ms after it was taken; {} metadata \
             objects uploaded, {} already there)",
            self.name,
            state.completed_ms - state.created_ms,
            stats.uploaded,
            stats.skipped
        );
        Ok(Outcome::Completed)
    }
}

struct LaneKnown<'a> {
    lane: &'a Lane,
    /// Whether any chunk is recorded absent (`47`): most of the time none is.
    any_absent: bool,
}

impl Known for LaneKnown<'_> {
    fn has_meta(&mut self, hash: &format::Hash) -> Result<bool, String> {
        let k = keys::repl_key(keys::P_REPL_META, self.lane.id, hash);
        self.lane
            .fs
            .eng
            .exists(Cf::Meta, &k)
            .map_err(|e| e.to_string())
    }

    fn add_meta(&mut self, hash: &format::Hash) -> Result<(), String> {
        let k = keys::repl_key(keys::P_REPL_META, self.lane.id, hash);
        let mut b = Batch::new();
        self.lane.fs.eng.put(&mut b, Cf::Meta, &k, &[]);
        self.lane.fs.eng.write(b, false).map_err(|e| e.to_string())
    }

    fn is_bad_chunk(&mut self, id: &ChunkId) -> Result<bool, String> {
        let k = keys::repl_key(keys::P_REPL_BAD, self.lane.id, id);
        self.lane
            .fs
            .eng
            .exists(Cf::Meta, &k)
            .map_err(|e| e.to_string())
    }

    fn is_absent(&mut self, id: &ChunkId) -> Result<bool, String> {
        if !self.any_absent {
            return Ok(false);
        }
        self.lane
            .fs
            .replica_chunk_absent(self.lane.id, id)
            .map_err(|e| e.to_string())
    }
}

/// Healing a redundant backend's members that missed objects while down: the need is kept in
/// the store (`45 id`) so that a restart still heals; the work runs when the lane is idle.
struct Heal {
    key: Vec<u8>,
    recorded: bool,
    next_try: Instant,
}

impl Heal {
    fn new(lane: &Lane) -> Heal {
        let key = keys::repl_key(keys::P_REPL_HEAL, lane.id, &[]);
        let recorded = lane.fs.eng.exists(Cf::Meta, &key).unwrap_or(false);
        if recorded {
            log::warn!(
                "backend {}: a member missed objects before the restart; healing it",
                lane.name
            );
        }
        // A redundant backend is checked at every start: members replaced or emptied while
        // no daemon ran are refilled.
        lane.backend.mark_needs_heal(recorded);
        Heal {
            key,
            recorded,
            next_try: Instant::now(),
        }
    }

    fn set(&mut self, lane: &Lane, on: bool) {
        let mut b = Batch::default();
        if on {
            lane.fs.eng.put(&mut b, Cf::Meta, &self.key, &[]);
        } else {
            lane.fs.eng.delete(&mut b, Cf::Meta, &self.key);
        }
        match lane.fs.eng.write(b, true) {
            Ok(()) => self.recorded = on,
            Err(e) => log::error!("backend {}: cannot record the heal state: {e}", lane.name),
        }
    }

    /// Records a new need to heal at once (every loop of the manifest writer).
    fn step(&mut self, lane: &Lane) {
        if !self.recorded && lane.backend.needs_heal() {
            self.set(lane, true);
        }
    }

    fn run(&mut self, lane: &Lane) {
        if !lane.backend.needs_heal() || Instant::now() < self.next_try {
            return;
        }
        match lane.backend.heal(&format::listing_prefixes()) {
            Ok(n) if !lane.backend.needs_heal() => {
                log::warn!("backend {}: healed, {n} shards rewritten", lane.name);
                self.set(lane, false);
            }
            Ok(_) => self.next_try = Instant::now() + Duration::from_secs(5),
            Err(e) => {
                lane.stats
                    .error(format!("backend {}: healing: {e}", lane.name));
                self.next_try = Instant::now() + Duration::from_secs(10);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_cap() {
        for attempts in 0..20 {
            let base = BACKOFF_MIN
                .saturating_mul(1u32 << attempts.min(16))
                .min(BACKOFF_MAX);
            let d = jittered(BACKOFF_MIN, attempts);
            assert!(
                d >= base.mul_f64(0.5) && d < base.mul_f64(1.5),
                "{attempts}: {d:?}"
            );
        }
        assert!(jittered(BACKOFF_MIN, 30) < BACKOFF_MAX.mul_f64(1.5));
    }

    #[test]
    fn token_bucket_holds_the_rate_after_its_burst() {
        // 20 MiB/s with a 2 MiB burst: 12 MiB take at least (12 - 2) / 20 s = 0.5 s.
        let b = TokenBucket::new(20 << 20);
        let start = Instant::now();
        for _ in 0..12 {
            b.take(1 << 20);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
