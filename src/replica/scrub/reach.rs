//! Scrub's second pass over a backend: every complete snapshot is walked from its marker, and
//! every metadata object and chunk it needs must be on the backend and readable. The first
//! pass (the parent module) verifies the objects that are there; this one finds those that
//! are not, or that verify against their hash but cannot be decoded: the damage that makes a
//! snapshot look complete while `recover` of it would fail.
//!
//! The markers are listed before the first pass lists the objects. Objects are only ever
//! deleted by a prune, which deletes a snapshot's marker before anything only it needs, so
//! every object a listed marker needed is in the later listing unless it was lost. A name
//! missing from the listing is asked for once more (`exists`), and a snapshot whose marker is
//! gone or changed by the end of its walk (a concurrent prune) is not reported; what it found
//! missing is left for the other snapshots to find. Snapshots are walked newest first, so an
//! object shared by many is blamed on (and rebuilt from) the newest, the one the local store
//! most likely still has. A read that fails for another reason than absence stops the walk:
//! the scrub is then reported incomplete, never clean.
//!
//! With `--repair`: a missing chunk is uploaded again from the local store if it holds it; a
//! missing or undecodable metadata object is rebuilt from the local snapshot of the same name
//! and epoch, if the store still has it, by building that snapshot's manifest again (the
//! objects are content-addressed, so the same snapshot gives the same objects) and uploading
//! what the backend lacks; the repair counts only if the rebuilt root is the marker's.

use std::collections::{BTreeSet, HashSet};

use crate::fs::{Fs, ScrubCounts};
use crate::replica::backend::{Backend, BackendError};
use crate::replica::format::{self, Body, Hash, Marker};
use crate::replica::lane::TokenBucket;
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

/// The markers to walk, newest first, and findings about markers that cannot be walked.
pub struct Markers {
    pub markers: Vec<Marker>,
    /// Markers stored under another snapshot's name (moved or forged): one finding each.
    pub misnamed: Vec<String>,
}

/// Lists and reads the markers. One that does not decode or cannot be read for good is the
/// object pass's finding; one that cannot be read for now makes the scrub incomplete.
pub fn markers(b: &dyn Backend) -> Result<Markers, String> {
    let names = b
        .list("snapshots/")
        .map_err(|e| format!("cannot list snapshots/: {e}"))?;
    let mut out = Markers {
        markers: Vec::new(),
        misnamed: Vec::new(),
    };
    for n in names {
        let obj = match b.get(&n) {
            Ok(o) => o,
            Err(e) if e.is_transient() => return Err(format!("cannot read {n}: {e}")),
            // Gone since the listing, or unreadable for good (the object pass says so).
            Err(_) => continue,
        };
        let Ok(m) = format::open_marker(&obj) else {
            continue;
        };
        if format::marker_name(&m.name) == n {
            out.markers.push(m);
        } else {
            out.misnamed.push(format!(
                "{n}: the marker names snapshot {:?} (moved or forged); not walked",
                m.name
            ));
        }
    }
    out.markers.sort_by_key(|m| std::cmp::Reverse(m.epoch));
    Ok(out)
}

/// Why a metadata object a snapshot needs is not usable.
enum MetaFault {
    Missing,
    /// Read, but it does not verify or decode. `hash`: it fails its hash (the object pass
    /// counted it as bad too).
    Damaged {
        why: String,
        hash: bool,
    },
}

/// What one snapshot needs that is not usable: metadata objects (with whether each is a file
/// map, to walk it once rebuilt) and chunks.
#[derive(Default)]
struct Missing {
    metas: Vec<(Hash, bool, MetaFault)>,
    chunks: BTreeSet<ChunkId>,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.metas.is_empty() && self.chunks.is_empty()
    }
}

/// The result of the walk, for the report.
pub struct Outcome {
    pub counts: ScrubCounts,
    pub snapshots: u64,
    /// Objects the object pass counted as bad that the walk rebuilt.
    pub objects_rebuilt: u64,
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
    bucket: Option<&'a TokenBucket>,
    seen_metas: HashSet<Hash>,
    seen_chunks: HashSet<ChunkId>,
    /// What the current snapshot's walk added to the seen sets.
    walked_metas: Vec<Hash>,
    walked_chunks: Vec<ChunkId>,
    out: Outcome,
}

impl Walk<'_> {
    /// Walks down from `roots` ((hash, is a file map)) of snapshot `m`; returns what is
    /// missing or damaged below them.
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
            self.walked_metas.push(h);
            self.out.counts.checked += 1;
            if !tick(&self.out.counts) {
                return Err("stopped: the client went away".into());
            }
            let name = format::meta_name(&h);
            if !there(self.b, self.listed.metas.contains(&h), &name)? {
                missing.metas.push((h, is_map, MetaFault::Missing));
                continue;
            }
            let obj = match self.b.get(&name) {
                Ok(o) => o,
                Err(BackendError::NotFound) => {
                    missing.metas.push((h, is_map, MetaFault::Missing));
                    continue;
                }
                Err(e) if e.is_transient() => return Err(format!("cannot read {name}: {e}")),
                // No good copy can be read (an encrypted object that fails authentication, a
                // redundant one with too few good shards): the object pass counted it bad.
                Err(e) => {
                    let why = e.to_string();
                    missing
                        .metas
                        .push((h, is_map, MetaFault::Damaged { why, hash: true }));
                    continue;
                }
            };
            self.out.counts.bytes += obj.len() as u64;
            if let Some(bk) = self.bucket {
                bk.take(obj.len());
            }
            let damaged = |e: format::BadObject| {
                let kind = if is_map {
                    format::KIND_MAP
                } else {
                    format::KIND_TREE
                };
                MetaFault::Damaged {
                    why: e.to_string(),
                    hash: format::open_meta(&h, kind, &obj).is_err(),
                }
            };
            if is_map {
                let items = match format::open_map(&h, &obj, m.chunk_size) {
                    Ok(i) => i,
                    Err(e) => {
                        missing.metas.push((h, is_map, damaged(e)));
                        continue;
                    }
                };
                for i in items {
                    if !self.seen_chunks.insert(i.id) {
                        continue;
                    }
                    self.walked_chunks.push(i.id);
                    self.out.counts.checked += 1;
                    let name = format::chunk_name(&i.id);
                    if !there(self.b, self.listed.chunks.contains(&i.id), &name)? {
                        missing.chunks.insert(i.id);
                    }
                }
            } else {
                let entries = match format::open_tree(&h, &obj) {
                    Ok(e) => e,
                    Err(e) => {
                        missing.metas.push((h, is_map, damaged(e)));
                        continue;
                    }
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

    /// Forgets everything the current snapshot's walk saw, so that another snapshot that
    /// needs the same objects walks them itself (and finds what is missing below them).
    fn unsee(&mut self) {
        for h in self.walked_metas.drain(..) {
            self.seen_metas.remove(&h);
        }
        for id in self.walked_chunks.drain(..) {
            self.seen_chunks.remove(&id);
        }
    }
}

/// Whether the marker of `m` is still the one walked (a prune may delete a snapshot, marker
/// first, while it is walked; a new snapshot may then take its name).
fn still_there(b: &dyn Backend, m: &Marker) -> Result<bool, String> {
    let name = format::marker_name(&m.name);
    match b.get(&name) {
        Ok(obj) => Ok(format::open_marker(&obj)
            .is_ok_and(|now| now.epoch == m.epoch && now.root.body == m.root.body)),
        Err(BackendError::NotFound) => Ok(false),
        Err(e) => Err(format!("cannot read {name}: {e}")),
    }
}

/// Everything `walk` needs besides the markers.
pub struct Ctx<'a> {
    pub fs: &'a Fs,
    pub backend_name: &'a str,
    pub b: &'a dyn Backend,
    pub listed: &'a Listed,
    pub repair: bool,
    pub bucket: Option<&'a TokenBucket>,
}

/// Walks every marker (newest first); `finding` takes one line per problem; `tick` is called
/// between objects and returns false to stop.
pub fn walk(
    c: &Ctx,
    markers: &[Marker],
    finding: &mut dyn FnMut(String),
    tick: &mut dyn FnMut(&ScrubCounts) -> bool,
) -> Result<Outcome, String> {
    let b = c.b;
    let mut w = Walk {
        b,
        listed: c.listed,
        bucket: c.bucket,
        seen_metas: HashSet::new(),
        seen_chunks: HashSet::new(),
        walked_metas: Vec::new(),
        walked_chunks: Vec::new(),
        out: Outcome {
            counts: ScrubCounts::default(),
            snapshots: 0,
            objects_rebuilt: 0,
        },
    };
    for m in markers {
        let roots = match m.root.body {
            Body::Dir(h) => vec![(h, false)],
            _ => Vec::new(),
        };
        w.walked_metas.clear();
        w.walked_chunks.clear();
        let missing = w.from(m, roots, tick)?;
        w.out.snapshots += 1;
        if missing.is_empty() {
            continue;
        }
        if !still_there(b, m)? {
            w.unsee();
            w.out.snapshots -= 1;
            continue;
        }
        let snap = &m.name;
        let mut line = |out: &mut Outcome, what: &str, hash: &Hash, fate: &str| {
            out.counts.bad += 1;
            finding(format!(
                "{}: snapshot {snap} needs {what} {}: {fate}",
                c.backend_name,
                format::hex(hash)
            ));
        };
        let mut chunks = missing.chunks;
        // Rounds: what a rebuild makes readable is walked, and what is missing or damaged
        // below it is rebuilt in the next round (at most the depth of the tree).
        let mut pending = missing.metas;
        let mut round = 0;
        while !pending.is_empty() {
            round += 1;
            let force: HashSet<Hash> = pending.iter().map(|x| x.0).collect();
            let rebuilt = c.repair.then(|| rebuild_any(c.fs, b, m, markers, &force));
            let mut below = Vec::new();
            for (h, is_map, fault) in &pending {
                let what = match fault {
                    MetaFault::Missing if *is_map => "the backend does not have it".to_string(),
                    MetaFault::Missing => {
                        "the backend does not have it (nothing below it can be checked)".to_string()
                    }
                    MetaFault::Damaged { why, .. } => format!("it is damaged ({why})"),
                };
                let fate = match &rebuilt {
                    None => "not repaired".to_string(),
                    Some(Err(e)) => format!("UNREPAIRABLE: {e}"),
                    Some(Ok((n, _))) if readable(b, h, *is_map, m.chunk_size) => {
                        w.out.counts.repaired += 1;
                        if matches!(fault, MetaFault::Damaged { hash: true, .. }) {
                            w.out.objects_rebuilt += 1;
                        }
                        w.seen_metas.remove(h);
                        below.push((*h, *is_map));
                        format!(
                            "rebuilt from the local snapshots ({n} metadata objects uploaded \
                             with it)"
                        )
                    }
                    Some(Ok((_, Some(e)))) => {
                        format!("UNREPAIRABLE: {e}, and no other local snapshot holds it")
                    }
                    Some(Ok((_, None))) => {
                        "UNREPAIRABLE: not readable after the rebuild".to_string()
                    }
                };
                if c.repair && !fate.starts_with("rebuilt") {
                    w.out.counts.unrepairable += 1;
                }
                line(&mut w.out, "metadata object", h, &format!("{what}: {fate}"));
            }
            if below.is_empty() || round >= MAX_ROUNDS {
                break;
            }
            // What was below a rebuilt object had not been walked: walk it now.
            let more = w.from(m, below, tick)?;
            chunks.extend(more.chunks);
            pending = more.metas;
        }
        for id in &chunks {
            let fate = if !c.repair {
                "the backend does not have it".to_string()
            } else {
                match super::reupload_chunk(c.fs, b, &format::chunk_name(id)) {
                    Ok(()) => {
                        w.out.counts.repaired += 1;
                        "the backend did not have it: re-uploaded from the local store".to_string()
                    }
                    Err(e) => {
                        w.out.counts.unrepairable += 1;
                        format!("the backend does not have it: UNREPAIRABLE: {e}")
                    }
                }
            };
            line(&mut w.out, "chunk", id, &fate);
        }
    }
    Ok(w.out)
}

/// Whether a metadata object is on the backend and matches its hash.
fn meta_ok(b: &dyn Backend, h: &Hash) -> bool {
    b.get(&format::meta_name(h))
        .is_ok_and(|obj| obj.len() > 5 && format::open_meta(h, obj[5], &obj).is_ok())
}

/// Whether a metadata object is on the backend and decodes.
fn readable(b: &dyn Backend, h: &Hash, is_map: bool, chunk_size: u32) -> bool {
    let Ok(obj) = b.get(&format::meta_name(h)) else {
        return false;
    };
    if is_map {
        format::open_map(h, &obj, chunk_size).is_ok()
    } else {
        format::open_tree(h, &obj).is_ok()
    }
}

/// Rounds of rebuilding below rebuilt objects, at most (a tree deeper than this is rebuilt
/// by the next scrub).
const MAX_ROUNDS: usize = 64;

/// Rebuilds from the local snapshot `m` names; if the store does not have it (or it fails),
/// from every other local snapshot the backend has a marker for, newest first, until every
/// object in `force` reads back: an object that `m` shares with an older snapshot the store
/// still has comes back from that one. Returns how many objects were uploaded and why `m`
/// itself could not be rebuilt, or that reason if no rebuild ran.
fn rebuild_any(
    fs: &Fs,
    b: &dyn Backend,
    m: &Marker,
    markers: &[Marker],
    force: &HashSet<Hash>,
) -> Result<(u32, Option<String>), String> {
    let first = rebuild_manifest(fs, b, m, force);
    let all_back = || force.iter().all(|h| meta_ok(b, h));
    if let Ok(n) = first {
        if all_back() {
            return Ok((n, None));
        }
    }
    let mut uploaded = *first.as_ref().unwrap_or(&0);
    let mut any = first.is_ok();
    for other in markers.iter().filter(|o| o.name != m.name) {
        if let Ok(n) = rebuild_manifest(fs, b, other, force) {
            uploaded += n;
            any = true;
            if all_back() {
                break;
            }
        }
    }
    match first {
        Err(e) if !any => Err(e),
        Err(e) => Ok((uploaded, Some(e))),
        Ok(_) => Ok((uploaded, None)),
    }
}

/// Uploads what the backend lacks of the manifest of the local snapshot that `m` describes,
/// and the objects in `force` whatever the backend holds under their names. Returns how many
/// objects it uploaded.
fn rebuild_manifest(
    fs: &Fs,
    b: &dyn Backend,
    m: &Marker,
    force: &HashSet<Hash>,
) -> Result<u32, String> {
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
    let mut known = OnBackend { b, force };
    let mut builder = Builder::new(&view, b, &mut known);
    let root = builder.build()?;
    if root.body != m.root.body {
        return Err("the local snapshot does not build the manifest the marker names".into());
    }
    Ok(builder.stats.uploaded)
}

/// What the backend holds, asked object by object (a repair walks one snapshot); the objects
/// in `force` are taken as absent (damaged copies to replace).
struct OnBackend<'a> {
    b: &'a dyn Backend,
    force: &'a HashSet<Hash>,
}

impl Known for OnBackend<'_> {
    fn has_meta(&mut self, hash: &Hash) -> Result<bool, String> {
        if self.force.contains(hash) {
            return Ok(false);
        }
        self.b
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
