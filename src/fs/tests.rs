//! POSIX semantics of the core, without a mount.

use super::*;
use crate::storage::inode::Kind;
use crate::storage::store::Store;

const ME: Creds = Creds { uid: 0, gid: 0 };
const CS: usize = 64 * 1024;

fn store(dir: &std::path::Path) -> Store {
    Store::open(dir, true, Some(CS)).unwrap()
}

fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_file(fs: &Fs, parent: u64, name: &str, content: &[u8]) -> u64 {
    let a = fs
        .mknod(parent, name.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
        .unwrap();
    let h = fs.open(a.ino, true).unwrap();
    fs.write(&h, 0, content).unwrap();
    fs.release(&h).unwrap();
    a.ino
}

fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let h = fs.open(ino, false).unwrap();
    let size = fs.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let d = fs.read(&h, out.len() as u64, 100_000).unwrap();
        assert!(!d.is_empty());
        out.extend_from_slice(&d);
    }
    fs.release(&h).unwrap();
    out
}

#[test]
fn write_read_across_chunks_and_remount() {
    let t = tempfile::tempdir().unwrap();
    let content = data(CS * 3 + 777, 1);
    let ino;
    {
        let s = store(t.path());
        ino = write_file(&s.fs, ROOT_INO, "f", &content);
        assert_eq!(read_all(&s.fs, ino), content);
        s.fs.shutdown().unwrap();
    }
    let s = store(t.path());
    assert_eq!(s.fs.lookup(ROOT_INO, b"f").unwrap().ino, ino);
    assert_eq!(read_all(&s.fs, ino), content);
}

#[test]
fn partial_overwrite_and_unaligned_reads() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let mut model = data(CS * 2 + 100, 2);
    let ino = write_file(fs, ROOT_INO, "f", &model);
    let h = fs.open(ino, true).unwrap();
    let patch = data(5000, 3);
    let off = CS - 2000;
    fs.write(&h, off as u64, &patch).unwrap();
    model[off..off + patch.len()].copy_from_slice(&patch);
    // Read before and after sealing.
    assert_eq!(
        &*fs.read(&h, off as u64 - 10, 6000).unwrap(),
        &model[off - 10..off + 5990]
    );
    fs.flush(&h).unwrap();
    assert_eq!(
        &*fs.read(&h, off as u64 - 10, 6000).unwrap(),
        &model[off - 10..off + 5990]
    );
    fs.release(&h).unwrap();
    assert_eq!(read_all(fs, ino), model);
}

#[test]
fn holes_and_truncate() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let a = fs
        .mknod(ROOT_INO, b"sparse", libc::S_IFREG | 0o600, 0, ME)
        .unwrap();
    let h = fs.open(a.ino, true).unwrap();
    fs.write(&h, (CS * 5) as u64, b"tail").unwrap();
    fs.flush(&h).unwrap();
    let all = read_all(fs, a.ino);
    assert_eq!(all.len(), CS * 5 + 4);
    assert!(all[..CS * 5].iter().all(|b| *b == 0));
    // Truncate into the middle of a chunk, then grow: the cut bytes must read as zeros.
    fs.write(&h, 0, &vec![7u8; CS + 10]).unwrap();
    fs.release(&h).unwrap();
    fs.truncate(a.ino, 100).unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().size, 100);
    fs.truncate(a.ino, (CS * 2) as u64).unwrap();
    let all = read_all(fs, a.ino);
    assert_eq!(&all[..100], &[7u8; 100][..]);
    assert!(all[100..].iter().all(|b| *b == 0));
    fs.truncate(a.ino, 0).unwrap();
    assert!(read_all(fs, a.ino).is_empty());
}

#[test]
fn namespace_rules() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    assert_eq!(fs.mkdir(ROOT_INO, b"d", 0o755, ME), Err(FsError::Exists));
    let f = write_file(fs, d.ino, "f", b"hello");
    assert_eq!(fs.rmdir(ROOT_INO, b"d"), Err(FsError::NotEmpty));
    assert_eq!(fs.unlink(ROOT_INO, b"d"), Err(FsError::IsDir));
    assert_eq!(fs.rmdir(d.ino, b"f"), Err(FsError::NotDir));
    assert_eq!(fs.lookup(d.ino, &[b'x'; 256]), Err(FsError::NameTooLong));
    assert_eq!(
        fs.mkdir(ROOT_INO, &[b'x'; 256], 0o755, ME),
        Err(FsError::NameTooLong)
    );
    fs.mkdir(ROOT_INO, &[b'x'; 255], 0o755, ME).unwrap();
    // Hard links.
    let l = fs.link(f, ROOT_INO, b"hard").unwrap();
    assert_eq!(l.nlink, 2);
    fs.unlink(d.ino, b"f").unwrap();
    assert_eq!(fs.getattr(f).unwrap().nlink, 1);
    assert_eq!(read_all(fs, f), b"hello");
    fs.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    // Symlinks.
    let sl = fs.symlink(ROOT_INO, b"sl", b"/target/path", ME).unwrap();
    assert_eq!(sl.kind, Kind::Symlink);
    assert_eq!(fs.readlink(sl.ino).unwrap(), b"/target/path");
    let names: Vec<Vec<u8>> = fs
        .readdir(ROOT_INO)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&b"hard".to_vec()) && names.contains(&b"sl".to_vec()));
    assert_eq!(&names[..2], &[b".".to_vec(), b"..".to_vec()]);
}

#[test]
fn rename_semantics() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let a = write_file(fs, ROOT_INO, "a", b"AAA");
    let b = write_file(fs, ROOT_INO, "b", b"BBB");
    // Replace: b's inode is gone, a's content under the name b.
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0).unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"a"), Err(FsError::NotFound));
    assert_eq!(fs.lookup(ROOT_INO, b"b").unwrap().ino, a);
    assert_eq!(fs.getattr(b), Err(FsError::NotFound));
    // NOREPLACE and EXCHANGE.
    let c = write_file(fs, ROOT_INO, "c", b"CCC");
    assert_eq!(
        fs.rename(ROOT_INO, b"b", ROOT_INO, b"c", ns::RENAME_NOREPLACE),
        Err(FsError::Exists)
    );
    fs.rename(ROOT_INO, b"b", ROOT_INO, b"c", ns::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"c").unwrap().ino, a);
    assert_eq!(fs.lookup(ROOT_INO, b"b").unwrap().ino, c);
    // Directories: into own subtree is refused; move updates nlink and "..".
    let d1 = fs.mkdir(ROOT_INO, b"d1", 0o755, ME).unwrap();
    let d2 = fs.mkdir(d1.ino, b"d2", 0o755, ME).unwrap();
    assert_eq!(
        fs.rename(ROOT_INO, b"d1", d2.ino, b"x", 0),
        Err(FsError::Invalid)
    );
    fs.rename(d1.ino, b"d2", ROOT_INO, b"d2", 0).unwrap();
    assert_eq!(fs.getattr(d1.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 4);
    let dots = fs.readdir(d2.ino).unwrap();
    assert_eq!(dots[1].ino, ROOT_INO);
    // Dir over non-empty dir, file over dir, dir over file.
    write_file(fs, d1.ino, "inner", b"x");
    assert_eq!(
        fs.rename(ROOT_INO, b"d2", ROOT_INO, b"d1", 0),
        Err(FsError::NotEmpty)
    );
    assert_eq!(
        fs.rename(ROOT_INO, b"b", ROOT_INO, b"d2", 0),
        Err(FsError::IsDir)
    );
    assert_eq!(
        fs.rename(ROOT_INO, b"d2", ROOT_INO, b"b", 0),
        Err(FsError::NotDir)
    );
    // Dir over empty dir.
    let e = fs.mkdir(ROOT_INO, b"empty", 0o755, ME).unwrap();
    fs.rename(ROOT_INO, b"d2", ROOT_INO, b"empty", 0).unwrap();
    assert_eq!(fs.getattr(e.ino), Err(FsError::NotFound));
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 4);
}

#[test]
fn unlinked_open_file_lives_until_release() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let content = data(CS * 2, 9);
    let ino = write_file(fs, ROOT_INO, "tmp", &content);
    let h = fs.open(ino, false).unwrap();
    fs.unlink(ROOT_INO, b"tmp").unwrap();
    assert_eq!(&*fs.read(&h, 0, CS as u32).unwrap(), &content[..CS]);
    assert!(fs.counters().chunks >= 2);
    fs.release(&h).unwrap();
    assert_eq!(fs.getattr(ino), Err(FsError::NotFound));
    fs.collect_garbage().unwrap();
    assert_eq!(fs.counters().chunks, 0);
    assert_eq!(fs.counters().referenced_bytes, 0);
}

#[test]
fn orphans_are_cleaned_at_open() {
    let t = tempfile::tempdir().unwrap();
    let ino;
    {
        let s = store(t.path());
        ino = write_file(&s.fs, ROOT_INO, "tmp", &data(CS, 4));
        let h = s.fs.open(ino, false).unwrap();
        s.fs.unlink(ROOT_INO, b"tmp").unwrap();
        // "Crash": the handle is never released.
        std::mem::forget(h);
        s.fs.sync_metadata().unwrap();
    }
    let s = store(t.path());
    assert_eq!(s.fs.getattr(ino), Err(FsError::NotFound));
    s.fs.collect_garbage().unwrap();
    assert_eq!(s.fs.counters().chunks, 0);
}

#[test]
fn dedup_refcounts_and_gc() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let content = data(CS * 4, 5);
    let a = write_file(fs, ROOT_INO, "a", &content);
    let c1 = fs.counters();
    assert_eq!(c1.chunks, 4);
    write_file(fs, ROOT_INO, "b", &content);
    let c2 = fs.counters();
    assert_eq!(c2.chunks, 4, "identical content is stored once");
    assert_eq!(c2.stored_bytes, c1.stored_bytes);
    assert_eq!(c2.referenced_bytes, 2 * c1.referenced_bytes);
    fs.unlink(ROOT_INO, b"a").unwrap();
    fs.collect_garbage().unwrap();
    assert_eq!(fs.counters().chunks, 4, "still referenced by b");
    assert_eq!(fs.getattr(a), Err(FsError::NotFound));
    fs.unlink(ROOT_INO, b"b").unwrap();
    assert_eq!(fs.collect_garbage().unwrap(), 4);
    assert_eq!(fs.counters(), Counters::default());
}

#[test]
fn corrupt_chunk_is_eio_not_data() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let content = data(CS, 6);
    let ino = write_file(fs, ROOT_INO, "f", &content);
    // Overwrite the stored body with a damaged copy under the same id.
    let id = crate::storage::chunk::chunk_id(&content);
    let mut bad = fs.eng.get(Cf::Chunks, &id).unwrap().unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let mut b = crate::storage::engine::Batch::new();
    fs.eng.put(&mut b, Cf::Chunks, &id, &bad);
    fs.eng.write(b, false).unwrap();
    let h = fs.open(ino, false).unwrap();
    assert_eq!(fs.read(&h, 0, 10).err(), Some(FsError::Corrupt));
    assert_eq!(FsError::Corrupt.to_errno(), libc::EIO);
    fs.release(&h).unwrap();
}

/// Bodies of chunk format version 1 (no `check`; stores written before it) still read, verified
/// by their blake3 id; and a good body of another chunk under an id is caught by the read's
/// checksum, which covers the id.
#[test]
fn previous_format_reads_and_a_body_under_the_wrong_key_is_eio() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let (one, two) = (data(CS, 21), data(CS, 22));
    let a = write_file(fs, ROOT_INO, "a", &one);
    let b = write_file(fs, ROOT_INO, "b", &two);
    let put = |id: &[u8; 32], v: &[u8]| {
        let mut batch = crate::storage::engine::Batch::new();
        fs.eng.put(&mut batch, Cf::Chunks, id, v);
        fs.eng.write(batch, false).unwrap();
    };
    let (id1, id2) = (
        crate::storage::chunk::chunk_id(&one),
        crate::storage::chunk::chunk_id(&two),
    );
    let mut v1 = vec![1u8, 0];
    v1.extend_from_slice(&(one.len() as u32).to_le_bytes());
    v1.extend_from_slice(&one);
    put(&id1, &v1);
    assert_eq!(read_all(fs, a), one);
    // A version 1 body that is damaged: its blake3 id catches it.
    let t2 = tempfile::tempdir().unwrap();
    let s2 = store(t2.path());
    let a2 = write_file(&s2.fs, ROOT_INO, "a", &one);
    let mut bad = v1.clone();
    bad[1000] ^= 4;
    let mut batch = crate::storage::engine::Batch::new();
    s2.fs.eng.put(&mut batch, Cf::Chunks, &id1, &bad);
    s2.fs.eng.write(batch, false).unwrap();
    let h2 = s2.fs.open(a2, false).unwrap();
    assert_eq!(s2.fs.read(&h2, 0, 10).err(), Some(FsError::Corrupt));
    s2.fs.release(&h2).unwrap();
    // The intact version 2 body of `one` stored under the id of `two`.
    let good_one = crate::storage::chunk::encode(&id1, &one);
    put(&id2, &good_one);
    let h = fs.open(b, false).unwrap();
    assert_eq!(fs.read(&h, 0, 10).err(), Some(FsError::Corrupt));
    fs.release(&h).unwrap();
}

#[test]
fn xattrs() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let ino = write_file(fs, ROOT_INO, "f", b"x");
    assert_eq!(fs.getxattr(ino, b"user.a"), Err(FsError::NoData));
    fs.setxattr(ino, b"user.a", b"1", 0).unwrap();
    assert_eq!(
        fs.setxattr(ino, b"user.a", b"2", ns::XATTR_CREATE),
        Err(FsError::Exists)
    );
    assert_eq!(
        fs.setxattr(ino, b"user.b", b"2", ns::XATTR_REPLACE),
        Err(FsError::NoData)
    );
    fs.setxattr(ino, b"user.a", b"3", ns::XATTR_REPLACE)
        .unwrap();
    fs.setxattr(ino, b"user.b", b"", 0).unwrap();
    assert_eq!(fs.getxattr(ino, b"user.a").unwrap(), b"3");
    assert_eq!(
        fs.listxattr(ino).unwrap(),
        vec![b"user.a".to_vec(), b"user.b".to_vec()]
    );
    fs.removexattr(ino, b"user.a").unwrap();
    assert_eq!(fs.removexattr(ino, b"user.a"), Err(FsError::NoData));
    assert_eq!(fs.listxattr(ino).unwrap(), vec![b"user.b".to_vec()]);
}

#[test]
fn setattr_mode_owner_times() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let ino = write_file(fs, ROOT_INO, "f", b"abc");
    let when = Time {
        secs: 1_000_000,
        nanos: 5,
    };
    let a = fs
        .setattr(
            ino,
            SetAttr {
                mode: Some(0o4711),
                uid: Some(12),
                gid: Some(34),
                mtime: Some(TimeSet::At(when)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((a.perm, a.uid, a.gid, a.mtime), (0o4711, 12, 34, when));
    assert!(a.ctime > when);
    // Explicit mtime wins over pending buffered writes.
    let h = fs.open(ino, true).unwrap();
    fs.write(&h, 0, b"zzz").unwrap();
    let a = fs
        .setattr(
            ino,
            SetAttr {
                mtime: Some(TimeSet::At(when)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.mtime, when);
    fs.release(&h).unwrap();
    assert_eq!(fs.getattr(ino).unwrap().mtime, when);
}

#[test]
fn sgid_directories_pass_group() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let d = fs
        .mkdir(ROOT_INO, b"g", 0o2775, Creds { uid: 0, gid: 50 })
        .unwrap();
    let f = fs
        .mknod(
            d.ino,
            b"f",
            libc::S_IFREG | 0o644,
            0,
            Creds { uid: 7, gid: 8 },
        )
        .unwrap();
    assert_eq!(f.gid, 50);
    let sub = fs
        .mkdir(d.ino, b"s", 0o755, Creds { uid: 7, gid: 8 })
        .unwrap();
    assert_eq!(sub.gid, 50);
    assert_ne!(sub.perm & libc::S_ISGID as u16, 0);
}

#[test]
fn second_open_of_a_store_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let _s = store(t.path());
    let err = match Store::open(t.path(), true, None) {
        Err(e) => e,
        Ok(_) => panic!("second open succeeded"),
    };
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn foreign_directory_is_not_a_store() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("precious.txt"), b"x").unwrap();
    let err = Store::open(t.path(), true, None).err().unwrap();
    assert!(err.contains("not a snapfs store"), "{err}");
}

#[test]
fn write_path_counts_buffered_bytes() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let a = fs
        .mknod(ROOT_INO, b"f", libc::S_IFREG | 0o644, 0, ME)
        .unwrap();
    let h = fs.open(a.ino, true).unwrap();
    fs.write(&h, 0, &data(CS + 1000, 1)).unwrap();
    let w = fs.write_path();
    assert_eq!(w.open_files, 1, "{w:?}");
    assert_eq!(w.buffered_bytes, 1000, "{w:?}");
    assert_eq!(w.buffered_chunks, 1, "{w:?}");
    fs.fsync(&h).unwrap();
    assert_eq!(fs.write_path().buffered_bytes, 0);
    fs.release(&h).unwrap();
    assert_eq!(fs.write_path().open_files, 0);
}

/// Bytes in the store's WAL files.
fn wal_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("db"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn large_files_write_each_byte_once_and_survive_a_reopen() {
    let t = tempfile::tempdir().unwrap();
    let content = data(CS * 40 + 123, 7);
    let ino;
    {
        let s = store(t.path());
        let before = wal_bytes(t.path());
        let a =
            s.fs.mknod(ROOT_INO, b"big", libc::S_IFREG | 0o644, 0, ME)
                .unwrap();
        ino = a.ino;
        let h = s.fs.open(ino, true).unwrap();
        for (i, part) in content.chunks(100_000).enumerate() {
            s.fs.write(&h, (i * 100_000) as u64, part).unwrap();
        }
        s.fs.fsync(&h).unwrap();
        let logged = wal_bytes(t.path()).saturating_sub(before);
        // The first DEFER_FROM_INDEX chunks and the partial last one go through the WAL;
        // the other 36 full chunks do not.
        let via_wal = (defer::DEFER_FROM_INDEX as usize + 1) * CS;
        assert!(
            logged < (via_wal + CS) as u64,
            "{logged} bytes logged for {} bytes written",
            content.len()
        );
        assert_eq!(s.fs.write_path().parked_chunks, 0);
        assert_eq!(read_all(&s.fs, ino), content);
        s.fs.release(&h).unwrap();
        let r = s.fs.check(true).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.chunks, 41);
        // No shutdown: the next open replays the WAL; the bodies are in blob files.
    }
    let s = store(t.path());
    assert_eq!(read_all(&s.fs, ino), content);
    let r = s.fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.chunks_verified, 41);
}

#[test]
fn a_body_written_ahead_of_a_commit_that_never_came_is_garbage() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    let chunk = data(CS, 3);
    let id = crate::storage::chunk::chunk_id(&chunk);
    // A parked job holds the id: garbage collection leaves marker and body alone.
    fs.lock_meta().unflushed.insert(id, 1);
    fs.write_body_unlogged(&id, &chunk).unwrap();
    fs.eng.flush_chunks().unwrap();
    assert_eq!(fs.collect_garbage().unwrap(), 0);
    assert!(fs.eng.exists(Cf::Chunks, &id).unwrap());
    let r = fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.awaiting_gc, 1);
    // The commit never comes (as after a crash): the body is freed with its marker.
    fs.lock_meta().unflushed.remove(&id);
    fs.collect_garbage().unwrap();
    assert!(!fs.eng.exists(Cf::Chunks, &id).unwrap());
    assert!(!fs.eng.exists(Cf::Meta, &keys::free_key(&id)).unwrap());
    let r = fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.awaiting_gc, 0);
}

#[test]
fn a_body_without_refcount_or_marker_is_still_a_leak() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let chunk = data(CS, 4);
    let id = crate::storage::chunk::chunk_id(&chunk);
    let mut b = crate::storage::engine::Batch::new();
    s.fs.eng.put(
        &mut b,
        Cf::Chunks,
        &id,
        &crate::storage::chunk::encode(&id, &chunk),
    );
    s.fs.eng.write(b, false).unwrap();
    let r = s.fs.check(false).unwrap();
    assert_eq!(r.problem_count, 1, "{:?}", r.problems);
    assert!(r.problems[0].contains("leaked"), "{:?}", r.problems);
}

#[test]
fn the_write_budget_bounds_unsealed_buffers_over_all_files() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fs = &s.fs;
    fs.set_write_budget(3 * CS);
    let mut files = Vec::new();
    for f in 0..3 {
        let a = fs
            .mknod(
                ROOT_INO,
                format!("f{f}").as_bytes(),
                libc::S_IFREG | 0o644,
                0,
                ME,
            )
            .unwrap();
        files.push((a.ino, fs.open(a.ino, true).unwrap()));
    }
    // Partial chunks in new regions of three files: none is full, so no sealer takes them.
    let piece = data(1000, 9);
    for i in 0..8u64 {
        for (_, h) in &files {
            fs.write(h, i * 2 * CS as u64 + 5, &piece).unwrap();
            let w = fs.write_path();
            assert!(w.buffered_chunks <= 3, "{w:?}");
            assert!(w.buffered_bytes <= 3 * 1005, "{w:?}");
        }
    }
    assert_eq!(fs.write_path().budget_bytes, 3 * CS as u64);
    for (ino, h) in &files {
        fs.release(h).unwrap();
        let got = read_all(fs, *ino);
        for i in 0..8usize {
            let at = i * 2 * CS + 5;
            assert_eq!(&got[at..at + 1000], &piece[..], "file {ino}, piece {i}");
            assert!(got[at - 5..at].iter().all(|b| *b == 0));
        }
    }
    assert_eq!(fs.dirty_chunks.load(Ordering::Acquire), 0);
}

/// Bytes that zstd compresses by about a third: every other byte is zero. Such chunks are
/// stored raw on the deferred path and compressed behind the writer.
fn half_zero(n: usize, seed: u64) -> Vec<u8> {
    let mut d = data(n, seed);
    d.iter_mut().step_by(2).for_each(|b| *b = 0);
    d
}

fn compress_all(fs: &Fs) {
    let mut from = vec![keys::P_COMPRESS];
    while let Some(next) = fs.compress_queued(&from, 3).unwrap() {
        from = next;
    }
}

#[test]
fn chunks_stored_raw_are_compressed_behind_the_writer() {
    let t = tempfile::tempdir().unwrap();
    let content = half_zero(CS * 20 + 7, 5);
    let ino;
    {
        let s = store(t.path());
        ino = write_file(&s.fs, ROOT_INO, "ckpt", &content);
        // Chunks 4..20 took the deferred path: stored raw, queued in their commits.
        let w = s.fs.write_path();
        assert_eq!(w.compress_queue_chunks, 16);
        assert_eq!(w.compress_queue_bytes, 16 * CS as u64);
        let before = s.fs.lock_meta().counters.stored_bytes;
        assert!(before > 16 * CS as u64, "{before}");
        let r = s.fs.check(true).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        compress_all(&s.fs);
        let w = s.fs.write_path();
        assert_eq!((w.compress_queue_chunks, w.compress_queue_bytes), (0, 0));
        let after = s.fs.lock_meta().counters.stored_bytes;
        // Each of the 16 chunks saved about a third.
        assert!(
            after + 16 * CS as u64 / 4 < before,
            "stored {before} -> {after}"
        );
        assert_eq!(read_all(&s.fs, ino), content);
        let r = s.fs.check(true).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.chunks_verified, 21);
    }
    // After a reopen (WAL replay): compressed bodies, an empty queue, a clean check.
    let s = store(t.path());
    assert_eq!(s.fs.write_path().compress_queue_chunks, 0);
    assert_eq!(read_all(&s.fs, ino), content);
    let r = s.fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn a_queued_chunk_freed_before_its_compression_is_not_brought_back() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let content = half_zero(CS * 6, 9);
    write_file(&s.fs, ROOT_INO, "tmp", &content);
    let id = crate::storage::chunk::chunk_id(&content[4 * CS..5 * CS]);
    assert!(s.fs.eng.exists(Cf::Meta, &keys::compress_key(&id)).unwrap());
    s.fs.unlink(ROOT_INO, b"tmp").unwrap();
    s.fs.collect_garbage().unwrap();
    assert!(!s.fs.eng.exists(Cf::Chunks, &id).unwrap());
    compress_all(&s.fs);
    assert!(!s.fs.eng.exists(Cf::Chunks, &id).unwrap());
    assert!(!s.fs.eng.exists(Cf::Meta, &keys::compress_key(&id)).unwrap());
    assert_eq!(s.fs.write_path().compress_queue_chunks, 0);
    let r = s.fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.chunks, 0);
}

#[test]
fn the_replicator_compresses_a_queued_chunk_before_its_upload() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let content = half_zero(CS * 6, 13);
    let ino = write_file(&s.fs, ROOT_INO, "f", &content);
    let raw = &content[5 * CS..];
    let id = crate::storage::chunk::chunk_id(raw);
    assert_eq!(s.fs.write_path().compress_queue_chunks, 2);
    let enc =
        s.fs.compress_before_upload(&id)
            .expect("compressed for the upload");
    assert!(enc.len() < CS * 3 / 4, "{}", enc.len());
    assert_eq!(crate::storage::chunk::decode(&id, &enc).unwrap(), raw);
    // The local body is the compressed one now, and the chunk left the queue.
    assert_eq!(s.fs.eng.get(Cf::Chunks, &id).unwrap().unwrap(), enc);
    assert_eq!(s.fs.write_path().compress_queue_chunks, 1);
    assert_eq!(s.fs.compress_before_upload(&id), None);
    assert_eq!(read_all(&s.fs, ino), content);
    let r = s.fs.check(true).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}
