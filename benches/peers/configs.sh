# Configurations shared by benches/peers/run.sh and benches/instructions.sh (sourced, not
# run): the upstream nginx, and nginx, HAProxy and clearml-edge in the same role (host
# routing to the three node ports on 127.0.0.1, HTTP/1.1 with keep-alive to the upstreams,
# access logs off, one worker). Each function prints a configuration. They read:
#   work        the directory for pid, log and certificate files
#   FD_LIMIT    the open-file limit the nginx workers raise theirs to
#   PLAIN_PORT  the proxies' cleartext port
#   TLS_PORT    the proxies' TLS port (and TLS on the upstream's 30443); empty for no TLS,
#               and then no certificate is needed
# shellcheck shell=bash disable=SC2154

# The top of an nginx config: one worker, no daemon, files in $work. $1 names the pid and
# log files, $2 is worker_connections.
nginx_globals() {
  echo "daemon off; master_process off; worker_processes 1; pid $work/$1.pid;"
  echo "worker_rlimit_nofile $FD_LIMIT; error_log $work/$1.err;"
  echo "events { worker_connections $2; }"
}

# The upstream: one nginx answering the three node ports with "ok\n" (and $work/1m at /1m).
upstream_conf() {
  local tls=''
  [ -n "$TLS_PORT" ] && tls="
    listen 127.0.0.1:30443 ssl http2; ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;"
  cat <<EOF
$(nginx_globals upstream 16384)
http {
  access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:30080; listen 127.0.0.1:30081; listen 127.0.0.1:30008;$tls
    location = /1m { alias $work/1m; }
    location / { return 200 "ok\n"; } }
}
EOF
}

nginx_proxy_conf() {
  local listen="listen 127.0.0.1:$PLAIN_PORT;" tls=''
  if [ -n "$TLS_PORT" ]; then
    listen+=" listen 127.0.0.1:$TLS_PORT ssl http2;"
    tls="
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;"
  fi
  cat <<EOF
$(nginx_globals nginx 32768)
http {
  access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:30080; keepalive 64; }
  upstream files { server 127.0.0.1:30081; keepalive 64; }
  upstream api { server 127.0.0.1:30008; keepalive 64; }
  proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host;
  # Streaming with 64 KiB buffers (nginx's 4-8 KiB default costs it 3x the CPU on 1 MiB
  # bodies; buffering to disk costs more), and TLS 1.3, nginx's default since 1.23.4
  # (Debian 12's 1.22 would otherwise stop at TLS 1.2).
  proxy_buffering off; proxy_buffer_size 64k; proxy_buffers 4 64k;$tls
  server { $listen
    server_name app.example.com; location / { proxy_pass http://app; } }
  server { $listen
    server_name files.example.com; location / { proxy_pass http://files; } }
  server { $listen
    server_name api.example.com; location / { proxy_pass http://api; } }
}
EOF
}

# $1: maxconn (empty for HAProxy's default, derived from the open-file limit).
haproxy_conf() {
  local maxconn='' tls=''
  [ -n "${1:-}" ] && maxconn="
  maxconn $1"
  [ -n "$TLS_PORT" ] && tls="
  bind 127.0.0.1:$TLS_PORT ssl crt $work/haproxy.pem alpn h2,http/1.1"
  cat <<EOF
global
  nbthread 1
  # 64 KiB buffers, as nginx gets (HAProxy's default is 16 KiB).
  tune.bufsize 65536$maxconn
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  http-reuse always
frontend edge
  bind 127.0.0.1:$PLAIN_PORT$tls
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
}

# $1: max_connections (empty for clearml-edge's default).
edge_conf() {
  echo 'domain = "example.com"'
  echo '[[listeners]]'
  echo "address = \"127.0.0.1:$PLAIN_PORT\""
  if [ -n "$TLS_PORT" ]; then
    echo '[[listeners]]'
    echo "address = \"127.0.0.1:$TLS_PORT\""
    echo 'tls = true'
    echo '[tls]'
    echo "certificates = [{ cert = \"$work/cert.pem\", key = \"$work/key.pem\" }]"
  fi
  echo '[discovery.static]'
  echo 'nodes = ["127.0.0.1"]'
  echo '[health]'
  echo 'interval = "1h"'
  if [ -n "${1:-}" ]; then
    echo '[limits]'
    echo "max_connections = $1"
  fi
}
