//! `snapfs backend prune`: a store's backend by name (through the daemon when it runs), or
//! any backend by SPEC with `--from` (a trusted host, no store).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use snapfs::daemon::control::Request;
use snapfs::replica::prune;

use super::replica::{open_spec, spinner, SpecOpts};
use crate::{checked, json, run_with, Keep};

#[derive(clap::Args)]
pub struct PruneArgs {
    /// The store (or its mountpoint) whose backend NAME is pruned.
    #[arg(required_unless_present = "from", conflicts_with = "from")]
    target: Option<PathBuf>,
    #[arg(required_unless_present = "from")]
    name: Option<String>,
    /// Prune the backend at SPEC, with no local store (e.g. from a trusted host, for an
    /// --append-only backend). Takes the --keep-* given here (default: keep all).
    #[arg(long)]
    from: Option<String>,
    #[command(flatten)]
    opts: SpecOpts,
    /// Keep these snapshots instead of the backend's configured policy.
    #[command(flatten)]
    keep: Keep,
    /// Say what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long uploads that began before the prune have to write their markers (at least
    /// 2s; longer than any marker upload can take).
    #[arg(long, value_parser = snapfs::daemon::retention::parse_duration, default_value = "10m")]
    grace: Duration,
    #[arg(long)]
    json: bool,
}

pub fn prune_cmd(a: PruneArgs) -> Result<(), String> {
    if a.grace < prune::MIN_GRACE {
        return Err(format!(
            "--grace must be at least {} s",
            prune::MIN_GRACE.as_secs()
        ));
    }
    let policy = a.keep.policy();
    let bar = spinner();
    let mut last = Instant::now() - Duration::from_secs(60);
    let mut progress = |p: &str| match &bar {
        Some(b) => b.set_message(p.to_string()),
        None => {
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                eprintln!("{p}");
            }
        }
    };
    let rep = match (&a.from, &a.target, &a.name) {
        (Some(spec), _, _) => {
            let b = open_spec(spec, &a.opts)?;
            let o = prune::Options {
                policy,
                dry_run: a.dry_run,
                grace: a.grace,
            };
            prune::run(b.as_ref(), &o, &mut |m| progress(&m))
        }
        (None, Some(target), Some(name)) => {
            let req = Request::Prune {
                backend: name.clone(),
                policy: (!policy.is_empty()).then_some(policy),
                dry_run: a.dry_run,
                grace_ms: a.grace.as_millis() as u64,
            };
            run_with(target, req, &mut progress)
                .and_then(checked)
                .and_then(|r| r.prune.ok_or_else(|| "no report in the answer".to_string()))
        }
        _ => Err("give TARGET NAME, or --from SPEC".to_string()),
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let rep = rep?;
    if a.json {
        return json(&rep);
    }
    print!("{}", prune::to_text(&rep));
    Ok(())
}
