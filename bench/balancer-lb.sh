#!/usr/bin/env bash
# balancer-lb.sh - the wharf balancer side by side with HAProxy and nginx, using the shared
# harness /work/shared/bench/lb-bench.sh (see its header for every knob: DURATION, ROUNDS,
# CONNS, BACKENDS, CPU pinning). The balancer runs as the harness's "extra" proxy: a release
# build, pinned to the proxy core like the others, single-threaded (--threads 1), with the
# harness's backends as one static service (round_robin, like HAProxy's config).
#
# Usage: bench/balancer-lb.sh                 (defaults of lb-bench.sh: 3 rounds of 10 s)
#        DURATION=5 ROUNDS=1 bench/balancer-lb.sh
# Needs: haproxy nginx wrk curl (Debian packages), a Rust toolchain.
#
# After the harness's table it prints the balancer's ratios to HAProxy: req/s (target
# >= 1.15), proxy CPU us per request (target <= 0.8) and p99 (target <= 1.0): from the
# medians, then per round pair (median of the pairs, all and without hypervisor steal),
# then the load generator's cap on the req/s ratio in this run (see the end of the file).
#
# Same work as HAProxy: the harness's HAProxy config adds no X-Forwarded-* header (no
# `option forwardfor`), so the balancer runs with `forwarded_headers = false` too.
# FORWARDED_HEADERS=true measures it with its default headers (nginx then parses three
# more lines per request on the load generator's core: ~4 % fewer req/s, session 6).
# BUSY_POLLING=1 runs the balancer with `busy_polling = true` (the harness's HAProxy has no
# `busy-polling`; at ~98 % busy it hardly sleeps anyway); its CPU column then counts the spin.
#
# CPU_BUDGET=PERCENT gives each proxy only that share of its core (a cgroup CPU quota,
# bench/lib.sh cpu_budget_init; HAProxy through a `haproxy` on the harness's PATH that
# joins the group first). On 2 cores the load generator's core otherwise sets req/s for
# every proxy (the cap printed at the end); under a budget the proxy is what runs out, so
# the req/s ratio is the proxies' own. Needs root.
set -euo pipefail

. "$(dirname "$0")/lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
HARNESS=${HARNESS:-$BENCH_ROOT/../shared/bench/lb-bench.sh}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-balancer}
# PROFILE=bench-fast: a quicker build for iterating (thin LTO); figures to report: release.
PROFILE=${PROFILE:-release}

# Called by the harness (inside EXTRA_CMD): write lb.toml from its variables, run.
if [[ ${1:-} == --serve ]]; then
    : "${LB_PORT:?}" "${LB_BACKENDS:?}" "${LB_WORKDIR:?}"
    {
        echo "busy_polling = $([[ ${BUSY_POLLING:-0} == 1 ]] && echo true || echo false)"
        echo '[admin]'
        echo 'bind = "127.0.0.1:0"'
        echo '[[listener]]'
        echo 'name = "bench"'
        echo "bind = \"127.0.0.1:$LB_PORT\""
        echo "forwarded_headers = ${FORWARDED_HEADERS:-false}"
        echo '  [[listener.route]]'
        echo '  service = "bench"'
        echo '[[service]]'
        echo 'name = "bench"'
        echo 'algorithm = "round_robin"'
        IFS=, read -ra eps <<<"$LB_BACKENDS"
        for ep in "${eps[@]}"; do
            echo '  [[service.endpoint]]'
            echo "  addr = \"$ep\""
        done
    } >"$LB_WORKDIR/lb.toml"
    if [[ -n ${CPU_BUDGET_CG:-} ]]; then echo $$ >"$CPU_BUDGET_CG/cgroup.procs"; fi
    RUST_LOG=warn exec "$2" --config "$LB_WORKDIR/lb.toml" --threads 1
fi

[[ -x $HARNESS ]] || [[ -f $HARNESS ]] || { echo "balancer-lb: harness $HARNESS not found" >&2; exit 1; }
# BALANCER_BIN=path: measure that binary as it is (no build).
BIN=$(build_bin BALANCER_BIN wharf-balancer balancer)

bench_init
OUT=$WORK/out
if [[ -n ${CPU_BUDGET:-} ]]; then
    cpu_budget_init "$CPU_BUDGET"
    export CPU_BUDGET_CG
    # The harness starts `haproxy` from PATH: this one joins the budget, then is HAProxy.
    real_haproxy=$(command -v haproxy)
    mkdir -p "$WORK/bin"
    printf '#!/bin/sh\necho $$ >"%s/cgroup.procs" && exec "%s" "$@"\n' "$CPU_BUDGET_CG" "$real_haproxy" >"$WORK/bin/haproxy"
    chmod +x "$WORK/bin/haproxy"
    export PATH=$WORK/bin:$PATH
    echo "# CPU budget: each proxy gets $CPU_BUDGET % of its core ($CPU_BUDGET_CG)"
fi
export FORWARDED_HEADERS=${FORWARDED_HEADERS:-false}
echo "# balancer: forwarded_headers = $FORWARDED_HEADERS (HAProxy's config here adds none)"
EXTRA_NAME=balancer EXTRA_PORT=${EXTRA_PORT:-18003} \
    EXTRA_CMD="exec bash '$HERE/balancer-lb.sh' --serve '$BIN'" \
    bash "$HARNESS" | tee "$OUT"

# Ratios to HAProxy from the harness's median table.
awk '
    /^## median/ { on = 1; next }
    on && $1 == "haproxy"  { hr = $2; h50 = $4; h99 = $5; hus = $11 }
    on && $1 == "balancer" { br = $2; b50 = $4; b99 = $5; bus = $11 }
    END {
        if (hr == "" || br == "") { print "balancer-lb: no haproxy/balancer rows to compare"; exit 1 }
        print ""
        print "## balancer vs haproxy (median)"
        printf "%-14s %10s %10s %8s %s\n", "metric", "balancer", "haproxy", "ratio", "target"
        printf "%-14s %10s %10s %8.3f %s\n", "req/s", br, hr, br / hr, ">= 1.15"
        printf "%-14s %10s %10s %8.3f %s\n", "us CPU/req", bus, hus, (hus > 0 ? bus / hus : 0), "<= 0.80"
        printf "%-14s %10s %10s %8.3f %s\n", "p50 ms", b50, h50, (h50 > 0 ? b50 / h50 : 0), "-"
        printf "%-14s %10s %10s %8.3f %s\n", "p99 ms", b99, h99, (h99 > 0 ? b99 / h99 : 0), "<= 1.00"
    }' "$OUT"

# Ratios per round pair (the two proxies of one round ran back to back, so a pair shares
# the machine's state; their median drifts less than the ratio of medians on a VM whose
# speed moves between rounds), over all rounds and over the rounds without hypervisor
# steal (steal% <= STEAL_MAX on both sides).
python3 - "$OUT" "${STEAL_MAX:-1}" <<'PY'
import os, statistics, sys
rows, steal_max = {}, float(sys.argv[2])
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 15 and f[0].isdigit() and f[1] in ("haproxy", "balancer"):
        rows.setdefault(f[0], {})[f[1]] = f
def ratios(pairs, col):
    return [float(b[col]) / float(h[col]) for h, b in pairs if float(h[col]) > 0]
pairs = [(r["haproxy"], r["balancer"]) for r in rows.values() if len(r) == 2]
quiet = [(h, b) for h, b in pairs if float(h[14]) <= steal_max and float(b[14]) <= steal_max]
print()
print(f"## balancer / haproxy per round pair: median (min-max); {len(pairs)} pairs, "
      f"{len(quiet)} with steal% <= {steal_max:g}")
for name, col in (("req/s", 2), ("us CPU/req", 8), ("p99 ms", 4)):
    out = []
    for group in (pairs, quiet):
        r = ratios(group, col)
        out.append(f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})" if r else "-")
    print(f"{name:<14} all {out[0]:<22} steal-free {out[1]}")

# The load generator's cap on this run: wrk and the backends share one core, so no proxy
# gets more than 1e6 / (their CPU us per request) req/s, and the req/s ratio to HAProxy
# cannot pass HAProxy's us per request / theirs (behind the balancer). wrk% and bk% are
# percent of one core: us per request = pct * 1e4 / rps. (Session 7: the measured ratio
# stayed within ~10 % of this cap in every run; it moves with the VM's speed.)
def med(name, fn):
    v = [fn(r[name]) for r in rows.values() if name in r]
    return statistics.median(v) if v else 0.0
hap_us = med("haproxy", lambda f: float(f[8]))
gen_us = med("balancer", lambda f: (float(f[9]) + float(f[10])) * 1e4 / float(f[2]))
if os.environ.get("CPU_BUDGET"):
    print()
    print(f"## CPU budget {os.environ['CPU_BUDGET']} % of a core per proxy: req/s is the proxies' own "
          "(no load generator cap; P% shows each proxy's core use)")
elif hap_us > 0 and gen_us > 0:
    print()
    print(f"## load generator cap: wrk + backends {gen_us:.1f} us/request behind the balancer, "
          f"HAProxy {hap_us:.1f} us/request -> req/s ratio cap {hap_us / gen_us:.3f}")
PY
