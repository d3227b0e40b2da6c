#!/usr/bin/env bash
# One healthcheck replica at fleet scale: 10,000 instances (127.0.0.1-20 x 5 ports each,
# served by cheap in-process listeners), HTTP checks every second. Prints the checker's CPU
# (utime+stime from /proc/<pid>/stat over the window), probes/s and etcd writes/s in steady
# state. FLOOR=1: no checker, a bare loop of the probes' system calls (the kernel floor).
# Usage: [CHECK=tcp] [FLOOR=1] bench/healthcheck-scale.sh [instances] [window-seconds] [checker args]
# HEALTHCHECK_BIN / HEALTHCHECK_SCALE_BIN=path: that binary, no build (else release builds).
# Needs etcd-server. Shared helpers: bench/lib.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$BENCH_ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
need etcd
healthcheck=$(PROFILE=release build_bin HEALTHCHECK_BIN wharf-healthcheck healthcheck)
scale=$(PROFILE=release build_bin HEALTHCHECK_SCALE_BIN wharf-bench healthcheck_scale)
exec "$scale" "$healthcheck" "${1:-10000}" "${2:-20}" "${@:3}"
