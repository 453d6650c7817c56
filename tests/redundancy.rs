//! Redundant backends end to end, through the CLI and a real mount: `ec:4+2` over six `dir:`
//! members and `mirror:` over two.
//!
//! - ec:4+2: two members deleted while the daemon replicates: writes go on, the snapshot
//!   completes, `status` says degraded; the members come back empty and the daemon heals
//!   them; then two *other* members are lost with the machine: `recover` is byte-identical;
//!   then one shard corrupted in a third member on top: `recover` fails and names the object
//!   it cannot rebuild, and never writes a wrong byte.
//! - mirror of two: one member deleted; `mount --from` and `recover` read from the other; a
//!   restarted daemon refills the deleted member; damage on both members is found by
//!   `scrub` and repaired from the other member.
//! - a plain `dir:` backend: a local chunk damaged on disk is healed by a read through the
//!   mount; a flipped byte in a backend object is found by `scrub` and re-uploaded.
//! - objects a complete snapshot needs deleted from the backend (chunks, trees, file maps):
//!   `scrub` names them, `--repair` uploads the chunks again and rebuilds the metadata from
//!   the local snapshot, `recover` is then byte-identical; without the local snapshot the
//!   metadata is reported unrepairable.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    bin, cli, dir_objects as objects, file_hashes as tree, ok, seeded_bytes as bytes, Mount,
};

fn write_files(root: &Path, tag: &str, seed: u64) {
    let dir = root.join(tag);
    fs::create_dir_all(&dir).unwrap();
    for i in 0..3u64 {
        let len = (3 << 20) + 4321 * i as usize;
        let p = dir.join(format!("shard{i}.bin"));
        fs::write(&p, bytes(seed * 100 + i, len)).unwrap();
        fs::File::open(&p).unwrap().sync_all().unwrap();
    }
    fs::write(dir.join("small.json"), format!("{{\"tag\": \"{tag}\"}}")).unwrap();
}

fn status(mnt: &Path) -> serde_json::Value {
    let out = ok(&["status", mnt.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["backends"][0].clone()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn snapshot_and_wait(mnt: &Path, name: &str) {
    let m = mnt.to_str().unwrap();
    ok(&["snapshot", "create", m, name]);
    ok(&["snapshot", "wait", m, name, "--timeout", "120s"]);
}

fn mount_replicating(store: &Path, mnt: &Path, spec: &str) -> Mount {
    let mut cmd = Command::new(bin());
    cmd.arg("mount").arg(store).arg(mnt);
    cmd.args(["--replicate", spec, "--degrade-after", "1s"]);
    Mount::spawn(cmd, store, mnt)
}

/// A store in `tmp` mounted, replicating to one `dir:` backend: (backend directory, spec,
/// store, mountpoint, mount).
fn plain_backend(tmp: &Path) -> (PathBuf, String, PathBuf, PathBuf, Mount) {
    let backend = tmp.join("backend");
    let spec = format!("dir:{}", backend.display());
    let (store, mnt) = (tmp.join("store"), tmp.join("mnt"));
    let m = mount_replicating(&store, &mnt, &spec);
    (backend, spec, store, mnt, m)
}

fn recover(spec: &str, store: &Path) -> (bool, String, String) {
    cli(&["recover", "--from", spec, store.to_str().unwrap()])
}

fn flip_last_byte(p: &Path) {
    let mut b = fs::read(p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x01;
    fs::write(p, b).unwrap();
}

#[test]
fn ec_4_2_degrades_heals_and_recovers() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let members: Vec<PathBuf> = (0..6).map(|i| tmp.path().join(format!("m{i}"))).collect();
    let spec = format!(
        "ec:4+2:{}",
        members
            .iter()
            .map(|m| format!("dir:{}", m.display()))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let m = mount_replicating(&store, &mnt, &spec);
    write_files(&mnt, "step-1", 1);
    snapshot_and_wait(&mnt, "s1");
    let s = status(&mnt);
    assert_eq!(s["degraded"], false, "{s}");
    assert_eq!(s["members"].as_array().unwrap().len(), 6, "{s}");
    let full = objects(&members[0]).len();
    assert!(full > 10, "{full} objects on member 0");
    for mb in &members {
        assert_eq!(
            objects(mb).len(),
            full,
            "{} holds every object",
            mb.display()
        );
    }

    // Two members vanish while the daemon replicates: writes and the snapshot go on.
    fs::remove_dir_all(&members[1]).unwrap();
    fs::remove_dir_all(&members[4]).unwrap();
    write_files(&mnt, "step-2", 2);
    let t = Instant::now();
    snapshot_and_wait(&mnt, "s2");
    println!(
        "s2 complete with two members gone after {:.1?}",
        t.elapsed()
    );
    let s = status(&mnt);
    assert_eq!(s["degraded"], true, "{s}");
    assert_eq!(s["members"][1]["state"], "down", "{s}");
    assert_eq!(s["members"][4]["state"], "down", "{s}");
    assert_eq!(s["members"][0]["state"], "ok", "{s}");
    assert!(
        s["members"][1]["missed_objects"].as_u64().unwrap() > 0,
        "{s}"
    );
    let text = ok(&["status", mnt.to_str().unwrap()]);
    assert!(text.contains("DEGRADED"), "{text}");

    // They come back empty (new disks): the daemon heals them.
    for i in [1, 4] {
        fs::create_dir(&members[i]).unwrap();
    }
    wait_for("the two members healed", 90, || {
        status(&mnt)["degraded"] == false
    });
    let full = objects(&members[0]).len();
    for i in [1, 4] {
        assert_eq!(objects(&members[i]).len(), full, "member {i} refilled");
    }
    m.stop();

    // Offline, the same two members lose everything again: scrub --repair rebuilds them
    // by reconstruction, and a second scrub finds nothing.
    for i in [1, 4] {
        fs::remove_dir_all(&members[i]).unwrap();
        fs::create_dir(&members[i]).unwrap();
    }
    let st = store.to_str().unwrap();
    let (good, out, _) = cli(&["scrub", st]);
    assert!(!good, "scrub must fail on missing shards: {out}");
    assert!(out.contains("missing"), "{out}");
    let out = ok(&["scrub", st, "--repair", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let copies = &r["backends"][0]["copies"];
    println!("scrub --repair: {copies}");
    assert_eq!(copies["bad"].as_u64(), Some(2 * full as u64), "{out}");
    assert_eq!(copies["repaired"], copies["bad"], "{out}");
    assert_eq!(r["local"]["bad"], 0, "{out}");
    for i in [1, 4] {
        assert_eq!(
            objects(&members[i]).len(),
            full,
            "member {i} rebuilt by scrub"
        );
    }
    let out = ok(&["scrub", st]);
    assert!(out.contains("scrub clean"), "{out}");

    let m = Mount::start(&store, &mnt);
    let before = tree(&mnt);
    m.kill();

    // The machine is lost, and two other members with it: recover is byte-identical.
    fs::remove_dir_all(&store).unwrap();
    fs::remove_dir_all(&members[0]).unwrap();
    fs::remove_dir_all(&members[5]).unwrap();
    let store2 = tmp.path().join("store2");
    let (good, out, err) = recover(&spec, &store2);
    assert!(good, "recover with 4 of 6 members: {err}");
    println!("{out}");
    let m2 = Mount::start(&store2, &mnt);
    assert_eq!(tree(&mnt), before, "recovered tree differs");
    assert_eq!(
        tree(&mnt.join(".snapshots/s1")).len(),
        4,
        "s1 holds step-1's four files"
    );
    m2.stop();

    // One more member loses a shard of some chunk (a flipped byte): that chunk has three
    // good shards of the four needed. recover fails and names it; nothing is claimed.
    let chunk = objects(&members[2])
        .into_iter()
        .find(|p| p.starts_with("chunks"))
        .unwrap();
    flip_last_byte(&members[2].join(&chunk));
    let store3 = tmp.path().join("store3");
    let (good, _, err) = recover(&spec, &store3);
    assert!(!good, "recover must fail when a chunk cannot be rebuilt");
    let name = chunk.display().to_string();
    assert!(err.contains(&name), "the error names {name}: {err}");
    assert!(err.contains("cannot rebuild"), "{err}");
    println!("recover with an unrebuildable chunk: {}", err.trim());
}

#[test]
fn mirror_of_two_loses_one_member() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let spec = format!("mirror:dir:{},dir:{}", a.display(), b.display());
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let m = mount_replicating(&store, &mnt, &spec);
    write_files(&mnt, "ckpt", 7);
    snapshot_and_wait(&mnt, "c1");
    let before = tree(&mnt);
    let full = objects(&a).len();
    assert_eq!(objects(&b).len(), full);
    m.stop();

    // Member a is lost: reads (mount --from) and recover use b.
    fs::remove_dir_all(&a).unwrap();
    let from = tmp.path().join("from");
    let mut cmd = Command::new(bin());
    cmd.args(["mount", "--from", &spec, "--snapshot", "c1", "--cache-dir"]);
    cmd.arg(tmp.path()).arg(&from);
    let fm = Mount::spawn(cmd, &tmp.path().join("from-store"), &from);
    assert_eq!(tree(&from), before, "mount --from with one member");
    fm.stop();
    let store2 = tmp.path().join("store2");
    let (good, _, err) = recover(&spec, &store2);
    assert!(good, "recover from one member of two: {err}");
    let m2 = Mount::start(&store2, &mnt);
    assert_eq!(tree(&mnt), before);
    m2.stop();

    // The member comes back empty: the store's daemon refills it when it starts.
    fs::create_dir(&a).unwrap();
    let m = Mount::start(&store, &mnt);
    wait_for("member a refilled", 60, || {
        let s = status(&mnt);
        s["members"][0]["state"] == "ok" && s["members"][1]["state"] == "ok"
    });
    assert!(objects(&a).len() >= full);
    // Damage on both sides (a copy deleted on one, a byte flipped on the other): scrub
    // names both, --repair rewrites each from the other member.
    let objs = objects(&b);
    let chunks: Vec<&PathBuf> = objs.iter().filter(|p| p.starts_with("chunks")).collect();
    fs::remove_file(b.join(chunks[0])).unwrap();
    flip_last_byte(&a.join(chunks[1]));
    let mp = mnt.to_str().unwrap();
    let (good, out, _) = cli(&["scrub", mp]);
    assert!(!good, "{out}");
    for c in [chunks[0], chunks[1]] {
        assert!(out.contains(&c.display().to_string()), "{out}");
    }
    let out = ok(&["scrub", mp, "--repair"]);
    println!("{out}");
    assert!(ok(&["scrub", mp]).contains("scrub clean"));
    m.stop();
    assert_eq!(objects(&a), objects(&b));
    // The members' envelopes differ only in their index byte; the payloads are the same.
    for p in objects(&a) {
        let (x, y) = (fs::read(a.join(&p)).unwrap(), fs::read(b.join(&p)).unwrap());
        let same = x.len() == y.len() && x[84..] == y[84..] && x[8] == 0 && y[8] == 1;
        assert!(same, "{}", p.display());
    }
}

/// A local chunk damaged on disk: a read through the mount returns the right bytes from the
/// backend's copy and rewrites the local one; a damaged backend object is found and repaired
/// by scrub.
#[test]
fn self_healing_read_and_scrub_of_a_plain_backend() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (backend, _spec, store, mnt, m) = plain_backend(tmp.path());
    let data = bytes(8, 4 << 20);
    fs::write(m.path("f"), &data).unwrap();
    snapshot_and_wait(&mnt, "s1");
    m.stop();
    // Random data is stored raw: find one chunk's bytes in the blob files and flip one.
    let needle = &data[(2 << 20) + 1000..(2 << 20) + 1064];
    let hit = common::corrupt_blob(&store, needle);
    assert!(hit, "the chunk's bytes were not found in any blob file");
    let st = store.to_str().unwrap();
    let (good, out, _) = cli(&["scrub", st]);
    assert!(!good, "scrub must find the damaged local chunk: {out}");
    assert!(out.contains("local chunk"), "{out}");
    let m = Mount::start(&store, &mnt);
    assert!(
        fs::read(m.path("f")).unwrap() == data,
        "self-healing read returned other bytes"
    );
    let s: serde_json::Value =
        serde_json::from_str(&ok(&["stat", mnt.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(s["self_heals"], 1, "{s}");
    m.stop();
    let out = ok(&["check", st, "--verify-data"]);
    println!("check after the self-heal: {}", out.trim());
    let out = ok(&["scrub", st]);
    assert!(out.contains("scrub clean"), "{out}");

    // A byte flipped in a backend object.
    let chunk = objects(&backend)
        .into_iter()
        .find(|p| p.starts_with("chunks"))
        .unwrap();
    flip_last_byte(&backend.join(&chunk));
    let (good, out, _) = cli(&["scrub", st]);
    assert!(!good, "{out}");
    assert!(out.contains(&chunk.display().to_string()), "{out}");
    let out = ok(&["scrub", st, "--repair"]);
    assert!(out.contains("re-uploaded from the local store"), "{out}");
    assert!(ok(&["scrub", st]).contains("scrub clean"));
}

/// Objects that complete snapshots need, deleted from the backend behind snapfs's back: scrub
/// walks every snapshot from its marker and names what is missing; `--repair` uploads the
/// chunks again from the store and rebuilds the lost metadata from the local snapshot.
#[test]
fn scrub_finds_objects_that_snapshots_need() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let (backend, spec, store, mnt, m) = plain_backend(tmp.path());
    write_files(&mnt, "ckpt-1", 3);
    snapshot_and_wait(&mnt, "c1");
    write_files(&mnt, "ckpt-2", 4);
    snapshot_and_wait(&mnt, "c2");
    let before = tree(&mnt);
    m.stop();
    let st = store.to_str().unwrap();
    let out = ok(&["scrub", st]);
    assert!(out.contains("scrub clean"), "{out}");
    assert!(out.contains("(2 complete snapshots walked)"), "{out}");

    // One chunk lost: scrub names it and the snapshots that need it; the object pass alone
    // (which checks what is there) would not.
    let objs = objects(&backend);
    let chunks: Vec<&PathBuf> = objs.iter().filter(|p| p.starts_with("chunks")).collect();
    let metas: Vec<&PathBuf> = objs.iter().filter(|p| p.starts_with("meta")).collect();
    let lost = chunks[chunks.len() / 2];
    fs::remove_file(backend.join(lost)).unwrap();
    let hex = lost.file_name().unwrap().to_str().unwrap().to_string();
    let (good, out, _) = cli(&["scrub", st]);
    assert!(!good, "scrub must fail on a missing chunk: {out}");
    assert!(out.contains(&format!("needs chunk {hex}")), "{out}");
    println!("{out}");

    // Every metadata object lost too: the roots are missing, nothing below can be checked.
    for p in &metas {
        fs::remove_file(backend.join(p)).unwrap();
    }
    let (good, out, _) = cli(&["scrub", st]);
    assert!(!good, "{out}");
    assert!(out.contains("nothing below it can be checked"), "{out}");
    let (good, _, err) = recover(&spec, &tmp.path().join("r0"));
    assert!(!good, "recover must fail without the metadata");
    println!("recover without the metadata: {}", err.trim());

    // --repair rebuilds the metadata from the local snapshots, then walks below and uploads
    // the chunk again; a second scrub is clean and recover is byte-identical.
    let out = ok(&["scrub", st, "--repair", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let needed = &v["backends"][0]["needed"];
    println!("scrub --repair, objects snapshots need: {needed}");
    assert_eq!(needed["bad"], needed["repaired"], "{needed}");
    assert_eq!(needed["unrepairable"], 0, "{needed}");
    let f = v["findings"].to_string();
    assert!(f.contains(&format!("needs chunk {hex}")), "{f}");
    assert!(f.contains("re-uploaded from the local store"), "{f}");
    assert!(f.contains("rebuilt from the local snapshot"), "{f}");
    assert_eq!(
        objects(&backend),
        objs,
        "the same objects as before the loss"
    );
    let out = ok(&["scrub", st]);
    assert!(out.contains("scrub clean"), "{out}");
    let store2 = tmp.path().join("store2");
    let (good, _, err) = recover(&spec, &store2);
    assert!(good, "recover after the repair: {err}");
    let m2 = Mount::start(&store2, &mnt);
    assert_eq!(tree(&mnt), before, "recovered after scrub --repair");
    m2.stop();

    // A metadata object damaged in place (it fails its hash): both passes name it, and
    // --repair rebuilds it from the local snapshot.
    let damaged = metas[metas.len() / 2];
    flip_last_byte(&backend.join(damaged));
    let (good, out, _) = cli(&["scrub", st]);
    assert!(!good, "{out}");
    assert!(out.contains("it is damaged"), "{out}");
    let out = ok(&["scrub", st, "--repair"]);
    assert!(out.contains("scrub clean"), "{out}");
    assert!(ok(&["scrub", st]).contains("scrub clean"));

    // The older snapshot deleted locally and every metadata object but the two roots lost:
    // c1's tree below its root is what c2 shares with it, and comes back from c2 (walked
    // first, newest first, or tried when c1 itself cannot be rebuilt): clean.
    ok(&["snapshot", "delete", st, "c1"]);
    let roots: Vec<String> = {
        let b = snapfs::replica::backend::dir::DirBackend::new(&backend).unwrap();
        snapfs::replica::recover::list_snapshots(&b)
            .unwrap()
            .iter()
            .filter_map(|m| match m.root.body {
                snapfs::replica::format::Body::Dir(h) => {
                    Some(snapfs::replica::format::meta_name(&h))
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(roots.len(), 2);
    for p in &metas {
        if !roots.contains(&p.display().to_string()) {
            fs::remove_file(backend.join(p)).unwrap();
        }
    }
    let out = ok(&["scrub", st, "--repair"]);
    assert!(out.contains("scrub clean"), "{out}");
    assert!(ok(&["scrub", st]).contains("scrub clean"));

    // Every metadata object lost: what c1 shares with c2 is rebuilt from c2; only c1's own
    // root is unrepairable.
    for p in &metas {
        fs::remove_file(backend.join(p)).unwrap();
    }
    let (good, out, _) = cli(&["scrub", st, "--repair", "--json"]);
    assert!(!good, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let needed = &v["backends"][0]["needed"];
    let f = v["findings"].to_string();
    println!("c1 gone locally: {needed}");
    assert_eq!(needed["unrepairable"], 1, "only c1's own root: {f}");
    assert!(f.contains("snapshot c2 needs metadata object"), "{f}");
    assert!(
        f.contains("snapshot c1 needs metadata object")
            && f.contains("UNREPAIRABLE: the local store has no snapshot of that name"),
        "{f}"
    );

    // Without any local snapshot nothing can rebuild the metadata: unrepairable, exit 1.
    ok(&["snapshot", "delete", st, "c2"]);
    for p in &metas {
        let _ = fs::remove_file(backend.join(p)); // c1's root is gone already
    }
    let (good, out, _) = cli(&["scrub", st, "--repair"]);
    assert!(!good, "{out}");
    assert!(
        out.contains("UNREPAIRABLE: the local store has no snapshot of that name"),
        "{out}"
    );
}
