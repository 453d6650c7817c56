//! The write path's figures on a live mount. Its own test binary, with one test: a
//! descriptor open for writing must not be copied by another test thread's spawn, because
//! the copy's close at exec flushes (seals) the file, and the figures would read 0.

mod common;

use std::fs;
use std::io::Write;

use common::Mount;
use snapfs::daemon::control::{call, Request};
use snapfs::fs::WritePath;

#[test]
fn stat_shows_buffered_bytes_until_fsync() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let m = Mount::start(&store, &t.path().join("mnt"));
    // Asked over the control socket from this process: spawning `snapfs stat` would fork
    // the open descriptor too.
    let write_path = || -> WritePath {
        let r = call(&store, &Request::Stat, &mut |_| {})
            .unwrap()
            .expect("the daemon answers");
        r.stat.expect("figures").write_path
    };
    let idle = write_path();
    assert_eq!(
        (idle.open_files, idle.buffered_bytes, idle.sealing_bytes),
        (0, 0, 0),
        "{idle:?}"
    );
    let mut open = fs::File::create(m.path("open")).unwrap();
    // 1 MiB and 100 KiB: one full chunk goes to the sealers, the rest stays buffered.
    open.write_all(&vec![7u8; (1 << 20) + (100 << 10)]).unwrap();
    let w = write_path();
    assert_eq!(w.buffered_bytes, 100 << 10, "{w:?}");
    assert_eq!(w.buffered_chunks, 1, "{w:?}");
    assert_eq!(w.open_files, 1, "{w:?}");
    assert!(w.sealers >= 1, "{w:?}");
    open.sync_all().unwrap();
    let w = write_path();
    assert_eq!(
        (w.buffered_bytes, w.sealing_bytes, w.sealer_queue),
        (0, 0, 0),
        "fsync sealed it: {w:?}"
    );
    drop(open);
    // The kernel sends RELEASE after close(2) returns, asynchronously.
    let t0 = std::time::Instant::now();
    while write_path().open_files != 0 {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the file is still open 10 s after close"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    m.stop();
}
