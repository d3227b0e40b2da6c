//! Probes every instance and writes health marks to etcd.
