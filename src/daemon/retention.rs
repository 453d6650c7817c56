//! The daemon's automatic snapshots and their retention; the rules themselves are the
//! core's (`fs::keep`), shared with backend retention (`replica::prune`).

pub use crate::fs::keep::{select, Candidate, Policy};
use crate::fs::SnapshotInfo;

/// What the daemon's automatic retention deletes: only snapshots it took itself (recorded in
/// the snapshot record), never a manual one, whatever its name.
pub fn automatic_victims(list: &[SnapshotInfo], p: &Policy) -> Vec<String> {
    let autos: Vec<Candidate> = list
        .iter()
        .filter(|s| s.automatic)
        .map(|s| Candidate {
            name: s.name.clone(),
            id: s.epoch,
            created: s.created,
        })
        .collect();
    select(&autos, p).1
}

/// A name for an automatic snapshot at `t` that no snapshot has yet: `auto-<UTC time>`, with
/// `-2`, `-3`... appended when that is taken (two in one second, or the clock set back).
pub fn unique_auto_name(t: i64, exists: impl Fn(&str) -> bool) -> String {
    let base = auto_name(t);
    if !exists(&base) {
        return base;
    }
    (2u64..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !exists(n))
        .expect("an unused suffix exists")
}

/// Snapshot name for an automatic snapshot taken at `t`.
pub fn auto_name(t: i64) -> String {
    format!("auto-{}", crate::daemon::ops::rfc3339(t))
}

/// Parses durations such as `90s`, `10m`, `2h`, `1d`, `1h 30m` (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("bad duration {s:?} ({e}): use e.g. 30s, 10m, 2h, 1d"))?;
    if d.is_zero() {
        return Err("duration must be positive".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last(n: usize) -> Policy {
        Policy {
            last: n,
            ..Default::default()
        }
    }

    #[test]
    fn automatic_retention_never_deletes_a_manual_snapshot() {
        let info = |name: &str, epoch: u64, automatic: bool| SnapshotInfo {
            name: name.to_string(),
            epoch,
            created: epoch as i64 * 60,
            created_nanos: 0,
            automatic,
            pending: false,
        };
        let list = vec![
            info("auto-by-hand", 1, false),
            info("auto-1970-01-01T00:02:00Z", 2, true),
            info("manual", 3, false),
            info("auto-1970-01-01T00:04:00Z", 4, true),
        ];
        assert_eq!(
            automatic_victims(&list, &last(1)),
            vec!["auto-1970-01-01T00:02:00Z"]
        );
    }

    #[test]
    fn auto_names_are_unique() {
        let taken = ["auto-1970-01-01T00:00:00Z", "auto-1970-01-01T00:00:00Z-2"];
        assert_eq!(
            unique_auto_name(0, |n| taken.contains(&n)),
            "auto-1970-01-01T00:00:00Z-3"
        );
        assert_eq!(unique_auto_name(1, |n| taken.contains(&n)), auto_name(1));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(auto_name(0), "auto-1970-01-01T00:00:00Z");
    }
}
