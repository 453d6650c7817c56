//! Free space on the filesystem that holds a store, and what snapfs keeps back of it.
//!
//! Two measures, as ZFS keeps its slop space (docs/design.md, "A full disk"):
//! - a **floor**: while free space is below it, operations that add data (writes, creates,
//!   xattrs, snapshots) fail with ENOSPC before they reach the engine, while deletions,
//!   truncations and renames go on and use what is left;
//! - a **reserve file** (`STORE/reserve`, allocated, never written through): when something
//!   else fills the disk and the engine fails a write anyway, the reserve is deleted, so that
//!   the engine can be reopened and deletions can commit. It is allocated again once free
//!   space is back above three times its size.
//!
//! Both are `clamp(size / 32, 8 MiB, 1 GiB)` of the filesystem: at least twice what the
//! engine's memtables can hold (`engine::memtable_bytes`), since reopening after a failed
//! flush replays the WAL and flushes what it finds. While the reserve is released its space
//! does not count as free: growth resumes only once free space is above floor + reserve.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

pub const RESERVE_FILE: &str = "reserve";
const MIN_RESERVE: u64 = 8 << 20;
const MAX_RESERVE: u64 = 1 << 30;

pub struct Space {
    dir: PathBuf,
    reserve: u64,
    /// Whether the reserve file is there: kept in memory, because every growing batch asks
    /// (`is_low`); set again from the filesystem by each `refill_reserve`.
    present: AtomicBool,
}

/// Free space as the store's owner can use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Free {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

impl Space {
    /// The space of the filesystem holding store directory `dir`.
    pub fn new(dir: &Path) -> io::Result<Space> {
        let total = Self::measure(dir)?.total_bytes;
        let present = dir.join(RESERVE_FILE).symlink_metadata().is_ok();
        Ok(Space {
            dir: dir.to_path_buf(),
            reserve: (total / 32).clamp(MIN_RESERVE, MAX_RESERVE),
            present: AtomicBool::new(present),
        })
    }

    fn measure(dir: &Path) -> io::Result<Free> {
        let st = crate::sys::statvfs(dir)?;
        let frsize = st.f_frsize;
        Ok(Free {
            total_bytes: st.f_blocks * frsize,
            // f_bavail, not f_bfree: what an unprivileged owner could use (root's extra
            // reserved blocks on ext4 are not counted on).
            free_bytes: st.f_bavail * frsize,
        })
    }

    pub fn free(&self) -> io::Result<Free> {
        Self::measure(&self.dir)
    }

    /// Below this much free space, operations that add data are refused.
    pub fn floor(&self) -> u64 {
        self.reserve
    }

    /// Whether `free` bytes are too few to add data: below the floor, or below floor plus
    /// reserve while the reserve is released (its space is kept for deletions).
    pub fn is_low(&self, free: u64) -> bool {
        let need = match self.reserve_present() {
            true => self.floor(),
            false => self.floor() + self.reserve,
        };
        free < need
    }

    /// The size of the reserve file.
    pub fn reserve_bytes(&self) -> u64 {
        self.reserve
    }

    fn reserve_path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    pub fn reserve_present(&self) -> bool {
        self.present.load(Ordering::Acquire)
    }

    /// Deletes the reserve file, if there is one. Returns whether it was there.
    pub fn release_reserve(&self) -> bool {
        match std::fs::remove_file(self.reserve_path()) {
            Ok(()) => {
                self.present.store(false, Ordering::Release);
                if let Ok(d) = File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                log::warn!(
                    "disk full: released the {} MiB reserve of {} so that the store can \
                     recover and deletions can commit",
                    self.reserve >> 20,
                    self.dir.display()
                );
                true
            }
            Err(_) => false,
        }
    }

    /// Allocates the reserve file again if it is missing and free space is back above three
    /// times its size. Returns whether it allocated one.
    pub fn refill_reserve(&self) -> io::Result<bool> {
        let present = self.reserve_path().symlink_metadata().is_ok();
        self.present.store(present, Ordering::Release);
        if present || self.free()?.free_bytes < 3 * self.reserve {
            return Ok(false);
        }
        let tmp = self.dir.join(format!("{RESERVE_FILE}.tmp"));
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let made = crate::sys::fallocate(&f, self.reserve)
            .and_then(|_| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, self.reserve_path()));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.present.store(true, Ordering::Release);
        Ok(true)
    }
}
