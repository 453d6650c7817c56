//! Replication: the second subsystem beside the filesystem (docs/replication.md).
//!
//! | module     | role                                                                  |
//! |------------|-----------------------------------------------------------------------|
//! | `backend/` | the `Backend` trait, `dir:` and `s3://` backends, what a store keeps about each |
//! | `format`   | the object layout on a backend, versioned, with hostile-input decoders |
//! | `manifest` | a snapshot's tree as content-addressed metadata objects, uploaded bottom-up |
//! | `lane`     | one backend's uploaders, its queue's state machine, its manifest writer |
//! | `status`   | the figures of `snapfs status` and the metrics                        |
//! | `recover`  | reading a backend back: listing, rebuilding a store                   |
//! | `scrub`    | verifying every local chunk and backend copy, repairing from good ones |
//! | `prune/`   | backend retention: the policy's snapshots kept, the rest deleted beside uploads |
//!
//! It calls the core (`fs`) and the storage layer, never the FUSE adapter; the core knows of
//! it only as backend ids whose queues it fills in its own batches (`fs/queue.rs`).

pub mod backend;
pub mod fetched;
pub mod format;
pub mod lane;
pub mod manifest;
pub mod prune;
pub mod recover;
pub mod scrub;
pub mod status;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::fs::Fs;
use backend::config::{self, BackendConfig};
use lane::Lane;

/// The replicator of one open store: one lane per backend.
pub struct Replicator {
    fs: Arc<Fs>,
    store_dir: PathBuf,
    lanes: Mutex<Vec<Arc<Lane>>>,
}

fn open_lane(fs: &Arc<Fs>, cfg: &BackendConfig) -> Result<Arc<Lane>, String> {
    let backend: Arc<dyn backend::Backend> = Arc::from(config::open(cfg)?);
    Ok(Lane::new(
        fs.clone(),
        cfg.id,
        cfg.name.clone(),
        cfg.spec.clone(),
        backend,
        cfg.limit_bytes_per_sec,
    ))
}

/// The backends configured for the store in `store_dir` that the store knows (a config file
/// whose id the store does not list is left over from an interrupted add and is ignored).
pub fn configured(fs: &Fs, store_dir: &Path) -> Result<Vec<BackendConfig>, String> {
    let ids = fs.replicas();
    let mut all = config::load_all(store_dir)?;
    all.retain(|c| ids.contains(&c.id));
    all.sort_by_key(|c| c.id);
    Ok(all)
}

/// Makes the directories of a spec's `dir:` backends (0700) if missing. Only `backend add`
/// does this, never an upload: a missing directory later means an unmounted disk, not an
/// empty backup.
pub fn create_dir_members(spec: &str) -> Result<(), String> {
    for kind in config::parse_spec(spec)?.plain_members() {
        let config::SpecKind::Dir(p) = kind else {
            continue;
        };
        if !p.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(p)
                .map_err(|e| format!("cannot create backend directory {}: {e}", p.display()))?;
        }
    }
    Ok(())
}

/// Adds a backend to a store: checks that it answers, saves its configuration (mode 0600),
/// registers it with the core and queues everything the store holds for it. Returns the
/// number of chunks queued. Works on an open store with or without a running replicator.
pub fn add_backend(fs: &Fs, store_dir: &Path, mut cfg: BackendConfig) -> Result<u64, String> {
    config::check_backend_name(&cfg.name)?;
    let all = config::load_all(store_dir)?;
    let ids = fs.replicas();
    if let Some(c) = all
        .iter()
        .find(|c| c.name == cfg.name && ids.contains(&c.id))
    {
        return Err(format!(
            "this store already has a backend named {} ({})",
            c.name, c.spec
        ));
    }
    cfg.id = all
        .iter()
        .map(|c| c.id)
        .chain(ids.iter().copied())
        .max()
        .unwrap_or(0)
        + 1;
    create_dir_members(&cfg.spec)?;
    let b = config::open(&cfg)?;
    b.exists(format::REPO_NAME)
        .map_err(|e| format!("backend {} ({}) does not answer: {e}", cfg.name, cfg.spec))?;
    config::save(store_dir, &cfg)?;
    fs.add_replica(cfg.id, &cfg.name)
        .map_err(|e| format!("cannot register backend {}: {e}", cfg.name))
}

/// Removes a backend from a store (its queue and records with it; nothing is deleted on the
/// backend itself).
pub fn remove_backend(fs: &Fs, store_dir: &Path, name: &str) -> Result<(), String> {
    let cfg = configured(fs, store_dir)?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("this store has no backend named {name}"))?;
    fs.remove_replica(cfg.id)
        .map_err(|e| format!("cannot remove backend {name}: {e}"))?;
    config::remove(store_dir, name).map(|_| ())
}

struct LaneHealer(std::sync::Weak<Replicator>);

impl crate::fs::ChunkSource for LaneHealer {
    fn fetch(&self, id: &crate::storage::keys::ChunkId) -> Result<Vec<u8>, String> {
        let r = self.0.upgrade().ok_or("the replicator has stopped")?;
        let backends = r.lanes().iter().map(|l| l.backend.clone()).collect();
        scrub::BackendsHealer(backends).fetch(id)
    }
}

impl Replicator {
    /// Starts a lane for every configured backend. A backend that cannot be opened (bad
    /// configuration) is reported and skipped: its queue waits on disk.
    pub fn start(fs: Arc<Fs>, store_dir: &Path) -> Result<Arc<Replicator>, String> {
        let r = Arc::new(Replicator {
            fs: fs.clone(),
            store_dir: store_dir.to_path_buf(),
            lanes: Mutex::new(Vec::new()),
        });
        // Self-healing reads: a local chunk that fails verification is fetched from the
        // backends (a weak link: the core must not keep the replicator alive).
        fs.set_healer(Arc::new(LaneHealer(Arc::downgrade(&r))));
        for cfg in configured(&fs, store_dir)? {
            if !fs.replica_backfilled(cfg.id).unwrap_or(true) {
                log::warn!(
                    "backend {}: adding it was interrupted; queueing the store for it again",
                    cfg.name
                );
                if let Err(e) = fs.add_replica(cfg.id, &cfg.name) {
                    log::error!("backend {}: cannot queue the store for it: {e}", cfg.name);
                }
            }
            if let Err(e) = r.start_lane(&cfg) {
                log::error!("backend {} ({}): not replicating: {e}", cfg.name, cfg.spec);
            }
        }
        Ok(r)
    }

    fn start_lane(&self, cfg: &BackendConfig) -> Result<(), String> {
        let lane = open_lane(&self.fs, cfg)?;
        lane.start()?;
        log::info!(
            "replicating to backend {} ({})",
            cfg.name,
            lane.backend.describe()
        );
        self.lanes.lock().push(lane);
        Ok(())
    }

    pub fn add(&self, cfg: BackendConfig) -> Result<u64, String> {
        let name = cfg.name.clone();
        let queued = add_backend(&self.fs, &self.store_dir, cfg)?;
        let cfg = configured(&self.fs, &self.store_dir)?
            .into_iter()
            .find(|c| c.name == name)
            .ok_or("internal: the new backend's configuration is missing")?;
        self.start_lane(&cfg)?;
        Ok(queued)
    }

    pub fn remove(&self, name: &str) -> Result<(), String> {
        let lane = {
            let mut lanes = self.lanes.lock();
            let i = lanes.iter().position(|l| l.name == name);
            i.map(|i| lanes.remove(i))
        };
        if let Some(l) = lane {
            l.stop();
        }
        remove_backend(&self.fs, &self.store_dir, name)
    }

    pub fn lanes(&self) -> Vec<Arc<Lane>> {
        self.lanes.lock().clone()
    }

    /// Stops every lane (in-flight puts finish; everything else stays queued on disk).
    pub fn stop(&self) {
        let lanes: Vec<_> = self.lanes.lock().drain(..).collect();
        for l in lanes {
            l.stop();
        }
    }
}
