//! Operator commands, served the same way by the daemon (over the control socket) and by the
//! CLI on a store no daemon holds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::daemon::control::{Request, Response};
use crate::error::FsError;
use crate::fs::{check_snapshot_name, Fs, ROOT_INO};
use crate::fuse::views::Views;
use crate::storage::inode::{Attr, Kind, Time};

pub struct Ctx {
    pub store_dir: PathBuf,
    pub chunk_size: usize,
    pub fs: Arc<Fs>,
    pub views: Arc<Views>,
    /// The live mountpoint, when a daemon serves one.
    pub mountpoint: Option<PathBuf>,
    /// Snapshot mounts this daemon serves: (name, mountpoint).
    pub snap_mounts: Arc<Mutex<Vec<(String, PathBuf)>>>,
    /// The daemon's replicator (None for a CLI that opened the store itself).
    pub replicator: Option<Arc<crate::replica::Replicator>>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SnapshotRow {
    pub name: String,
    pub id: u64,
    /// UTC, RFC 3339.
    pub created: String,
    pub created_unix: i64,
    /// Taken by `mount --snapshot-every` (automatic retention deletes only these).
    #[serde(default)]
    pub automatic: bool,
    /// Its seal jobs are still committing: no record yet, lost whole if the daemon dies
    /// before they are done (sizes show 0 until then).
    #[serde(default)]
    pub pending: bool,
    pub logical_bytes: u64,
    /// Bytes referenced by no other snapshot and not by the live tree: freed if deleted.
    pub unique_bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DiffEntry {
    /// "added", "removed" or "modified".
    pub change: String,
    pub path: String,
    pub kind: String,
}

/// A Unix timestamp as RFC 3339 UTC, to the second (jiff's calendar arithmetic).
pub fn rfc3339(secs: i64) -> String {
    match jiff::Timestamp::from_second(secs) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => format!("@{secs}"),
    }
}

fn fs_err(what: &str, e: FsError) -> String {
    format!("{what}: {e}")
}

pub fn snapshot_create(ctx: &Ctx, name: &str, durable: bool) -> Result<String, String> {
    snapshot_create_as(ctx, name, durable, false)
}

/// `snapshot_create`; `automatic` marks the daemon's own (the only ones its retention deletes).
pub fn snapshot_create_as(
    ctx: &Ctx,
    name: &str,
    durable: bool,
    automatic: bool,
) -> Result<String, String> {
    check_snapshot_name(name)?;
    let t = Instant::now();
    if let Some(m) = &ctx.mountpoint {
        writeback_barrier(ctx, m)?;
    }
    let info = ctx
        .fs
        .snapshot_create_as(name, durable, automatic)
        .map_err(|e| match e {
            FsError::Exists => format!("snapshot {name:?} already exists"),
            e => fs_err("cannot create the snapshot", e),
        })?;
    Ok(format!(
        "created snapshot {} (id {}) in {:.1} ms{}",
        info.name,
        info.epoch,
        t.elapsed().as_secs_f64() * 1000.0,
        if info.pending {
            "; pending until the chunks written before it are committed (--durable waits)"
        } else {
            ""
        }
    ))
}

/// Brings every page dirtied through a shared mmap before this call into the daemon: those
/// live in the kernel's page cache until written back, and syncfs(2) on a FUSE mount returns
/// before the WRITEs reach us (Linux 6.x). fsync(2) of each file open O_RDWR (no other
/// descriptor can back a shared writable mapping) does wait for them
/// (see `sys::fsync_fuse_inode`); the FSYNC that follows it is answered without a WAL sync
/// (`Views::is_barrier_thread`), because the snapshot seals everything anyway.
fn writeback_barrier(ctx: &Ctx, m: &std::path::Path) -> Result<(), String> {
    let open = ctx.fs.mappable_inodes();
    if open.is_empty() {
        return Ok(());
    }
    let root = std::fs::File::open(m)
        .map_err(|e| format!("cannot open mountpoint {}: {e}", m.display()))?;
    let tid = crate::sys::gettid();
    ctx.views.barrier_thread(tid, true);
    let mut r = Ok(());
    for ino in open {
        if let Err(e) = crate::sys::fsync_fuse_inode(&root, ino) {
            r = Err(e);
            break;
        }
    }
    // The descriptors are closed (their FLUSH answered at once, as barrier FLUSHes are);
    // only now may this thread's requests be treated as ordinary ones again.
    drop(root);
    ctx.views.barrier_thread(tid, false);
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            // Without CAP_DAC_READ_SEARCH (a daemon not run as root): the best the kernel
            // offers is syncfs, which does not wait. docs/snapshots.md: msync first.
            log::warn!(
                "cannot open files by handle ({e}); pages dirtied through mmap and not yet \
                 msync'd may be missing from this snapshot"
            );
            crate::sys::syncfs(m).map_err(|e| format!("syncfs {} failed: {e}", m.display()))
        }
        Err(e) => Err(format!(
            "cannot write back the kernel's dirty pages before the snapshot: {e}"
        )),
    }
}

pub fn snapshot_rows(ctx: &Ctx) -> Result<Vec<SnapshotRow>, String> {
    let list = ctx
        .fs
        .snapshot_list()
        .map_err(|e| fs_err("cannot list snapshots", e))?;
    let usage = ctx
        .fs
        .snapshot_usage()
        .map_err(|e| fs_err("cannot compute snapshot usage", e))?;
    Ok(list
        .into_iter()
        .map(|s| {
            let (logical, unique) = usage.get(&s.epoch).copied().unwrap_or((0, 0));
            SnapshotRow {
                created: rfc3339(s.created),
                created_unix: s.created,
                id: s.epoch,
                name: s.name,
                automatic: s.automatic,
                pending: s.pending,
                logical_bytes: logical,
                unique_bytes: unique,
            }
        })
        .collect())
}

pub fn snapshot_delete(ctx: &Ctx, name: &str) -> Result<String, String> {
    if ctx.views.is_mounted(name) {
        let at: Vec<String> = ctx
            .snap_mounts
            .lock()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, p)| p.display().to_string())
            .collect();
        return Err(format!(
            "snapshot {name:?} is mounted at {}; unmount it first (snapfs umount MOUNTPOINT)",
            at.join(", ")
        ));
    }
    // Drop the cached `.snapshots/NAME` view first, so that only views still in use (open
    // files, restores, diffs) hold the snapshot's versions back from this GC pass.
    ctx.views.forget(name);
    let r = ctx.fs.snapshot_delete(name).map_err(|e| match e {
        FsError::NotFound => format!("no snapshot named {name:?}"),
        e => fs_err("cannot delete the snapshot", e),
    })?;
    ctx.views.forget(name);
    let held = match ctx.fs.orphan_pins() {
        Ok(0) | Err(_) => String::new(),
        Ok(_) => "; versions still read by open files, restores or diffs of it are kept until they finish, then freed by the background GC".into(),
    };
    Ok(format!(
        "deleted snapshot {name} ({} old versions and {} chunks freed{held})",
        r.versions_deleted, r.chunks_freed
    ))
}

/// One node of a tree walk, for diffs: what identifies its content.
#[derive(PartialEq, Eq)]
struct Sig {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Time,
    content: Vec<u8>,
    /// Extended attributes, names and values, sorted by name.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A path for people and scripts: valid UTF-8 is kept, a backslash is `\\`, and every
/// other byte that is not printable UTF-8 (non-UTF-8 bytes, control characters) is `\xNN`.
/// The form is unambiguous: two different byte paths never print the same.
pub fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut b = [0u8; 4];
                    for x in c.encode_utf8(&mut b).bytes() {
                        out.push_str(&format!("\\x{x:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for x in chunk.invalid() {
            out.push_str(&format!("\\x{x:02x}"));
        }
    }
    out
}

/// Every node below the root, keyed by its path as bytes (names are bytes, not UTF-8).
fn walk(fs: &Fs) -> Result<BTreeMap<Vec<u8>, Sig>, FsError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(Vec::new(), ROOT_INO)];
    while let Some((path, ino)) = stack.pop() {
        for e in fs.readdir(ino)?.into_iter().skip(2) {
            let mut p: Vec<u8> = path.clone();
            p.push(b'/');
            p.extend_from_slice(&e.name);
            let a: Attr = fs.getattr(e.ino)?;
            let mut xattrs = Vec::new();
            for n in fs.listxattr(e.ino)? {
                let v = fs.getxattr(e.ino, &n)?;
                xattrs.push((n, v));
            }
            xattrs.sort();
            let content = match a.kind {
                Kind::File => fs.content_signature(e.ino)?,
                Kind::Symlink => a.target.clone(),
                _ => Vec::new(),
            };
            if a.kind == Kind::Dir {
                stack.push((p.clone(), e.ino));
            }
            out.insert(
                p,
                Sig {
                    kind: a.kind,
                    perm: a.perm,
                    uid: a.uid,
                    gid: a.gid,
                    size: a.size,
                    mtime: a.mtime,
                    content,
                    xattrs,
                },
            );
        }
    }
    Ok(out)
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::CharDev => "chardev",
        Kind::BlockDev => "blockdev",
    }
}

/// Paths added, removed and modified from snapshot `a` to `b` (the live tree if None).
/// A rename shows as a removal and an addition.
pub fn snapshot_diff(ctx: &Ctx, a: &str, b: Option<&str>) -> Result<Vec<DiffEntry>, String> {
    let view = |name: &str| -> Result<Fs, String> {
        ctx.fs.snapshot_view(name).map_err(|e| match e {
            FsError::NotFound => format!("no snapshot named {name:?}"),
            e => fs_err("cannot read snapshot", e),
        })
    };
    let old = walk(&view(a)?).map_err(|e| fs_err("cannot walk snapshot", e))?;
    let new = match b {
        Some(b) => walk(&view(b)?),
        None => walk(&ctx.fs.view(ctx.fs.epoch())),
    }
    .map_err(|e| fs_err("cannot walk tree", e))?;
    let mut out = Vec::new();
    for (p, s) in &old {
        match new.get(p) {
            None => out.push((
                p.clone(),
                DiffEntry {
                    change: "removed".into(),
                    path: escape_path(p),
                    kind: kind_name(s.kind).into(),
                },
            )),
            Some(n) if n != s => out.push((
                p.clone(),
                DiffEntry {
                    change: "modified".into(),
                    path: escape_path(p),
                    kind: kind_name(n.kind).into(),
                },
            )),
            _ => {}
        }
    }
    for (p, n) in &new {
        if !old.contains_key(p) {
            out.push((
                p.clone(),
                DiffEntry {
                    change: "added".into(),
                    path: escape_path(p),
                    kind: kind_name(n.kind).into(),
                },
            ));
        }
    }
    // Both maps are in byte order of the paths: sort by that, not by the escaped form.
    let mut keyed: Vec<(Vec<u8>, DiffEntry)> = out;
    keyed.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.change.cmp(&y.1.change)));
    Ok(keyed.into_iter().map(|(_, e)| e).collect())
}

pub fn restore(
    ctx: &Ctx,
    name: &str,
    dest: &std::path::Path,
    path: Option<&str>,
    overwrite: bool,
    progress: &mut dyn FnMut(String) -> bool,
) -> Result<String, String> {
    // The view pins the snapshot's epoch: deleting the snapshot meanwhile (by hand or by a
    // retention prune) cannot change a byte this restore reads.
    let view = ctx.fs.snapshot_view(name).map_err(|e| match e {
        FsError::NotFound => format!("no snapshot named {name:?}"),
        e => fs_err("cannot read snapshot", e),
    })?;
    let t = Instant::now();
    let st = crate::restore::restore(&view, path, dest, overwrite, progress)?;
    let secs = t.elapsed().as_secs_f64();
    Ok(format!(
        "restored {} files, {} directories, {} hard links, {} bytes to {} in {:.2} s ({:.0} MiB/s)",
        st.files,
        st.dirs,
        st.links,
        st.bytes,
        dest.display(),
        secs,
        st.bytes as f64 / 1048576.0 / secs.max(1e-9)
    ))
}

/// Rolls the live tree back to a snapshot. Only on a store no daemon serves.
pub fn rollback(ctx: &Ctx, name: &str, destroy_newer: bool) -> Result<String, String> {
    if ctx.mountpoint.is_some() {
        return Err(
            "rollback needs the store unmounted: run snapfs umount MOUNTPOINT first".into(),
        );
    }
    let target = ctx.fs.snapshot_get(name).map_err(|e| match e {
        FsError::NotFound => format!("no snapshot named {name:?}"),
        e => fs_err("cannot read snapshot", e),
    })?;
    let newer: Vec<String> = ctx
        .fs
        .snapshot_list()
        .map_err(|e| fs_err("cannot list snapshots", e))?
        .into_iter()
        .filter(|s| s.epoch > target.epoch)
        .map(|s| s.name)
        .collect();
    if destroy_newer && newer.iter().any(|n| ctx.views.is_mounted(n)) {
        let busy: Vec<String> = ctx
            .snap_mounts
            .lock()
            .iter()
            .filter(|(n, _)| newer.contains(n))
            .map(|(n, p)| format!("{n} at {}", p.display()))
            .collect();
        return Err(format!(
            "--destroy-newer would delete mounted snapshots ({}); unmount them first \
             (snapfs umount MOUNTPOINT)",
            busy.join(", ")
        ));
    }
    let r = ctx.fs.rollback(name, destroy_newer).map_err(|e| match e {
        FsError::Busy => "files are open on this store; close them first".to_string(),
        e => fs_err("rollback failed", e),
    })?;
    let kept = if destroy_newer || newer.is_empty() {
        String::new()
    } else {
        format!("; newer snapshots kept: {}", newer.join(", "))
    };
    Ok(format!(
        "rolled back to {name}: {} records changed, {} newer snapshots destroyed{kept}",
        r.records_changed, r.snapshots_destroyed
    ))
}

/// `progress` gets intermediate lines and returns false when the requester went away.
pub fn handle(ctx: &Ctx, req: Request, progress: &mut dyn FnMut(String) -> bool) -> Response {
    let msg = |r: Result<String, String>| match r {
        Ok(m) => Response {
            ok: true,
            message: Some(m),
            ..Default::default()
        },
        Err(e) => Response::fail(e),
    };
    match req {
        Request::BackendAdd { .. }
        | Request::BackendRemove { .. }
        | Request::BackendList
        | Request::Status => crate::daemon::replication::handle(ctx, req),
        Request::Scrub {
            backend,
            repair,
            local,
            limit,
        } => crate::daemon::replication::scrub(ctx, backend, repair, local, limit, progress),
        Request::Prune {
            backend,
            policy,
            dry_run,
            grace_ms,
        } => crate::daemon::replication::prune(ctx, &backend, policy, dry_run, grace_ms, progress),
        Request::Stat => match crate::daemon::report::stat(&ctx.fs, &ctx.store_dir, ctx.chunk_size)
        {
            Ok(s) => Response {
                ok: true,
                stat: Some(s),
                ..Default::default()
            },
            Err(e) => Response::fail(e),
        },
        Request::Sync => match ctx.fs.sync_all() {
            Ok(()) => Response::ok(),
            Err(e) => Response::fail(format!("sync failed: {e}")),
        },
        Request::SnapshotCreate { name, durable } => msg(snapshot_create(ctx, &name, durable)),
        Request::SnapshotList => match snapshot_rows(ctx) {
            Ok(rows) => Response {
                ok: true,
                snapshots: Some(rows),
                ..Default::default()
            },
            Err(e) => Response::fail(e),
        },
        Request::SnapshotDelete { name } => msg(snapshot_delete(ctx, &name)),
        Request::SnapshotDiff { a, b } => match snapshot_diff(ctx, &a, b.as_deref()) {
            Ok(d) => Response {
                ok: true,
                diff: Some(d),
                ..Default::default()
            },
            Err(e) => Response::fail(e),
        },
        Request::MountSnapshot {
            name,
            mountpoint,
            allow_other,
            threads,
        } => msg(crate::daemon::mount_snapshot(
            ctx,
            &name,
            &mountpoint,
            allow_other,
            threads,
        )),
        Request::Rollback {
            name,
            destroy_newer,
        } => msg(rollback(ctx, &name, destroy_newer)),
        Request::Restore {
            name,
            dest,
            path,
            overwrite,
        } => msg(restore(
            ctx,
            &name,
            &dest,
            path.as_deref(),
            overwrite,
            progress,
        )),
        Request::Check { verify_data } => match ctx.fs.check(verify_data) {
            Ok(r) => Response {
                ok: true,
                check: Some(r),
                ..Default::default()
            },
            Err(e) => Response::fail(fs_err("the check could not read the store", e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_219_200), "2026-11-21T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }
}
