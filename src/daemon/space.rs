//! The daemon's watch over free space (docs/design.md, "A full disk"). Once a second it:
//! - sets the engine's floor flag from free space, so writes, creates, xattrs and snapshots
//!   fail with ENOSPC while deletions go on;
//! - recovers a wedged engine: reopens it in place (`Fs::recover_engine`), no remount
//!   needed (the engine releases the reserve file when the open or a deletion needs it);
//! - collects garbage while space is short, so deletions give their space back at once;
//! - allocates the reserve file again once space has come back.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::FsError;
use crate::fs::Fs;
use crate::storage::engine::Health;
use crate::storage::space::Space;

const TICK: Duration = Duration::from_secs(1);

/// The `space` part of `snapfs stat`.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SpaceStat {
    /// "ok"; "low" (free space below the floor: writes, creates and snapshots fail with
    /// ENOSPC, deletions work); "full" (a write failed for want of space: the store is
    /// recovering and refuses writes until it has reopened its engine); "error" (a write
    /// failed with an I/O error; the engine is being reopened).
    pub state: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub floor_bytes: u64,
    pub reserve_bytes: u64,
    pub reserve_present: bool,
}

pub fn status(fs: &Fs, space: &Space) -> SpaceStat {
    let free = space.free().ok();
    let state = match fs.eng.health() {
        Health::Wedged(FsError::NoSpace) => "full",
        Health::Wedged(_) => "error",
        Health::Healthy if fs.eng.low_space() => "low",
        Health::Healthy => "ok",
    };
    SpaceStat {
        state: state.into(),
        total_bytes: free.map_or(0, |f| f.total_bytes),
        free_bytes: free.map_or(0, |f| f.free_bytes),
        floor_bytes: space.floor(),
        reserve_bytes: space.reserve_bytes(),
        reserve_present: space.reserve_present(),
    }
}

/// Starts the watch; it ends when the filesystem is dropped.
pub fn start(fs: Weak<Fs>, space: Arc<Space>) {
    let spawned = std::thread::Builder::new()
        .name("snapfs-space".into())
        .spawn(move || {
            let mut last_error = String::new();
            loop {
                std::thread::sleep(TICK);
                let Some(fs) = fs.upgrade() else { return };
                tick(&fs, &space, &mut last_error);
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the free-space watch: {e}");
    }
}

/// One round of the watch. `last_error` keeps a repeated failure from filling the log.
pub fn tick(fs: &Fs, space: &Space, last_error: &mut String) {
    if let Health::Wedged(e) = fs.eng.health() {
        // Nothing may grow once the engine is back until free space is measured again.
        if e == FsError::NoSpace {
            fs.eng.set_low_space(true);
        }
        match fs.recover_engine() {
            Ok(true) => {
                log::warn!("store recovered after a failed write: writes are accepted again");
                last_error.clear();
            }
            Ok(false) => {}
            Err(m) if m != *last_error => {
                log::error!("cannot recover the store yet (retrying every second): {m}");
                *last_error = m;
            }
            Err(_) => {}
        }
    }
    let Ok(free) = space.free() else { return };
    let low = space.is_low(free.free_bytes);
    let was_low = fs.eng.set_low_space(low);
    if low && !was_low {
        log::warn!(
            "free space is below the floor ({} of {} MiB free): writes, creates and snapshots \
             fail with ENOSPC until space is freed; deletions work",
            free.free_bytes >> 20,
            space.floor() >> 20
        );
    } else if was_low && !low {
        log::warn!("free space is back above the floor: writes are accepted again");
    }
    if low {
        // Deletions free chunks only through GC: run it now rather than within the minute.
        if let Err(e) = fs.collect_garbage() {
            log::debug!("garbage collection on a full disk: {e}");
        }
    } else if let Err(e) = space.refill_reserve() {
        log::debug!("cannot allocate the space reserve yet: {e}");
    }
}
