#!/usr/bin/env bash
# Watcher benchmark against a real etcd on loopback: initial list of 100,000 instances,
# sustained event rate, put -> seen latency. Arguments: [N instances] [M puts] [K concurrent]
# [P sequential puts]. Needs etcd-server (apt-get install etcd-server).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q --release -p wharf-bench --bin catalog_watch -- "$@"
