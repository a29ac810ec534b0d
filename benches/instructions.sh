#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind (callgrind), for
# clearml-edge and, in the same run and counted the same way, nginx and HAProxy: a figure
# that does not move with the machine's load, so a change of 1-2 % in a proxy's own work
# shows up, where timings on a shared machine spread by 10-20 %. Kernel time (about two
# thirds of the CPU of a small request on loopback) is not in it: use benches/peers/run.sh
# for that.
#
#   bash benches/instructions.sh [BINARY...]
#
# The proxies (PROXIES, default "edge nginx haproxy"; any subset) play the role and use the
# configurations of benches/peers/run.sh (benches/peers/configs.sh, without TLS): host
# routing to the node ports of one upstream nginx answering "ok\n", HTTP/1.1 on both sides
# with keep-alive to the upstream (nginx `keepalive` with `proxy_http_version 1.1` and an
# empty Connection header, HAProxy `http-reuse always`), access logs off, one worker each:
# clearml-edge with TOKIO_WORKER_THREADS=1, nginx with `worker_processes 1; master_process
# off; daemon off;`, HAProxy with `nbthread 1` in the foreground (-db, no master-worker
# mode), so neither forks nor executes a child and callgrind (--trace-children=no) counts
# the process that serves. The script checks that: the process listening on the port must
# be the one valgrind started, and callgrind must have written one count, from that pid.
#
# How it counts, the same for each proxy: the proxy runs under callgrind twice from start to
# exit (SIGTERM): once answering only the readiness request (start-up and shutdown), once
# answering that and REQUESTS (4000) requests more. The difference of the two totals divided
# by REQUESTS is printed, one line per proxy, with the ratio to nginx's when nginx was
# counted. MODE=keepalive (default) sends the requests over 8 keep-alive connections
# (h2load --h1); MODE=newconn sends each on a connection of its own (`Connection: close`,
# one after another), to count what a connection costs. The load generator, request count
# and upstream are the same for all. TOP=25 adds the costliest functions of each proxy.
#
# With no BINARY it builds and measures ./target/release/clearml-edge; give several
# binaries to compare builds (one line each). Installs valgrind, h2load, nginx and HAProxy
# with apt-get when missing. Bounded: about a minute per proxy.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-4000}
TOP=${TOP:-0}
MODE=${MODE:-keepalive}
PROXIES=${PROXIES:-edge nginx haproxy}
PLAIN_PORT=18080
TLS_PORT=
if ! [[ "$REQUESTS" =~ ^[1-9][0-9]*$ && "$TOP" =~ ^[0-9]+$ && "$MODE" =~ ^(keepalive|newconn)$ ]]; then
  echo "REQUESTS must be a positive number, TOP a number, MODE keepalive or newconn" >&2
  exit 1
fi
read -ra proxies <<<"$PROXIES"
[ ${#proxies[@]} -gt 0 ] || { echo "PROXIES is empty: give some of edge, nginx, haproxy" >&2; exit 1; }
for proxy in "${proxies[@]}"; do
  [[ "$proxy" =~ ^(edge|nginx|haproxy)$ ]] || { echo "unknown proxy '$proxy' in PROXIES: use edge, nginx, haproxy" >&2; exit 1; }
done
binaries=("$@")
if [ ${#binaries[@]} -gt 0 ] && [[ " $PROXIES " != *" edge "* ]]; then
  echo "BINARY arguments are clearml-edge builds: add edge to PROXIES" >&2
  exit 1
fi

need() { command -v "$1" >/dev/null 2>&1; }
packages=(valgrind nghttp2-client nginx-light curl python3 iproute2)
[[ " $PROXIES " == *" haproxy "* ]] && packages+=(haproxy)
if ! need valgrind || ! need callgrind_annotate || ! need h2load || ! need nginx || ! need curl ||
  ! need python3 || ! need ss || { [[ " $PROXIES " == *" haproxy "* ]] && ! need haproxy; }; then
  apt-get update -qq
  apt-get install -y -qq "${packages[@]}" >/dev/null
fi
if [[ " $PROXIES " == *" edge "* ]] && [ ${#binaries[@]} -eq 0 ]; then
  cargo build --release --quiet
  binaries=(./target/release/clearml-edge)
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
[ "$FD_LIMIT" = unlimited ] && FD_LIMIT=1048576

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for port in 30080 30081 30008 $PLAIN_PORT; do
  if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
    echo "port $port is taken: stop what listens there first" >&2
    exit 1
  fi
done
# shellcheck source=benches/peers/configs.sh
. benches/peers/configs.sh
upstream_conf > "$work/upstream.conf"
nginx_proxy_conf > "$work/nginx.conf"
haproxy_conf '' > "$work/haproxy.cfg"  # default maxconn
edge_conf '' > "$work/edge.toml"  # default connection limit
nginx -c "$work/upstream.conf" -p "$work" 2>/dev/null & pids+=($!)
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:30008/ && break; sleep 0.1; done
curl -sf -o /dev/null http://127.0.0.1:30008/ || { echo "the upstream nginx did not start" >&2; exit 1; }
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

fail() {
  echo "$1" >&2
  [ -s "$work/valgrind.err" ] && tail -5 "$work/valgrind.err" >&2
  exit 1
}

# count PROXY BINARY REQUESTS: runs PROXY (BINARY for clearml-edge) under callgrind, sends
# REQUESTS requests after the readiness one (none for the start-up baseline) and sets
# `counted` to the user-space instructions of the whole run and `counted_file` to
# callgrind's output. Not run in a subshell, so the cleanup above knows the process.
count() {
  local proxy=$1 binary=$2 requests=$3
  local out="$work/callgrind.$proxy.$requests"
  rm -f "$out".*
  local vg=(valgrind --tool=callgrind --trace-children=no "--callgrind-out-file=$out.%p")
  case $proxy in
    edge) TOKIO_WORKER_THREADS=1 "${vg[@]}" "$binary" run --config "$work/edge.toml" >/dev/null 2>"$work/valgrind.err" & ;;
    nginx) "${vg[@]}" nginx -c "$work/nginx.conf" -p "$work" >/dev/null 2>"$work/valgrind.err" & ;;
    haproxy) "${vg[@]}" haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>"$work/valgrind.err" & ;;
  esac
  local pid=$!
  pids+=("$pid")
  local ready=
  for _ in $(seq 150); do
    curl -sf -o /dev/null -H 'Host: api.example.com' "http://127.0.0.1:$PLAIN_PORT/" && { ready=1; break; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$ready" ] || fail "$proxy did not answer through port $PLAIN_PORT within 30 s:"
  # The process that serves must be the counted one: not a child it forked or executed.
  local listeners
  listeners=$(ss -Hltnp "sport = :$PLAIN_PORT" | grep -o 'pid=[0-9]*' | sort -u | tr '\n' ' ')
  if [ "$listeners" != "pid=$pid " ]; then
    # A child the proxy forked: the cleanup stops it too.
    for listener in $listeners; do pids+=("${listener#pid=}"); done
    fail "$proxy: port $PLAIN_PORT is held by ${listeners:-no process}, not by the counted pid $pid"
  fi
  if [ "$requests" -gt 0 ]; then
    local answered
    if [ "$MODE" = newconn ]; then
      answered=$(python3 "$work/newconn.py" "$PLAIN_PORT" "$requests")
    else
      answered=$(h2load --h1 -n "$requests" -c 8 -H ':authority: api.example.com' "http://127.0.0.1:$PLAIN_PORT/" |
        awk '/^requests:/ {print $8}')
    fi
    [ "$answered" = "$requests" ] || fail "$proxy: only ${answered:-0} of $requests requests succeeded"
  fi
  kill -TERM "$pid"
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; fail "$proxy did not exit within 30 s of SIGTERM"; }
  wait "$pid" || true
  local files
  files=$(find "$work" -maxdepth 1 -name "${out##*/}.*" -printf '%f ')
  [ "$files" = "${out##*/}.$pid " ] ||
    fail "$proxy: expected one callgrind count, from pid $pid; found: ${files:-none}"
  counted_file=$out.$pid
  counted=$(awk '/^(summary|totals):/ {print $2; exit}' "$counted_file" 2>/dev/null || true)
  [ -n "$counted" ] || fail "no callgrind count from $proxy (it may not have exited normally):"
}

case $MODE in
  keepalive) echo "$REQUESTS keep-alive requests over 8 connections (h2load --h1), instructions per request:" ;;
  newconn) echo "$REQUESTS requests, each on a new connection (Connection: close, one after another), instructions per request:" ;;
esac
labels=() figures=()
for proxy in "${proxies[@]}"; do
  runs=(-)
  [ "$proxy" = edge ] && runs=("${binaries[@]}")
  for binary in "${runs[@]}"; do
    case $proxy in
      edge) label=clearml-edge; [ $# -gt 0 ] && label="clearml-edge $binary" ;;
      *) label=$proxy ;;
    esac
    echo "counting $label ..." >&2
    count "$proxy" "$binary" 0
    idle=$counted
    count "$proxy" "$binary" "$REQUESTS"
    labels+=("$label")
    figures+=("$(awk -v i="$idle" -v l="$counted" -v n="$REQUESTS" 'BEGIN { printf "%.0f", (l - i) / n }')")
    [ "$proxy" = nginx ] && nginx_figure=${figures[-1]}
    if [ "$TOP" -gt 0 ]; then
      echo "costliest functions of $label (instructions over the whole loaded run):"
      callgrind_annotate --inclusive=no "$counted_file" 2>/dev/null |
        grep -E '^ *[0-9,]+ \(' | sed -n "2,$((TOP + 1))p"
    fi
  done
done
for i in "${!labels[@]}"; do
  awk -v b="${labels[$i]}" -v f="${figures[$i]}" -v n="${nginx_figure:-}" 'BEGIN {
    r = (n != "" && b != "nginx" && n > 0) ? sprintf(" (%.2fx nginx)", f / n) : ""
    printf "%s: %d instructions per request%s\n", b, f, r }'
done
