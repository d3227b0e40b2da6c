//! Bundled container runtime and node agent that registers what it runs in etcd.
