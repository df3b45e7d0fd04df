//! Servers and helpers the tests start or share beyond the mount harness.

pub mod azure;
pub mod backup_check;
pub mod cluster;
pub mod emulator;
pub mod etcd;
pub mod fake_consul;
pub mod gcs;
pub mod history;
pub mod logs;
pub mod tcp_proxy;
