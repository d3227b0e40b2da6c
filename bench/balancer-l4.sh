#!/usr/bin/env bash
# balancer-l4.sh - the wharf balancer's L4 paths side by side with HAProxy, on 127.0.0.1.
#
# One nginx backend (a 100-byte answer on /, a 10 MiB file on /big). Each proxy, started
# alone and pinned to PROXY_CPUS (single-threaded: haproxy nbthread 1, balancer --threads 1),
# exposes a `mode tcp` frontend to the backend and a TLS-terminating HTTP frontend
# (ECDSA P-256 certificate, TLS 1.3, keep-alive to the backend). wrk (pinned with the
# backend to LOADGEN_CPUS) measures:
#   tcp-bulk   GET /big through the tcp frontend            → MiB/s
#   tcp-bulk-b the same; the balancer's listener has bulk_batching = true (HAProxy has
#              no such setting: its tcp frontend again)   → MiB/s
#   tcp-conn   GET / with Connection: close via tcp frontend → connections/s
#   https-ka   GET / over TLS, keep-alive                    → requests/s
#   https-hs   GET / over TLS, Connection: close             → handshakes/s, resumed: wrk keeps
#              its session across reconnects (SSL_clear) and offers it, and both proxies
#              resume by default (TLS 1.3 PSK with ECDHE: no certificate, no signature).
#              Same work for the client: HAProxy (OpenSSL) sends 1 ticket after a resumed
#              handshake, so the balancer's listener has session_tickets = 1 (with its
#              default 2: 0.87-0.90x HAProxy's handshakes/s, the load generator's core
#              at 100 % behind both, 2026-11-22)
#   https-full the same on a second TLS frontend with resumption off on both (HAProxy
#              `no-tls-tickets` and no session cache, the balancer `session_resumption =
#              false`)                                       → full handshakes/s
#   h2-up      GET / over plain HTTP/1.1 keep-alive to an HTTP frontend whose backend
#              speaks HTTP/2 (nginx `listen … http2`, h2c; HAProxy `proto h2`, the
#              balancer `http2 = true`): the gRPC path      → requests/s
#              (not in the default TESTS: it measures an option, not an issue target)
# and prints the balancer / HAProxy ratio of each (target: > 1), and the proxy's CPU time
# (utime + stime from /proc) per request or per MiB with its ratio (target: < 1): the
# efficiency figure, which holds up when other work on the machine disturbs throughput.
# A last table gives how busy the load generator's core and each proxy's core were: a
# test whose load generator is at ~100 % behind both proxies measures that core, not the
# proxies (TCP bulk, session 5).
#
# Same work as HAProxy: its config adds no X-Forwarded-* header (no `option forwardfor`), so
# the balancer's TLS listeners have `forwarded_headers = false` (with them, nginx parses
# three more lines a request: 0.93x HAProxy's keep-alive req/s instead of 0.96-0.98x in a
# by-hand run of this topology, 2026-11-22).
#
# With ROUNDS > 1, rounds alternate which proxy goes first, and a last table gives the
# median of the per-round throughput ratios (also over the rounds without hypervisor steal,
# STEAL_MAX [1] %).
# Settings: TESTS ["tcp-bulk tcp-bulk-b tcp-conn https-ka https-hs https-full"] (a subset runs only those),
#           DURATION [5] s per run, after WARMUP [1] s unmeasured (0: none),
#           CONNS [32], ROUNDS [1], PROXY_CPUS [1], LOADGEN_CPUS [0],
#           BULK_CONNS [4] and BULK_KB [10240] (the bulk tests' connections and file size),
#           CARGO_TARGET_DIR [/work/target-l4] (release build of the balancer),
#           BALANCER_BIN (measure that binary, no build), KEEP_TMP=1 (keep the work dir),
#           BUSY_POLLING=1 (both proxies poll without sleeping: HAProxy `busy-polling`, the
#           balancer `busy_polling = true`; the CPU columns then count the spinning too),
#           CPU_BUDGET=PERCENT (each proxy gets only that share of its core, a cgroup CPU
#           quota: the proxy, not the load generator's core, is then what runs out, so the
#           throughput ratio is the proxies' own; bench/lib.sh cpu_budget_init, needs root).
# Needs: haproxy nginx wrk openssl taskset curl python3 (Debian packages), a Rust toolchain.
# Cleanup: every process started is killed by PID on exit (bench/lib.sh).
set -euo pipefail

TESTS=${TESTS:-tcp-bulk tcp-bulk-b tcp-conn https-ka https-hs https-full}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-1}
PROXY_CPUS=${PROXY_CPUS:-1}
LOADGEN_CPUS=${LOADGEN_CPUS:-0}
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-l4}

need haproxy nginx wrk openssl taskset curl python3
BIN=$(PROFILE=release build_bin BALANCER_BIN wharf-balancer balancer)

bench_init
chmod 755 "$WORK"  # nginx workers run as nobody
if [[ -n ${CPU_BUDGET:-} ]]; then cpu_budget_init "$CPU_BUDGET"; fi
BACK=$(free_port); BACKH2=$(free_port); H2UP=$(free_port); TCP=$(free_port); TCPB=$(free_port); TLS=$(free_port); TLSF=$(free_port); ADMIN=$(free_port)

# Backend.
mkdir -p "$WORK/nginx/logs" "$WORK/www"
head -c 100 /dev/zero | tr '\0' x >"$WORK/www/index.html"
head -c $((${BULK_KB:-10240} * 1024)) /dev/urandom >"$WORK/www/big"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$BACK reuseport backlog=4096;
        root $WORK/www;
        location = / { try_files /index.html =404; }
    }
    server {
        listen 127.0.0.1:$BACKH2 http2 backlog=4096;
        root $WORK/www;
        location = / { try_files /index.html =404; }
    }
}
EOF
taskset -c "$LOADGEN_CPUS" nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" &
track $!

# Certificate (ECDSA P-256, like the tests).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/combined.pem"

cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 8000
$([[ ${BUSY_POLLING:-0} == 1 ]] && echo "    busy-polling")
    ssl-default-bind-options ssl-min-ver TLSv1.2
    tune.ssl.default-dh-param 2048
    # No stateful session cache (https-full); tls_in still resumes with stateless tickets.
    tune.ssl.cachesize 0
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend tcp_in
    mode tcp
    bind 127.0.0.1:$TCP
    default_backend tcp_be
backend tcp_be
    mode tcp
    server s1 127.0.0.1:$BACK
frontend tls_in
    mode http
    bind 127.0.0.1:$TLS ssl crt $WORK/combined.pem alpn h2,http/1.1
    default_backend http_be
frontend tls_full
    mode http
    bind 127.0.0.1:$TLSF ssl crt $WORK/combined.pem alpn h2,http/1.1 no-tls-tickets
    default_backend http_be
backend http_be
    mode http
    http-reuse always
    server s1 127.0.0.1:$BACK
frontend h2up_in
    mode http
    bind 127.0.0.1:$H2UP
    default_backend h2_be
backend h2_be
    mode http
    http-reuse always
    server s1 127.0.0.1:$BACKH2 proto h2
EOF

cat >"$WORK/lb.toml" <<EOF
busy_polling = $([[ ${BUSY_POLLING:-0} == 1 ]] && echo true || echo false)
[admin]
bind = "127.0.0.1:$ADMIN"
[[listener]]
name = "tcp"
bind = "127.0.0.1:$TCP"
protocol = "tcp"
service = "raw"
[[listener]]
name = "tcpb"
bind = "127.0.0.1:$TCPB"
protocol = "tcp"
service = "raw"
bulk_batching = true
[[listener]]
name = "tls"
bind = "127.0.0.1:$TLS"
forwarded_headers = false
  [[listener.route]]
  service = "web"
  [listener.tls]
  session_tickets = 1
  [[listener.tls.certificate]]
  cert = "$WORK/cert.pem"
  key = "$WORK/key.pem"
[[listener]]
name = "tlsfull"
bind = "127.0.0.1:$TLSF"
forwarded_headers = false
  [[listener.route]]
  service = "web"
  [listener.tls]
  session_resumption = false
  [[listener.tls.certificate]]
  cert = "$WORK/cert.pem"
  key = "$WORK/key.pem"
[[listener]]
name = "h2up"
bind = "127.0.0.1:$H2UP"
forwarded_headers = false
  [[listener.route]]
  service = "web-h2"
[[service]]
name = "web-h2"
http2 = true
  [[service.endpoint]]
  addr = "127.0.0.1:$BACKH2"
[[service]]
name = "raw"
  [[service.endpoint]]
  addr = "127.0.0.1:$BACK"
[[service]]
name = "web"
  [[service.endpoint]]
  addr = "127.0.0.1:$BACK"
EOF

wait_up() { wait_http "https://127.0.0.1:$TLS/" 10 && wait_http "http://127.0.0.1:$TCP/" 10; }

# wrk output → one number: MiB/s for transfer, else requests/s.
run_wrk() { # name url extra-args...
    local url=$1; shift
    taskset -c "$LOADGEN_CPUS" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$@" "$url" 2>&1
}
rps() { awk '/^Requests\/sec/ { print $2 }'; }
mibs() { awk '/^Transfer\/sec/ { v = $2; u = substr(v, length(v) - 1); n = v + 0;
    if (u == "GB") n *= 1024; else if (u == "KB") n /= 1024; print n }'; }
errors() { awk '/Socket errors|Non-2xx/ { print }'; }

declare -A R C G PR S
# The proxy's CPU time (user + system) so far, in clock ticks.
ticks() { awk '{ print $14 + $15 }' "/proc/$PROXY_PID/stat"; }
# Busy and total jiffies of the load generator's CPUs (/proc/stat; busy leaves out idle,
# iowait and hypervisor steal). LOADGEN_CPUS as a comma list.
gen_jiffies() {
    awk -v cpus=",$LOADGEN_CPUS," '$1 ~ /^cpu[0-9]+$/ && index(cpus, "," substr($1, 4) ",") {
        t = 0; for (i = 2; i <= 9; i++) t += $i; busy += t - $5 - $6 - $9; total += t
    } END { print busy + 0, total + 0 }' /proc/stat
}
# Hypervisor steal and total jiffies of all CPUs: a run with steal measured a host that
# took the VM's cores away, whatever the proxies did.
steal_jiffies() {
    awk '$1 ~ /^cpu[0-9]+$/ { for (i = 2; i <= 9; i++) t += $i; s += $9 } END { print s + 0, t + 0 }' /proc/stat
}
# Percent of the jiffies between two "part total" samples that went to the part.
share() { # before after
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
        d = y[2] - x[2]; if (d > 0) printf "%.0f", (y[1] - x[1]) * 100 / d; else print 0 }'
}
# One wrk run: R[proxy,test] = its figure, C[proxy,test] = proxy CPU µs per request (per
# MiB for bulk) - efficiency, which noise from other work on the machine barely moves.
run() { # proxy test url extra-args...
    local p=$1 k=$2 url=$3 t0 t1 out n g0 g1
    shift 3
    # Unmeasured warm-up: the proxy's first connections (buffers, pools, page cache) are not
    # what a long-running proxy does.
    if [[ $WARMUP != 0 ]]; then
        taskset -c "$LOADGEN_CPUS" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$@" "$url" >/dev/null 2>&1
    fi
    g0=$(gen_jiffies)
    s0=$(steal_jiffies)
    t0=$(ticks)
    out=$(run_wrk "$url" "$@")
    t1=$(ticks)
    g1=$(gen_jiffies)
    s1=$(steal_jiffies)
    S[$p,$k]=$(share "$s0" "$s1")
    G[$p,$k]=$(share "$g0" "$g1")
    errors <<<"$out" | sed "s/^/# $p $k: /" >&2
    if [[ $k == tcp-bulk* ]]; then
        R[$p,$k]=$(mibs <<<"$out")
        n=$(awk '/ read$/ || / read,/ { for (i = 1; i <= NF; i++) if ($i == "read" || $i == "read,") v = $(i - 1);
            u = substr(v, length(v) - 1); x = v + 0; if (u == "GB") x *= 1024; else if (u == "KB") x /= 1024; print x }' <<<"$out")
    else
        R[$p,$k]=$(rps <<<"$out")
        n=$(awk '/ requests in / { print $1 }' <<<"$out")
    fi
    C[$p,$k]=$(awk -v d="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v n="$n" 'BEGIN { if (n > 0) printf "%.2f", d * 1e6 / hz / n; else print 0 }')
}
measure() { # proxy
    local p=$1 k port
    for k in $TESTS; do
        case $k in
            tcp-bulk) run "$p" tcp-bulk "http://127.0.0.1:$TCP/big" -c"${BULK_CONNS:-4}" ;;
            tcp-bulk-b)
                port=$([[ $p == balancer ]] && echo "$TCPB" || echo "$TCP")
                run "$p" tcp-bulk-b "http://127.0.0.1:$port/big" -c"${BULK_CONNS:-4}" ;;
            tcp-conn) run "$p" tcp-conn "http://127.0.0.1:$TCP/" -H "Connection: close" ;;
            https-ka) run "$p" https-ka "https://127.0.0.1:$TLS/" ;;
            https-hs) run "$p" https-hs "https://127.0.0.1:$TLS/" -H "Connection: close" ;;
            https-full) run "$p" https-full "https://127.0.0.1:$TLSF/" -H "Connection: close" ;;
            h2-up) run "$p" h2-up "http://127.0.0.1:$H2UP/" ;;
            *) echo "balancer-l4: unknown test $k" >&2; exit 1 ;;
        esac
    done
}

start_proxy() { # name
    case $1 in
        haproxy) taskset -c "$PROXY_CPUS" "${IN_BUDGET[@]}" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 & ;;
        balancer) RUST_LOG=warn taskset -c "$PROXY_CPUS" "${IN_BUDGET[@]}" "$BIN" --config "$WORK/lb.toml" --threads 1 >"$WORK/balancer.log" 2>&1 & ;;
    esac
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_up
}
stop_proxy() { kill "$PROXY_PID" 2>/dev/null || true; wait "$PROXY_PID" 2>/dev/null || true; sleep 0.3; }

echo "# $(haproxy -v | head -n1), wrk $(wrk -v 2>&1 | head -n1 | awk '{print $2}'), DURATION=${DURATION}s CONNS=$CONNS proxy on CPU $PROXY_CPUS BUSY_POLLING=${BUSY_POLLING:-0} CPU_BUDGET=${CPU_BUDGET:-none}"
declare -A SUM CSUM GSUM PS
PAIRS=$WORK/pairs  # one line per round and test: round test haproxy balancer, steal% of each
for round in $(seq "$ROUNDS"); do
    # Odd rounds measure HAProxy first, even rounds the balancer: on a VM whose speed
    # drifts within a round, always going second would tilt every round the same way.
    order="haproxy balancer"
    ((round % 2)) || order="balancer haproxy"
    for p in $order; do
        start_proxy "$p"
        measure "$p"
        stop_proxy
        for k in $TESTS; do
            PR[$round,$p,$k]=${R[$p,$k]:-0}
            PS[$round,$p,$k]=${S[$p,$k]:-0}
            SUM[$p,$k]=$(awk -v a="${SUM[$p,$k]:-0}" -v b="${R[$p,$k]:-0}" 'BEGIN { print a + b }')
            CSUM[$p,$k]=$(awk -v a="${CSUM[$p,$k]:-0}" -v b="${C[$p,$k]:-0}" 'BEGIN { print a + b }')
            GSUM[$p,$k]=$(awk -v a="${GSUM[$p,$k]:-0}" -v b="${G[$p,$k]:-0}" 'BEGIN { print a + b }')
        done
    done
    for k in $TESTS; do
        echo "$round $k ${PR[$round,haproxy,$k]} ${PR[$round,balancer,$k]} ${PS[$round,haproxy,$k]} ${PS[$round,balancer,$k]}" >>"$PAIRS"
    done
done

# Throughput (higher is better) and the proxy's CPU per unit of work (lower is better),
# both as means over the rounds.
printf '%-10s %10s %10s %6s   %12s %12s %6s\n' metric haproxy balancer ratio "hap-µs-cpu" "bal-µs-cpu" ratio
for k in $TESTS; do
    h=$(awk -v s="${SUM[haproxy,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.1f", s / n }')
    b=$(awk -v s="${SUM[balancer,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.1f", s / n }')
    ratio=$(awk -v h="$h" -v b="$b" 'BEGIN { if (h > 0) printf "%.2f", b / h; else print "-" }')
    hc=$(awk -v s="${CSUM[haproxy,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.2f", s / n }')
    bc=$(awk -v s="${CSUM[balancer,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.2f", s / n }')
    cratio=$(awk -v h="$hc" -v b="$bc" 'BEGIN { if (h > 0) printf "%.2f", b / h; else print "-" }')
    unit=$([[ $k == tcp-bulk* ]] && echo "MiB/s; CPU µs per MiB" || echo "/s; CPU µs per request")
    printf '%-10s %10s %10s %6s   %12s %12s %6s  (%s)\n' "$k" "$h" "$b" "$ratio" "$hc" "$bc" "$cratio" "$unit"
done
echo "# ratio: balancer / HAProxy - throughput target > 1, CPU per unit target < 1; load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
# How busy the load generator's core (wrk + nginx: gen-*) and each proxy's core were. With
# the load generator near 100 % behind both proxies, the throughput ratio is set by what
# each proxy makes that core do per unit (wakeups, segment sizes), not by the proxy's own
# cost: compare the CPU columns then.
printf '%-10s %12s %12s %12s %12s  (busy %%, means over rounds)\n' test gen-haproxy gen-balancer haproxy balancer
for k in $TESTS; do
    printf '%-10s %12s %12s %12s %12s\n' "$k" \
        "$(awk -v s="${GSUM[haproxy,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.0f", s / n }')" \
        "$(awk -v s="${GSUM[balancer,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.0f", s / n }')" \
        "$(awk -v r="${SUM[haproxy,$k]}" -v c="${CSUM[haproxy,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.0f", (r / n) * (c / n) / 1e4 }')" \
        "$(awk -v r="${SUM[balancer,$k]}" -v c="${CSUM[balancer,$k]}" -v n="$ROUNDS" 'BEGIN { printf "%.0f", (r / n) * (c / n) / 1e4 }')"
done

# The throughput ratio of each round's pair (both proxies measured within a minute of each
# other): its median moves less with the VM's speed than the ratio of the means above.
if ((ROUNDS > 1)); then
    python3 - "$PAIRS" "${STEAL_MAX:-1}" <<'PY'
import statistics, sys
steal_max = float(sys.argv[2])
by_test, quiet, steal = {}, {}, {}
for line in open(sys.argv[1]):
    _, test, h, b, sh, sb = line.split()
    steal.setdefault(test, []).append(max(float(sh), float(sb)))
    if float(h) > 0:
        r = float(b) / float(h)
        by_test.setdefault(test, []).append(r)
        if max(float(sh), float(sb)) <= steal_max:
            quiet.setdefault(test, []).append(r)
def summary(r):
    return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})" if r else "-"
print(f"# throughput ratio per round pair (rounds alternate which proxy goes first): median (min-max),"
      f" all rounds and those with steal% <= {steal_max:g} on both sides")
for test, r in by_test.items():
    q = quiet.get(test, [])
    print(f"{test:<10} all {summary(r):<18} steal-free {summary(q):<18} {len(q)}/{len(r)}"
          f"  steal% med {statistics.median(steal[test]):.0f}  " + " ".join(f"{x:.2f}" for x in r))
PY
fi
