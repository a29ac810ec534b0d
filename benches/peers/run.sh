#!/usr/bin/env bash
# Side-by-side: nginx, HAProxy and clearml-edge in the same role (host routing to three
# upstream ports, keep-alive to the upstreams), each with one worker pinned to core 0, the
# load generator and the upstreams on core 1, plus a "direct" run straight to an upstream.
# Prints a Markdown table. Bounded in time; stops only the processes it started.
#
#   bash benches/peers/run.sh            # DURATION=10 seconds per run by default
#
# Scenarios so far: HTTP/1.1 keep-alive with small responses (hosts mixed), a new connection
# per request, and 1 MiB responses. Still to come (issue 7): HTTPS/HTTP/2 with h2load and
# 10 000 idle connections.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
PROXY_PORT=18080

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy; then
  apt-get update -qq && apt-get install -y -qq wrk nginx-light haproxy >/dev/null
fi
cargo build --release --quiet

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Upstreams: one nginx, one worker, on core 1, answering the three node ports.
head -c 1048576 /dev/zero > "$work/1m"
cat > "$work/upstream.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $work/upstream.pid;
error_log $work/upstream.err;
events { worker_connections 16384; }
http {
  access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:30080; listen 127.0.0.1:30081; listen 127.0.0.1:30008;
    location = /1m { alias $work/1m; }
    location / { return 200 "ok\n"; } }
}
EOF
taskset -c 1 nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
for _ in $(seq 50); do
  curl -s -o /dev/null http://127.0.0.1:30008/ && break
  sleep 0.1
done

cat > "$work/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 16384; }
http {
  access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:30080; keepalive 64; }
  upstream files { server 127.0.0.1:30081; keepalive 64; }
  upstream api { server 127.0.0.1:30008; keepalive 64; }
  proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host;
  proxy_buffering off;
  server { listen 127.0.0.1:$PROXY_PORT; server_name app.example.com; location / { proxy_pass http://app; } }
  server { listen 127.0.0.1:$PROXY_PORT; server_name files.example.com; location / { proxy_pass http://files; } }
  server { listen 127.0.0.1:$PROXY_PORT; server_name api.example.com; location / { proxy_pass http://api; } }
}
EOF

cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  http-reuse always
frontend edge
  bind 127.0.0.1:$PROXY_PORT
  use_backend app if { hdr(host) -i app.example.com }
  use_backend files if { hdr(host) -i files.example.com }
  default_backend api
backend app
  server n1 127.0.0.1:30080
backend files
  server n1 127.0.0.1:30081
backend api
  server n1 127.0.0.1:30008
EOF

cat > "$work/edge.toml" <<EOF
domain = "example.com"
[[listeners]]
address = "127.0.0.1:$PROXY_PORT"
[discovery.static]
nodes = ["127.0.0.1"]
[health]
interval = "1h"
EOF

# wrk script: rotate the three hosts.
cat > "$work/mixed.lua" <<'EOF'
local hosts = {"app.example.com", "files.example.com", "api.example.com"}
local i = 0
request = function()
  i = i % 3 + 1
  return wrk.format("GET", "/", {Host = hosts[i]})
end
EOF

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

start_proxy() {
  case $1 in
    nginx) taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" & ;;
    haproxy) taskset -c 0 haproxy -f "$work/haproxy.cfg" -db & ;;
    clearml-edge) TOKIO_WORKER_THREADS=1 taskset -c 0 ./target/release/clearml-edge run --config "$work/edge.toml" 2>/dev/null & ;;
  esac
  proxy_pid=$!
  pids+=("$proxy_pid")
  for _ in $(seq 50); do
    curl -s -o /dev/null -H 'Host: api.example.com' "http://127.0.0.1:$PROXY_PORT/" && return
    sleep 0.1
  done
  echo "$1 did not start" >&2; exit 1
}

stop_proxy() { kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }

# run NAME SCENARIO -> "rps p50 p99 rss_kib cpu_us_per_req"
measure() {
  local target=$1 scenario=$2 pid=${3:-} url="http://127.0.0.1:$PROXY_PORT"
  [ "$target" = direct ] && url="http://127.0.0.1:30008"
  local args=(-t1 -c32 "-d${DURATION}s" --latency)
  case $scenario in
    keepalive) args+=(-s "$work/mixed.lua") ;;
    newconn) args+=(-H "Host: api.example.com" -H "Connection: close") ;;
    1mib) args=(-t1 -c8 "-d${DURATION}s" --latency -H "Host: files.example.com"); url="$url/1m" ;;
  esac
  [ "$target" = direct ] && [ "$scenario" = 1mib ] && url="http://127.0.0.1:30081/1m"
  local t0=0; [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
  local out; out=$(taskset -c 1 wrk "${args[@]}" "$url")
  local t1=0; [ -n "$pid" ] && t1=$(cpu_ticks "$pid")
  local reqs rps p50 p99 rss cpu
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  rss=-; cpu=-
  if [ -n "$pid" ]; then
    rss=$(hwm_kib "$pid")
    cpu=$(awk -v t="$((t1 - t0))" -v r="$reqs" 'BEGIN { printf "%.1f", t * 10000 / r }')
  fi
  echo "$rps $p50 $p99 $rss $cpu"
}

declare -A results
for scenario in keepalive newconn 1mib; do
  results[direct,$scenario]=$(measure direct "$scenario")
  for proxy in nginx haproxy clearml-edge; do
    start_proxy "$proxy"
    results[$proxy,$scenario]=$(measure "$proxy" "$scenario" "$proxy_pid")
    stop_proxy
  done
done

echo
echo "| scenario | target | requests/s | p50 | p99 | peak RSS KiB | proxy CPU µs/request | CPU/request vs nginx |"
echo "|---|---|---|---|---|---|---|---|"
for scenario in keepalive newconn 1mib; do
  read -r _ _ _ _ nginx_cpu <<<"${results[nginx,$scenario]}"
  for target in direct nginx haproxy clearml-edge; do
    read -r rps p50 p99 rss cpu <<<"${results[$target,$scenario]}"
    ratio=-
    [ "$cpu" != - ] && ratio=$(awk -v a="$cpu" -v b="$nginx_cpu" 'BEGIN { printf "%.2f", a / b }')
    echo "| $scenario | $target | $rps | $p50 | $p99 | $rss | $cpu | $ratio |"
  done
done
