//! Redundant backends: `mirror:SPEC,SPEC[,…]` and `ec:K+M:SPEC,…` (docs/replication.md,
//! "Redundant backends"). A [`Redundant`] backend is itself a [`Backend`]: the replicator,
//! `recover` and `mount --from` see one store of whole objects, and this layer spreads each
//! object over its members as verified shards ([`shard`]).
//!
//! **Degraded mode.** A put goes to every member at once. It succeeds when every member took
//! its shard, or when at least [`Layout::needed`] did and every member that did not is
//! *down*: failing for longer than `degrade_after` (default 30 s). A down member is skipped
//! without waiting on it (probed again every [`PROBE_EVERY`]), so one dead member never
//! stalls backups; each object it missed is counted, and the backend reports itself
//! degraded (`snapfs status`, metrics) until [`Backend::heal`] has rewritten the missing
//! shards on it. A short failure (shorter than `degrade_after`) makes the put fail and the
//! replicator retry it, so a blip never leaves an object under-replicated.
//!
//! Reads use any good shards: for a mirror the first member whose copy verifies, for ec the
//! k data shards when they verify, else any k good shards rebuilt by Reed-Solomon.

pub mod shard;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{check_name, Backend, BackendError, Inspection, MemberReport};
pub use shard::{Layout, ShardState};

/// A down member is tried again this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Default time a member may fail before puts go on without it.
pub const DEGRADE_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Health {
    failing_since: Option<Instant>,
    last_error: Option<String>,
    down: bool,
    next_probe: Option<Instant>,
    /// Objects written while this member was down (not on it): what healing must rewrite.
    missed: u64,
    /// A heal pass must run for this member (it missed objects, maybe in an earlier process,
    /// or the check at start has not run yet).
    needs_heal: bool,
    /// It is known to lack objects (not only unchecked): it counts as degraded.
    known_missing: bool,
}

pub struct Member {
    pub spec: String,
    pub backend: Arc<dyn Backend>,
    health: Mutex<Health>,
}

pub struct Redundant {
    spec: String,
    layout: Layout,
    members: Vec<Member>,
    degrade_after: Duration,
}

impl Member {
    /// Skip this member now: it is down and not due for a probe.
    fn skip(&self, now: Instant) -> bool {
        let h = self.health.lock();
        h.down && h.next_probe.is_some_and(|t| now < t)
    }

    fn ok(&self) {
        let mut h = self.health.lock();
        if h.down {
            log::warn!("backend member {} answers again; healing it", self.spec);
            h.needs_heal = true;
            h.known_missing = true;
        }
        h.failing_since = None;
        h.down = false;
        h.next_probe = None;
    }

    /// Records a failure; returns whether the member is down now.
    fn failed(&self, e: &BackendError, degrade_after: Duration, now: Instant) -> bool {
        let mut h = self.health.lock();
        h.last_error = Some(e.to_string());
        let since = *h.failing_since.get_or_insert(now);
        if !h.down && now.duration_since(since) >= degrade_after {
            log::error!(
                "backend member {} has failed for {:.0?}: going on without it (degraded): {e}",
                self.spec,
                now.duration_since(since)
            );
            h.down = true;
        }
        if h.down {
            h.next_probe = Some(now + PROBE_EVERY);
        }
        h.down
    }

    fn missed(&self) {
        let mut h = self.health.lock();
        h.missed += 1;
        h.needs_heal = true;
        h.known_missing = true;
    }
}

fn in_parallel<T: Send>(n: usize, f: impl Fn(usize) -> Option<T> + Sync) -> Vec<Option<T>> {
    if n == 1 {
        return vec![f(0)];
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                s.spawn({
                    let f = &f;
                    move || f(i)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(None)).collect()
    })
}

impl Redundant {
    pub fn new(
        spec: &str,
        layout: Layout,
        members: Vec<(String, Arc<dyn Backend>)>,
        degrade_after: Duration,
    ) -> Result<Redundant, String> {
        if members.len() != layout.members() {
            return Err(format!(
                "{spec}: the layout needs {} members, the spec names {}",
                layout.members(),
                members.len()
            ));
        }
        Ok(Redundant {
            spec: spec.to_string(),
            layout,
            members: members
                .into_iter()
                .map(|(spec, backend)| Member {
                    spec,
                    backend,
                    health: Mutex::new(Health::default()),
                })
                .collect(),
            degrade_after,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Every member's envelope of `name` (`None`: member not asked).
    fn fetch(&self, name: &str, which: &[bool]) -> Vec<Result<Option<Vec<u8>>, String>> {
        in_parallel(self.members.len(), |i| {
            which[i].then(|| match self.members[i].backend.get(name) {
                Ok(b) => Ok(Some(b)),
                Err(BackendError::NotFound) => Ok(None),
                Err(e) => Err(e.to_string()),
            })
        })
        .into_iter()
        .map(|r| r.unwrap_or(Ok(None)))
        .collect()
    }

    fn put_members(
        &self,
        name: &str,
        envs: &shard::Envelopes<'_>,
        which: &[bool],
    ) -> Vec<Option<Result<(), BackendError>>> {
        in_parallel(self.members.len(), |i| {
            which[i].then(|| self.members[i].backend.put_parts(name, &envs.parts(i)))
        })
    }

    fn decode_error(&self, name: &str, d: &shard::Decoded) -> BackendError {
        // No copy anywhere, and too few members unread to hold one (an object is written to
        // at least `needed` members): it does not exist.
        let missing = d
            .states
            .iter()
            .filter(|s| **s == ShardState::Missing)
            .count();
        let present = d
            .states
            .iter()
            .any(|s| matches!(s, ShardState::Good | ShardState::Bad(_)));
        if !present && missing > self.members.len() - self.layout.needed() {
            return BackendError::NotFound;
        }
        let good = d.states.iter().filter(|s| **s == ShardState::Good).count();
        let unreadable = d
            .states
            .iter()
            .filter(|s| matches!(s, ShardState::Unreadable(_)))
            .count();
        let detail: Vec<String> = d
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| format!("member {i} ({}): {}", self.members[i].spec, state_text(s)))
            .collect();
        let msg = format!(
            "cannot rebuild {name}: {good} good shards of the {} needed; {}",
            self.layout.needed(),
            detail.join("; ")
        );
        if good + unreadable >= self.layout.needed() {
            BackendError::Transient(msg)
        } else {
            BackendError::Permanent(msg)
        }
    }

    /// Reads `name` and, with `repair`, rewrites the shards of members whose copy is missing
    /// or bad (not those that could not be read).
    pub fn inspect_object(&self, name: &str, repair: bool) -> Result<Inspection, BackendError> {
        check_name(name)?;
        let envs = self.fetch(name, &vec![true; self.members.len()]);
        let d = shard::decode(self.layout, &envs);
        let mut repaired = Vec::new();
        let mut unrepaired = Vec::new();
        if repair {
            let fix: Vec<bool> = d
                .states
                .iter()
                .map(|s| matches!(s, ShardState::Missing | ShardState::Bad(_)))
                .collect();
            let any_present = d.states.iter().any(|s| *s != ShardState::Missing);
            if fix.iter().any(|f| *f) && any_present {
                match &d.object {
                    Some(obj) => {
                        let envs =
                            shard::encode(self.layout, obj).map_err(BackendError::Permanent)?;
                        for (i, r) in self.put_members(name, &envs, &fix).into_iter().enumerate() {
                            match r {
                                Some(Ok(())) => repaired.push(i),
                                Some(Err(e)) => unrepaired.push((i, e.to_string())),
                                None => {}
                            }
                        }
                    }
                    None => {
                        for (i, f) in fix.iter().enumerate() {
                            if *f {
                                unrepaired.push((i, "too few good shards to rebuild it".into()));
                            }
                        }
                    }
                }
            }
        }
        let error = if d.object.is_none() && d.states.iter().any(|s| *s != ShardState::Missing) {
            Some(self.decode_error(name, &d).to_string())
        } else {
            None
        };
        Ok(Inspection {
            object: d.object,
            members: d
                .states
                .into_iter()
                .enumerate()
                .map(|(i, s)| (self.members[i].spec.clone(), s))
                .collect(),
            repaired,
            unrepaired,
            error,
        })
    }
}

pub fn state_text(s: &ShardState) -> String {
    match s {
        ShardState::Good => "good".into(),
        ShardState::Missing => "missing".into(),
        ShardState::Unreadable(e) => format!("unreadable: {e}"),
        ShardState::Bad(e) => format!("bad: {e}"),
    }
}

impl Backend for Redundant {
    fn describe(&self) -> String {
        self.spec.clone()
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        check_name(name)?;
        let envs = shard::encode(self.layout, data).map_err(BackendError::Permanent)?;
        let now = Instant::now();
        let which: Vec<bool> = self.members.iter().map(|m| !m.skip(now)).collect();
        let results = self.put_members(name, &envs, &which);
        let now = Instant::now();
        let mut stored = 0;
        let mut all_failed_down = true;
        let mut errors = Vec::new();
        // Permanent only if members answered, and every answer was a permanent error.
        let mut permanent = results.iter().any(|r| matches!(r, Some(Err(_))));
        for (i, r) in results.iter().enumerate() {
            let m = &self.members[i];
            match r {
                Some(Ok(())) => {
                    m.ok();
                    stored += 1;
                }
                Some(Err(e)) => {
                    permanent &= !e.is_transient();
                    if !m.failed(e, self.degrade_after, now) {
                        all_failed_down = false;
                    }
                    errors.push(format!("member {i} ({}): {e}", m.spec));
                }
                None => errors.push(format!("member {i} ({}): down", m.spec)),
            }
        }
        if stored == self.members.len() {
            return Ok(());
        }
        if stored >= self.layout.needed() && all_failed_down {
            for (i, r) in results.iter().enumerate() {
                if !matches!(r, Some(Ok(()))) {
                    self.members[i].missed();
                }
            }
            return Ok(());
        }
        let msg = format!(
            "{stored} of {} members stored {name} ({} needed, the others not yet down): {}",
            self.members.len(),
            self.layout.needed(),
            errors.join("; ")
        );
        Err(if permanent && stored < self.layout.needed() {
            BackendError::Permanent(msg)
        } else {
            BackendError::Transient(msg)
        })
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        check_name(name)?;
        let n = self.members.len();
        let now = Instant::now();
        // First the members most likely to answer: the data shards (ec) or the first up
        // member (mirror); then everyone.
        let mut first = vec![false; n];
        match self.layout {
            Layout::Mirror { .. } => {
                let i = (0..n).find(|&i| !self.members[i].skip(now)).unwrap_or(0);
                first[i] = true;
            }
            Layout::Ec { k, .. } => first[..k as usize].iter_mut().for_each(|f| *f = true),
        }
        let envs = self.fetch(name, &first);
        let d = shard::decode(self.layout, &envs);
        if let Some(obj) = d.object {
            return Ok(obj);
        }
        let rest: Vec<bool> = first.iter().map(|f| !f).collect();
        let more = self.fetch(name, &rest);
        let envs: Vec<_> = envs
            .into_iter()
            .zip(more)
            .zip(&first)
            .map(|((a, b), f)| if *f { a } else { b })
            .collect();
        let d = shard::decode(self.layout, &envs);
        match d.object {
            Some(obj) => Ok(obj),
            None => Err(self.decode_error(name, &d)),
        }
    }

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        check_name(name)?;
        let r = in_parallel(self.members.len(), |i| {
            Some(self.members[i].backend.exists(name))
        });
        let yes = r.iter().filter(|x| matches!(x, Some(Ok(true)))).count();
        let no = r.iter().filter(|x| matches!(x, Some(Ok(false)))).count();
        if yes >= self.layout.needed() {
            return Ok(true);
        }
        if yes + (self.members.len() - yes - no) < self.layout.needed() {
            return Ok(false);
        }
        let errs: Vec<String> = r
            .into_iter()
            .flatten()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        Err(BackendError::Transient(format!(
            "cannot tell whether {name} exists: {}",
            errs.join("; ")
        )))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let r = in_parallel(self.members.len(), |i| {
            Some(self.members[i].backend.list(prefix))
        });
        let mut names = std::collections::BTreeSet::new();
        let mut answered = 0;
        let mut errs = Vec::new();
        for (i, x) in r.into_iter().enumerate() {
            match x {
                Some(Ok(v)) => {
                    answered += 1;
                    names.extend(v);
                }
                Some(Err(e)) => errs.push(format!("member {i} ({}): {e}", self.members[i].spec)),
                None => {}
            }
        }
        // An object is readable only with `needed` members; with fewer answering, a listing
        // could miss objects that exist, so it fails instead.
        if answered < self.layout.needed() {
            return Err(BackendError::Transient(format!(
                "only {answered} members answered a listing: {}",
                errs.join("; ")
            )));
        }
        Ok(names.into_iter().collect())
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        check_name(name)?;
        let r = in_parallel(self.members.len(), |i| {
            Some(self.members[i].backend.delete(name))
        });
        let errs: Vec<String> = r
            .into_iter()
            .enumerate()
            .filter_map(|(i, x)| match x {
                Some(Err(e)) => Some(format!("member {i} ({}): {e}", self.members[i].spec)),
                _ => None,
            })
            .collect();
        if errs.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Transient(format!(
                "deleting {name}: {}",
                errs.join("; ")
            )))
        }
    }

    fn members(&self) -> Vec<MemberReport> {
        let now = Instant::now();
        self.members
            .iter()
            .map(|m| {
                let h = m.health.lock();
                MemberReport {
                    spec: m.spec.clone(),
                    state: if h.down {
                        "down"
                    } else if h.failing_since.is_some() {
                        "failing"
                    } else if h.needs_heal && h.known_missing {
                        "healing"
                    } else if h.needs_heal {
                        "checking"
                    } else {
                        "ok"
                    }
                    .to_string(),
                    failing_seconds: h.failing_since.map(|t| now.duration_since(t).as_secs_f64()),
                    last_error: h.last_error.clone(),
                    missed_objects: h.missed,
                }
            })
            .collect()
    }

    fn needs_heal(&self) -> bool {
        self.members.iter().any(|m| m.health.lock().needs_heal)
    }

    fn sweep_temporaries(&self, dirs: &[String]) -> u64 {
        self.members
            .iter()
            .map(|m| m.backend.sweep_temporaries(dirs))
            .sum()
    }

    fn mark_needs_heal(&self, known_missing: bool) {
        for m in &self.members {
            let mut h = m.health.lock();
            h.needs_heal = true;
            h.known_missing |= known_missing;
        }
    }

    fn heal(&self, prefixes: &[String]) -> Result<u64, BackendError> {
        let now = Instant::now();
        let mut todo: Vec<usize> = (0..self.members.len())
            .filter(|&i| {
                let m = &self.members[i];
                m.health.lock().needs_heal && !m.skip(now)
            })
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        let mut rewritten = 0;
        let mut last_err = None;
        for p in prefixes {
            let lists = in_parallel(self.members.len(), |i| {
                Some(self.members[i].backend.list(p))
            });
            let mut union = std::collections::BTreeSet::new();
            let mut have: Vec<std::collections::HashSet<String>> = Vec::new();
            for (i, l) in lists.into_iter().enumerate() {
                match l {
                    Some(Ok(v)) => {
                        if todo.contains(&i) {
                            self.members[i].ok(); // it answers: back from down
                        }
                        union.extend(v.iter().cloned());
                        have.push(v.into_iter().collect());
                    }
                    Some(Err(e)) => {
                        if todo.contains(&i) {
                            // This member is not healed in this pass; the others go on.
                            self.members[i].failed(&e, self.degrade_after, Instant::now());
                            todo.retain(|&t| t != i);
                            last_err = Some(e);
                        }
                        have.push(Default::default());
                    }
                    None => have.push(Default::default()),
                }
            }
            if todo.is_empty() {
                return Err(last_err.unwrap_or(BackendError::Transient("no member to heal".into())));
            }
            for name in &union {
                if todo.iter().all(|&i| have[i].contains(name)) {
                    continue;
                }
                let ins = self.inspect_object(name, true)?;
                if ins.object.is_none() {
                    // Too few good shards anywhere: nothing to heal from (scrub names it).
                    log::error!(
                        "{}: cannot heal {name}: {}",
                        self.spec,
                        ins.error.unwrap_or_default()
                    );
                    continue;
                }
                if let Some((i, e)) = ins.unrepaired.iter().find(|(i, _)| todo.contains(i)) {
                    return Err(BackendError::Transient(format!(
                        "healing member {i} ({}): {name}: {e}",
                        self.members[*i].spec
                    )));
                }
                rewritten += ins.repaired.len() as u64;
            }
        }
        for &i in &todo {
            let mut h = self.members[i].health.lock();
            if !h.down {
                h.needs_heal = false;
                h.known_missing = false;
                h.missed = 0;
            }
        }
        Ok(rewritten)
    }

    fn inspect(&self, name: &str, repair: bool) -> Result<Inspection, BackendError> {
        self.inspect_object(name, repair)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
