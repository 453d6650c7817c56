//! Command groups of the CLI that have a module of their own (`main.rs` has the rest).

pub mod replica;
