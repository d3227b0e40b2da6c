#!/usr/bin/env bash
# balancer-callgrind.sh - user-space instructions per proxied request, under callgrind.
# A noise-free lever on a shared machine (CPU time per request moves ±20 % with the
# neighbours' load; instruction counts do not). Kernel time is not counted: compare user
# space changes with it, and confirm with bench/balancer-lb.sh.
#
# Starts one nginx backend (the lb-bench response: 100-byte body) and the balancer under
# `valgrind --tool=callgrind --instr-atstart=no`, warms up, switches instrumentation on for
# a `wrk -c 8` run of SECONDS, and prints requests, instructions and instructions/request.
# The profile stays in $OUT (callgrind_annotate it to see where the instructions go).
#
# MODE=tcp measures a `protocol = "tcp"` listener instead, one connection per request
# (`Connection: close`): instructions per proxied TCP connection.
#
# Usage: bench/balancer-callgrind.sh                     (bench-fast build, 3 s)
#        MODE=tcp bench/balancer-callgrind.sh
#        BALANCER_BIN=/path/to/balancer SECONDS_=5 OUT=/tmp/cg bench/balancer-callgrind.sh
# Needs: valgrind nginx wrk python3 (Debian packages). Shared helpers: bench/lib.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-balancer}
PROFILE=${PROFILE:-bench-fast}
RUN=${SECONDS_:-3}
MODE=${MODE:-http}
WRK_ARGS=()
LISTENER='  [[listener.route]]
  service = "bench"'
if [[ $MODE == tcp ]]; then
    WRK_ARGS=(-H "Connection: close")
    LISTENER='protocol = "tcp"
service = "bench"'
fi
need valgrind callgrind_control callgrind_annotate nginx wrk python3
BIN=$(build_bin BALANCER_BIN wharf-balancer balancer)

bench_init
# The profile outlives the run: by default in a directory of its own, not in WORK.
OUT=${OUT:-$(mktemp -d /tmp/balancer-callgrind.XXXXXX)}
mkdir -p "$OUT"
BK=$(free_port); LBP=$(free_port)
BODY="lb-bench-$(printf '%090d' 0)"
mkdir -p "$WORK/n"
cat >"$WORK/n/nginx.conf" <<EOC
daemon off; master_process off; worker_processes 1;
pid $WORK/n/nginx.pid; error_log $WORK/n/error.log warn;
events { worker_connections 1024; }
http {
    access_log off; server_tokens off; keepalive_requests 1000000; keepalive_timeout 60s;
    default_type text/plain;
$(for d in client_body proxy fastcgi uwsgi scgi; do echo "    ${d}_temp_path $WORK/n/$d;"; done)
    server { listen 127.0.0.1:$BK; location / { add_header X-Backend b1; return 200 "$BODY\n"; } }
}
EOC
cat >"$WORK/lb.toml" <<EOC
[admin]
bind = "127.0.0.1:0"
[[listener]]
name = "bench"
bind = "127.0.0.1:$LBP"
$LISTENER
[[service]]
name = "bench"
algorithm = "round_robin"
  [[service.endpoint]]
  addr = "127.0.0.1:$BK"
EOC
nginx -c "$WORK/n/nginx.conf" -p "$WORK/n" &
track $!
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out" \
    "$BIN" --config "$WORK/lb.toml" --threads 1 2>"$OUT/valgrind.log" &
VG=$!
track "$VG"
wait_port 127.0.0.1 "$BK" 10
wait_port 127.0.0.1 "$LBP" 30  # valgrind starts slowly
wrk -c 8 -t 1 -d 1s "${WRK_ARGS[@]}" "http://127.0.0.1:$LBP/" >/dev/null
callgrind_control -i on "$VG" >/dev/null
wrk -c 8 -t 1 -d "${RUN}s" "${WRK_ARGS[@]}" "http://127.0.0.1:$LBP/" >"$OUT/wrk.txt"
callgrind_control -i off "$VG" >/dev/null
callgrind_control -d "$VG" >/dev/null
REQ=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
PROFILES=("$OUT"/callgrind.out.*)
PROFILE_FILE=${PROFILES[-1]}
IR=$(callgrind_annotate "$PROFILE_FILE" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "requests=$REQ instructions=$IR per_request=$((IR / REQ)) profile=$PROFILE_FILE"
