//! The write path's own figures (`snapfs stat`, the metrics): what is acknowledged to
//! writers but not yet committed to the engine.

use serde::{Deserialize, Serialize};

use std::sync::atomic::Ordering;

use super::Fs;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritePath {
    /// Files with an open handle.
    pub open_files: u64,
    /// Bytes in unsealed per-chunk buffers: acknowledged writes that no seal job holds yet.
    pub buffered_bytes: u64,
    pub buffered_chunks: u64,
    /// Full chunks handed to the sealers and not yet committed: they wait to be hashed,
    /// written and committed.
    pub sealing_bytes: u64,
    pub sealing_chunks: u64,
    /// Of those, full chunks whose body is written (without the WAL) and whose commit waits
    /// for the next group commit (one flush of the chunk store, `defer.rs`).
    #[serde(default)]
    pub parked_bytes: u64,
    #[serde(default)]
    pub parked_chunks: u64,
    /// Seal jobs waiting in the sealer queues (the sealers' queue depth).
    pub sealer_queue: u64,
    /// Sealer threads (0: sealing runs inline in the writer).
    pub sealers: u64,
    /// The budget of unsealed buffers over all open files (`mount --write-buffer`).
    #[serde(default)]
    pub budget_bytes: u64,
    /// Chunks stored raw and queued for compression behind the writer (`fs/compress.rs`),
    /// and their raw bytes: the bytes waiting for compression.
    #[serde(default)]
    pub compress_queue_chunks: u64,
    #[serde(default)]
    pub compress_queue_bytes: u64,
}

impl Fs {
    /// A snapshot of the write path's state. Takes each open file's state lock shared, one
    /// at a time, so it never waits for more than one write.
    pub fn write_path(&self) -> WritePath {
        let files: Vec<_> = self.open.lock().values().map(|e| e.file.clone()).collect();
        let mut w = WritePath {
            open_files: files.len() as u64,
            ..WritePath::default()
        };
        for f in files {
            {
                let st = f.state.read();
                w.buffered_chunks += st.buffers.len() as u64;
                w.buffered_bytes += st.buffers.values().map(|b| b.len() as u64).sum::<u64>();
            }
            let sealing = f.sealing.lock();
            w.sealing_chunks += sealing.len() as u64;
            w.sealing_bytes += sealing.values().map(|b| b.len() as u64).sum::<u64>();
        }
        (w.parked_chunks, w.parked_bytes) = self.parked();
        w.budget_bytes = self.write_budget.load(std::sync::atomic::Ordering::Acquire);
        w.compress_queue_chunks = self.deferred.later_chunks.load(Ordering::Acquire);
        w.compress_queue_bytes = self.deferred.later_bytes.load(Ordering::Acquire);
        if let Some(senders) = self.sealer.get() {
            w.sealers = senders.len() as u64;
            w.sealer_queue = senders.iter().map(|s| s.len() as u64).sum();
        }
        w
    }
}
