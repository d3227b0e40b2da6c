//! The test kit of wharf's end-to-end tests: real etcd servers on loopback, and small waiting
//! helpers. Every process it starts is stopped by its PID when its guard drops, also when a
//! test panics.

pub mod etcd;
pub mod wait;

pub use etcd::{EtcdCluster, EtcdServer};
pub use wait::{eventually, free_port, workspace_bin};
