//! The decoded-chunk cache, one per daemon: shared by the live instance and every view
//! (chunks are content-addressed, so a chunk read through one view serves all the others),
//! bounded in bytes, evicting the least recently used chunk.
//!
//! A 1 MiB chunk is read by several 128 KiB kernel requests, and must be decompressed and
//! verified only once; concurrent loads of one chunk are single-flight (`loading`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::storage::keys::ChunkId;

/// Default bound: 64 MiB is 64 full 1 MiB chunks, enough for the readahead windows of a few
/// dozen concurrent sequential readers, and small next to the page cache that holds the
/// data the kernel already read.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A chunk being loaded by one thread; others wait on the lock for its result.
pub(crate) type LoadSlot = Arc<Mutex<Option<Arc<Vec<u8>>>>>;

struct Lru {
    /// id -> (data, stamp of last use).
    map: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    /// stamp -> id, oldest first. Each touch moves one entry: O(log n).
    order: BTreeMap<u64, ChunkId>,
    bytes: usize,
    clock: u64,
}

/// Where chunks that the store does not hold come from: a backend, for a snapshot served
/// straight from it (`mount --from`). Returns the decoded bytes, already verified against
/// the id (the core checks the hash again).
pub trait ChunkSource: Send + Sync {
    fn fetch(&self, id: &ChunkId) -> Result<Vec<u8>, String>;
}

pub struct ChunkCache {
    /// Set only for a store whose bodies live on a backend (`Body::Remote` chunks).
    pub(crate) remote: std::sync::OnceLock<Arc<dyn ChunkSource>>,
    /// Where good copies of chunks whose local body fails verification come from (the
    /// replicator's backends; `heal.rs`), and how many were healed.
    pub(crate) healer: std::sync::OnceLock<Arc<dyn ChunkSource>>,
    pub(crate) healed: std::sync::atomic::AtomicU64,
    cap: AtomicUsize,
    lru: Mutex<Lru>,
    /// Chunks being loaded: waiters block on the inner lock (single flight).
    pub(crate) loading: Mutex<HashMap<ChunkId, LoadSlot>>,
}

impl ChunkCache {
    /// A cache holding at most `cap` bytes of decoded chunks (0 disables caching).
    pub fn new(cap: usize) -> ChunkCache {
        ChunkCache {
            remote: std::sync::OnceLock::new(),
            healer: std::sync::OnceLock::new(),
            healed: Default::default(),
            cap: AtomicUsize::new(cap),
            lru: Mutex::new(Lru {
                map: HashMap::new(),
                order: BTreeMap::new(),
                bytes: 0,
                clock: 0,
            }),
            loading: Mutex::new(HashMap::new()),
        }
    }

    /// Serves chunks the store lacks from `src` (once; later calls are ignored).
    pub fn set_remote(&self, src: Arc<dyn ChunkSource>) {
        let _ = self.remote.set(src);
    }

    /// Heals chunks whose local body fails verification from `src` (once).
    pub fn set_healer(&self, src: Arc<dyn ChunkSource>) {
        let _ = self.healer.set(src);
    }

    pub fn capacity(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Changes the bound (`mount --cache-size`); evicts down to it at once.
    pub fn set_capacity(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
        let mut l = self.lru.lock();
        Self::evict(&mut l, cap);
    }

    fn evict(l: &mut Lru, cap: usize) {
        while l.bytes > cap {
            let Some((_, victim)) = l.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = l.map.remove(&victim) {
                l.bytes -= d.len();
            }
        }
    }

    /// Bytes of chunk data held now.
    pub fn bytes(&self) -> usize {
        self.lru.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.lru.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        let mut l = self.lru.lock();
        l.clock += 1;
        let now = l.clock;
        let (data, old) = {
            let e = l.map.get_mut(id)?;
            let old = e.1;
            e.1 = now;
            (e.0.clone(), old)
        };
        l.order.remove(&old);
        l.order.insert(now, *id);
        Some(data)
    }

    pub fn insert(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        let size = data.len();
        let cap = self.capacity();
        if size > cap {
            return;
        }
        let mut l = self.lru.lock();
        l.clock += 1;
        let now = l.clock;
        if let Some((old_data, old)) = l.map.insert(id, (data, now)) {
            l.order.remove(&old);
            l.bytes -= old_data.len();
        }
        l.order.insert(now, id);
        l.bytes += size;
        Self::evict(&mut l, cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        let mut i = [0u8; 32];
        i[0] = n;
        i
    }

    #[test]
    fn bounded_in_bytes_and_evicts_least_recently_used() {
        let c = ChunkCache::new(10_000);
        for n in 0..10u8 {
            c.insert(id(n), Arc::new(vec![n; 3000]));
            assert!(c.bytes() <= 10_000, "cache holds {} bytes", c.bytes());
        }
        // 3 chunks of 3000 fit in 10000: the last three inserted.
        assert_eq!(c.len(), 3);
        assert!(c.get(&id(7)).is_some());
        assert!(c.get(&id(6)).is_none());
        // Touch 7, insert 10: 8 (least recently used) goes, 7 stays.
        c.insert(id(10), Arc::new(vec![0; 3000]));
        assert!(c.get(&id(7)).is_some());
        assert!(c.get(&id(8)).is_none());
        assert!(c.get(&id(9)).is_some());
        assert_eq!(c.bytes(), 9000);
        // Re-inserting an id does not count it twice.
        c.insert(id(9), Arc::new(vec![0; 3000]));
        assert_eq!(c.bytes(), 9000);
        // A chunk larger than the whole cache is not kept.
        c.insert(id(11), Arc::new(vec![0; 20_000]));
        assert!(c.get(&id(11)).is_none());
        assert_eq!(c.bytes(), 9000);
        // Shrinking evicts at once, oldest first.
        c.set_capacity(3000);
        assert_eq!(c.bytes(), 3000);
        assert!(c.get(&id(9)).is_some());
    }

    #[test]
    fn many_entries_stay_within_the_bound() {
        let c = ChunkCache::new(1 << 20);
        for n in 0..5000u32 {
            let mut i = [0u8; 32];
            i[..4].copy_from_slice(&n.to_le_bytes());
            c.insert(i, Arc::new(vec![0; 4096]));
            if n % 3 == 0 {
                c.get(&i);
            }
        }
        assert_eq!(c.bytes(), 1 << 20);
        assert_eq!(c.len(), 256);
    }
}
