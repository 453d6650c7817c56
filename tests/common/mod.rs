//! Shared helpers for tests that mount snapfs through the kernel.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_snapfs"))
}

/// Runs the snapfs CLI: (success, stdout, stderr).
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the snapfs CLI and fails the test if it fails; returns stdout.
pub fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let (success, out, err) = cli(args);
    assert!(success, "snapfs {args:?} failed: {err}");
    out
}

/// Mount tests need /dev/fuse; without it they say so and return.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if !std::path::Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED: /dev/fuse is absent, this test needs a real FUSE mount");
            return;
        }
    };
}

pub fn is_mounted(mnt: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mnt.to_string_lossy().replace(' ', "\\040");
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&want.as_str())
            && (l.contains(" - fuse ") || l.contains(" - fuse.snapfs "))
    })
}

pub struct Mount {
    pub child: Option<Child>,
    pub store: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl Mount {
    pub fn start(store: &Path, mnt: &Path) -> Mount {
        Self::start_with(store, mnt, &[])
    }

    pub fn start_with(store: &Path, mnt: &Path, extra: &[&str]) -> Mount {
        let mut cmd = Command::new(bin());
        cmd.arg("mount").arg(store).arg(mnt).args(extra);
        Self::spawn(cmd, store, mnt)
    }

    /// Starts `cmd` (a command that ends up running `snapfs mount STORE MNT ...`) and waits
    /// for the mount to appear; its output goes to `STORE.log`.
    pub fn spawn(cmd: Command, store: &Path, mnt: &Path) -> Mount {
        Self::spawn_logged(cmd, store, mnt, &store.with_extension("log"))
    }

    /// `spawn`, with the daemon's output in `log`.
    pub fn spawn_logged(mut cmd: Command, store: &Path, mnt: &Path, log: &Path) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        let log = log.to_path_buf();
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn snapfs mount");
        let mut m = Mount {
            child: Some(child),
            store: store.to_path_buf(),
            mnt: mnt.canonicalize().unwrap(),
            log,
        };
        let start = Instant::now();
        while !is_mounted(&m.mnt) {
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("snapfs mount exited with {st}: {}", m.log_tail());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mount timed out: {}",
                m.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Clean unmount through the CLI; waits for the daemon to exit 0.
    pub fn stop(mut self) {
        let st = Command::new(bin())
            .arg("umount")
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "snapfs umount failed: {}", self.log_tail());
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "daemon exited with {st}: {}", self.log_tail());
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "daemon did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the daemon, then detach the dead mount.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A xorshift generator: tests print their seed so a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("SNAPFS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("seed: {seed} (replay with SNAPFS_TEST_SEED={seed})");
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Fast deterministic bytes, different for every seed and offset (no dedup between files).
pub fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Flips one bit of the first RocksDB blob record holding `needle` in a closed store (random
/// data is stored raw, so its bytes are found as they are). Returns whether it was found.
pub fn corrupt_blob(store: &Path, needle: &[u8]) -> bool {
    let mut hit = false;
    for e in std::fs::read_dir(store.join("db")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "blob") {
            let mut b = std::fs::read(&p).unwrap();
            if let Some(i) = b.windows(needle.len()).position(|w| w == needle) {
                b[i + 10] ^= 0x01;
                std::fs::write(&p, &b).unwrap();
                hit = true;
            }
        }
    }
    hit
}

/// Every file under a `dir:` backend or member (relative names, sorted).
pub fn dir_objects(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Path -> blake3 (hex) of every regular file under `root`, `.snapshots` left out.
pub fn file_hashes(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == ".snapshots" {
                continue;
            }
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            } else {
                let h = blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string();
                out.insert(rel, h);
            }
        }
    }
    out
}
