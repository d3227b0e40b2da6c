//! The test kit of wharf's end-to-end tests: real etcd servers on loopback, small waiting
//! helpers, and CPU time from `/proc`. Every process it starts is stopped by its PID when
//! its guard drops, also when a test panics.

pub mod etcd;
pub mod proc_stat;
pub mod tls;
pub mod wait;

pub use etcd::{EtcdCluster, EtcdServer, ServerTls};
pub use proc_stat::{cpu_seconds, stat_cpu_seconds};
pub use tls::TestPki;
pub use wait::{eventually, free_port, workspace_bin};

/// Sends `tracing` output of the code under test to the test's captured output (shown only
/// when a test fails). Filter with `RUST_LOG`; default `info`. Safe to call many times.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
