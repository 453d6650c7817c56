//! The mount lifecycle: check the mountpoint, open the store, mount, serve until unmounted or
//! signalled, then seal, flush and close. Also read-only snapshot mounts, served by the
//! running daemon or, when none runs, by a process of their own.

pub mod control;
pub mod metrics;
pub mod ops;
pub mod replication;
pub mod report;
pub mod retention;
pub mod space;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};
use parking_lot::Mutex;

use crate::daemon::ops::Ctx;
use crate::fs::Fs;
use crate::fuse::FuseFs;

use crate::fuse::views::Views;
use crate::storage::store::Store;

#[derive(Clone)]
pub struct MountArgs {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub threads: usize,
    pub chunk_size: Option<usize>,
    /// Mount this snapshot read-only instead of the live tree.
    pub snapshot: Option<String>,
    /// List `.snapshots` in the root directory (it is always reachable by name).
    pub show_snapshots: bool,
    /// Bytes of decoded chunks cached, shared by the tree and every snapshot view.
    pub cache_bytes: usize,
    /// The global budget of unsealed write buffers (`mount --write-buffer`).
    pub write_buffer_bytes: usize,
    /// Take a snapshot at this interval, then apply `keep` to automatic snapshots.
    pub snapshot_every: Option<std::time::Duration>,
    pub keep: crate::daemon::retention::Policy,
    /// `--replicate SPEC`: a backend added to the store unless one with its spec is there.
    pub replicate: Option<crate::replica::backend::config::BackendConfig>,
    /// `--from SPEC`: serve `snapshot` straight from this backend (`store` is unused).
    pub from: Option<crate::replica::backend::config::BackendConfig>,
    /// Where `--from` keeps its temporary metadata store (default: the system temp dir).
    pub cache_dir: Option<PathBuf>,
    /// `--disk-cache`: bytes of fetched chunks `--from` keeps on disk (None: the default).
    pub disk_cache_bytes: Option<u64>,
    /// Serve Prometheus text on this address (`--metrics-addr`).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Set on the store's chunk cache after it opens: chunks come from this backend, through a
/// disk cache of this many bytes.
struct Remote(Arc<dyn crate::replica::backend::Backend>, u64);

/// Removes the temporary stores (metadata and disk cache) of `mount --from` processes that
/// were killed before they could: `snapfs-from-*` directories of this user, not symlinks,
/// untouched for `LEFTOVER_AGE`, whose store lock nobody holds (a serving mount holds it, in
/// whatever PID namespace or host it runs). The age covers the moment between building the
/// store and serving it, when the lock is free.
fn sweep_leftovers(base: &Path) {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(600);
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    let me = crate::sys::geteuid();
    for e in rd.flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().starts_with("snapfs-from-") {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let old = md
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= LEFTOVER_AGE);
        if !md.is_dir() || md.uid() != me || !old {
            continue;
        }
        // Held while we delete, so that nothing opens the store meanwhile.
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(crate::storage::store::lock_path(&path));
        let free = match &lock {
            Ok(f) => crate::sys::try_lock_exclusive(f).unwrap_or(false),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        if !free {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => log::info!(
                "removed {}, left by a mount --from that was killed",
                path.display()
            ),
            Err(err) => log::warn!("cannot remove {}: {err}", path.display()),
        }
    }
}

/// `--disk-cache` unless given: 4 GiB, or a quarter of the free space where it goes.
fn default_disk_cache(dir: &Path) -> u64 {
    let free = crate::sys::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0);
    (4u64 << 30).min(free / 4)
}

/// `mount --from SPEC --snapshot NAME MNT`: the snapshot's metadata is read from the backend
/// into a temporary store (0700, deleted at unmount), and its chunks are fetched from the
/// backend when first read, verified, into the bounded chunk cache (`--cache-size`).
fn run_mount_from(
    a: &MountArgs,
    cfg: &crate::replica::backend::config::BackendConfig,
) -> Result<(), String> {
    let Some(name) = &a.snapshot else {
        return Err("--from needs --snapshot NAME (snapfs snapshot list --from SPEC)".into());
    };
    check_mountpoint(&a.mountpoint)?;
    let backend: Arc<dyn crate::replica::backend::Backend> =
        Arc::from(crate::replica::backend::config::open(cfg)?);
    let base = a.cache_dir.clone().unwrap_or_else(std::env::temp_dir);
    sweep_leftovers(&base);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = base.join(format!("snapfs-from-{}-{nanos}", std::process::id()));
    let built = crate::replica::recover::build_remote(backend.clone(), &dir, name);
    let r = built.and_then(|_| {
        log::info!(
            "serving snapshot {name} from {} (metadata in {})",
            backend.describe(),
            dir.display()
        );
        let args = MountArgs {
            store: dir.clone(),
            from: None,
            replicate: None,
            ..a.clone()
        };
        let budget = a
            .disk_cache_bytes
            .unwrap_or_else(|| default_disk_cache(&base));
        run_mount_inner(&args, Some(Remote(backend, budget)))
    });
    if let Err(e) = remove_store_dir(&dir) {
        log::warn!("cannot remove the temporary store {}: {e}", dir.display());
    }
    r
}

/// `remove_dir_all` of a temporary store, tried again for up to 5 s: the mount closes its
/// database before it returns (`Store::close`), but if that timed out RocksDB may still
/// create a file while the directory is being removed (a CI run saw the directory left
/// behind once, before the close was fixed). A directory already gone is removed.
fn remove_store_dir(dir: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Starts the store's replicator, first adding the `--replicate` backend unless the store
/// already has one with that spec.
fn start_replication(
    store: &Store,
    add: Option<crate::replica::backend::config::BackendConfig>,
) -> Result<Arc<crate::replica::Replicator>, String> {
    if let Some(mut cfg) = add {
        let have = crate::replica::configured(&store.fs, &store.dir)?;
        if !have.iter().any(|c| c.spec == cfg.spec) {
            let base = cfg.name.clone();
            let mut n = 1;
            while have.iter().any(|c| c.name == cfg.name) {
                n += 1;
                cfg.name = format!("{base}-{n}");
            }
            let queued = crate::replica::add_backend(&store.fs, &store.dir, cfg.clone())?;
            log::info!(
                "added backend {} ({}); {queued} chunks queued",
                cfg.name,
                cfg.spec
            );
        }
    }
    crate::replica::Replicator::start(store.fs.clone(), &store.dir)
}

/// Frees unreferenced chunks once a minute (overwrites and unlinks queue them).
fn start_gc(fs: std::sync::Weak<Fs>) {
    let _ = std::thread::Builder::new()
        .name("snapfs-gc".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
            let Some(fs) = fs.upgrade() else { return };
            match fs.run_pending_gc() {
                Ok(Some(r)) => log::info!(
                    "deferred version GC (views of deleted snapshots closed): {} versions, {} chunks",
                    r.versions_deleted,
                    r.chunks_freed
                ),
                Ok(None) => {}
                Err(e) => log::error!("deferred version GC failed: {e}"),
            }
            match fs.collect_garbage() {
                Ok(0) => {}
                Ok(n) => log::info!("garbage collection freed {n} chunks"),
                Err(e) => log::error!("garbage collection failed: {e}"),
            }
        });
}

/// Takes `auto-<UTC time>` snapshots every `every` and prunes the automatic ones by `keep`.
fn start_auto_snapshots(
    ctx: Arc<Ctx>,
    every: std::time::Duration,
    keep: crate::daemon::retention::Policy,
) {
    let ctx = Arc::downgrade(&ctx);
    let spawned = std::thread::Builder::new()
        .name("snapfs-autosnap".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(ctx) = ctx.upgrade() else {
                return; // the daemon is shutting down
            };
            let existing: Vec<String> = match ctx.fs.snapshot_list() {
                Ok(l) => l.into_iter().map(|s| s.name).collect(),
                Err(e) => {
                    log::error!("automatic snapshot: cannot list snapshots: {e}");
                    continue;
                }
            };
            let name = crate::daemon::retention::unique_auto_name(
                crate::storage::inode::Time::now().secs,
                |n| existing.iter().any(|e| e == n),
            );
            match crate::daemon::ops::snapshot_create_as(&ctx, &name, false, true) {
                Ok(m) => log::info!("{m}"),
                Err(e) => log::error!("automatic snapshot failed: {e}"),
            }
            if keep.is_empty() {
                continue;
            }
            let Ok(list) = ctx.fs.snapshot_list() else {
                continue;
            };
            for name in crate::daemon::retention::automatic_victims(&list, &keep) {
                match crate::daemon::ops::snapshot_delete(&ctx, &name) {
                    Ok(m) => log::info!("retention: {m}"),
                    Err(e) => log::warn!("retention: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start automatic snapshots: {e}");
    }
}

pub fn check_mountpoint(p: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("mountpoint {} does not exist", p.display()),
        _ => format!(
            "mountpoint {} is not usable: {e} (a stale mount? try: umount -l {})",
            p.display(),
            p.display()
        ),
    })?;
    if !meta.is_dir() {
        return Err(format!("mountpoint {} is not a directory", p.display()));
    }
    let abs = p
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", p.display()))?;
    if report::is_mountpoint(&abs) {
        return Err(format!("{} is already a mountpoint", abs.display()));
    }
    let mut entries =
        std::fs::read_dir(&abs).map_err(|e| format!("cannot read {}: {e}", abs.display()))?;
    if entries.next().is_some() {
        return Err(format!("mountpoint {} is not empty", abs.display()));
    }
    Ok(abs)
}

fn config(store_dir: &Path, allow_other: bool, threads: usize, read_only: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(store_dir.display().to_string()),
        MountOption::Subtype("snapfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::Dev,
        MountOption::Suid,
    ];
    if read_only {
        config.mount_options.push(MountOption::RO);
    }
    if allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(threads);
    config.clone_fd = true;
    config
}

/// The kernel offers FUSE a 128 KiB readahead window, so sequential reads arrive as 128 KiB
/// requests; a window of four chunks (4 to 16 MiB) lets reads of whole chunks arrive while
/// the previous ones are decoded. Measured (docs/benchmarks.md, "Kernel options"): a cold
/// 1 GiB sequential read at 0.42x native with 128 KiB, 0.59x with one 1 MiB chunk, 0.81x with
/// 4 MiB. Small random reads keep the kernel's small initial window; a random read of a whole
/// 1 MiB chunk may read one more chunk ahead.
fn tune_readahead(mnt: &Path, chunk_size: usize) {
    let Some(dev) = report::mount_device(mnt) else {
        return;
    };
    let kb = (4 * chunk_size / 1024).clamp(4096, 16384);
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        log::info!("could not raise readahead ({path}: {e}); reads stay at 128 KiB requests");
    }
}

/// How long an unused `/.snapshots/NAME` view stays open (`SNAPFS_VIEW_IDLE_SECS`, for tests).
fn view_idle() -> std::time::Duration {
    std::env::var("SNAPFS_VIEW_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(std::time::Duration::from_secs)
        .unwrap_or(crate::fuse::views::VIEW_IDLE)
}

/// Runs the daemon in the foreground. Returns when the filesystem is unmounted.
pub fn run_mount(a: &MountArgs) -> Result<(), String> {
    match &a.from {
        Some(cfg) => run_mount_from(a, cfg),
        None => run_mount_inner(a, None),
    }
}

fn run_mount_inner(a: &MountArgs, remote: Option<Remote>) -> Result<(), String> {
    // Block exit signals before any thread exists (RocksDB starts its own), so that only the
    // signal thread below receives them.
    crate::sys::block_exit_signals().map_err(|e| format!("cannot mask signals: {e}"))?;
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist: load the fuse module (modprobe fuse)".into());
    }
    if a.threads == 0 || a.threads > 64 {
        return Err(format!(
            "--threads must be between 1 and 64, not {}",
            a.threads
        ));
    }
    if let Some(name) = &a.snapshot {
        crate::fs::check_snapshot_name(name)?;
        // A running daemon holds the store: it serves the snapshot mount itself.
        if let Ok(dir) = report::resolve_target(&a.store) {
            let req = control::Request::MountSnapshot {
                name: name.clone(),
                mountpoint: check_mountpoint(&a.mountpoint)?,
                allow_other: a.allow_other,
                threads: a.threads,
            };
            if let Some(resp) = control::call(&dir, &req, &mut |p| eprintln!("{p}"))? {
                return match resp.ok {
                    true => {
                        println!("{}", resp.message.unwrap_or_default());
                        Ok(())
                    }
                    false => Err(resp.error.unwrap_or_else(|| "daemon error".into())),
                };
            }
        }
    }
    let mnt = check_mountpoint(&a.mountpoint)?;
    let store = Store::open(&a.store, a.snapshot.is_none(), a.chunk_size)?;
    log::info!(
        "store {} opened (chunk size {})",
        store.dir.display(),
        report::human(store.chunk_size as u64)
    );
    store.fs.chunk_cache().set_capacity(a.cache_bytes);
    store.fs.set_write_budget(a.write_buffer_bytes);
    let mut disk_cache = None;
    if let Some(Remote(b, budget)) = remote {
        let from = Arc::new(crate::replica::recover::BackendChunks(b));
        let cache =
            crate::replica::fetched::DiskCache::new(from, store.dir.join("fetched"), budget)?;
        log::info!(
            "fetched chunks are kept on disk up to {} ({})",
            report::human(budget),
            store.dir.join("fetched").display()
        );
        let cache = Arc::new(cache);
        store.fs.chunk_cache().set_remote(cache.clone());
        disk_cache = Some(cache);
    }
    let views = Arc::new(Views::new(store.fs.clone()));
    Views::start_reaper(&views, view_idle());
    let root: Arc<Fs> = match &a.snapshot {
        None => store.fs.clone(),
        Some(name) => {
            let view = store
                .fs
                .snapshot_view(name)
                .map_err(|_| format!("no snapshot named {name:?} in {}", store.dir.display()))?;
            views.mark_mounted(name, true);
            Arc::new(view)
        }
    };
    let replicator = match a.snapshot {
        None => Some(start_replication(&store, a.replicate.clone())?),
        Some(_) => None,
    };
    let ctx = Arc::new(Ctx {
        store_dir: store.dir.clone(),
        chunk_size: store.chunk_size,
        fs: store.fs.clone(),
        views: views.clone(),
        replicator: replicator.clone(),
        mountpoint: a.snapshot.is_none().then(|| mnt.clone()),
        snap_mounts: Arc::new(Mutex::new(
            a.snapshot
                .iter()
                .map(|n| (n.clone(), mnt.clone()))
                .collect(),
        )),
    });
    let server = control::Server::start(ctx.clone())?;
    if let Some(addr) = a.metrics_addr {
        metrics::start(ctx.clone(), addr)?;
    }
    if let (Some(every), None) = (a.snapshot_every, &a.snapshot) {
        start_auto_snapshots(ctx.clone(), every, a.keep);
    }
    if a.snapshot.is_none() {
        start_gc(Arc::downgrade(&store.fs));
    }
    space::start(Arc::downgrade(&store.fs), store.space.clone());
    let config = config(&store.dir, a.allow_other, a.threads, a.snapshot.is_some());
    let fs = FuseFs::new(root, views, &store.dir, a.show_snapshots);
    let mut session = fuser::Session::new(fs, &mnt, &config)
        .map_err(|e| format!("cannot mount {}: {e}", mnt.display()))?;
    tune_readahead(&mnt, store.chunk_size);
    let mut unmounter = session.unmount_callable();
    let sig_mnt = mnt.clone();
    std::thread::Builder::new()
        .name("snapfs-signals".into())
        .spawn(move || {
            if let Ok(sig) = crate::sys::wait_for_signal() {
                log::info!("signal {sig}: unmounting {}", sig_mnt.display());
                if let Err(e) = unmounter.unmount() {
                    log::warn!("unmount failed ({e}); detaching lazily");
                    let _ = crate::sys::umount(&sig_mnt, true);
                }
            }
        })
        .map_err(|e| format!("cannot start signal thread: {e}"))?;
    log::info!("mounted {} on {}", store.dir.display(), mnt.display());
    let served = session.run();
    log::info!("unmounted; sealing buffers and closing the store");
    if let Some(c) = &disk_cache {
        use std::sync::atomic::Ordering::Relaxed;
        log::info!(
            "disk cache: {} chunks read from it, {} fetched from the backend, {} dropped as \
             damaged, {} held at the end",
            c.counts.hits.load(Relaxed),
            c.counts.fetched.load(Relaxed),
            c.counts.dropped_bad.load(Relaxed),
            report::human(c.held())
        );
    }
    for (_, m) in ctx.snap_mounts.lock().iter() {
        if *m != mnt {
            let _ = crate::sys::umount(m, true);
        }
    }
    if let Some(r) = &replicator {
        // In-flight puts finish; everything else stays queued on disk for the next mount.
        r.stop();
    }
    let closed = if a.snapshot.is_none() {
        store.fs.shutdown()
    } else {
        Ok(())
    };
    // Everything that holds the filesystem or its engine goes, then the store waits for
    // the database to close before it releases its lock.
    drop(server);
    drop(ctx);
    drop(replicator);
    drop(disk_cache);
    if !store.close(std::time::Duration::from_secs(10)) {
        log::warn!(
            "the database was still in use 10 s after the unmount; it stays open until the \
             process exits (everything was flushed first)"
        );
    }
    served.map_err(|e| format!("FUSE session ended with an error: {e}"))?;
    closed.map_err(|e| format!("closing the store failed: {e}"))?;
    Ok(())
}

/// Serves a read-only snapshot mount from the running daemon, on a thread of its own.
/// `allow_other` and `threads` are the client's `mount` flags (threads 0: the default, 2).
pub fn mount_snapshot(
    ctx: &Ctx,
    name: &str,
    mountpoint: &Path,
    allow_other: bool,
    threads: usize,
) -> Result<String, String> {
    crate::fs::check_snapshot_name(name)?;
    let threads = if threads == 0 { 2 } else { threads };
    if threads > 64 {
        return Err(format!("--threads must be between 1 and 64, not {threads}"));
    }
    let mnt = check_mountpoint(mountpoint)?;
    let view = Arc::new(
        ctx.fs
            .snapshot_view(name)
            .map_err(|_| format!("no snapshot named {name:?}"))?,
    );
    let fs = FuseFs::new(view, ctx.views.clone(), &ctx.store_dir, false);
    let config = config(&ctx.store_dir, allow_other, threads, true);
    let session = fuser::spawn_mount(fs, &mnt, &config)
        .map_err(|e| format!("cannot mount {}: {e}", mnt.display()))?;
    tune_readahead(&mnt, ctx.chunk_size);
    ctx.views.mark_mounted(name, true);
    ctx.snap_mounts.lock().push((name.to_string(), mnt.clone()));
    let views = ctx.views.clone();
    let snap_mounts = ctx.snap_mounts.clone();
    let (n, m) = (name.to_string(), mnt.clone());
    std::thread::Builder::new()
        .name("snapfs-snapmount".into())
        .spawn(move || {
            let _ = session.join();
            views.mark_mounted(&n, false);
            snap_mounts
                .lock()
                .retain(|(sn, sm)| !(sn == &n && sm == &m));
            log::info!("snapshot {n} unmounted from {}", m.display());
        })
        .map_err(|e| format!("cannot start snapshot mount thread: {e}"))?;
    Ok(format!(
        "mounted snapshot {name} read-only on {} (unmount with: snapfs umount {})",
        mnt.display(),
        mnt.display()
    ))
}

/// Unmounts a snapfs mountpoint; the daemon then seals, flushes and exits.
pub fn unmount(mnt: &Path, lazy: bool) -> Result<(), String> {
    let abs = mnt.canonicalize().unwrap_or_else(|_| mnt.to_path_buf());
    let known = report::mounts()
        .into_iter()
        .any(|(m, t, _)| m == abs && t.starts_with("fuse"));
    if !known {
        return Err(format!("{} is not a FUSE mountpoint", mnt.display()));
    }
    match crate::sys::umount(&abs, lazy) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(format!(
            "{} is busy (files open or a process inside it); close them, or use --lazy",
            mnt.display()
        )),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&abs)
                .status()
                .map_err(|e| format!("umount not permitted and fusermount3 failed: {e}"))?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("fusermount3 -u {} failed", abs.display()))
            }
        }
        Err(e) => Err(format!("cannot unmount {}: {e}", mnt.display())),
    }
}
