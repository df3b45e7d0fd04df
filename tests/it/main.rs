//! The integration tests, one binary: each former `tests/*.rs` file is a module,
//! and `common` (the mount harness and worker processes) and `support`
//! (coordinators, emulators, cluster helpers) are compiled once for all of them.
//! The fault suite, `tests/chaos.rs`, is a binary of its own (see there).

mod common;
mod support;

mod backup;
mod backup_clouds;
mod backup_lifecycle;
mod bench_command;
mod capture;
mod capture_crash;
mod config_file;
mod django;
mod failover;
mod faults;
mod fuse_requests;
mod kernel_cache;
mod lease_conformance;
mod lease_etcd;
mod ltx_apply;
mod ltx_compact;
mod ltx_format;
mod mount_cli;
mod mount_crash;
mod mount_differential;
mod mount_journal_modes;
mod partition;
mod proxy;
mod replication;
mod replication_protocol;
mod security;
mod tools;
