//! The replication commands of the CLI: `backend add|list|remove`, `status`, `snapshot wait`,
//! `snapshot list --from`, `recover`, `scrub` (`backend prune` is in prune.rs).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapfs::daemon::control::Request;
use snapfs::replica::backend::config::{self, BackendConfig};
use snapfs::replica::backend::Backend;
use snapfs::replica::status::BackendStatus;

use crate::{checked, json, print_message, run, run_with};

/// Where a backend is and how to reach it: the options every SPEC takes.
#[derive(clap::Args, Clone, Default)]
pub struct SpecOpts {
    /// S3 endpoint URL (e.g. http://127.0.0.1:3900); default AWS_ENDPOINT_URL, else AWS.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// S3 region; default AWS_REGION or AWS_DEFAULT_REGION, else us-east-1.
    #[arg(long)]
    pub region: Option<String>,
    /// mirror:/ec: backends: how long a member may fail before writes go on without it,
    /// degraded (default 30s).
    #[arg(long, value_parser = snapfs::daemon::retention::parse_duration)]
    pub degrade_after: Option<Duration>,
    /// backend add, mount --replicate: encrypt every object sent to the (empty) backend, under
    /// a new random key wrapped by the passphrase or key file (the backend's snapfs-key).
    #[arg(long)]
    pub encrypt: bool,
    /// An encrypted backend's passphrase: the first line of this file (else
    /// SNAPFS_PASSPHRASE, else a prompt on the terminal).
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
    /// Unlock (with --encrypt: protect) an encrypted backend's key with this file's bytes
    /// instead of a passphrase.
    #[arg(long, conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a store (or its mountpoint). Everything the store already holds is
    /// queued for it. SPEC: dir:/ABS/PATH, s3://BUCKET[/PREFIX], mirror:SPEC,SPEC[,...] or
    /// ec:K+M:SPEC,... (K data and M parity shards over K+M members). S3 credentials come from
    /// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS credentials file and are kept in
    /// STORE/backends/NAME.json (mode 0600), so a daemon started later can use them.
    Add {
        target: PathBuf,
        name: String,
        spec: String,
        #[command(flatten)]
        opts: SpecOpts,
        /// Upload bandwidth limit, e.g. 100MiB/s.
        #[arg(long, value_parser = parse_rate)]
        limit: Option<u64>,
        /// The snapshots `backend prune` keeps on this backend (default: all).
        #[command(flatten)]
        keep: crate::Keep,
        /// Never delete anything from this backend from this host: `backend prune TARGET
        /// NAME` is refused (prune with --from on a trusted host). Pair it with storage-side
        /// permissions (an S3 key without DeleteObject) for real protection.
        #[arg(long)]
        append_only: bool,
    },
    /// Delete the snapshots the backend's retention policy (or the --keep-* given) drops,
    /// then every object no kept snapshot references; safe beside running uploads.
    Prune(super::prune::PruneArgs),
    /// List a store's backends.
    List {
        target: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove a backend from a store: its queue goes; nothing is deleted on the backend.
    Remove { target: PathBuf, name: String },
    /// Change the passphrase (or key file) of an encrypted backend: its key object is
    /// rewrapped, nothing is re-encrypted. The old secret as for every SPEC; the new one from
    /// --new-key-file, --new-passphrase-file, SNAPFS_NEW_PASSPHRASE or a prompt.
    Rekey {
        #[arg(long)]
        from: String,
        #[command(flatten)]
        opts: SpecOpts,
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        #[arg(long, conflicts_with = "new_passphrase_file")]
        new_key_file: Option<PathBuf>,
    },
}

/// A rate: a size per second, e.g. 100MiB/s (the "/s" may be left out).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let n = crate::parse_size(t)? as u64;
    if n == 0 {
        return Err("a bandwidth limit must be positive".into());
    }
    Ok(n)
}

/// A backend configuration from a SPEC and its options, credentials from the environment.
pub fn resolve(
    name: &str,
    spec: &str,
    o: &SpecOpts,
    limit: Option<u64>,
) -> Result<BackendConfig, String> {
    let mut cfg = config::new_config(
        name,
        0,
        spec,
        o.endpoint.as_deref(),
        o.region.as_deref(),
        limit,
        &config::process_env,
    )?;
    cfg.degrade_after_secs = o.degrade_after.map(|d| d.as_secs());
    Ok(cfg)
}

/// Opens a backend named only by a SPEC (no store): `--from`.
pub fn open_spec(spec: &str, o: &SpecOpts) -> Result<Box<dyn Backend>, String> {
    config::open(&resolve_from(spec, o)?)
}

/// [`resolve`] for `--from`: an encrypted backend's key unlocked.
pub fn resolve_from(spec: &str, o: &SpecOpts) -> Result<BackendConfig, String> {
    let mut cfg = resolve("from", spec, o, None)?;
    super::crypt::prepare(&mut cfg, o, false)?;
    Ok(cfg)
}

pub fn backend_cmd(c: BackendCmd) -> Result<(), String> {
    match c {
        BackendCmd::Add {
            target,
            name,
            spec,
            opts,
            limit,
            keep,
            append_only,
        } => {
            let mut config = resolve(&name, &spec, &opts, limit)?;
            let policy = keep.policy();
            config.keep = (!policy.is_empty()).then_some(policy);
            config.append_only = append_only;
            super::crypt::prepare(&mut config, &opts, true)?;
            print_message(checked(run(&target, Request::BackendAdd { config })?)?);
        }
        BackendCmd::Rekey {
            from,
            opts,
            new_passphrase_file,
            new_key_file,
        } => {
            let cfg = resolve("from", &from, &opts, None)?;
            let msg = super::crypt::rekey(
                &cfg,
                &opts,
                new_key_file.as_deref(),
                new_passphrase_file.as_deref(),
            )?;
            println!("{msg}");
        }
        BackendCmd::List { target, json: j } => {
            let list = checked(run(&target, Request::BackendList)?)?
                .backends
                .unwrap_or_default();
            if j {
                return json(&list);
            }
            if list.is_empty() {
                println!("no backends");
            }
            for b in list {
                let mut extra = String::new();
                if let Some(e) = &b.endpoint {
                    extra += &format!(" endpoint {e}");
                }
                if let Some(l) = b.limit_bytes_per_sec {
                    extra += &format!(" limit {}/s", snapfs::daemon::report::human(l));
                }
                if let Some(k) = &b.keep {
                    extra += &format!(
                        " keep last {} hourly {} daily {} weekly {}",
                        k.last, k.hourly, k.daily, k.weekly
                    );
                }
                if b.append_only {
                    extra += " append-only";
                }
                if b.encrypted {
                    extra += " encrypted";
                }
                println!("{:<16} {}{extra}", b.name, b.spec);
            }
        }
        BackendCmd::Prune(a) => super::prune::prune_cmd(a)?,
        BackendCmd::Remove { target, name } => {
            print_message(checked(run(&target, Request::BackendRemove { name })?)?);
        }
    }
    Ok(())
}

fn statuses(target: &Path) -> Result<Vec<BackendStatus>, String> {
    Ok(checked(run(target, Request::Status)?)?
        .status
        .unwrap_or_default())
}

pub fn status(target: &Path, as_json: bool) -> Result<(), String> {
    let s = statuses(target)?;
    if as_json {
        return json(&serde_json::json!({ "backends": s }));
    }
    print!("{}", snapfs::replica::status::to_text(&s));
    Ok(())
}

/// Waits until snapshot `name` is complete on every backend (or `backend`). Exit 1 with a
/// message on timeout.
pub fn wait(
    target: &Path,
    name: &str,
    backend: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let all = statuses(target)?;
        if all.is_empty() {
            return Err("this store has no backends: nothing to wait for".into());
        }
        let chosen: Vec<&BackendStatus> = match backend {
            Some(b) => {
                let v: Vec<_> = all.iter().filter(|s| s.name == b).collect();
                if v.is_empty() {
                    return Err(format!("this store has no backend named {b}"));
                }
                v
            }
            None => all.iter().collect(),
        };
        let mut missing = Vec::new();
        for b in &chosen {
            match b.snapshots.iter().find(|s| s.name == name) {
                Some(s) if s.complete => {}
                Some(s) if s.pruned => {
                    return Err(format!(
                        "snapshot {name} was complete on backend {} and has been deleted there \
                         by its retention policy (backend prune)",
                        b.name
                    ))
                }
                Some(_) => missing.push(format!(
                    "{} ({} chunks, {} pending{})",
                    b.name,
                    b.pending_chunks,
                    snapfs::daemon::report::human(b.pending_bytes),
                    b.last_error
                        .as_ref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                        + &b.prune_wait
                            .as_ref()
                            .map(|w| format!("; {w}"))
                            .unwrap_or_default()
                )),
                None => {
                    return Err(format!(
                        "snapshot {name} is not known to backend {} (no such snapshot, or it \
                         was deleted before it was complete there)",
                        b.name
                    ))
                }
            }
        }
        if missing.is_empty() {
            let windows: Vec<String> = chosen
                .iter()
                .filter_map(|b| {
                    let s = b.snapshots.iter().find(|s| s.name == name)?;
                    Some(format!(
                        "{} ({:.3} s)",
                        b.name,
                        s.window_seconds.unwrap_or(0.0)
                    ))
                })
                .collect();
            println!("snapshot {name} is complete on {}", windows.join(", "));
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "timed out after {:.0} s: snapshot {name} is not complete on {}",
                timeout.as_secs_f64(),
                missing.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn list_from(spec: &str, o: &SpecOpts, as_json: bool) -> Result<(), String> {
    let b = open_spec(spec, o)?;
    let markers = snapfs::replica::recover::list_snapshots(b.as_ref())?;
    #[derive(serde::Serialize)]
    struct Row {
        name: String,
        id: u64,
        created: String,
        created_unix: i64,
        files: u64,
        logical_bytes: u64,
        automatic: bool,
    }
    let rows: Vec<Row> = markers
        .iter()
        .map(|m| Row {
            name: m.name.clone(),
            id: m.epoch,
            created: snapfs::daemon::ops::rfc3339(m.created.secs),
            created_unix: m.created.secs,
            files: m.files,
            logical_bytes: m.bytes,
            automatic: m.automatic,
        })
        .collect();
    if as_json {
        return json(&rows);
    }
    println!(
        "{:<32} {:>6} {:<21} {:>8} {:>12}",
        "NAME", "ID", "CREATED", "FILES", "LOGICAL"
    );
    for r in rows {
        println!(
            "{:<32} {:>6} {:<21} {:>8} {:>12}",
            r.name,
            r.id,
            r.created,
            r.files,
            snapfs::daemon::report::human(r.logical_bytes)
        );
    }
    Ok(())
}

pub fn recover(
    spec: &str,
    o: &SpecOpts,
    dir: &Path,
    only: Option<&str>,
    as_json: bool,
) -> Result<(), String> {
    let b = open_spec(spec, o)?;
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {pos}/{len} snapshots {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut last = Instant::now();
    let mut report = |p: &snapfs::replica::recover::Progress| {
        if let Some(b) = &bar {
            b.set_length(p.snapshots_total as u64);
            b.set_position(p.snapshots_done as u64);
            b.set_message(format!(
                "{}: {} files, {} chunks fetched ({})",
                p.snapshot,
                p.files,
                p.chunks_fetched,
                snapfs::daemon::report::human(p.bytes_fetched)
            ));
            return;
        }
        let line = format!(
            "recover: snapshot {} ({}/{}), {} files, {} chunks fetched ({})",
            p.snapshot,
            p.snapshots_done,
            p.snapshots_total,
            p.files,
            p.chunks_fetched,
            snapfs::daemon::report::human(p.bytes_fetched)
        );
        if last.elapsed() >= Duration::from_secs(1) || p.snapshots_done == p.snapshots_total {
            eprintln!("{line}");
            last = Instant::now();
        }
    };
    let r = snapfs::replica::recover::recover(b.as_ref(), dir, only, &mut report);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = r?;
    if as_json {
        return json(&r);
    }
    println!(
        "recovered {} snapshots ({}) into {}: {} files, {} chunks fetched ({}); the live tree is {}",
        r.snapshots.len(),
        r.snapshots.join(", "),
        dir.display(),
        r.files,
        r.chunks_fetched,
        snapfs::daemon::report::human(r.bytes_fetched),
        r.snapshots.last().map_or("empty", |s| s.as_str())
    );
    Ok(())
}

/// `snapfs scrub`: a spinner with the daemon's progress on a terminal, plain lines otherwise;
/// exit status 1 if anything is left bad.
pub fn scrub(
    target: &Path,
    backend: Option<String>,
    repair: bool,
    limit: Option<u64>,
    as_json: bool,
) -> Result<(), String> {
    let local = backend.is_none();
    let req = Request::Scrub {
        backend,
        repair,
        local,
        limit,
    };
    let bar = spinner();
    let mut last = Instant::now();
    let r = run_with(target, req, &mut |p| match &bar {
        Some(b) => b.set_message(p.to_string()),
        None => {
            if last.elapsed() >= Duration::from_secs(5) {
                last = Instant::now();
                eprintln!("{p}");
            }
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let rep = checked(r?)?.scrub.ok_or("no report in the answer")?;
    if as_json {
        json(&rep)?;
    } else {
        print!("{}", snapfs::replica::scrub::to_text(&rep));
    }
    if rep.clean() {
        Ok(())
    } else {
        Err(if repair {
            "scrub: damage is left that could not be repaired".into()
        } else {
            "scrub: damage found (run with --repair to fix what can be)".into()
        })
    }
}

/// A spinner with a message on a terminal (stderr); None otherwise (plain lines instead).
pub fn spinner() -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    })
}
