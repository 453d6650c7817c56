//! The object format on a backend, version 1 (docs/replication.md, "Object layout").
//!
//! Every object starts with an 8-byte header: `"SNPO" version:u8 kind:u8 codec:u8 crypt:u8`.
//! `codec` says how the payload after the header is compressed (0 none, 1 zstd; a chunk's
//! payload is the chunk's stored encoding, which carries its own codec, so chunks use 0);
//! `crypt` is 0 (none) and leaves room for the encryption modes of a later version.
//!
//! | kind | name                         | payload                                          |
//! |------|------------------------------|--------------------------------------------------|
//! | 1    | `chunks/HH/<id hex>`         | the stored chunk (`storage::chunk`), verified against `id` |
//! | 2    | `meta/HH/<hash hex>`         | a tree: one directory's entries, sorted by name  |
//! | 3    | `meta/HH/<hash hex>`         | a file map: `(index, chunk id, length)` per chunk |
//! | 4    | `snapshots/<name>`           | a snapshot's completion marker, written last     |
//! | 5    | `snapfs-repository`          | the repository descriptor, written first         |
//! | 6    | `prune/state`                | the prune generation and phase (replica/prune)   |
//!
//! A metadata object's name is the blake3 hash of the whole object (header included), so it
//! is verified by its name and an unchanged directory or file map is never uploaded twice.
//! Markers and the descriptor are not content-addressed: they end in a 32-byte blake3 of
//! everything before it. Every decoder here treats its input as hostile: lengths are checked
//! before use, counts are bounded, names are validated (`check_entry_name`).

use crate::storage::inode::{Kind, Time};
use crate::storage::keys::ChunkId;

pub const MAGIC: &[u8; 4] = b"SNPO";
pub const OBJECT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;

pub const KIND_CHUNK: u8 = 1;
pub const KIND_TREE: u8 = 2;
pub const KIND_MAP: u8 = 3;
pub const KIND_MARKER: u8 = 4;
pub const KIND_REPO: u8 = 5;
pub const KIND_PRUNE: u8 = 6;

const CODEC_NONE: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CRYPT_NONE: u8 = 0;

pub const REPO_NAME: &str = "snapfs-repository";
/// Objects of prune's protocol (`replica::prune`), named in the clear on every backend.
pub const PRUNE_PREFIX: &str = "prune/";
/// Decompressed metadata objects larger than this are refused (a bomb guard).
const MAX_META_BYTES: usize = 256 << 20;
const MAX_ENTRIES: usize = 4 << 20;
const MAX_XATTRS: usize = 4096;

pub type Hash = [u8; 32];

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn chunk_name(id: &ChunkId) -> String {
    let h = hex(id);
    format!("chunks/{}/{h}", &h[..2])
}

pub fn meta_name(hash: &Hash) -> String {
    let h = hex(hash);
    format!("meta/{}/{h}", &h[..2])
}

/// Listing prefixes that together cover every object of a repository, each a small part of
/// it (a heal or scrub holds one part's names at a time).
pub fn listing_prefixes() -> Vec<String> {
    let mut v = vec![
        REPO_NAME.to_string(),
        PRUNE_PREFIX.to_string(),
        "snapshots/".to_string(),
    ];
    for top in ["meta", "chunks"] {
        v.extend((0..=255u8).map(|b| format!("{top}/{b:02x}/")));
    }
    v
}

/// The hash in a `chunks/HH/<hex>` or `meta/HH/<hex>` name, if it is one.
pub fn hash_of_name(name: &str) -> Option<Hash> {
    let (top, rest) = name.split_once('/')?;
    if top != "chunks" && top != "meta" {
        return None;
    }
    let (part, h) = rest.split_once('/')?;
    if h.len() != 64 || part != &h[..2] {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn marker_name(snapshot: &str) -> String {
    format!("snapshots/{snapshot}")
}

/// Why an object was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadObject(pub String);

impl std::fmt::Display for BadObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(msg: impl Into<String>) -> Result<T, BadObject> {
    Err(BadObject(msg.into()))
}

pub(crate) fn header(kind: u8, codec: u8) -> Vec<u8> {
    header_with_room(kind, codec, 56)
}

fn header_with_room(kind: u8, codec: u8, room: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + room);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&[OBJECT_VERSION, kind, codec, CRYPT_NONE]);
    v
}

/// Checks the header and returns the payload (decompressed).
fn open(obj: &[u8], kind: u8) -> Result<Vec<u8>, BadObject> {
    if obj.len() < HEADER_LEN || &obj[..4] != MAGIC {
        return bad("not a snapfs object (bad magic)");
    }
    if obj[4] != OBJECT_VERSION {
        return bad(format!(
            "object format version {} (this build reads {OBJECT_VERSION})",
            obj[4]
        ));
    }
    if obj[5] != kind {
        return bad(format!(
            "object of kind {} where {kind} was expected",
            obj[5]
        ));
    }
    if obj[7] != CRYPT_NONE {
        return bad("encrypted object (this build has no key for it)");
    }
    let payload = &obj[HEADER_LEN..];
    match obj[6] {
        CODEC_NONE => Ok(payload.to_vec()),
        CODEC_ZSTD => {
            let mut out = Vec::new();
            let mut dec = zstd::stream::read::Decoder::new(payload)
                .map_err(|e| BadObject(format!("zstd: {e}")))?;
            let n = std::io::copy(
                &mut std::io::Read::take(&mut dec, MAX_META_BYTES as u64 + 1),
                &mut out,
            )
            .map_err(|e| BadObject(format!("zstd: {e}")))?;
            if n as usize > MAX_META_BYTES {
                return bad("metadata object decompresses to more than 256 MiB");
            }
            Ok(out)
        }
        c => bad(format!("unknown codec {c}")),
    }
}

/// A chunk object: the header, then the stored chunk as the local store keeps it.
pub fn chunk_object(stored: &[u8]) -> Vec<u8> {
    let mut v = header_with_room(KIND_CHUNK, CODEC_NONE, stored.len());
    v.extend_from_slice(stored);
    v
}

/// The stored chunk inside a chunk object, verified against `id` (decompressed and hashed);
/// returns (stored encoding, decoded bytes).
pub fn open_chunk(id: &ChunkId, obj: &[u8]) -> Result<(Vec<u8>, Vec<u8>), BadObject> {
    let stored = open(obj, KIND_CHUNK)?;
    match crate::storage::chunk::decode(id, &stored) {
        Ok(data) => Ok((stored, data)),
        Err(_) => bad(format!("chunk {} does not verify", hex(id))),
    }
}

fn compressed(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = header(kind, CODEC_ZSTD);
    match zstd::bulk::compress(payload, 3) {
        Ok(c) => v.extend_from_slice(&c),
        Err(_) => {
            v[6] = CODEC_NONE;
            v.extend_from_slice(payload);
        }
    }
    v
}

/// A metadata object and its name hash.
pub fn sealed_meta(kind: u8, payload: &[u8]) -> (Hash, Vec<u8>) {
    let obj = compressed(kind, payload);
    (*blake3::hash(&obj).as_bytes(), obj)
}

/// Verifies a metadata object against the hash in its name and returns its payload.
pub fn open_meta(hash: &Hash, kind: u8, obj: &[u8]) -> Result<Vec<u8>, BadObject> {
    if blake3::hash(obj).as_bytes() != hash {
        return bad(format!(
            "metadata object {} does not match its name",
            hex(hash)
        ));
    }
    open(obj, kind)
}

pub(crate) fn with_trailer(mut v: Vec<u8>) -> Vec<u8> {
    let sum = *blake3::hash(&v).as_bytes();
    v.extend_from_slice(&sum);
    v
}

pub(crate) fn open_trailed(obj: &[u8], kind: u8) -> Result<Vec<u8>, BadObject> {
    if obj.len() < HEADER_LEN + 32 {
        return bad("object too short");
    }
    let (body, sum) = obj.split_at(obj.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return bad("object checksum does not match (corrupt or truncated)");
    }
    open(body, kind)
}

/// A little-endian writer.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn u16(&mut self, x: u16) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u32(&mut self, x: u32) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn time(&mut self, t: Time) {
        self.u64(t.secs as u64);
        self.u32(t.nanos);
    }
    fn bytes16(&mut self, b: &[u8]) {
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

/// A bounds-checked little-endian reader over untrusted bytes.
struct R<'a> {
    b: &'a [u8],
    o: usize,
}

impl<'a> R<'a> {
    fn new(b: &'a [u8]) -> R<'a> {
        R { b, o: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadObject> {
        if self.b.len() - self.o < n {
            return bad("object truncated");
        }
        let s = &self.b[self.o..self.o + n];
        self.o += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, BadObject> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BadObject> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, BadObject> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, BadObject> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn time(&mut self) -> Result<Time, BadObject> {
        let secs = self.u64()? as i64;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return bad("time with nanoseconds out of range");
        }
        Ok(Time { secs, nanos })
    }
    fn hash(&mut self) -> Result<Hash, BadObject> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
    fn bytes16(&mut self) -> Result<&'a [u8], BadObject> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn bytes32(&mut self) -> Result<&'a [u8], BadObject> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn end(&self) -> Result<(), BadObject> {
        if self.o != self.b.len() {
            return bad("trailing bytes after the object's contents");
        }
        Ok(())
    }
}

/// A name from a backend becomes a directory entry only if it could be one: not empty, not
/// `.` or `..`, no `/` or NUL, at most 255 bytes.
pub fn check_entry_name(name: &[u8]) -> Result<(), BadObject> {
    if name.is_empty() || name == b"." || name == b".." {
        return bad(format!(
            "refused entry name {:?}",
            String::from_utf8_lossy(name)
        ));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return bad(format!(
            "refused entry name {:?}: contains '/' or NUL",
            String::from_utf8_lossy(name)
        ));
    }
    if name.len() > 255 {
        return bad(format!(
            "refused entry name of {} bytes (over 255)",
            name.len()
        ));
    }
    Ok(())
}

/// What an entry holds besides its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// The hash of the directory's tree object.
    Dir(Hash),
    /// The hash of the file's map object; None for a file with no data.
    File(Option<Hash>),
    Symlink(Vec<u8>),
    /// A fifo, socket or device node.
    Special,
}

/// One inode as a tree lists it (and the root, in a marker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: Kind,
    /// The inode number in the snapshot: entries that share it are hard links.
    pub ino: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Body,
}

impl Entry {
    fn write(&self, w: &mut W) {
        w.bytes16(&self.name);
        w.u8(self.kind.to_byte());
        w.u64(self.ino);
        w.u16(self.perm);
        w.u32(self.uid);
        w.u32(self.gid);
        w.u64(self.size);
        w.u32(self.nlink);
        w.u32(self.rdev);
        w.time(self.atime);
        w.time(self.mtime);
        w.time(self.ctime);
        w.u16(self.xattrs.len() as u16);
        for (n, v) in &self.xattrs {
            w.bytes16(n);
            w.bytes32(v);
        }
        match &self.body {
            Body::Dir(h) => w.0.extend_from_slice(h),
            Body::File(Some(h)) => {
                w.u8(1);
                w.0.extend_from_slice(h);
            }
            Body::File(None) => w.u8(0),
            Body::Symlink(t) => w.bytes16(t),
            Body::Special => {}
        }
    }

    fn read(r: &mut R<'_>, root: bool) -> Result<Entry, BadObject> {
        let name = r.bytes16()?.to_vec();
        if !root {
            check_entry_name(&name)?;
        }
        let kind =
            Kind::from_byte(r.u8()?).ok_or_else(|| BadObject("unknown inode kind".into()))?;
        let ino = r.u64()?;
        let perm = r.u16()?;
        if perm > 0o7777 {
            return bad("permission bits out of range");
        }
        let (uid, gid, size, nlink, rdev) = (r.u32()?, r.u32()?, r.u64()?, r.u32()?, r.u32()?);
        let (atime, mtime, ctime) = (r.time()?, r.time()?, r.time()?);
        let nx = r.u16()? as usize;
        if nx > MAX_XATTRS {
            return bad("too many extended attributes");
        }
        let mut xattrs = Vec::with_capacity(nx);
        for _ in 0..nx {
            let n = r.bytes16()?.to_vec();
            if n.is_empty() || n.len() > 255 || n.contains(&0) {
                return bad("refused extended attribute name");
            }
            let v = r.bytes32()?.to_vec();
            if v.len() > 65536 {
                return bad("extended attribute value over 64 KiB");
            }
            xattrs.push((n, v));
        }
        let body = match kind {
            Kind::Dir => Body::Dir(r.hash()?),
            Kind::File => match r.u8()? {
                0 => Body::File(None),
                1 => Body::File(Some(r.hash()?)),
                _ => return bad("bad file body tag"),
            },
            Kind::Symlink => {
                let t = r.bytes16()?.to_vec();
                if t.is_empty() || t.len() >= 4096 || t.contains(&0) {
                    return bad("refused symlink target");
                }
                Body::Symlink(t)
            }
            _ => Body::Special,
        };
        Ok(Entry {
            name,
            kind,
            ino,
            perm,
            uid,
            gid,
            size,
            nlink,
            rdev,
            atime,
            mtime,
            ctime,
            xattrs,
            body,
        })
    }
}

/// A tree object: the entries of one directory, sorted by name (so equal trees hash equally).
pub fn tree_object(entries: &[Entry]) -> (Hash, Vec<u8>) {
    let mut w = W::default();
    w.u32(entries.len() as u32);
    for e in entries {
        e.write(&mut w);
    }
    sealed_meta(KIND_TREE, &w.0)
}

pub fn open_tree(hash: &Hash, obj: &[u8]) -> Result<Vec<Entry>, BadObject> {
    let p = open_meta(hash, KIND_TREE, obj)?;
    let mut r = R::new(&p);
    let n = r.u32()? as usize;
    if n > MAX_ENTRIES {
        return bad("tree with too many entries");
    }
    let mut out: Vec<Entry> = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let e = Entry::read(&mut r, false)?;
        if out.last().is_some_and(|p| p.name >= e.name) {
            return bad("tree entries not sorted or duplicated");
        }
        out.push(e);
    }
    r.end()?;
    Ok(out)
}

/// One chunk of a file map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapItem {
    pub index: u64,
    pub id: ChunkId,
    pub len: u32,
}

pub fn map_object(items: &[MapItem]) -> (Hash, Vec<u8>) {
    let mut w = W::default();
    w.u64(items.len() as u64);
    for m in items {
        w.u64(m.index);
        w.0.extend_from_slice(&m.id);
        w.u32(m.len);
    }
    sealed_meta(KIND_MAP, &w.0)
}

/// A file map, checked: indexes strictly increasing, each length within `chunk_size`.
pub fn open_map(hash: &Hash, obj: &[u8], chunk_size: u32) -> Result<Vec<MapItem>, BadObject> {
    let p = open_meta(hash, KIND_MAP, obj)?;
    let mut r = R::new(&p);
    let n = r.u64()? as usize;
    if n > p.len() / 44 {
        return bad("file map count does not match its size");
    }
    let mut out: Vec<MapItem> = Vec::with_capacity(n);
    for _ in 0..n {
        let m = MapItem {
            index: r.u64()?,
            id: r.hash()?,
            len: r.u32()?,
        };
        if m.len == 0 || m.len > chunk_size {
            return bad("file map entry with a bad length");
        }
        if out.last().is_some_and(|p| p.index >= m.index) {
            return bad("file map indexes not increasing");
        }
        out.push(m);
    }
    r.end()?;
    Ok(out)
}

/// What a completion marker says about a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub name: String,
    pub epoch: u64,
    pub created: Time,
    pub automatic: bool,
    pub chunk_size: u32,
    /// The root directory (its name is empty).
    pub root: Entry,
    pub files: u64,
    pub bytes: u64,
}

pub fn marker_object(m: &Marker) -> Vec<u8> {
    let mut w = W(header(KIND_MARKER, CODEC_NONE));
    w.bytes16(m.name.as_bytes());
    w.u64(m.epoch);
    w.time(m.created);
    w.u8(m.automatic as u8);
    w.u32(m.chunk_size);
    w.u64(m.files);
    w.u64(m.bytes);
    m.root.write(&mut w);
    with_trailer(w.0)
}

pub fn open_marker(obj: &[u8]) -> Result<Marker, BadObject> {
    let p = open_trailed(obj, KIND_MARKER)?;
    let mut r = R::new(&p);
    let name = String::from_utf8(r.bytes16()?.to_vec())
        .map_err(|_| BadObject("snapshot name is not UTF-8".into()))?;
    crate::fs::check_snapshot_name(&name).map_err(BadObject)?;
    let epoch = r.u64()?;
    let created = r.time()?;
    let automatic = r.u8()? != 0;
    let chunk_size = r.u32()?;
    if !(4096..=(16 << 20)).contains(&chunk_size) || !chunk_size.is_power_of_two() {
        return bad("marker with a bad chunk size");
    }
    let files = r.u64()?;
    let bytes = r.u64()?;
    let root = Entry::read(&mut r, true)?;
    if root.kind != Kind::Dir {
        return bad("marker root is not a directory");
    }
    r.end()?;
    Ok(Marker {
        name,
        epoch,
        created,
        automatic,
        chunk_size,
        root,
        files,
        bytes,
    })
}

/// The repository descriptor: format version and chunk size of the store that wrote it.
pub fn repo_object(chunk_size: u32) -> Vec<u8> {
    let mut w = W(header(KIND_REPO, CODEC_NONE));
    w.u32(OBJECT_VERSION as u32);
    w.u32(chunk_size);
    with_trailer(w.0)
}

pub fn open_repo(obj: &[u8]) -> Result<u32, BadObject> {
    let p = open_trailed(obj, KIND_REPO)?;
    let mut r = R::new(&p);
    let version = r.u32()?;
    if version != OBJECT_VERSION as u32 {
        return bad(format!(
            "repository format {version} (this build reads {OBJECT_VERSION})"
        ));
    }
    let chunk_size = r.u32()?;
    r.end()?;
    Ok(chunk_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, body: Body) -> Entry {
        let kind = match body {
            Body::Dir(_) => Kind::Dir,
            Body::File(_) => Kind::File,
            Body::Symlink(_) => Kind::Symlink,
            Body::Special => Kind::Fifo,
        };
        Entry {
            name: name.as_bytes().to_vec(),
            kind,
            ino: 7,
            perm: 0o644,
            uid: 1,
            gid: 2,
            size: 3,
            nlink: 1,
            rdev: 0,
            atime: Time { secs: 1, nanos: 2 },
            mtime: Time { secs: -3, nanos: 4 },
            ctime: Time { secs: 5, nanos: 6 },
            xattrs: vec![(b"user.a".to_vec(), b"v".to_vec())],
            body,
        }
    }

    #[test]
    fn tree_round_trips_and_is_verified() {
        let es = vec![
            entry("a", Body::File(Some([1; 32]))),
            entry("b", Body::Dir([2; 32])),
            entry("c", Body::Symlink(b"../x".to_vec())),
            entry("d", Body::Special),
            entry("e", Body::File(None)),
        ];
        let (h, obj) = tree_object(&es);
        assert_eq!(open_tree(&h, &obj).unwrap(), es);
        assert_eq!(tree_object(&es).0, h, "deterministic");
        let mut bad = obj.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(open_tree(&h, &bad).is_err());
    }

    #[test]
    fn hostile_names_are_refused() {
        for name in ["", ".", "..", "a/b", "a\0b"] {
            let (h, obj) = tree_object(&[entry(name, Body::Special)]);
            assert!(open_tree(&h, &obj).is_err(), "{name:?}");
        }
        let long = "x".repeat(256);
        let (h, obj) = tree_object(&[entry(&long, Body::Special)]);
        assert!(open_tree(&h, &obj).is_err());
        let (h, obj) = tree_object(&[entry("b", Body::Special), entry("a", Body::Special)]);
        assert!(open_tree(&h, &obj).is_err(), "unsorted");
    }

    #[test]
    fn map_and_marker_round_trip() {
        let items = vec![
            MapItem {
                index: 0,
                id: [3; 32],
                len: 4096,
            },
            MapItem {
                index: 5,
                id: [4; 32],
                len: 10,
            },
        ];
        let (h, obj) = map_object(&items);
        assert_eq!(open_map(&h, &obj, 4096).unwrap(), items);
        assert!(
            open_map(&h, &obj, 1024).is_err(),
            "length over the chunk size"
        );
        let m = Marker {
            name: "s1".into(),
            epoch: 9,
            created: Time {
                secs: 10,
                nanos: 11,
            },
            automatic: false,
            chunk_size: 1 << 20,
            root: entry("", Body::Dir([5; 32])),
            files: 2,
            bytes: 3,
        };
        let obj = marker_object(&m);
        assert_eq!(open_marker(&obj).unwrap(), m);
        for i in 0..obj.len() {
            let mut b = obj.clone();
            b[i] ^= 0x40;
            assert!(open_marker(&b).is_err(), "flip at {i}");
        }
        assert!(open_marker(&obj[..obj.len() - 1]).is_err());
        assert_eq!(open_repo(&repo_object(4096)).unwrap(), 4096);
    }

    #[test]
    fn chunk_objects_verify() {
        let data = vec![7u8; 5000];
        let id = crate::storage::chunk::chunk_id(&data);
        let obj = chunk_object(&crate::storage::chunk::encode(&id, &data));
        assert_eq!(open_chunk(&id, &obj).unwrap().1, data);
        assert!(open_chunk(&[0; 32], &obj).is_err());
    }
}
