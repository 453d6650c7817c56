//! A consistency check that walks the whole store (`snapfs check`, the stress tests):
//! reference counts against the chunk-map versions that hold them, chunk bodies against
//! their refcount records, the space counters against their sums, and, at every retained
//! epoch, directory entries against the inodes they name.
//!
//! It takes `meta` for the reference walk, so it sees one consistent state; with a daemon
//! serving, writers wait for the walk (O(metadata)).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::storage::engine::Cf;
use crate::storage::keys::{self, ChunkId, MapEntry, TAG_LIVE};

use super::txn::decode_ref;
use super::{Counters, Fs, ROOT_INO};
use crate::storage::inode::{Attr, Kind};

/// What `Fs::check` found. `problems` is empty for a consistent store.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct CheckReport {
    pub chunks: u64,
    pub references: u64,
    pub epochs_checked: u64,
    pub entries_checked: u64,
    #[serde(default)]
    pub inodes_checked: u64,
    pub chunks_verified: u64,
    /// Bodies without a refcount but with a free-queue marker: written ahead of a commit
    /// that a crash prevented (fs/defer.rs); garbage collection frees them. Not a problem.
    #[serde(default)]
    pub awaiting_gc: u64,
    /// One line per inconsistency (at most 100 are listed; `problem_count` counts all).
    pub problems: Vec<String>,
    pub problem_count: u64,
}

impl CheckReport {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < 100 {
            self.problems.push(p);
        }
    }
}

impl Fs {
    /// Walks the store and reports every inconsistency. With `verify_data`, also reads,
    /// decompresses and hashes every chunk body.
    pub fn check(&self, verify_data: bool) -> Result<CheckReport> {
        let mut r = CheckReport::default();
        let meta = self.lock_meta();
        // References held by chunk-map versions.
        let mut refs: HashMap<ChunkId, u64> = HashMap::new();
        for item in self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_MAP], &[keys::P_MAP])
        {
            let (_, v) = item?;
            if v.first() == Some(&TAG_LIVE) {
                match MapEntry::decode(&v[1..]) {
                    Some(m) => *refs.entry(m.id).or_default() += 1,
                    None => r.problem("a chunk-map version does not decode".into()),
                }
            }
        }
        let mut sums = Counters::default();
        let mut counted: HashSet<ChunkId> = HashSet::new();
        for item in self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_REFCOUNT], &[keys::P_REFCOUNT])
        {
            let (k, v) = item?;
            let Ok(id) = <ChunkId>::try_from(&k[1..]) else {
                r.problem("a refcount key has the wrong length".into());
                continue;
            };
            let Some((count, raw, stored)) = decode_ref(&v) else {
                r.problem(format!(
                    "refcount of {} does not decode",
                    crate::storage::chunk::hex(&id)
                ));
                continue;
            };
            counted.insert(id);
            r.chunks += 1;
            sums.chunks += 1;
            sums.unique_bytes += raw as u64;
            sums.stored_bytes += stored as u64;
            sums.referenced_bytes += count * raw as u64;
            let held = refs.get(&id).copied().unwrap_or(0);
            if held != count {
                r.problem(format!(
                    "chunk {}: refcount {count}, but {held} chunk-map versions name it",
                    crate::storage::chunk::hex(&id)
                ));
            }
            if count == 0 && !self.eng.exists(Cf::Meta, &keys::free_key(&id))? {
                r.problem(format!(
                    "chunk {}: unreferenced but not queued for garbage collection",
                    crate::storage::chunk::hex(&id)
                ));
            }
            match self.eng.get(Cf::Chunks, &id)? {
                None => r.problem(format!(
                    "chunk {}: body missing",
                    crate::storage::chunk::hex(&id)
                )),
                Some(body) if verify_data => {
                    r.chunks_verified += 1;
                    if crate::storage::chunk::decode(&id, &body).is_err() {
                        r.problem(format!(
                            "chunk {}: body fails verification",
                            crate::storage::chunk::hex(&id)
                        ));
                    }
                }
                Some(_) => {}
            }
        }
        for (id, n) in &refs {
            r.references += n;
            if !counted.contains(id) {
                r.problem(format!(
                    "chunk {}: named by {n} chunk-map versions but has no refcount",
                    crate::storage::chunk::hex(id)
                ));
            }
        }
        for item in self.eng.reader()?.scan(Cf::Chunks, &[], &[]) {
            let (k, _) = item?;
            let id = <ChunkId>::try_from(&k[..]).ok();
            if id.is_some_and(|id| counted.contains(&id)) {
                continue;
            }
            // Written ahead of a commit that a crash prevented (fs/defer.rs): its logged
            // marker says so, and garbage collection frees it.
            if let Some(id) = id {
                if self.eng.exists(Cf::Meta, &keys::free_key(&id))? {
                    r.awaiting_gc += 1;
                    continue;
                }
            }
            {
                r.problem(format!(
                    "chunk body {} has no refcount (leaked)",
                    crate::storage::chunk::hex(&k)
                ));
            }
        }
        if sums != meta.counters {
            r.problem(format!(
                "space counters {:?} differ from their sums {:?}",
                meta.counters, sums
            ));
        }
        let mut epochs: Vec<u64> = self.snapshot_list()?.iter().map(|s| s.epoch).collect();
        let live = self.view_epoch();
        epochs.push(live);
        let mut orphans: HashSet<u64> = HashSet::new();
        for item in self
            .eng
            .reader()?
            .scan(Cf::Meta, &[keys::P_ORPHAN], &[keys::P_ORPHAN])
        {
            let (k, _) = item?;
            match k.get(1..9) {
                Some(b) if k.len() == 9 => {
                    orphans.insert(keys::be_u64(b));
                }
                _ => r.problem("an orphan key has the wrong length".into()),
            }
        }
        drop(meta);
        // Namespace at every retained epoch: each entry names an inode that exists there.
        for e in epochs {
            let view = self.view(e);
            r.epochs_checked += 1;
            let mut named: HashMap<u64, u32> = HashMap::new();
            for (rec, p) in view.scan_recs(&[keys::P_DIRENT])? {
                r.entries_checked += 1;
                let Some(child) = keys::Dirent::decode(&p).map(|d| d.ino) else {
                    r.problem(format!("epoch {e}: a directory entry does not decode"));
                    continue;
                };
                *named.entry(child).or_default() += 1;
                if view.get_rec(&keys::inode_rec(child))?.is_none() {
                    r.problem(format!(
                        "epoch {e}: entry {:?} in directory {} names inode {child}, which does not exist",
                        String::from_utf8_lossy(keys::dirent_name(&rec)),
                        keys::be_u64(&rec[1..9])
                    ));
                }
            }
            self.check_inodes(&view, e == live, &named, &orphans, &mut r)?;
        }
        Ok(r)
    }

    /// At one epoch: every inode is named by as many entries as its link count says (an
    /// inode nobody names is lost, or at the live epoch an orphan that must be listed for
    /// reclamation), and every chunk-map entry belongs to an inode and lies below its size.
    fn check_inodes(
        &self,
        view: &Fs,
        is_live: bool,
        named: &HashMap<u64, u32>,
        orphans: &HashSet<u64>,
        r: &mut CheckReport,
    ) -> Result<()> {
        let e = view.view_epoch();
        let mut sizes: HashMap<u64, u64> = HashMap::new();
        for (rec, p) in view.scan_recs(&[keys::P_INODE])? {
            let ino = keys::be_u64(&rec[1..9]);
            r.inodes_checked += 1;
            let Some(a) = Attr::decode(ino, &p) else {
                r.problem(format!("epoch {e}: inode {ino} does not decode"));
                continue;
            };
            sizes.insert(ino, a.size);
            if ino == ROOT_INO {
                continue;
            }
            let n = named.get(&ino).copied().unwrap_or(0);
            if n == 0 {
                if a.nlink > 0 {
                    r.problem(format!(
                        "epoch {e}: inode {ino} has {} links but no directory entry names it",
                        a.nlink
                    ));
                } else if is_live && !orphans.contains(&ino) {
                    r.problem(format!(
                        "inode {ino} is unlinked but not listed as an orphan: its space would never be reclaimed"
                    ));
                }
            } else if a.kind != Kind::Dir && n != a.nlink {
                r.problem(format!(
                    "epoch {e}: inode {ino} has {} links but {n} directory entries name it",
                    a.nlink
                ));
            }
        }
        let cs = self.chunk_size as u64;
        for (rec, _) in view.scan_recs(&[keys::P_MAP])? {
            let ino = keys::be_u64(&rec[1..9]);
            let index = keys::map_index(&rec);
            match sizes.get(&ino) {
                None => r.problem(format!(
                    "epoch {e}: chunk {index} of inode {ino}, which does not exist"
                )),
                Some(&size) if index.saturating_mul(cs) >= size => r.problem(format!(
                    "epoch {e}: chunk {index} of inode {ino} lies past its size {size}"
                )),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Each test damages a consistent store in one way and requires `check` to say so: a
    //! check that cannot fail proves nothing.

    use super::super::txn::Txn;
    use super::super::{Creds, Fs, ROOT_INO};
    use crate::storage::engine::{Batch, Cf};
    use crate::storage::store::Store;

    const ME: Creds = Creds { uid: 0, gid: 0 };

    fn store(dir: &std::path::Path) -> Store {
        Store::open(dir, true, Some(64 * 1024)).unwrap()
    }

    fn file(fs: &Fs, name: &str, len: usize) -> u64 {
        let a = fs
            .mknod(ROOT_INO, name.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
            .unwrap();
        let h = fs.open(a.ino, true).unwrap();
        let body: Vec<u8> = (0..len).map(|i| (i * 7 + name.len()) as u8).collect();
        fs.write(&h, 0, &body).unwrap();
        fs.release(&h).unwrap();
        a.ino
    }

    fn problems(fs: &Fs) -> Vec<String> {
        let r = fs.check(true).unwrap();
        assert_eq!(r.problem_count as usize, r.problems.len());
        r.problems
    }

    /// Commits one damaging transaction.
    fn damage(fs: &Fs, f: impl FnOnce(&mut Txn)) {
        let mut txn = Txn::new(fs);
        f(&mut txn);
        let mut meta = fs.lock_meta();
        txn.commit(&mut meta, false).unwrap();
    }

    fn set_attr(txn: &mut Txn, ino: u64, f: impl FnOnce(&mut crate::storage::inode::Attr)) {
        let mut a = txn.attr(ino).unwrap();
        f(&mut a);
        txn.put_attr(a);
    }

    fn unname(txn: &mut Txn, name: &[u8]) {
        txn.del_rec(&crate::storage::keys::dirent_rec(ROOT_INO, name))
            .unwrap();
    }

    #[test]
    fn a_consistent_store_is_clean() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        file(&s.fs, "a", 200_000);
        s.fs.link(file(&s.fs, "b", 10), ROOT_INO, b"b2").unwrap();
        let r = s.fs.check(true).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(r.inodes_checked >= 3 && r.chunks_verified >= 2, "{r:?}");
    }

    #[test]
    fn finds_a_wrong_link_count() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let ino = file(&s.fs, "a", 10);
        damage(&s.fs, |t| set_attr(t, ino, |a| a.nlink = 2));
        let p = problems(&s.fs);
        assert!(
            p.iter()
                .any(|l| l.contains("has 2 links but 1 directory entries")),
            "{p:?}"
        );
    }

    #[test]
    fn finds_a_linked_inode_no_entry_names() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let ino = file(&s.fs, "a", 10);
        damage(&s.fs, |t| unname(t, b"a"));
        let p = problems(&s.fs);
        assert!(
            p.iter()
                .any(|l| l.contains(&format!("inode {ino} has 1 links but no directory entry"))),
            "{p:?}"
        );
    }

    #[test]
    fn finds_an_unlinked_inode_that_is_not_an_orphan() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let ino = file(&s.fs, "a", 10);
        damage(&s.fs, |t| {
            unname(t, b"a");
            set_attr(t, ino, |a| a.nlink = 0);
        });
        let p = problems(&s.fs);
        assert!(
            p.iter().any(|l| l.contains("not listed as an orphan")),
            "{p:?}"
        );
    }

    #[test]
    fn finds_a_chunk_past_the_size() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let ino = file(&s.fs, "a", 200_000);
        // The size shrinks without the chunk-map entries that lie beyond it.
        damage(&s.fs, |t| set_attr(t, ino, |a| a.size = 10));
        let p = problems(&s.fs);
        assert!(
            p.iter().any(|l| l.contains("lies past its size 10")),
            "{p:?}"
        );
    }

    #[test]
    fn finds_a_wrong_refcount_and_a_damaged_body() {
        for damage_body in [true, false] {
            let t = tempfile::tempdir().unwrap();
            let s = store(t.path());
            let ino = file(&s.fs, "a", 64 * 1024);
            let h = s.fs.open(ino, false).unwrap();
            let content = s.fs.read(&h, 0, 64 * 1024).unwrap();
            s.fs.release(&h).unwrap();
            let id = crate::storage::chunk::chunk_id(&content);
            let mut b = Batch::new();
            if damage_body {
                let mut bad = s.fs.eng.get(Cf::Chunks, &id).unwrap().unwrap();
                let mid = bad.len() / 2;
                bad[mid] ^= 1;
                s.fs.eng.put(&mut b, Cf::Chunks, &id, &bad);
            } else {
                let k = crate::storage::keys::refcount_key(&id);
                let mut v = s.fs.eng.get(Cf::Meta, &k).unwrap().unwrap();
                v[0] = v[0].wrapping_add(1);
                s.fs.eng.put(&mut b, Cf::Meta, &k, &v);
            }
            s.fs.eng.write(b, false).unwrap();
            let p = problems(&s.fs);
            assert!(!p.is_empty(), "damage (body: {damage_body}) went unnoticed");
        }
    }
}
