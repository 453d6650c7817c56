//! The key object of an encrypted backend, `snapfs-key` (docs/replication.md, "Encryption"):
//! a random 32-byte master key, wrapped (XChaCha20-Poly1305) by a key-encryption key derived
//! from a passphrase (Argon2id) or from a key file (blake3 `derive_key`). Changing the
//! passphrase rewrites this object only; no data object is re-encrypted.
//!
//! ```text
//! offset size
//!  0     4   magic "SNPK"
//!  4     1   version (1)
//!  5     1   kdf: 1 Argon2id over a passphrase, 2 blake3 derive_key over a key file
//!  6     2   reserved, zero
//!  8     4   Argon2 memory, KiB, u32 LE (0 for a key file)
//! 12     4   Argon2 passes, u32 LE
//! 16     4   Argon2 lanes, u32 LE
//! 20    16   salt
//! 36    24   nonce
//! 60    48   the master key sealed with the key-encryption key (32 + 16-byte tag);
//!            associated data: bytes 0..36
//! ```

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

pub const KEY_NAME: &str = "snapfs-key";
const MAGIC: &[u8; 4] = b"SNPK";
const LEN: usize = 108;
pub const KDF_ARGON2ID: u8 = 1;
pub const KDF_KEYFILE: u8 = 2;
/// Argon2id parameters of new keys: 64 MiB, 3 passes, 1 lane (OWASP's second choice; about
/// 0.2 s here), so that guessing a passphrase costs 64 MiB-seconds per try.
pub const ARGON2_MEMORY_KIB: u32 = 64 * 1024;
pub const ARGON2_PASSES: u32 = 3;
pub const ARGON2_LANES: u32 = 1;

/// What unlocks the master key.
pub enum Secret {
    Passphrase(Vec<u8>),
    KeyFile(Vec<u8>),
}

impl Secret {
    fn kdf(&self) -> u8 {
        match self {
            Secret::Passphrase(_) => KDF_ARGON2ID,
            Secret::KeyFile(_) => KDF_KEYFILE,
        }
    }
}

pub fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| format!("no random bytes from the system: {e}"))?;
    Ok(b)
}

fn kek(secret: &Secret, salt: &[u8; 16], m: u32, t: u32, p: u32) -> Result<[u8; 32], String> {
    match secret {
        Secret::Passphrase(pw) => {
            let params = argon2::Params::new(m, t, p, Some(32))
                .map_err(|e| format!("bad Argon2 parameters in the key object: {e}"))?;
            let a =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut out = [0u8; 32];
            a.hash_password_into(pw, salt, &mut out)
                .map_err(|e| format!("Argon2id failed: {e}"))?;
            Ok(out)
        }
        Secret::KeyFile(bytes) => {
            let mut h = blake3::Hasher::new_derive_key("snapfs 2026-12 key file");
            h.update(salt);
            h.update(bytes);
            Ok(*h.finalize().as_bytes())
        }
    }
}

/// A key object wrapping `master` under `secret`.
pub fn wrap(master: &[u8; 32], secret: &Secret) -> Result<Vec<u8>, String> {
    let (m, t, p) = match secret {
        Secret::Passphrase(_) => (ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES),
        Secret::KeyFile(_) => (0, 0, 0),
    };
    let salt: [u8; 16] = random()?;
    let nonce: [u8; 24] = random()?;
    let mut out = Vec::with_capacity(LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, secret.kdf(), 0, 0]);
    for x in [m, t, p] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&salt);
    let k = kek(secret, &salt, m, t, p)?;
    let sealed = XChaCha20Poly1305::new(Key::from_slice(&k))
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: master,
                aad: &out[..36],
            },
        )
        .map_err(|_| "sealing the master key failed".to_string())?;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    debug_assert_eq!(out.len(), LEN);
    Ok(out)
}

/// The master key in a key object. A wrong passphrase or key file, and a tampered object,
/// are the same clear error (the AEAD cannot tell them apart).
pub fn unwrap(obj: &[u8], secret: &Secret) -> Result<[u8; 32], String> {
    if obj.len() != LEN || &obj[..4] != MAGIC {
        return Err(format!(
            "{KEY_NAME} on the backend is not a snapfs key object"
        ));
    }
    if obj[4] != 1 {
        return Err(format!(
            "{KEY_NAME} has version {} (this snapfs reads 1)",
            obj[4]
        ));
    }
    if obj[5] != secret.kdf() {
        return Err(match obj[5] {
            KDF_ARGON2ID => "this backend's key is unlocked by a passphrase, not a key file".into(),
            KDF_KEYFILE => {
                "this backend's key is unlocked by a key file (--key-file), not a passphrase".into()
            }
            k => format!("{KEY_NAME}: unknown key derivation {k}"),
        });
    }
    let u = |i: usize| u32::from_le_bytes(obj[i..i + 4].try_into().expect("4 bytes"));
    let (m, t, p) = (u(8), u(12), u(16));
    if obj[5] == KDF_ARGON2ID && (m > 4 << 20 || t > 100 || p > 64) {
        return Err(format!(
            "{KEY_NAME}: Argon2 parameters out of range ({m} KiB, {t} passes, {p} lanes)"
        ));
    }
    let salt: [u8; 16] = obj[20..36].try_into().expect("16 bytes");
    let k = kek(secret, &salt, m, t, p)?;
    let master = XChaCha20Poly1305::new(Key::from_slice(&k))
        .decrypt(
            XNonce::from_slice(&obj[36..60]),
            Payload {
                msg: &obj[60..],
                aad: &obj[..36],
            },
        )
        .map_err(|_| {
            "wrong passphrase or key file for this encrypted backend (or its key object was tampered with)".to_string()
        })?;
    master
        .try_into()
        .map_err(|_| "the master key has a wrong length".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_secrets() {
        let master: [u8; 32] = random().unwrap();
        let f = Secret::KeyFile(b"a key file's bytes".to_vec());
        let obj = wrap(&master, &f).unwrap();
        assert_eq!(unwrap(&obj, &f).unwrap(), master);
        let wrong = Secret::KeyFile(b"another".to_vec());
        assert!(unwrap(&obj, &wrong)
            .unwrap_err()
            .contains("wrong passphrase"));
        let pw = Secret::Passphrase(b"pw".to_vec());
        assert!(unwrap(&obj, &pw).unwrap_err().contains("key file"));
        let mut bad = obj.clone();
        bad[70] ^= 1;
        assert!(unwrap(&bad, &f).is_err());
        let mut bad = obj.clone();
        bad[20] ^= 1; // the salt: another key-encryption key
        assert!(unwrap(&bad, &f).is_err());
        // Passphrases (Argon2id, 64 MiB) round-trip too, and the object is different each time.
        let a = wrap(&master, &pw).unwrap();
        assert_ne!(a, wrap(&master, &pw).unwrap());
        assert_eq!(unwrap(&a, &pw).unwrap(), master);
        assert!(unwrap(&a, &Secret::Passphrase(b"pW".to_vec())).is_err());
    }
}
