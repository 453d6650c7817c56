//! The `snapfs` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use snapfs::control::{self, Request};
use snapfs::daemon::{self, MountArgs};
use snapfs::report;
use snapfs::store::Store;

#[derive(Parser)]
#[command(
    name = "snapfs",
    version,
    about = "A snapshotting FUSE filesystem for training data"
)]
struct Cli {
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount a store (created if absent) and serve it in the foreground until unmounted or
    /// sent SIGINT/SIGTERM.
    Mount {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Let users other than the mounting one access the mount.
        #[arg(long)]
        allow_other: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Chunk size for a new store, in bytes (power of two, 4 KiB..16 MiB).
        #[arg(long)]
        chunk_size: Option<usize>,
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
}

fn stat(target: &std::path::Path, json: bool) -> Result<(), String> {
    let dir = report::resolve_target(target)?;
    let s = match control::call(&dir, &Request::Stat)? {
        Some(resp) if resp.ok => resp.stat.ok_or("daemon sent no figures")?,
        Some(resp) => return Err(resp.error.unwrap_or_else(|| "daemon error".into())),
        None => {
            let store = Store::open(&dir, false, None)?;
            report::stat(&store.fs, &store.dir, store.chunk_size)?
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", s.to_text());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .format_timestamp_millis()
        .init();
    let r = match cli.cmd {
        Cmd::Mount {
            store,
            mountpoint,
            allow_other,
            threads,
            chunk_size,
        } => daemon::run_mount(&MountArgs {
            store,
            mountpoint,
            allow_other,
            threads,
            chunk_size,
        }),
        Cmd::Umount { mountpoint, lazy } => daemon::unmount(&mountpoint, lazy),
        Cmd::Stat { target, json } => stat(&target, json),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapfs: {e}");
            ExitCode::FAILURE
        }
    }
}
