use super::*;
use std::collections::HashMap;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| m.get(k).cloned()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn specs() {
    assert_eq!(
        parse_spec("dir:/srv/backup"),
        Ok(SpecKind::Dir("/srv/backup".into()))
    );
    assert!(parse_spec("dir:rel")
        .unwrap_err()
        .contains("dir: needs an absolute path"));
    assert!(parse_spec("dir:")
        .unwrap_err()
        .contains("dir: needs an absolute path"));
    assert_eq!(
        parse_spec("s3://my-bucket.1"),
        Ok(SpecKind::S3 {
            bucket: "my-bucket.1".into(),
            prefix: None
        })
    );
    assert_eq!(
        parse_spec("s3://bkt/a/b/"),
        Ok(SpecKind::S3 {
            bucket: "bkt".into(),
            prefix: Some("a/b".into())
        })
    );
    assert_eq!(
        parse_spec("s3://bkt/"),
        Ok(SpecKind::S3 {
            bucket: "bkt".into(),
            prefix: None
        })
    );
    assert!(parse_spec("s3://")
        .unwrap_err()
        .contains("s3:// needs a bucket"));
    assert!(parse_spec("s3:///x")
        .unwrap_err()
        .contains("s3:// needs a bucket"));
    let long = "b".repeat(64);
    for bad in [
        "s3://ab",
        "s3://Upper",
        "s3://-bkt",
        "s3://bkt-",
        "s3://b_k_t",
        &format!("s3://{long}"),
    ] {
        assert!(
            parse_spec(bad).unwrap_err().contains("bad bucket name"),
            "{bad}"
        );
    }
    assert!(parse_spec("s3://bkt/a/../b")
        .unwrap_err()
        .contains("bad prefix"));
    assert!(parse_spec("s3://bkt/a//b").is_err());
    assert!(parse_spec("/srv/backup")
        .unwrap_err()
        .contains("unknown backend"));
    assert!(parse_spec("gs://x").is_err());
}

#[test]
fn backend_names() {
    assert!(check_backend_name("off-site_1").is_ok());
    assert!(check_backend_name(&"a".repeat(64)).is_ok());
    for bad in ["", "a.b", "a/b", "..", "a b", &"a".repeat(65)] {
        assert!(check_backend_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn credentials_from_environment_first() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = FILEID\naws_secret_access_key = FILESECRET\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let env = env_of(&[
        ("AWS_ACCESS_KEY_ID", "ENVID"),
        ("AWS_SECRET_ACCESS_KEY", "ENVSECRET"),
        ("AWS_SESSION_TOKEN", "TOK"),
        ("AWS_SHARED_CREDENTIALS_FILE", f),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:3900"),
        ("AWS_DEFAULT_REGION", "dflt"),
    ]);
    let r = resolve_s3(None, None, &env).unwrap();
    assert_eq!(r.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
    assert_eq!(r.region.as_deref(), Some("dflt"));
    let c = r.credentials.unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.as_str()),
        ("ENVID", "ENVSECRET")
    );
    assert_eq!(c.session_token.as_deref(), Some("TOK"));
    // Options win over the environment; AWS_REGION over AWS_DEFAULT_REGION.
    let r = resolve_s3(Some("http://127.0.0.1:1"), Some("garage"), &env).unwrap();
    assert_eq!(r.endpoint.as_deref(), Some("http://127.0.0.1:1"));
    assert_eq!(r.region.as_deref(), Some("garage"));
    assert_eq!(r.credentials.unwrap().access_key_id, "ENVID");
    let env2 = env_of(&[
        ("AWS_REGION", "r1"),
        ("AWS_DEFAULT_REGION", "r2"),
        ("HOME", "/nonexistent"),
    ]);
    let want = S3Settings {
        region: Some("r1".into()),
        ..S3Settings::default()
    };
    assert_eq!(resolve_s3(None, None, &env2).unwrap(), want);
    // Half an environment is an error, not a silent fall-through.
    let half = env_of(&[
        ("AWS_ACCESS_KEY_ID", "ENVID"),
        ("AWS_SHARED_CREDENTIALS_FILE", f),
    ]);
    assert!(resolve_s3(None, None, &half)
        .unwrap_err()
        .contains("AWS_SECRET_ACCESS_KEY"));
}

#[test]
fn credentials_file_profiles() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join(".aws")).unwrap();
    std::fs::write(
        t.path().join(".aws/credentials"),
        "# comment\n[default]\naws_access_key_id=DEFID\naws_secret_access_key = DEFSECRET\n\n\
         [profile work]\n; other comment\nAWS_ACCESS_KEY_ID = WORKID\naws_secret_access_key= WORK=SECRET\n\
         aws_session_token = WTOK\n[broken]\naws_access_key_id = X\n",
    )
    .unwrap();
    let home = t.path().to_str().unwrap();
    let c = resolve_s3(None, None, &env_of(&[("HOME", home)]))
        .unwrap()
        .credentials
        .unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.as_str()),
        ("DEFID", "DEFSECRET")
    );
    assert_eq!(c.session_token, None);
    let c = resolve_s3(
        None,
        None,
        &env_of(&[("HOME", home), ("AWS_PROFILE", "work")]),
    )
    .unwrap()
    .credentials
    .unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.as_str()),
        ("WORKID", "WORK=SECRET")
    );
    assert_eq!(c.session_token.as_deref(), Some("WTOK"));
    assert!(resolve_s3(
        None,
        None,
        &env_of(&[("HOME", home), ("AWS_PROFILE", "broken")])
    )
    .is_err());
    assert_eq!(
        resolve_s3(
            None,
            None,
            &env_of(&[("HOME", home), ("AWS_PROFILE", "none")])
        )
        .unwrap()
        .credentials,
        None
    );
    // AWS_SHARED_CREDENTIALS_FILE wins over HOME; a missing file is no credentials.
    let other = t.path().join("missing");
    let env = env_of(&[
        ("HOME", home),
        ("AWS_SHARED_CREDENTIALS_FILE", other.to_str().unwrap()),
    ]);
    assert_eq!(resolve_s3(None, None, &env).unwrap().credentials, None);
}

#[test]
fn new_config_and_open() {
    let none = env_of(&[("HOME", "/nonexistent")]);
    let e = new_config("b", 1, "s3://bkt/p", None, None, None, &none).unwrap_err();
    assert!(
        e.contains("no credentials for s3://bkt/p: set AWS_ACCESS_KEY_ID"),
        "{e}"
    );
    let env = env_of(&[
        ("AWS_ACCESS_KEY_ID", "ID"),
        ("AWS_SECRET_ACCESS_KEY", "SECRET"),
    ]);
    let cfg = new_config(
        "b",
        1,
        "s3://bkt/p",
        Some("http://127.0.0.1:3900"),
        Some("garage"),
        Some(1000),
        &env,
    )
    .unwrap();
    assert_eq!(
        cfg.credentials.as_ref().unwrap().secret_access_key,
        "SECRET"
    );
    assert!(
        !format!("{cfg:?}").contains("SECRET"),
        "Debug must not show the secret"
    );
    let b = open(&cfg).unwrap();
    assert_eq!(b.describe(), "s3://bkt/p (http://127.0.0.1:3900)");
    let mut nocreds = cfg.clone();
    nocreds.credentials = None;
    assert!(open_with_env(&nocreds, &none)
        .err()
        .unwrap()
        .contains("no credentials"));
    assert!(new_config("bad.name", 1, "dir:/x", None, None, None, &none).is_err());
    assert!(new_config(
        "d",
        1,
        "dir:/x",
        Some("http://127.0.0.1:1"),
        None,
        None,
        &none
    )
    .is_err());
    let d = new_config("d", 2, "dir:/x", None, None, None, &none).unwrap();
    assert_eq!(open(&d).unwrap().describe(), "dir:/x");
    let mut rel = d.clone();
    rel.spec = "dir:x".into();
    assert!(open(&rel).err().unwrap().contains("absolute"));
}

#[test]
fn save_load_remove() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path();
    assert_eq!(load_all(store).unwrap(), vec![]);
    assert!(!remove(store, "x").unwrap());
    let env = env_of(&[
        ("AWS_ACCESS_KEY_ID", "ID"),
        ("AWS_SECRET_ACCESS_KEY", "SECRET"),
    ]);
    let s3 = new_config(
        "offsite",
        1,
        "s3://bkt",
        Some("http://127.0.0.1:3900"),
        None,
        None,
        &env,
    )
    .unwrap();
    let dir = new_config("local", 2, "dir:/srv/b", None, None, Some(5), &env).unwrap();
    save(store, &s3).unwrap();
    save(store, &dir).unwrap();
    assert_eq!(mode(&store.join("backends")), 0o700);
    assert_eq!(mode(&store.join("backends/offsite.json")), 0o600);
    assert_eq!(load_all(store).unwrap(), vec![dir.clone(), s3.clone()]);
    // Overwrite is atomic and leaves no temporary file.
    let mut s3b = s3.clone();
    s3b.limit_bytes_per_sec = Some(7);
    save(store, &s3b).unwrap();
    let files: Vec<_> = std::fs::read_dir(store.join("backends"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(load_all(store).unwrap(), vec![dir.clone(), s3b]);
    // Strangers, broken files and misnamed files are skipped.
    std::fs::write(store.join("backends/junk.json"), b"{not json").unwrap();
    std::fs::write(store.join("backends/README"), b"x").unwrap();
    std::fs::write(
        store.join("backends/other.json"),
        serde_json::to_vec(&dir).unwrap(),
    )
    .unwrap();
    assert_eq!(load_all(store).unwrap().len(), 2);
    assert!(remove(store, "offsite").unwrap());
    assert!(!remove(store, "offsite").unwrap());
    assert_eq!(load_all(store).unwrap(), vec![dir]);
    assert!(remove(store, "../x").is_err());
    // A loose mode on backends/ is tightened by the next save.
    std::fs::set_permissions(
        store.join("backends"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    save(store, &s3).unwrap();
    assert_eq!(mode(&store.join("backends")), 0o700);
}

#[test]
fn symlinked_backends_dir_refused() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&store).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, store.join("backends")).unwrap();
    let cfg = new_config("local", 1, "dir:/srv/b", None, None, None, &env_of(&[])).unwrap();
    assert!(save(&store, &cfg).is_err());
    assert!(load_all(&store).is_err());
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // A symlinked config file is skipped, not followed.
    std::fs::remove_file(store.join("backends")).unwrap();
    save(&store, &cfg).unwrap();
    let mut x = cfg.clone();
    x.name = "x".into();
    std::fs::write(elsewhere.join("x.json"), serde_json::to_vec(&x).unwrap()).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("x.json"), store.join("backends/x.json")).unwrap();
    assert_eq!(load_all(&store).unwrap(), vec![cfg]);
}

#[test]
fn redundant_specs() {
    use crate::replica::backend::redundant::Layout;
    let m = parse_spec("mirror:dir:/a,dir:/b").unwrap();
    let SpecKind::Redundant { layout, members } = &m else {
        panic!("{m:?}")
    };
    assert_eq!(*layout, Layout::Mirror { n: 2 });
    assert_eq!(members[1].0, "dir:/b");
    let e = parse_spec("ec:4+2:dir:/0,dir:/1,dir:/2,dir:/3,s3://bkt/p,dir:/5").unwrap();
    assert!(matches!(
        e,
        SpecKind::Redundant {
            layout: Layout::Ec { k: 4, m: 2 },
            ..
        }
    ));
    assert_eq!(e.plain_members().len(), 6);
    for bad in [
        "mirror:dir:/a",               // one member
        "mirror:dir:/a,dir:/a",        // twice
        "mirror:dir:/a,mirror:dir:/b", // nested
        "ec:4+2:dir:/a,dir:/b",        // too few
        "ec:0+2:dir:/a,dir:/b",        // k 0
        "ec:4-2:dir:/a",               // syntax
        "ec:30+3:dir:/a",              // too many
        "mirror:dir:rel,dir:/b",       // a bad member
    ] {
        assert!(parse_spec(bad).is_err(), "{bad}");
    }
    // S3 members need credentials; dir-only redundant specs refuse an endpoint.
    let none = |_: &str| None;
    assert!(new_config("r", 1, "mirror:dir:/a,s3://bkt", None, None, None, &none).is_err());
    assert!(new_config(
        "r",
        1,
        "mirror:dir:/a,dir:/b",
        Some("http://x"),
        None,
        None,
        &none
    )
    .is_err());
    assert!(new_config("r", 1, "mirror:dir:/a,dir:/b", None, None, None, &none).is_ok());
}
