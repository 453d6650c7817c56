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

/// Encodes a chunk for storage, compressing it unless that does not pay.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let raw_len = data.len() as u32;
    let worth_trying = if data.len() > SAMPLE_LEN * 2 {
        match zstd::bulk::compress(&data[..SAMPLE_LEN], ZSTD_LEVEL) {
            Ok(c) => c.len() < SAMPLE_LEN * 15 / 16,
            Err(_) => false,
        }
    } else {
        true
    };
    if worth_trying {
        if let Ok(c) = zstd::bulk::compress(data, ZSTD_LEVEL) {
            if c.len() < data.len() * 15 / 16 {
                return with_header(CODEC_ZSTD, raw_len, &c);
            }
        }
    }
    with_header(CODEC_RAW, raw_len, data)
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
    fn wrong_id_is_detected() {
        let enc = encode(b"hello");
        assert_eq!(decode(&chunk_id(b"world"), &enc), Err(FsError::Corrupt));
    }
}
