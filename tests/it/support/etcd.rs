//! A real etcd for the lease and cluster tests ([`test_support::Etcd`]).

pub use test_support::Etcd;

/// Starts an etcd on loopback, in a temporary directory of its own; panics
/// when it cannot (with how to install etcd when it is missing): these tests
/// never pass silently.
pub fn start() -> Etcd {
    Etcd::start().unwrap_or_else(|error| {
        panic!(
            "the etcd tests need a real etcd: {error}. .ci/run installs Debian's etcd-server. {}",
            if std::env::var_os("CI").is_some() {
                "CI is set: the CI machine must provide etcd."
            } else {
                "Refusing to pass silently."
            }
        )
    })
}
