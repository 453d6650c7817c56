//! `snapfs scrub`: re-reads and verifies every local chunk and every backend object, and
//! with `--repair` rewrites a bad copy from a good one (docs/replication.md, "Scrub").
//!
//! - Local chunks: decompressed and hashed against their id; a bad one is healed from the
//!   first backend that holds a good copy (`fs/heal.rs`).
//! - Backend objects, listed prefix by prefix (`format::listing_prefixes`): every copy
//!   (member of a mirror, shard of an ec layout) checked on its own, the object rebuilt and
//!   verified as what its name says (a chunk against its id, a metadata object against its
//!   hash, a marker or the descriptor against its trailer). With `--repair`: a missing or bad
//!   copy is rewritten from the good ones (mirror member from mirror member, ec shard by
//!   reconstruction); an object that cannot be read back at all is re-uploaded from the
//!   local store if it is a chunk the store holds.
//!
//! It runs beside writers: it takes no lock for longer than one chunk's repair, and a bandwidth
//! limit (`--limit`) paces the bytes it reads.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::fs::{ChunkSource, Fs, LocalChunk, ScrubCounts};
use crate::replica::backend::{Backend, BackendError, ShardState};
use crate::replica::format;
use crate::replica::lane::TokenBucket;
use crate::storage::keys::ChunkId;

mod reach;

/// At most this many findings are listed (the counts hold them all).
const MAX_FINDINGS: usize = 1000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackendScrub {
    pub name: String,
    pub spec: String,
    /// Whole objects: read back (rebuilt) and verified as what their names say.
    pub objects: ScrubCounts,
    /// Copies: one per object on a plain backend, one per member (mirror) or shard (ec).
    pub copies: ScrubCounts,
    /// The complete snapshots walked from their markers (`reach.rs`).
    #[serde(default)]
    pub snapshots: u64,
    /// Objects those snapshots need: checked = distinct objects reached, bad = not on the
    /// backend.
    #[serde(default)]
    pub needed: ScrubCounts,
    /// Why the scrub of this backend stopped early, if it did.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub repair: bool,
    pub local: Option<ScrubCounts>,
    pub backends: Vec<BackendScrub>,
    /// One line per bad copy or object, and what became of it (at most 1000).
    pub findings: Vec<String>,
    pub findings_left_out: u64,
    pub seconds: f64,
}

impl ScrubReport {
    /// Anything still bad at the end: not repaired (without `--repair`, everything bad), or
    /// a backend that could not be scrubbed to the end.
    pub fn clean(&self) -> bool {
        let left = |c: &ScrubCounts| c.bad > c.repaired;
        !self.local.as_ref().is_some_and(left)
            && self.backends.iter().all(|b| {
                !left(&b.objects) && !left(&b.copies) && !left(&b.needed) && b.error.is_none()
            })
    }

    fn finding(&mut self, f: String) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(f);
        } else {
            self.findings_left_out += 1;
        }
    }
}

pub struct Options {
    pub repair: bool,
    pub local: bool,
    pub limit_bytes_per_sec: Option<u64>,
}

/// Heals chunks from a list of backends, first good copy wins.
pub struct BackendsHealer(pub Vec<Arc<dyn Backend>>);

impl ChunkSource for BackendsHealer {
    fn fetch(&self, id: &ChunkId) -> Result<Vec<u8>, String> {
        let name = format::chunk_name(id);
        let mut why = Vec::new();
        for b in &self.0 {
            match b.get(&name) {
                Ok(obj) => match format::open_chunk(id, &obj) {
                    Ok((_, data)) => return Ok(data),
                    Err(e) => why.push(format!("{}: {e}", b.describe())),
                },
                Err(e) => why.push(format!("{}: {e}", b.describe())),
            }
        }
        if why.is_empty() {
            return Err("no backend".into());
        }
        Err(why.join("; "))
    }
}

/// Runs a scrub. `backends`: (name, spec, backend) of those to scrub. `progress` gets a line
/// now and then and returns false to stop (the client went away).
pub fn run(
    fs: &Fs,
    backends: &[(String, String, Arc<dyn Backend>)],
    o: &Options,
    progress: &mut dyn FnMut(String) -> bool,
) -> ScrubReport {
    let start = Instant::now();
    let bucket = o.limit_bytes_per_sec.map(TokenBucket::new);
    let mut rep = ScrubReport {
        repair: o.repair,
        ..Default::default()
    };
    let mut last = Instant::now();
    let mut tick = |msg: &dyn Fn() -> String| -> bool {
        if last.elapsed().as_millis() >= 500 {
            last = Instant::now();
            return progress(msg());
        }
        true
    };
    if o.local {
        let mut c = ScrubCounts::default();
        // The chunks, listed a page at a time on this thread as the examiners need them.
        let mut after: Option<ChunkId> = None;
        let mut page = std::collections::VecDeque::new();
        let mut list_error = None;
        let chunks = std::iter::from_fn(|| {
            if page.is_empty() && list_error.is_none() {
                match fs.chunks_after(after.as_ref(), 256) {
                    Ok(p) => {
                        after = p.last().map(|x| x.0);
                        page.extend(p);
                    }
                    Err(e) => list_error = Some(e),
                }
            }
            page.pop_front()
        });
        {
            par_each(
                chunks,
                threads(false),
                |(id, stored)| {
                    if let Some(b) = &bucket {
                        b.take(stored as usize);
                    }
                    (id, stored, fs.scrub_chunk(&id, o.repair))
                },
                |(id, stored, r)| {
                    c.checked += 1;
                    c.bytes += stored as u64;
                    match r {
                        Ok(LocalChunk::Good) | Ok(LocalChunk::Gone) => {}
                        Ok(LocalChunk::Bad { healed, why }) => {
                            c.bad += 1;
                            if healed {
                                c.repaired += 1;
                            } else if o.repair {
                                c.unrepairable += 1;
                            }
                            let fate = if healed {
                                "repaired from a backend"
                            } else if o.repair {
                                "UNREPAIRABLE"
                            } else {
                                "bad"
                            };
                            rep.finding(format!("local chunk {}: {why}: {fate}", format::hex(&id)));
                        }
                        Err(e) => {
                            c.bad += 1;
                            c.unrepairable += 1;
                            rep.finding(format!(
                                "local chunk {}: cannot read: {e}",
                                format::hex(&id)
                            ));
                        }
                    }
                    let (n, bytes) = (c.checked, c.bytes);
                    tick(&|| format!("scrub: local: {n} chunks checked ({} MiB)", bytes >> 20))
                },
            );
        }
        if let Some(e) = list_error {
            rep.finding(format!("local: cannot list chunks: {e}"));
            c.bad += 1;
            c.unrepairable += 1;
        }
        rep.local = Some(c);
    }
    for (name, spec, b) in backends {
        let mut s = BackendScrub {
            name: name.clone(),
            spec: spec.clone(),
            ..Default::default()
        };
        // Listed before the objects: every object these need is in the later listing.
        let markers = match reach::markers(b.as_ref()) {
            Ok(m) => m,
            Err(e) => {
                s.error = Some(e);
                rep.backends.push(s);
                continue;
            }
        };
        let mut listed = reach::Listed::default();
        // Listed prefix by prefix on this thread, examined (read, rebuilt, verified) on
        // several, recorded (counted, repaired from the store) here again.
        let listing = format::listing_prefixes().into_iter().flat_map(|p| {
            let r: Vec<Result<String, String>> = match b.list(&p) {
                Ok(n) => n.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(format!("cannot list {p}: {e}"))],
            };
            r
        });
        par_each(
            listing,
            threads(true),
            |item| {
                let name = item?;
                examine(b.as_ref(), name, o, bucket.as_ref())
            },
            |r| {
                match r {
                    Ok(Some(x)) => {
                        listed.note(&x.name);
                        record(fs, b.as_ref(), x, o, &mut s, &mut rep);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        s.error.get_or_insert(e);
                        return false;
                    }
                }
                let (n, bytes) = (s.objects.checked, s.objects.bytes);
                if !tick(&|| {
                    format!(
                        "scrub: backend {name}: {n} objects checked ({} MiB)",
                        bytes >> 20
                    )
                }) {
                    s.error = Some("stopped: the client went away".into());
                    return false;
                }
                true
            },
        );
        if s.error.is_none() {
            let mut tick_walk = |c: &ScrubCounts| {
                let n = c.checked;
                tick(&|| format!("scrub: backend {name}: {n} objects snapshots need checked"))
            };
            let ctx = reach::Ctx {
                fs,
                backend_name: name,
                b: b.as_ref(),
                listed: &listed,
                repair: o.repair,
                bucket: bucket.as_ref(),
            };
            for f in &markers.misnamed {
                s.needed.bad += 1;
                if o.repair {
                    s.needed.unrepairable += 1;
                }
                rep.finding(format!("{name}: {f}"));
            }
            let mut finding = |f: String| rep.finding(f);
            match reach::walk(&ctx, &markers.markers, &mut finding, &mut tick_walk) {
                Ok(w) => {
                    s.snapshots = w.snapshots;
                    let misnamed = s.needed;
                    s.needed = w.counts;
                    s.needed.bad += misnamed.bad;
                    s.needed.unrepairable += misnamed.unrepairable;
                    // Damaged metadata the walk rebuilt was the object pass's finding too.
                    s.objects.repaired += w.objects_rebuilt;
                }
                Err(e) => s.error = Some(e),
            }
        }
        rep.backends.push(s);
    }
    rep.seconds = start.elapsed().as_secs_f64();
    rep
}

/// What a name says an object must be, checked.
fn verify(name: &str, obj: &[u8]) -> Result<(), String> {
    let r = if name.starts_with("chunks/") {
        let id = format::hash_of_name(name).ok_or("not a chunk name")?;
        format::open_chunk(&id, obj).map(|_| ())
    } else if name.starts_with("meta/") {
        let h = format::hash_of_name(name).ok_or("not a metadata name")?;
        let kind = *obj.get(5).ok_or("too short")?;
        format::open_meta(&h, kind, obj).map(|_| ())
    } else if name.starts_with("snapshots/") {
        format::open_marker(obj).map(|_| ())
    } else if name == format::REPO_NAME {
        format::open_repo(obj).map(|_| ())
    } else if name == crate::replica::prune::STATE_NAME {
        crate::replica::prune::open_state(obj).map(|_| ())
    } else {
        return Err("not an object snapfs writes".into());
    };
    r.map_err(|e| e.to_string())
}

/// An object read back and checked, on a worker thread.
struct Examined {
    name: String,
    ins: crate::replica::backend::Inspection,
    /// Why the rebuilt object is not what its name says, if it is not.
    problem: Option<String>,
}

/// Reads and checks one object (every copy, then the whole); `None` if it was deleted since
/// the listing.
fn examine(
    b: &dyn Backend,
    name: String,
    o: &Options,
    bucket: Option<&TokenBucket>,
) -> Result<Option<Examined>, String> {
    let ins = match b.inspect(&name, o.repair) {
        Ok(i) => i,
        Err(BackendError::NotFound) => return Ok(None),
        Err(e) => return Err(format!("{name}: {e}")),
    };
    if let (Some(obj), Some(bk)) = (&ins.object, bucket) {
        bk.take(obj.len());
    }
    let problem = match &ins.object {
        None => Some(ins.error.clone().unwrap_or_else(|| "cannot be read".into())),
        Some(obj) => verify(&name, obj).err(),
    };
    Ok(Some(Examined { name, ins, problem }))
}

/// Counts what `examine` found, and with `--repair` uploads a bad chunk again from the store.
fn record(
    fs: &Fs,
    b: &dyn Backend,
    x: Examined,
    o: &Options,
    s: &mut BackendScrub,
    rep: &mut ScrubReport,
) {
    let Examined { name, ins, problem } = x;
    let name = name.as_str();
    s.objects.checked += 1;
    if let Some(obj) = &ins.object {
        s.objects.bytes += obj.len() as u64;
    }
    for (i, (member, state)) in ins.members.iter().enumerate() {
        s.copies.checked += 1;
        if matches!(state, ShardState::Good) {
            continue;
        }
        s.copies.bad += 1;
        let fate = if ins.repaired.contains(&i) {
            s.copies.repaired += 1;
            "rewritten".to_string()
        } else if let Some((_, e)) = ins.unrepaired.iter().find(|(j, _)| *j == i) {
            if o.repair {
                s.copies.unrepairable += 1;
            }
            format!("UNREPAIRABLE: {e}")
        } else if o.repair {
            // Unreadable (the member is down): nothing can be written there now.
            s.copies.unrepairable += 1;
            "UNREPAIRABLE now (the member does not answer)".to_string()
        } else {
            "bad".to_string()
        };
        let what = match state {
            ShardState::Missing => "missing".to_string(),
            ShardState::Bad(e) => format!("bad ({e})"),
            ShardState::Unreadable(e) => format!("unreadable ({e})"),
            ShardState::Good => String::new(),
        };
        rep.finding(format!(
            "{}: {name}: copy on {member}: {what}: {fate}",
            s.name
        ));
    }
    let Some(why) = problem else {
        return;
    };
    s.objects.bad += 1;
    let mut fate = "bad".to_string();
    if o.repair && name.starts_with("meta/") {
        // Metadata is rebuilt from local snapshots by the walk (reach.rs), which counts it
        // repaired here if it does; if no snapshot needs it, it stays bad (prune drops it).
        fate = "left to the snapshot walk below (rebuilt there from a local snapshot that \
                needs it)"
            .into();
    } else if o.repair {
        fate = match reupload_chunk(fs, b, name) {
            Ok(()) => {
                s.objects.repaired += 1;
                "re-uploaded from the local store".into()
            }
            Err(e) => {
                s.objects.unrepairable += 1;
                format!("UNREPAIRABLE: {e}")
            }
        };
    }
    rep.finding(format!("{}: object {name}: {why}: {fate}", s.name));
}

/// Worker threads: the cores for local chunks (hashing bound); at least 8 for a backend,
/// whose reads wait on a network or a disk.
fn threads(backend: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    if backend {
        cores.clamp(8, 16)
    } else {
        cores.clamp(1, 16)
    }
}

/// Runs `work` over `items` on `n` threads and hands each result to `sink` on the calling
/// thread, in the order they finish; stops feeding items once `sink` returns false (the
/// items in flight are finished and dropped). Returns whether every item was handed over.
/// At most `n` items wait and `n` are worked on; results are taken after each item is
/// handed over, so at most about `2 n + 1` wait to be taken: memory stays bounded whatever
/// the count. (The result channel is unbounded so that a worker never waits on the caller
/// while the caller waits to hand it an item.)
fn par_each<T: Send, R: Send>(
    items: impl Iterator<Item = T>,
    n: usize,
    work: impl Fn(T) -> R + Sync,
    mut sink: impl FnMut(R) -> bool,
) -> bool {
    let (tx, rx) = crossbeam_channel::bounded::<T>(n);
    let (rtx, rrx) = crossbeam_channel::unbounded::<R>();
    std::thread::scope(|sc| {
        for _ in 0..n {
            let (rx, rtx, work) = (rx.clone(), rtx.clone(), &work);
            sc.spawn(move || {
                for t in rx {
                    if rtx.send(work(t)).is_err() {
                        return;
                    }
                }
            });
        }
        drop((rx, rtx));
        let mut go = true;
        let mut all = true;
        for item in items {
            if !go || tx.send(item).is_err() {
                all = false;
                break;
            }
            while let Ok(r) = rrx.try_recv() {
                go = go && sink(r);
            }
        }
        drop(tx);
        for r in rrx {
            go = go && sink(r);
        }
        go && all
    })
}

fn reupload_chunk(fs: &Fs, b: &dyn Backend, name: &str) -> Result<(), String> {
    let hex = name
        .strip_prefix("chunks/")
        .and_then(|r| r.rsplit('/').next())
        .ok_or("only chunks can be re-uploaded from the local store")?;
    let mut id = [0u8; 32];
    for (i, x) in id.iter_mut().enumerate() {
        *x = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or("not a chunk name")?;
    }
    let obj = fs
        .eng
        .with_value(crate::storage::engine::Cf::Chunks, &id, |stored| {
            crate::storage::chunk::verify(&id, stored).map(|_| format::chunk_object(stored))
        })
        .map_err(|e| format!("cannot read the local copy: {e}"))?
        .ok_or("the local store does not hold it")?
        .map_err(|e| format!("the local copy is bad too: {e}"))?;
    b.put(name, &obj)
        .map_err(|e| format!("cannot re-upload it: {e}"))?;
    let back = b
        .get(name)
        .map_err(|e| format!("cannot read it back: {e}"))?;
    verify(name, &back).map_err(|e| format!("still bad after re-upload: {e}"))
}

/// Text for `snapfs scrub` without `--json`.
pub fn to_text(r: &ScrubReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for f in &r.findings {
        let _ = writeln!(s, "{f}");
    }
    if r.findings_left_out > 0 {
        let _ = writeln!(s, "... and {} more findings", r.findings_left_out);
    }
    let line = |what: &str, c: &ScrubCounts| {
        format!(
            "{what}: {} checked ({} MiB), {} bad, {} repaired, {} unrepairable",
            c.checked,
            c.bytes >> 20,
            c.bad,
            c.repaired,
            c.unrepairable
        )
    };
    if let Some(c) = &r.local {
        let _ = writeln!(s, "{}", line("local chunks", c));
    }
    for b in &r.backends {
        let _ = writeln!(
            s,
            "{}",
            line(&format!("backend {} objects", b.name), &b.objects)
        );
        let _ = writeln!(
            s,
            "{}",
            line(&format!("backend {} copies", b.name), &b.copies)
        );
        let _ = writeln!(
            s,
            "{} ({} complete snapshots walked)",
            line(
                &format!("backend {} objects that snapshots need", b.name),
                &b.needed
            ),
            b.snapshots
        );
        if let Some(e) = &b.error {
            let _ = writeln!(s, "backend {}: scrub incomplete: {e}", b.name);
        }
    }
    let _ = writeln!(
        s,
        "scrub {} in {:.1} s",
        if r.clean() {
            "clean"
        } else {
            "found damage left unrepaired"
        },
        r.seconds
    );
    s
}

#[cfg(test)]
mod tests {
    use super::par_each;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn par_each_hands_over_every_result_once() {
        let mut got: Vec<u64> = Vec::new();
        let all = par_each(
            0..10_000u64,
            4,
            |i| i * 2,
            |r| {
                got.push(r);
                true
            },
        );
        assert!(all);
        got.sort_unstable();
        assert_eq!(got, (0..10_000u64).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn par_each_stops_feeding_when_told() {
        let worked = AtomicUsize::new(0);
        let mut seen = 0;
        let all = par_each(
            0..100_000u32,
            3,
            |i| {
                worked.fetch_add(1, Ordering::Relaxed);
                i
            },
            |_| {
                seen += 1;
                seen < 10
            },
        );
        assert!(!all);
        assert_eq!(seen, 10, "nothing is handed over after the sink said stop");
        // Only what was in flight when it stopped was worked on: a few times the threads.
        let w = worked.load(Ordering::Relaxed);
        assert!(w < 100, "{w} items worked on after the stop");
    }
}
