use super::*;
use crate::replica::backend::mem::MemBackend;

type Members = Vec<(String, Arc<dyn Backend>)>;

fn mems(n: usize) -> (Vec<Arc<MemBackend>>, Members) {
    let m: Vec<Arc<MemBackend>> = (0..n).map(|_| Arc::new(MemBackend::new())).collect();
    let members = m
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("mem{i}"), b.clone() as Arc<dyn Backend>))
        .collect();
    (m, members)
}

fn down() -> Option<BackendError> {
    Some(BackendError::Transient("member down".into()))
}

#[test]
fn ec_survives_two_lost_members_and_heals_them() {
    let (m, members) = mems(6);
    let r = Redundant::new(
        "ec:4+2:test",
        Layout::Ec { k: 4, m: 2 },
        members,
        Duration::ZERO,
    )
    .unwrap();
    let obj: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    r.put("chunks/ab/x1", &obj).unwrap();
    assert_eq!(r.get("chunks/ab/x1").unwrap(), obj);
    // Members 1 and 4 die: reads still work, writes go on degraded (degrade_after 0).
    m[1].set_failure(down());
    m[4].set_failure(down());
    assert_eq!(r.get("chunks/ab/x1").unwrap(), obj);
    r.put("chunks/cd/x2", b"written while degraded").unwrap();
    let rep = r.members();
    assert_eq!(rep[1].state, "down");
    assert_eq!(rep[1].missed_objects, 1);
    assert_eq!(rep[0].state, "ok");
    assert!(r.needs_heal());
    // A third member loses its shard: x2 has only 3 of 6, cannot be rebuilt, and says so.
    m[0].delete("chunks/cd/x2").unwrap();
    let e = r.get("chunks/cd/x2").unwrap_err();
    assert!(e.to_string().contains("cannot rebuild"), "{e}");
    // Put it back; the two members return empty (disks replaced) and are healed.
    r.put("chunks/cd/x2", b"written while degraded").unwrap();
    for i in [1, 4] {
        m[i].set_failure(None);
        for n in m[i].list("").unwrap() {
            m[i].delete(&n).unwrap();
        }
    }
    // Not yet probed again: a put right now still skips them (no wait on a dead member).
    std::thread::sleep(Duration::from_millis(10));
    // Members come back once a probe or a heal reaches them.
    for i in [1, 4] {
        r.members[i].health.lock().next_probe = None;
    }
    let written = r.heal(&["chunks/".to_string()]).unwrap();
    assert_eq!(written, 4, "two objects on two members");
    assert!(!r.needs_heal());
    for i in [1, 4] {
        assert_eq!(m[i].len(), 2, "member {i} refilled");
    }
    // Now any two others may die.
    m[0].set_failure(down());
    m[2].set_failure(down());
    assert_eq!(r.get("chunks/ab/x1").unwrap(), obj);
    assert_eq!(r.get("chunks/cd/x2").unwrap(), b"written while degraded");
}

#[test]
fn a_short_failure_fails_the_put_instead_of_degrading() {
    let (m, members) = mems(2);
    let r = Redundant::new(
        "mirror:test",
        Layout::Mirror { n: 2 },
        members,
        Duration::from_secs(3600),
    )
    .unwrap();
    m[1].set_failure(down());
    let e = r.put("a", b"x").unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(r.members()[1].state, "failing");
    assert!(!r.needs_heal());
    m[1].set_failure(None);
    r.put("a", b"x").unwrap();
    assert_eq!(r.members()[1].state, "ok");
}

#[test]
fn mirror_reads_past_a_corrupt_copy_and_inspect_repairs_it() {
    let (m, members) = mems(2);
    let r = Redundant::new(
        "mirror:test",
        Layout::Mirror { n: 2 },
        members,
        Duration::ZERO,
    )
    .unwrap();
    r.put("meta/00/m", b"manifest bytes").unwrap();
    let mut env = m[0].get("meta/00/m").unwrap();
    let last = env.len() - 1;
    env[last] ^= 0x40;
    m[0].put("meta/00/m", &env).unwrap();
    assert_eq!(r.get("meta/00/m").unwrap(), b"manifest bytes");
    let ins = r.inspect("meta/00/m", false).unwrap();
    assert!(matches!(ins.members[0].1, ShardState::Bad(_)));
    assert_eq!(ins.members[1].1, ShardState::Good);
    let ins = r.inspect("meta/00/m", true).unwrap();
    assert_eq!(ins.repaired, vec![0]);
    let ins = r.inspect("meta/00/m", false).unwrap();
    assert!(ins.members.iter().all(|(_, s)| *s == ShardState::Good));
    // Every member down: the put fails, nothing is claimed.
    m[0].set_failure(down());
    m[1].set_failure(down());
    assert!(r.put("b", b"y").is_err());
    assert!(r.list("").is_err());
}

#[test]
fn exists_and_list_need_enough_members() {
    let (m, members) = mems(3);
    let r = Redundant::new(
        "ec:2+1:test",
        Layout::Ec { k: 2, m: 1 },
        members,
        Duration::ZERO,
    )
    .unwrap();
    r.put("snapshots/s1", b"marker").unwrap();
    assert!(r.exists("snapshots/s1").unwrap());
    m[2].set_failure(down());
    assert!(r.exists("snapshots/s1").unwrap());
    assert_eq!(
        r.list("snapshots/").unwrap(),
        vec!["snapshots/s1".to_string()]
    );
    m[0].delete("snapshots/s1").unwrap();
    // One copy present, one missing, one unreadable: unknown.
    assert!(r.exists("snapshots/s1").is_err());
    m[1].set_failure(down());
    assert!(r.list("").is_err());
    assert!(r.get("nothing").unwrap_err().is_transient());
}
