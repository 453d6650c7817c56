//! The figures of `snapfs status` (and of the metrics): per backend, its queue (the RPO), what
//! it uploaded, its last error, and each snapshot's state on it.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::fs::Fs;
use crate::replica::backend::config::BackendConfig;
use crate::replica::backend::MemberReport;
use crate::replica::lane::{self, Lane};
use crate::storage::engine::Cf;
use crate::storage::keys::{self, QueueEntry, ReplSnap};

/// At most this many queue entries are read for one status (the counts say so if cut).
const MAX_SCAN: usize = 4_000_000;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SnapshotState {
    pub name: String,
    pub complete: bool,
    /// From `snapshot create` returning to complete on this backend (null while pending).
    pub window_seconds: Option<f64>,
    /// Chunk bytes uploaded between the previous snapshot's completion and this one's.
    pub chunk_bytes: u64,
    pub meta_objects_uploaded: u32,
    pub meta_objects_skipped: u32,
    /// It was complete here, and the backend's retention (`backend prune`) deleted it.
    #[serde(default)]
    pub pruned: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BackendStatus {
    pub name: String,
    pub spec: String,
    /// False when no daemon is replicating (the store is not mounted): figures are from disk.
    pub running: bool,
    pub pending_chunks: u64,
    pub pending_bytes: u64,
    /// Age of the oldest sealed chunk not yet on the backend: the RPO. Null when none.
    pub oldest_pending_seconds: Option<f64>,
    /// True if the queue was longer than the status read (the counts are lower bounds).
    pub pending_truncated: bool,
    pub uploaded_bytes: u64,
    pub uploaded_chunks: u64,
    pub throughput_bytes_per_sec: f64,
    pub failed_puts: u64,
    /// Chunks that failed verification and were not uploaded.
    pub bad_chunks: u64,
    pub last_error: Option<String>,
    /// Uploads are failing now (no successful put since the last error).
    pub failing: bool,
    /// When `last_error` happened, ms since the Unix epoch.
    pub last_error_at_ms: Option<u64>,
    pub snapshots: Vec<SnapshotState>,
    /// The last completed snapshot's backup window (seconds) and efficiency E = V / T: the
    /// chunk bytes it needed uploaded over its window.
    pub backup_window_seconds: Option<f64>,
    pub backup_efficiency_bytes_per_sec: Option<f64>,
    /// A redundant backend (mirror:, ec:) with a member down or being healed: objects are
    /// written with less redundancy than the layout's until it is healed.
    #[serde(default)]
    pub degraded: bool,
    /// The members of a redundant backend (empty for dir: and s3://).
    #[serde(default)]
    pub members: Vec<MemberReport>,
    /// Why no snapshot marker is being written now: a prune of this backend is sweeping.
    #[serde(default)]
    pub prune_wait: Option<String>,
    /// The last prune generation of this backend the store reconciled with (0: none).
    #[serde(default)]
    pub prune_generation: u64,
}

/// Each snapshot's state on backend `id`, in the order they were taken.
pub fn snapshot_states(fs: &Fs, id: u32) -> Result<Vec<(String, ReplSnap)>, String> {
    let prefix = keys::repl_key(keys::P_REPL_SNAP, id, &[]);
    let r = fs.eng.reader().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for item in r.scan(Cf::Meta, &prefix, &prefix) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        if let Some(s) = ReplSnap::decode(&v) {
            out.push((String::from_utf8_lossy(&k[5..]).into_owned(), s));
        }
    }
    out.sort_by_key(|(_, s)| (s.barrier_seq, s.created_ms));
    Ok(out)
}

pub fn backend_status(
    fs: &Fs,
    cfg: &BackendConfig,
    lane: Option<&Lane>,
) -> Result<BackendStatus, String> {
    let prefix = keys::repl_key(keys::P_REPL_QUEUE, cfg.id, &[]);
    let (mut chunks, mut bytes, mut oldest, mut truncated) = (0u64, 0u64, None, false);
    {
        let r = fs.eng.reader().map_err(|e| e.to_string())?;
        for item in r.scan(Cf::Meta, &prefix, &prefix) {
            let (_, v) = item.map_err(|e| e.to_string())?;
            if chunks as usize >= MAX_SCAN {
                truncated = true;
                break;
            }
            if let Some(e) = QueueEntry::decode(&v) {
                chunks += 1;
                bytes += e.stored_len as u64;
                oldest = Some(oldest.map_or(e.sealed_ms, |o: u64| o.min(e.sealed_ms)));
            }
        }
    }
    let now = crate::fs::now_ms();
    let mut snapshots = Vec::new();
    let mut prev_cumulative = 0u64;
    let mut last_done: Option<(f64, u64)> = None;
    for (name, s) in snapshot_states(fs, cfg.id)? {
        let was_complete = s.completed_ms != 0;
        let complete = was_complete && !s.pruned;
        let window =
            was_complete.then(|| s.completed_ms.saturating_sub(s.created_ms) as f64 / 1000.0);
        let needed = if was_complete {
            let d = s.chunk_bytes.saturating_sub(prev_cumulative);
            prev_cumulative = s.chunk_bytes;
            d
        } else {
            0
        };
        if let Some(w) = window {
            last_done = Some((w, needed));
        }
        snapshots.push(SnapshotState {
            name,
            complete,
            window_seconds: window,
            chunk_bytes: needed,
            meta_objects_uploaded: s.meta_uploaded,
            meta_objects_skipped: s.meta_skipped,
            pruned: s.pruned,
        });
    }
    // Pending snapshots (their chunks still committing locally) have no marker yet: listed
    // as not complete, so `snapshot wait` waits for them rather than calling them unknown.
    for p in fs.snapshot_list().map_err(|e| e.to_string())? {
        if p.pending && !snapshots.iter().any(|s| s.name == p.name) {
            snapshots.push(SnapshotState {
                name: p.name,
                complete: false,
                window_seconds: None,
                chunk_bytes: 0,
                meta_objects_uploaded: 0,
                meta_objects_skipped: 0,
                pruned: false,
            });
        }
    }
    let (uploaded_bytes, uploaded_chunks, throughput, failed, err) = match lane {
        Some(l) => {
            let st = &l.stats;
            (
                st.uploaded_bytes.load(Ordering::Relaxed),
                st.uploaded_chunks.load(Ordering::Relaxed),
                st.throughput(),
                st.failed_puts.load(Ordering::Relaxed),
                st.last_error.lock().clone(),
            )
        }
        None => (
            fs.stored_counter(&lane::uploaded_counter(cfg.id)),
            0,
            0.0,
            0,
            None,
        ),
    };
    // One record per chunk refused before upload (`Lane::refuse`), kept across restarts.
    let bad = count_bad(fs, cfg.id)?;
    let members = lane.map_or_else(Vec::new, |l| l.backend.members());
    Ok(BackendStatus {
        name: cfg.name.clone(),
        spec: cfg.spec.clone(),
        running: lane.is_some(),
        pending_chunks: chunks,
        pending_bytes: bytes,
        oldest_pending_seconds: oldest.map(|o| now.saturating_sub(o) as f64 / 1000.0),
        pending_truncated: truncated,
        uploaded_bytes,
        uploaded_chunks,
        throughput_bytes_per_sec: throughput,
        failed_puts: failed,
        bad_chunks: bad,
        failing: lane.is_some_and(|l| l.failing()),
        last_error_at_ms: err.as_ref().map(|e| e.1),
        last_error: err.map(|e| e.0),
        snapshots,
        backup_window_seconds: last_done.map(|d| d.0),
        backup_efficiency_bytes_per_sec: last_done.map(|(w, v)| v as f64 / w.max(0.001)),
        degraded: members
            .iter()
            .any(|m| !matches!(m.state.as_str(), "ok" | "checking")),
        members,
        prune_wait: lane.and_then(|l| l.prune_wait.lock().clone()),
        prune_generation: fs
            .replica_pruned_generation(cfg.id)
            .map_err(|e| e.to_string())?,
    })
}

fn count_bad(fs: &Fs, id: u32) -> Result<u64, String> {
    let prefix = keys::repl_key(keys::P_REPL_BAD, id, &[]);
    let r = fs.eng.reader().map_err(|e| e.to_string())?;
    Ok(r.scan(Cf::Meta, &prefix, &prefix).count() as u64)
}

/// Text for `snapfs status` without `--json`.
pub fn to_text(all: &[BackendStatus]) -> String {
    use std::fmt::Write;
    if all.is_empty() {
        return "no backends (snapfs backend add TARGET NAME SPEC)\n".into();
    }
    let mut s = String::new();
    for b in all {
        let rpo = b
            .oldest_pending_seconds
            .map_or("nothing pending".to_string(), |o| {
                format!("oldest pending {o:.1} s ago")
            });
        let _ = writeln!(
            s,
            "backend {} ({}){}",
            b.name,
            b.spec,
            if b.running { "" } else { " [not running]" }
        );
        let _ = writeln!(
            s,
            "  pending:   {} chunks, {} bytes; {rpo}",
            b.pending_chunks, b.pending_bytes
        );
        let _ = writeln!(
            s,
            "  uploaded:  {} bytes ({:.1} MB/s over the last 10 s); {} failed puts, {} bad chunks",
            b.uploaded_bytes,
            b.throughput_bytes_per_sec / 1e6,
            b.failed_puts,
            b.bad_chunks
        );
        if let Some(e) = &b.last_error {
            let _ = writeln!(s, "  last error: {e}");
        }
        if let Some(w) = &b.prune_wait {
            let _ = writeln!(s, "  PRUNE: {w}");
        }
        if b.degraded {
            let _ = writeln!(
                s,
                "  DEGRADED: a member is down or being healed; new objects have less redundancy"
            );
        }
        for (i, m) in b.members.iter().enumerate() {
            let mut line = format!("  member {i} {}: {}", m.spec, m.state);
            if m.missed_objects > 0 {
                line += &format!(", {} objects to heal", m.missed_objects);
            }
            if let (Some(e), true) = (&m.last_error, m.state != "ok") {
                line += &format!(" ({e})");
            }
            let _ = writeln!(s, "{line}");
        }
        if let (Some(w), Some(e)) = (b.backup_window_seconds, b.backup_efficiency_bytes_per_sec) {
            let _ = writeln!(
                s,
                "  last backup window: {w:.3} s; efficiency {:.1} MB/s",
                e / 1e6
            );
        }
        for snap in &b.snapshots {
            let st = match snap.window_seconds {
                _ if snap.pruned => "pruned by the backend's retention".into(),
                Some(w) => format!("complete ({w:.3} s after it was taken)"),
                None => "pending".into(),
            };
            let _ = writeln!(s, "  snapshot {}: {st}", snap.name);
        }
    }
    s
}
