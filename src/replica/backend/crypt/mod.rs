//! Encryption at rest: [`Encrypted`] wraps any backend (plain or redundant) so that the
//! storage side sees neither a byte of data or metadata nor a chunk's id (docs/replication.md,
//! "Encryption").
//!
//! - Two subkeys come from the master key (`key.rs`) by blake3 `derive_key`: one seals
//!   objects, one maps names.
//! - Every object is sealed under a random 24-byte nonce, with AES-256-GCM (alg 2) where the
//!   CPU has AES-NI and CLMUL, else XChaCha20-Poly1305 (alg 1); both are read everywhere.
//!   AES-256-GCM's own nonce is 96 bits, too short to draw at random for billions of
//!   objects, so alg 2 uses a key of its own per object, the keyed blake3 of the 24-byte
//!   nonce (as XChaCha20 does with HChaCha20), and the nonce's first 12 bytes under it. The
//!   associated data is the envelope header and the object's stored name, so an object moved
//!   to another name, truncated or altered fails authentication:
//!   `"SNPE" version:1 alg:1|2 00 00 | nonce[24] | ciphertext | tag[16]`.
//! - Names are keyed and reversible, so a listing can be read back: a chunk id or metadata
//!   hash goes through a 4-round Feistel permutation of its 32 bytes (round function: keyed
//!   blake3), with a different domain for chunks and metadata; a snapshot name is encrypted
//!   deterministically (SIV: a 16-byte keyed hash of the name as IV, XOR with a keyed blake3
//!   stream) and is authenticated by that IV. `snapfs-repository` keeps its name (it is the
//!   same on every repository); its content is sealed like every other object. The storage
//!   side therefore cannot compute the name of a chunk of a file it knows, nor confirm it.
//! - The key object itself, `snapfs-key`, is the only object written in the clear.
//!
//! Listing: for the partition prefixes `chunks/HH/` and `meta/HH/`, a listing returns the
//! objects stored under that part, whose logical names do not start with it (the part is the
//! stored name's); callers that walk all 256 parts (scrub, heal) see every object once.

pub mod key;

use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce as GcmNonce, UnboundKey, AES_256_GCM};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use super::{check_name, Backend, BackendError, Inspection, MemberReport};
use crate::replica::format::{self, hex};

const MAGIC: &[u8; 4] = b"SNPE";
const HEADER: usize = 8;
const NONCE: usize = 24;
const TAG: usize = 16;
/// The `alg` byte: XChaCha20-Poly1305.
const ALG_XCHACHA: u8 = 1;
/// The `alg` byte: AES-256-GCM under a per-object key (see the module's doc).
const ALG_AES_GCM: u8 = 2;
/// Longest snapshot name an encrypted backend stores: its stored form is hex(16 + n) bytes,
/// which must fit a 255-byte component.
pub const MAX_SNAPSHOT_NAME: usize = 111;

pub struct Encrypted {
    inner: Arc<dyn Backend>,
    seal: XChaCha20Poly1305,
    /// The object-encryption subkey: alg 2 derives each object's AES key from it.
    enc: [u8; 32],
    /// The algorithm new objects are sealed with.
    alg: u8,
    names: [u8; 32],
}

/// AES-256-GCM where the CPU runs it in hardware (AES-NI and carry-less multiply: about 4x
/// XChaCha20-Poly1305's speed here, docs/design.md "Why these crypto crates");
/// XChaCha20-Poly1305 elsewhere, where software AES would be slower and harder to keep
/// constant-time.
fn preferred_alg() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
        {
            return ALG_AES_GCM;
        }
    }
    ALG_XCHACHA
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn bad(name: &str) -> BackendError {
    BackendError::Permanent(format!(
        "{name:?} is not a name snapfs writes to an encrypted backend"
    ))
}

impl Encrypted {
    pub fn new(inner: Arc<dyn Backend>, master: &[u8; 32]) -> Encrypted {
        let enc = blake3::derive_key("snapfs 2026-12 object encryption", master);
        let names = blake3::derive_key("snapfs 2026-12 object names", master);
        Encrypted {
            inner,
            seal: XChaCha20Poly1305::new(Key::from_slice(&enc)),
            enc,
            alg: preferred_alg(),
            names,
        }
    }

    /// `Encrypted::new` sealing new objects with `alg` (tests: both algorithms on any CPU).
    #[cfg(test)]
    fn with_alg(inner: Arc<dyn Backend>, master: &[u8; 32], alg: u8) -> Encrypted {
        Encrypted {
            alg,
            ..Encrypted::new(inner, master)
        }
    }

    /// Alg 2's cipher for one object: AES-256-GCM under the keyed blake3 of its nonce.
    fn object_aes(&self, nonce: &[u8; NONCE]) -> Result<LessSafeKey, ()> {
        let mut h = blake3::Hasher::new_keyed(&self.enc);
        h.update(b"snapfs aes-256-gcm object key");
        h.update(nonce);
        let key = UnboundKey::new(&AES_256_GCM, h.finalize().as_bytes()).map_err(|_| ())?;
        Ok(LessSafeKey::new(key))
    }

    /// Alg 2's 96-bit GCM nonce: the first 12 bytes of the object's nonce (its key is its own).
    fn gcm_nonce(nonce: &[u8; NONCE]) -> GcmNonce {
        GcmNonce::assume_unique_for_key(nonce[..12].try_into().expect("12 bytes"))
    }

    /// Seals `buf` in place under `alg`; returns the tag.
    fn seal_in_place(
        &self,
        alg: u8,
        nonce: &[u8; NONCE],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG], ()> {
        let tag = match alg {
            ALG_AES_GCM => self
                .object_aes(nonce)?
                .seal_in_place_separate_tag(Self::gcm_nonce(nonce), Aad::from(aad), buf)
                .map_err(|_| ())?
                .as_ref()
                .try_into()
                .map_err(|_| ())?,
            _ => self
                .seal
                .encrypt_in_place_detached(XNonce::from_slice(nonce), aad, buf)
                .map_err(|_| ())?
                .into(),
        };
        Ok(tag)
    }

    /// Opens `buf` (the ciphertext) in place under `alg`; false if it fails authentication.
    fn open_in_place(
        &self,
        alg: u8,
        nonce: &[u8; NONCE],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG],
    ) -> bool {
        match alg {
            ALG_AES_GCM => self.object_aes(nonce).is_ok_and(|k| {
                k.open_in_place_separate_tag(Self::gcm_nonce(nonce), Aad::from(aad), tag, buf)
                    .is_ok()
            }),
            ALG_XCHACHA => self
                .seal
                .decrypt_in_place_detached(
                    XNonce::from_slice(nonce),
                    aad,
                    buf,
                    chacha20poly1305::Tag::from_slice(tag),
                )
                .is_ok(),
            _ => false,
        }
    }

    fn round(&self, domain: u8, i: u8, half: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.names);
        h.update(&[b'F', domain, i]);
        h.update(half);
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    fn permute(&self, domain: u8, x: &[u8; 32], forward: bool) -> [u8; 32] {
        let (mut l, mut r): ([u8; 16], [u8; 16]) = (
            x[..16].try_into().expect("16"),
            x[16..].try_into().expect("16"),
        );
        if forward {
            for i in 0..4 {
                let f = self.round(domain, i, &r);
                let nl = r;
                for (a, b) in l.iter_mut().zip(f) {
                    *a ^= b;
                }
                r = l;
                l = nl;
            }
        } else {
            for i in (0..4).rev() {
                let f = self.round(domain, i, &l);
                let nr = l;
                for (a, b) in r.iter_mut().zip(f) {
                    *a ^= b;
                }
                l = r;
                r = nr;
            }
        }
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&l);
        out[16..].copy_from_slice(&r);
        out
    }

    fn stream(&self, iv: &[u8], n: usize) -> Vec<u8> {
        let mut h = blake3::Hasher::new_keyed(&self.names);
        h.update(b"S");
        h.update(iv);
        let mut out = vec![0u8; n];
        h.finalize_xof().fill(&mut out);
        out
    }

    fn name_iv(&self, name: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.names);
        h.update(b"s");
        h.update(name);
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    /// The name an object is stored under.
    pub fn stored_name(&self, name: &str) -> Result<String, BackendError> {
        check_name(name)?;
        if name == format::REPO_NAME || name.starts_with(format::PRUNE_PREFIX) {
            return Ok(name.to_string());
        }
        for (top, domain) in [("chunks/", b'c'), ("meta/", b'm')] {
            if let Some(rest) = name.strip_prefix(top) {
                let id = rest
                    .rsplit_once('/')
                    .and_then(|(_, h)| unhex32(h))
                    .ok_or_else(|| bad(name))?;
                let h = hex(&self.permute(domain, &id, true));
                return Ok(format!("{top}{}/{h}", &h[..2]));
            }
        }
        if let Some(snap) = name.strip_prefix("snapshots/") {
            let n = snap.as_bytes();
            if n.len() > MAX_SNAPSHOT_NAME {
                return Err(BackendError::Permanent(format!(
                    "snapshot name {snap:?} is longer than the {MAX_SNAPSHOT_NAME} bytes an encrypted backend stores"
                )));
            }
            let iv = self.name_iv(n);
            let mut ct = self.stream(&iv, n.len());
            for (c, b) in ct.iter_mut().zip(n) {
                *c ^= b;
            }
            return Ok(format!("snapshots/{}{}", hex(&iv), hex(&ct)));
        }
        Err(bad(name))
    }

    /// The logical name of a stored one; None for what this layer did not write.
    pub fn logical_name(&self, stored: &str) -> Option<String> {
        if stored == format::REPO_NAME || stored.starts_with(format::PRUNE_PREFIX) {
            return Some(stored.to_string());
        }
        for (top, domain) in [("chunks/", b'c'), ("meta/", b'm')] {
            if let Some(rest) = stored.strip_prefix(top) {
                let (part, h) = rest.rsplit_once('/')?;
                let p = unhex32(h)?;
                if part != &h[..2] {
                    return None;
                }
                let id = hex(&self.permute(domain, &p, false));
                return Some(format!("{top}{}/{id}", &id[..2]));
            }
        }
        let raw = unhex(stored.strip_prefix("snapshots/")?)?;
        if raw.len() < 16 {
            return None;
        }
        let (iv, ct) = raw.split_at(16);
        let mut n = self.stream(iv, ct.len());
        for (a, b) in n.iter_mut().zip(ct) {
            *a ^= b;
        }
        if self.name_iv(&n) != iv {
            return None; // not ours, or forged
        }
        let n = String::from_utf8(n).ok()?;
        let logical = format!("snapshots/{n}");
        check_name(&logical).ok()?;
        Some(logical)
    }

    fn seal_object(&self, stored: &str, data: &[u8]) -> Result<Vec<u8>, BackendError> {
        let nonce: [u8; NONCE] = key::random().map_err(BackendError::Transient)?;
        let mut out = Vec::with_capacity(HEADER + NONCE + data.len() + TAG);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[1, self.alg, 0, 0]);
        out.extend_from_slice(&nonce);
        let mut aad = out[..HEADER].to_vec();
        aad.extend_from_slice(stored.as_bytes());
        // Encrypted in place in the object's buffer: ciphertext then tag, without a second
        // buffer for the ciphertext.
        out.extend_from_slice(data);
        let tag = self
            .seal_in_place(self.alg, &nonce, &aad, &mut out[HEADER + NONCE..])
            .map_err(|()| BackendError::Permanent("encryption failed".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    fn open_object(&self, stored: &str, logical: &str, obj: &[u8]) -> Result<Vec<u8>, String> {
        if obj.len() < HEADER + NONCE + TAG || &obj[..4] != MAGIC {
            return Err(format!(
                "{logical} (stored as {stored}) is not an encrypted snapfs object"
            ));
        }
        let alg = obj[5];
        if obj[4] != 1 || obj[6..8] != [0, 0] || !matches!(alg, ALG_XCHACHA | ALG_AES_GCM) {
            return Err(format!(
                "{logical}: unknown encryption version or algorithm"
            ));
        }
        let mut aad = obj[..HEADER].to_vec();
        aad.extend_from_slice(stored.as_bytes());
        let nonce: [u8; NONCE] = obj[HEADER..HEADER + NONCE].try_into().expect("24 bytes");
        let (body, tag) = obj[HEADER + NONCE..].split_at(obj.len() - HEADER - NONCE - TAG);
        let tag: [u8; TAG] = tag.try_into().expect("16 bytes");
        let mut plain = body.to_vec();
        if self.open_in_place(alg, &nonce, &aad, &mut plain, &tag) {
            Ok(plain)
        } else {
            Err(format!(
                "{logical} (stored as {stored}) fails authentication: altered, moved, or sealed with another key"
            ))
        }
    }
}

impl Backend for Encrypted {
    fn describe(&self) -> String {
        format!("{} (encrypted)", self.inner.describe())
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        let stored = self.stored_name(name)?;
        let obj = self.seal_object(&stored, data)?;
        self.inner.put(&stored, &obj)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        let stored = self.stored_name(name)?;
        let obj = self.inner.get(&stored)?;
        self.open_object(&stored, name, &obj)
            .map_err(BackendError::Permanent)
    }

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        self.inner.exists(&self.stored_name(name)?)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let partition = ["chunks/", "meta/"].iter().any(|t| {
            prefix
                .strip_prefix(t)
                .is_some_and(|r| r.len() == 3 && r.ends_with('/'))
        });
        let (inner_prefix, filter) = if partition {
            (prefix.to_string(), false)
        } else {
            match prefix.find('/') {
                Some(i) => (prefix[..=i].to_string(), true),
                None => (String::new(), true),
            }
        };
        let mut out = Vec::new();
        for s in self.inner.list(&inner_prefix)? {
            if s == key::KEY_NAME {
                continue;
            }
            match self.logical_name(&s) {
                Some(l) if !filter || l.starts_with(prefix) => out.push(l),
                Some(_) => {}
                None => log::warn!(
                    "{}: skipping {s:?}: not an object of this encrypted repository",
                    self.describe()
                ),
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        self.inner.delete(&self.stored_name(name)?)
    }

    fn members(&self) -> Vec<MemberReport> {
        self.inner.members()
    }

    fn needs_heal(&self) -> bool {
        self.inner.needs_heal()
    }

    fn sweep_temporaries(&self, dirs: &[String]) -> u64 {
        // Stored names have the same shape as logical ones: the same directories hold them.
        self.inner.sweep_temporaries(dirs)
    }

    fn mark_needs_heal(&self, known_missing: bool) {
        self.inner.mark_needs_heal(known_missing)
    }

    fn heal(&self, prefixes: &[String]) -> Result<u64, BackendError> {
        // Stored names have the same shape as logical ones: the same parts cover them.
        self.inner.heal(prefixes)
    }

    fn inspect(&self, name: &str, repair: bool) -> Result<Inspection, BackendError> {
        let stored = self.stored_name(name)?;
        let mut ins = self.inner.inspect(&stored, repair)?;
        if let Some(obj) = ins.object.take() {
            match self.open_object(&stored, name, &obj) {
                Ok(plain) => ins.object = Some(plain),
                Err(e) => ins.error = Some(e),
            }
        }
        Ok(ins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::backend::mem::MemBackend;

    #[test]
    fn names_are_keyed_reversible_and_objects_authenticated() {
        let mem = Arc::new(MemBackend::new());
        let e = Encrypted::new(mem.clone(), &[7u8; 32]);
        let id = [0xabu8; 32];
        let chunk = format::chunk_name(&id);
        let meta = format::meta_name(&id);
        for n in [
            &chunk,
            &meta,
            &"snapshots/ckpt-100".to_string(),
            &format::REPO_NAME.to_string(),
        ] {
            let s = e.stored_name(n).unwrap();
            assert_eq!(
                e.logical_name(&s).as_deref(),
                Some(n.as_str()),
                "{n} -> {s}"
            );
            check_name(&s).unwrap();
        }
        let s = e.stored_name(&chunk).unwrap();
        assert!(!s.contains(&hex(&id)), "the id shows in {s}");
        assert_ne!(
            e.stored_name(&chunk).unwrap()[7..],
            e.stored_name(&meta).unwrap()[5..]
        );
        let other = Encrypted::new(mem.clone(), &[8u8; 32]);
        assert_ne!(
            other.stored_name(&chunk).unwrap(),
            s,
            "names depend on the key"
        );
        assert!(e
            .stored_name(&format!("snapshots/{}", "x".repeat(112)))
            .is_err());
        assert!(e.stored_name("chunks/ab/xyz").is_err());

        e.put(&chunk, b"secret chunk bytes").unwrap();
        e.put("snapshots/s1", b"marker").unwrap();
        assert_eq!(e.get(&chunk).unwrap(), b"secret chunk bytes");
        let raw = mem.get(&s).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        let mut names = e.list("").unwrap();
        names.sort();
        assert_eq!(names, vec![chunk.clone(), "snapshots/s1".to_string()]);
        assert_eq!(
            e.list("snapshots/").unwrap(),
            vec!["snapshots/s1".to_string()]
        );
        let part = format!("chunks/{}/", &s[7..9]);
        assert_eq!(e.list(&part).unwrap(), vec![chunk.clone()]);
        // Another key reads nothing; a flipped byte or a moved object fails authentication.
        assert!(other.get(&chunk).is_err());
        let mut bad = raw.clone();
        bad[40] ^= 1;
        mem.put(&s, &bad).unwrap();
        let err = e.get(&chunk).unwrap_err().to_string();
        assert!(err.contains("fails authentication"), "{err}");
        let s1 = e.stored_name("snapshots/s1").unwrap();
        mem.put(&s, &mem.get(&s1).unwrap()).unwrap();
        assert!(
            e.get(&chunk).is_err(),
            "an object moved to another name must not open"
        );
    }

    #[test]
    fn both_algorithms_seal_and_open_everywhere() {
        let mem = Arc::new(MemBackend::new());
        let master = [9u8; 32];
        let aes = Encrypted::with_alg(mem.clone(), &master, ALG_AES_GCM);
        let xc = Encrypted::with_alg(mem.clone(), &master, ALG_XCHACHA);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for (i, (writer, reader)) in [(&aes, &xc), (&xc, &aes), (&aes, &aes)].iter().enumerate() {
            let name = format::chunk_name(&[i as u8; 32]);
            writer.put(&name, &data).unwrap();
            assert_eq!(reader.get(&name).unwrap(), data, "case {i}");
            let raw = mem.get(&writer.stored_name(&name).unwrap()).unwrap();
            assert_eq!(raw[5], writer.alg, "the header names the algorithm");
            assert_eq!(raw.len(), HEADER + NONCE + data.len() + TAG);
            // Every single-byte change anywhere fails authentication, never returns bytes:
            // the header (algorithm byte included), the nonce, the ciphertext, the tag; and so
            // does naming the other algorithm in the header.
            let mut damaged: Vec<(String, Vec<u8>)> =
                [0, 5, HEADER, HEADER + 23, HEADER + NONCE + 5000]
                    .into_iter()
                    .chain([raw.len() - 1])
                    .map(|at| {
                        let mut bad = raw.clone();
                        bad[at] ^= 0x10;
                        (format!("byte {at} flipped"), bad)
                    })
                    .collect();
            let mut other = raw.clone();
            other[5] = ALG_AES_GCM + ALG_XCHACHA - raw[5];
            damaged.push(("the other algorithm named".into(), other));
            let stored = writer.stored_name(&name).unwrap();
            for (what, bad) in damaged {
                mem.put(&stored, &bad).unwrap();
                assert!(
                    reader.get(&name).is_err(),
                    "case {i}: {what}, and it opened"
                );
            }
            mem.put(&stored, &raw).unwrap();
        }
    }

    #[test]
    fn aes_gcm_objects_are_the_documented_construction() {
        // Built independently of `seal_in_place`: key = keyed blake3 (key: the object
        // subkey) of the label and the 24-byte nonce; AES-256-GCM nonce = its first 12 bytes;
        // associated data = the 8 header bytes, then the stored name (docs/replication.md).
        let mem = Arc::new(MemBackend::new());
        let master = [3u8; 32];
        let e = Encrypted::with_alg(mem.clone(), &master, ALG_AES_GCM);
        let name = format::chunk_name(&[0x42; 32]);
        e.put(&name, b"checkpoint bytes").unwrap();
        let stored = e.stored_name(&name).unwrap();
        let raw = mem.get(&stored).unwrap();
        let sub = blake3::derive_key("snapfs 2026-12 object encryption", &master);
        let mut h = blake3::Hasher::new_keyed(&sub);
        h.update(b"snapfs aes-256-gcm object key");
        h.update(&raw[HEADER..HEADER + NONCE]);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, h.finalize().as_bytes()).unwrap());
        let mut aad = raw[..HEADER].to_vec();
        aad.extend_from_slice(stored.as_bytes());
        // Ciphertext and tag as one buffer, opened with the other entry point.
        let mut in_out = raw[HEADER + NONCE..].to_vec();
        let nonce: [u8; 12] = raw[HEADER..HEADER + 12].try_into().unwrap();
        let plain = key
            .open_in_place(
                GcmNonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut in_out,
            )
            .expect("the documented construction opens it");
        assert_eq!(plain, b"checkpoint bytes");
        assert_eq!(&raw[..8], b"SNPE\x01\x02\x00\x00");
    }
}
