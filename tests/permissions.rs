//! The store is as private as the most private file in it (issue 7, defect 2): under any
//! umask a new store, its database files and its control socket are owner-only; uid 65534
//! can read nothing of them and cannot command the daemon, even through a socket whose mode
//! was opened by mistake; a store others can write is refused, one others can read (older
//! snapfs made them 0755) is tightened.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{bin, Mount};

const NOBODY: &str = "65534";
const SECRET: &str = "snapfs-secret-7c1e0f9a-do-not-leak";

/// Starts `snapfs mount STORE MNT` with the given umask.
fn mount_with_umask(store: &Path, mnt: &Path, umask: &str) -> Mount {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("umask {umask}; exec \"$0\" mount \"$1\" \"$2\""))
        .arg(bin())
        .arg(store)
        .arg(mnt);
    Mount::spawn(cmd, store, mnt)
}

fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv")
}

fn snapfs(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// Every entry below `dir` (and `dir`) with a mode that lets group or others in.
fn too_open(dir: &Path, out: &mut Vec<String>) {
    let md = std::fs::symlink_metadata(dir).unwrap();
    if md.mode() & 0o077 != 0 {
        out.push(format!("{} {:o}", dir.display(), md.mode() & 0o7777));
    }
    if md.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            too_open(&e.unwrap().path(), out);
        }
    }
}

/// A parent that everyone may traverse, so that only the store's own modes protect it.
fn open_parent() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

#[test]
fn store_files_and_socket_are_owner_only_under_any_umask() {
    require_fuse!();
    for umask in ["000", "077", "022"] {
        let t = open_parent();
        let store = t.path().join("store");
        let mnt = t.path().join("mnt");
        let m = mount_with_umask(&store, &mnt, umask);
        let mut f = std::fs::File::create(m.path("secret")).unwrap();
        for _ in 0..2000 {
            f.write_all(SECRET.as_bytes()).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        let o = snapfs(&["snapshot", "create", mnt.to_str().unwrap(), "s1"]);
        assert!(o.status.success(), "{o:?}");

        let mut open = Vec::new();
        too_open(&store, &mut open);
        assert!(
            open.is_empty(),
            "umask {umask}: entries open to others: {open:?}"
        );
        let sock = store.join("control.sock");
        assert_eq!(
            std::fs::symlink_metadata(&sock).unwrap().mode() & 0o777,
            0o600,
            "umask {umask}: socket mode"
        );

        // As nobody: nothing of the store can be read, and the daemon takes no orders.
        let walk = format!(
            "find '{}' -type f -exec cat {{}} + 2>/dev/null; true",
            store.display()
        );
        let o = as_nobody(&["sh", "-c", &walk]);
        assert!(
            o.stdout.is_empty(),
            "umask {umask}: nobody read {} bytes of the store's files",
            o.stdout.len()
        );
        let o = as_nobody(&["grep", "-r", "-a", "-l", SECRET, store.to_str().unwrap()]);
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("store"),
            "umask {umask}: nobody found the secret in {:?}",
            String::from_utf8_lossy(&o.stdout)
        );
        let o = as_nobody(&[
            bin().to_str().unwrap(),
            "snapshot",
            "create",
            store.to_str().unwrap(),
            "by-nobody",
        ]);
        assert!(!o.status.success(), "umask {umask}: nobody took a snapshot");
        let list = snapfs(&["snapshot", "list", store.to_str().unwrap()]);
        assert!(
            !String::from_utf8_lossy(&list.stdout).contains("by-nobody"),
            "umask {umask}: {list:?}"
        );
        m.stop();
    }
}

/// Even with the modes opened by mistake, SO_PEERCRED keeps other users out.
#[test]
fn socket_checks_the_peer_even_when_its_mode_is_open() {
    require_fuse!();
    let t = open_parent();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let m = mount_with_umask(&store, &mnt, "022");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o711)).unwrap();
    let sock = store.join("control.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = as_nobody(&[
        bin().to_str().unwrap(),
        "snapshot",
        "create",
        store.to_str().unwrap(),
        "by-nobody",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "nobody took a snapshot: {err}");
    assert!(err.contains("permission denied"), "{err}");
    let list = snapfs(&["snapshot", "list", store.to_str().unwrap()]);
    assert!(list.status.success());
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("by-nobody"),
        "{list:?}"
    );
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).unwrap();
    m.stop();
}

#[test]
fn a_store_others_can_write_is_refused_and_a_readable_one_tightened() {
    require_fuse!();
    let t = open_parent();
    let store = t.path().join("store");
    let mnt = t.path().join("mnt");
    let m = Mount::start(&store, &mnt);
    std::fs::write(m.path("f"), b"data").unwrap();
    m.stop();

    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = snapfs(&["snapshot", "list", store.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("can be written by other users"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // What an older snapfs left: 0755 directories, 0644 files.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = store.join("db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in std::fs::read_dir(&db).unwrap() {
        let p = e.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let m = Mount::start(&store, &mnt);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    let mut open = Vec::new();
    too_open(&store, &mut open);
    assert!(open.is_empty(), "entries still open to others: {open:?}");
    m.stop();
}
