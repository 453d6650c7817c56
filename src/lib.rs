//! snapfs: a FUSE filesystem over a copy-on-write, content-addressed chunk store in RocksDB.
//!
//! Layers, bottom up: `engine` (the only RocksDB user), `keys` (every byte layout), `chunk`
//! (chunk encoding and verification), `inode` (attribute records), `fs` (the POSIX core, no
//! FUSE types), `fuse` (the thin `fuser` adapter), `store`/`control`/`report`/`daemon` (store
//! directories, the control socket, operator figures, the mount lifecycle).
#![deny(unsafe_code)]

pub mod chunk;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod inode;
pub mod keys;
pub mod ops;
pub mod report;
pub mod restore;
pub mod retention;
pub mod store;
pub mod sys;
pub mod views;
