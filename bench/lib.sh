# bench/lib.sh - the boilerplate the bench/ scripts share. Source it, do not run it:
#
#   . "$(dirname "$0")/lib.sh"
#
# Sourcing only defines functions and BENCH_NAME / BENCH_ROOT; nothing starts until a
# function is called, so a script may source it in a mode that needs none of it.
#
#   need CMD...                 every CMD on PATH, else one error naming the Debian packages
#   bench_init                  WORK=$TMPDIR/<script>.XXXXXX, PID registry, cleanup trap
#   track PID...                kill PID at exit (TERM, then KILL after a grace), wait for it
#   before_cleanup              optional hook: define it, and cleanup calls it first
#   free_port                   a free port, never the same twice in one run
#   free_port_range COUNT       the first of COUNT consecutive free ports (same rules)
#   wait_port HOST PORT SECS    until HOST:PORT accepts a TCP connection, or fail
#   wait_http URL SECS          until URL answers 2xx (TLS certificate not checked), or fail
#   build_bin VAR PACKAGE BIN   path of binary BIN: $VAR when set, else built with cargo
#   cpu_budget_init PERCENT     a cgroup that lets its processes use PERCENT of one core
#   "${IN_BUDGET[@]}" CMD...    (set by cpu_budget_init) runs CMD inside that cgroup
#
# Settings honoured: KEEP_TMP=1 (keep WORK after the run), KILL_GRACE [2] seconds between
# TERM and KILL at cleanup, PROFILE [release] and CARGO_TARGET_DIR for build_bin.
# shellcheck shell=bash

BENCH_NAME=$(basename "$0" .sh)
BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The Debian package that provides a command, where it is not the command's own name.
bench_package_of() {
    case $1 in
        etcd) echo etcd-server ;;
        etcdctl) echo etcd-client ;;
        taskset) echo util-linux ;;
        callgrind_control | callgrind_annotate) echo valgrind ;;
        busybox) echo busybox-static ;;
        *) echo "$1" ;;
    esac
}

# need CMD... - fail with one message naming every missing command and its package.
need() {
    local c missing=() pkgs=()
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 && continue
        missing+=("$c")
        pkgs+=("$(bench_package_of "$c")")
    done
    ((${#missing[@]} == 0)) && return 0
    echo "$BENCH_NAME: needs ${missing[*]} (apt-get install -y ${pkgs[*]})" >&2
    exit 1
}

# bench_init - WORK: a fresh directory ($TMPDIR or /tmp, named after the script), removed
# at exit unless KEEP_TMP=1, and the cleanup trap: every PID given to `track` is stopped.
bench_init() {
    WORK=$(mktemp -d -t "$BENCH_NAME.XXXXXX")
    BENCH_PIDS=()
    BENCH_PORTS=$WORK/.ports  # free_port's record: the ports handed out in this run
    : >"$BENCH_PORTS"
    trap bench_cleanup EXIT
    # A signal ends the script (exit runs the EXIT trap once); 130/143 like bash itself.
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# track PID... - stop these processes at exit.
track() { BENCH_PIDS+=("$@"); }

# bench_still_running - keep in the array BENCH_LIVE only the PIDs that are running
# background jobs of this shell (no subshell: it must see this shell's job table).
bench_still_running() {
    local running p kept=()
    running=" $(jobs -pr | tr '\n' ' ') "
    for p in "${BENCH_LIVE[@]}"; do
        if [[ $running == *" $p "* ]]; then kept+=("$p"); fi
    done
    BENCH_LIVE=("${kept[@]}")
}

# Every tracked process still running gets SIGTERM; those still there after KILL_GRACE
# seconds get SIGKILL; all are reaped; WORK goes (unless KEEP_TMP=1). Only PIDs that are
# still running jobs of this shell are signalled: one that ended (and was reaped) earlier
# may since belong to an unrelated process. Keeps the script's exit status.
bench_cleanup() {
    local status=$? p deadline live
    trap - EXIT
    trap '' INT TERM  # a second ^C must not cut the cleanup short
    if declare -F before_cleanup >/dev/null; then before_cleanup || true; fi
    BENCH_LIVE=("${BENCH_PIDS[@]}")
    bench_still_running
    live=("${BENCH_LIVE[@]}")
    for p in "${live[@]}"; do kill "$p" 2>/dev/null || true; done
    deadline=$(($(date +%s%N) + ${KILL_GRACE:-2} * 1000000000))
    while :; do
        bench_still_running
        ((${#BENCH_LIVE[@]} == 0 || $(date +%s%N) > deadline)) && break
        sleep 0.05
    done
    for p in "${BENCH_LIVE[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${live[@]}"; do wait "$p" 2>/dev/null || true; done
    cpu_budget_remove
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "# $BENCH_NAME: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}

# free_port_range COUNT - print a port P such that P..P+COUNT-1 are all bindable (on 0.0.0.0,
# which also rules out any 127.0.0.1 listener) and none was handed out before in this run,
# then remember them. Ports come from below the kernel's ephemeral range, so outgoing
# connections (wrk, the proxies' upstream sockets) cannot take one before its server binds
# it; a server started by someone else in between still can: a small race, not zero.
# Needs bench_init (the record lives in WORK).
free_port_range() {
    [[ -n ${BENCH_PORTS:-} ]] || { echo "$BENCH_NAME: free_port before bench_init" >&2; return 1; }
    python3 - "$1" "$BENCH_PORTS" <<'PY'
import random, socket, sys
count, record = int(sys.argv[1]), sys.argv[2]
given = {int(p) for p in open(record).read().split()}
lo, hi = 10000, int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
if hi - lo < 1000:  # an unusual ephemeral range: take any port below 65536
    lo, hi = 1024, 65536
for _ in range(10000):
    base = random.randrange(lo, hi - count + 1)
    ports = range(base, base + count)
    if given.intersection(ports):
        continue
    socks = []
    try:
        for p in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("0.0.0.0", p))
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    with open(record, "a") as f:
        f.write("".join(f"{p}\n" for p in ports))
    print(base)
    break
else:
    sys.exit(f"free_port: no {count} free consecutive ports in {lo}..{hi}")
PY
}

# free_port - one free port, by the rules of free_port_range.
free_port() { free_port_range 1; }

# wait_port HOST PORT SECS - return once HOST:PORT accepts a TCP connection; after SECS
# seconds, an error naming it and a failing status (which ends a `set -e` script).
wait_port() {
    local host=$1 port=$2 secs=$3 deadline
    deadline=$(($(date +%s%N) + secs * 1000000000))
    until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
        if (($(date +%s%N) > deadline)); then
            echo "$BENCH_NAME: nothing answers on $host:$port after ${secs}s" >&2
            return 1
        fi
        sleep 0.05
    done
}

# wait_http URL SECS - return once URL answers with a 2xx status; after SECS seconds, an
# error naming it and a failing status. The certificate is not checked (self-signed ones).
wait_http() {
    local url=$1 secs=$2 deadline
    deadline=$(($(date +%s%N) + secs * 1000000000))
    until curl -skf -o /dev/null --max-time 2 "$url"; do
        if (($(date +%s%N) > deadline)); then
            echo "$BENCH_NAME: $url did not answer 2xx within ${secs}s" >&2
            return 1
        fi
        sleep 0.05
    done
}

# build_bin VAR PACKAGE BIN - print the path of binary BIN of cargo package PACKAGE: the
# value of the variable named VAR when it is set (that binary, as it is: no build), else
# `cargo build --profile $PROFILE` [release] in the workspace (CARGO_TARGET_DIR honoured;
# PROFILE=debug means cargo's dev profile) and the binary it wrote.
build_bin() {
    local var=$1 pkg=$2 bin=$3 profile=${PROFILE:-release} dir target=${CARGO_TARGET_DIR:-target}
    if [[ -n ${!var:-} ]]; then
        [[ -x ${!var} ]] || { echo "$BENCH_NAME: $var=${!var} is not an executable" >&2; return 1; }
        echo "${!var}"
        return
    fi
    [[ $profile == debug ]] && profile=dev
    dir=$([[ $profile == dev ]] && echo debug || echo "$profile")
    # cargo runs in the workspace root: a relative target dir is taken from there.
    [[ $target == /* ]] || target=$BENCH_ROOT/$target
    echo "# building $bin ($profile) in $target" >&2
    (cd "$BENCH_ROOT" && cargo build --profile "$profile" -q -p "$pkg" --bin "$bin") || return 1
    echo "$target/$dir/$bin"
}

# cpu_budget_init PERCENT - a CPU cgroup of this run whose processes together get at most
# PERCENT of one core (CFS bandwidth: PERCENT * 100 µs of every 10 ms), for measuring a
# proxy where the proxy, not the load generator, is what runs out of CPU: on 2 cores the
# load generator's core caps every proxy (see balancer/PERF-LOG.md, round 15). cgroup v2
# (cpu.max) or v1 (the cpu controller's cfs_* files); needs root. Sets CPU_BUDGET_CG; the
# cleanup trap removes the group. Give every compared proxy the same budget.
# IN_BUDGET: a command prefix that moves the process into the group and execs the rest, so
# `"${IN_BUDGET[@]}" haproxy …` keeps the PID it was started with (empty: no budget).
IN_BUDGET=()
cpu_budget_init() {
    local pct=$1 root
    [[ $pct =~ ^[0-9]+$ ]] && ((pct >= 1 && pct <= 100)) ||
        { echo "$BENCH_NAME: CPU budget must be 1-100 (percent of a core), got '$pct'" >&2; return 1; }
    if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
        root=/sys/fs/cgroup
        grep -qw cpu "$root/cgroup.subtree_control" || echo +cpu >"$root/cgroup.subtree_control"
        CPU_BUDGET_CG=$root/wharf-bench-$$
        mkdir "$CPU_BUDGET_CG"
        echo "$((pct * 100)) 10000" >"$CPU_BUDGET_CG/cpu.max"
    elif [[ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]]; then
        CPU_BUDGET_CG=/sys/fs/cgroup/cpu/wharf-bench-$$
        mkdir "$CPU_BUDGET_CG"
        echo 10000 >"$CPU_BUDGET_CG/cpu.cfs_period_us"
        echo "$((pct * 100))" >"$CPU_BUDGET_CG/cpu.cfs_quota_us"
    else
        echo "$BENCH_NAME: no cgroup cpu controller found for a CPU budget" >&2
        return 1
    fi
    # shellcheck disable=SC2016 # $$ and $0 are the child shell's
    IN_BUDGET=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CPU_BUDGET_CG")
}

# cpu_budget_remove - remove the budget's cgroup once its processes are gone (the cleanup
# trap calls it after stopping them; a cgroup with a process left in it stays, with a note).
cpu_budget_remove() {
    [[ -n ${CPU_BUDGET_CG:-} && -d $CPU_BUDGET_CG ]] || return 0
    local t
    for ((t = 0; t < 50; t++)); do
        rmdir "$CPU_BUDGET_CG" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "# $BENCH_NAME: could not remove $CPU_BUDGET_CG (a process is still in it)" >&2
}
