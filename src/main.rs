//! The `snapfs` command line. Every error is one line on stderr and exit status 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod cli;
use cli::replica::{self as repl, BackendCmd, SpecOpts};

use snapfs::daemon::control::{self, Request, Response};
use snapfs::daemon::ops::{self, Ctx};
use snapfs::daemon::report;
use snapfs::daemon::retention::{self, Policy};
use snapfs::daemon::{self, MountArgs};
use snapfs::fuse::views::Views;
use snapfs::storage::store::Store;

#[derive(Parser)]
#[command(
    name = "snapfs",
    version,
    about = "A snapshotting FUSE filesystem for training data"
)]
struct Cli {
    /// Log filter (env_logger syntax): error, warn, info, debug, trace, or per module, e.g.
    /// "debug,fuser=info". fuser's own messages are shown from error level by default (it
    /// warns about an unmount that the kernel already did).
    #[arg(long, global = true, default_value = "info,fuser=error")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone, Copy, Default)]
struct Keep {
    /// Keep the N newest snapshots.
    #[arg(long, default_value_t = 0)]
    keep_last: usize,
    /// Keep the newest snapshot of each of the N newest hours.
    #[arg(long, default_value_t = 0)]
    keep_hourly: usize,
    /// Keep the newest snapshot of each of the N newest days (UTC).
    #[arg(long, default_value_t = 0)]
    keep_daily: usize,
    /// Keep the newest snapshot of each of the N newest ISO weeks.
    #[arg(long, default_value_t = 0)]
    keep_weekly: usize,
}

impl Keep {
    fn policy(&self) -> Policy {
        Policy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
        }
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
enum Cmd {
    /// Mount a store (created if absent) and serve it in the foreground until unmounted or
    /// sent SIGINT/SIGTERM. With --snapshot, mount one snapshot read-only.
    Mount {
        /// The store directory (with --from: the mountpoint).
        store: PathBuf,
        #[arg(required_unless_present = "from")]
        mountpoint: Option<PathBuf>,
        /// Serve --snapshot NAME straight from this backend (dir:/ABS/PATH or
        /// s3://BUCKET[/PREFIX]), read-only, fetching chunks when first read; no store needed.
        #[arg(long, requires = "snapshot", conflicts_with = "replicate")]
        from: Option<String>,
        /// Where --from keeps its temporary metadata store and its disk cache (default: the
        /// system temp dir).
        #[arg(long, requires = "from")]
        cache_dir: Option<PathBuf>,
        /// Disk space for chunks --from fetched, kept until unmount so that a second read
        /// does not fetch them again (least recently used go first; 0: none). Default: 4GiB,
        /// or a quarter of the cache directory's free space if that is less.
        #[arg(long, requires = "from", value_parser = parse_size)]
        disk_cache: Option<usize>,
        /// Serve replication and space figures as Prometheus text on this address, e.g.
        /// 127.0.0.1:9187 (GET /metrics).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Let users other than the mounting one access the mount.
        #[arg(long)]
        allow_other: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Chunk size for a new store, in bytes (power of two, 4 KiB..16 MiB).
        #[arg(long)]
        chunk_size: Option<usize>,
        /// Mount this snapshot read-only (served by the running daemon if there is one).
        #[arg(long)]
        snapshot: Option<String>,
        /// List .snapshots in the root directory (it is reachable by name either way).
        #[arg(long)]
        show_snapshots: bool,
        /// Memory for decoded chunks, shared by the tree and every snapshot view (e.g. 256MiB).
        #[arg(long, value_parser = parse_size, default_value = "64MiB")]
        cache_size: usize,
        /// Memory for acknowledged writes not yet handed to a sealer, over all open files
        /// (e.g. 512MiB). A write that finds it used up seals its own file's buffers first.
        #[arg(long, value_parser = parse_size, default_value = "1GiB")]
        write_buffer: usize,
        /// Take a snapshot at this interval (e.g. 10m), named auto-<UTC time>.
        #[arg(long, value_parser = retention::parse_duration)]
        snapshot_every: Option<std::time::Duration>,
        /// Retention applied to automatic snapshots after each one is taken.
        #[command(flatten)]
        keep: Keep,
        /// Replicate to this backend (dir:/ABS/PATH or s3://BUCKET[/PREFIX]); it is added to
        /// the store (as --replicate-name) unless the store already has one with this spec.
        #[arg(long)]
        replicate: Option<String>,
        #[arg(long, default_value = "backup")]
        replicate_name: String,
        #[command(flatten)]
        spec_opts: SpecOpts,
        /// Upload bandwidth limit of the --replicate backend, e.g. 100MiB/s.
        #[arg(long, value_parser = repl::parse_rate)]
        limit: Option<u64>,
    },
    /// Add, list or remove the backends a store replicates to.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Replication status: per backend its queue (RPO), uploads, last error, and each
    /// snapshot's state.
    Status {
        target: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a store from a backend alone: every complete snapshot (or only --snapshot),
    /// with the live tree equal to the newest one recovered.
    Recover {
        /// The backend: dir:/ABS/PATH or s3://BUCKET[/PREFIX].
        #[arg(long)]
        from: String,
        /// A new or empty directory for the rebuilt store.
        new_store: PathBuf,
        #[arg(long)]
        snapshot: Option<String>,
        #[command(flatten)]
        spec_opts: SpecOpts,
        #[arg(long)]
        json: bool,
    },
    /// Re-read and verify every local chunk and every object on every backend (each copy:
    /// mirror member, ec shard); with --repair, rewrite bad copies from good ones. Exit
    /// status 1 if anything is left bad (without --repair: if anything is bad).
    Scrub {
        target: PathBuf,
        /// Only this backend (local chunks are not read).
        #[arg(long)]
        backend: Option<String>,
        #[arg(long)]
        repair: bool,
        /// Read at most this fast, e.g. 100MiB/s.
        #[arg(long, value_parser = repl::parse_rate)]
        limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Unmount a snapfs mountpoint; the daemon seals, flushes and exits.
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if busy; the daemon exits when the last user leaves.
        #[arg(long)]
        lazy: bool,
    },
    /// Space and ratios of a store: logical, stored, chunks, dedup and compression.
    Stat {
        /// A store directory or a snapfs mountpoint.
        target: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Create, list, delete, compare and prune snapshots.
    #[command(subcommand)]
    Snapshot(SnapCmd),
    /// Turn the live tree back to a snapshot (the store must be unmounted). Newer snapshots
    /// are kept unless --destroy-newer.
    Rollback {
        target: PathBuf,
        name: String,
        /// Confirm: changes since the snapshot are discarded from the live tree.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        destroy_newer: bool,
    },
    /// Walk the store: refcounts against the chunk-map versions naming each chunk, chunk
    /// bodies, space counters, and directory entries at every snapshot and the live tree.
    /// Exit status 1 if anything is inconsistent.
    Check {
        target: PathBuf,
        /// Also read, decompress and hash every chunk body.
        #[arg(long)]
        verify_data: bool,
        #[arg(long)]
        json: bool,
    },
    /// Export a snapshot (or one path of it) to a plain directory.
    Restore {
        target: PathBuf,
        name: String,
        dest: PathBuf,
        /// Restore only this path inside the snapshot. A file goes to DEST/NAME if DEST is an
        /// existing directory, else to DEST itself.
        #[arg(long)]
        path: Option<String>,
        /// Restore into a non-empty DEST, replacing existing entries by the snapshot's
        /// (entries that are not in the snapshot are kept).
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Subcommand)]
enum SnapCmd {
    /// Take an instant, consistent snapshot of the live tree. Returns at once; if chunks
    /// written before it are still being committed, the snapshot is pending until they are
    /// (`snapshot list` shows it) and a crash of the daemon meanwhile loses it whole.
    Create {
        target: PathBuf,
        name: String,
        /// Wait until the snapshot is complete and fsynced: it then survives kill -9 and
        /// power loss.
        #[arg(long)]
        durable: bool,
    },
    /// List snapshots: name, id, creation time, logical size, bytes unique to each. With
    /// --from SPEC, the complete snapshots on a backend (no store needed).
    List {
        #[arg(required_unless_present = "from")]
        target: Option<PathBuf>,
        #[arg(long, conflicts_with = "target")]
        from: Option<String>,
        #[command(flatten)]
        spec_opts: SpecOpts,
        #[arg(long)]
        json: bool,
    },
    /// Wait until a snapshot is complete on every backend (or --backend): its chunks and
    /// manifest are durable there. Exit status 1 on timeout.
    Wait {
        target: PathBuf,
        name: String,
        #[arg(long)]
        backend: Option<String>,
        /// e.g. 60s, 10m.
        #[arg(long, value_parser = retention::parse_duration, default_value = "60s")]
        timeout: std::time::Duration,
    },
    /// Delete a snapshot and free what only it referenced.
    Delete { target: PathBuf, name: String },
    /// Paths added, removed or modified from snapshot A to B (default: the live tree).
    Diff {
        target: PathBuf,
        a: String,
        b: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete the snapshots a retention policy does not keep.
    Prune {
        target: PathBuf,
        #[command(flatten)]
        keep: Keep,
        /// Show what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs a request on the daemon that holds the store, or on the store itself if none does.
fn run(target: &Path, req: Request) -> Result<Response, String> {
    run_with(target, req, &mut |p| eprintln!("{p}"))
}

/// [`run`], progress lines going to `progress`.
fn run_with(
    target: &Path,
    req: Request,
    progress: &mut dyn FnMut(&str),
) -> Result<Response, String> {
    let dir = report::resolve_target(target)?;
    if let Some(r) = control::call(&dir, &req, progress)? {
        return Ok(r);
    }
    let store = Store::open(&dir, false, None)?;
    let ctx = Ctx {
        store_dir: store.dir.clone(),
        chunk_size: store.chunk_size,
        fs: store.fs.clone(),
        views: Arc::new(Views::new(store.fs.clone())),
        replicator: None,
        mountpoint: None,
        snap_mounts: Default::default(),
    };
    let resp = ops::handle(&ctx, req, &mut |p| {
        progress(&p);
        true
    });
    store
        .fs
        .shutdown()
        .map_err(|e| format!("closing the store failed: {e}"))?;
    Ok(resp)
}

fn checked(r: Response) -> Result<Response, String> {
    if r.ok {
        Ok(r)
    } else {
        Err(r.error.unwrap_or_else(|| "failed".into()))
    }
}

fn print_message(r: Response) {
    if let Some(m) = r.message {
        println!("{m}");
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn snapshot_cmd(c: SnapCmd) -> Result<(), String> {
    match c {
        SnapCmd::Create {
            target,
            name,
            durable,
        } => {
            snapfs::fs::check_snapshot_name(&name)?;
            let req = Request::SnapshotCreate { name, durable };
            print_message(checked(run(&target, req)?)?);
        }
        SnapCmd::Wait {
            target,
            name,
            backend,
            timeout,
        } => repl::wait(&target, &name, backend.as_deref(), timeout)?,
        SnapCmd::List {
            target,
            from,
            spec_opts,
            json: as_json,
        } => {
            let target = match (target, from) {
                (_, Some(spec)) => return repl::list_from(&spec, &spec_opts, as_json),
                (Some(t), None) => t,
                (None, None) => return Err("snapshot list needs TARGET or --from SPEC".into()),
            };
            let rows = checked(run(&target, Request::SnapshotList)?)?
                .snapshots
                .unwrap_or_default();
            if as_json {
                return json(&rows);
            }
            println!(
                "{:<32} {:>6} {:<21} {:>12} {:>12}",
                "NAME", "ID", "CREATED", "LOGICAL", "UNIQUE"
            );
            for r in rows {
                let (logical, unique) = if r.pending {
                    ("pending".to_string(), "pending".to_string())
                } else {
                    (
                        report::human(r.logical_bytes),
                        report::human(r.unique_bytes),
                    )
                };
                println!(
                    "{:<32} {:>6} {:<21} {:>12} {:>12}",
                    r.name, r.id, r.created, logical, unique
                );
            }
        }
        SnapCmd::Delete { target, name } => {
            print_message(checked(run(&target, Request::SnapshotDelete { name })?)?);
        }
        SnapCmd::Diff {
            target,
            a,
            b,
            json: as_json,
        } => {
            let d = checked(run(&target, Request::SnapshotDiff { a, b })?)?
                .diff
                .unwrap_or_default();
            if as_json {
                return json(&d);
            }
            for e in d {
                let mark = match e.change.as_str() {
                    "added" => '+',
                    "removed" => '-',
                    _ => 'M',
                };
                println!("{mark} {} ({})", e.path, e.kind);
            }
        }
        SnapCmd::Prune {
            target,
            keep,
            dry_run,
        } => prune(&target, &keep.policy(), dry_run)?,
    }
    Ok(())
}

fn prune(target: &Path, policy: &Policy, dry_run: bool) -> Result<(), String> {
    if policy.is_empty() {
        return Err(
            "prune needs at least one --keep-* option (it would delete every snapshot)".into(),
        );
    }
    let rows = checked(run(target, Request::SnapshotList)?)?
        .snapshots
        .unwrap_or_default();
    let list: Vec<retention::Candidate> = rows
        .iter()
        .map(|r| retention::Candidate {
            name: r.name.clone(),
            id: r.id,
            created: r.created_unix,
        })
        .collect();
    let (keep, gone) = retention::select(&list, policy);
    for k in &keep {
        println!("keep   {k}");
    }
    for g in &gone {
        if dry_run {
            println!("would delete {g}");
        } else {
            checked(run(target, Request::SnapshotDelete { name: g.clone() })?)?;
            println!("delete {g}");
        }
    }
    Ok(())
}

fn stat(target: &Path, as_json: bool) -> Result<(), String> {
    let s = checked(run(target, Request::Stat)?)?
        .stat
        .ok_or("no figures in the answer")?;
    if as_json {
        return json(&s);
    }
    print!("{}", s.to_text());
    Ok(())
}

fn check(target: &Path, verify_data: bool, as_json: bool) -> Result<(), String> {
    let r = checked(run(target, Request::Check { verify_data })?)?
        .check
        .ok_or("no report in the answer")?;
    if as_json {
        json(&r)?;
    } else {
        println!(
            "checked {} chunks ({} bodies verified), {} references, {} directory entries and {} inodes at {} epochs",
            r.chunks, r.chunks_verified, r.references, r.entries_checked, r.inodes_checked, r.epochs_checked
        );
        if r.awaiting_gc > 0 {
            println!(
                "{} chunk bodies written ahead of a commit that a crash prevented: garbage, freed by the next collection",
                r.awaiting_gc
            );
        }
        for p in &r.problems {
            println!("problem: {p}");
        }
    }
    match r.problem_count {
        0 => {
            if !as_json {
                println!("no problems found");
            }
            Ok(())
        }
        n => Err(format!("{n} problems found")),
    }
}

/// A size in bytes, with bytesize's units: KiB, MiB, GiB are powers of 1024, KB, MB, GB (and
/// K, M, G) powers of 1000, e.g. 64MiB.
fn parse_size(s: &str) -> Result<usize, String> {
    let b: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a size ({e}): use e.g. 64MiB"))?;
    usize::try_from(b.as_u64()).map_err(|_| format!("{s:?} is too large"))
}

/// Parses the command line. `--help` and `--version` print clap's text and exit 0; a usage
/// error is one line on stderr and exit 1, like every other error.
fn parse_cli() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(c) => Ok(c),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                Err(ExitCode::SUCCESS)
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                eprintln!("snapfs: usage error: a command is missing; see snapfs --help");
                Err(ExitCode::FAILURE)
            }
            _ => {
                eprintln!("snapfs: {}", usage_line(&e.render().to_string()));
                Err(ExitCode::FAILURE)
            }
        },
    }
}

/// clap's message on one line: its first paragraph joined (e.g. "the following required
/// arguments were not provided: <TARGET> <NAME>"), without the `error: ` prefix, and the pointer
/// to `--help`.
fn usage_line(rendered: &str) -> String {
    let para: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let text = para.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    let text = if text.is_empty() {
        "invalid command line"
    } else {
        text
    };
    format!("usage error: {text}; see snapfs --help")
}

fn main() -> ExitCode {
    // Owner-only files for the whole life of the process: RocksDB creates WAL, SST, blob and
    // MANIFEST files with fixed modes as long as a store is open (docs/design.md, Security).
    // Modes of files created through the mount come from each FUSE request, not from this.
    snapfs::sys::tighten_umask();
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(code) => return code,
    };
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .format_timestamp_millis()
        .init();
    let r = match cli.cmd {
        Cmd::Mount {
            store,
            mountpoint,
            from,
            cache_dir,
            disk_cache,
            metrics_addr,
            allow_other,
            threads,
            chunk_size,
            snapshot,
            show_snapshots,
            cache_size,
            write_buffer,
            snapshot_every,
            keep,
            replicate,
            replicate_name,
            spec_opts,
            limit,
        } => (|| {
            let (store, mountpoint) = match (mountpoint, &from) {
                (Some(m), None) => (store, m),
                (None, Some(_)) => (PathBuf::new(), store),
                (Some(_), Some(_)) => {
                    return Err("with --from, give only the mountpoint (no STORE)".into())
                }
                (None, None) => return Err("mount needs STORE and MOUNTPOINT".into()),
            };
            let from = match from {
                Some(spec) => Some(repl::resolve_from(&spec, &spec_opts)?),
                None => None,
            };
            let replicate = match replicate {
                Some(spec) => {
                    let mut cfg = repl::resolve(&replicate_name, &spec, &spec_opts, limit)?;
                    // A backend the store already has keeps its configuration (and key).
                    let known = snapfs::replica::backend::config::load_all(&store)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.spec == cfg.spec);
                    if !known {
                        cli::crypt::prepare(&mut cfg, &spec_opts, true)?;
                    }
                    Some(cfg)
                }
                None => None,
            };
            daemon::run_mount(&MountArgs {
                store,
                mountpoint,
                allow_other,
                threads,
                chunk_size,
                snapshot,
                show_snapshots,
                cache_bytes: cache_size,
                write_buffer_bytes: write_buffer,
                snapshot_every,
                keep: keep.policy(),
                replicate,
                from,
                cache_dir,
                disk_cache_bytes: disk_cache.map(|b| b as u64),
                metrics_addr,
            })
        })(),
        Cmd::Backend(c) => repl::backend_cmd(c),
        Cmd::Status { target, json } => repl::status(&target, json),
        Cmd::Recover {
            from,
            new_store,
            snapshot,
            spec_opts,
            json,
        } => repl::recover(&from, &spec_opts, &new_store, snapshot.as_deref(), json),
        Cmd::Scrub {
            target,
            backend,
            repair,
            limit,
            json,
        } => repl::scrub(&target, backend, repair, limit, json),
        Cmd::Umount { mountpoint, lazy } => daemon::unmount(&mountpoint, lazy),
        Cmd::Stat { target, json } => stat(&target, json),
        Cmd::Check {
            target,
            verify_data,
            json,
        } => check(&target, verify_data, json),
        Cmd::Snapshot(c) => snapshot_cmd(c),
        Cmd::Rollback {
            target,
            name,
            yes,
            destroy_newer,
        } => {
            if !yes {
                Err("rollback discards every change made since the snapshot; add --yes".into())
            } else {
                run(
                    &target,
                    Request::Rollback {
                        name,
                        destroy_newer,
                    },
                )
                .and_then(checked)
                .map(print_message)
            }
        }
        Cmd::Restore {
            target,
            name,
            dest,
            path,
            overwrite,
        } => {
            let dest = std::path::absolute(&dest).unwrap_or(dest);
            let req = Request::Restore {
                name,
                dest,
                path,
                overwrite,
            };
            run(&target, req).and_then(checked).map(print_message)
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapfs: {e}");
            ExitCode::FAILURE
        }
    }
}
