use std::time::Duration;

use super::*;
use crate::replica::backend::mem::MemBackend;
use crate::replica::backend::AppendOnly;
use crate::replica::format::{Body, Entry, MapItem, Marker};
use crate::storage::inode::{Kind, Time};

fn entry(name: &[u8], kind: Kind, body: Body) -> Entry {
    Entry {
        name: name.to_vec(),
        kind,
        ino: 1,
        perm: 0o644,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 1,
        rdev: 0,
        atime: Time::default(),
        mtime: Time::default(),
        ctime: Time::default(),
        xattrs: Vec::new(),
        body,
    }
}

fn chunk_id(n: u8) -> [u8; 32] {
    [n; 32]
}

/// Snapshot `name` (id `epoch`) of one file whose chunks are `chunks`.
fn snapshot(b: &MemBackend, name: &str, epoch: u64, chunks: &[u8]) {
    let items: Vec<MapItem> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| MapItem {
            index: i as u64,
            id: chunk_id(*c),
            len: 4096,
        })
        .collect();
    for c in chunks {
        b.put(&format::chunk_name(&chunk_id(*c)), b"chunk").unwrap();
    }
    let (mh, mo) = format::map_object(&items);
    b.put(&format::meta_name(&mh), &mo).unwrap();
    let (th, to) = format::tree_object(&[entry(b"f", Kind::File, Body::File(Some(mh)))]);
    b.put(&format::meta_name(&th), &to).unwrap();
    let m = Marker {
        name: name.into(),
        epoch,
        created: Time {
            secs: 1000 + epoch as i64,
            nanos: 0,
        },
        automatic: false,
        chunk_size: 4096,
        root: entry(b"", Kind::Dir, Body::Dir(th)),
        files: 1,
        bytes: 0,
    };
    b.put(&format::marker_name(name), &format::marker_object(&m))
        .unwrap();
}

fn opts(last: usize, dry_run: bool) -> Options {
    Options {
        policy: Policy {
            last,
            ..Default::default()
        },
        dry_run,
        grace: Duration::from_millis(10), // raised to MIN_GRACE
    }
}

fn names(b: &MemBackend, prefix: &str) -> Vec<String> {
    let mut v = b.list(prefix).unwrap();
    v.sort();
    v
}

/// Four snapshots sharing chunk 1, each with one chunk of its own, and garbage: an
/// unreferenced chunk and an unreferenced metadata object.
fn repo() -> MemBackend {
    let b = MemBackend::new();
    for i in 1..=4u8 {
        snapshot(&b, &format!("s{i}"), i as u64, &[1, 10 + i]);
    }
    b.put(&format::chunk_name(&chunk_id(99)), b"orphan")
        .unwrap();
    let (h, o) = format::tree_object(&[]);
    b.put(&format::meta_name(&h), &o).unwrap();
    b
}

#[test]
fn keeps_the_policy_and_deletes_exactly_the_unreferenced() {
    let b = repo();
    let before = b.len();
    let dry = run(&b, &opts(2, true), &mut |_| {}).unwrap();
    assert_eq!(b.len(), before, "a dry run deletes nothing");
    assert!(b.get(STATE_NAME).is_err(), "a dry run writes nothing");
    let rep = run(&b, &opts(2, false), &mut |_| {}).unwrap();
    assert_eq!(rep.snapshots_kept, vec!["s4", "s3"]);
    assert_eq!(rep.snapshots_dropped, vec!["s2", "s1"]);
    // Deleted: chunks 11, 12, 99; the maps and trees of s1 and s2 and the empty tree.
    assert_eq!((rep.chunks_deleted, rep.metas_deleted), (3, 5));
    assert_eq!((rep.chunks_kept, rep.metas_kept), (3, 4));
    assert_eq!(
        (dry.chunks_deleted, dry.metas_deleted, dry.snapshots_dropped),
        (3, 5, rep.snapshots_dropped.clone())
    );
    assert_eq!(
        names(&b, "snapshots/"),
        vec!["snapshots/s3", "snapshots/s4"]
    );
    let chunks = names(&b, "chunks/");
    let want: Vec<String> = [1u8, 13, 14]
        .iter()
        .map(|c| format::chunk_name(&chunk_id(*c)))
        .collect();
    let mut want = want;
    want.sort();
    assert_eq!(chunks, want);
    assert_eq!(names(&b, "meta/").len(), 4);
    // Every kept snapshot still walks.
    let kept = recover::list_snapshots(&b).unwrap();
    reach::walk(&b, &kept, &mut || Ok(())).unwrap();
    let st = read_state(&b).unwrap();
    assert_eq!((st.generation, st.sweeping), (1, false));
    // A second prune finds nothing more to delete and takes the next generation.
    let again = run(&b, &opts(2, false), &mut |_| {}).unwrap();
    assert_eq!((again.chunks_deleted, again.metas_deleted), (0, 0));
    assert_eq!(again.generation, 2);
}

#[test]
fn keep_all_deletes_only_garbage() {
    let b = repo();
    let rep = run(&b, &opts(0, false), &mut |_| {}).unwrap();
    assert_eq!(rep.snapshots_kept.len(), 4);
    assert!(rep.snapshots_dropped.is_empty());
    assert_eq!((rep.chunks_deleted, rep.metas_deleted), (1, 1));
}

#[test]
fn a_damaged_kept_snapshot_stops_it_before_any_delete() {
    let b = repo();
    // s4's tree goes missing.
    let m = recover::list_snapshots(&b).unwrap().pop().unwrap();
    let Body::Dir(t) = m.root.body else { panic!() };
    b.delete(&format::meta_name(&t)).unwrap();
    let before = b.len();
    let e = run(&b, &opts(2, false), &mut |_| {}).unwrap_err();
    assert!(e.contains("snapshot s4") && e.contains("missing"), "{e}");
    assert!(e.contains("deletes nothing"), "{e}");
    // Only the state object was written; it says the prune is over.
    assert_eq!(b.len(), before + 1);
    assert!(!read_state(&b).unwrap().sweeping);
}

#[test]
fn an_append_only_backend_loses_nothing() {
    let inner = repo();
    let before = names(&inner, "");
    let b = AppendOnly(Box::new(inner));
    let e = run(&b, &opts(1, false), &mut |_| {}).unwrap_err();
    assert!(e.contains("append-only"), "{e}");
    let after: Vec<String> = {
        let mut v = b.list("").unwrap();
        v.retain(|n| n != STATE_NAME);
        v.sort();
        v
    };
    assert_eq!(after, before);
}

#[test]
fn an_abandoned_prune_is_taken_over_and_a_live_one_refused() {
    let b = repo();
    let stale = PruneState {
        generation: 7,
        sweeping: true,
        interval_ms: 100,
        host: "h".into(),
        ..Default::default()
    };
    b.put(STATE_NAME, &state_object(&stale)).unwrap();
    let rep = run(&b, &opts(2, false), &mut |_| {}).unwrap();
    assert_eq!(rep.generation, 8);
    // A live one: its heartbeat moves while we watch.
    b.put(STATE_NAME, &state_object(&stale)).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut st = stale.clone();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                st.heartbeat += 1;
                b.put(STATE_NAME, &state_object(&st)).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let e = run(&b, &opts(2, false), &mut |_| {});
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let e = e.unwrap_err();
        assert!(e.contains("another prune is running"), "{e}");
    });
}

#[test]
fn state_round_trips_and_hostile_states_are_refused() {
    let s = PruneState {
        generation: 3,
        sweeping: true,
        started_ms: 5,
        grace_ms: 6,
        heartbeat: 7,
        interval_ms: 8,
        host: "node-1".into(),
    };
    let o = state_object(&s);
    assert_eq!(open_state(&o).unwrap(), s);
    for cut in [0, 8, 20, o.len() - 1] {
        assert!(open_state(&o[..cut]).is_err(), "{cut}");
    }
    let mut flipped = o.clone();
    flipped[12] ^= 1;
    assert!(open_state(&flipped).is_err());
}
