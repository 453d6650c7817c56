use super::*;
use std::os::unix::fs::PermissionsExt;

fn backend() -> (tempfile::TempDir, DirBackend) {
    let t = tempfile::tempdir().unwrap();
    let b = DirBackend::new(&t.path().join("root")).unwrap();
    b.create_root().unwrap();
    (t, b)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn needs_an_absolute_path() {
    let e = DirBackend::new(Path::new("rel/path")).err().unwrap();
    assert!(e.contains("absolute"), "{e}");
}

#[test]
fn round_trip_overwrite_delete() {
    let (_t, b) = backend();
    assert_eq!(b.describe(), format!("dir:{}", b.root().display()));
    assert_eq!(b.get("chunks/ab/abc"), Err(BackendError::NotFound));
    assert!(!b.exists("chunks/ab/abc").unwrap());
    b.put("chunks/ab/abc", b"hello").unwrap();
    assert_eq!(b.get("chunks/ab/abc").unwrap(), b"hello");
    assert!(b.exists("chunks/ab/abc").unwrap());
    b.put("chunks/ab/abc", b"hello").unwrap(); // idempotent
    assert_eq!(b.get("chunks/ab/abc").unwrap(), b"hello");
    b.put("chunks/ab/abc", b"other").unwrap(); // overwrite replaces
    assert_eq!(b.get("chunks/ab/abc").unwrap(), b"other");
    b.put("empty", b"").unwrap();
    assert_eq!(b.get("empty").unwrap(), b"");
    b.delete("chunks/ab/abc").unwrap();
    assert_eq!(b.get("chunks/ab/abc"), Err(BackendError::NotFound));
    b.delete("chunks/ab/abc").unwrap(); // absent: Ok
    b.delete("no/such/dir/x").unwrap();
    // Files 0600, created directories 0700, no temporary file left behind.
    b.put("m/n/o", b"x").unwrap();
    assert_eq!(mode(&b.root().join("m/n/o")), 0o600);
    assert_eq!(mode(&b.root().join("m")), 0o700);
    assert_eq!(mode(&b.root().join("m/n")), 0o700);
    let left: Vec<_> = std::fs::read_dir(b.root().join("m/n"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("o")]);
}

#[test]
fn list_by_prefix() {
    let (_t, b) = backend();
    for n in [
        "chunks/ab/x",
        "chunks/ac/y",
        "chunks/bb/z",
        "snapshots/a",
        "snapshots/b",
        "top",
    ] {
        b.put(n, n.as_bytes()).unwrap();
    }
    assert_eq!(sorted(b.list("").unwrap()).len(), 6);
    assert_eq!(
        sorted(b.list("snapshots/").unwrap()),
        vec!["snapshots/a", "snapshots/b"]
    );
    assert_eq!(
        sorted(b.list("chunks/a").unwrap()),
        vec!["chunks/ab/x", "chunks/ac/y"]
    );
    assert_eq!(sorted(b.list("chunks/").unwrap()).len(), 3);
    assert_eq!(b.list("t").unwrap(), vec!["top"]);
    assert!(b.list("nothing/").unwrap().is_empty());
    assert!(b.list("top/").unwrap().is_empty()); // a file, not a directory
    assert!(b.list("../").is_err());
}

#[test]
fn bad_names_refused() {
    let (_t, b) = backend();
    let long = "a".repeat(256);
    for bad in [
        "../x",
        "/x",
        "a//b",
        "a/./b",
        "a\0b",
        "x/",
        "",
        long.as_str(),
        ".tmp.1.1",
    ] {
        assert!(
            matches!(b.put(bad, b"x"), Err(BackendError::Permanent(_))),
            "{bad:?}"
        );
        assert!(
            matches!(b.get(bad), Err(BackendError::Permanent(_))),
            "{bad:?}"
        );
        assert!(
            matches!(b.exists(bad), Err(BackendError::Permanent(_))),
            "{bad:?}"
        );
        assert!(
            matches!(b.delete(bad), Err(BackendError::Permanent(_))),
            "{bad:?}"
        );
    }
    // Nothing escaped the root.
    assert!(!b.root().parent().unwrap().join("x").exists());
}

#[test]
fn planted_symlinks_are_not_followed() {
    let (t, b) = backend();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(&outside, b.root().join("evil")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), b.root().join("link")).unwrap();

    // A symlinked directory on the way: refused on get, put, exists, list, delete.
    assert!(matches!(
        b.get("evil/secret"),
        Err(BackendError::Permanent(_))
    ));
    assert!(matches!(
        b.put("evil/new", b"x"),
        Err(BackendError::Permanent(_))
    ));
    assert!(!outside.join("new").exists());
    assert!(matches!(
        b.exists("evil/secret"),
        Err(BackendError::Permanent(_))
    ));
    assert!(matches!(
        b.delete("evil/secret"),
        Err(BackendError::Permanent(_))
    ));
    assert!(outside.join("secret").exists());
    assert!(matches!(b.list("evil/"), Err(BackendError::Permanent(_))));
    // The whole listing skips both symlinks.
    b.put("real", b"r").unwrap();
    assert_eq!(b.list("").unwrap(), vec!["real"]);

    // A symlink as an object's own name: not read, not an object, replaced by a put.
    assert!(matches!(b.get("link"), Err(BackendError::Permanent(_))));
    assert!(!b.exists("link").unwrap());
    b.put("link", b"new").unwrap();
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"secret");
    assert_eq!(b.get("link").unwrap(), b"new");
    assert!(std::fs::symlink_metadata(b.root().join("link"))
        .unwrap()
        .is_file());
    b.delete("link").unwrap();
}

#[test]
fn temp_files_and_special_files_not_listed() {
    let (_t, b) = backend();
    b.put("a/b", b"x").unwrap();
    std::fs::write(b.root().join(".tmp.1.2"), b"partial").unwrap();
    std::fs::write(b.root().join("a/.tmp.99.0"), b"partial").unwrap();
    crate::sys::mknod(&b.root().join("fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    std::fs::write(b.root().join("bad name"), b"x").unwrap();
    std::fs::create_dir(b.root().join("bad dir")).unwrap();
    std::fs::write(b.root().join("bad dir/x"), b"x").unwrap();
    assert_eq!(b.list("").unwrap(), vec!["a/b"]);
    assert!(matches!(b.get("fifo"), Err(BackendError::Permanent(_))));
    assert!(!b.exists("fifo").unwrap());
}

#[test]
fn shape_conflicts() {
    let (_t, b) = backend();
    b.put("f", b"file").unwrap();
    assert!(matches!(
        b.put("f/x", b"x"),
        Err(BackendError::Permanent(_))
    ));
    assert_eq!(b.get("f/x"), Err(BackendError::NotFound));
    assert!(!b.exists("f/x").unwrap());
    b.put("d/x", b"x").unwrap();
    assert!(matches!(b.put("d", b"x"), Err(BackendError::Permanent(_))));
    assert_eq!(b.get("d"), Err(BackendError::NotFound));
    assert!(!b.exists("d").unwrap());
    b.delete("d").unwrap();
    assert_eq!(b.get("d/x").unwrap(), b"x");
}

#[test]
fn unusable_root_is_transient() {
    let (_t, b) = backend();
    b.put("x", b"x").unwrap();
    std::fs::remove_dir_all(b.root()).unwrap();
    // Missing root: transient, never NotFound (the disk may not be mounted yet).
    assert!(b.get("x").unwrap_err().is_transient());
    assert!(b.exists("x").unwrap_err().is_transient());
    assert!(b.list("").unwrap_err().is_transient());
    assert!(b.put("x", b"x").unwrap_err().is_transient());
    assert!(!b.root().exists(), "put must not create the root");
    // A file where the root should be: a failure root sees too.
    std::fs::write(b.root(), b"not a dir").unwrap();
    assert!(b.put("x", b"x").unwrap_err().is_transient());
    assert!(b.get("x").unwrap_err().is_transient());
    assert!(b.delete("x").unwrap_err().is_transient());
    std::fs::remove_file(b.root()).unwrap();
    b.create_root().unwrap();
    b.put("x", b"back").unwrap();
    assert_eq!(b.get("x").unwrap(), b"back");
}

#[test]
fn concurrent_puts_of_one_name() {
    let (_t, b) = backend();
    let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100_000]).collect();
    std::thread::scope(|s| {
        for d in &data {
            let b = &b;
            s.spawn(move || {
                for _ in 0..10 {
                    b.put("same/obj", d).unwrap();
                }
            });
        }
    });
    let got = b.get("same/obj").unwrap();
    assert!(data.contains(&got), "a whole object, never a mix");
    assert_eq!(b.list("").unwrap(), vec!["same/obj"]);
}

#[test]
fn put_parts_stores_the_parts_joined() {
    let (_t, b) = backend();
    // Large parts (more than one writev may take), an empty one, and a single byte.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let parts: [&[u8]; 4] = [b"header", &big, b"", b"!"];
    b.put_parts("chunks/ab/parts", &parts).unwrap();
    assert_eq!(b.get("chunks/ab/parts").unwrap(), parts.concat());
    // Replacing with fewer bytes leaves nothing of the longer object.
    b.put_parts("chunks/ab/parts", &[b"ab", b"c"]).unwrap();
    assert_eq!(b.get("chunks/ab/parts").unwrap(), b"abc");
    b.put_parts("chunks/ab/none", &[]).unwrap();
    assert_eq!(b.get("chunks/ab/none").unwrap(), b"");
    assert!(b.put_parts("../x", &[b"a", b"b"]).is_err());
}

#[test]
fn stale_temporary_files_are_swept_by_the_sweep_only() {
    let (_t, b) = backend();
    b.put("chunks/ab/abc", b"x").unwrap();
    let dir = b.root().join("chunks/ab");
    let old = dir.join(format!("{TMP_PREFIX}1.1"));
    let fresh = dir.join(format!("{TMP_PREFIX}1.2"));
    std::fs::write(&old, b"half an upload").unwrap();
    std::fs::write(&fresh, b"an upload in progress").unwrap();
    let two_days = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days)
        .unwrap();
    assert_eq!(
        b.list("chunks/").unwrap(),
        vec!["chunks/ab/abc".to_string()]
    );
    assert!(old.exists(), "a listing deletes nothing");
    assert_eq!(b.sweep_temporaries(&["".into(), "chunks/ab".into()]), 1);
    assert!(!old.exists(), "a day-old temporary file is deleted");
    assert!(fresh.exists(), "a fresh one is an upload in progress: kept");
}
