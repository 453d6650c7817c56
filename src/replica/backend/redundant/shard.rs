//! The shard envelope of a redundant backend (docs/replication.md, "Redundant backends").
//!
//! Member `i` of a redundant backend stores, under the object's own name, one envelope:
//!
//! ```text
//! offset size
//!  0     4   magic "SNPS"
//!  4     1   version (1)
//!  5     1   layout: 1 mirror, 2 erasure-coded
//!  6     1   k: data shards (mirror: 1)
//!  7     1   m: parity shards (mirror: members - 1)
//!  8     1   index of this shard = the member's position in the spec
//!  9     3   reserved, zero
//! 12     8   length of the whole object, u64 LE
//! 20    32   blake3 of the whole object
//! 52    32   blake3 of the payload below
//! 84     -   payload: mirror: the object; ec: shard `index` (data shards are the object's
//!            bytes cut in k pieces of `shard_len`, zero-padded; parity shards come from
//!            Reed-Solomon over GF(2^16), crate reed-solomon-simd)
//! ```
//!
//! A shard is used only if its header matches the layout, its index is its member's, and
//! its payload hashes to `payload_hash`: a corrupt shard is recognised alone, before any
//! reconstruction, so a bad byte is never decoded into an object. The rebuilt object must
//! hash to `object_hash` too.

use std::borrow::Cow;
use std::collections::BTreeMap;

pub const MAGIC: &[u8; 4] = b"SNPS";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 84;
const LAYOUT_MIRROR: u8 = 1;
const LAYOUT_EC: u8 = 2;
/// Reed-Solomon over GF(2^16) in reed-solomon-simd; we keep specs far below its limits.
pub const MAX_MEMBERS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every member stores the whole object.
    Mirror { n: u8 },
    /// k data and m parity shards, one per member; any k rebuild the object.
    Ec { k: u8, m: u8 },
}

impl Layout {
    pub fn members(&self) -> usize {
        match *self {
            Layout::Mirror { n } => n as usize,
            Layout::Ec { k, m } => (k + m) as usize,
        }
    }

    /// How many good shards rebuild an object (and how many must take a write).
    pub fn needed(&self) -> usize {
        match *self {
            Layout::Mirror { .. } => 1,
            Layout::Ec { k, .. } => k as usize,
        }
    }

    fn km(&self) -> (u8, u8) {
        match *self {
            Layout::Mirror { n } => (1, n - 1),
            Layout::Ec { k, m } => (k, m),
        }
    }

    fn code(&self) -> u8 {
        match self {
            Layout::Mirror { .. } => LAYOUT_MIRROR,
            Layout::Ec { .. } => LAYOUT_EC,
        }
    }

    /// Stored bytes per object byte (before envelopes): mirror n, ec (k+m)/k.
    pub fn overhead(&self) -> f64 {
        let (k, m) = self.km();
        (k as f64 + m as f64) / k as f64
    }
}

/// Bytes of each erasure-coded shard for an object of `len` bytes: ceil(len / k), rounded
/// up to even (the codec works on 16-bit symbols), at least 2.
pub fn shard_len(len: u64, k: u8) -> u64 {
    let s = len.div_ceil(k as u64).max(2);
    s + (s & 1)
}

fn header(
    layout: Layout,
    index: usize,
    len: u64,
    hash: &[u8; 32],
    payload_hash: &[u8; 32],
) -> [u8; HEADER_LEN] {
    let (k, m) = layout.km();
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..12].copy_from_slice(&[VERSION, layout.code(), k, m, index as u8, 0, 0, 0]);
    h[12..20].copy_from_slice(&len.to_le_bytes());
    h[20..52].copy_from_slice(hash);
    h[52..84].copy_from_slice(payload_hash);
    h
}

/// The envelopes of one object, one per member, in member order: a header each and a
/// payload that borrows the object wherever it can (a mirror's every payload, an erasure
/// code's data shards that lie wholly inside the object), so that an object is neither
/// copied per member nor hashed more than once per byte (the mirror's payload hash is the
/// object's hash). Members write `parts(i)` with a vectored write.
pub struct Envelopes<'a> {
    headers: Vec<[u8; HEADER_LEN]>,
    payloads: Vec<Cow<'a, [u8]>>,
}

impl Envelopes<'_> {
    /// How many envelopes: one per member.
    pub fn members(&self) -> usize {
        self.headers.len()
    }

    /// Member `i`'s envelope as the header and the payload, to be written one after the other.
    pub fn parts(&self, i: usize) -> [&[u8]; 2] {
        [&self.headers[i], &self.payloads[i]]
    }

    /// Member `i`'s envelope in one buffer.
    pub fn joined(&self, i: usize) -> Vec<u8> {
        self.parts(i).concat()
    }
}

/// One envelope per member, in member order.
pub fn encode(layout: Layout, object: &[u8]) -> Result<Envelopes<'_>, String> {
    let hash = *blake3::hash(object).as_bytes();
    let len = object.len() as u64;
    match layout {
        Layout::Mirror { n } => Ok(Envelopes {
            headers: (0..n as usize)
                .map(|i| header(layout, i, len, &hash, &hash))
                .collect(),
            payloads: vec![Cow::Borrowed(object); n as usize],
        }),
        Layout::Ec { k, m } => {
            let s = shard_len(len, k) as usize;
            let data: Vec<Cow<'_, [u8]>> = (0..k as usize)
                .map(|i| {
                    let from = (i * s).min(object.len());
                    let to = ((i + 1) * s).min(object.len());
                    if to - from == s {
                        Cow::Borrowed(&object[from..to])
                    } else {
                        // The last shards: the object's tail, zero-padded.
                        let mut d = Vec::with_capacity(s);
                        d.extend_from_slice(&object[from..to]);
                        d.resize(s, 0);
                        Cow::Owned(d)
                    }
                })
                .collect();
            let parity = parity(k as usize, m as usize, s, &data)
                .map_err(|e| format!("erasure coding failed: {e}"))?;
            let payloads: Vec<Cow<'_, [u8]>> = data
                .into_iter()
                .chain(parity.into_iter().map(Cow::Owned))
                .collect();
            let headers = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| header(layout, i, len, &hash, blake3::hash(p).as_bytes()))
                .collect();
            Ok(Envelopes { headers, payloads })
        }
    }
}

thread_local! {
    /// Each uploader thread's encoder, reset per object: its work buffers are allocated
    /// once per thread, not once per object.
    static ENCODER: std::cell::RefCell<Option<reed_solomon_simd::ReedSolomonEncoder>> =
        const { std::cell::RefCell::new(None) };
}

/// The m parity shards of k data shards of `s` bytes each.
fn parity(
    k: usize,
    m: usize,
    s: usize,
    data: &[Cow<'_, [u8]>],
) -> Result<Vec<Vec<u8>>, reed_solomon_simd::Error> {
    ENCODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let enc = match slot.as_mut() {
            Some(enc) => {
                enc.reset(k, m, s)?;
                enc
            }
            None => slot.insert(reed_solomon_simd::ReedSolomonEncoder::new(k, m, s)?),
        };
        for d in data {
            enc.add_original_shard(d)?;
        }
        let out = enc.encode()?;
        Ok(out.recovery_iter().map(<[u8]>::to_vec).collect())
    })
}

/// What a member's envelope turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardState {
    Good,
    /// The member has no object of that name.
    Missing,
    /// The member could not be read (down, I/O error): unknown.
    Unreadable(String),
    /// The envelope is there but fails a check: it must be rewritten.
    Bad(String),
}

/// A parsed, verified envelope.
struct Shard<'a> {
    len: u64,
    hash: [u8; 32],
    payload: &'a [u8],
}

fn parse(layout: Layout, index: usize, env: &[u8]) -> Result<Shard<'_>, String> {
    if env.len() < HEADER_LEN {
        return Err(format!("{} bytes, shorter than a shard header", env.len()));
    }
    if &env[..4] != MAGIC {
        return Err("not a shard (bad magic)".into());
    }
    if env[4] != VERSION {
        return Err(format!("shard version {} (this snapfs reads 1)", env[4]));
    }
    let (k, m) = layout.km();
    if env[5] != layout.code() || env[6] != k || env[7] != m {
        return Err(format!(
            "shard of another layout (code {}, k {}, m {})",
            env[5], env[6], env[7]
        ));
    }
    if env[8] as usize != index {
        return Err(format!(
            "shard {} stored where shard {index} belongs",
            env[8]
        ));
    }
    if env[9..12] != [0, 0, 0] {
        return Err("reserved header bytes are not zero".into());
    }
    let len = u64::from_le_bytes(env[12..20].try_into().expect("8 bytes"));
    let hash: [u8; 32] = env[20..52].try_into().expect("32 bytes");
    let payload = &env[HEADER_LEN..];
    let want = match layout {
        Layout::Mirror { .. } => len,
        Layout::Ec { k, .. } => shard_len(len, k),
    };
    if payload.len() as u64 != want {
        return Err(format!(
            "payload of {} bytes where {want} belong",
            payload.len()
        ));
    }
    if blake3::hash(payload).as_bytes() != &env[52..84] {
        return Err("payload fails its blake3 hash".into());
    }
    Ok(Shard { len, hash, payload })
}

/// Checks one member's envelope alone (scrub): Good or Bad.
pub fn check(layout: Layout, index: usize, env: &[u8]) -> ShardState {
    match parse(layout, index, env) {
        Ok(_) => ShardState::Good,
        Err(e) => ShardState::Bad(e),
    }
}

/// What [`decode`] found.
#[derive(Debug)]
pub struct Decoded {
    /// The rebuilt object, if enough good shards agreed and it verified.
    pub object: Option<Vec<u8>>,
    /// Per member: what its envelope was. A shard that verified alone but disagrees with
    /// the rebuilt object (another length or hash) is Bad too.
    pub states: Vec<ShardState>,
}

/// Rebuilds an object from the members' envelopes (`None`: missing; `Err`: unreadable).
pub fn decode(layout: Layout, envs: &[Result<Option<Vec<u8>>, String>]) -> Decoded {
    let n = layout.members();
    let mut states = vec![ShardState::Missing; n];
    let mut good: Vec<(usize, Shard<'_>)> = Vec::new();
    for (i, e) in envs.iter().enumerate().take(n) {
        match e {
            Err(msg) => states[i] = ShardState::Unreadable(msg.clone()),
            Ok(None) => {}
            Ok(Some(env)) => match parse(layout, i, env) {
                Ok(s) => good.push((i, s)),
                Err(msg) => states[i] = ShardState::Bad(msg),
            },
        }
    }
    // Group the good shards by the object they claim to be part of; try the largest group.
    let mut groups: BTreeMap<(u64, [u8; 32]), Vec<usize>> = BTreeMap::new();
    for (pos, (_, s)) in good.iter().enumerate() {
        groups.entry((s.len, s.hash)).or_default().push(pos);
    }
    let mut order: Vec<_> = groups.into_iter().collect();
    order.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
    let mut object = None;
    let mut winner = None;
    for ((len, hash), members) in &order {
        if members.len() < layout.needed() {
            break;
        }
        let shards: Vec<(usize, &[u8])> = members
            .iter()
            .map(|&p| (good[p].0, good[p].1.payload))
            .collect();
        if let Some(obj) = rebuild(layout, *len, &shards) {
            if blake3::hash(&obj).as_bytes() == hash {
                object = Some(obj);
                winner = Some((*len, *hash));
                break;
            }
        }
    }
    for (i, s) in &good {
        states[*i] = match winner {
            Some(w) if w == (s.len, s.hash) => ShardState::Good,
            Some(_) => ShardState::Bad("shard of another version of the object".into()),
            // Nothing rebuilt: a shard that verified alone is still good.
            None => ShardState::Good,
        };
    }
    Decoded { object, states }
}

fn rebuild(layout: Layout, len: u64, shards: &[(usize, &[u8])]) -> Option<Vec<u8>> {
    let len = usize::try_from(len).ok()?;
    match layout {
        Layout::Mirror { .. } => shards.first().map(|(_, p)| p.to_vec()),
        Layout::Ec { k, m } => {
            let k = k as usize;
            let s = shard_len(len as u64, k as u8) as usize;
            let mut data: Vec<Option<&[u8]>> = vec![None; k];
            for &(i, p) in shards {
                if i < k {
                    data[i] = Some(p);
                }
            }
            let restored = if data.iter().all(Option::is_some) {
                BTreeMap::new()
            } else {
                let orig = shards.iter().filter(|(i, _)| *i < k).map(|&(i, p)| (i, p));
                let rec = shards
                    .iter()
                    .filter(|(i, _)| *i >= k)
                    .map(|&(i, p)| (i - k, p));
                reed_solomon_simd::decode(k, m as usize, orig, rec).ok()?
            };
            let mut out = Vec::with_capacity(k * s);
            for (i, d) in data.iter().enumerate() {
                match d {
                    Some(p) => out.extend_from_slice(p),
                    None => out.extend_from_slice(restored.get(&i)?),
                }
            }
            out.truncate(len);
            (out.len() == len).then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(envs: &[Vec<u8>]) -> Vec<Result<Option<Vec<u8>>, String>> {
        envs.iter().map(|e| Ok(Some(e.clone()))).collect()
    }

    fn joined(layout: Layout, obj: &[u8]) -> Vec<Vec<u8>> {
        let e = encode(layout, obj).unwrap();
        (0..e.members()).map(|i| e.joined(i)).collect()
    }

    #[test]
    fn ec_rebuilds_from_any_k_and_never_from_a_bad_shard() {
        let layout = Layout::Ec { k: 4, m: 2 };
        for len in [0usize, 1, 2, 3, 7, 8, 1000, 65_537] {
            let obj: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let envs = joined(layout, &obj);
            assert_eq!(envs.len(), 6);
            assert_eq!(
                decode(layout, &all(&envs)).object.as_deref(),
                Some(&obj[..])
            );
            // Lose any two members: still rebuilt.
            for a in 0..6 {
                for b in a + 1..6 {
                    let mut e = all(&envs);
                    e[a] = Ok(None);
                    e[b] = Err("down".into());
                    let d = decode(layout, &e);
                    assert_eq!(
                        d.object.as_deref(),
                        Some(&obj[..]),
                        "len {len} lost {a},{b}"
                    );
                    assert_eq!(d.states[a], ShardState::Missing);
                    assert!(matches!(d.states[b], ShardState::Unreadable(_)));
                }
            }
            // Two lost and one flipped byte: not rebuildable, and the flip is named.
            let mut e = all(&envs);
            e[0] = Ok(None);
            e[5] = Ok(None);
            let mut bad = envs[2].clone();
            let at = bad.len() - 1;
            bad[at] ^= 1;
            e[2] = Ok(Some(bad));
            let d = decode(layout, &e);
            assert_eq!(d.object, None);
            assert!(matches!(d.states[2], ShardState::Bad(_)), "{:?}", d.states);
        }
    }

    #[test]
    fn a_shard_in_the_wrong_member_or_layout_is_bad() {
        let layout = Layout::Ec { k: 2, m: 1 };
        let envs = joined(layout, b"hello world");
        assert!(matches!(check(layout, 1, &envs[0]), ShardState::Bad(_)));
        assert!(matches!(
            check(Layout::Ec { k: 2, m: 2 }, 0, &envs[0]),
            ShardState::Bad(_)
        ));
        assert_eq!(check(layout, 0, &envs[0]), ShardState::Good);
        assert!(matches!(
            check(layout, 0, &envs[0][..50]),
            ShardState::Bad(_)
        ));
    }

    /// The envelope bytes as docs/replication.md lays them out, built here independently of
    /// `encode`, so a faster encoder can never change the format.
    fn documented(layout: Layout, i: usize, obj: &[u8], payload: &[u8]) -> Vec<u8> {
        let (code, k, m) = match layout {
            Layout::Mirror { n } => (1, 1, n - 1),
            Layout::Ec { k, m } => (2, k, m),
        };
        let mut v = b"SNPS".to_vec();
        v.extend_from_slice(&[1, code, k, m, i as u8, 0, 0, 0]);
        v.extend_from_slice(&(obj.len() as u64).to_le_bytes());
        v.extend_from_slice(blake3::hash(obj).as_bytes());
        v.extend_from_slice(blake3::hash(payload).as_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn envelopes_keep_the_documented_format() {
        let obj: Vec<u8> = (0..10_001u32).map(|i| (i * 13 % 256) as u8).collect();
        let mirror = Layout::Mirror { n: 2 };
        for (i, env) in joined(mirror, &obj).iter().enumerate() {
            assert_eq!(env, &documented(mirror, i, &obj, &obj));
        }
        let ec = Layout::Ec { k: 4, m: 2 };
        let s = shard_len(obj.len() as u64, 4) as usize;
        let mut padded = obj.clone();
        padded.resize(4 * s, 0);
        let envs = joined(ec, &obj);
        for (i, env) in envs.iter().enumerate().take(4) {
            assert_eq!(env, &documented(ec, i, &obj, &padded[i * s..(i + 1) * s]));
        }
        let parity = reed_solomon_simd::encode(4, 2, padded.chunks(s)).unwrap();
        for (j, p) in parity.iter().enumerate() {
            assert_eq!(envs[4 + j], documented(ec, 4 + j, &obj, p));
        }
    }

    #[test]
    fn mirror_reads_any_good_copy() {
        let layout = Layout::Mirror { n: 3 };
        let envs = joined(layout, b"abc");
        let mut e = all(&envs);
        let mut bad = envs[0].clone();
        bad[HEADER_LEN] = b'x';
        e[0] = Ok(Some(bad));
        e[1] = Ok(None);
        let d = decode(layout, &e);
        assert_eq!(d.object.as_deref(), Some(&b"abc"[..]));
        assert!(matches!(d.states[0], ShardState::Bad(_)));
        assert_eq!(d.states[1], ShardState::Missing);
        assert_eq!(d.states[2], ShardState::Good);
        assert!((Layout::Ec { k: 4, m: 2 }.overhead() - 1.5).abs() < 1e-9);
    }
}
