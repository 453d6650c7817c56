//! The control channel: the daemon answers CLI requests on `STORE/control.sock` (mode 0600,
//! in the 0700 store directory, bound under umask 077 so that it is never connectable by
//! others, not even between bind and chmod; and every connection's peer uid is checked with
//! SO_PEERCRED: only the daemon's own uid and root are served), so the CLI never opens
//! RocksDB while the daemon holds it. One JSON request per line; the
//! daemon answers with zero or more `{"progress": ...}` lines and one final response line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::daemon::ops::{self, SnapshotRow};
use crate::storage::store::socket_path;

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Stat,
    Sync,
    SnapshotCreate {
        name: String,
        /// Wait for the WAL fsync (power-loss durability) before answering.
        #[serde(default)]
        durable: bool,
    },
    SnapshotList,
    SnapshotDelete {
        name: String,
    },
    SnapshotDiff {
        a: String,
        b: Option<String>,
    },
    MountSnapshot {
        name: String,
        mountpoint: PathBuf,
        /// Let other users read the mount (`--allow-other`).
        #[serde(default)]
        allow_other: bool,
        /// FUSE worker threads (`--threads`); 0 from an older client: the default.
        #[serde(default)]
        threads: usize,
    },
    Rollback {
        name: String,
        destroy_newer: bool,
    },
    Restore {
        name: String,
        dest: PathBuf,
        path: Option<String>,
        /// Replace entries that exist in DEST by the snapshot's (else a non-empty DEST is refused).
        #[serde(default)]
        overwrite: bool,
    },
    Check {
        #[serde(default)]
        verify_data: bool,
    },
    BackendAdd {
        config: crate::replica::backend::config::BackendConfig,
    },
    BackendRemove {
        name: String,
    },
    BackendList,
    Status,
    Scrub {
        /// Only this backend (and no local chunks); None: the local store and every backend.
        backend: Option<String>,
        repair: bool,
        /// Also the local chunks.
        local: bool,
        limit: Option<u64>,
    },
    /// `backend prune`: the backend's snapshots its policy drops, then unreferenced objects.
    Prune {
        backend: String,
        /// None: the backend's configured policy (default: keep every snapshot).
        policy: Option<crate::fs::keep::Policy>,
        dry_run: bool,
        grace_ms: u64,
    },
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stat: Option<crate::daemon::report::StoreStat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<Vec<ops::DiffEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::fs::CheckReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<crate::daemon::replication::BackendInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<crate::replica::status::BackendStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub: Option<crate::replica::scrub::ScrubReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prune: Option<crate::replica::prune::Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// An intermediate progress line (the final line has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
}

impl Response {
    pub fn fail(msg: String) -> Response {
        Response {
            ok: false,
            error: Some(msg),
            ..Default::default()
        }
    }

    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Default::default()
        }
    }
}

pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Binds the socket and serves requests on background threads.
    pub fn start(ctx: Arc<ops::Ctx>) -> Result<Server, String> {
        let path = socket_path(&ctx.store_dir);
        // The store lock is held, so a socket file left here belongs to a dead daemon.
        let _ = std::fs::remove_file(&path);
        // bind(2) creates the socket file with 0777 & ~umask: with 077 in the umask it is
        // owner-only from the instant it exists (the binary sets it at start; this covers
        // library callers, and only ever tightens).
        crate::sys::tighten_umask();
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
        let me = crate::sys::geteuid();
        // The thread outlives the daemon's use of the context (it waits in accept): it holds
        // it weakly, so the filesystem can close at unmount.
        let ctx = Arc::downgrade(&ctx);
        std::thread::Builder::new()
            .name("snapfs-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let Some(ctx) = ctx.upgrade() else { return };
                    let _ = std::thread::Builder::new()
                        .name("snapfs-control-conn".into())
                        .spawn(move || {
                            if peer_allowed(&conn, me) {
                                serve(conn, &ctx)
                            }
                        });
                }
            })
            .map_err(|e| format!("cannot start control thread: {e}"))?;
        Ok(Server { path })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// SO_PEERCRED: the uid that connected, checked on its own whatever the socket's mode (a
/// socket file someone chmods 0666 still serves no one else). A refused peer gets one error
/// response and the connection is closed.
fn peer_allowed(conn: &UnixStream, me: u32) -> bool {
    let (pid, uid) = match crate::sys::peer_cred(conn) {
        Ok((pid, uid, _)) => (pid, uid),
        Err(e) => {
            log::warn!("refused a control connection: cannot read its credentials: {e}");
            return false;
        }
    };
    if uid == me || uid == 0 {
        return true;
    }
    log::warn!("refused a control connection from uid {uid} (pid {pid})");
    let who = match me {
        0 => "root".to_string(),
        n => format!("uid {n} and root"),
    };
    // Read the request line first, so the client sees the refusal, not a broken pipe.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if let Ok(c) = conn.try_clone() {
        let mut line = String::new();
        let _ = BufReader::new(c).read_line(&mut line);
    }
    let mut w = conn;
    let msg = format!("permission denied: the control socket accepts only {who}");
    let mut out = serde_json::to_vec(&Response::fail(msg)).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out);
    false
}

fn send(w: &mut UnixStream, r: &Response) -> bool {
    let mut out = serde_json::to_vec(r).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).is_ok()
}

fn serve(conn: UnixStream, ctx: &ops::Ctx) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut writer = conn;
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response::fail(format!("bad request: {e}")),
            Ok(req) => {
                let mut w = writer.try_clone().ok();
                // Returns false once the client is gone (the write fails with EPIPE; the
                // daemon ignores SIGPIPE), so a long operation such as restore stops.
                let mut progress = |msg: String| match w.as_mut() {
                    Some(w) => send(
                        w,
                        &Response {
                            ok: true,
                            progress: Some(msg),
                            ..Default::default()
                        },
                    ),
                    None => true,
                };
                ops::handle(ctx, req, &mut progress)
            }
        };
        line.clear();
        if !send(&mut writer, &resp) {
            return;
        }
    }
}

/// Sends one request to the daemon of `store_dir`. `Ok(None)` when no daemon is listening.
/// Progress lines go to `progress` as they arrive.
pub fn call(
    store_dir: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<Response>, String> {
    let path = socket_path(store_dir);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(format!(
                "cannot reach the daemon at {}: {e}",
                path.display()
            ))
        }
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(24 * 3600)));
    let mut w = conn
        .try_clone()
        .map_err(|e| format!("control socket: {e}"))?;
    let mut msg = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    msg.push(b'\n');
    // If the send fails, the daemon may still have answered (a refusal): read it first.
    let sent = w.write_all(&msg);
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = match reader.read_line(&mut line) {
            Ok(n) => n,
            Err(e) => {
                return Err(match &sent {
                    Err(s) => format!("cannot send to the daemon: {s}"),
                    Ok(()) => format!("no answer from the daemon: {e}"),
                })
            }
        };
        if n == 0 {
            return Err(match &sent {
                Err(s) => format!("cannot send to the daemon: {s}"),
                Ok(()) => "the daemon closed the connection without answering".into(),
            });
        }
        let resp: Response = serde_json::from_str(line.trim())
            .map_err(|e| format!("bad answer from the daemon: {e}"))?;
        match resp.progress {
            Some(p) => progress(&p),
            None => return Ok(Some(resp)),
        }
    }
}
