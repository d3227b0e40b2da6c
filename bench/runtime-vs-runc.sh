#!/usr/bin/env bash
# Whole container run of /bin/true (create, start, exec, wait, clean up) on the same busybox
# rootfs: wharf's runtime (`registrar oneshot`) versus Debian's runc. Prints the mean time per
# run of each and the ratio. Target: wharf <= 0.5x runc.
#
#   bench/runtime-vs-runc.sh [RUNS]        (root; installs runc and busybox-static if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-50}

for p in runc busybox-static jq; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$p" >/dev/null
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-registrar}
cargo build --release -q -p wharf-registrar
registrar=$CARGO_TARGET_DIR/release/registrar

work=$(mktemp -d /tmp/wharf-bench-runtime.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs"/{bin,etc,proc,dev,tmp}
cp /bin/busybox "$rootfs/bin/"
for a in $("$rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$rootfs/bin/$a"; done

# runc bundle: the default spec, running /bin/true without a terminal.
(cd "$work/bundle" && runc spec)
jq '.process.args = ["/bin/true"] | .process.terminal = false' "$work/bundle/config.json" >"$work/c.json"
mv "$work/c.json" "$work/bundle/config.json"

now_ns() { date +%s%N; }

bench() { # name command...
    local name=$1; shift
    "$@" >/dev/null 2>&1 || { echo "$name: warm-up run failed: $*" >&2; "$@"; exit 1; }
    local start end
    start=$(now_ns)
    for ((i = 0; i < runs; i++)); do "$@" >/dev/null 2>&1; done
    end=$(now_ns)
    echo $(( (end - start) / runs / 1000 ))   # microseconds per run
}

runc_us=$(bench runc runc --root "$work/runc-state" run --bundle "$work/bundle" "wharf-bench-$$")
wharf_us=$(bench wharf "$registrar" oneshot --image "$rootfs" --state-dir "$work/wharf-state" --name bench -- /bin/true)

printf 'runs per runtime:   %d\n' "$runs"
printf 'runc  (debian %s): %6.2f ms per run\n' "$(runc --version | awk 'NR==1{print $3}')" "$(echo "$runc_us / 1000" | bc -l)"
printf 'wharf oneshot:       %6.2f ms per run\n' "$(echo "$wharf_us / 1000" | bc -l)"
printf 'ratio wharf/runc:    %6.2f (target <= 0.50)\n' "$(echo "$wharf_us / $runc_us" | bc -l)"
