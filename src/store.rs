//! A store directory: its lock, its engine, its superblock.
//!
//! ```text
//! STORE_DIR/       mode 0700, owned by the user who runs snapfs on it
//!   snapfs.lock    exclusive flock held by the one process that has the store open; holds its pid
//!   db/            RocksDB (column families `meta` and `chunks`)
//!   control.sock   the running daemon's control socket (mode 0600)
//! ```
//!
//! Every file in it is owner-only: the binary runs with umask 077 (RocksDB has no file-mode
//! option and creates files for the life of the process), and `check_private` refuses a store
//! that others can write and tightens one that others can read.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{Batch, Cf, Engine};
use crate::fs::{Creds, Fs};
use crate::keys::{self, le_u32};

/// Version of the on-disk format this build writes and reads (docs/format.md).
pub const FORMAT_VERSION: u32 = 1;
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
const MAGIC: &[u8; 8] = b"SNAPFS\0\0";

pub struct Store {
    pub dir: PathBuf,
    pub fs: Arc<Fs>,
    pub chunk_size: usize,
    _lock: File,
}

pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join("snapfs.lock")
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

fn is_store(dir: &Path) -> bool {
    dir.join("db").is_dir()
}

/// Takes the store's lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, String> {
    let path = lock_path(dir);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let locked = crate::sys::try_lock_exclusive(&f)
        .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    if !locked {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let who = match pid.trim() {
            "" => String::new(),
            p => format!(" (pid {p})"),
        };
        return Err(format!(
            "store {} is in use by another snapfs process{who}; unmount it first \
             (snapfs umount MOUNTPOINT) or stop that process",
            dir.display()
        ));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}

/// The store holds every file's contents, so it is as private as the most private of them:
/// the directory is 0700 and owned by the user opening it (or by root, for root), and no
/// one else may write it (who can write it can swap RocksDB's files for symlinks that the
/// daemon would then write through). A store left readable by others (older snapfs created
/// it 0755) is tightened, with its `db/` and the files in it, and the log says so.
fn check_private(dir: &Path) -> Result<(), String> {
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot stat store {}: {e}", dir.display()))?;
    let me = crate::sys::geteuid();
    if md.uid() != me {
        return Err(format!(
            "store {} is owned by uid {}, not by uid {me} who is opening it; refusing, \
             because its owner could redirect the daemon's writes (chown -R {me} {} to take \
             it over)",
            dir.display(),
            md.uid(),
            dir.display()
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "store {} can be written by other users (mode {:o}); refusing to open it. \
             Run chmod 700 {} if no one else has changed it",
            dir.display(),
            md.mode() & 0o7777,
            dir.display()
        ));
    }
    if md.mode() & 0o077 != 0 {
        log::warn!(
            "store {} was readable by other users (mode {:o}); making it and its database \
             owner-only",
            dir.display(),
            md.mode() & 0o7777
        );
        tighten(dir, 0o700)?;
        let db = dir.join("db");
        if db.is_dir() {
            tighten(&db, 0o700)?;
            for e in std::fs::read_dir(&db)
                .map_err(|e| format!("cannot read {}: {e}", db.display()))?
                .flatten()
            {
                let p = e.path();
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_file() => tighten(&p, 0o600)?,
                    Ok(m) if m.is_dir() => tighten(&p, 0o700)?,
                    _ => {}
                }
            }
        }
        for name in ["snapfs.lock", "control.sock"] {
            let p = dir.join(name);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.file_type().is_symlink()) {
                tighten(&p, 0o600)?;
            }
        }
    }
    Ok(())
}

fn tighten(p: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot restrict {}: {e}", p.display()))
}

impl Store {
    /// Opens (and with `create`, creates) the store in `dir`. `chunk_size` applies only to a
    /// new store; an existing store keeps the chunk size it was created with.
    pub fn open(dir: &Path, create: bool, chunk_size: Option<usize>) -> Result<Store, String> {
        if !dir.exists() {
            if !create {
                return Err(format!("store {} does not exist", dir.display()));
            }
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create store {}: {e}", dir.display()))?;
        }
        if !dir.is_dir() {
            return Err(format!("store {} is not a directory", dir.display()));
        }
        let fresh = !is_store(dir);
        if fresh {
            if !create {
                return Err(format!("{} is not a snapfs store (no db/)", dir.display()));
            }
            let foreign = std::fs::read_dir(dir)
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name() != "snapfs.lock");
            if foreign {
                return Err(format!(
                    "{} is not empty and is not a snapfs store; choose an empty or new directory",
                    dir.display()
                ));
            }
        }
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
        check_private(&dir)?;
        let lock = lock(&dir)?;
        let eng = Engine::open(&dir.join("db"))?;
        let chunk_size = match read_super(&eng)? {
            Some(cs) => cs,
            None => {
                let cs = chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
                if !(4096..=(16 << 20)).contains(&cs) || !cs.is_power_of_two() {
                    return Err(format!(
                        "chunk size {cs} is not a power of two between 4 KiB and 16 MiB"
                    ));
                }
                write_super(&eng, cs)?;
                cs
            }
        };
        let creator = Creds {
            uid: crate::sys::getuid(),
            gid: crate::sys::getgid(),
        };
        let fs = Fs::new(eng, chunk_size, creator)
            .map_err(|e| format!("cannot open the filesystem in {}: {e}", dir.display()))?;
        let fs = Arc::new(fs);
        fs.start_sealer();
        Ok(Store {
            dir,
            fs,
            chunk_size,
            _lock: lock,
        })
    }
}

/// Superblock payload: magic, format version u32, chunk size u32 (LE).
fn read_super(eng: &Engine) -> Result<Option<usize>, String> {
    let Some(v) = eng
        .get(Cf::Meta, keys::SUPER_KEY)
        .map_err(|e| format!("cannot read the superblock: {e}"))?
    else {
        return Ok(None);
    };
    if v.len() < 16 || &v[..8] != MAGIC {
        return Err("the superblock is damaged (bad magic); refusing to open".into());
    }
    let version = le_u32(&v[8..]);
    if version > FORMAT_VERSION {
        return Err(format!(
            "this store has format version {version}, newer than this snapfs supports \
             ({FORMAT_VERSION}); upgrade snapfs"
        ));
    }
    let cs = le_u32(&v[12..]) as usize;
    if !(4096..=(16 << 20)).contains(&cs) || !cs.is_power_of_two() {
        return Err(format!(
            "the superblock is damaged (chunk size {cs}); refusing to open"
        ));
    }
    Ok(Some(cs))
}

fn write_super(eng: &Engine, chunk_size: usize) -> Result<(), String> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    v.extend_from_slice(&(chunk_size as u32).to_le_bytes());
    let mut b = Batch::new();
    eng.put(&mut b, Cf::Meta, keys::SUPER_KEY, &v);
    eng.write(b, true)
        .map_err(|e| format!("cannot write the superblock: {e}"))
}
