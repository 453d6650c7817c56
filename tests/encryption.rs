//! Encryption at rest end to end: a `dir:` backend added with `--encrypt`.
//!
//! After files of random bytes are replicated: no 32-byte window of any of them occurs in any
//! backend object, no object name holds a chunk's blake3 or the snapshot's name; `recover`
//! and `snapshot list --from` need the passphrase and say so clearly when it is wrong or
//! missing; a flipped byte in an encrypted object is detected (recover fails, scrub finds it,
//! `--repair` fixes it); `backend rekey` changes the passphrase without re-encrypting.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, seeded_bytes as bytes, Mount};

fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs snapfs with no passphrase in the environment and stdin not a terminal.
fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(bin());
    c.args(args).env_remove("SNAPFS_PASSPHRASE");
    c.stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (good, out, err) = run(args, &[]);
    assert!(good, "snapfs {args:?} failed: {err}");
    out
}

#[test]
fn encrypted_backend_hides_data_and_names_and_needs_the_key() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let backend = tmp.path().join("backend");
    let spec = format!("dir:{}", backend.display());
    let pw = tmp.path().join("pw");
    fs::write(&pw, "correct horse battery staple\n").unwrap();
    let pwf = pw.to_str().unwrap();
    let (store, mnt) = (tmp.path().join("store"), tmp.path().join("mnt"));
    let mut cmd = Command::new(bin());
    cmd.arg("mount").arg(&store).arg(&mnt);
    cmd.args(["--replicate", &spec, "--encrypt", "--passphrase-file", pwf]);
    let m = Mount::spawn(cmd, &store, &mnt);
    let a = bytes(1, (3 << 20) / 2);
    let b = bytes(2, 300_000);
    fs::write(m.path("a"), &a).unwrap();
    fs::write(m.path("b"), &b).unwrap();
    let mp = mnt.to_str().unwrap();
    ok(&["snapshot", "create", mp, "secret-snapshot"]);
    ok(&[
        "snapshot",
        "wait",
        mp,
        "secret-snapshot",
        "--timeout",
        "120s",
    ]);
    let stat: serde_json::Value = serde_json::from_str(&ok(&["stat", mp, "--json"])).unwrap();
    let chunk = stat["chunk_size"].as_u64().unwrap() as usize;
    m.stop();

    // No 32-byte window of the data anywhere in the backend: every window is indexed by its
    // first 8 bytes, every backend offset is looked up and a hit compared in full.
    let data = [a.clone(), b.clone()].concat();
    let mut index: HashMap<u64, usize> = HashMap::with_capacity(data.len());
    for i in 0..=data.len() - 32 {
        index.insert(u64::from_le_bytes(data[i..i + 8].try_into().unwrap()), i);
    }
    let objs = files(&backend);
    assert!(objs.len() > 4, "{objs:?}");
    let mut scanned = 0usize;
    for p in &objs {
        let o = fs::read(p).unwrap();
        scanned += o.len();
        for j in 0..o.len().saturating_sub(31) {
            let k = u64::from_le_bytes(o[j..j + 8].try_into().unwrap());
            if let Some(&i) = index.get(&k) {
                assert_ne!(
                    &o[j..j + 32],
                    &data[i..i + 32],
                    "plaintext in {}",
                    p.display()
                );
            }
        }
    }
    println!(
        "{} objects, {scanned} bytes scanned: no 32-byte window of the data",
        objs.len()
    );
    // No name shows a chunk's blake3 or the snapshot's name.
    let names: Vec<String> = objs
        .iter()
        .map(|p| p.strip_prefix(&backend).unwrap().display().to_string())
        .collect();
    for f in [&a, &b] {
        for c in f.chunks(chunk) {
            let h = blake3::hash(c).to_hex().to_string();
            assert!(
                !names.iter().any(|n| n.contains(&h)),
                "a chunk id is visible"
            );
        }
    }
    assert!(
        !names.iter().any(|n| n.contains("secret-snapshot")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "snapfs-key"), "{names:?}");

    // The key is needed, and a wrong one is a clear error.
    let list = ["snapshot", "list", "--from", &spec];
    let (good, _, err) = run(&list, &[]);
    assert!(!good && err.contains("passphrase"), "{err}");
    let (good, _, err) = run(&list, &[("SNAPFS_PASSPHRASE", "wrong")]);
    assert!(!good && err.contains("wrong passphrase"), "{err}");
    let out = ok(&[
        "snapshot",
        "list",
        "--from",
        &spec,
        "--passphrase-file",
        pwf,
    ]);
    assert!(out.contains("secret-snapshot"), "{out}");
    let store2 = tmp.path().join("store2");
    let (good, _, err) = run(
        &["recover", "--from", &spec, store2.to_str().unwrap()],
        &[("SNAPFS_PASSPHRASE", "wrong")],
    );
    assert!(!good && err.contains("wrong passphrase"), "{err}");
    assert!(!store2.join("db").exists(), "a failed recover left a store");
    let (good, _, err) = run(
        &["recover", "--from", &spec, store2.to_str().unwrap()],
        &[("SNAPFS_PASSPHRASE", "correct horse battery staple")],
    );
    assert!(good, "{err}");
    let m2 = Mount::start(&store2, &mnt);
    assert!(fs::read(m2.path("a")).unwrap() == a && fs::read(m2.path("b")).unwrap() == b);
    m2.stop();

    // A flipped byte in an encrypted chunk object: recover fails, naming it; scrub finds it
    // and --repair re-uploads it from the store.
    let victim = objs
        .iter()
        .find(|p| p.strip_prefix(&backend).unwrap().starts_with("chunks"))
        .unwrap();
    let mut o = fs::read(victim).unwrap();
    o[40] ^= 0x10;
    fs::write(victim, &o).unwrap();
    let store3 = tmp.path().join("store3");
    let (good, _, err) = run(
        &[
            "recover",
            "--from",
            &spec,
            store3.to_str().unwrap(),
            "--passphrase-file",
            pwf,
        ],
        &[],
    );
    assert!(!good && err.contains("fails authentication"), "{err}");
    let st = store.to_str().unwrap();
    let (good, out, _) = run(&["scrub", st], &[]);
    assert!(!good && out.contains("fails authentication"), "{out}");
    ok(&["scrub", st, "--repair"]);
    assert!(ok(&["scrub", st]).contains("scrub clean"));

    // A new passphrase: the old one stops working, no object changes but the key object.
    let pw2 = tmp.path().join("pw2");
    fs::write(&pw2, "another one").unwrap();
    let before: Vec<Vec<u8>> = files(&backend)
        .iter()
        .filter(|p| !p.ends_with("snapfs-key"))
        .map(|p| fs::read(p).unwrap())
        .collect();
    ok(&[
        "backend",
        "rekey",
        "--from",
        &spec,
        "--passphrase-file",
        pwf,
        "--new-passphrase-file",
        pw2.to_str().unwrap(),
    ]);
    let (good, _, err) = run(
        &[
            "snapshot",
            "list",
            "--from",
            &spec,
            "--passphrase-file",
            pwf,
        ],
        &[],
    );
    assert!(!good && err.contains("wrong passphrase"), "{err}");
    let out = ok(&[
        "snapshot",
        "list",
        "--from",
        &spec,
        "--passphrase-file",
        pw2.to_str().unwrap(),
    ]);
    assert!(out.contains("secret-snapshot"));
    let after: Vec<Vec<u8>> = files(&backend)
        .iter()
        .filter(|p| !p.ends_with("snapfs-key"))
        .map(|p| fs::read(p).unwrap())
        .collect();
    assert!(before == after, "rekey must not re-encrypt objects");
    // The store's daemon still replicates (its key is the master key, unchanged).
    let m = Mount::start(&store, &mnt);
    fs::write(m.path("c"), bytes(3, 100_000)).unwrap();
    ok(&["snapshot", "create", mp, "after-rekey"]);
    ok(&["snapshot", "wait", mp, "after-rekey", "--timeout", "120s"]);
    m.stop();
}

/// --encrypt refuses a backend that already holds plain objects, and an encrypted backend
/// cannot be added without --encrypt.
#[test]
fn encrypt_needs_an_empty_backend_and_is_not_silently_dropped() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    Mount::start(&store, &tmp.path().join("mnt")).stop();
    let plain = tmp.path().join("plain");
    fs::create_dir(&plain).unwrap();
    fs::write(plain.join("snapfs-repository"), b"x").unwrap();
    let pw = tmp.path().join("pw");
    fs::write(&pw, "pw").unwrap();
    let st = store.to_str().unwrap();
    let spec = format!("dir:{}", plain.display());
    let (good, _, err) = run(
        &[
            "backend",
            "add",
            st,
            "b",
            &spec,
            "--encrypt",
            "--passphrase-file",
            pw.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!good && err.contains("empty backend"), "{err}");
    let enc = tmp.path().join("enc");
    let spec = format!("dir:{}", enc.display());
    fs::create_dir(&enc).unwrap();
    ok(&[
        "backend",
        "add",
        st,
        "e",
        &spec,
        "--encrypt",
        "--passphrase-file",
        pw.to_str().unwrap(),
    ]);
    ok(&["backend", "remove", st, "e"]);
    let (good, _, err) = run(&["backend", "add", st, "e2", &spec], &[]);
    assert!(!good && err.contains("is encrypted"), "{err}");
}
