//! Operator requests about backends and replication: `backend add|list|remove`, `status`,
//! `scrub`, `backend prune`.
//! With a running daemon they act on its replicator (a new backend starts uploading at
//! once); without one, on the store directly (the queue fills; uploads start at the next
//! mount).

use serde::{Deserialize, Serialize};

use crate::daemon::control::{Request, Response};
use crate::daemon::ops::Ctx;
use crate::replica::backend::config::BackendConfig;
use crate::replica::status::{self, BackendStatus};

/// What `backend list` shows (never the credentials).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackendInfo {
    pub name: String,
    pub id: u32,
    pub spec: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub limit_bytes_per_sec: Option<u64>,
    pub has_credentials: bool,
    /// The retention `backend prune` applies (null: keep every snapshot).
    #[serde(default)]
    pub keep: Option<crate::fs::keep::Policy>,
    #[serde(default)]
    pub append_only: bool,
    #[serde(default)]
    pub encrypted: bool,
}

impl From<&BackendConfig> for BackendInfo {
    fn from(c: &BackendConfig) -> BackendInfo {
        BackendInfo {
            name: c.name.clone(),
            id: c.id,
            spec: c.spec.clone(),
            endpoint: c.endpoint.clone(),
            region: c.region.clone(),
            limit_bytes_per_sec: c.limit_bytes_per_sec,
            has_credentials: c.credentials.is_some(),
            keep: c.keep,
            append_only: c.append_only,
            encrypted: c.encryption_key.is_some(),
        }
    }
}

pub fn statuses(ctx: &Ctx) -> Result<Vec<BackendStatus>, String> {
    let lanes = ctx
        .replicator
        .as_ref()
        .map(|r| r.lanes())
        .unwrap_or_default();
    crate::replica::configured(&ctx.fs, &ctx.store_dir)?
        .iter()
        .map(|c| {
            status::backend_status(
                &ctx.fs,
                c,
                lanes.iter().find(|l| l.id == c.id).map(|l| &**l),
            )
        })
        .collect()
}

pub fn handle(ctx: &Ctx, req: Request) -> Response {
    let r: Result<Response, String> = (|| match req {
        Request::BackendAdd { config } => {
            let name = config.name.clone();
            let spec = config.spec.clone();
            let queued = match &ctx.replicator {
                Some(r) => r.add(config)?,
                None => crate::replica::add_backend(&ctx.fs, &ctx.store_dir, config)?,
            };
            let when = match ctx.replicator {
                Some(_) => "uploading now",
                None => "uploads start when the store is mounted",
            };
            Ok(Response {
                ok: true,
                message: Some(format!(
                    "added backend {name} ({spec}); {queued} chunks queued, {when}"
                )),
                ..Default::default()
            })
        }
        Request::BackendRemove { name } => {
            match &ctx.replicator {
                Some(r) => r.remove(&name)?,
                None => crate::replica::remove_backend(&ctx.fs, &ctx.store_dir, &name)?,
            }
            Ok(Response {
                ok: true,
                message: Some(format!(
                    "removed backend {name} (nothing was deleted on the backend itself)"
                )),
                ..Default::default()
            })
        }
        Request::BackendList => {
            let list = crate::replica::configured(&ctx.fs, &ctx.store_dir)?
                .iter()
                .map(BackendInfo::from)
                .collect();
            Ok(Response {
                ok: true,
                backends: Some(list),
                ..Default::default()
            })
        }
        Request::Status => Ok(Response {
            ok: true,
            status: Some(statuses(ctx)?),
            ..Default::default()
        }),
        _ => Err("internal: not a replication request".into()),
    })();
    r.unwrap_or_else(Response::fail)
}

/// `scrub`: the backends come from the running replicator, else are opened from their
/// configurations; local chunks are healed from them.
pub fn scrub(
    ctx: &Ctx,
    backend: Option<String>,
    repair: bool,
    local: bool,
    limit: Option<u64>,
    progress: &mut dyn FnMut(String) -> bool,
) -> Response {
    use crate::replica::backend::Backend;
    use std::sync::Arc;
    let r: Result<Response, String> = (|| {
        let mut all: Vec<(String, String, Arc<dyn Backend>)> = Vec::new();
        let lanes = ctx
            .replicator
            .as_ref()
            .map(|r| r.lanes())
            .unwrap_or_default();
        for c in crate::replica::configured(&ctx.fs, &ctx.store_dir)? {
            let b = match lanes.iter().find(|l| l.id == c.id) {
                Some(l) => l.backend.clone(),
                None => Arc::from(
                    crate::replica::backend::config::open(&c)
                        .map_err(|e| format!("backend {}: {e}", c.name))?,
                ),
            };
            all.push((c.name.clone(), c.spec.clone(), b));
        }
        let healer =
            crate::replica::scrub::BackendsHealer(all.iter().map(|x| x.2.clone()).collect());
        ctx.fs.set_healer(Arc::new(healer));
        if let Some(n) = &backend {
            all.retain(|x| &x.0 == n);
            if all.is_empty() {
                return Err(format!("this store has no backend named {n}"));
            }
        }
        let o = crate::replica::scrub::Options {
            repair,
            local,
            limit_bytes_per_sec: limit,
        };
        let rep = crate::replica::scrub::run(&ctx.fs, &all, &o, progress);
        Ok(Response {
            ok: true,
            scrub: Some(rep),
            ..Default::default()
        })
    })();
    r.unwrap_or_else(Response::fail)
}

/// `backend prune` of one of the store's backends: refused for an append-only one; the
/// policy given, else the backend's own. Without a running lane the store is reconciled with
/// the backend here; a running lane does it at its next look at `prune/state`.
pub fn prune(
    ctx: &Ctx,
    backend: &str,
    policy: Option<crate::fs::keep::Policy>,
    dry_run: bool,
    grace_ms: u64,
    progress: &mut dyn FnMut(String) -> bool,
) -> Response {
    use crate::replica::prune;
    let r: Result<Response, String> = (|| {
        let cfg = crate::replica::configured(&ctx.fs, &ctx.store_dir)?
            .into_iter()
            .find(|c| c.name == backend)
            .ok_or_else(|| format!("this store has no backend named {backend}"))?;
        if cfg.append_only && !dry_run {
            return Err(format!(
                "backend {backend} is append-only: snapfs on this host never deletes from it; \
                 prune it from a trusted host with `snapfs backend prune --from SPEC`"
            ));
        }
        let lane = ctx
            .replicator
            .as_ref()
            .and_then(|r| r.lanes().into_iter().find(|l| l.id == cfg.id));
        let b: std::sync::Arc<dyn crate::replica::backend::Backend> = match &lane {
            Some(l) => l.backend.clone(),
            None => std::sync::Arc::from(crate::replica::backend::config::open(&cfg)?),
        };
        let o = prune::Options {
            policy: policy.or(cfg.keep).unwrap_or_default(),
            dry_run,
            grace: std::time::Duration::from_millis(grace_ms),
        };
        let rep = prune::run(b.as_ref(), &o, &mut |m| {
            progress(m);
        })?;
        if lane.is_none() && !dry_run {
            prune::gate::resync(&ctx.fs, cfg.id, b.as_ref(), Some(rep.generation))?;
        }
        Ok(Response {
            ok: true,
            prune: Some(rep),
            ..Default::default()
        })
    })();
    r.unwrap_or_else(Response::fail)
}
