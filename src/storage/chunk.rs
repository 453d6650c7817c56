//! Sealed chunk bodies: id, compression, header, verification.
//!
//! A chunk value is `version:u8 codec:u8 raw_len:u32le payload`. The id is the blake3 hash of
//! the *uncompressed* bytes and is checked on every read, so a flipped bit anywhere (payload,
//! header, or a wrong value under the key) is reported, never returned.

use crate::error::{FsError, Result};
use crate::storage::keys::ChunkId;

pub const CHUNK_FORMAT_VERSION: u8 = 1;
pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;
pub const HEADER_LEN: usize = 6;

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
pub fn encode(data: &[u8]) -> Vec<u8> {
    let worth_trying = data.len() <= SAMPLE_LEN * 2 || plan_compression(data) != Compression::Never;
    if worth_trying {
        if let Some(c) = compress(data) {
            return c;
        }
    }
    encode_raw(data)
}

/// Encodes a chunk uncompressed.
pub fn encode_raw(data: &[u8]) -> Vec<u8> {
    with_header(CODEC_RAW, data.len() as u32, data)
}

/// Encodes a chunk compressed, or None if compression does not save a sixteenth.
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    let c = zstd::bulk::compress(data, ZSTD_LEVEL).ok()?;
    (c.len() < data.len() * 15 / 16).then(|| with_header(CODEC_ZSTD, data.len() as u32, &c))
}

/// The raw payload of a stored chunk that is uncompressed, or None.
pub fn raw_payload(stored: &[u8]) -> Option<&[u8]> {
    if stored.len() < HEADER_LEN || stored[0] != CHUNK_FORMAT_VERSION || stored[1] != CODEC_RAW {
        return None;
    }
    let raw_len = u32::from_le_bytes(stored[2..6].try_into().expect("4 bytes")) as usize;
    let payload = &stored[HEADER_LEN..];
    (payload.len() == raw_len).then_some(payload)
}

fn with_header(codec: u8, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.push(CHUNK_FORMAT_VERSION);
    v.push(codec);
    v.extend_from_slice(&raw_len.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Verifies a stored chunk against its id without keeping the decoded bytes: a raw chunk
/// is hashed in place (no copy), a compressed one decompressed into a scratch buffer.
pub fn verify(id: &ChunkId, stored: &[u8]) -> Result<()> {
    if stored.len() >= HEADER_LEN && stored[0] == CHUNK_FORMAT_VERSION && stored[1] == CODEC_RAW {
        let raw_len = u32::from_le_bytes(stored[2..6].try_into().expect("4 bytes")) as usize;
        let payload = &stored[HEADER_LEN..];
        if payload.len() == raw_len {
            if chunk_id(payload) == *id {
                return Ok(());
            }
            log::error!(
                "chunk {} failed verification: content hash does not match its id",
                hex(id)
            );
            return Err(FsError::Corrupt);
        }
    }
    decode(id, stored).map(|_| ())
}

/// Decodes a stored chunk and verifies it against its id.
pub fn decode(id: &ChunkId, stored: &[u8]) -> Result<Vec<u8>> {
    let verify = |data: &[u8]| {
        if chunk_id(data) != *id {
            log::error!(
                "chunk {} failed verification: content hash does not match its id",
                hex(id)
            );
            return Err(FsError::Corrupt);
        }
        Ok(())
    };
    // Raw chunks are verified in place, then copied once.
    if stored.len() >= HEADER_LEN && stored[0] == CHUNK_FORMAT_VERSION && stored[1] == CODEC_RAW {
        let raw_len = u32::from_le_bytes(stored[2..6].try_into().expect("4 bytes")) as usize;
        let payload = &stored[HEADER_LEN..];
        if payload.len() == raw_len {
            verify(payload)?;
            return Ok(payload.to_vec());
        }
    }
    let data = decode_unverified(stored)?;
    verify(&data)?;
    Ok(data)
}

fn decode_unverified(stored: &[u8]) -> Result<Vec<u8>> {
    if stored.len() < HEADER_LEN {
        log::error!("chunk value too short ({} bytes)", stored.len());
        return Err(FsError::Corrupt);
    }
    if stored[0] != CHUNK_FORMAT_VERSION {
        log::error!("chunk format version {} is not supported", stored[0]);
        return Err(FsError::Corrupt);
    }
    let raw_len = u32::from_le_bytes(stored[2..6].try_into().expect("4 bytes")) as usize;
    let payload = &stored[HEADER_LEN..];
    match stored[1] {
        CODEC_RAW if payload.len() == raw_len => Ok(payload.to_vec()),
        CODEC_ZSTD => match zstd::bulk::decompress(payload, raw_len) {
            Ok(d) if d.len() == raw_len => Ok(d),
            _ => {
                log::error!("chunk failed to decompress");
                Err(FsError::Corrupt)
            }
        },
        codec => {
            log::error!("chunk has unknown codec {codec} or bad length");
            Err(FsError::Corrupt)
        }
    }
}

/// Length of the stored (possibly compressed) body, from an encoded value.
pub fn stored_len(stored: &[u8]) -> u64 {
    stored.len() as u64
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
        let enc = encode(&data);
        assert_eq!(enc[1], CODEC_ZSTD);
        assert!(enc.len() < 10_000);
        assert_eq!(decode(&chunk_id(&data), &enc).unwrap(), data);
    }

    #[test]
    fn incompressible_stored_raw() {
        let data = pseudo_random(1 << 20, 7);
        let enc = encode(&data);
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
            let enc = encode(&data);
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
        let c = compress(&half).expect("it compresses");
        assert!(c.len() < half.len() * 15 / 16);
        assert_eq!(decode(&chunk_id(&half), &c).unwrap(), half);
        let raw = encode_raw(&half);
        assert_eq!(raw_payload(&raw), Some(&half[..]));
        assert_eq!(raw_payload(&c), None);
    }

    #[test]
    fn wrong_id_is_detected() {
        let enc = encode(b"hello");
        assert_eq!(decode(&chunk_id(b"world"), &enc), Err(FsError::Corrupt));
    }
}
