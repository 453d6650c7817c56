//! The storage layer: everything below the POSIX core. `engine` is the only module that names
//! RocksDB, `keys` holds every byte layout of the metadata column family, `chunk` encodes and
//! verifies sealed chunk bodies, `inode` encodes attribute records, and `store` owns a store
//! directory (its lock, its permissions, its superblock); `space` watches the free space of
//! the filesystem under it (the floor and the reserve file).

pub mod chunk;
pub mod engine;
pub mod inode;
pub mod keys;
pub mod space;
pub mod store;
