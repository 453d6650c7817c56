//! The lane's side of prune's protocol: before a snapshot's manifest is built, right before
//! its marker is written, and right after, the lane reads `prune/state` through a
//! [`PruneGate`]. While a prune sweeps, no marker is written; once a newer generation is
//! done (or a sweeping one is abandoned), the lane lists the backend and reconciles the
//! store's records with what is there ([`resync`]) before it writes another marker.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{read_state, PruneState, ABANDONED_AFTER};
use crate::fs::Fs;
use crate::replica::backend::Backend;
use crate::replica::format;

/// What the gate says about writing a marker now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Go ahead; the token must be the same after the marker is written, or a prune began
    /// meanwhile and the snapshot is completed again after it.
    Go(Token),
    /// A prune is sweeping: why the lane waits.
    Hold(String),
}

/// The prune generation a lane reconciled with, and the heartbeat of an abandoned prune
/// it went past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    generation: u64,
    abandoned_beat: Option<u64>,
}

pub struct PruneGate {
    cached: Option<(PruneState, Instant)>,
    /// A sweeping state seen unchanged since then.
    watching: Option<(u64, u64, Instant)>,
    /// (generation, heartbeat) of a sweeping state taken as abandoned, already reconciled.
    abandoned: Option<(u64, u64)>,
    reconciled: u64,
}

impl PruneGate {
    pub fn new(reconciled: u64) -> PruneGate {
        PruneGate {
            cached: None,
            watching: None,
            abandoned: None,
            reconciled,
        }
    }

    fn state(&mut self, b: &dyn Backend, max_age: Duration) -> Result<PruneState, String> {
        if let Some((s, at)) = &self.cached {
            if at.elapsed() < max_age {
                return Ok(s.clone());
            }
        }
        let s = read_state(b)?;
        self.cached = Some((s.clone(), Instant::now()));
        Ok(s)
    }

    /// Reads the state (a cached one if younger than `max_age`), reconciling with the
    /// backend first if a prune finished since the last time.
    pub fn check(
        &mut self,
        fs: &Fs,
        id: u32,
        b: &dyn Backend,
        max_age: Duration,
    ) -> Result<Gate, String> {
        let s = self.state(b, max_age)?;
        if s.sweeping {
            let key = (s.generation, s.heartbeat);
            if self.abandoned == Some(key) {
                return Ok(Gate::Go(Token {
                    generation: self.reconciled,
                    abandoned_beat: Some(s.heartbeat),
                }));
            }
            match self.watching {
                Some((g, hb, since))
                    if (g, hb) == key && since.elapsed() > s.interval() * ABANDONED_AFTER =>
                {
                    log::warn!(
                        "backend {}: {} seems abandoned (its heartbeat stood still for {:.1} s); \
                         reconciling with the backend and going on",
                        b.describe(),
                        s.describe(),
                        since.elapsed().as_secs_f64()
                    );
                    resync(fs, id, b, None)?;
                    self.abandoned = Some(key);
                    self.watching = None;
                    return Ok(Gate::Go(Token {
                        generation: self.reconciled,
                        abandoned_beat: Some(s.heartbeat),
                    }));
                }
                Some((g, hb, _)) if (g, hb) == key => {}
                _ => self.watching = Some((key.0, key.1, Instant::now())),
            }
            return Ok(Gate::Hold(format!(
                "waiting for {} to finish before writing snapshot markers",
                s.describe()
            )));
        }
        self.watching = None;
        self.abandoned = None;
        if s.generation != self.reconciled {
            // Newer (a prune ran), or older (the backend was reset or replaced): either way
            // the records are checked against what is there.
            resync(fs, id, b, Some(s.generation))?;
            self.reconciled = s.generation;
        }
        Ok(Gate::Go(Token {
            generation: s.generation,
            abandoned_beat: None,
        }))
    }
}

/// Lists the backend and reconciles backend `id`'s records in the store with it
/// (`Fs::reconcile_replica`); with `generation`, records it as reconciled.
pub fn resync(fs: &Fs, id: u32, b: &dyn Backend, generation: Option<u64>) -> Result<(), String> {
    let start = Instant::now();
    let mut chunks = HashSet::new();
    let mut metas = HashSet::new();
    let mut markers = HashSet::new();
    for p in format::listing_prefixes() {
        let is_chunk = p.starts_with("chunks/");
        let is_meta = p.starts_with("meta/");
        if !is_chunk && !is_meta && p != "snapshots/" {
            continue;
        }
        let names = b
            .list(&p)
            .map_err(|e| format!("cannot list {p} to reconcile after a prune: {e}"))?;
        for n in names {
            if let Some(s) = n.strip_prefix("snapshots/") {
                markers.insert(s.to_string());
            } else if let Some(h) = format::hash_of_name(&n) {
                if is_chunk {
                    chunks.insert(h);
                } else {
                    metas.insert(h);
                }
            }
        }
    }
    let r = fs
        .reconcile_replica(
            id,
            &|c| chunks.contains(c),
            &|h| metas.contains(h),
            &|n| markers.contains(n),
            generation,
        )
        .map_err(|e| format!("cannot reconcile with the backend after a prune: {e}"))?;
    log::warn!(
        "backend {}: reconciled after prune{} in {:.1} s: {} held chunks to upload again when a \
         snapshot needs them, {} metadata objects to upload again, {} snapshots pruned from it{}",
        b.describe(),
        generation.map_or(String::new(), |g| format!(" generation {g}")),
        start.elapsed().as_secs_f64(),
        r.absent_chunks,
        r.forgotten_metas,
        r.pruned_snapshots.len(),
        if r.pruned_snapshots.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.pruned_snapshots.join(", "))
        }
    );
    Ok(())
}
