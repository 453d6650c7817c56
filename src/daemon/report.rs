//! Operator-facing figures: space, ratios, and where a mountpoint's store lives.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs::Fs;
use crate::storage::inode::{Attr, Kind};
use crate::storage::keys;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StoreStat {
    pub store: String,
    pub format_version: u32,
    pub chunk_size: u64,
    pub files: u64,
    pub directories: u64,
    /// Sum of the sizes of live regular files.
    pub logical_bytes: u64,
    /// Bytes referenced by chunk maps (every version kept by a snapshot counts).
    pub referenced_bytes: u64,
    /// Uncompressed bytes of unique chunks.
    pub unique_bytes: u64,
    /// Compressed bytes of unique chunks, as written into the chunk store.
    pub stored_bytes: u64,
    pub chunks: u64,
    /// Uncompressed bytes of the unique chunks the live tree references.
    pub live_unique_bytes: u64,
    /// Uncompressed bytes of unique chunks only snapshots (or the GC queue) still hold:
    /// roughly what deleting every snapshot would free.
    pub snapshot_only_bytes: u64,
    pub snapshots: u64,
    /// Everything under the store directory on disk (RocksDB files, WAL, logs).
    pub disk_bytes: u64,
    /// Bytes of the blob files holding chunk bodies, and of deleted chunks among them that
    /// files with live chunks still keep (returned once they are half the blob bytes).
    #[serde(default)]
    pub blob_file_bytes: u64,
    #[serde(default)]
    pub blob_garbage_bytes: u64,
    /// referenced_bytes / unique_bytes.
    pub dedup_ratio: f64,
    /// unique_bytes / stored_bytes.
    pub compression_ratio: f64,
    /// Free space on the store's filesystem and whether writes are accepted.
    #[serde(default)]
    pub space: crate::daemon::space::SpaceStat,
    /// Acknowledged writes not yet committed: buffers, seal jobs, the sealers' queue.
    #[serde(default)]
    pub write_path: crate::fs::WritePath,
    /// Local chunks that failed verification and were rewritten from a backend's good copy
    /// (by reads or scrub) since the daemon started.
    #[serde(default)]
    pub self_heals: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

fn du(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn stat(fs: &Fs, dir: &Path, chunk_size: usize) -> Result<StoreStat, String> {
    let (mut files, mut directories, mut logical) = (0u64, 0u64, 0u64);
    let inodes = fs
        .scan_recs(&[keys::P_INODE])
        .map_err(|e| format!("cannot scan inodes: {e}"))?;
    for (rec, p) in inodes {
        let Some(a) = Attr::decode(keys::be_u64(&rec[1..]), &p) else {
            continue;
        };
        match a.kind {
            Kind::File => {
                files += 1;
                logical += fs.getattr(a.ino).map(|a| a.size).unwrap_or(a.size);
            }
            Kind::Dir => directories += 1,
            _ => {}
        }
    }
    let mut live_ids = std::collections::HashSet::new();
    let mut live_unique = 0u64;
    for (_, p) in fs
        .scan_recs(&[keys::P_MAP])
        .map_err(|e| format!("cannot scan chunk maps: {e}"))?
    {
        if let Some(m) = keys::MapEntry::decode(&p) {
            if live_ids.insert(m.id) {
                live_unique += m.len as u64;
            }
        }
    }
    let snapshots = fs
        .snapshot_list()
        .map_err(|e| format!("cannot list snapshots: {e}"))?
        .len() as u64;
    let c = fs.counters();
    let space = crate::storage::space::Space::new(dir)
        .map(|s| crate::daemon::space::status(fs, &s))
        .unwrap_or_default();
    let (blob_file_bytes, blob_garbage_bytes) = fs.blob_space();
    Ok(StoreStat {
        blob_file_bytes,
        blob_garbage_bytes,
        space,
        write_path: fs.write_path(),
        self_heals: fs.self_heals(),
        live_unique_bytes: live_unique,
        snapshot_only_bytes: c.unique_bytes.saturating_sub(live_unique),
        snapshots,
        store: dir.display().to_string(),
        format_version: crate::storage::store::FORMAT_VERSION,
        chunk_size: chunk_size as u64,
        files,
        directories,
        logical_bytes: logical,
        referenced_bytes: c.referenced_bytes,
        unique_bytes: c.unique_bytes,
        stored_bytes: c.stored_bytes,
        chunks: c.chunks,
        disk_bytes: du(dir),
        dedup_ratio: ratio(c.referenced_bytes, c.unique_bytes),
        compression_ratio: ratio(c.unique_bytes, c.stored_bytes),
    })
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

impl StoreStat {
    pub fn to_text(&self) -> String {
        format!(
            "store:             {}\n\
             format version:    {}\n\
             chunk size:        {}\n\
             files:             {}\n\
             directories:       {}\n\
             logical bytes:     {} ({})\n\
             referenced bytes:  {} ({})\n\
             unique bytes:      {} ({})\n\
             stored bytes:      {} ({})\n\
             chunks:            {}\n\
             snapshots:         {}\n\
             live unique bytes: {} ({})\n\
             held by snapshots: {} ({})\n\
             disk usage:        {} ({}; blob files {}, {} of it garbage)\n\
             dedup ratio:       {:.2}x\n\
             compression ratio: {:.2}x\n\
             space:             {} ({} free of {}, floor {}, reserve {})\n\
             write path:        {} buffered in {} chunks (budget {}), {} in {} chunks at the sealers \
             ({} of them written, waiting for a group commit; queue {}, {} sealers), {} open files, \
             {} stored raw waiting for compression in {} chunks\n             self-healed:       {} chunks (bad local copies rewritten from a backend)\n",
            self.store,
            self.format_version,
            human(self.chunk_size),
            self.files,
            self.directories,
            self.logical_bytes,
            human(self.logical_bytes),
            self.referenced_bytes,
            human(self.referenced_bytes),
            self.unique_bytes,
            human(self.unique_bytes),
            self.stored_bytes,
            human(self.stored_bytes),
            self.chunks,
            self.snapshots,
            self.live_unique_bytes,
            human(self.live_unique_bytes),
            self.snapshot_only_bytes,
            human(self.snapshot_only_bytes),
            self.disk_bytes,
            human(self.disk_bytes),
            human(self.blob_file_bytes),
            human(self.blob_garbage_bytes),
            self.dedup_ratio,
            self.compression_ratio,
            self.space.state,
            human(self.space.free_bytes),
            human(self.space.total_bytes),
            human(self.space.floor_bytes),
            match self.space.reserve_present {
                true => human(self.space.reserve_bytes),
                false => "released".into(),
            },
            human(self.write_path.buffered_bytes),
            self.write_path.buffered_chunks,
            human(self.write_path.budget_bytes),
            human(self.write_path.sealing_bytes),
            self.write_path.sealing_chunks,
            human(self.write_path.parked_bytes),
            self.write_path.sealer_queue,
            self.write_path.sealers,
            self.write_path.open_files,
            human(self.write_path.compress_queue_bytes),
            self.write_path.compress_queue_chunks,
            self.self_heals,
        )
    }
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A mounted filesystem: (mountpoint, fstype, source).
pub fn mounts() -> Vec<(PathBuf, String, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mnt = PathBuf::from(unescape(fields.get(4)?));
            let fstype = fields.get(sep + 1)?.to_string();
            let source = unescape(fields.get(sep + 2)?);
            Some((mnt, fstype, source))
        })
        .collect()
}

/// The `major:minor` device of the filesystem mounted at `p` (from mountinfo, without
/// touching the mount itself).
pub fn mount_device(p: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (PathBuf::from(unescape(f.get(4)?)) == p).then(|| f.get(2).map(|d| d.to_string()))?
    })
}

/// `target` absolute, its parent canonicalized and its last component kept as written (not
/// stat'ed). None where that is not a plain name (`/`, a trailing `..`) or the parent cannot
/// be resolved.
fn parent_resolved(target: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(target).ok()?;
    let name = abs.file_name()?;
    if name == ".." {
        return None;
    }
    Some(abs.parent()?.canonicalize().ok()?.join(name))
}

/// The store directory of the snapfs mount at exactly `mnt` (the newest mount there).
fn snapfs_mount_source(mnt: &Path) -> Option<PathBuf> {
    mounts().into_iter().rev().find_map(|(m, fstype, source)| {
        // fuser's direct mount(2) drops the subtype, so the type may be plain "fuse"; the
        // source is the store directory either way.
        let fuse = fstype == "fuse" || fstype == "fuse.snapfs";
        (m == mnt && fuse && Path::new(&source).join("db").is_dir()).then(|| source.into())
    })
}

pub fn is_mountpoint(p: &Path) -> bool {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    mounts().iter().any(|(m, _, _)| *m == p)
}

/// The store directory for a TARGET argument: a store directory, or a snapfs mountpoint.
///
/// A mountpoint is looked up in mountinfo first, by its path with only the parent resolved:
/// any stat of the mount itself is a FUSE request, which waits behind the requests of busy
/// writers (a `snapshot create` under a streaming writer spent most of its time there).
pub fn resolve_target(target: &Path) -> Result<PathBuf, String> {
    if let Some(lexical) = parent_resolved(target) {
        if let Some(store) = snapfs_mount_source(&lexical) {
            return Ok(store);
        }
    }
    if target.join("db").is_dir() {
        return target
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", target.display()));
    }
    let abs = target
        .canonicalize()
        .unwrap_or_else(|_| target.to_path_buf());
    if let Some(store) = snapfs_mount_source(&abs) {
        return Ok(store);
    }
    if !target.exists() {
        return Err(format!("{} does not exist", target.display()));
    }
    Err(format!(
        "{} is neither a snapfs store directory nor a snapfs mountpoint",
        target.display()
    ))
}
