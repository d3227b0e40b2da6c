//! confd replacement: Tera templates rendered from the etcd catalog.
