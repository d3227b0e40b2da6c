#!/usr/bin/env bash
# Whole container run of /bin/true (create, start, exec, wait, clean up) on the same busybox
# rootfs: wharf's runtime (`registrar oneshot`) versus Debian's runc. Prints the mean time per
# run of each and the ratio. Target: wharf <= 0.5x runc.
#
#   bench/runtime-vs-runc.sh [RUNS]        (root; installs runc, busybox-static, jq, bc if missing)
#   REGISTRAR=path/to/registrar bench/runtime-vs-runc.sh 5     (that binary, no build)
# Shared helpers (work dir, cleanup, build): bench/lib.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$BENCH_ROOT"  # a relative REGISTRAR path is taken from the workspace root
runs=${1:-50}

for p in runc busybox-static jq bc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$p" >/dev/null
done
# REGISTRAR=path/to/registrar skips the build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-registrar}
registrar=$(PROFILE=release build_bin REGISTRAR wharf-registrar registrar)

bench_init
work=$WORK
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs"/{bin,etc,proc,dev,tmp}
cp /bin/busybox "$rootfs/bin/"
for a in $("$rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$rootfs/bin/$a"; done

# runc bundle: the default spec, running /bin/true without a terminal.
(cd "$work/bundle" && runc spec)
jq '.process.args = ["/bin/true"] | .process.terminal = false' "$work/bundle/config.json" >"$work/c.json"
mv "$work/c.json" "$work/bundle/config.json"

now_ns() { date +%s%N; }

# The two runtimes alternate run by run, so that a load change on this shared machine hits
# both alike.
runc_cmd=(runc --root "$work/runc-state" run --bundle "$work/bundle" "wharf-bench-$$")
wharf_cmd=("$registrar" oneshot --image "$rootfs" --state-dir "$work/wharf-state" --name bench -- /bin/true)
"${runc_cmd[@]}" >/dev/null 2>&1 || { echo "runc warm-up failed" >&2; "${runc_cmd[@]}"; exit 1; }
"${wharf_cmd[@]}" >/dev/null 2>&1 || { echo "wharf warm-up failed" >&2; "${wharf_cmd[@]}"; exit 1; }
runc_t=() wharf_t=()
for ((i = 0; i < runs; i++)); do
    t0=$(now_ns); "${runc_cmd[@]}" >/dev/null 2>&1; t1=$(now_ns)
    "${wharf_cmd[@]}" >/dev/null 2>&1; t2=$(now_ns)
    runc_t+=($(( (t1 - t0) / 1000 ))) wharf_t+=($(( (t2 - t1) / 1000 )))
done
stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1; s+=$1} END {printf "%d %d\n", s/NR, a[int((NR+1)/2)]}'; }
read -r runc_mean runc_med < <(stats "${runc_t[@]}")
read -r wharf_mean wharf_med < <(stats "${wharf_t[@]}")

ms() { echo "scale=2; $1 / 1000" | bc; }
printf 'runs per runtime: %d   (load average: %s)\n' "$runs" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s mean %7s ms   median %7s ms\n' "runc $(runc --version | awk 'NR==1{print $3}'):" "$(ms "$runc_mean")" "$(ms "$runc_med")"
printf '%-28s mean %7s ms   median %7s ms\n' "wharf (registrar oneshot):" "$(ms "$wharf_mean")" "$(ms "$wharf_med")"
printf 'ratio wharf/runc: mean %.2f   median %.2f   (target <= 0.50)\n' \
    "$(echo "$wharf_mean / $runc_mean" | bc -l)" "$(echo "$wharf_med / $runc_med" | bc -l)"
