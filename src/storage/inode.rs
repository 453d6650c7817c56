//! Inode records: the core's attribute type and its byte encoding.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::storage::keys::{le_u32, le_u64, TAG_LIVE};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }

    /// The kind encoded in the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            0 => Kind::File,
            _ => return None,
        })
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    pub fn now() -> Time {
        Time::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Time {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Time {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                // Before 1970. Saturates at i64::MIN seconds: a caller's extreme time (any
                // file owner may set one) must never overflow.
                let d = e.duration();
                let Some(mut secs) = i64::try_from(d.as_secs()).ok().map(|s| -s) else {
                    return Time {
                        secs: i64::MIN,
                        nanos: 0,
                    };
                };
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    let Some(s) = secs.checked_sub(1) else {
                        return Time {
                            secs: i64::MIN,
                            nanos: 0,
                        };
                    };
                    secs = s;
                    nanos = 1_000_000_000 - nanos;
                }
                Time { secs, nanos }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + std::time::Duration::new(self.secs as u64, self.nanos.min(999_999_999))
        } else {
            UNIX_EPOCH - std::time::Duration::from_secs(self.secs.unsigned_abs())
                + std::time::Duration::from_nanos(self.nanos.min(999_999_999) as u64)
        }
    }
}

/// The attributes of one inode, as the core stores and returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Time,
    /// Parent directory (directories only; files can have many parents).
    pub parent: u64,
    /// Target of a symlink; empty for other kinds.
    pub target: Vec<u8>,
}

/// Encoded length of the fixed part of an inode record payload.
const FIXED_LEN: usize = 1 + 2 + 4 + 4 + 8 + 4 + 4 + 4 * 12 + 8 + 4;

impl Attr {
    pub fn new(ino: u64, kind: Kind, perm: u16, uid: u32, gid: u32, now: Time) -> Attr {
        Attr {
            ino,
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            size: 0,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent: 0,
            target: Vec::new(),
        }
    }

    /// Full `st_mode`: type bits and permission bits.
    pub fn mode(&self) -> u32 {
        let t = match self.kind {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        };
        t | self.perm as u32
    }

    /// Number of 512-byte blocks reported by stat (logical, not deduplicated).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(512)
    }

    /// The versioned value: tag byte, then the record (see docs/format.md).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + FIXED_LEN + self.target.len());
        v.push(TAG_LIVE);
        v.push(self.kind.to_byte());
        v.extend_from_slice(&self.perm.to_le_bytes());
        v.extend_from_slice(&self.uid.to_le_bytes());
        v.extend_from_slice(&self.gid.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.nlink.to_le_bytes());
        v.extend_from_slice(&self.rdev.to_le_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            v.extend_from_slice(&t.secs.to_le_bytes());
            v.extend_from_slice(&t.nanos.to_le_bytes());
        }
        v.extend_from_slice(&self.parent.to_le_bytes());
        v.extend_from_slice(&(self.target.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.target);
        v
    }

    /// Decodes a payload (after the tag byte).
    pub fn decode(ino: u64, p: &[u8]) -> Option<Attr> {
        if p.len() < FIXED_LEN {
            return None;
        }
        let kind = Kind::from_byte(p[0])?;
        let mut o = 1;
        let mut take = |n: usize| {
            let s = &p[o..o + n];
            o += n;
            s
        };
        let perm = u16::from_le_bytes(take(2).try_into().ok()?);
        let uid = le_u32(take(4));
        let gid = le_u32(take(4));
        let size = le_u64(take(8));
        let nlink = le_u32(take(4));
        let rdev = le_u32(take(4));
        let mut times = [Time::default(); 4];
        for t in &mut times {
            t.secs = le_u64(take(8)) as i64;
            t.nanos = le_u32(take(4));
        }
        let parent = le_u64(take(8));
        let tlen = le_u32(take(4)) as usize;
        if p.len() != FIXED_LEN + tlen {
            return None;
        }
        let target = p[FIXED_LEN..].to_vec();
        Some(Attr {
            ino,
            kind,
            perm,
            uid,
            gid,
            size,
            nlink,
            rdev,
            atime: times[0],
            mtime: times[1],
            ctime: times[2],
            crtime: times[3],
            parent,
            target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_round_trip() {
        let mut a = Attr::new(5, Kind::Symlink, 0o4755, 1000, 100, Time::now());
        a.target = b"/some/where".to_vec();
        a.size = u64::MAX;
        a.atime = Time {
            secs: -5,
            nanos: 999,
        };
        let enc = a.encode();
        assert_eq!(enc[0], TAG_LIVE);
        assert_eq!(Attr::decode(5, &enc[1..]), Some(a));
        assert_eq!(Attr::decode(5, &enc[1..enc.len() - 1]), None);
    }

    #[test]
    fn time_round_trip() {
        for t in [
            Time { secs: 0, nanos: 0 },
            Time {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            Time {
                secs: -2,
                nanos: 500,
            },
        ] {
            assert_eq!(Time::from_system(t.to_system()), t);
        }
    }
}
