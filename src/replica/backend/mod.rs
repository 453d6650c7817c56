//! Where replicated objects (sealed chunks, snapshot manifests) are stored: one small,
//! synchronous [`Backend`] trait, modelled on rustic_core's `ReadBackend`/`WriteBackend`
//! (whole objects by name, no partial writes, listing by prefix), and its implementations:
//!
//! | spec                  | type               | `put` Ok means                                          |
//! |-----------------------|--------------------|---------------------------------------------------------|
//! | `dir:/ABS/PATH`       | [`dir::DirBackend`] | the file's bytes and its directory entry are fsynced; readers see the old or the new object, never a part |
//! | `s3://BUCKET[/PREFIX]`| [`s3::S3Backend`]   | the server answered 2xx to one PUT whose SigV4-signed payload hash it checked; S3 objects are replaced whole |
//! | (tests)               | [`mem::MemBackend`] | stored in memory                                        |
//!
//! Object names are checked by [`check_name`] on the way in and on the way out: a backend's
//! listing is untrusted data, and no name may ever escape the backend's root.

pub mod config;
pub mod crypt;
pub mod dir;
mod direct;
pub mod mem;
pub mod redundant;
pub mod s3;

use std::fmt;

/// Why a backend operation failed, sorted by what the caller should do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// No object of that name.
    NotFound,
    /// Retrying later (with backoff) may succeed: network errors, timeouts, HTTP 5xx, EIO,
    /// ENOSPC, an unwritable or missing backend directory.
    Transient(String),
    /// Retrying cannot help until an operator acts: bad credentials (HTTP 401/403), no such
    /// bucket, a bad object name, a symlink planted in a backend directory.
    Permanent(String),
}

impl BackendError {
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Transient(_))
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::NotFound => write!(f, "object not found"),
            BackendError::Transient(m) => write!(f, "transient backend error: {m}"),
            BackendError::Permanent(m) => write!(f, "permanent backend error: {m}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// A store of whole objects by name. Every method may be called from several threads at
/// once. Implementations call [`check_name`] on every name they are given and on every
/// name they return.
pub trait Backend: Send + Sync {
    /// What the backend is, for messages: `dir:/abs/path`, `s3://bucket/prefix (endpoint)`.
    fn describe(&self) -> String;
    /// Stores `data` as `name`, replacing any object of that name. Atomic (a reader sees the
    /// old object or the new one, never a part) and durable when it returns Ok, to the extent
    /// each backend documents. Idempotent: putting the same bytes again is harmless.
    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError>;
    /// Stores the concatenation of `parts` as `name`, exactly as [`Backend::put`] would. A
    /// backend that can write the parts without joining them first overrides it (`dir:`
    /// with one vectored write: a redundant backend's envelope header and the object it
    /// shares between members).
    fn put_parts(&self, name: &str, parts: &[&[u8]]) -> Result<(), BackendError> {
        match parts {
            [one] => self.put(name, one),
            _ => self.put(name, &parts.concat()),
        }
    }
    /// The whole object; [`BackendError::NotFound`] if there is none.
    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError>;
    fn exists(&self, name: &str) -> Result<bool, BackendError>;
    /// The full names of all objects whose name starts with `prefix` (`""`: all objects;
    /// `"snapshots/"`: `"snapshots/a"`, `"snapshots/x/b"`, ...), in no particular order.
    /// Names stored in the backend that fail [`check_name`] are logged and skipped.
    fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError>;
    /// Removes the object; Ok if there was none.
    fn delete(&self, name: &str) -> Result<(), BackendError>;

    /// Deletes what puts that never finished left behind in the directories `dirs` of the
    /// layout ("" is the top; a `dir:` backend's temporary files older than a day); returns
    /// how many. Called by the replicator, never by commands that only read (a listing
    /// deletes nothing), and not for `--append-only` backends (`AppendOnly` keeps the
    /// default).
    fn sweep_temporaries(&self, _dirs: &[String]) -> u64 {
        0
    }
    /// The members of a redundant backend and their health (empty for a plain backend).
    fn members(&self) -> Vec<MemberReport> {
        Vec::new()
    }
    /// Whether some member misses objects that [`Backend::heal`] should rewrite.
    fn needs_heal(&self) -> bool {
        false
    }
    /// Marks every member for a heal pass: at start (`known_missing` false: a check that
    /// finds what an earlier process or an operator's hands left missing), or after a
    /// restart in a degraded state whose counts are gone (`known_missing` true).
    fn mark_needs_heal(&self, _known_missing: bool) {}
    /// Rewrites, on members that need it and answer, every object under `prefixes` that
    /// they lack; returns the number of shards written.
    fn heal(&self, _prefixes: &[String]) -> Result<u64, BackendError> {
        Ok(0)
    }
    /// Reads `name` copy by copy (scrub): the object if it could be read or rebuilt, and
    /// what each member holds; with `repair`, rewrites missing or bad copies from good ones.
    fn inspect(&self, name: &str, _repair: bool) -> Result<Inspection, BackendError> {
        let state = match self.get(name) {
            Ok(obj) => {
                return Ok(Inspection::single(
                    self.describe(),
                    Some(obj),
                    ShardState::Good,
                ))
            }
            Err(BackendError::NotFound) => ShardState::Missing,
            Err(e) => ShardState::Unreadable(e.to_string()),
        };
        Ok(Inspection::single(self.describe(), None, state))
    }
}

pub use redundant::ShardState;

/// An `--append-only` backend as a store opens it: every delete is refused, whatever asks.
/// (Storage-side permissions are what protects it from a host that is itself compromised:
/// docs/replication.md, "Append-only backends".)
pub struct AppendOnly(pub Box<dyn Backend>);

impl Backend for AppendOnly {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        self.0.put(name, data)
    }
    fn put_parts(&self, name: &str, parts: &[&[u8]]) -> Result<(), BackendError> {
        self.0.put_parts(name, parts)
    }
    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        self.0.get(name)
    }
    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        self.0.exists(name)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.0.list(prefix)
    }
    fn delete(&self, name: &str) -> Result<(), BackendError> {
        Err(BackendError::Permanent(format!(
            "{}: refusing to delete {name}: the backend is append-only for this store",
            self.0.describe()
        )))
    }
    fn members(&self) -> Vec<MemberReport> {
        self.0.members()
    }
    fn needs_heal(&self) -> bool {
        self.0.needs_heal()
    }
    fn mark_needs_heal(&self, known_missing: bool) {
        self.0.mark_needs_heal(known_missing)
    }
    fn heal(&self, prefixes: &[String]) -> Result<u64, BackendError> {
        self.0.heal(prefixes)
    }
    fn inspect(&self, name: &str, repair: bool) -> Result<Inspection, BackendError> {
        self.0.inspect(name, repair)
    }
}

/// One member of a redundant backend, as `snapfs status` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemberReport {
    pub spec: String,
    /// `ok`, `failing` (errors, not yet down), `down` (writes go on without it), `healing`
    /// (back, missing objects being rewritten), `checking` (the heal pass every daemon runs
    /// at start, comparing the members' listings, has not finished).
    pub state: String,
    pub failing_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// Objects written without it since it went down.
    pub missed_objects: u64,
}

/// What [`Backend::inspect`] found of one object.
#[derive(Debug)]
pub struct Inspection {
    pub object: Option<Vec<u8>>,
    /// Per copy (member): its description and state.
    pub members: Vec<(String, ShardState)>,
    /// Members whose copy was rewritten.
    pub repaired: Vec<usize>,
    /// Members whose copy needed a rewrite that failed, and why.
    pub unrepaired: Vec<(usize, String)>,
    /// Why the object could not be rebuilt, if it exists somewhere but could not.
    pub error: Option<String>,
}

impl Inspection {
    fn single(describe: String, object: Option<Vec<u8>>, state: ShardState) -> Inspection {
        Inspection {
            object,
            members: vec![(describe, state)],
            repaired: Vec::new(),
            unrepaired: Vec::new(),
            error: None,
        }
    }
}

/// Longest component of an object name, in bytes.
pub const MAX_COMPONENT: usize = 255;
/// Longest object name, in bytes.
pub const MAX_NAME: usize = 1024;
/// Components starting with this are the dir backend's temporary files, refused as names.
pub const TMP_PREFIX: &str = ".tmp.";

fn name_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

fn bad_name(name: &str, why: &str) -> BackendError {
    BackendError::Permanent(format!("bad object name {name:?}: {why}"))
}

/// Checks an object name: relative, `/`-separated, each component non-empty, not `.` or
/// `..`, not starting with [`TMP_PREFIX`], only `[A-Za-z0-9._-]`, at most [`MAX_COMPONENT`]
/// bytes per component and [`MAX_NAME`] in all. Such a name, joined under a root, can only
/// name something inside it.
pub fn check_name(name: &str) -> Result<(), BackendError> {
    if name.is_empty() {
        return Err(bad_name(name, "empty"));
    }
    if name.len() > MAX_NAME {
        return Err(bad_name(name, "longer than 1024 bytes"));
    }
    for comp in name.split('/') {
        if comp.is_empty() {
            return Err(bad_name(
                name,
                "empty component (leading, trailing or double /)",
            ));
        }
        if comp == "." || comp == ".." {
            return Err(bad_name(name, "`.` or `..` component"));
        }
        if comp.len() > MAX_COMPONENT {
            return Err(bad_name(name, "component longer than 255 bytes"));
        }
        if comp.starts_with(TMP_PREFIX) {
            return Err(bad_name(name, "component starts with the reserved `.tmp.`"));
        }
        if !comp.bytes().all(name_byte_ok) {
            return Err(bad_name(name, "only A-Z a-z 0-9 . _ - and / are allowed"));
        }
    }
    Ok(())
}

/// Checks a listing prefix and splits it at its last `/`: (directory part, rest). The
/// directory part is `""` or a valid name; the rest holds only name bytes (maybe none).
pub fn split_prefix(prefix: &str) -> Result<(&str, &str), BackendError> {
    let (dir, rest) = match prefix.rfind('/') {
        Some(i) => (&prefix[..i], &prefix[i + 1..]),
        None => ("", prefix),
    };
    if !dir.is_empty() || prefix.starts_with('/') {
        check_name(dir).map_err(|_| bad_prefix(prefix))?;
    }
    if rest.len() > MAX_COMPONENT || !rest.bytes().all(name_byte_ok) {
        return Err(bad_prefix(prefix));
    }
    Ok((dir, rest))
}

fn bad_prefix(prefix: &str) -> BackendError {
    BackendError::Permanent(format!("bad listing prefix {prefix:?}"))
}

/// Keeps a name a backend listed if it is valid and under `prefix`; logs and drops a name
/// that fails [`check_name`].
pub(crate) fn keep_listed(backend: &str, name: &str, prefix: &str) -> bool {
    if let Err(e) = check_name(name) {
        log::warn!("{backend}: skipping a listed object: {e}");
        return false;
    }
    name.starts_with(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "chunks/ab/abcdef",
            "x.y_z-1",
            "snapshots/.keep",
            &"a".repeat(255),
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        let long_comp = "a".repeat(256);
        let long_name = vec!["a".repeat(200); 6].join("/");
        for bad in [
            "", "/x", "x/", "../x", "a/../b", "a//b", "a/./b", ".", "..", "a\0b", "a b", "a\\b",
            "é", ".tmp.1.2", "a/.tmp.x", &long_comp, &long_name,
        ] {
            assert!(
                matches!(check_name(bad), Err(BackendError::Permanent(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(split_prefix(""), Ok(("", "")));
        assert_eq!(split_prefix("snapshots/"), Ok(("snapshots", "")));
        assert_eq!(split_prefix("chunks/ab"), Ok(("chunks", "ab")));
        assert_eq!(split_prefix("ab"), Ok(("", "ab")));
        for bad in ["/", "/x", "../", "a//", "a/../b/", "a b", "x/\0"] {
            assert!(split_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display() {
        assert_eq!(BackendError::NotFound.to_string(), "object not found");
        assert!(BackendError::Transient("x".into()).is_transient());
        assert!(!BackendError::Permanent("x".into()).is_transient());
    }
}
