#!/usr/bin/env bash
# balancer-idle-rss.sh - RSS per idle keep-alive client connection (issue target: <= 8 KiB).
# Starts the balancer (static service, no etcd) in front of a tiny keep-alive backend,
# opens CONNS client connections that each make one request and then stay open, and
# reports the balancer's VmRSS growth divided by CONNS. Everything on 127.0.0.1; all
# processes stopped on exit.
# Usage: CONNS=10000 bench/balancer-idle-rss.sh
#        BALANCER_BIN=/path/to/balancer CONNS=2000 bench/balancer-idle-rss.sh
# Needs: curl python3 (Debian packages). Shared helpers: bench/lib.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-balancer}
PROFILE=${PROFILE:-release}
CONNS=${CONNS:-10000}
need curl python3
BIN=$(build_bin BALANCER_BIN wharf-balancer balancer)

bench_init
LBP=$(free_port); ADM=$(free_port); BK=$(free_port)

# Backend: HTTP/1.1 keep-alive, fixed 2-byte answer.
python3 - "$BK" >/dev/null 2>&1 <<'PY' &
import asyncio, sys
async def conn(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()
    except Exception:
        w.close()
async def main():
    s = await asyncio.start_server(conn, "127.0.0.1", int(sys.argv[1]))
    await s.serve_forever()
asyncio.run(main())
PY
track $!
wait_port 127.0.0.1 "$BK" 10
cat >"$WORK/lb.toml" <<TOML
[admin]
bind = "127.0.0.1:$ADM"
[[listener]]
name = "web"
bind = "127.0.0.1:$LBP"
  [[listener.route]]
  service = "rss"
[[service]]
name = "rss"
  [[service.endpoint]]
  addr = "127.0.0.1:$BK"
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

python3 - "$LBP" "$CONNS" "$LB" <<'PY'
import socket, sys, time
lbp, conns, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1])
req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
def one_request():
    s = socket.create_connection(("127.0.0.1", lbp))
    s.settimeout(10)
    s.sendall(req)
    data = b""
    while not data.endswith(b"ok"):
        more = s.recv(65536)
        if not more: raise SystemExit(f"closed early: {data[:60]!r}")
        data += more
    if not data.startswith(b"HTTP/1.1 200"): raise SystemExit(f"bad answer {data[:60]!r}")
    return s
# Warm up (upstream pool, allocator), then the baseline.
for s in [one_request() for _ in range(200)]: s.close()
time.sleep(0.5)
base = rss_kib()
socks = [one_request() for _ in range(conns)]
time.sleep(0.5)
after = rss_kib()
print(f"RSS with {conns} idle keep-alive client connections: {base} KiB -> {after} KiB, "
      f"{(after - base) / conns:.2f} KiB per connection")
for s in socks: s.close()
PY
