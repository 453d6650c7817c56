//! Automatic retention through the real daemon (issue 7, defect 4): it deletes only the
//! snapshots automatic snapshotting took, never a manual one named `auto-…`, and always keeps
//! the one it just took.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, Mount};

fn list(mnt: &std::path::Path) -> Vec<serde_json::Value> {
    let o = Command::new(bin())
        .args(["snapshot", "list", "--json"])
        .arg(mnt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array().cloned().unwrap_or_default()
}

#[test]
fn automatic_retention_keeps_manual_auto_named_snapshots() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let m = Mount::start_with(
        &t.path().join("store"),
        &t.path().join("mnt"),
        &["--snapshot-every", "1s", "--keep-last", "1"],
    );
    std::fs::write(m.path("f"), b"x").unwrap();
    let o = Command::new(bin())
        .args(["snapshot", "create"])
        .arg(&m.mnt)
        .arg("auto-1970-01-01T00:00:00Z")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    // Wait for at least three automatic snapshots to have been taken and pruned.
    let start = Instant::now();
    let mut max_auto_id = 0;
    loop {
        let rows = list(&m.mnt);
        let autos: Vec<&serde_json::Value> =
            rows.iter().filter(|r| r["automatic"] == true).collect();
        let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert!(
            names.contains(&"auto-1970-01-01T00:00:00Z"),
            "the manual snapshot was deleted: {names:?}"
        );
        assert!(autos.len() <= 2, "retention did not run: {names:?}");
        if let Some(id) = autos.iter().filter_map(|r| r["id"].as_u64()).max() {
            max_auto_id = max_auto_id.max(id);
        }
        let manual_id = rows
            .iter()
            .find(|r| r["name"] == "auto-1970-01-01T00:00:00Z")
            .and_then(|r| r["id"].as_u64())
            .unwrap();
        if max_auto_id > manual_id + 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no automatic snapshots: {}",
            m.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    m.stop();
}
