//! Backend retention: `snapfs backend prune` deletes the snapshots a policy drops, then every
//! object that no kept snapshot references, lock-free beside the lanes that keep uploading
//! (docs/replication.md, "Prune"). rustic's two-phase prune is the model; snapfs needs no
//! index, because a backend's content is named by hash and every reference starts at a marker.
//!
//! The protocol, through one small object, `prune/state` (generation, phase, heartbeat):
//!
//! 1. **Announce.** The prune writes `{generation g+1, sweeping}` and keeps a heartbeat in it.
//!    A lane that reads `sweeping` writes no marker until the phase is `done` again (uploads
//!    of chunks and metadata go on: nothing waits but the last small object of a snapshot).
//! 2. **Grace.** It waits `--grace` (default 10 min): every lane that read the old state
//!    before the announcement has, by then, written the marker it was about to write (a lane
//!    reads the state again right before each marker put, and the put itself is bounded by
//!    the backend's request timeout), so the listing below sees it.
//! 3. **Mark.** It lists and verifies the markers, applies the policy, and walks the kept
//!    snapshots' trees and file maps: the reachable metadata objects and chunks. A kept
//!    snapshot that cannot be walked (an object missing or corrupt) stops the prune before it
//!    deletes anything.
//! 4. **Sweep.** It deletes the dropped markers first (so no marker ever points at a deleted
//!    object), then every `meta/` and `chunks/` object not reachable. Before each batch it
//!    checks that its heartbeat is fresh; one it could not write for 2 intervals stops it.
//! 5. **Done.** It writes `{g+1, done}`. Each lane, seeing a generation newer than the one it
//!    reconciled, lists the backend and brings its records in line (`gate`): chunks the store
//!    holds and the backend lost are queued again when a snapshot needs them, lost metadata
//!    objects are uploaded again, and snapshots whose marker is gone show as pruned.
//!
//! A prune killed at any point leaves `sweeping` behind. Lanes (and a new prune) that see its
//! heartbeat stand still for 5 intervals take it as abandoned: a lane reconciles and goes on,
//! a new prune takes a new generation and starts over. Nothing it had not yet deleted is
//! lost, and what it had deleted is found by the lanes' listings.

pub mod gate;
mod reach;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::fs::keep::{self, Candidate, Policy};
use crate::replica::backend::{Backend, BackendError};
use crate::replica::format::{self, BadObject};
use crate::replica::recover;

pub const STATE_NAME: &str = "prune/state";
/// The default grace period between the announcement and the listing.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);
/// The shortest grace accepted (tests use it; production wants minutes).
pub const MIN_GRACE: Duration = Duration::from_secs(2);
/// Heartbeats seen standing still this many intervals make a prune abandoned.
pub const ABANDONED_AFTER: u32 = 5;
/// Objects deleted in parallel.
const PARALLEL: usize = 8;
const BATCH: usize = 256;

/// What `prune/state` says.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneState {
    /// Incremented by every prune run; 0: no prune ever ran.
    pub generation: u64,
    /// A prune is between its announcement and its end (or was killed there).
    pub sweeping: bool,
    pub started_ms: u64,
    pub grace_ms: u64,
    /// Incremented by the running prune at least every `interval_ms`.
    pub heartbeat: u64,
    pub interval_ms: u64,
    /// The host that runs it, for messages.
    pub host: String,
}

impl PruneState {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.clamp(100, 60_000))
    }

    /// How the lanes describe it while they wait.
    pub fn describe(&self) -> String {
        let ago = crate::fs::now_ms().saturating_sub(self.started_ms) / 1000;
        format!(
            "prune generation {} from host {} (started {ago} s ago, grace {} s)",
            self.generation,
            self.host,
            self.grace_ms / 1000
        )
    }
}

pub fn state_object(s: &PruneState) -> Vec<u8> {
    let mut v = format::header(format::KIND_PRUNE, 0);
    v.extend_from_slice(&s.generation.to_le_bytes());
    v.push(s.sweeping as u8);
    for x in [s.started_ms, s.grace_ms, s.heartbeat, s.interval_ms] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let host: Vec<u8> = s.host.bytes().take(255).collect();
    v.push(host.len() as u8);
    v.extend_from_slice(&host);
    format::with_trailer(v)
}

pub fn open_state(obj: &[u8]) -> Result<PruneState, BadObject> {
    let p = format::open_trailed(obj, format::KIND_PRUNE)?;
    let bad = || BadObject("prune state: wrong length".into());
    if p.len() < 42 {
        return Err(bad());
    }
    let u = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    let host_len = p[41] as usize;
    if p.len() != 42 + host_len || p[8] > 1 {
        return Err(bad());
    }
    Ok(PruneState {
        generation: u(0),
        sweeping: p[8] == 1,
        started_ms: u(9),
        grace_ms: u(17),
        heartbeat: u(25),
        interval_ms: u(33),
        host: String::from_utf8_lossy(&p[42..])
            .chars()
            .filter(|c| !c.is_control())
            .collect(),
    })
}

/// The backend's prune state; the default (generation 0, not sweeping) where none is stored.
pub fn read_state(b: &dyn Backend) -> Result<PruneState, String> {
    match b.get(STATE_NAME) {
        Ok(obj) => open_state(&obj).map_err(|e| format!("{STATE_NAME}: {e}")),
        Err(BackendError::NotFound) => Ok(PruneState::default()),
        Err(e) => Err(format!("cannot read {STATE_NAME}: {e}")),
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Snapshots to keep; empty: keep all (only unreferenced objects go).
    pub policy: Policy,
    pub dry_run: bool,
    pub grace: Duration,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub generation: u64,
    pub dry_run: bool,
    /// Newest first.
    pub snapshots_kept: Vec<String>,
    pub snapshots_dropped: Vec<String>,
    pub chunks_kept: u64,
    pub metas_kept: u64,
    /// Deleted (or, with --dry-run, to be deleted).
    pub chunks_deleted: u64,
    pub metas_deleted: u64,
    pub seconds: f64,
}

pub fn to_text(r: &Report) -> String {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    let mut s = format!(
        "prune{}: {} snapshots kept, {} dropped; {verb} {} chunks and {} metadata objects; kept {} chunks and {} metadata objects ({:.1} s)\n",
        if r.dry_run { " (dry run)".to_string() } else { format!(" generation {}", r.generation) },
        r.snapshots_kept.len(),
        r.snapshots_dropped.len(),
        r.chunks_deleted,
        r.metas_deleted,
        r.chunks_kept,
        r.metas_kept,
        r.seconds
    );
    for n in &r.snapshots_dropped {
        s.push_str(&format!("  {verb} snapshot {n}\n"));
    }
    s
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The running prune's hold on `prune/state`: its heartbeat, and the check that it is still
/// fresh before anything is deleted.
struct Beat<'a> {
    b: &'a dyn Backend,
    state: PruneState,
    last_ok: Instant,
    last_try: Instant,
}

impl Beat<'_> {
    fn write(&mut self) -> Result<(), String> {
        self.last_try = Instant::now();
        self.b
            .put(STATE_NAME, &state_object(&self.state))
            .map_err(|e| format!("cannot write {STATE_NAME}: {e}"))?;
        self.last_ok = Instant::now();
        Ok(())
    }

    /// Bumps the heartbeat if an interval passed; fails if it could not be written for two.
    fn tick(&mut self) -> Result<(), String> {
        let iv = self.state.interval();
        if self.last_try.elapsed() >= iv {
            self.state.heartbeat += 1;
            if let Err(e) = self.write() {
                log::warn!("prune: heartbeat: {e}");
            }
        }
        if self.last_ok.elapsed() > 2 * iv {
            return Err(format!(
                "prune stopped: its heartbeat in {STATE_NAME} could not be written for {:.1} s, \
                 so the lanes may have taken it as abandoned; run it again",
                self.last_ok.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// Watches a `sweeping` state left by another prune: Err if its heartbeat moves (it is
/// running), Ok once it stood still for [`ABANDONED_AFTER`] intervals.
fn wait_out(
    b: &dyn Backend,
    s: &PruneState,
    progress: &mut dyn FnMut(String),
) -> Result<(), String> {
    let iv = s.interval();
    let watch = iv * ABANDONED_AFTER;
    progress(format!(
        "{} was not finished; watching its heartbeat for {:.1} s",
        s.describe(),
        watch.as_secs_f64()
    ));
    let start = Instant::now();
    while start.elapsed() < watch {
        std::thread::sleep(iv / 2);
        let now = read_state(b)?;
        if now.generation != s.generation || now.heartbeat != s.heartbeat || !now.sweeping {
            return Err(format!(
                "another prune is running on this backend ({}); try again when it is done",
                now.describe()
            ));
        }
    }
    progress(format!(
        "prune generation {} was abandoned (its heartbeat stood still); starting over",
        s.generation
    ));
    Ok(())
}

/// Prunes backend `b` (its names and objects as its wrapper, if any, presents them).
/// `progress` gets plain lines.
pub fn run(
    b: &dyn Backend,
    o: &Options,
    progress: &mut dyn FnMut(String),
) -> Result<Report, String> {
    let mut beat = None;
    let r = run_inner(b, o, progress, &mut beat);
    if let (Err(_), Some(bt)) = (&r, beat.as_mut()) {
        // Nothing more will be deleted: say so, so that the lanes reconcile now rather than
        // after watching a dead heartbeat.
        if bt.state.sweeping {
            bt.state.sweeping = false;
            bt.state.heartbeat += 1;
            if let Err(e) = bt.write() {
                log::warn!("prune: cannot end generation {}: {e}", bt.state.generation);
            }
        }
    }
    r
}

fn tick(beat: &mut Option<Beat>) -> Result<(), String> {
    beat.as_mut().map_or(Ok(()), |b| b.tick())
}

fn run_inner<'a>(
    b: &'a dyn Backend,
    o: &Options,
    progress: &mut dyn FnMut(String),
    beat: &mut Option<Beat<'a>>,
) -> Result<Report, String> {
    let start = Instant::now();
    let old = read_state(b)?;
    if !o.dry_run {
        if old.sweeping {
            wait_out(b, &old, progress)?;
        }
        let grace_ms = o.grace.max(MIN_GRACE).as_millis() as u64;
        let mut bt = Beat {
            b,
            state: PruneState {
                generation: old.generation + 1,
                sweeping: true,
                started_ms: crate::fs::now_ms(),
                grace_ms,
                heartbeat: 0,
                interval_ms: (grace_ms / 4).clamp(250, 30_000),
                host: host_name(),
            },
            last_ok: Instant::now(),
            last_try: Instant::now(),
        };
        bt.write()?;
        progress(format!(
            "prune generation {}: announced; waiting the grace period ({} s) for markers being written",
            bt.state.generation,
            grace_ms / 1000
        ));
        *beat = Some(bt);
        let bt = beat.as_mut().expect("just set");
        let until = Instant::now() + Duration::from_millis(grace_ms);
        let mut said = Instant::now();
        while Instant::now() < until {
            std::thread::sleep(bt.state.interval().min(until - Instant::now()) / 2);
            bt.tick()?;
            if said.elapsed() >= Duration::from_secs(5) {
                said = Instant::now();
                let left = until.saturating_duration_since(Instant::now());
                progress(format!("prune: grace period, {} s left", left.as_secs()));
            }
        }
    }
    let markers = recover::list_snapshots(b)?;
    let cands: Vec<Candidate> = markers
        .iter()
        .map(|m| Candidate {
            name: m.name.clone(),
            id: m.epoch,
            created: m.created.secs,
        })
        .collect();
    let (kept, dropped) = if o.policy.is_empty() {
        // Newest first, as `select` orders them; names are unique (one marker each).
        (
            markers.iter().rev().map(|m| m.name.clone()).collect(),
            Vec::new(),
        )
    } else {
        keep::select(&cands, &o.policy)
    };
    let kept_set: HashSet<&str> = kept.iter().map(String::as_str).collect();
    let kept_markers: Vec<_> = markers
        .iter()
        .filter(|m| kept_set.contains(m.name.as_str()))
        .cloned()
        .collect();
    progress(format!(
        "prune: {} snapshots on the backend, keeping {}; walking their trees",
        markers.len(),
        kept.len()
    ));
    let reach = reach::walk(b, &kept_markers, &mut || tick(beat))?;
    let mut rep = Report {
        generation: beat.as_ref().map_or(old.generation, |b| b.state.generation),
        dry_run: o.dry_run,
        snapshots_kept: kept,
        snapshots_dropped: dropped.clone(),
        chunks_kept: reach.chunks.len() as u64,
        metas_kept: reach.metas.len() as u64,
        ..Default::default()
    };
    let mut doomed = Vec::new();
    for p in format::listing_prefixes() {
        if !p.starts_with("chunks/") && !p.starts_with("meta/") {
            continue;
        }
        tick(beat)?;
        let names = b
            .list(&p)
            .map_err(|e| format!("cannot list {p} on the backend: {e}"))?;
        for n in names {
            let Some(h) = format::hash_of_name(&n) else {
                continue; // not ours: left alone
            };
            let live = if n.starts_with("chunks/") {
                reach.chunks.contains(&h)
            } else {
                reach.metas.contains(&h)
            };
            if !live {
                if n.starts_with("chunks/") {
                    rep.chunks_deleted += 1;
                } else {
                    rep.metas_deleted += 1;
                }
                doomed.push(n);
            }
        }
    }
    let Some(beat) = beat.as_mut() else {
        rep.seconds = start.elapsed().as_secs_f64();
        return Ok(rep);
    };
    // Markers first: from here on no marker leads to an object about to go.
    let markers_doomed: Vec<String> = dropped.iter().map(|n| format::marker_name(n)).collect();
    progress(format!(
        "prune generation {}: deleting {} snapshots, {} metadata objects, {} chunks",
        beat.state.generation,
        markers_doomed.len(),
        rep.metas_deleted,
        rep.chunks_deleted
    ));
    let mut done = 0usize;
    let total = markers_doomed.len() + doomed.len();
    for batch in markers_doomed.chunks(BATCH).chain(doomed.chunks(BATCH)) {
        beat.tick()?;
        delete_all(b, batch)?;
        done += batch.len();
        progress(format!("prune: {done} of {total} objects deleted"));
    }
    beat.state.sweeping = false;
    beat.state.heartbeat += 1;
    beat.write()?;
    rep.seconds = start.elapsed().as_secs_f64();
    Ok(rep)
}

fn delete_all(b: &dyn Backend, names: &[String]) -> Result<(), String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error = parking_lot::Mutex::new(None::<String>);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(names.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(n) = names.get(i) else { return };
                if first_error.lock().is_some() {
                    return;
                }
                if let Err(e) = b.delete(n) {
                    first_error
                        .lock()
                        .get_or_insert(format!("cannot delete {n}: {e}"));
                    return;
                }
            });
        }
    });
    match first_error.into_inner() {
        Some(e) => Err(format!(
            "prune stopped: {e}; nothing a kept snapshot needs was deleted; run it again"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
