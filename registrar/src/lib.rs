//! Bundled container runtime and node agent that registers what it runs in etcd.
//!
//! - [`runtime`]: namespaces, cgroups, overlay rootfs, PID 1 init; runs in a single-threaded
//!   helper process (the only module allowed to use `unsafe`).
//! - [`image`]: rootfs directories, OCI layouts and `docker save` tarballs, unpacked once
//!   into a local store.

pub mod agent;
pub mod api;
pub mod image;
pub mod operator;
pub mod restart;
pub mod rollout;
pub mod runtime;
