//! Backend retention end to end, through the CLI and a real mount with a `dir:` backend:
//!
//! - under load: a writer keeps overwriting checkpoints and taking snapshots while
//!   `backend prune --keep-last 2` runs through the daemon; afterwards every snapshot the
//!   backend keeps recovers byte-identical, the dropped ones show as pruned, and a dry run
//!   finds no unreferenced object left;
//! - chunks that a prune deleted because no snapshot referenced them yet (live data) are
//!   uploaded again when the next snapshot needs them;
//! - an `--append-only` backend refuses `backend prune` from the store's host and loses
//!   nothing; `--from` (a trusted host) prunes it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    bin, cli, dir_objects as objects, file_hashes as tree, ok, seeded_bytes as bytes, Mount,
};

/// Path -> blake3 of a tree's regular files.
type Files = BTreeMap<String, String>;

fn status(mnt: &Path, backend: &str) -> serde_json::Value {
    let out = ok(&["status", mnt.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .cloned()
        .unwrap()
}

fn snap_state(s: &serde_json::Value, name: &str) -> serde_json::Value {
    s["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn mount_replicating(store: &Path, mnt: &Path, spec: &str) -> Mount {
    let mut cmd = Command::new(bin());
    cmd.arg("mount").arg(store).arg(mnt);
    cmd.args(["--replicate", spec]);
    Mount::spawn(cmd, store, mnt)
}

fn prune(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["backend", "prune"];
    a.extend_from_slice(args);
    a.push("--json");
    let out = ok(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn backend_names(spec: &str) -> Vec<String> {
    let out = ok(&["snapshot", "list", "--from", spec, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// Recovers every snapshot on `spec` into a new store, mounts it and checks each against
/// what the writer recorded.
fn recover_and_compare(
    spec: &str,
    dir: &Path,
    expected: &BTreeMap<String, BTreeMap<String, String>>,
) {
    let (store, mnt) = (dir.join("recovered"), dir.join("recovered-mnt"));
    let (good, out, err) = cli(&["recover", "--from", spec, store.to_str().unwrap()]);
    assert!(good, "recover failed: {out}{err}");
    let m = Mount::start(&store, &mnt);
    for (name, want) in expected {
        let got = tree(&mnt.join(".snapshots").join(name));
        assert_eq!(&got, want, "snapshot {name} recovered from the backend");
    }
    m.stop();
}

#[test]
fn prune_under_load_keeps_every_kept_snapshot_whole() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (store, mnt, bdir) = (
        tmp.path().join("store"),
        tmp.path().join("mnt"),
        tmp.path().join("backend"),
    );
    let spec = format!("dir:{}", bdir.display());
    let m = mount_replicating(&store, &mnt, &spec);
    let m_str = mnt.to_str().unwrap().to_string();

    // The writer: torch.save-style in-place overwrites of three checkpoints, fresh random
    // content each time, a snapshot after each; what each snapshot holds is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let taken: Arc<Mutex<Vec<(String, Files)>>> = Default::default();
    let writer = {
        let (stop, taken, mnt) = (stop.clone(), taken.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut files: BTreeMap<String, String> = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("ckpt-{}.pt", i % 3);
                let data = bytes(1000 + i, (2 << 20) + 777 * i as usize);
                let p = mnt.join(&name);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .unwrap();
                std::io::Write::write_all(&mut f, &data).unwrap();
                f.sync_all().unwrap();
                files.insert(name, blake3::hash(&data).to_hex().to_string());
                let snap = format!("s{i:03}");
                ok(&["snapshot", "create", mnt.to_str().unwrap(), &snap]);
                taken.lock().unwrap().push((snap, files.clone()));
                i += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    wait_for("three snapshots complete", 120, || {
        let s = status(&mnt, "backup");
        s["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["complete"] == true)
            .count()
            >= 3
    });

    // Prune through the daemon while the writer goes on.
    let t = Instant::now();
    let first = prune(&[&m_str, "backup", "--keep-last", "2", "--grace", "2s"]);
    println!("prune under load ({:.1?}): {first}", t.elapsed());
    assert!(!names(&first["snapshots_dropped"]).is_empty(), "{first}");
    assert!(first["chunks_deleted"].as_u64().unwrap() > 0, "{first}");
    assert!(first["metas_deleted"].as_u64().unwrap() > 0, "{first}");
    let after_prune = taken.lock().unwrap().len();
    wait_for("two more snapshots", 60, || {
        taken.lock().unwrap().len() >= after_prune + 2
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let taken = taken.lock().unwrap().clone();
    let last = taken.last().unwrap().0.clone();
    ok(&["snapshot", "wait", &m_str, &last, "--timeout", "120s"]);
    // Snapshots complete in the order their chunks are up, not strictly in the order taken
    // (one that had to queue pruned chunks again comes later): wait for all of them.
    wait_for("every snapshot complete or pruned", 120, || {
        let s = status(&mnt, "backup");
        taken.iter().all(|(n, _)| {
            let st = snap_state(&s, n);
            st["complete"] == true || st["pruned"] == true
        })
    });

    // A second prune with the writer stopped: exactly the two newest remain.
    let second = prune(&[&m_str, "backup", "--keep-last", "2", "--grace", "2s"]);
    println!("second prune: {second}");
    let kept = names(&second["snapshots_kept"]);
    let newest: Vec<String> = taken.iter().rev().take(2).map(|t| t.0.clone()).collect();
    assert_eq!(kept, newest, "{second}");
    let mut on_backend = backend_names(&spec);
    on_backend.sort();
    let mut want = newest.clone();
    want.sort();
    assert_eq!(on_backend, want);

    // Nothing unreferenced is left (from a trusted host, no store).
    let dry = prune(&["--from", &spec, "--keep-last", "2", "--dry-run"]);
    println!("dry run afterwards: {dry}");
    assert_eq!(dry["chunks_deleted"], 0, "{dry}");
    assert_eq!(dry["metas_deleted"], 0, "{dry}");
    assert!(names(&dry["snapshots_dropped"]).is_empty(), "{dry}");

    // Status: the lane reconciled; each snapshot is complete (kept) or pruned.
    wait_for("the lane reconciled with generation 2", 30, || {
        status(&mnt, "backup")["prune_generation"] == 2
    });
    let s = status(&mnt, "backup");
    for (name, _) in &taken {
        let st = snap_state(&s, name);
        if newest.contains(name) {
            assert_eq!(st["complete"], true, "{name}: {st}");
        } else {
            // Taken after the last marker the second prune saw, it would be complete; every
            // snapshot not kept was complete and then pruned.
            assert_eq!(st["pruned"], true, "{name}: {st}");
            assert_eq!(st["complete"], false, "{name}: {st}");
        }
    }
    let dropped = &taken[0].0;
    let (good, _, err) = cli(&["snapshot", "wait", &m_str, dropped, "--timeout", "2s"]);
    assert!(!good && err.contains("retention"), "{err}");
    let live = tree(&mnt);
    m.stop();

    let expected: BTreeMap<String, BTreeMap<String, String>> = taken
        .iter()
        .filter(|t| newest.contains(&t.0))
        .cloned()
        .collect();
    assert_eq!(
        expected[&last], live,
        "the newest snapshot is the live tree"
    );
    recover_and_compare(&spec, tmp.path(), &expected);
}

#[test]
fn chunks_pruned_before_a_snapshot_needed_them_are_uploaded_again() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (store, mnt, bdir) = (
        tmp.path().join("store"),
        tmp.path().join("mnt"),
        tmp.path().join("backend"),
    );
    let spec = format!("dir:{}", bdir.display());
    let m = mount_replicating(&store, &mnt, &spec);
    let ms = mnt.to_str().unwrap();
    fs::write(mnt.join("a.bin"), bytes(1, 3 << 20)).unwrap();
    ok(&["snapshot", "create", ms, "s1"]);
    ok(&["snapshot", "wait", ms, "s1", "--timeout", "60s"]);
    // b.bin reaches the backend, but no snapshot references it yet.
    let b_data = bytes(2, (3 << 20) + 5);
    let p = mnt.join("b.bin");
    fs::write(&p, &b_data).unwrap();
    fs::File::open(&p).unwrap().sync_all().unwrap();
    wait_for("b.bin uploaded", 60, || {
        status(&mnt, "backup")["pending_chunks"] == 0
    });
    let r = prune(&[ms, "backup", "--grace", "2s"]);
    println!("keep-all prune: {r}");
    assert_eq!(names(&r["snapshots_dropped"]).len(), 0, "{r}");
    assert!(r["chunks_deleted"].as_u64().unwrap() >= 3, "{r}");
    ok(&["snapshot", "create", ms, "s2"]);
    ok(&["snapshot", "wait", ms, "s2", "--timeout", "60s"]);
    let text = fs::read_to_string(&m.log).unwrap_or_default();
    assert!(text.contains("queued them again"), "{text}");

    // keep-last 1: s1 goes; the store says so.
    let r = prune(&[ms, "backup", "--keep-last", "1", "--grace", "2s"]);
    assert_eq!(names(&r["snapshots_dropped"]), vec!["s1"], "{r}");
    wait_for("s1 shows as pruned", 30, || {
        snap_state(&status(&mnt, "backup"), "s1")["pruned"] == true
    });
    let text = ok(&["status", ms]);
    assert!(text.contains("snapshot s1: pruned"), "{text}");

    // An append-only backend: no prune from this host, nothing lost.
    let adir = tmp.path().join("ao");
    let aspec = format!("dir:{}", adir.display());
    ok(&[
        "backend",
        "add",
        ms,
        "ao",
        &aspec,
        "--append-only",
        "--keep-last",
        "1",
    ]);
    ok(&["snapshot", "create", ms, "s3"]);
    ok(&[
        "snapshot",
        "wait",
        ms,
        "s3",
        "--backend",
        "ao",
        "--timeout",
        "60s",
    ]);
    let list = ok(&["backend", "list", ms]);
    assert!(list.contains("append-only"), "{list}");
    let before = objects(&adir);
    let (good, _, err) = cli(&["backend", "prune", ms, "ao", "--grace", "2s"]);
    assert!(!good && err.contains("append-only"), "{err}");
    assert_eq!(
        objects(&adir),
        before,
        "the append-only backend lost nothing"
    );
    m.stop();

    // From a trusted host it can be pruned (the policy given there).
    let r = prune(&["--from", &aspec, "--keep-last", "1", "--grace", "2s"]);
    assert_eq!(names(&r["snapshots_kept"]), vec!["s3"], "{r}");
    assert_eq!(names(&r["snapshots_dropped"]), vec!["s2", "s1"], "{r}");

    let mut want = BTreeMap::new();
    want.insert(
        "a.bin".to_string(),
        blake3::hash(&bytes(1, 3 << 20)).to_hex().to_string(),
    );
    want.insert(
        "b.bin".to_string(),
        blake3::hash(&b_data).to_hex().to_string(),
    );
    let mut expected = BTreeMap::new();
    expected.insert("s2".to_string(), want);
    recover_and_compare(&spec, tmp.path(), &expected);
}
