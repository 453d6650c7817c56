//! snapfs: a FUSE filesystem over a copy-on-write, content-addressed chunk store in RocksDB.
//!
//! Each folder is a layer, and a layer calls only the layers below it:
//!
//! | folder      | layer                                                                  |
//! |-------------|------------------------------------------------------------------------|
//! | `storage/`  | the RocksDB engine (its only user), byte layouts, chunks, inode records, the store directory |
//! | `fs/`       | the POSIX core over `storage`: namespace, data, snapshots, GC; no FUSE types |
//! | `fuse/`     | the thin `fuser` adapter over `fs`, and the `/.snapshots` views        |
//! | `restore/`  | writing a tree out of a snapshot onto a local filesystem, by descriptors |
//! | `replica/`  | replication: backends, queue, manifests; calls `storage` and `fs`, never `fuse` |
//! | `daemon/`   | the mount lifecycle, the control socket, operator commands and figures, retention |
//!
//! `error` (the one error type and its errno mapping) and `sys` (the one module with
//! `unsafe`) sit under all of them.
#![deny(unsafe_code)]

pub mod daemon;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod replica;
pub mod restore;
pub mod storage;
pub mod sys;
