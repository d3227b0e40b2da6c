#!/usr/bin/env bash
# rollout.sh - a canary rollout under the highest load this machine sustains through the
# balancer: 4 × v1 busybox httpd containers behind one balancer, wrk at constant
# concurrency for the whole run, `registrar rollout` to v2 in steps gated on the
# balancer's metrics. Reports requests served, failed requests (non-2xx + socket errors,
# target 0), and p99 before vs during the rollout.
# Everything on 127.0.0.1; a private etcd on free ports; every process and container
# stopped on exit. Needs root (containers).
# Usage: [PROFILE=release|bench-fast|debug] [CONNS=32] [P99_RATIO=3] [STEPS=5,25,50,100] [STEP_WAIT=5s] bench/rollout.sh
#        BALANCER_BIN / HEALTHCHECK_BIN / REGISTRAR_BIN=path: that binary, not a build.
# Needs: etcd-server etcd-client curl wrk python3 busybox-static (Debian packages).
# Shared helpers (work dir, cleanup, ports, builds): bench/lib.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$BENCH_ROOT/target}
PROFILE=${PROFILE:-release}
CONNS=${CONNS:-32}
# The gate at saturation: busybox httpd's listen backlog (9) overflows now and then and a
# dropped SYN costs 1 s, so a canary's p99 over a few hundred answers is noisy.
P99_RATIO=${P99_RATIO:-3}
STEPS=${STEPS:-5,25,50,100}
STEP_WAIT=${STEP_WAIT:-5s}
BEFORE=${BEFORE:-10}
[[ $(id -u) == 0 ]] || { echo "rollout.sh: needs root (containers)" >&2; exit 1; }
need etcd etcdctl curl wrk python3 busybox
# release (fat LTO, slow to build), bench-fast (thin LTO) or debug; *_BIN: use that binary.
BALANCER=$(build_bin BALANCER_BIN wharf-balancer balancer)
HEALTHCHECK=$(build_bin HEALTHCHECK_BIN wharf-healthcheck healthcheck)
REGISTRAR=$(build_bin REGISTRAR_BIN wharf-registrar registrar)

bench_init
STATE=$WORK/state
export WHARF_STATE_DIR=$STATE
# Containers first (drained by the agent), then the processes we started.
before_cleanup() {
    if [[ -S $STATE/agent.sock ]]; then
        timeout 30 "$REGISTRAR" stop web --grace 2s >/dev/null 2>&1 || true
    fi
}
image() { # DIR VERSION
    local root=$1/rootfs
    mkdir -p "$root"/{bin,etc,tmp,proc,dev,www}
    cp /bin/busybox "$root/bin/busybox"
    for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -s busybox "$root/bin/$a"; done
    echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
    echo "$2" >"$root/www/index.html"
    echo "$root"
}
EC=$(free_port); EP=$(free_port); LBP=$(free_port); ADM=$(free_port); AADM=$(free_port)
HADM=$(free_port)
PORT=$(free_port_range 8)  # replica ports: 8 consecutive ones (4 × v1, then 4 × v2)
ETCD=http://127.0.0.1:$EC
export WHARF_ETCD=$ETCD
etcd --name b --data-dir "$WORK/etcd" --listen-client-urls "$ETCD" \
    --advertise-client-urls "$ETCD" --listen-peer-urls "http://127.0.0.1:$EP" \
    --initial-advertise-peer-urls "http://127.0.0.1:$EP" --initial-cluster "b=http://127.0.0.1:$EP" \
    --log-level error >"$WORK/etcd.log" 2>&1 &
track $!
wait_http "$ETCD/health" 10
V1=$(image "$WORK/v1" v1)
V2=$(image "$WORK/v2" v2)
RUST_LOG=warn "$REGISTRAR" agent --node bench --admin "127.0.0.1:$AADM" >"$WORK/agent.log" 2>&1 &
track $!
for _ in $(seq 100); do [[ -S $STATE/agent.sock ]] && break; sleep 0.1; done
[[ -S $STATE/agent.sock ]] || { echo "rollout.sh: the agent did not start (KEEP_TMP=1 keeps $WORK/agent.log)" >&2; exit 1; }
"$REGISTRAR" service set web --check-path / --interval 500ms --timeout 1s --rise 2 \
    --fall 3 --drain-timeout 2s >/dev/null
RUST_LOG=warn "$HEALTHCHECK" --id bench --admin "127.0.0.1:$HADM" >"$WORK/healthcheck.log" 2>&1 &
track $!
cat >"$WORK/lb.toml" <<TOML
[admin]
bind = "127.0.0.1:$ADM"
[discovery.etcd]
endpoints = ["$ETCD"]
[[listener]]
name = "web"
bind = "127.0.0.1:$LBP"
  [[listener.route]]
  service = "web"
TOML
RUST_LOG=warn "$BALANCER" --config "$WORK/lb.toml" >"$WORK/lb.log" 2>&1 &
track $!
# shellcheck disable=SC2016 # $PORT is the replica's own, expanded in the container
"$REGISTRAR" run --service web --version v1 --image "$V1" --port "$PORT" --replicas 4 \
    -- sh -c 'exec httpd -f -p $PORT -h /www' >/dev/null
# All four passing first (before the first mark the balancer is in panic mode and reports
# every serving instance up; the first mark alone would then take the whole load).
for _ in $(seq 300); do
    p=$(ETCDCTL_API=3 etcdctl --endpoints "$ETCD" get --prefix /wharf/v1/services/web/health/ \
        --print-value-only 2>/dev/null | grep -c '"passing"' || true)
    n=$(curl -s "http://127.0.0.1:$ADM/metrics" | grep -c '^balancer_backend_up{.*service="web".* 1$' || true)
    [[ $p == 4 && $n == 4 ]] && break
    sleep 0.1
done
[[ $n == 4 ]] || { echo "v1 replicas not routable; KEEP_TMP=1 keeps the logs in $WORK" >&2; exit 1; }
URL=http://127.0.0.1:$LBP/

# wrk's summary: requests, non-2xx, socket errors, p99 (ms).
summary() {
    python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
req = int(re.search(r"(\d+) requests in", t).group(1))
non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", t)) else 0
sock = sum(map(int, m.groups())) if (m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)) else 0
m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", t)
p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
print(f"{req} {non2xx} {sock} {p99:.2f} {rps:.0f}")
PY
}
echo "# before: wrk -t2 -c$CONNS -d${BEFORE}s (4 × v1)" >&2
wrk -t2 -c"$CONNS" -d"${BEFORE}s" --latency "$URL" >"$WORK/before.txt"
read -r b_req b_non b_sock b_p99 b_rps < <(summary "$WORK/before.txt")

# During: wrk covers the rollout (steps × step wait + replicas starting + draining); the
# rollout starts 2 s in. A warning says when the rollout outlasted it.
nsteps=$(tr ',' '\n' <<<"$STEPS" | grep -c .)
DURING=${DURING:-$(( nsteps * ${STEP_WAIT%s} + 14 ))}
wrk -t2 -c"$CONNS" -d"${DURING}s" --latency "$URL" >"$WORK/during.txt" &
WRK=$!
track "$WRK"
sleep 2
start=$(date +%s.%N)
"$REGISTRAR" rollout web --image "$V2" --version v2 --steps "$STEPS" --step-wait "$STEP_WAIT" --max-p99-ratio "$P99_RATIO" \
    --metrics "http://127.0.0.1:$ADM/metrics" | grep -v '] .*: v2 .* req' >&2 || { echo "rollout failed" >&2; exit 1; }
took=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
wait "$WRK" || true
python3 -c "import sys; sys.exit(0 if $took < $DURING - 2 else 1)" ||
    echo "# warning: the rollout took longer than wrk ran (${DURING}s); raise DURING" >&2
read -r d_req d_non d_sock d_p99 d_rps < <(summary "$WORK/during.txt")
after=$(curl -s "$URL")
echo "rollout of 4 replicas v1 -> v2, steps $STEPS, step wait $STEP_WAIT: ${took}s"
echo "load: wrk -t2 -c$CONNS through the balancer (${BALANCER_BIN:-$PROFILE build})"
printf '%-8s %10s %10s %8s %8s %10s\n' phase requests req/s non2xx sockerr p99_ms
printf '%-8s %10s %10s %8s %8s %10s\n' before "$b_req" "$b_rps" "$b_non" "$b_sock" "$b_p99"
printf '%-8s %10s %10s %8s %8s %10s\n' during "$d_req" "$d_rps" "$d_non" "$d_sock" "$d_p99"
echo "failed requests during the rollout: $((d_non + d_sock)); answer after: $after"
