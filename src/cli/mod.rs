//! Command groups of the CLI that have a module of their own (`main.rs` has the rest).

pub mod crypt;
pub mod prune;
pub mod replica;
