//! ltxfs: a FUSE filesystem that makes SQLite databases replicated.
//!
//! See `ARCHITECTURE.md` for the code map.

pub mod backup;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod error_chain;
pub mod fs;
pub mod fuse;
pub mod hex;
pub mod http_pool;
pub mod lease;
pub mod ltx;
pub mod mount;
pub mod mountinfo;
pub mod node;
pub mod own_mount;
pub mod proxy;
pub mod replication;
pub mod store;
pub mod sync;
pub mod tools;
