//! `mount --metrics-addr 127.0.0.1:PORT`: the figures of `status` and the space figures of
//! `stat` as Prometheus text (`GET /metrics`), from a small thread of its own. Only counters
//! kept in memory and the replication queue are read per scrape, never a walk of the tree.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::ops::Ctx;

/// Binds `addr` and serves scrapes until the daemon exits.
pub fn start(ctx: Arc<Ctx>, addr: SocketAddr) -> Result<(), String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    log::info!("metrics on http://{bound}/metrics");
    // Held weakly, as by the control thread: the filesystem closes at unmount.
    let ctx = Arc::downgrade(&ctx);
    std::thread::Builder::new()
        .name("snapfs-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Some(ctx) = ctx.upgrade() else { return };
                if let Err(e) = serve(&ctx, conn) {
                    log::debug!("metrics request: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(())
}

fn serve(ctx: &Ctx, mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    let mut r = BufReader::new(conn.try_clone()?);
    r.read_line(&mut line)?;
    // Read (and ignore) the headers, bounded.
    for _ in 0..100 {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path == "/") {
        ("200 OK", render(ctx))
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text of one scrape.
pub fn render(ctx: &Ctx) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, rows: &[(String, f64)]| {
        let _ = writeln!(
            o,
            "# HELP snapfs_{name} {help}\n# TYPE snapfs_{name} {kind}"
        );
        for (labels, v) in rows {
            let _ = writeln!(o, "snapfs_{name}{labels} {v}");
        }
    };
    let c = ctx.fs.counters();
    metric(
        "chunks",
        "Unique chunks stored.",
        "gauge",
        &[(String::new(), c.chunks as f64)],
    );
    metric(
        "unique_bytes",
        "Uncompressed bytes of unique chunks.",
        "gauge",
        &[(String::new(), c.unique_bytes as f64)],
    );
    metric(
        "stored_bytes",
        "Compressed bytes of unique chunks.",
        "gauge",
        &[(String::new(), c.stored_bytes as f64)],
    );
    metric(
        "referenced_bytes",
        "Bytes referenced by chunk maps, every version.",
        "gauge",
        &[(String::new(), c.referenced_bytes as f64)],
    );
    let (blob, garbage) = ctx.fs.blob_space();
    metric(
        "blob_file_bytes",
        "Bytes of the blob files holding chunk bodies.",
        "gauge",
        &[(String::new(), blob as f64)],
    );
    metric(
        "blob_garbage_bytes",
        "Bytes of deleted chunks kept by blob files that still hold live chunks.",
        "gauge",
        &[(String::new(), garbage as f64)],
    );
    let w = ctx.fs.write_path();
    metric(
        "write_buffered_bytes",
        "Acknowledged bytes in unsealed chunk buffers.",
        "gauge",
        &[(String::new(), w.buffered_bytes as f64)],
    );
    metric(
        "write_sealing_bytes",
        "Bytes of full chunks waiting at the sealers (hash, compression, commit).",
        "gauge",
        &[(String::new(), w.sealing_bytes as f64)],
    );
    metric(
        "write_parked_bytes",
        "Bytes of full chunks written ahead without the WAL, waiting for a group commit.",
        "gauge",
        &[(String::new(), w.parked_bytes as f64)],
    );
    metric(
        "self_heals_total",
        "Local chunks that failed verification and were rewritten from a backend copy.",
        "counter",
        &[(String::new(), ctx.fs.self_heals() as f64)],
    );
    metric(
        "write_compress_queue_bytes",
        "Raw bytes of chunks stored uncompressed, waiting for compression behind the writer.",
        "gauge",
        &[(String::new(), w.compress_queue_bytes as f64)],
    );
    metric(
        "write_sealer_queue",
        "Seal jobs waiting in the sealer queues.",
        "gauge",
        &[(String::new(), w.sealer_queue as f64)],
    );
    if let Ok(space) = crate::storage::space::Space::new(&ctx.store_dir) {
        let s = crate::daemon::space::status(&ctx.fs, &space);
        metric(
            "disk_free_bytes",
            "Free bytes on the store's filesystem.",
            "gauge",
            &[(String::new(), s.free_bytes as f64)],
        );
        metric(
            "disk_total_bytes",
            "Size of the store's filesystem.",
            "gauge",
            &[(String::new(), s.total_bytes as f64)],
        );
        metric(
            "space_ok",
            "1 if writes are accepted (space state ok).",
            "gauge",
            &[(String::new(), (s.state == "ok") as u8 as f64)],
        );
    }
    let all = crate::daemon::replication::statuses(ctx).unwrap_or_default();
    let rows = |f: &dyn Fn(&crate::replica::status::BackendStatus) -> f64| -> Vec<(String, f64)> {
        all.iter()
            .map(|b| (format!("{{backend=\"{}\"}}", esc(&b.name)), f(b)))
            .collect()
    };
    metric(
        "backend_pending_chunks",
        "Sealed chunks not yet on the backend.",
        "gauge",
        &rows(&|b| b.pending_chunks as f64),
    );
    metric(
        "backend_pending_bytes",
        "Bytes of those chunks.",
        "gauge",
        &rows(&|b| b.pending_bytes as f64),
    );
    metric(
        "backend_oldest_pending_seconds",
        "Age of the oldest pending chunk (RPO); 0 if none.",
        "gauge",
        &rows(&|b| b.oldest_pending_seconds.unwrap_or(0.0)),
    );
    metric(
        "backend_uploaded_bytes_total",
        "Chunk bytes uploaded.",
        "counter",
        &rows(&|b| b.uploaded_bytes as f64),
    );
    metric(
        "backend_throughput_bytes_per_second",
        "Upload rate over the last 10 s.",
        "gauge",
        &rows(&|b| b.throughput_bytes_per_sec),
    );
    metric(
        "backend_failed_puts_total",
        "Failed uploads (each retried).",
        "counter",
        &rows(&|b| b.failed_puts as f64),
    );
    metric(
        "backend_bad_chunks",
        "Chunks that failed verification and were not uploaded.",
        "gauge",
        &rows(&|b| b.bad_chunks as f64),
    );
    metric(
        "backend_failing",
        "1 while uploads to the backend fail (no success since the last error).",
        "gauge",
        &rows(&|b| b.failing as u8 as f64),
    );
    metric(
        "backend_degraded",
        "1 while a member of a mirror:/ec: backend is down or being healed.",
        "gauge",
        &rows(&|b| b.degraded as u8 as f64),
    );
    let members: Vec<(String, f64)> = all
        .iter()
        .flat_map(|b| {
            b.members.iter().enumerate().map(move |(i, m)| {
                (
                    format!("{{backend=\"{}\",member=\"{i}\"}}", esc(&b.name)),
                    (m.state == "ok") as u8 as f64,
                )
            })
        })
        .collect();
    metric(
        "backend_member_up",
        "Per member of a mirror:/ec: backend: 1 if it is healthy and holds everything.",
        "gauge",
        &members,
    );
    let missed: Vec<(String, f64)> = all
        .iter()
        .flat_map(|b| {
            b.members.iter().enumerate().map(move |(i, m)| {
                (
                    format!("{{backend=\"{}\",member=\"{i}\"}}", esc(&b.name)),
                    m.missed_objects as f64,
                )
            })
        })
        .collect();
    metric(
        "backend_member_missed_objects",
        "Objects written without the member since it went down (healed when it returns).",
        "gauge",
        &missed,
    );
    metric(
        "backend_snapshots_pending",
        "Snapshots not yet complete on the backend.",
        "gauge",
        &rows(&|b| b.snapshots.iter().filter(|s| !s.complete).count() as f64),
    );
    metric(
        "backend_backup_window_seconds",
        "Window of the last completed snapshot.",
        "gauge",
        &rows(&|b| b.backup_window_seconds.unwrap_or(0.0)),
    );
    o
}
