#!/usr/bin/env bash
# One healthcheck replica at fleet scale: 10,000 instances (127.0.0.1-20 x 5 ports each,
# served by cheap in-process listeners), HTTP checks every second. Prints the checker's CPU
# (utime+stime from /proc/<pid>/stat over the window), probes/s and etcd writes/s in steady
# state. FLOOR=1: no checker, a bare loop of the probes' system calls (the kernel floor).
# Usage: [CHECK=tcp] [FLOOR=1] bench/healthcheck-scale.sh [instances] [window-seconds] [checker args]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p wharf-healthcheck --bin healthcheck
cargo build --release -q -p wharf-bench --bin healthcheck_scale
exec "$CARGO_TARGET_DIR/release/healthcheck_scale" "$CARGO_TARGET_DIR/release/healthcheck" "${1:-10000}" "${2:-20}" "${@:3}"
