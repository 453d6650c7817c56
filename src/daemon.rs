//! The mount lifecycle: check the mountpoint, open the store, mount, serve until unmounted or
//! signalled, then seal, flush and close.

use std::path::{Path, PathBuf};

use fuser::{Config, MountOption, SessionACL};

use crate::control;
use crate::fuse::FuseFs;
use crate::report;
use crate::store::Store;

pub struct MountArgs {
    pub store: PathBuf,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub threads: usize,
    pub chunk_size: Option<usize>,
}

fn check_mountpoint(p: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("mountpoint {} does not exist", p.display()),
        _ => format!(
            "mountpoint {} is not usable: {e} (a stale mount? try: snapfs umount {})",
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

/// Runs the daemon in the foreground. Returns when the filesystem is unmounted.
pub fn run_mount(a: &MountArgs) -> Result<(), String> {
    // Block exit signals before any thread exists (RocksDB starts its own), so that only the
    // signal thread below receives them.
    crate::sys::block_exit_signals().map_err(|e| format!("cannot mask signals: {e}"))?;
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist: load the fuse module (modprobe fuse)".into());
    }
    let mnt = check_mountpoint(&a.mountpoint)?;
    if a.threads == 0 || a.threads > 64 {
        return Err(format!(
            "--threads must be between 1 and 64, not {}",
            a.threads
        ));
    }
    let store = Store::open(&a.store, true, a.chunk_size)?;
    log::info!(
        "store {} opened (chunk size {})",
        store.dir.display(),
        report::human(store.chunk_size as u64)
    );
    let server = control::Server::start(&store.dir, store.fs.clone(), store.chunk_size)?;

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(store.dir.display().to_string()),
        MountOption::Subtype("snapfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::Dev,
        MountOption::Suid,
    ];
    if a.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(a.threads);
    config.clone_fd = true;
    let fs = FuseFs::new(store.fs.clone(), &store.dir);
    let mut session = fuser::Session::new(fs, &mnt, &config)
        .map_err(|e| format!("cannot mount {}: {e}", mnt.display()))?;
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
    let closed = store.fs.shutdown();
    drop(server);
    drop(store);
    served.map_err(|e| format!("FUSE session ended with an error: {e}"))?;
    closed.map_err(|e| format!("closing the store failed: {e}"))?;
    Ok(())
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
