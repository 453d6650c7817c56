//! Every byte layout of the metadata column family, in one place.
//!
//! | prefix | key                                          | value                         |
//! |--------|----------------------------------------------|-------------------------------|
//! | `0x01` | `01 "super"`                                 | superblock (see `Super`)      |
//! | `0x02` | `02 name`                                    | counter, u64 LE               |
//! | `0x10` | `10 ino:u64be !epoch:u64be`                  | versioned inode record        |
//! | `0x11` | `11 parent:u64be name 00 !epoch:u64be`       | versioned directory entry     |
//! | `0x12` | `12 ino:u64be index:u64be !epoch:u64be`      | versioned chunk-map entry     |
//! | `0x13` | `13 ino:u64be name 00 !epoch:u64be`          | versioned extended attribute  |
//! | `0x20` | `20 chunk_id:[u8;32]`                        | refcount u64, raw u32, stored u32 (LE) |
//! | `0x21` | `21 ino:u64be`                               | orphan marker (empty)         |
//! | `0x22` | `22 chunk_id:[u8;32]`                        | free-queue marker (empty)     |
//! | `0x23` | `23 chunk_id:[u8;32]`                        | stored raw, to compress behind the writer: raw u32 LE |
//! | `0x30` | `30 name`                                    | snapshot record               |
//! | `0x40` | `40 backend:u32be seq:u64be`                 | replication queue entry (`QueueEntry`) |
//! | `0x41` | `41 backend:u32be name`                      | a snapshot's replication state (`replica::state`) |
//! | `0x42` | `42 backend:u32be hash:[u8;32]`              | metadata object known on the backend (empty) |
//! | `0x43` | `43 backend:u32be chunk_id:[u8;32]`          | chunk refused for upload: failed verification (empty) |
//! | `0x44` | `44 backend:u32be`                           | a backend of this store: its name |
//!
//! The chunk column family holds `chunk_id:[u8;32] -> chunk value` (see `chunk.rs`).
//!
//! Ids are big-endian so byte order equals numeric order. Versioned keys end in the bitwise
//! complement of the epoch, big-endian, so the newest version of a record sorts first and
//! "the newest version at or below epoch v" is the first key at or after `record !v`.
//! Names never contain NUL (POSIX forbids it), so `name 00` makes the record part prefix-free.
//!
//! Versioned values start with a tag byte: `TAG_LIVE` followed by the payload, or
//! `TAG_TOMBSTONE` alone (the record was deleted at that epoch).

pub const P_SUPER: u8 = 0x01;
pub const P_COUNTER: u8 = 0x02;
pub const P_INODE: u8 = 0x10;
pub const P_DIRENT: u8 = 0x11;
pub const P_MAP: u8 = 0x12;
pub const P_XATTR: u8 = 0x13;
pub const P_REFCOUNT: u8 = 0x20;
pub const P_ORPHAN: u8 = 0x21;
pub const P_FREE: u8 = 0x22;
pub const P_COMPRESS: u8 = 0x23;
pub const P_SNAPSHOT: u8 = 0x30;
pub const P_REPL_QUEUE: u8 = 0x40;
pub const P_REPL_SNAP: u8 = 0x41;
pub const P_REPL_META: u8 = 0x42;
pub const P_REPL_BAD: u8 = 0x43;
pub const P_REPL_BACKEND: u8 = 0x44;
pub const P_REPL_HEAL: u8 = 0x45;
/// `46 backend` → u64 LE: the last prune generation this store reconciled with.
pub const P_REPL_PRUNED: u8 = 0x46;
/// `47 backend chunk-id`: a chunk the store holds that a prune removed from the backend.
pub const P_REPL_ABSENT: u8 = 0x47;

pub const TAG_TOMBSTONE: u8 = 0;
pub const TAG_LIVE: u8 = 1;

pub const SUPER_KEY: &[u8] = &[P_SUPER, b's', b'u', b'p', b'e', b'r'];

pub type ChunkId = [u8; 32];

/// Length of the version suffix of a versioned key.
pub const VERSION_LEN: usize = 8;

pub fn counter_key(name: &str) -> Vec<u8> {
    let mut k = vec![P_COUNTER];
    k.extend_from_slice(name.as_bytes());
    k
}

/// Record part of an inode key.
pub fn inode_rec(ino: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(P_INODE);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// Prefix of all entries of directory `parent`.
pub fn dirent_prefix(parent: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(P_DIRENT);
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

/// Record part of a directory entry key.
pub fn dirent_rec(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = dirent_prefix(parent);
    k.extend_from_slice(name);
    k.push(0);
    k
}

/// The name inside a directory-entry record part.
pub fn dirent_name(rec: &[u8]) -> &[u8] {
    &rec[9..rec.len() - 1]
}

pub fn map_prefix(ino: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(P_MAP);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn map_rec(ino: u64, index: u64) -> Vec<u8> {
    let mut k = map_prefix(ino);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Chunk index inside a chunk-map record part.
pub fn map_index(rec: &[u8]) -> u64 {
    be_u64(&rec[9..17])
}

pub fn xattr_prefix(ino: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(P_XATTR);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn xattr_rec(ino: u64, name: &[u8]) -> Vec<u8> {
    let mut k = xattr_prefix(ino);
    k.extend_from_slice(name);
    k.push(0);
    k
}

pub fn xattr_name(rec: &[u8]) -> &[u8] {
    &rec[9..rec.len() - 1]
}

pub fn refcount_key(id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(P_REFCOUNT);
    k.extend_from_slice(id);
    k
}

pub fn orphan_key(ino: u64) -> Vec<u8> {
    let mut k = vec![P_ORPHAN];
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn free_key(id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(P_FREE);
    k.extend_from_slice(id);
    k
}

pub fn compress_key(id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(P_COMPRESS);
    k.extend_from_slice(id);
    k
}

pub fn snapshot_key(name: &[u8]) -> Vec<u8> {
    let mut k = vec![P_SNAPSHOT];
    k.extend_from_slice(name);
    k
}

/// `prefix backend:u32be rest`: the layout of every replication key.
pub fn repl_key(prefix: u8, backend: u32, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.len());
    k.push(prefix);
    k.extend_from_slice(&backend.to_be_bytes());
    k.extend_from_slice(rest);
    k
}

pub fn queue_key(backend: u32, seq: u64) -> Vec<u8> {
    repl_key(P_REPL_QUEUE, backend, &seq.to_be_bytes())
}

/// A chunk waiting for upload to one backend. Entries sort by `seq`, the order chunks were
/// sealed in, so the first entry is the oldest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: ChunkId,
    /// Wall-clock milliseconds since the Unix epoch when the chunk was sealed.
    pub sealed_ms: u64,
    /// Bytes of the stored (compressed) body.
    pub stored_len: u32,
}

impl QueueEntry {
    pub const ENCODED_LEN: usize = 44;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::ENCODED_LEN);
        v.extend_from_slice(&self.id);
        v.extend_from_slice(&self.sealed_ms.to_le_bytes());
        v.extend_from_slice(&self.stored_len.to_le_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<QueueEntry> {
        if v.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(QueueEntry {
            id: v[..32].try_into().ok()?,
            sealed_ms: le_u64(&v[32..40]),
            stored_len: le_u32(&v[40..44]),
        })
    }
}

/// A snapshot's replication state on one backend (`41 backend name`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplSnap {
    /// The snapshot needs every queue entry at or below this sequence number uploaded.
    pub barrier_seq: u64,
    /// Wall-clock ms when the snapshot was taken (or, for a snapshot older than the backend,
    /// when the backend was added).
    pub created_ms: u64,
    /// Wall-clock ms when its completion marker was written; 0 while pending.
    pub completed_ms: u64,
    /// Chunk bytes uploaded for it: from the previous snapshot's completion to its own.
    pub chunk_bytes: u64,
    /// Metadata objects uploaded for it, and those already on the backend (skipped).
    pub meta_uploaded: u32,
    pub meta_skipped: u32,
    /// Hash of its root tree object (zero while pending).
    pub root: [u8; 32],
    /// Its marker was deleted from the backend by the backend's retention (`backend prune`).
    pub pruned: bool,
}

impl ReplSnap {
    /// Records written before retention existed are 72 bytes (not pruned).
    pub const ENCODED_LEN: usize = 73;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::ENCODED_LEN);
        v.extend_from_slice(&self.barrier_seq.to_le_bytes());
        v.extend_from_slice(&self.created_ms.to_le_bytes());
        v.extend_from_slice(&self.completed_ms.to_le_bytes());
        v.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        v.extend_from_slice(&self.meta_uploaded.to_le_bytes());
        v.extend_from_slice(&self.meta_skipped.to_le_bytes());
        v.extend_from_slice(&self.root);
        v.push(self.pruned as u8);
        v
    }

    pub fn decode(v: &[u8]) -> Option<ReplSnap> {
        if v.len() != Self::ENCODED_LEN && v.len() != Self::ENCODED_LEN - 1 {
            return None;
        }
        Some(ReplSnap {
            barrier_seq: le_u64(&v[0..8]),
            created_ms: le_u64(&v[8..16]),
            completed_ms: le_u64(&v[16..24]),
            chunk_bytes: le_u64(&v[24..32]),
            meta_uploaded: le_u32(&v[32..36]),
            meta_skipped: le_u32(&v[36..40]),
            root: v[40..72].try_into().ok()?,
            pruned: v.get(72).is_some_and(|b| *b != 0),
        })
    }
}

/// Appends the version suffix for `epoch` to a record part.
pub fn versioned(rec: &[u8], epoch: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(rec.len() + VERSION_LEN);
    k.extend_from_slice(rec);
    k.extend_from_slice(&(!epoch).to_be_bytes());
    k
}

/// Splits a versioned key into its record part and epoch.
pub fn split_version(key: &[u8]) -> (&[u8], u64) {
    let (rec, v) = key.split_at(key.len() - VERSION_LEN);
    (rec, !be_u64(v))
}

pub fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

pub fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

pub fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// The smallest key greater than every key starting with `prefix` (for iterator upper bounds).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last == 0xff {
            end.pop();
        } else {
            *last += 1;
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// A chunk-map entry: which chunk holds the bytes of one chunk-sized slice of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub id: ChunkId,
    /// Number of valid bytes in the chunk (the last chunk of a file may be short).
    pub len: u32,
}

impl MapEntry {
    pub const ENCODED_LEN: usize = 36;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + Self::ENCODED_LEN);
        v.push(TAG_LIVE);
        v.extend_from_slice(&self.id);
        v.extend_from_slice(&self.len.to_le_bytes());
        v
    }

    /// Decodes the payload (after the tag byte).
    pub fn decode(p: &[u8]) -> Option<MapEntry> {
        if p.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(MapEntry {
            id: p[..32].try_into().ok()?,
            len: le_u32(&p[32..36]),
        })
    }
}

/// A directory entry's payload: the child inode and its kind (for readdir without a lookup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub kind: u8,
}

impl Dirent {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(10);
        v.push(TAG_LIVE);
        v.extend_from_slice(&self.ino.to_le_bytes());
        v.push(self.kind);
        v
    }

    pub fn decode(p: &[u8]) -> Option<Dirent> {
        if p.len() != 9 {
            return None;
        }
        Some(Dirent {
            ino: le_u64(p),
            kind: p[8],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_versions_sort_first() {
        let rec = inode_rec(42);
        let v1 = versioned(&rec, 1);
        let v2 = versioned(&rec, 2);
        let v9 = versioned(&rec, 9);
        assert!(v9 < v2 && v2 < v1);
        assert_eq!(split_version(&v9), (rec.as_slice(), 9));
    }

    #[test]
    fn ids_sort_numerically() {
        let mut prev = inode_rec(0);
        for ino in [1u64, 2, 255, 256, 65_535, 1 << 40, u64::MAX] {
            let k = inode_rec(ino);
            assert!(k > prev, "{ino}");
            prev = k;
        }
        assert!(map_rec(7, 1) < map_rec(7, 2));
        assert!(map_rec(7, u64::MAX) < map_rec(8, 0));
    }

    #[test]
    fn dirent_records_are_prefix_free() {
        // "a" and all its versions sort before "a\x01..." and "ab".
        let a_new = versioned(&dirent_rec(1, b"a"), u64::MAX - 1);
        let a_old = versioned(&dirent_rec(1, b"a"), 0);
        let ab = versioned(&dirent_rec(1, b"ab"), 5);
        assert!(a_new < a_old && a_old < ab);
        assert_eq!(dirent_name(&dirent_rec(3, b"hello")), b"hello");
        assert!(versioned(&dirent_rec(1, b"zzz"), 0) < dirent_prefix(2));
    }

    #[test]
    fn prefix_end_bounds_prefix() {
        assert_eq!(prefix_end(&[1, 2]), vec![1, 3]);
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
        let p = dirent_prefix(5);
        let end = prefix_end(&p);
        assert!(versioned(&dirent_rec(5, &[0xff; 300]), 0) < end);
    }

    #[test]
    fn entries_round_trip() {
        let e = MapEntry {
            id: [7; 32],
            len: 12345,
        };
        assert_eq!(MapEntry::decode(&e.encode()[1..]), Some(e));
        let d = Dirent { ino: 99, kind: 3 };
        assert_eq!(Dirent::decode(&d.encode()[1..]), Some(d));
        assert_eq!(MapEntry::decode(&[1, 2, 3]), None);
    }
}
