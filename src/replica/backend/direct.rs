//! How `dir:` writes an object's bytes: around the page cache (O_DIRECT) where the
//! filesystem allows it, through it otherwise.
//!
//! A backup object is written once, fsynced at once, and not read again soon. Through the
//! page cache its bytes are copied into freshly allocated cache pages and written back by
//! the fsync; that copy was the largest single cost of replication to `dir:` (46% of the
//! daemon's samples for a 512 MiB upload, `perf`; docs/benchmarks.md, "Replication around
//! the page cache"). O_DIRECT lets the device read the bytes from a bounce buffer
//! instead, and leaves the page cache to the training job's own files.
//!
//! O_DIRECT needs the buffer's address, the length and the file offset aligned to the
//! device's logical block size; 4096 serves every device. So the object's whole blocks
//! are copied, one `PIECE` at a time, into a 4096-aligned bounce buffer (a user-space copy,
//! several times cheaper than the kernel's page-cache copy here) and written directly; the
//! last partial block goes through the page cache. The caller's fsync then makes both
//! durable, exactly as before: O_DIRECT changes where the bytes travel, not what `put`
//! promises.
//!
//! A filesystem that refuses O_DIRECT (EINVAL when it is turned on, or on a direct write:
//! tmpfs on older kernels, some FUSE and network filesystems) gets buffered writes from then
//! on; a write that failed that way is redone buffered from the start of the file.

use std::fs::File;
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::sys;

/// Alignment of bounce buffers, direct write lengths and offsets.
const ALIGN: usize = 4096;
/// Bytes per direct write: one chunk object's whole blocks in one call.
const PIECE: usize = 1 << 20;
/// Bounce buffers kept for reuse (uploaders times members, roughly); more are freed.
const POOL_MAX: usize = 16;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A `PIECE`-sized, `ALIGN`-aligned buffer from the pool, returned to it when dropped.
struct Bounce(Vec<u8>);

impl Bounce {
    fn take() -> Bounce {
        let v = POOL.lock().pop();
        Bounce(v.unwrap_or_else(|| vec![0u8; PIECE + ALIGN]))
    }

    fn aligned(&mut self) -> &mut [u8] {
        let off = self.0.as_ptr().align_offset(ALIGN);
        &mut self.0[off..off + PIECE]
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        let mut pool = POOL.lock();
        if pool.len() < POOL_MAX {
            pool.push(std::mem::take(&mut self.0));
        }
    }
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Writes the concatenation of `parts` to `f`, a new empty file opened for writing at
/// offset 0. `direct` says whether this filesystem still takes O_DIRECT; it is cleared the
/// first time it does not. Does not fsync.
pub fn write_parts(f: &mut File, parts: &[&[u8]], direct: &AtomicBool) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let whole = total / ALIGN * ALIGN;
    if whole == 0 || !direct.load(Ordering::Relaxed) {
        return write_buffered(f, parts);
    }
    let attempt = sys::set_direct(f, true).and_then(|()| write_direct(f, parts, whole));
    match attempt {
        Ok(()) => {
            sys::set_direct(f, false)?;
            write_buffered(f, &after(parts, whole))
        }
        Err(e) if is_einval(&e) => {
            if direct.swap(false, Ordering::Relaxed) {
                log::info!(
                    "this backend directory's filesystem does not take O_DIRECT writes ({e}); \
                     writing through the page cache"
                );
            }
            sys::set_direct(f, false)?;
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            write_buffered(f, parts)
        }
        Err(e) => Err(e),
    }
}

/// The first `whole` bytes of `parts` (a multiple of `ALIGN`), through a bounce buffer.
fn write_direct(f: &mut File, parts: &[&[u8]], whole: usize) -> io::Result<()> {
    let mut bounce = Bounce::take();
    let buf = bounce.aligned();
    let mut src = parts.iter().copied();
    let mut cur: &[u8] = &[];
    let mut left = whole;
    while left > 0 {
        let n = left.min(PIECE);
        let mut filled = 0;
        while filled < n {
            if cur.is_empty() {
                cur = src.next().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "parts shorter than counted")
                })?;
                continue;
            }
            let k = cur.len().min(n - filled);
            buf[filled..filled + k].copy_from_slice(&cur[..k]);
            cur = &cur[k..];
            filled += k;
        }
        // A short direct write leaves an unaligned rest, which fails with EINVAL and is
        // then redone buffered: no byte is lost or written twice in the final file.
        f.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(())
}

/// What is left of `parts` after the first `n` bytes.
fn after<'a>(parts: &[&'a [u8]], mut n: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    for p in parts {
        if n >= p.len() {
            n -= p.len();
        } else {
            out.push(&p[n..]);
            n = 0;
        }
    }
    out
}

/// `write_all` over several buffers with `writev`: no joined copy of the parts.
fn write_buffered(f: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match f.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `parts` with `write_parts` into a new file that already holds `before`
    /// (written buffered); returns the file's bytes.
    fn written(before: &[u8], parts: &[&[u8]], direct: &AtomicBool) -> Vec<u8> {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.write_all(before).unwrap();
        write_parts(&mut f, parts, direct).unwrap();
        f.sync_all().unwrap();
        drop(f);
        std::fs::read(&p).unwrap()
    }

    #[test]
    fn any_split_of_any_length_is_written_whole() {
        let data: Vec<u8> = (0..(3 * PIECE + 5000))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        for len in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            PIECE,
            PIECE + 20,
            3 * PIECE + 5000,
        ] {
            let d = &data[..len];
            for cut in [0, 1, 84, len / 2, len.saturating_sub(1), len] {
                let cut = cut.min(len);
                let parts: [&[u8]; 3] = [&d[..cut], b"", &d[cut..]];
                for direct in [true, false] {
                    let flag = AtomicBool::new(direct);
                    assert_eq!(
                        written(b"", &parts, &flag),
                        d,
                        "len {len} cut {cut} direct {direct}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_refused_direct_write_is_redone_buffered_from_the_start() {
        // A direct write at an unaligned offset fails with EINVAL (ext4, where CI runs), as
        // a filesystem that refuses O_DIRECT would: the file must hold exactly the parts,
        // and the backend write buffered from then on.
        let data: Vec<u8> = (0..2 * ALIGN + 3).map(|i| (i % 251) as u8).collect();
        let direct = AtomicBool::new(true);
        let got = written(b"x", &[&data[..10], &data[10..]], &direct);
        assert_eq!(got, data);
        assert!(
            !direct.load(Ordering::Relaxed),
            "the EINVAL was not taken as a refusal"
        );
    }

    #[test]
    fn after_skips_across_parts() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"defg"];
        assert_eq!(after(&parts, 0).concat(), b"abcdefg");
        assert_eq!(after(&parts, 3).concat(), b"defg");
        assert_eq!(after(&parts, 5).concat(), b"fg");
        assert!(after(&parts, 7).is_empty());
    }
}
