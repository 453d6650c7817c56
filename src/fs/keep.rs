//! Which snapshots a `--keep-*` policy keeps (restic's `forget` semantics, ordered by id):
//! "newest" always means the highest snapshot id (the epoch, which only grows), never the
//! wall clock, which can be set back or run fast. `last N` keeps the N highest ids; `hourly N`
//! walks the snapshots from the highest id down and keeps the first one met in each hour
//! (of its creation time, UTC) until N hours have one; likewise daily and weekly (ISO weeks,
//! UTC). A snapshot kept by any rule is kept; the newest snapshot is kept by every non-empty
//! policy, so one just taken is never deleted, whatever its time says.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
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

/// One snapshot as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// The snapshot id (epoch): the order of creation.
    pub id: u64,
    /// Creation time, Unix seconds: used only to put snapshots into hours, days and weeks.
    pub created: i64,
}

/// Candidates in any order -> names to keep, names to delete (each newest first, by id).
pub fn select(snapshots: &[Candidate], p: &Policy) -> (Vec<String>, Vec<String>) {
    let mut sorted: Vec<&Candidate> = snapshots.iter().collect();
    // Newest (highest id) first; ids are unique.
    sorted.sort_by_key(|s| std::cmp::Reverse(s.id));
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
            let b = bucket(s.created);
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
            kept.push(s.name.clone());
        } else {
            gone.push(s.name.clone());
        }
    }
    (kept, gone)
}

/// A number identifying the ISO week (Monday start) of a timestamp.
pub fn iso_week(t: i64) -> i64 {
    let days = t.div_euclid(86400);
    // 1970-01-01 was a Thursday: shift so that weeks start on Monday.
    (days + 3).div_euclid(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshots taken in the order given (ids 1, 2, ...), at the given times.
    fn snaps(times: &[i64]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| Candidate {
                name: format!("s{t}"),
                id: i as u64 + 1,
                created: *t,
            })
            .collect()
    }

    fn named(list: &[(&str, i64)]) -> Vec<Candidate> {
        list.iter()
            .enumerate()
            .map(|(i, (n, t))| Candidate {
                name: n.to_string(),
                id: i as u64 + 1,
                created: *t,
            })
            .collect()
    }

    fn last(n: usize) -> Policy {
        Policy {
            last: n,
            ..Default::default()
        }
    }

    #[test]
    fn clock_set_back_keeps_the_snapshot_just_taken() {
        let h = 3600;
        // Four hourly snapshots, then the clock is set back a day.
        let s = named(&[
            ("a", 100 * h),
            ("b", 101 * h),
            ("c", 102 * h),
            ("d", 103 * h),
            ("new", 79 * h),
        ]);
        for p in [
            last(1),
            Policy {
                hourly: 2,
                ..Default::default()
            },
            Policy {
                daily: 1,
                ..Default::default()
            },
            Policy {
                weekly: 1,
                ..Default::default()
            },
        ] {
            let (k, _) = select(&s, &p);
            assert_eq!(k.first().map(String::as_str), Some("new"), "{p:?}");
        }
        let (k, g) = select(
            &s,
            &Policy {
                hourly: 2,
                ..Default::default()
            },
        );
        assert_eq!(k, vec!["new", "d"]);
        assert_eq!(g, vec!["c", "b", "a"]);
    }

    #[test]
    fn a_snapshot_from_a_fast_clock_does_not_displace_newer_ones() {
        let d = 86400;
        let s = named(&[("old", 1000), ("fast", 1000 + d), ("newest", 1060)]);
        let (k, g) = select(&s, &last(1));
        assert_eq!(k, vec!["newest"]);
        assert_eq!(g, vec!["fast", "old"]);
    }

    #[test]
    fn same_second_is_ordered_by_id_not_name() {
        let s = named(&[("zz-first", 5000), ("aa-second", 5000)]);
        let (k, g) = select(&s, &last(1));
        assert_eq!(k, vec!["aa-second"]);
        assert_eq!(g, vec!["zz-first"]);
        // The input order does not matter.
        let mut r = s.clone();
        r.reverse();
        assert_eq!(select(&r, &last(1)).0, vec!["aa-second"]);
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
}
