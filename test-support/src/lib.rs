//! What ltxfs's integration tests and its benchmarks (`ltxfs-bench`) both need
//! to run ltxfs for real: `ltxfs mount` processes and their config, a private
//! etcd, a private moto S3 server, free loopback ports, and bounded waits on
//! child processes. Errors are returned, never panicked on: the tests panic
//! with them, the benchmarks report them.

mod etcd;
pub mod http;
mod moto;
mod mount;
mod process;

pub use etcd::{Etcd, EtcdError};
pub use moto::{Moto, MotoError};
pub use mount::{NotMounted, answers, force_unmount, wait_until_mounted, write_config, yaml_quote};
pub use process::{exit_with_parent, free_loopback_addresses, run_bounded, wait_timeout};
