//! What the store keeps about each backend, so that a daemon started later, without the
//! user's environment, can still replicate: `STORE/backends/NAME.json`, mode 0600, in a
//! 0700 `backends/` directory (it may hold S3 secret keys).
//!
//! S3 credentials are resolved once, when the backend is added, from (in this order) the
//! standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`)
//! and an AWS-style credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//! `~/.aws/credentials`; profile `AWS_PROFILE`, else `default`); the endpoint and region
//! come from options, else `AWS_ENDPOINT_URL` and `AWS_REGION`/`AWS_DEFAULT_REGION`.
//! Resolution takes the environment as a function, so tests never touch the process's.

use super::crypt::Encrypted;
use super::dir::DirBackend;
use super::redundant::{self, shard, Layout, Redundant};
use super::s3::{S3Backend, S3Options};
use super::{check_name, Backend};
use crate::sys;
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    /// `[A-Za-z0-9_-]{1,64}`, unique in the store.
    pub name: String,
    pub id: u32,
    /// `dir:/ABS/PATH` or `s3://BUCKET[/PREFIX]`.
    pub spec: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Upload bandwidth limit, applied by the replicator (the backends do not throttle).
    pub limit_bytes_per_sec: Option<u64>,
    pub credentials: Option<Credentials>,
    /// Redundant backends: how long a member may fail before writes go on without it
    /// (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degrade_after_secs: Option<u64>,
    /// `--encrypt`: the backend's master key, hex (this file is 0600 in a 0700 directory;
    /// the store it protects is plaintext on the same disk). Its wrapped form is the
    /// backend's `snapfs-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<Secret32>,
    /// `--keep-*`: the snapshots `backend prune` keeps (None: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<crate::fs::keep::Policy>,
    /// `--append-only`: snapfs on this host never deletes from the backend (prune runs from a
    /// trusted host with `--from`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append_only: bool,
}

/// A 32-byte key, stored as hex, never printed by Debug.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret32(pub String);

impl Secret32 {
    pub fn new(k: &[u8; 32]) -> Secret32 {
        Secret32(super::super::format::hex(k))
    }

    pub fn bytes(&self) -> Result<[u8; 32], String> {
        let s = &self.0;
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err("a stored encryption key is not 64 hex digits".into());
        }
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| "a stored encryption key is not hex".to_string())?;
        }
        Ok(out)
    }
}

impl std::fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Never prints the secret or the token.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecKind {
    Dir(PathBuf),
    S3 {
        bucket: String,
        prefix: Option<String>,
    },
    /// `mirror:SPEC,SPEC[,…]` or `ec:K+M:SPEC,…`: plain member specs, in order.
    Redundant {
        layout: Layout,
        members: Vec<(String, SpecKind)>,
    },
}

impl SpecKind {
    /// The plain (`dir:`, `s3://`) backends this spec names: itself, or its members.
    pub fn plain_members(&self) -> Vec<&SpecKind> {
        match self {
            SpecKind::Redundant { members, .. } => members.iter().map(|(_, k)| k).collect(),
            k => vec![k],
        }
    }
}

const SPEC_HELP: &str =
    "use dir:/ABS/PATH, s3://BUCKET[/PREFIX], mirror:SPEC,SPEC[,...] or ec:K+M:SPEC,...";

/// Parses `dir:/ABS/PATH`, `s3://BUCKET[/PREFIX]`, `mirror:SPEC,SPEC[,…]` (2 to 32 members)
/// or `ec:K+M:SPEC,…` (K+M members, K >= 1, M >= 1, K+M <= 32). Members are plain specs,
/// split at commas (so a member `dir:` path cannot hold a comma), and must be distinct.
pub fn parse_spec(spec: &str) -> Result<SpecKind, String> {
    if let Some(rest) = spec.strip_prefix("mirror:") {
        let members = parse_members(spec, rest)?;
        if members.len() < 2 {
            return Err(format!("{spec:?}: a mirror needs at least 2 members"));
        }
        let layout = Layout::Mirror {
            n: members.len() as u8,
        };
        return Ok(SpecKind::Redundant { layout, members });
    }
    if let Some(rest) = spec.strip_prefix("ec:") {
        let bad =
            || format!("{spec:?}: erasure coding is ec:K+M:SPEC,... (e.g. ec:4+2:dir:/a,...)");
        let (km, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (k, m) = km.split_once('+').ok_or_else(bad)?;
        let k: u8 = k.parse().map_err(|_| bad())?;
        let m: u8 = m.parse().map_err(|_| bad())?;
        if k == 0 || m == 0 || k as usize + m as usize > shard::MAX_MEMBERS {
            return Err(format!(
                "{spec:?}: K and M must be at least 1 and K+M at most {}",
                shard::MAX_MEMBERS
            ));
        }
        let members = parse_members(spec, rest)?;
        if members.len() != (k + m) as usize {
            return Err(format!(
                "{spec:?}: ec:{k}+{m} needs {} member specs, not {}",
                k + m,
                members.len()
            ));
        }
        let layout = Layout::Ec { k, m };
        return Ok(SpecKind::Redundant { layout, members });
    }
    parse_plain(spec)
}

fn parse_members(spec: &str, list: &str) -> Result<Vec<(String, SpecKind)>, String> {
    let mut out: Vec<(String, SpecKind)> = Vec::new();
    for m in list.split(',') {
        if m.starts_with("mirror:") || m.starts_with("ec:") {
            return Err(format!(
                "{spec:?}: members must be dir: or s3:// backends, not {m:?}"
            ));
        }
        let k = parse_plain(m).map_err(|e| format!("in {spec:?}: {e}"))?;
        if out.iter().any(|(_, o)| *o == k) {
            return Err(format!("{spec:?}: member {m:?} is named twice"));
        }
        if out.len() == shard::MAX_MEMBERS {
            return Err(format!("{spec:?}: at most {} members", shard::MAX_MEMBERS));
        }
        out.push((m.to_string(), k));
    }
    Ok(out)
}

fn parse_plain(spec: &str) -> Result<SpecKind, String> {
    if let Some(p) = spec.strip_prefix("dir:") {
        let path = Path::new(p);
        if p.is_empty() || !path.is_absolute() {
            return Err(format!(
                "dir: needs an absolute path (dir:/ABS/PATH), not {spec:?}"
            ));
        }
        return Ok(SpecKind::Dir(path.to_path_buf()));
    }
    if let Some(rest) = spec.strip_prefix("s3://") {
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_end_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(format!(
                "s3:// needs a bucket (s3://BUCKET[/PREFIX]), not {spec:?}"
            ));
        }
        check_bucket(bucket)?;
        let prefix = if prefix.is_empty() {
            None
        } else {
            check_name(prefix).map_err(|e| format!("bad prefix in {spec:?}: {e}"))?;
            Some(prefix.to_string())
        };
        return Ok(SpecKind::S3 {
            bucket: bucket.to_string(),
            prefix,
        });
    }
    Err(format!("unknown backend {spec:?}: {SPEC_HELP}"))
}

/// S3 bucket names: 3-63 bytes of `[a-z0-9.-]`, starting and ending with a letter or digit.
fn check_bucket(b: &str) -> Result<(), String> {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = (3..=63).contains(&b.len())
        && b.bytes().all(|c| alnum(c) || c == b'.' || c == b'-')
        && alnum(b.as_bytes()[0])
        && alnum(b.as_bytes()[b.len() - 1]);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad bucket name {b:?}: 3-63 characters of a-z 0-9 . -, starting and ending with a letter or digit"
        ))
    }
}

/// Backend names: `[A-Za-z0-9_-]{1,64}`.
pub fn check_backend_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad backend name {name:?}: 1-64 characters of A-Z a-z 0-9 _ -"
        ))
    }
}

/// The process environment, for the `env` parameters below.
pub fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

fn env_nonempty(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<String> {
    env(var).filter(|v| !v.is_empty())
}

/// What [`resolve_s3`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<Credentials>,
}

/// Endpoint, region and credentials for an S3 backend. Explicit `endpoint`/`region` win
/// over the environment. Credentials: the environment, then the credentials file; `None`
/// if neither has them. An error for a half-set environment or an unreadable file.
pub fn resolve_s3(
    endpoint: Option<&str>,
    region: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<S3Settings, String> {
    let endpoint = endpoint
        .map(str::to_string)
        .or_else(|| env_nonempty(env, "AWS_ENDPOINT_URL"));
    let region = region
        .map(str::to_string)
        .or_else(|| env_nonempty(env, "AWS_REGION"))
        .or_else(|| env_nonempty(env, "AWS_DEFAULT_REGION"));
    let id = env_nonempty(env, "AWS_ACCESS_KEY_ID");
    let secret = env_nonempty(env, "AWS_SECRET_ACCESS_KEY");
    let creds = match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
            access_key_id,
            secret_access_key,
            session_token: env_nonempty(env, "AWS_SESSION_TOKEN"),
        }),
        (Some(_), None) => {
            return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into())
        }
        (None, Some(_)) => {
            return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into())
        }
        (None, None) => credentials_file(env)?,
    };
    Ok(S3Settings {
        endpoint,
        region,
        credentials: creds,
    })
}

/// The profile's keys in the AWS credentials file, if the file exists and has them.
fn credentials_file(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Credentials>, String> {
    let path = match env_nonempty(env, "AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => PathBuf::from(p),
        None => match env_nonempty(env, "HOME") {
            Some(h) => Path::new(&h).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let profile = env_nonempty(env, "AWS_PROFILE").unwrap_or_else(|| "default".into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let keys = ini_section(&text, &profile);
    let get = |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(Credentials {
            access_key_id,
            secret_access_key,
            session_token: get("aws_session_token"),
        })),
        (None, None) => Ok(None),
        _ => Err(format!(
            "profile [{profile}] in {} needs both aws_access_key_id and aws_secret_access_key",
            path.display()
        )),
    }
}

/// The `key = value` pairs of section `[name]` (or `[profile name]`) of an INI text; keys
/// lower-cased, `#` and `;` lines are comments. A later duplicate key wins.
fn ini_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(sec) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let sec = sec.trim();
            inside = sec == name || sec.strip_prefix("profile ").map(str::trim) == Some(name);
            continue;
        }
        if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            let k = k.trim().to_ascii_lowercase();
            out.retain(|(n, _)| *n != k);
            out.push((k, v.trim().to_string()));
        }
    }
    out
}

/// A checked configuration for `backend add`: the name and spec are validated, and for S3
/// the endpoint, region and credentials are resolved from options and `env` (an error if no
/// credentials are found). Nothing is contacted or written.
pub fn new_config(
    name: &str,
    id: u32,
    spec: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
    limit_bytes_per_sec: Option<u64>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BackendConfig, String> {
    check_backend_name(name)?;
    let mut cfg = BackendConfig {
        name: name.to_string(),
        id,
        spec: spec.to_string(),
        endpoint: None,
        region: None,
        limit_bytes_per_sec,
        credentials: None,
        degrade_after_secs: None,
        encryption_key: None,
        keep: None,
        append_only: false,
    };
    let kind = parse_spec(spec)?;
    let has_s3 = kind
        .plain_members()
        .iter()
        .any(|k| matches!(k, SpecKind::S3 { .. }));
    if has_s3 {
        let r = resolve_s3(endpoint, region, env)?;
        cfg.endpoint = r.endpoint;
        cfg.region = r.region;
        cfg.credentials = Some(r.credentials.ok_or_else(|| no_credentials(spec))?);
    } else if endpoint.is_some() || region.is_some() {
        return Err("an endpoint or region is only for s3:// backends".into());
    }
    Ok(cfg)
}

fn no_credentials(spec: &str) -> String {
    format!(
        "no credentials for {spec}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or use a credentials file"
    )
}

/// Opens the backend a configuration describes. Contacts nothing: errors of a reachable
/// but wrong backend come from its first operation.
pub fn open(cfg: &BackendConfig) -> Result<Box<dyn Backend>, String> {
    open_with_env(cfg, &process_env)
}

/// [`open`], taking credentials from `env` when the configuration has none.
pub fn open_with_env(
    cfg: &BackendConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Box<dyn Backend>, String> {
    let b = open_unencrypted(cfg, env)?;
    let b = match &cfg.encryption_key {
        Some(k) => Box::new(Encrypted::new(Arc::from(b), &k.bytes()?)),
        None => b,
    };
    Ok(match cfg.append_only {
        true => Box::new(super::AppendOnly(b)),
        false => b,
    })
}

/// The backend without its encryption layer (what holds `snapfs-key`).
pub fn open_unencrypted(
    cfg: &BackendConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Box<dyn Backend>, String> {
    match parse_spec(&cfg.spec)? {
        SpecKind::Redundant { layout, members } => {
            let mut opened: Vec<(String, Arc<dyn Backend>)> = Vec::new();
            for (spec, kind) in members {
                let b = open_plain(cfg, &spec, kind, env).map_err(|e| format!("{spec}: {e}"))?;
                opened.push((spec, Arc::from(b)));
            }
            let after = cfg
                .degrade_after_secs
                .map_or(redundant::DEGRADE_AFTER, Duration::from_secs);
            Ok(Box::new(Redundant::new(&cfg.spec, layout, opened, after)?))
        }
        kind => open_plain(cfg, &cfg.spec, kind, env),
    }
}

fn open_plain(
    cfg: &BackendConfig,
    spec: &str,
    kind: SpecKind,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Box<dyn Backend>, String> {
    match kind {
        SpecKind::Dir(p) => Ok(Box::new(DirBackend::new(&p)?)),
        SpecKind::S3 { bucket, prefix } => {
            let creds = match &cfg.credentials {
                Some(c) => c.clone(),
                None => resolve_s3(None, None, env)?
                    .credentials
                    .ok_or_else(|| no_credentials(spec))?,
            };
            let mut o = S3Options::new(&bucket, prefix.as_deref(), creds);
            o.endpoint = cfg.endpoint.clone();
            o.region = cfg.region.clone();
            Ok(Box::new(S3Backend::new(&o)?))
        }
        SpecKind::Redundant { .. } => Err("a redundant backend cannot be a member".into()),
    }
}

const DIR: &str = "backends";

fn open_store(store: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(store)
        .map_err(|e| format!("opening store directory {}: {e}", store.display()))
}

/// `STORE/backends`, opened without following a symlink; `None` if missing. With
/// `create`, it is made (0700) if missing and its mode tightened to 0700.
fn open_backends_dir(store: &Path, create: bool) -> Result<Option<File>, String> {
    let s = open_store(store)?;
    let shown = store.join(DIR);
    let err = |e: std::io::Error| format!("{}: {e}", shown.display());
    let d = match sys::openat_nofollow(&s, OsStr::new(DIR), true) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            match sys::mkdirat(&s, OsStr::new(DIR), 0o700) {
                Ok(()) => s.sync_all().map_err(err)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(e)),
            }
            sys::openat_nofollow(&s, OsStr::new(DIR), true).map_err(err)?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{} (a symlink is not followed)", err(e))),
    };
    if create {
        d.set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(err)?;
    }
    Ok(Some(d))
}

/// Writes `STORE/backends/NAME.json` atomically and durably: a 0600 temporary file,
/// fsynced, renamed over the old file, the directory fsynced.
pub fn save(store: &Path, cfg: &BackendConfig) -> Result<(), String> {
    check_backend_name(&cfg.name)?;
    let d = open_backends_dir(store, true)?.expect("created");
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| e.to_string())?;
    let file = format!("{}.json", cfg.name);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".tmp.{}.{}.{n}.json", cfg.name, std::process::id());
    let err = |e: std::io::Error| format!("writing {}/{DIR}/{file}: {e}", store.display());
    let mut f = sys::openat_create_excl(&d, OsStr::new(&tmp), 0o600).map_err(err)?;
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(&json))
        .and_then(|()| f.sync_all())
        .and_then(|()| sys::renameat(&d, OsStr::new(&tmp), OsStr::new(&file)));
    if let Err(e) = written {
        let _ = sys::unlinkat(&d, OsStr::new(&tmp));
        return Err(err(e));
    }
    d.sync_all().map_err(err)
}

/// Every saved configuration, sorted by name. A file that cannot be read or parsed, or
/// whose `name` field does not match its file name, is logged and skipped; a missing
/// `backends/` is no configuration at all.
pub fn load_all(store: &Path) -> Result<Vec<BackendConfig>, String> {
    let Some(d) = open_backends_dir(store, false)? else {
        return Ok(Vec::new());
    };
    let names =
        sys::read_dir_fd(&d).map_err(|e| format!("listing {}/{DIR}: {e}", store.display()))?;
    let mut out = Vec::new();
    for n in names {
        let Some(name) = n.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if check_backend_name(name).is_err() {
            continue; // temporary files and strangers
        }
        match load_one(&d, &n, name) {
            Ok(cfg) => out.push(cfg),
            Err(e) => log::warn!("skipping {}/{DIR}/{name}.json: {e}", store.display()),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn load_one(d: &File, file: &OsStr, name: &str) -> Result<BackendConfig, String> {
    let mut f = sys::openat_nofollow(d, file, false).map_err(|e| e.to_string())?;
    let md = f.metadata().map_err(|e| e.to_string())?;
    if !md.is_file() {
        return Err("not a regular file".into());
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let cfg: BackendConfig = serde_json::from_slice(&buf).map_err(|e| e.to_string())?;
    if cfg.name != name {
        return Err(format!("it names backend {:?}", cfg.name));
    }
    Ok(cfg)
}

/// Removes `STORE/backends/NAME.json`; Ok(false) if there was none.
pub fn remove(store: &Path, name: &str) -> Result<bool, String> {
    check_backend_name(name)?;
    let Some(d) = open_backends_dir(store, false)? else {
        return Ok(false);
    };
    match sys::unlinkat(&d, OsStr::new(&format!("{name}.json"))) {
        Ok(()) => d.sync_all().map(|()| true).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("removing backend {name}: {e}")),
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
