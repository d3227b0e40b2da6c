//! The vocabulary every wharf part shares.
//!
//! # Layout
//!
//! - [`names`]: validated DNS-label newtypes (`ServiceName`, `InstanceId`, …).
//! - [`model`]: the JSON values stored in etcd (`Instance`, `Health`, `ServiceConfig`, …).
//! - [`defaults`]: every default value, in one place.
//! - [`keys`]: the only code that builds or parses etcd keys.
//! - [`store`]: the `Store` trait, its etcd implementation and (feature `test-util`) an
//!   in-memory one.
//! - [`lease`]: one lease kept alive, with loss detection.
//! - [`watch`]: the list-then-watch `Watcher` producing typed diffs.
//! - [`view`]: `CatalogView`, the diffs folded into maps.
//!
//! This crate depends on no other wharf part; every part depends on it.

pub mod defaults;
pub mod keys;
pub mod lease;
pub mod model;
pub mod names;
pub mod store;
pub mod table;
pub mod view;
pub mod watch;

pub use keys::{Key, Keyspace};
pub use lease::{LeaseKeeper, LeaseLoss};
pub use model::{
    Algorithm, CanaryGates, CheckSpec, Checker, Health, HealthStatus, Instance, InstanceState,
    Node, Protocol, ServiceConfig, StatusRange,
};
pub use names::{CheckerId, InstanceId, NameError, NodeName, ServiceName, Version};
pub use store::{EtcdConfig, EtcdStore, Store, StoreError};
pub use view::{CatalogView, Record, ServiceView};
pub use watch::{Diff, Entry, Snapshot, Update, Value, WatchConfig, WatchStats, Watcher};
