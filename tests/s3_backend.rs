//! The S3 backend against a real S3 server: Garage on 127.0.0.1, started by
//! `tools/garage.sh start DIR`, which exports SNAPFS_TEST_S3_ENDPOINT, SNAPFS_TEST_S3_BUCKET,
//! AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION. Without it the Garage checks are
//! skipped with a message, except in CI (CI=true), where they fail: a skipped S3 check is
//! never reported as passed there. Only 127.0.0.1 is ever contacted.

use snapfs::replica::backend::config::{new_config, open, BackendConfig};
use snapfs::replica::backend::{Backend, BackendError};
use std::time::{Duration, Instant};

struct Garage {
    endpoint: String,
    bucket: String,
    region: String,
}

/// The Garage settings from the environment; `None` (after saying so) when it is not set
/// outside CI. Panics in CI.
fn garage(test: &str) -> Option<Garage> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Some(endpoint) = var("SNAPFS_TEST_S3_ENDPOINT") else {
        if var("CI").as_deref() == Some("true") {
            panic!("{test}: Garage was not started: SNAPFS_TEST_S3_ENDPOINT is not set in CI (tools/garage.sh start DIR)");
        }
        println!("{test}: skipped: SNAPFS_TEST_S3_ENDPOINT not set (tools/garage.sh start DIR)");
        return None;
    };
    assert!(
        endpoint.starts_with("http://127.0.0.1:") || endpoint.starts_with("http://localhost:"),
        "tests only contact 127.0.0.1, not {endpoint}"
    );
    Some(Garage {
        endpoint,
        bucket: var("SNAPFS_TEST_S3_BUCKET").expect("SNAPFS_TEST_S3_BUCKET"),
        region: var("AWS_REGION").unwrap_or_else(|| "garage".into()),
    })
}

/// A unique prefix per test and run, so runs never see each other's objects.
fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("snapfs-test/{test}-{}-{nanos}", std::process::id())
}

fn cfg(g: &Garage, spec: &str) -> BackendConfig {
    new_config(
        "garage",
        1,
        spec,
        Some(&g.endpoint),
        Some(&g.region),
        None,
        &|k| std::env::var(k).ok(),
    )
    .unwrap()
}

fn backend(g: &Garage, test: &str) -> Box<dyn Backend> {
    open(&cfg(g, &format!("s3://{}/{}", g.bucket, unique(test)))).unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn round_trip_overwrite_not_found() {
    let Some(g) = garage("round_trip_overwrite_not_found") else {
        return;
    };
    let b = backend(&g, "rt");
    assert!(b.describe().contains(&g.endpoint), "{}", b.describe());
    assert_eq!(b.get("chunks/ab/abc"), Err(BackendError::NotFound));
    assert!(!b.exists("chunks/ab/abc").unwrap());
    b.put("chunks/ab/abc", b"hello").unwrap();
    assert_eq!(b.get("chunks/ab/abc").unwrap(), b"hello");
    assert!(b.exists("chunks/ab/abc").unwrap());
    b.put("chunks/ab/abc", b"hello").unwrap(); // idempotent
    assert_eq!(b.get("chunks/ab/abc").unwrap(), b"hello");
    b.put("chunks/ab/abc", b"other").unwrap();
    assert_eq!(b.get("chunks/ab/abc").unwrap(), b"other");
    b.put("empty", b"").unwrap();
    assert_eq!(b.get("empty").unwrap(), b"");
    // A chunk-sized object, byte for byte.
    let big: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    b.put("chunks/big", &big).unwrap();
    assert_eq!(b.get("chunks/big").unwrap(), big);
    for n in ["chunks/ab/abc", "empty", "chunks/big"] {
        b.delete(n).unwrap();
        assert_eq!(b.get(n), Err(BackendError::NotFound));
    }
    b.delete("chunks/ab/abc").unwrap(); // absent: Ok
    assert!(matches!(
        b.put("../x", b"x"),
        Err(BackendError::Permanent(_))
    ));
}

#[test]
fn list_by_prefix_and_delete() {
    let Some(g) = garage("list_by_prefix_and_delete") else {
        return;
    };
    let b = backend(&g, "list");
    assert!(b.list("").unwrap().is_empty());
    let names = [
        "chunks/ab/x",
        "chunks/ac/y",
        "chunks/bb/z",
        "snapshots/a",
        "snapshots/b",
        "top",
    ];
    for n in names {
        b.put(n, n.as_bytes()).unwrap();
    }
    assert_eq!(
        sorted(b.list("").unwrap()),
        sorted(names.iter().map(|s| s.to_string()).collect())
    );
    assert_eq!(
        sorted(b.list("snapshots/").unwrap()),
        vec!["snapshots/a", "snapshots/b"]
    );
    assert_eq!(
        sorted(b.list("chunks/a").unwrap()),
        vec!["chunks/ab/x", "chunks/ac/y"]
    );
    assert_eq!(b.list("t").unwrap(), vec!["top"]);
    assert!(b.list("nothing/").unwrap().is_empty());
    // Another prefix in the same bucket sees none of it.
    let other = backend(&g, "list-other");
    assert!(other.list("").unwrap().is_empty());
    for n in names {
        b.delete(n).unwrap();
    }
    assert!(b.list("").unwrap().is_empty());
}

#[test]
fn concurrent_uploaders() {
    let Some(g) = garage("concurrent_uploaders") else {
        return;
    };
    let b = backend(&g, "conc");
    std::thread::scope(|s| {
        for t in 0..4 {
            let b = &b;
            s.spawn(move || {
                for i in 0..10 {
                    let n = format!("chunks/{t}/{i}");
                    b.put(&n, n.as_bytes()).unwrap();
                    assert_eq!(b.get(&n).unwrap(), n.as_bytes());
                }
            });
        }
    });
    let names = b.list("chunks/").unwrap();
    assert_eq!(names.len(), 40);
    for n in names {
        b.delete(&n).unwrap();
    }
}

#[test]
fn wrong_secret_is_permanent() {
    let Some(g) = garage("wrong_secret_is_permanent") else {
        return;
    };
    let mut c = cfg(&g, &format!("s3://{}/{}", g.bucket, unique("badkey")));
    c.credentials.as_mut().unwrap().secret_access_key = "0".repeat(64);
    let b = open(&c).unwrap();
    let start = Instant::now();
    for r in [
        b.put("x", b"x").map(|_| ()),
        b.get("x").map(|_| ()),
        b.list("").map(|_| ()),
    ] {
        match r {
            Err(BackendError::Permanent(m)) => {
                assert!(!m.contains(&"0".repeat(64)), "secret in {m}")
            }
            other => panic!("expected Permanent, got {other:?}"),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn missing_bucket_is_permanent() {
    let Some(g) = garage("missing_bucket_is_permanent") else {
        return;
    };
    let b = open(&cfg(&g, "s3://snapfs-no-such-bucket-0451")).unwrap();
    assert!(
        matches!(b.put("x", b"x"), Err(BackendError::Permanent(_))),
        "{:?}",
        b.put("x", b"x")
    );
    assert!(
        matches!(b.get("x"), Err(BackendError::Permanent(_))),
        "{:?}",
        b.get("x")
    );
    assert!(
        matches!(b.list(""), Err(BackendError::Permanent(_))),
        "{:?}",
        b.list("")
    );
}

/// Nothing listening: Transient, and quickly (object_store's retries are bounded). Needs no
/// Garage, so it always runs.
#[test]
fn closed_port_is_transient_and_quick() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again here
    let env = |k: &str| match k {
        "AWS_ACCESS_KEY_ID" => Some("GKnobody".to_string()),
        "AWS_SECRET_ACCESS_KEY" => Some("nothing".to_string()),
        _ => None,
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let c = new_config(
        "closed",
        1,
        "s3://bucket/p",
        Some(&endpoint),
        Some("garage"),
        None,
        &env,
    )
    .unwrap();
    let b = open(&c).unwrap();
    type Op<'a> = Box<dyn Fn() -> Result<(), BackendError> + 'a>;
    let ops: Vec<(&str, Op)> = vec![
        ("put", Box::new(|| b.put("x", b"x"))),
        ("get", Box::new(|| b.get("x").map(|_| ()))),
        ("exists", Box::new(|| b.exists("x").map(|_| ()))),
        ("list", Box::new(|| b.list("").map(|_| ()))),
        ("delete", Box::new(|| b.delete("x"))),
    ];
    for (what, op) in ops {
        let start = Instant::now();
        match op() {
            Err(BackendError::Transient(_)) => {}
            other => panic!("{what}: expected Transient, got {other:?}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: {:?}",
            start.elapsed()
        );
    }
}
