#!/usr/bin/env bash
# balancer-discovery.sh - two figures the balancer issue asks for, besides throughput:
#   1. put -> routed latency: time from an etcd put of a new instance (acknowledged) until
#      the balancer's routing table has it (polled on /metrics every ~1 ms), N samples;
#      target p50 <= 10 ms.
#   2. RSS per idle keep-alive client connection: RSS growth after opening CONNS client
#      connections that each made one request and stay open; target <= 8 KiB each.
# Everything on 127.0.0.1; a private etcd on free ports; all processes stopped on exit.
# Usage: SAMPLES=50 CONNS=10000 bench/balancer-discovery.sh        (release build)
#        BALANCER_BIN=/path/to/balancer SAMPLES=5 CONNS=500 bench/balancer-discovery.sh
# Needs: etcd-server curl python3 (Debian packages). Shared helpers: bench/lib.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-balancer}
SAMPLES=${SAMPLES:-50}
CONNS=${CONNS:-10000}
need etcd curl python3
BIN=$(PROFILE=release build_bin BALANCER_BIN wharf-balancer balancer)

bench_init
EC=$(free_port); EP=$(free_port); LBP=$(free_port); ADM=$(free_port); BK=$(free_port)
etcd --name b --data-dir "$WORK/etcd" --listen-client-urls "http://127.0.0.1:$EC" \
    --advertise-client-urls "http://127.0.0.1:$EC" --listen-peer-urls "http://127.0.0.1:$EP" \
    --initial-advertise-peer-urls "http://127.0.0.1:$EP" --initial-cluster "b=http://127.0.0.1:$EP" \
    --log-level error >"$WORK/etcd.log" 2>&1 &
track $!
python3 -m http.server "$BK" --bind 127.0.0.1 --directory "$WORK" >/dev/null 2>&1 &
track $!
wait_http "http://127.0.0.1:$EC/health" 10
wait_port 127.0.0.1 "$BK" 10
cat >"$WORK/lb.toml" <<TOML
[admin]
bind = "127.0.0.1:$ADM"
[discovery.etcd]
endpoints = ["http://127.0.0.1:$EC"]
[[listener]]
name = "web"
bind = "127.0.0.1:$LBP"
  [[listener.route]]
  service = "lat"
TOML
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (( $(ulimit -n) < CONNS + 200 )); then
    CONNS=$(( $(ulimit -n) - 200 ))
    echo "# open-file limit $(ulimit -n): measuring $CONNS connections" >&2
fi
RUST_LOG=warn "$BIN" --config "$WORK/lb.toml" --threads 1 >"$WORK/lb.log" 2>&1 &
LB=$!
track "$LB"
wait_http "http://127.0.0.1:$ADM/healthz" 10

python3 - "$EC" "$ADM" "$LBP" "$BK" "$SAMPLES" "$CONNS" "$LB" <<'PY'
import base64, json, socket, sys, time, urllib.request
ec, adm, lbp, bk, samples, conns, pid = sys.argv[1:]
samples, conns = int(samples), int(conns)
def put(key, value):
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                       "value": base64.b64encode(value.encode()).decode()}).encode()
    urllib.request.urlopen(f"http://127.0.0.1:{ec}/v3/kv/put", body).read()
def metrics():
    return urllib.request.urlopen(f"http://127.0.0.1:{adm}/metrics").read().decode()
lat = []
for i in range(samples):
    iid = f"n1-lat{i}-80"
    inst = {"id": iid, "service": "lat", "version": "v1", "node": "n1",
            "addr": "127.0.0.1", "port": int(bk)}
    needle = f'balancer_backend_up{{instance_id="{iid}",service="lat"}} 1'
    put(f"/wharf/v1/services/lat/instances/{iid}", json.dumps(inst))
    t0 = time.perf_counter()
    while needle not in metrics():
        if time.perf_counter() - t0 > 5: raise SystemExit(f"{iid} not routed in 5 s")
        time.sleep(0.0005)
    lat.append((time.perf_counter() - t0) * 1000)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"put->routed over {samples} puts: p50 {q(0.5):.2f} ms  p90 {q(0.9):.2f} ms  max {lat[-1]:.2f} ms"
      " (includes up to one /metrics scrape)")

def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1])
base = rss_kib()
socks = []
req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
for i in range(conns):  # one request each, sequentially (the backend is a tiny server)
    s = socket.create_connection(("127.0.0.1", int(lbp)))
    s.settimeout(10)
    s.sendall(req)
    data = s.recv(65536)
    if not data.startswith(b"HTTP/1.1 200"): raise SystemExit(f"bad answer {data[:40]!r}")
    socks.append(s)
time.sleep(0.5)
after = rss_kib()
print(f"RSS with {conns} idle keep-alive client connections: {base} KiB -> {after} KiB, "
      f"{(after - base) * 1024 / conns / 1024:.2f} KiB per connection")
for s in socks: s.close()
PY
