//! Replication end to end, through the CLI and a real mount, against `dir:` and against a
//! real Garage server on 127.0.0.1 (tools/garage.sh, started by tools/test.sh; without it the
//! Garage tests are skipped with a message, except in CI, where they fail).
//!
//! - the disaster drill: a checkpoint-like tree, snapshot, `snapshot wait`, kill -9, the
//!   store deleted, `recover`, mount, every file compared (content, modes, owners, times,
//!   links, xattrs);
//! - the backend away for a while and back: writers go on, `status` shows the lag and the
//!   error, replication resumes, nothing is lost;
//! - the daemon killed mid-replication: the next daemon uploads what was missing, and at most
//!   the in-flight chunks again (the count is printed);
//! - a chunk corrupted in the local store before upload: not uploaded, reported;
//! - manifests are incremental: one changed file in a 10,000-file tree uploads O(depth)
//!   metadata objects (the counts are printed).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, cli, seeded_bytes as bytes, Mount};
use snapfs::replica::backend::config::{new_config, open};
use snapfs::replica::backend::Backend;

/// Where the tests replicate to.
#[derive(Clone)]
enum Target {
    Dir(PathBuf),
    S3 {
        spec: String,
        endpoint: String,
        region: String,
    },
}

impl Target {
    fn spec(&self) -> String {
        match self {
            Target::Dir(p) => format!("dir:{}", p.display()),
            Target::S3 { spec, .. } => spec.clone(),
        }
    }

    /// SPEC and its options, for every command that takes one.
    fn args(&self) -> Vec<String> {
        match self {
            Target::Dir(_) => vec![self.spec()],
            Target::S3 {
                spec,
                endpoint,
                region,
            } => vec![
                spec.clone(),
                "--endpoint".into(),
                endpoint.clone(),
                "--region".into(),
                region.clone(),
            ],
        }
    }

    fn backend(&self) -> Box<dyn Backend> {
        let (endpoint, region) = match self {
            Target::Dir(_) => (None, None),
            Target::S3 {
                endpoint, region, ..
            } => (Some(endpoint.as_str()), Some(region.as_str())),
        };
        let cfg = new_config("t", 1, &self.spec(), endpoint, region, None, &|k| {
            std::env::var(k).ok()
        })
        .unwrap();
        open(&cfg).unwrap()
    }

    fn chunk_objects(&self) -> usize {
        self.backend().list("chunks/").unwrap().len()
    }
}

/// Held by every test that uses Garage: the outage test stops the shared server.
static GARAGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The Garage target for `test`, or None (skipped, said so) outside CI without Garage.
fn garage(test: &str) -> Option<Target> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Some(endpoint) = var("SNAPFS_TEST_S3_ENDPOINT") else {
        if var("CI").as_deref() == Some("true") {
            panic!("{test}: Garage was not started (SNAPFS_TEST_S3_ENDPOINT unset in CI)");
        }
        println!("{test}: skipped: SNAPFS_TEST_S3_ENDPOINT not set (tools/garage.sh start DIR)");
        return None;
    };
    assert!(
        endpoint.starts_with("http://127.0.0.1:"),
        "only 127.0.0.1: {endpoint}"
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let bucket = var("SNAPFS_TEST_S3_BUCKET").expect("SNAPFS_TEST_S3_BUCKET");
    Some(Target::S3 {
        spec: format!("s3://{bucket}/{test}-{}-{nanos}", std::process::id()),
        endpoint,
        region: var("AWS_REGION").unwrap_or_else(|| "garage".into()),
    })
}

fn garage_ctl(what: &str) {
    let sh = std::env::var("SNAPFS_TEST_GARAGE_SH").expect("SNAPFS_TEST_GARAGE_SH");
    let dir = std::env::var("SNAPFS_TEST_GARAGE_DIR").expect("SNAPFS_TEST_GARAGE_DIR");
    let st = Command::new(sh).arg(what).arg(dir).status().unwrap();
    assert!(st.success(), "garage.sh {what} failed");
}

/// A free port on 127.0.0.1 (bound and released: the daemon binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET /metrics from a daemon's `--metrics-addr`.
fn scrape(port: u16) -> String {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert!(s.starts_with("HTTP/1.1 200"), "{s}");
    s
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

fn mount(store: &Path, mnt: &Path, t: &Target, extra: &[&str]) -> Mount {
    let mut cmd = Command::new(bin());
    cmd.arg("mount").arg(store).arg(mnt).arg("--replicate");
    cmd.args(t.args()).args(extra);
    Mount::spawn(cmd, store, mnt)
}

/// Runs the CLI; panics with its stderr unless it succeeds.
fn ok(args: &[&str]) -> String {
    let (good, out, err) = cli(args);
    assert!(good, "snapfs {args:?} failed: {err}");
    out
}

fn status(mnt: &Path) -> serde_json::Value {
    let out = ok(&["status", mnt.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["backends"][0].clone()
}

fn snapshot_and_wait(mnt: &Path, name: &str) {
    let m = mnt.to_str().unwrap();
    ok(&["snapshot", "create", m, name]);
    ok(&["snapshot", "wait", m, name, "--timeout", "180s"]);
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let st = Command::new("setfattr")
        .arg("-n")
        .arg(name)
        .arg("-v")
        .arg(format!(
            "0x{}",
            value.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ))
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "setfattr {}", p.display());
}

/// A checkpoint-like tree: shards in nested directories, metadata, a symlink, a hard link,
/// xattrs, odd modes and owners. About `mib` MiB.
fn write_tree(root: &Path, mib: usize, seed: u64) {
    fs::create_dir_all(root.join("ckpt/step-100/shards")).unwrap();
    fs::create_dir_all(root.join("data/tokenized")).unwrap();
    let shard = (mib << 20) / 4;
    for i in 0..4u64 {
        let p = root.join(format!("ckpt/step-100/shards/rank{i}.safetensors"));
        let mut f = fs::File::create(&p).unwrap();
        // An odd size: the last chunk is short.
        f.write_all(&bytes(seed * 10 + i, shard + 12_345 * i as usize))
            .unwrap();
        f.sync_all().unwrap();
    }
    fs::write(root.join("ckpt/step-100/.metadata"), b"{\"step\": 100}\n").unwrap();
    fs::write(
        root.join("data/tokenized/index.json"),
        bytes(seed + 99, 10_000),
    )
    .unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("ckpt/step-100", root.join("latest")).unwrap();
    fs::hard_link(
        root.join("ckpt/step-100/.metadata"),
        root.join("data/metadata-link"),
    )
    .unwrap();
    set_xattr(&root.join("ckpt/step-100/.metadata"), "user.step", b"100");
    set_xattr(&root.join("data"), "user.owner", &[0, 1, 2, 255]);
    fs::set_permissions(
        root.join("data/tokenized/index.json"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::chown(root.join("empty"), Some(1234), Some(5678)).unwrap();
    // Times in the past, with nanoseconds.
    let st = Command::new("touch")
        .args(["-h", "-d", "2024-03-01 12:34:56.123456789"])
        .arg(root.join("latest"))
        .arg(root.join("empty"))
        .status()
        .unwrap();
    assert!(st.success());
}

fn xattrs(p: &Path) -> Vec<(String, String)> {
    let out = Command::new("getfattr")
        .args(["-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
        .arg(p)
        .output()
        .unwrap();
    let mut v: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

/// Everything a restore must reproduce, per path: kind, mode, owner, size, mtime, link
/// count, symlink target, xattrs, blake3 of the content; and which paths share an inode.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == ".snapshots" {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let body = if ft.is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                blake3::hash(&fs::read(&p).unwrap()).to_hex().to_string()
            } else {
                stack.push(p.clone());
                String::new()
            };
            let link = if ft.is_file() && md.nlink() > 1 {
                let first = inodes.entry(md.ino()).or_insert_with(|| rel.clone());
                format!(" hardlink-of {first}")
            } else {
                String::new()
            };
            let line = format!(
                "mode {:o} uid {} gid {} size {} mtime {}.{:09} nlink {} {:?} {body}{link}",
                md.mode(),
                md.uid(),
                md.gid(),
                if ft.is_dir() { 0 } else { md.size() },
                md.mtime(),
                md.mtime_nsec(),
                if ft.is_dir() { 0 } else { md.nlink() },
                xattrs(&p)
            );
            out.insert(rel, line);
        }
    }
    out
}

fn assert_same(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) {
    for (k, v) in a {
        assert_eq!(b.get(k), Some(v), "{k} differs");
    }
    for k in b.keys() {
        assert!(a.contains_key(k), "{k} appeared");
    }
}

fn drill(t: Target, mib: usize) {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let m = mount(&store, &mnt, &t, &[]);
    write_tree(&mnt, mib, 1);
    let before = manifest(&mnt);
    snapshot_and_wait(&mnt, "ckpt-100");
    let s = status(&mnt);
    assert_eq!(s["pending_chunks"], 0, "{s}");
    println!(
        "drill {}: window {} s, efficiency {} B/s",
        t.spec(),
        s["backup_window_seconds"],
        s["backup_efficiency_bytes_per_sec"]
    );
    let created = |mnt: &Path| {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["snapshot", "list", mnt.to_str().unwrap(), "--json"]))
                .unwrap();
        let v = v.get("snapshots").cloned().unwrap_or(v);
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].clone(),
                    s["created"].clone(),
                    s["created_unix"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let times = created(&mnt);
    assert_eq!(times.len(), 1, "{times:?}");
    // The disk is lost: kill -9, and the store is gone.
    m.kill();
    fs::remove_dir_all(&store).unwrap();
    // Instant recovery: the snapshot served straight from the backend, read-only.
    let mnt_from = tmp.path().join("from");
    let mut cmd = Command::new(bin());
    cmd.args(["mount", "--from"]).args(t.args());
    cmd.args([
        "--snapshot",
        "ckpt-100",
        "--cache-size",
        "16MiB",
        "--cache-dir",
    ]);
    cmd.arg(tmp.path()).arg(&mnt_from);
    let from = Mount::spawn(cmd, &tmp.path().join("from-store"), &mnt_from);
    assert_same(&before, &manifest(&mnt_from));
    let e = fs::write(from.path("new"), b"x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(30),
        "a --from mount is read-only: {e}"
    );
    from.stop();
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("snapfs-from-"))
        .collect();
    assert!(left.is_empty(), "the temporary store was not removed");
    let store2 = tmp.path().join("store2");
    let mut args = vec!["recover", "--from"];
    let targs = t.args();
    args.extend(targs.iter().map(String::as_str));
    args.push(store2.to_str().unwrap());
    println!("{}", ok(&args));
    let m = Mount::start(&store2, &mnt);
    assert_same(&before, &manifest(&mnt));
    let list = ok(&["snapshot", "list", mnt.to_str().unwrap()]);
    assert!(list.contains("ckpt-100"), "{list}");
    // The snapshot keeps the time it was taken, not the time it was recovered.
    assert_eq!(
        created(&mnt),
        times,
        "recover changed the snapshot's creation time"
    );
    // The snapshot view holds the same tree.
    assert_same(&before, &manifest(&mnt.join(".snapshots/ckpt-100")));
    m.stop();
}

#[test]
fn disaster_drill_dir() {
    let tmp = tempfile::tempdir().unwrap();
    drill(Target::Dir(tmp.path().join("backend")), 200);
}

#[test]
fn disaster_drill_garage() {
    let _one = GARAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = garage("disaster_drill_garage") {
        drill(t, 200);
    }
}

/// The backend goes away for a while and comes back.
fn outage(t: Target, down: impl Fn(), up: impl Fn()) {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let port = free_port();
    let m = mount(
        &store,
        &mnt,
        &t,
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    fs::write(m.path("before"), bytes(5, 3 << 20)).unwrap();
    snapshot_and_wait(&mnt, "s0");
    down();
    // Writers go on while the backend is away.
    let start = Instant::now();
    let data = bytes(6, 32 << 20);
    let mut f = fs::File::create(m.path("during")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let took = start.elapsed();
    let mnt_s = mnt.to_str().unwrap();
    ok(&["snapshot", "create", mnt_s, "s1"]);
    // status shows the lag and the error meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = status(&mnt);
        if !s["last_error"].is_null() || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "outage {}: write of 32 MiB took {took:?}; status while down: {s}",
        t.spec()
    );
    assert!(s["pending_chunks"].as_u64().unwrap() > 0, "{s}");
    assert!(s["oldest_pending_seconds"].as_f64().is_some(), "{s}");
    assert!(!s["last_error"].is_null(), "no error reported: {s}");
    let text = scrape(port);
    assert!(
        metric(&text, "snapfs_backend_pending_chunks{backend=\"backup\"}") > 0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "snapfs_backend_failing{backend=\"backup\"}"),
        1.0,
        "{text}"
    );
    assert!(metric(&text, "snapfs_disk_free_bytes") > 0.0, "{text}");
    let (good, _, err) = cli(&["snapshot", "wait", mnt_s, "s1", "--timeout", "2s"]);
    assert!(!good, "wait returned 0 while the backend was down");
    assert!(err.contains("timed out"), "{err}");
    up();
    ok(&["snapshot", "wait", mnt_s, "s1", "--timeout", "180s"]);
    assert_eq!(status(&mnt)["pending_chunks"], 0);
    let text = scrape(port);
    assert_eq!(
        metric(&text, "snapfs_backend_pending_chunks{backend=\"backup\"}"),
        0.0
    );
    assert_eq!(
        metric(&text, "snapfs_backend_failing{backend=\"backup\"}"),
        0.0
    );
    let before = manifest(&mnt);
    m.stop();
    // Nothing lost: the backend alone rebuilds it.
    fs::remove_dir_all(&store).unwrap();
    let store2 = tmp.path().join("store2");
    let mut args = vec!["recover", "--from"];
    let targs = t.args();
    args.extend(targs.iter().map(String::as_str));
    args.push(store2.to_str().unwrap());
    ok(&args);
    let m = Mount::start(&store2, &mnt);
    assert_same(&before, &manifest(&mnt));
    m.stop();
}

#[test]
fn dir_backend_outage_then_back() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("backend");
    let away = tmp.path().join("backend.away");
    let (r1, a1) = (root.clone(), away.clone());
    outage(
        Target::Dir(root),
        move || fs::rename(&r1, &a1).unwrap(),
        move || fs::rename(&away, tmp.path().join("backend")).unwrap(),
    );
}

#[test]
fn garage_outage_then_back() {
    let _one = GARAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = garage("garage_outage_then_back") {
        outage(t, || garage_ctl("stop"), || garage_ctl("start"));
    }
}

#[test]
fn kill_mid_replication_resumes_without_reuploading() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let t = Target::Dir(tmp.path().join("backend"));
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    // 16 MiB/s: 96 MiB take about 6 s to upload.
    let m = mount(&store, &mnt, &t, &["--limit", "16MiB/s"]);
    fs::write(m.path("ckpt"), bytes(7, 96 << 20)).unwrap();
    ok(&["snapshot", "create", mnt.to_str().unwrap(), "s1"]);
    std::thread::sleep(Duration::from_secs(2));
    let present = t.chunk_objects();
    m.kill();
    let total_expected = 96;
    assert!(
        present > 0 && present < total_expected,
        "{present} of {total_expected} chunks were up when the daemon was killed"
    );
    let m = Mount::start(&store, &mnt);
    ok(&[
        "snapshot",
        "wait",
        mnt.to_str().unwrap(),
        "s1",
        "--timeout",
        "180s",
    ]);
    let s = status(&mnt);
    let second_run = s["uploaded_chunks"].as_u64().unwrap() as usize;
    let total = t.chunk_objects();
    let again = second_run.saturating_sub(total - present);
    println!(
        "killed with {present} of {total} chunks uploaded; the next daemon uploaded {second_run}: \
         {again} of them again (in flight at the kill)"
    );
    assert_eq!(total, total_expected);
    assert!(
        again <= 2 * snapfs::replica::lane::CONCURRENCY + 2,
        "{again} uploaded twice"
    );
    m.stop();
}

#[test]
fn corrupt_chunk_is_not_uploaded() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("backend");
    let t = Target::Dir(root.clone());
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let m = mount(&store, &mnt, &t, &[]);
    // The backend is away, so the chunks stay queued; the store is then closed cleanly
    // (bodies flushed to blob files) and one body is damaged on disk.
    let away = tmp.path().join("backend.away");
    fs::rename(&root, &away).unwrap();
    let data = bytes(8, 4 << 20);
    fs::write(m.path("f"), &data).unwrap();
    ok(&["snapshot", "create", mnt.to_str().unwrap(), "s1"]);
    m.stop();
    let needle = &data[(2 << 20) + 1000..(2 << 20) + 1064];
    let hit = common::corrupt_blob(&store, needle);
    assert!(hit, "the chunk's bytes were not found in any blob file");
    fs::rename(&away, &root).unwrap();
    let m = Mount::start(&store, &mnt);
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = status(&mnt);
        let done = s["bad_chunks"].as_u64().unwrap_or(0) > 0 && s["pending_chunks"] == 0;
        if done || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("status after the damaged chunk: {s}");
    assert_eq!(s["bad_chunks"], 1, "{s}");
    assert!(
        s["last_error"].as_str().unwrap().contains("verification"),
        "{s}"
    );
    let bad_id = blake3::hash(&data[2 << 20..3 << 20]).to_hex().to_string();
    let name = format!("chunks/{}/{bad_id}", &bad_id[..2]);
    assert!(
        !t.backend().exists(&name).unwrap(),
        "the damaged chunk was uploaded"
    );
    assert_eq!(t.chunk_objects(), 3, "the three good chunks are uploaded");
    let (good, _, _) = cli(&[
        "snapshot",
        "wait",
        mnt.to_str().unwrap(),
        "s1",
        "--timeout",
        "3s",
    ]);
    assert!(
        !good,
        "a snapshot that needs a damaged chunk must not complete"
    );
    // It does not hold back a later snapshot that does not need that chunk.
    fs::remove_file(m.path("f")).unwrap();
    fs::write(m.path("g"), bytes(9, 2 << 20)).unwrap();
    snapshot_and_wait(&mnt, "s2");
    m.kill();
}

#[test]
fn manifests_are_incremental() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let t = Target::Dir(tmp.path().join("backend"));
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let m = mount(&store, &mnt, &t, &[]);
    // 10,000 files, 100 directories of 100, under two levels.
    for d in 0..100 {
        let dir = m.path(&format!("top/d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}")).unwrap();
        }
    }
    snapshot_and_wait(&mnt, "s1");
    fs::write(m.path("top/d042/f007"), b"changed").unwrap();
    snapshot_and_wait(&mnt, "s2");
    let s = status(&mnt);
    let snap = |n: &str| {
        s["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()
            .clone()
    };
    let (s1, s2) = (snap("s1"), snap("s2"));
    println!(
        "10,000 files: s1 uploaded {} metadata objects; s2 (one file changed at depth 3) \
         uploaded {} and found {} already there",
        s1["meta_objects_uploaded"], s2["meta_objects_uploaded"], s2["meta_objects_skipped"]
    );
    assert!(s1["meta_objects_uploaded"].as_u64().unwrap() >= 10_000);
    // The changed file's map and the three trees on its path (d042, top, root).
    assert_eq!(s2["meta_objects_uploaded"], 4, "{s2}");
    m.stop();
}

/// A backend is untrusted: forged names, damaged objects and moved markers are refused with
/// an error naming the object, and nothing is written outside the new store.
#[test]
fn recover_refuses_a_hostile_backend() {
    use snapfs::replica::format::{self, Body, Entry, MapItem, Marker};
    use snapfs::storage::inode::{Kind, Time};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("backend");
    fs::create_dir(&root).unwrap();
    let t = Target::Dir(root.clone());
    let b = t.backend();
    let entry = |name: &[u8], kind: Kind, body: Body| Entry {
        name: name.to_vec(),
        kind,
        ino: 9,
        perm: 0o644,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 1,
        rdev: 0,
        atime: Time::default(),
        mtime: Time::default(),
        ctime: Time::default(),
        xattrs: vec![],
        body,
    };
    let marker = |name: &str, tree: format::Hash| Marker {
        name: name.into(),
        epoch: 1,
        created: Time::default(),
        automatic: false,
        chunk_size: 1 << 20,
        root: entry(b"", Kind::Dir, Body::Dir(tree)),
        files: 1,
        bytes: 0,
    };
    b.put(format::REPO_NAME, &format::repo_object(1 << 20))
        .unwrap();
    let recover = |what: &str| {
        let dest = tmp.path().join(format!("new-{what}"));
        let (good, _, err) = cli(&["recover", "--from", &t.spec(), dest.to_str().unwrap()]);
        assert!(!good, "{what}: recover succeeded");
        assert!(
            !dest.exists(),
            "{what}: a partial store was left at {}",
            dest.display()
        );
        println!("{what}: {err}");
        err
    };
    // 1. A tree entry named "../evil".
    let (h, obj) = format::tree_object(&[entry(b"../evil", Kind::File, Body::File(None))]);
    b.put(&format::meta_name(&h), &obj).unwrap();
    b.put(
        &format::marker_name("s1"),
        &format::marker_object(&marker("s1", h)),
    )
    .unwrap();
    assert!(recover("dotdot").contains("refused entry name"));
    assert!(!tmp.path().join("evil").exists());
    // 2. A file whose chunk object is damaged.
    let data = bytes(3, 5000);
    let id = *blake3::hash(&data).as_bytes();
    let mut chunk = format::chunk_object(&snapfs::storage::chunk::encode(&id, &data));
    let mid = chunk.len() / 2;
    chunk[mid] ^= 1;
    b.put(&format::chunk_name(&id), &chunk).unwrap();
    let (mh, mobj) = format::map_object(&[MapItem {
        index: 0,
        id,
        len: 5000,
    }]);
    b.put(&format::meta_name(&mh), &mobj).unwrap();
    let mut f = entry(b"f", Kind::File, Body::File(Some(mh)));
    f.size = 5000;
    let (h, obj) = format::tree_object(&[f]);
    b.put(&format::meta_name(&h), &obj).unwrap();
    b.put(
        &format::marker_name("s1"),
        &format::marker_object(&marker("s1", h)),
    )
    .unwrap();
    assert!(recover("damaged chunk").contains("does not verify"));
    // 2b. Other bytes under this chunk's name whose cheap checksum is right (it is keyless:
    // anyone can compute it): only the blake3 id tells, and recover refuses them.
    let forged = format::chunk_object(&snapfs::storage::chunk::encode(&id, &bytes(4, 5000)));
    b.put(&format::chunk_name(&id), &forged).unwrap();
    assert!(recover("forged chunk").contains("does not verify"));
    // 3. A tree object that does not match its name.
    let mut obj2 = obj.clone();
    obj2[10] ^= 1;
    b.put(&format::meta_name(&h), &obj2).unwrap();
    assert!(recover("damaged tree").contains("does not match its name"));
    // 4. A marker moved to another name; `snapshot list --from` refuses it too.
    b.delete(&format::marker_name("s1")).unwrap();
    b.put(
        &format::marker_name("s2"),
        &format::marker_object(&marker("s1", h)),
    )
    .unwrap();
    assert!(recover("moved marker").contains("moved or forged"));
    let (good, _, err) = cli(&["snapshot", "list", "--from", &t.spec()]);
    assert!(!good && err.contains("moved or forged"), "{err}");
}

/// A daemon started later without the user's AWS environment still replicates: the
/// credentials were kept in the store (mode 0600).
#[test]
fn garage_credentials_are_kept_in_the_store() {
    require_fuse!();
    let _one = GARAGE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = garage("garage_credentials_are_kept_in_the_store") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let m = mount(&store, &mnt, &t, &[]);
    m.stop();
    let cfg = store.join("backends/backup.json");
    let mode = fs::metadata(&cfg).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", cfg.display());
    let mut cmd = Command::new(bin());
    cmd.arg("mount").arg(&store).arg(&mnt);
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
    ] {
        cmd.env_remove(k);
    }
    let m = Mount::spawn(cmd, &store, &mnt);
    fs::write(m.path("f"), bytes(11, 2 << 20)).unwrap();
    snapshot_and_wait(&mnt, "s1");
    assert_eq!(status(&mnt)["pending_chunks"], 0);
    m.stop();
}

/// `backend add` to a store that already holds data and snapshots queues everything it
/// holds; `backend list` shows it without secrets; `backend remove` drops its queue.
#[test]
fn backend_add_to_a_store_with_data_backfills() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let m = Mount::start(&store, &mnt);
    fs::write(m.path("old"), bytes(21, 5 << 20)).unwrap();
    ok(&[
        "snapshot",
        "create",
        mnt.to_str().unwrap(),
        "before-backend",
    ]);
    fs::write(m.path("newer"), bytes(22, 3 << 20)).unwrap();
    m.stop();
    // Added while not mounted: queued in the store, uploaded at the next mount.
    let root = tmp.path().join("backend");
    let spec = format!("dir:{}", root.display());
    let out = ok(&["backend", "add", store.to_str().unwrap(), "b1", &spec]);
    assert!(out.contains("8 chunks queued"), "{out}");
    let list = ok(&["backend", "list", store.to_str().unwrap(), "--json"]);
    assert!(
        list.contains("\"b1\"") && !list.contains("secret"),
        "{list}"
    );
    let (good, _, err) = cli(&["backend", "add", store.to_str().unwrap(), "b1", &spec]);
    assert!(
        !good && err.contains("already has a backend named b1"),
        "{err}"
    );
    let m = Mount::start(&store, &mnt);
    let mnt_s = mnt.to_str().unwrap();
    ok(&[
        "snapshot",
        "wait",
        mnt_s,
        "before-backend",
        "--timeout",
        "120s",
    ]);
    snapshot_and_wait(&mnt, "after");
    let t = Target::Dir(root);
    assert_eq!(t.chunk_objects(), 8);
    let listed = ok(&["snapshot", "list", "--from", &spec]);
    assert!(
        listed.contains("before-backend") && listed.contains("after"),
        "{listed}"
    );
    ok(&["backend", "remove", mnt_s, "b1"]);
    let (good, _, err) = cli(&["status", mnt_s]);
    assert!(good, "{err}");
    let (_, out, _) = cli(&["backend", "list", mnt_s]);
    assert!(out.contains("no backends"), "{out}");
    m.stop();
    // Removing it deleted nothing on the backend.
    assert_eq!(t.chunk_objects(), 8);
}
