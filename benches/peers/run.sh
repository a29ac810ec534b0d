#!/usr/bin/env bash
# Side-by-side: nginx, HAProxy and clearml-edge in the same role (host routing to the three
# node ports, keep-alive to the upstreams), each with one worker pinned to core 0, the load
# generator and the upstreams on core 1, plus "direct" runs straight to an upstream (the
# ceiling). Prints a Markdown table. Bounded in time; stops only the processes it started.
# The configurations are in benches/peers/configs.sh (benches/instructions.sh uses them too).
#
#   bash benches/peers/run.sh
#
# Environment: DURATION seconds per measurement (10), ROUNDS per target (3; the table shows
# the round with the median proxy CPU per request; the rounds interleave the targets, in an
# order that turns each round, so a slow patch of a shared machine hits them all), SCENARIOS (all of: keepalive newconn 1mib
# https-newconn h2 idle), IDLE_CONNECTIONS (10000), IDLE_SETTLE (seconds from the last idle
# client's answer to the RSS reading: 15), PROXIES (nginx haproxy clearml-edge;
# nginx must stay, the ratios are to it), EDGE_BIN (./target/release/clearml-edge, to
# compare a build of your own).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-keepalive newconn 1mib https-newconn h2 idle}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
# Long enough for what a proxy does with a connection that stays idle to show: clearml-edge
# parks it after 1-2 s, and jemalloc hands the freed pages back within its 10 s decay.
IDLE_SETTLE=${IDLE_SETTLE:-15}
PROXIES=${PROXIES:-nginx haproxy clearml-edge}
EDGE_BIN=${EDGE_BIN:-./target/release/clearml-edge}
PLAIN_PORT=18080
TLS_PORT=18443

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy || ! need h2load || ! need openssl || ! need python3; then
  apt-get update -qq
  apt-get install -y -qq wrk nginx-light haproxy nghttp2-client openssl python3 curl >/dev/null
fi
cargo build --release --quiet
# Room for the idle-connection scenario: the clients' and each proxy's descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
[ "$FD_LIMIT" = unlimited ] && FD_LIMIT=1048576
if [ "$FD_LIMIT" -lt $((IDLE_CONNECTIONS + 1000)) ]; then
  echo "note: open-file limit $FD_LIMIT is too low for $IDLE_CONNECTIONS idle connections; using fewer" >&2
  IDLE_CONNECTIONS=$((FD_LIMIT - 1000))
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# One ECDSA P-256 certificate for *.example.com, shared by the three proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=example.com" -addext "subjectAltName=DNS:*.example.com,DNS:example.com" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"

. benches/peers/configs.sh

# Waits up to 5 s for URL to answer (with Host: $2 when given); fails otherwise.
wait_ready() {
  local host=()
  [ -n "${2:-}" ] && host=(-H "Host: $2")
  for _ in $(seq 50); do
    curl -s -o /dev/null "${host[@]}" "$1" && return
    sleep 0.1
  done
  return 1
}

# Upstreams: one nginx, one worker, on core 1, answering the three node ports (and TLS on
# 30443 for the direct HTTPS runs).
head -c 1048576 /dev/zero > "$work/1m"
upstream_conf > "$work/upstream.conf"
taskset -c 1 nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
wait_ready http://127.0.0.1:30008/ || { echo "the upstream nginx did not start" >&2; exit 1; }

nginx_proxy_conf > "$work/nginx.conf"
# HAProxy reserves two descriptors per connection and refuses a maxconn the open-file
# limit cannot cover: with a limit of 20000 it holds at most 9990 client connections.
haproxy_conf "$(( IDLE_CONNECTIONS + 1000 < (FD_LIMIT - 20) / 2 ? IDLE_CONNECTIONS + 1000 : (FD_LIMIT - 20) / 2 ))" > "$work/haproxy.cfg"
edge_conf "$((IDLE_CONNECTIONS + 1000))" > "$work/edge.toml"

# wrk script: rotate the three hosts.
cat > "$work/mixed.lua" <<'EOF'
local hosts = {"app.example.com", "files.example.com", "api.example.com"}
local i = 0
request = function()
  i = i % 3 + 1
  return wrk.format("GET", "/", {Host = hosts[i]})
end
EOF

# Idle clients: open N connections, make one request on each (so every proxy holds a
# connection that has served a request), report how many were answered within 10 s, then
# hold them until stdin closes.
cat > "$work/idle.py" <<'EOF'
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(held):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:40])
    await r.readexactly(3)
    held.append(w)
async def main():
    held, sem = [], asyncio.Semaphore(200)
    async def limited():
        async with sem:
            try:
                await asyncio.wait_for(one(held), 10)
            except (asyncio.TimeoutError, OSError):
                pass
    await asyncio.gather(*(limited() for _ in range(n)))
    print(len(held), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
EOF

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk -v f="$2" '$1 == f":" {print $2}' "/proc/$1/status"; }
tick_us=$((1000000 / $(getconf CLK_TCK)))

start_proxy() {
  case $1 in
    nginx) taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" & ;;
    haproxy) taskset -c 0 haproxy -f "$work/haproxy.cfg" -db & ;;
    clearml-edge) TOKIO_WORKER_THREADS=1 taskset -c 0 "$EDGE_BIN" run --config "$work/edge.toml" 2>/dev/null & ;;
  esac
  proxy_pid=$!
  pids+=("$proxy_pid")
  wait_ready "http://127.0.0.1:$PLAIN_PORT/" api.example.com || { echo "$1 did not start" >&2; exit 1; }
}

stop_proxy() { kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }

# "requests rps p50 p99" from wrk's output.
parse_wrk() {
  awk '/requests in/ {n = $1} /Requests\/sec/ {r = $2} $1 == "50%" {p50 = $2} $1 == "99%" {p99 = $2}
       END {printf "%d %.0f %s %s\n", n, r, p50, p99}'
}

# "requests rps p50 p99" from h2load's summary and per-request log (durations in µs).
parse_h2load() {
  local summary=$1 log=$2 n rps p50 p99
  n=$(awk '/^requests:/ {print $8}' "$summary")
  rps=$(awk '/^finished in/ {printf "%.0f", $4}' "$summary")
  read -r p50 p99 < <(cut -f3 "$log" | sort -n | awk '{v[NR] = $1}
    END {printf "%.2fms %.2fms\n", v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000}')
  echo "$n $rps $p50 $p99"
}

# measure TARGET SCENARIO [PID] -> "rps p50 p99 rss_kib cpu_us_per_request"
measure() {
  local target=$1 scenario=$2 pid=${3:-} out
  local plain="http://127.0.0.1:$PLAIN_PORT" tls="https://127.0.0.1:$TLS_PORT"
  if [ "$target" = direct ]; then plain="http://127.0.0.1:30008"; tls="https://127.0.0.1:30443"; fi
  if [ "$scenario" = idle ]; then measure_idle "$target" "$pid"; return; fi
  local t0=0; [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
  case $scenario in
    keepalive) out=$(taskset -c 1 wrk -t1 -c32 "-d${DURATION}s" --latency -s "$work/mixed.lua" "$plain/" | parse_wrk) ;;
    newconn) out=$(taskset -c 1 wrk -t1 -c32 "-d${DURATION}s" --latency -H "Host: api.example.com" -H "Connection: close" "$plain/" | parse_wrk) ;;
    1mib)
      [ "$target" = direct ] && plain="http://127.0.0.1:30081"
      out=$(taskset -c 1 wrk -t1 -c8 "-d${DURATION}s" --latency -H "Host: files.example.com" "$plain/1m" | parse_wrk) ;;
    https-newconn) out=$(taskset -c 1 wrk -t1 -c32 "-d${DURATION}s" --latency -H "Host: api.example.com" -H "Connection: close" "$tls/" | parse_wrk) ;;
    h2)
      taskset -c 1 h2load -t1 -c32 -m8 -D "$DURATION" -H ":authority: api.example.com" \
        --log-file="$work/h2.log" "$tls/" > "$work/h2.out"
      out=$(parse_h2load "$work/h2.out" "$work/h2.log") ;;
  esac
  local t1=0; [ -n "$pid" ] && t1=$(cpu_ticks "$pid")
  local reqs rps p50 p99 rss=- cpu=-
  read -r reqs rps p50 p99 <<<"$out"
  if [ -n "$pid" ]; then
    rss=$(rss_kib "$pid" VmHWM)
    cpu=$(awk -v t="$((t1 - t0))" -v r="$reqs" -v us="$tick_us" 'BEGIN { printf "%.1f", t * us / r }')
  fi
  echo "$rps $p50 $p99 $rss $cpu"
}

# RSS with IDLE_CONNECTIONS idle keep-alive clients, each having made one request.
measure_idle() {
  local target=$1 pid=$2
  [ "$target" = direct ] && { echo "- - - - -"; return; }
  local before; before=$(rss_kib "$pid" VmRSS)
  coproc IDLE { taskset -c 1 timeout 120 python3 "$work/idle.py" "$PLAIN_PORT" "$IDLE_CONNECTIONS"; }
  local opened; read -r opened <&"${IDLE[0]}"
  sleep "$IDLE_SETTLE"
  local rss; rss=$(rss_kib "$pid" VmRSS)
  exec {IDLE[1]}>&-
  wait "$IDLE_PID" 2>/dev/null || true
  echo "$opened - - $rss $before"
}

declare -A rounds
read -ra proxy_list <<<"$PROXIES"
for round in $(seq "$ROUNDS"); do
  # The order turns each round (nginx haproxy edge, then haproxy edge nginx, ...): each
  # proxy runs first, second and last once, so neither a slow patch of the machine nor what
  # the run before leaves behind (sockets in TIME_WAIT, caches) falls on one proxy only.
  shift_by=$(( (round - 1) % ${#proxy_list[@]} ))
  order=("${proxy_list[@]:shift_by}" "${proxy_list[@]:0:shift_by}")
  for scenario in $SCENARIOS; do
    [ "$scenario" != idle ] && rounds[direct,$scenario]+="$(measure direct "$scenario")"$'\n'
    for proxy in "${order[@]}"; do
      start_proxy "$proxy"
      rounds[$proxy,$scenario]+="$(measure "$proxy" "$scenario" "$proxy_pid")"$'\n'
      stop_proxy
    done
    echo "round $round/$ROUNDS: $scenario done" >&2
  done
done

# The round with the median proxy CPU per request (for idle: the median RSS; for direct,
# which has no proxy: the median requests/s).
median_row() {
  local column=5
  case "$1,$2" in direct,*) column=1 ;; *,idle) column=4 ;; esac
  printf '%s' "${rounds[$1,$2]}" | grep -v '^$' | sort -g -k"$column" | awk '{row[NR] = $0} END {print row[int((NR + 1) / 2)]}'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print ""; else printf " (%.2f×)", a / b }'; }
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) printf "%.3f", v / 1000; else if (v ~ /ms$/) printf "%.3f", v + 0; else if (v ~ /s$/) printf "%.3f", v * 1000; else print "-" }'; }

echo
echo "Each figure in brackets is the ratio to nginx's in the same run. Proxy CPU is user +"
echo "system time from /proc over the measured interval, divided by the requests served."
echo
echo "| scenario | target | requests/s | p50 ms | p99 ms | peak RSS MiB | proxy CPU µs/request |"
echo "|---|---|---|---|---|---|---|"
for scenario in $SCENARIOS; do
  [ "$scenario" = idle ] && continue
  read -r n_rps n_p50 n_p99 n_rss n_cpu <<<"$(median_row nginx "$scenario")"
  for target in direct $PROXIES; do
    read -r rps p50 p99 rss cpu <<<"$(median_row "$target" "$scenario")"
    p50=$(ms "$p50"); p99=$(ms "$p99")
    mib=-; [ "$rss" != - ] && mib=$(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }')
    echo "| $scenario | $target | $rps$(ratio "$rps" "$n_rps") | $p50$(ratio "$p50" "$(ms "$n_p50")") | $p99$(ratio "$p99" "$(ms "$n_p99")") | $mib$(ratio "$rss" "$n_rss") | $cpu$(ratio "$cpu" "$n_cpu") |"
  done
done
if [[ " $SCENARIOS " == *" idle "* ]]; then
  echo
  echo "| idle keep-alive connections | target | RSS MiB before | RSS MiB with them open | KiB per connection |"
  echo "|---|---|---|---|---|"
  read -r _ _ _ n_rss _ <<<"$(median_row nginx idle)"
  for target in $PROXIES; do
    read -r opened _ _ rss before <<<"$(median_row "$target" idle)"
    echo "| $opened | $target | $(awk -v k="$before" 'BEGIN { printf "%.1f", k / 1024 }') | $(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }')$(ratio "$rss" "$n_rss") | $(awk -v a="$rss" -v b="$before" -v n="$opened" 'BEGIN { printf "%.1f", (a - b) / n }') |"
  done
fi
