#!/usr/bin/env bash
# Watcher benchmark against a real etcd on loopback: initial list of 100,000 instances,
# sustained event rate, put -> seen latency. Arguments: [N instances] [M puts] [K concurrent]
# [P sequential puts]. Needs etcd-server (apt-get install etcd-server).
# CATALOG_WATCH_BIN=path: run that binary, no build (else a release build; bench/lib.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$BENCH_ROOT"
need etcd
bin=$(PROFILE=release build_bin CATALOG_WATCH_BIN wharf-bench catalog_watch)
exec "$bin" "$@"
