//! The disk cache of `mount --from`: chunks fetched from the backend are kept as files in the
//! mount's temporary directory, up to a byte budget, so that a second read of a file (the next
//! epoch over a data set, a checkpoint loaded twice) does not fetch them again. It sits below
//! the memory cache (`--cache-size`) and above the backend.
//!
//! - One file per chunk, `HH/<hex id>`, holding the decoded bytes; written to a temporary name
//!   and renamed, so a reader never sees half a file. No fsync: the cache dies with the mount
//!   (the directory is deleted at unmount), and a file that comes back wrong after a crash is
//!   never read back by another mount.
//! - Every read from it is hashed against the id, like a fetch from the backend; a file that
//!   fails is dropped and the chunk fetched again.
//! - Least recently used chunks are deleted first once the budget is exceeded. A write that
//!   fails (a full disk) leaves the chunk uncached; reads go on.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::fs::ChunkSource;
use crate::replica::format;
use crate::storage::chunk::chunk_id;
use crate::storage::keys::ChunkId;

#[derive(Default)]
struct Lru {
    /// Chunk → (size, generation of its latest use).
    held: HashMap<ChunkId, (u64, u64)>,
    /// Uses, oldest first; an entry whose generation is not the chunk's latest is stale.
    order: VecDeque<(ChunkId, u64)>,
    total: u64,
    gen: u64,
}

impl Lru {
    /// Marks a chunk used; returns the generation of this use, if it is held.
    fn touch(&mut self, id: &ChunkId) -> Option<u64> {
        self.gen += 1;
        let g = self.gen;
        let e = self.held.get_mut(id)?;
        e.1 = g;
        self.order.push_back((*id, g));
        // Stale entries are dropped when they reach the front; keep the queue from growing
        // without bound under repeated hits.
        if self.order.len() > 4 * self.held.len() + 64 {
            let held = &self.held;
            self.order
                .retain(|(id, g)| held.get(id).is_some_and(|e| e.1 == *g));
        }
        Some(g)
    }

    /// Records a chunk; returns the chunks to delete to stay within `budget`.
    fn insert(&mut self, id: ChunkId, size: u64, budget: u64) -> Vec<ChunkId> {
        self.gen += 1;
        if let Some((old, _)) = self.held.insert(id, (size, self.gen)) {
            self.total -= old;
        }
        self.total += size;
        self.order.push_back((id, self.gen));
        let mut out = Vec::new();
        while self.total > budget {
            let Some((victim, g)) = self.order.pop_front() else {
                break;
            };
            if self.held.get(&victim).is_some_and(|e| e.1 == g) {
                let (size, _) = self.held.remove(&victim).expect("held");
                self.total -= size;
                out.push(victim);
            }
        }
        out
    }

    /// Drops a chunk's entry if its latest use is still `gen` (no other thread has used or
    /// cached it again since).
    fn forget(&mut self, id: &ChunkId, gen: u64) -> bool {
        if self.held.get(id).is_some_and(|e| e.1 == gen) {
            let (size, _) = self.held.remove(id).expect("held");
            self.total -= size;
            return true;
        }
        false
    }
}

/// Counters, logged at unmount.
#[derive(Default)]
pub struct Counts {
    pub hits: AtomicU64,
    pub fetched: AtomicU64,
    pub dropped_bad: AtomicU64,
}

pub struct DiskCache {
    inner: Arc<dyn ChunkSource>,
    dir: PathBuf,
    budget: u64,
    lru: Mutex<Lru>,
    tmp_seq: AtomicU64,
    pub counts: Counts,
}

impl DiskCache {
    /// A cache of at most `budget` bytes in `dir` (created, mode 0700) in front of `inner`.
    pub fn new(inner: Arc<dyn ChunkSource>, dir: PathBuf, budget: u64) -> Result<Self, String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create the disk cache {}: {e}", dir.display()))?;
        Ok(DiskCache {
            inner,
            dir,
            budget,
            lru: Mutex::new(Lru::default()),
            tmp_seq: AtomicU64::new(0),
            counts: Counts::default(),
        })
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let h = format::hex(id);
        self.dir.join(&h[..2]).join(h)
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.lru.lock().total
    }

    fn keep(&self, id: &ChunkId, data: &[u8]) {
        if (data.len() as u64) > self.budget {
            return;
        }
        let path = self.path(id);
        let tmp = self.dir.join(format!(
            "tmp-{}",
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, data))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            log::debug!("disk cache: cannot keep chunk {}: {e}", format::hex(id));
            return;
        }
        // Victims are deleted under the lock: another thread that fetches one of them again
        // writes its file to a temporary name first and records it only after this.
        let mut lru = self.lru.lock();
        for v in lru.insert(*id, data.len() as u64, self.budget) {
            let _ = std::fs::remove_file(self.path(&v));
        }
    }
}

impl ChunkSource for DiskCache {
    fn fetch(&self, id: &ChunkId) -> Result<Vec<u8>, String> {
        let used = self.lru.lock().touch(id);
        if let Some(gen) = used {
            match std::fs::read(self.path(id)) {
                Ok(data) if chunk_id(&data) == *id => {
                    self.counts.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(data);
                }
                // Deleted by an eviction since it was looked up: fetch it again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.lru.lock().forget(id, gen);
                }
                r => {
                    let why = r.map_or_else(|e| e.to_string(), |_| "hash mismatch".into());
                    log::warn!(
                        "disk cache: chunk {} is bad ({why}); fetching it again",
                        format::hex(id)
                    );
                    self.counts.dropped_bad.fetch_add(1, Ordering::Relaxed);
                    let mut lru = self.lru.lock();
                    if lru.forget(id, gen) {
                        let _ = std::fs::remove_file(self.path(id));
                    }
                }
            }
        }
        let data = self.inner.fetch(id)?;
        self.counts.fetched.fetch_add(1, Ordering::Relaxed);
        self.keep(id, &data);
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Source(Mutex<u64>);

    impl ChunkSource for Source {
        fn fetch(&self, id: &ChunkId) -> Result<Vec<u8>, String> {
            *self.0.lock() += 1;
            let b = (0..=255u8).find(|b| id_of(*b) == *id).ok_or("unknown id")?;
            Ok(vec![b; 1000])
        }
    }

    fn id_of(b: u8) -> ChunkId {
        chunk_id(&[b; 1000])
    }

    #[test]
    fn keeps_within_budget_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Arc::new(Source(Mutex::new(0)));
        let c = DiskCache::new(src.clone(), tmp.path().join("c"), 3000).unwrap();
        for b in 0..3u8 {
            assert_eq!(c.fetch(&id_of(b)).unwrap(), vec![b; 1000]);
        }
        assert_eq!(*src.0.lock(), 3);
        // All three held: no fetch. Chunk 0 is now the most recently used.
        c.fetch(&id_of(0)).unwrap();
        assert_eq!(*src.0.lock(), 3);
        // A fourth pushes out the least recently used, chunk 1.
        c.fetch(&id_of(3)).unwrap();
        assert_eq!(c.held(), 3000);
        assert!(!c.path(&id_of(1)).exists());
        c.fetch(&id_of(0)).unwrap();
        c.fetch(&id_of(2)).unwrap();
        assert_eq!(*src.0.lock(), 4);
        c.fetch(&id_of(1)).unwrap();
        assert_eq!(*src.0.lock(), 5);
        assert_eq!(c.counts.hits.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_damaged_file_is_fetched_again() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Arc::new(Source(Mutex::new(0)));
        let c = DiskCache::new(src.clone(), tmp.path().join("c"), 1 << 20).unwrap();
        let id = id_of(7);
        c.fetch(&id).unwrap();
        let mut b = std::fs::read(c.path(&id)).unwrap();
        b[10] ^= 1;
        std::fs::write(c.path(&id), b).unwrap();
        assert_eq!(c.fetch(&id).unwrap(), vec![7; 1000], "the right bytes");
        assert_eq!(
            *src.0.lock(),
            2,
            "fetched again, not served from the bad file"
        );
        assert_eq!(c.counts.dropped_bad.load(Ordering::Relaxed), 1);
        // And the good copy is cached again.
        c.fetch(&id).unwrap();
        assert_eq!(*src.0.lock(), 2);
    }

    #[test]
    fn a_budget_of_zero_keeps_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let src = Arc::new(Source(Mutex::new(0)));
        let c = DiskCache::new(src.clone(), tmp.path().join("c"), 0).unwrap();
        c.fetch(&id_of(1)).unwrap();
        c.fetch(&id_of(1)).unwrap();
        assert_eq!(*src.0.lock(), 2);
        assert_eq!(c.held(), 0);
    }
}
