//! L7/L4 load balancer that hot-swaps its backends from etcd.
