//! Which snapshots a `--keep-*` policy keeps (restic's `forget` semantics): `last N` keeps the
//! N newest; `hourly N` keeps the newest snapshot of each of the N newest hours that have one;
//! likewise daily and weekly (ISO weeks, UTC). A snapshot kept by any rule is kept.

use crate::ops::utc;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: usize,
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// (name, created unix seconds) in any order -> names to keep, names to delete.
pub fn select(snapshots: &[(String, i64)], p: &Policy) -> (Vec<String>, Vec<String>) {
    let mut sorted: Vec<&(String, i64)> = snapshots.iter().collect();
    // Newest first; the name breaks ties so the result does not depend on input order.
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut keep = vec![false; sorted.len()];
    for k in keep.iter_mut().take(p.last) {
        *k = true;
    }
    type Bucket = fn(i64) -> i64;
    let buckets: [(usize, Bucket); 3] = [
        (p.hourly, |t| t.div_euclid(3600)),
        (p.daily, |t| t.div_euclid(86400)),
        (p.weekly, iso_week),
    ];
    for (n, bucket) in buckets {
        let mut seen = Vec::new();
        for (i, s) in sorted.iter().enumerate() {
            if seen.len() >= n {
                break;
            }
            let b = bucket(s.1);
            if !seen.contains(&b) {
                seen.push(b);
                keep[i] = true;
            }
        }
    }
    let mut kept = Vec::new();
    let mut gone = Vec::new();
    for (i, s) in sorted.iter().enumerate() {
        if keep[i] {
            kept.push(s.0.clone());
        } else {
            gone.push(s.0.clone());
        }
    }
    (kept, gone)
}

/// A number identifying the ISO week (Monday start) of a timestamp.
fn iso_week(t: i64) -> i64 {
    let days = t.div_euclid(86400);
    // 1970-01-01 was a Thursday: shift so that weeks start on Monday.
    (days + 3).div_euclid(7)
}

/// Snapshot name for an automatic snapshot taken at `t`.
pub fn auto_name(t: i64) -> String {
    let (y, mo, d, h, mi, s) = utc(t);
    format!("auto-{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Parses durations such as `90s`, `10m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 30s, 10m, 2h, 1d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m, h or d")),
    };
    if secs == 0 {
        return Err("duration must be positive".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(times: &[i64]) -> Vec<(String, i64)> {
        times.iter().map(|t| (format!("s{t}"), *t)).collect()
    }

    #[test]
    fn keep_last() {
        let (k, g) = select(
            &snaps(&[1, 2, 3, 4]),
            &Policy {
                last: 2,
                ..Default::default()
            },
        );
        assert_eq!(k, vec!["s4", "s3"]);
        assert_eq!(g, vec!["s2", "s1"]);
    }

    #[test]
    fn keep_hourly_takes_newest_per_hour() {
        let h = 3600;
        let s = snaps(&[10, 20, h + 5, h + 50, 2 * h + 1, 5 * h]);
        let (k, _) = select(
            &s,
            &Policy {
                hourly: 3,
                ..Default::default()
            },
        );
        assert_eq!(
            k,
            vec![
                format!("s{}", 5 * h),
                format!("s{}", 2 * h + 1),
                format!("s{}", h + 50)
            ]
        );
    }

    #[test]
    fn rules_combine_and_empty_policy_keeps_nothing() {
        let d = 86400;
        let s = snaps(&[0, d, 2 * d, 2 * d + 60]);
        let (k, g) = select(
            &s,
            &Policy {
                last: 1,
                daily: 2,
                ..Default::default()
            },
        );
        assert_eq!(k, vec![format!("s{}", 2 * d + 60), format!("s{d}")]);
        assert_eq!(g.len(), 2);
        let (k, _) = select(&s, &Policy::default());
        assert!(k.is_empty());
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-11-22 is a Sunday, 2026-11-23 a Monday.
        let sunday = 1_795_305_600;
        assert_eq!(iso_week(sunday), iso_week(sunday - 6 * 86400));
        assert_ne!(iso_week(sunday), iso_week(sunday + 86400));
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
