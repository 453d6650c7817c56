//! The control channel: the daemon answers CLI requests on `STORE/control.sock` (mode 0600),
//! so the CLI never opens RocksDB while the daemon holds it. One JSON request per line, one
//! JSON answer per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fs::Fs;
use crate::store::socket_path;

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Stat,
    Sync,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stat: Option<crate::report::StoreStat>,
}

pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Binds the socket and serves requests on a background thread.
    pub fn start(store_dir: &Path, fs: Arc<Fs>, chunk_size: usize) -> Result<Server, String> {
        let path = socket_path(store_dir);
        // The store lock is held, so a socket file left here belongs to a dead daemon.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
        let dir = store_dir.to_path_buf();
        std::thread::Builder::new()
            .name("snapfs-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let fs = fs.clone();
                    let dir = dir.clone();
                    let _ = std::thread::Builder::new()
                        .name("snapfs-control-conn".into())
                        .spawn(move || serve(conn, &fs, &dir, chunk_size));
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

fn serve(conn: UnixStream, fs: &Fs, dir: &Path, chunk_size: usize) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut writer = conn;
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => fail(format!("bad request: {e}")),
            Ok(req) => handle(req, fs, dir, chunk_size),
        };
        line.clear();
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

fn fail(msg: String) -> Response {
    Response {
        ok: false,
        error: Some(msg),
        stat: None,
    }
}

fn handle(req: Request, fs: &Fs, dir: &Path, chunk_size: usize) -> Response {
    let ok = |stat| Response {
        ok: true,
        error: None,
        stat,
    };
    match req {
        Request::Stat => match crate::report::stat(fs, dir, chunk_size) {
            Ok(s) => ok(Some(s)),
            Err(e) => fail(e),
        },
        Request::Sync => match fs.sync_all() {
            Ok(()) => ok(None),
            Err(e) => fail(format!("sync failed: {e}")),
        },
    }
}

/// Sends one request to the daemon of `store_dir`. `Ok(None)` when no daemon is listening.
pub fn call(store_dir: &Path, req: &Request) -> Result<Option<Response>, String> {
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
    let _ = conn.set_read_timeout(Some(Duration::from_secs(600)));
    let mut w = conn
        .try_clone()
        .map_err(|e| format!("control socket: {e}"))?;
    let mut msg = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    msg.push(b'\n');
    w.write_all(&msg)
        .map_err(|e| format!("cannot send to the daemon: {e}"))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the daemon: {e}"))?;
    let resp: Response = serde_json::from_str(line.trim())
        .map_err(|e| format!("bad answer from the daemon: {e}"))?;
    Ok(Some(resp))
}
