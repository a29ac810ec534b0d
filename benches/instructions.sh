#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind (callgrind): a figure that
# does not move with the machine's load, so a change of 1-2 % in the proxy's own work shows
# up, where timings on a shared machine spread by 10-20 %. Kernel time (about two thirds of
# the CPU of a small request on loopback) is not in it: use benches/peers/run.sh for that.
#
#   bash benches/instructions.sh [BINARY...]
#
# With no argument it builds and measures ./target/release/clearml-edge; give several
# binaries to compare builds. Each is run under callgrind twice, idle and with REQUESTS
# (4000) keep-alive HTTP/1.1 requests over 8 connections (h2load) to one nginx upstream;
# the difference divided by REQUESTS is printed, with the functions that cost the most when
# TOP is set (e.g. TOP=25). MODE=newconn sends each request on a connection of its own
# (`Connection: close`, one after another) instead, to count what a connection costs.
# Bounded: about a minute per binary.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-4000}
TOP=${TOP:-0}
MODE=${MODE:-keepalive}
PORT=18080
if ! [[ "$REQUESTS" =~ ^[1-9][0-9]*$ && "$TOP" =~ ^[0-9]+$ && "$MODE" =~ ^(keepalive|newconn)$ ]]; then
  echo "REQUESTS must be a positive number, TOP a number, MODE keepalive or newconn" >&2
  exit 1
fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need valgrind || ! need h2load || ! need nginx || ! need curl; then
  apt-get update -qq
  apt-get install -y -qq valgrind nghttp2-client nginx-light curl >/dev/null
fi
binaries=("$@")
if [ ${#binaries[@]} -eq 0 ]; then
  cargo build --release --quiet
  binaries=(./target/release/clearml-edge)
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for port in 30008 $PORT; do
  if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
    echo "port $port is taken: stop what listens there first" >&2
    exit 1
  fi
done
cat > "$work/upstream.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $work/upstream.pid;
error_log $work/upstream.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:30008; location / { return 200 "ok\n"; } } }
EOF
nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:30008/ && break; sleep 0.1; done
curl -sf -o /dev/null http://127.0.0.1:30008/ || { echo "the upstream nginx did not start" >&2; exit 1; }
cat > "$work/edge.toml" <<EOF
domain = "example.com"
[[listeners]]
address = "127.0.0.1:$PORT"
[discovery.static]
nodes = ["127.0.0.1"]
[health]
interval = "1h"
EOF
# The new-connection client: one connection per request, each read to the proxy's close.
cat > "$work/newconn.py" <<'EOF'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
ok = 0
for _ in range(n):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    ok += answer.startswith(b"HTTP/1.1 200")
print(ok)
EOF

# count BINARY REQUESTS: runs BINARY under callgrind, sends REQUESTS requests (none for the
# start-up baseline) and sets `counted` to the user-space instructions of the whole run. Not
# run in a subshell, so the cleanup above knows the process.
count() {
  local out="$work/callgrind.$2"
  TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$1" run --config "$work/edge.toml" >/dev/null 2>"$work/valgrind.err" &
  local pid=$!
  pids+=("$pid")
  local ready=
  for _ in $(seq 150); do
    curl -sf -o /dev/null -H 'Host: api.example.com' "http://127.0.0.1:$PORT/" && { ready=1; break; }
    sleep 0.2
  done
  if [ -z "$ready" ]; then
    echo "$1 did not answer through the proxy within 30 s:" >&2
    tail -5 "$work/valgrind.err" >&2
    exit 1
  fi
  if [ "$2" -gt 0 ]; then
    local done
    if [ "$MODE" = newconn ]; then
      done=$(python3 "$work/newconn.py" "$PORT" "$2")
    else
      done=$(h2load --h1 -n "$2" -c 8 -H ':authority: api.example.com' "http://127.0.0.1:$PORT/" |
        awk '/^requests:/ {print $8}')
    fi
    [ "$done" = "$2" ] || { echo "only ${done:-0} of $2 requests succeeded" >&2; exit 1; }
  fi
  kill -TERM "$pid"
  wait "$pid" || true
  counted=$(awk '/^(summary|totals):/ {print $2; exit}' "$out" 2>/dev/null || true)
  if [ -z "$counted" ]; then
    echo "no callgrind count from $1:" >&2
    tail -5 "$work/valgrind.err" >&2
    exit 1
  fi
}

for binary in "${binaries[@]}"; do
  count "$binary" 0
  idle=$counted
  count "$binary" "$REQUESTS"
  awk -v b="$binary" -v i="$idle" -v l="$counted" -v n="$REQUESTS" \
    'BEGIN { printf "%s: %.0f instructions per request\n", b, (l - i) / n }'
  if [ "${TOP:-0}" -gt 0 ]; then
    callgrind_annotate --inclusive=no "$work/callgrind.$REQUESTS" 2>/dev/null |
      grep -E '^ *[0-9,]+ \(' | sed -n "2,$((TOP + 1))p"
  fi
done
