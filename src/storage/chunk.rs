//! Sealed chunk bodies: id, compression, header, verification.
//!
//! A chunk value is `version:u8 codec:u8 raw_len:u32le payload check:u64le` (version 2;
//! version 1, which stores may still hold, has no `check`). The id is the blake3 hash of the
//! *uncompressed* bytes. `check` is xxh3-64 of the 32-byte id followed by everything before
//! `check`: it lets a read through the mount verify the stored bytes and that they are the
//! value of this id (a flipped bit anywhere, or a value under the wrong key, is reported, never
//! returned) at a small fraction of blake3's cost, as ZFS checks each block against a cheap
//! checksum on read. The blake3 id itself is checked wherever bytes come from elsewhere or
//! leave the store: chunks from a backend, before an upload, by scrub and `check`, and by
//! the compressor before it rewrites a body (`decode`, `verify`); and on every read of a
//! version 1 body, which has no `check`.

use crate::error::{FsError, Result};
use crate::storage::keys::ChunkId;

/// The version written; `CHUNK_FORMAT_V1` bodies are still read.
pub const CHUNK_FORMAT_VERSION: u8 = 2;
pub const CHUNK_FORMAT_V1: u8 = 1;
pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;
pub const HEADER_LEN: usize = 6;
/// The `check` field at the end of a version 2 body.
pub const TRAILER_LEN: usize = 8;

/// zstd level: 1 is the fastest level that still finds the redundancy in checkpoints
/// (optimizer state with zeros, repeated tensors); see docs/benchmarks.md.
const ZSTD_LEVEL: i32 = 1;
/// Bytes compressed as a trial before committing to compress a whole chunk.
const SAMPLE_LEN: usize = 64 * 1024;

pub fn chunk_id(data: &[u8]) -> ChunkId {
    *blake3::hash(data).as_bytes()
}

/// What to do with a chunk's compression, judged from a trial on its first `SAMPLE_LEN` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Compress it now: it compresses to half or less (zeros, repeated tensors), which zstd
    /// does fast and which halves what is written.
    Now,
    /// Store it raw now and compress it behind the writer (`fs/compress.rs`): it would save
    /// something, but not enough to pay for zstd on the path to fsync.
    Later,
    /// Do not compress it: it would not save a sixteenth (random data, compressed tensors).
    Never,
}

/// Compresses a sample of the chunk and judges it.
pub fn plan_compression(data: &[u8]) -> Compression {
    let n = data.len().min(SAMPLE_LEN);
    if n == 0 {
        return Compression::Never;
    }
    match zstd::bulk::compress(&data[..n], ZSTD_LEVEL) {
        Ok(c) if c.len() <= n / 2 => Compression::Now,
        Ok(c) if c.len() < n * 15 / 16 => Compression::Later,
        _ => Compression::Never,
    }
}

/// Encodes a chunk for storage, compressing it unless that does not pay.
pub fn encode(id: &ChunkId, data: &[u8]) -> Vec<u8> {
    let worth_trying = data.len() <= SAMPLE_LEN * 2 || plan_compression(data) != Compression::Never;
    if worth_trying {
        if let Some(c) = compress(id, data) {
            return c;
        }
    }
    encode_raw(id, data)
}

/// Encodes a chunk uncompressed.
pub fn encode_raw(id: &ChunkId, data: &[u8]) -> Vec<u8> {
    with_header(id, CODEC_RAW, data.len() as u32, data)
}

/// Encodes a chunk compressed, or None if compression does not save a sixteenth.
pub fn compress(id: &ChunkId, data: &[u8]) -> Option<Vec<u8>> {
    let c = zstd::bulk::compress(data, ZSTD_LEVEL).ok()?;
    (c.len() < data.len() * 15 / 16).then(|| with_header(id, CODEC_ZSTD, data.len() as u32, &c))
}

fn with_header(id: &ChunkId, codec: u8, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    v.push(CHUNK_FORMAT_VERSION);
    v.push(codec);
    v.extend_from_slice(&raw_len.to_le_bytes());
    v.extend_from_slice(payload);
    let check = checksum(id, &v);
    v.extend_from_slice(&check.to_le_bytes());
    v
}

/// The `check` of a version 2 body: xxh3-64 (seed 0) of the id, then the bytes before it.
fn checksum(id: &ChunkId, covered: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(id);
    h.update(covered);
    h.digest()
}

/// The largest uncompressed length a body may declare: the largest chunk size. A larger one
/// (a damaged or forged header) is refused before anything is allocated for it.
pub const MAX_RAW_LEN: usize = 16 << 20;

/// A stored body taken apart, not verified.
struct Parts<'a> {
    version: u8,
    codec: u8,
    raw_len: usize,
    payload: &'a [u8],
}

fn parts(stored: &[u8]) -> Result<Parts<'_>> {
    let version = *stored.first().unwrap_or(&0);
    let trailer = match version {
        CHUNK_FORMAT_V1 => 0,
        CHUNK_FORMAT_VERSION => TRAILER_LEN,
        v => {
            log::error!("chunk format version {v} is not supported");
            return Err(FsError::Corrupt);
        }
    };
    if stored.len() < HEADER_LEN + trailer {
        log::error!("chunk value too short ({} bytes)", stored.len());
        return Err(FsError::Corrupt);
    }
    let raw_len = u32::from_le_bytes(stored[2..6].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_RAW_LEN {
        log::error!("chunk value declares {raw_len} bytes, more than any chunk holds");
        return Err(FsError::Corrupt);
    }
    Ok(Parts {
        version,
        codec: stored[1],
        raw_len,
        payload: &stored[HEADER_LEN..stored.len() - trailer],
    })
}

/// Whether a version 2 body's `check` matches (true for version 1, which has none).
fn check_matches(id: &ChunkId, stored: &[u8], p: &Parts<'_>) -> bool {
    if p.version != CHUNK_FORMAT_VERSION {
        return true;
    }
    let (covered, check) = stored.split_at(stored.len() - TRAILER_LEN);
    checksum(id, covered) == u64::from_le_bytes(check.try_into().expect("8 bytes"))
}

/// The raw payload of a stored chunk that is uncompressed, or None (not verified).
pub fn raw_payload(stored: &[u8]) -> Option<&[u8]> {
    let p = parts(stored).ok()?;
    (p.codec == CODEC_RAW && p.payload.len() == p.raw_len).then_some(p.payload)
}

/// The uncompressed length a stored body declares (not verified).
pub fn raw_len(stored: &[u8]) -> Option<u32> {
    parts(stored).ok().map(|p| p.raw_len as u32)
}

fn corrupt(id: &ChunkId, what: &str) -> FsError {
    log::error!("chunk {} failed verification: {what}", hex(id));
    FsError::Corrupt
}

/// Verifies a stored chunk against its id (the full check: `check`, then blake3 of the
/// uncompressed bytes) without keeping the decoded bytes: a raw chunk is hashed in place, a
/// compressed one decompressed into a scratch buffer.
pub fn verify(id: &ChunkId, stored: &[u8]) -> Result<()> {
    let p = parts(stored)?;
    if p.codec == CODEC_RAW && p.payload.len() == p.raw_len {
        if !check_matches(id, stored, &p) {
            return Err(corrupt(id, "stored bytes do not match their checksum"));
        }
        if chunk_id(p.payload) != *id {
            return Err(corrupt(id, "content hash does not match its id"));
        }
        return Ok(());
    }
    decode(id, stored).map(|_| ())
}

/// Decodes a stored chunk and verifies it fully against its id (`check` and blake3): for
/// bytes from outside the store and for checks of the store itself.
pub fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>> {
    let data = decode_checked(id, stored)?;
    if chunk_id(&data) != *id {
        return Err(corrupt(id, "content hash does not match its id"));
    }
    Ok(data)
}

/// Decodes a body read from the local store for a reader: a version 2 body is verified by
/// its `check` (the stored bytes and the key they are stored under), a version 1 body by its
/// blake3 id.
pub fn decode_local(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>> {
    if stored.first() == Some(&CHUNK_FORMAT_VERSION) {
        decode_checked(id, stored)
    } else {
        decode(id, stored)
    }
}

/// Takes a body apart, checks its `check` if it has one, and decodes its payload.
fn decode_checked(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>> {
    let p = parts(stored)?;
    if !check_matches(id, stored, &p) {
        return Err(corrupt(id, "stored bytes do not match their checksum"));
    }
    match p.codec {
        CODEC_RAW if p.payload.len() == p.raw_len => Ok(p.payload.to_vec()),
        CODEC_ZSTD => match zstd::bulk::decompress(p.payload, p.raw_len) {
            Ok(d) if d.len() == p.raw_len => Ok(d),
            _ => Err(corrupt(id, "it does not decompress")),
        },
        codec => Err(corrupt(
            id,
            &format!("unknown codec {codec} or a bad length"),
        )),
    }
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_round_trip() {
        let data = vec![42u8; 1 << 20];
        let enc = encode(&chunk_id(&data), &data);
        assert_eq!(enc[1], CODEC_ZSTD);
        assert!(enc.len() < 10_000);
        assert_eq!(decode(&chunk_id(&data), &enc).unwrap(), data);
    }

    #[test]
    fn incompressible_stored_raw() {
        let data = pseudo_random(1 << 20, 7);
        let enc = encode(&chunk_id(&data), &data);
        assert_eq!(enc[1], CODEC_RAW);
        assert_eq!(decode(&chunk_id(&data), &enc).unwrap(), data);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        for data in [
            vec![1u8; 300_000],
            pseudo_random(300_000, 3),
            b"tiny".to_vec(),
        ] {
            let id = chunk_id(&data);
            let enc = encode(&chunk_id(&data), &data);
            for pos in [0, 1, 2, 5, HEADER_LEN, enc.len() / 2, enc.len() - 1] {
                let mut bad = enc.clone();
                bad[pos] ^= 0x40;
                assert_eq!(decode(&id, &bad), Err(FsError::Corrupt), "pos {pos}");
            }
        }
    }

    #[test]
    fn compression_is_planned_from_a_sample() {
        assert_eq!(plan_compression(&vec![0u8; 1 << 20]), Compression::Now);
        assert_eq!(
            plan_compression(&pseudo_random(1 << 20, 9)),
            Compression::Never
        );
        // Bytes of which every other one is random: zstd saves about a third, not half.
        let mut half = pseudo_random(1 << 20, 11);
        for b in half.iter_mut().step_by(2) {
            *b = 0;
        }
        let plan = plan_compression(&half);
        assert_eq!(plan, Compression::Later, "{plan:?}");
        let c = compress(&chunk_id(&half), &half).expect("it compresses");
        assert!(c.len() < half.len() * 15 / 16);
        assert_eq!(decode(&chunk_id(&half), &c).unwrap(), half);
        let raw = encode_raw(&chunk_id(&half), &half);
        assert_eq!(raw_payload(&raw), Some(&half[..]));
        assert_eq!(raw_payload(&c), None);
    }

    #[test]
    fn wrong_id_is_detected() {
        let enc = encode(&chunk_id(b"hello"), b"hello");
        assert_eq!(decode(&chunk_id(b"world"), &enc), Err(FsError::Corrupt));
        // The local read path's check covers the id: a value under the wrong key.
        assert_eq!(
            decode_local(&chunk_id(b"world"), &enc),
            Err(FsError::Corrupt)
        );
    }

    #[test]
    fn local_reads_detect_any_flipped_byte_without_blake3() {
        for data in [vec![1u8; 300_000], pseudo_random(300_000, 5)] {
            let id = chunk_id(&data);
            let enc = encode(&id, &data);
            assert_eq!(enc[0], CHUNK_FORMAT_VERSION);
            assert_eq!(decode_local(&id, &enc).unwrap(), data);
            for pos in (0..enc.len()).step_by(997).chain([enc.len() - 1]) {
                let mut bad = enc.clone();
                bad[pos] ^= 0x01;
                assert_eq!(decode_local(&id, &bad), Err(FsError::Corrupt), "pos {pos}");
                assert_eq!(verify(&id, &bad), Err(FsError::Corrupt), "pos {pos}");
            }
        }
    }

    /// Version 1 bodies (no `check`), which older stores and backends hold, still read and
    /// are verified by their blake3 id on every read.
    #[test]
    fn version_1_bodies_still_read_and_verify() {
        let data = pseudo_random(100_000, 13);
        let id = chunk_id(&data);
        let mut v1 = vec![CHUNK_FORMAT_V1, CODEC_RAW];
        v1.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v1.extend_from_slice(&data);
        assert_eq!(decode_local(&id, &v1).unwrap(), data);
        assert_eq!(decode(&id, &v1).unwrap(), data);
        assert_eq!(raw_payload(&v1), Some(&data[..]));
        let mut bad = v1.clone();
        bad[50_000] ^= 1;
        assert_eq!(decode_local(&id, &bad), Err(FsError::Corrupt));
        let z = zstd::bulk::compress(&data, 1).unwrap();
        let mut v1z = vec![CHUNK_FORMAT_V1, CODEC_ZSTD];
        v1z.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v1z.extend_from_slice(&z);
        assert_eq!(decode_local(&id, &v1z).unwrap(), data);
        assert_eq!(raw_payload(&v1z), None);
        assert_eq!(
            decode_local(&id, &[9, 0, 0, 0, 0, 0]),
            Err(FsError::Corrupt)
        );
        // A header that declares more than any chunk holds is refused before decompressing
        // (a forged body must not make a reader allocate 4 GiB).
        let mut huge = v1z.clone();
        huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&id, &huge), Err(FsError::Corrupt));
        assert_eq!(raw_len(&huge), None);
    }
}
