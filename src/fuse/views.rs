//! Read-only snapshot views served inside the live mount under `/.snapshots/NAME`, and the
//! inode-number space that keeps them apart.
//!
//! A FUSE inode number is `slot << 48 | ino`: slot 0 is the tree the mount serves (live, or
//! one snapshot for `mount --snapshot`), slots 1..0xFFFE are snapshot views opened on first
//! lookup, and `SNAPDIR_INO` is the synthetic `.snapshots` directory. Store inode numbers stay
//! below 2^48 (at 10^6 creates per second that is nine years).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{FsError, Result};
use crate::fs::{Fs, ROOT_INO};
use crate::storage::inode::{Attr, Kind};

pub const SLOT_SHIFT: u32 = 48;
pub const INO_MASK: u64 = (1 << SLOT_SHIFT) - 1;
pub const SNAPDIR_SLOT: u16 = 0xFFFF;
pub const SNAPDIR_INO: u64 = ((SNAPDIR_SLOT as u64) << SLOT_SHIFT) | 1;
pub const SNAPDIR_NAME: &[u8] = b".snapshots";

pub fn join(slot: u16, ino: u64) -> u64 {
    ((slot as u64) << SLOT_SHIFT) | (ino & INO_MASK)
}

pub fn split(fuse_ino: u64) -> (u16, u64) {
    ((fuse_ino >> SLOT_SHIFT) as u16, fuse_ino & INO_MASK)
}

/// How long an unused view stays open. A view holds a pin on its snapshot's epoch (version
/// GC keeps what it reads); its decoded chunks live in the daemon's one shared cache.
pub const VIEW_IDLE: Duration = Duration::from_secs(60);

/// A slot keeps its snapshot's name for the daemon's life (or until the snapshot is
/// deleted): the kernel may hold the slot's inode numbers, so a dropped view is reopened by
/// name on next use, with the same inode numbers (the snapshot's epoch does not change).
struct View {
    name: String,
    /// None: dropped while unused; reopened on use.
    fs: Option<Arc<Fs>>,
    last_used: Instant,
}

/// The snapshot views of one daemon, shared by its mounts and its control socket.
pub struct Views {
    live: Arc<Fs>,
    slots: Mutex<HashMap<u16, View>>,
    next: Mutex<u16>,
    /// Snapshots mounted on their own mountpoint (`mount --snapshot`): name -> mount count.
    mounted: Mutex<HashMap<String, usize>>,
    /// Threads running the snapshot's writeback barrier (`ops::writeback_barrier`): their
    /// FSYNCs only wait for the kernel's WRITEs, which the kernel did before sending them.
    barrier_threads: Mutex<Vec<u64>>,
}

impl Views {
    pub fn new(live: Arc<Fs>) -> Views {
        Views {
            live,
            slots: Mutex::new(HashMap::new()),
            next: Mutex::new(1),
            mounted: Mutex::new(HashMap::new()),
            barrier_threads: Mutex::new(Vec::new()),
        }
    }

    pub fn barrier_thread(&self, tid: u64, running: bool) {
        let mut t = self.barrier_threads.lock();
        if running {
            t.push(tid);
        } else {
            t.retain(|x| *x != tid);
        }
    }

    pub fn is_barrier_thread(&self, tid: u64) -> bool {
        self.barrier_threads.lock().contains(&tid)
    }

    pub fn live(&self) -> &Arc<Fs> {
        &self.live
    }

    /// The slot of a snapshot's view, opening the view on first use.
    pub fn slot_of(&self, name: &str) -> Result<u16> {
        // A pending snapshot is waited for before `slots`, which every view operation takes.
        self.live.wait_snapshot(name)?;
        let mut slots = self.slots.lock();
        if let Some((slot, _)) = slots.iter().find(|(_, v)| v.name == name) {
            return Ok(*slot);
        }
        // Pinned: a file opened through this view reads the snapshot's bytes even if the
        // snapshot is deleted while it is open (the view then leaves `slots`, the open
        // handles keep it).
        let view = self.live.snapshot_view(name)?;
        let mut next = self.next.lock();
        let mut slot = *next;
        while slots.contains_key(&slot) || slot == 0 || slot == SNAPDIR_SLOT {
            slot = slot.wrapping_add(1);
            if slot == *next {
                return Err(FsError::NoSpace);
            }
        }
        *next = slot.wrapping_add(1);
        slots.insert(
            slot,
            View {
                name: name.to_string(),
                fs: Some(Arc::new(view)),
                last_used: Instant::now(),
            },
        );
        Ok(slot)
    }

    /// The view in `slot`, reopened by its snapshot's name if it was dropped while unused.
    pub fn view(&self, slot: u16) -> Result<Arc<Fs>> {
        let mut slots = self.slots.lock();
        let v = slots.get_mut(&slot).ok_or(FsError::NotFound)?;
        v.last_used = Instant::now();
        if let Some(fs) = &v.fs {
            return Ok(fs.clone());
        }
        let fs = Arc::new(self.live.snapshot_view(&v.name)?);
        log::debug!("reopened the view of snapshot {}", v.name);
        v.fs = Some(fs.clone());
        Ok(fs)
    }

    /// Drops the views unused for `idle` that nothing else holds (no open file or directory
    /// handle, no request in flight: the Arc is ours alone). Their slots keep the names.
    /// Returns how many were dropped.
    pub fn drop_idle(&self, idle: Duration) -> usize {
        let mut slots = self.slots.lock();
        let mut n = 0;
        for v in slots.values_mut() {
            let unused = v.last_used.elapsed() >= idle;
            if unused && v.fs.as_ref().is_some_and(|f| Arc::strong_count(f) == 1) {
                v.fs = None;
                n += 1;
            }
        }
        n
    }

    /// Views open now (not dropped).
    pub fn open_views(&self) -> usize {
        self.slots
            .lock()
            .values()
            .filter(|v| v.fs.is_some())
            .count()
    }

    /// Drops idle views every few seconds, for as long as `views` lives.
    pub fn start_reaper(views: &Arc<Views>, idle: Duration) {
        let weak = Arc::downgrade(views);
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(15));
        let _ = std::thread::Builder::new()
            .name("snapfs-views".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                let Some(v) = weak.upgrade() else { return };
                let n = v.drop_idle(idle);
                if n > 0 {
                    log::info!("dropped {n} unused snapshot views");
                }
            });
    }

    /// Forgets the view of a deleted snapshot (its inode numbers then answer ENOENT).
    pub fn forget(&self, name: &str) {
        self.slots.lock().retain(|_, v| v.name != name);
    }

    pub fn mark_mounted(&self, name: &str, up: bool) {
        let mut m = self.mounted.lock();
        let n = m.entry(name.to_string()).or_insert(0);
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(name);
            }
        }
    }

    pub fn is_mounted(&self, name: &str) -> bool {
        self.mounted.lock().contains_key(name)
    }

    /// Attributes of the synthetic `.snapshots` directory.
    pub fn snapdir_attr(&self) -> Result<Attr> {
        let root = self.live.getattr(ROOT_INO)?;
        let mut a = Attr::new(
            SNAPDIR_INO,
            Kind::Dir,
            0o555,
            root.uid,
            root.gid,
            root.ctime,
        );
        a.parent = ROOT_INO;
        Ok(a)
    }
}
