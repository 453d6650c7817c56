//! Scrub's second pass over a backend: every complete snapshot is walked from its marker, and
//! every metadata object and chunk it needs must be on the backend. The first pass (the
//! parent module) verifies the objects that are there; this one finds those that are not,
//! the damage that makes a snapshot look complete while `recover` of it would fail.
//!
//! The markers are listed before the first pass lists the objects. Objects are only ever
//! deleted by a prune, which deletes a snapshot's marker before anything only it needs, so
//! every object a listed marker needed is in the later listing unless it was lost. A name
//! missing from the listing is asked for once more (`exists`), and a snapshot whose marker is
//! gone by the end of its walk (a concurrent prune) is not reported.
//!
//! With `--repair`: a missing chunk is uploaded again from the local store if it holds it; a
//! missing metadata object is rebuilt from the local snapshot of the same name and epoch, if
//! the store still has it, by building that snapshot's manifest again (the objects are
//! content-addressed, so the same snapshot gives the same objects) and uploading what the
//! backend lacks; the repair counts only if the rebuilt root is the marker's.

use std::collections::{BTreeSet, HashSet};

use crate::fs::{Fs, ScrubCounts};
use crate::replica::backend::Backend;
use crate::replica::format::{self, Body, Hash, Marker};
use crate::replica::manifest::{Builder, Known};
use crate::storage::keys::ChunkId;

/// What the object pass saw listed (chunks and metadata objects by hash).
#[derive(Default)]
pub struct Listed {
    pub metas: HashSet<Hash>,
    pub chunks: HashSet<ChunkId>,
}

impl Listed {
    pub fn note(&mut self, name: &str) {
        if let Some(h) = format::hash_of_name(name) {
            if name.starts_with("chunks/") {
                self.chunks.insert(h);
            } else {
                self.metas.insert(h);
            }
        }
    }
}

/// The markers on the backend that verify (a bad one is the object pass's finding).
pub fn markers(b: &dyn Backend) -> Result<Vec<Marker>, String> {
    let names = b
        .list("snapshots/")
        .map_err(|e| format!("cannot list snapshots/: {e}"))?;
    let mut out = Vec::new();
    for n in names {
        let Ok(obj) = b.get(&n) else { continue };
        if let Ok(m) = format::open_marker(&obj) {
            if format::marker_name(&m.name) == n {
                out.push(m);
            }
        }
    }
    out.sort_by_key(|m| m.epoch);
    Ok(out)
}

/// Objects one snapshot needs that the backend lacks: metadata objects (with whether each
/// is a file map, to walk it once rebuilt) and chunks.
#[derive(Default)]
struct Missing {
    metas: Vec<(Hash, bool)>,
    chunks: BTreeSet<ChunkId>,
}

/// The result of the walk, for the report.
pub struct Outcome {
    pub counts: ScrubCounts,
    pub snapshots: u64,
    pub findings: Vec<String>,
}

fn there(b: &dyn Backend, listed: bool, name: &str) -> Result<bool, String> {
    if listed {
        return Ok(true);
    }
    b.exists(name)
        .map_err(|e| format!("cannot ask for {name}: {e}"))
}

/// One walk over a backend's snapshots: what it has seen, so that an object shared by many
/// snapshots is checked once.
struct Walk<'a> {
    b: &'a dyn Backend,
    listed: &'a Listed,
    seen_metas: HashSet<Hash>,
    seen_chunks: HashSet<ChunkId>,
    out: Outcome,
}

impl Walk<'_> {
    /// Walks down from `roots` ((hash, is a file map)) of snapshot `m`; returns what is
    /// missing below them.
    fn from(
        &mut self,
        m: &Marker,
        roots: Vec<(Hash, bool)>,
        tick: &mut dyn FnMut(&ScrubCounts) -> bool,
    ) -> Result<Missing, String> {
        let mut missing = Missing::default();
        let mut stack = roots;
        while let Some((h, is_map)) = stack.pop() {
            if !self.seen_metas.insert(h) {
                continue;
            }
            self.out.counts.checked += 1;
            if !tick(&self.out.counts) {
                return Err("stopped: the client went away".into());
            }
            let name = format::meta_name(&h);
            if !there(self.b, self.listed.metas.contains(&h), &name)? {
                missing.metas.push((h, is_map));
                continue;
            }
            // A bad object is the object pass's finding; nothing below it can be walked.
            let Ok(obj) = self.b.get(&name) else { continue };
            self.out.counts.bytes += obj.len() as u64;
            if is_map {
                let Ok(items) = format::open_map(&h, &obj, m.chunk_size) else {
                    continue;
                };
                for i in items {
                    if !self.seen_chunks.insert(i.id) {
                        continue;
                    }
                    self.out.counts.checked += 1;
                    let name = format::chunk_name(&i.id);
                    if !there(self.b, self.listed.chunks.contains(&i.id), &name)? {
                        missing.chunks.insert(i.id);
                    }
                }
            } else {
                let Ok(entries) = format::open_tree(&h, &obj) else {
                    continue;
                };
                for e in entries {
                    match e.body {
                        Body::Dir(d) => stack.push((d, false)),
                        Body::File(Some(f)) => stack.push((f, true)),
                        _ => {}
                    }
                }
            }
        }
        Ok(missing)
    }
}

/// Walks every marker; `tick` is called between objects and returns false to stop.
pub fn walk(
    fs: &Fs,
    backend_name: &str,
    b: &dyn Backend,
    markers: &[Marker],
    listed: &Listed,
    repair: bool,
    tick: &mut dyn FnMut(&ScrubCounts) -> bool,
) -> Result<Outcome, String> {
    let mut w = Walk {
        b,
        listed,
        seen_metas: HashSet::new(),
        seen_chunks: HashSet::new(),
        out: Outcome {
            counts: ScrubCounts::default(),
            snapshots: 0,
            findings: Vec::new(),
        },
    };
    for m in markers {
        let roots = match m.root.body {
            Body::Dir(h) => vec![(h, false)],
            _ => Vec::new(),
        };
        let missing = w.from(m, roots, tick)?;
        w.out.snapshots += 1;
        if missing.metas.is_empty() && missing.chunks.is_empty() {
            continue;
        }
        // A prune may have deleted the snapshot (its marker first) while it was walked.
        let marker = format::marker_name(&m.name);
        if !b
            .exists(&marker)
            .map_err(|e| format!("cannot ask for {marker}: {e}"))?
        {
            continue;
        }
        let snap = &m.name;
        let line = |out: &mut Outcome, what: &str, hash: &Hash, fate: &str| {
            out.counts.bad += 1;
            out.findings.push(format!(
                "{backend_name}: snapshot {snap} needs {what} {}, which the backend does not \
                 have: {fate}",
                format::hex(hash)
            ));
        };
        let mut chunks = missing.chunks;
        if !missing.metas.is_empty() {
            let rebuilt = repair.then(|| rebuild_manifest(fs, b, m));
            let mut below = Vec::new();
            for (h, is_map) in &missing.metas {
                let fate = match &rebuilt {
                    None if *is_map => "missing".to_string(),
                    None => "missing (nothing below it can be checked)".to_string(),
                    Some(Err(e)) => format!("UNREPAIRABLE: {e}"),
                    Some(Ok(n)) if b.exists(&format::meta_name(h)).unwrap_or(false) => {
                        w.out.counts.repaired += 1;
                        w.seen_metas.remove(h);
                        below.push((*h, *is_map));
                        format!(
                            "rebuilt from the local snapshot ({n} metadata objects uploaded \
                             with it)"
                        )
                    }
                    Some(Ok(_)) => "UNREPAIRABLE: not there after the rebuild".to_string(),
                };
                if repair && !fate.starts_with("rebuilt") {
                    w.out.counts.unrepairable += 1;
                }
                line(&mut w.out, "metadata object", h, &fate);
            }
            // What was below a rebuilt object had not been walked: walk it now.
            if !below.is_empty() {
                let more = w.from(m, below, tick)?;
                for (h, _) in &more.metas {
                    w.out.counts.unrepairable += 1;
                    line(
                        &mut w.out,
                        "metadata object",
                        h,
                        "UNREPAIRABLE: not there after the rebuild",
                    );
                }
                chunks.extend(more.chunks);
            }
        }
        for id in &chunks {
            let fate = if !repair {
                "missing".to_string()
            } else {
                match super::reupload_chunk(fs, b, &format::chunk_name(id)) {
                    Ok(()) => {
                        w.out.counts.repaired += 1;
                        "re-uploaded from the local store".to_string()
                    }
                    Err(e) => {
                        w.out.counts.unrepairable += 1;
                        format!("UNREPAIRABLE: {e}")
                    }
                }
            };
            line(&mut w.out, "chunk", id, &fate);
        }
    }
    Ok(w.out)
}

/// Uploads what the backend lacks of the manifest of the local snapshot that `m` describes.
/// Returns how many objects it uploaded.
fn rebuild_manifest(fs: &Fs, b: &dyn Backend, m: &Marker) -> Result<u32, String> {
    let local = fs
        .snapshot_get(&m.name)
        .map_err(|_| "the local store has no snapshot of that name".to_string())?;
    if local.epoch != m.epoch {
        return Err(format!(
            "the local snapshot {} is another one (epoch {}, the marker's {})",
            m.name, local.epoch, m.epoch
        ));
    }
    let view = fs
        .snapshot_view(&m.name)
        .map_err(|e| format!("cannot open the local snapshot: {e}"))?;
    let mut known = OnBackend(b);
    let mut builder = Builder::new(&view, b, &mut known);
    let root = builder.build()?;
    if root.body != m.root.body {
        return Err("the local snapshot does not build the manifest the marker names".into());
    }
    Ok(builder.stats.uploaded)
}

/// What the backend holds, asked object by object (a repair walks one snapshot).
struct OnBackend<'a>(&'a dyn Backend);

impl Known for OnBackend<'_> {
    fn has_meta(&mut self, hash: &Hash) -> Result<bool, String> {
        self.0
            .exists(&format::meta_name(hash))
            .map_err(|e| e.to_string())
    }

    fn add_meta(&mut self, _hash: &Hash) -> Result<(), String> {
        Ok(())
    }

    fn is_bad_chunk(&mut self, _id: &ChunkId) -> Result<bool, String> {
        Ok(false)
    }
}
