#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable whatever
# else the machine is doing (unlike CPU time).
#
#   loadtest/callgrind.sh [space|nginx] [short_seconds] [long_seconds]
#
# Starts a backend nginx (1 KiB body, keep-alive) and the proxy under callgrind, drives it
# with `wrk -t1 -c1` twice (short and long run, default 2 s and 8 s), and prints
# (instructions of the long run - instructions of the short run) / (requests difference):
# start-up and shutdown cancel out. Needs valgrind, wrk, nginx (Debian: valgrind wrk
# nginx-light) and, for space, `cargo build --release -p space-proxy` first.
set -euo pipefail

proxy=${1:-space}
short=${2:-2}
long=${3:-8}
repo=$(cd "$(dirname "$0")/.." && pwd)
space_bin=${SPACE_BIN:-$repo/target/release/space}
for tool in valgrind wrk nginx callgrind_annotate curl; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing (apt-get install valgrind wrk nginx-light curl)" >&2; exit 2; }
done
[ "$proxy" = nginx ] || [ -x "$space_bin" ] || { echo "callgrind.sh: $space_bin missing; run cargo build --release -p space-proxy" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d /tmp/space-callgrind-XXXXXX)
backend_port=$(free_port); proxy_port=$(free_port); admin_port=$(free_port)
mkdir -p "$work/www" "$work/proxy"
head -c 1024 /dev/zero | tr '\0' 'x' > "$work/www/body.txt"

cat > "$work/backend.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/backend.pid;
error_log $work/backend-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$backend_port;
    location / { root $work/www; try_files /body.txt =404; }
  }
}
EOF
cat > "$work/proxy/space.toml" <<EOF
[server]
threads = 1
access_log = false
grace_period = "1s"
[listeners]
http = "127.0.0.1:$proxy_port"
admin = "127.0.0.1:$admin_port"
[[module]]
name = "bench"
prefixes = ["/"]
health_check = { enabled = false }
[[module.instances]]
addr = "127.0.0.1:$backend_port"
EOF
cat > "$work/proxy/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $work/proxy/nginx.pid;
error_log $work/proxy/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$backend_port; keepalive 256; }
  server {
    listen 127.0.0.1:$proxy_port;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
EOF

nginx -c "$work/backend.conf" -p "$work" >/dev/null 2>&1 &
backend=$!
trap 'kill $backend 2>/dev/null || true; rm -rf "$work"' EXIT

run() { # seconds outfile -> prints requests
    if [ "$proxy" = nginx ]; then
        valgrind --tool=callgrind --callgrind-out-file="$2" nginx -c "$work/proxy/nginx.conf" -p "$work/proxy" >/dev/null 2>&1 &
    else
        valgrind --tool=callgrind --callgrind-out-file="$2" "$space_bin" run --config "$work/proxy/space.toml" >"$work/proxy/space.log" 2>&1 &
    fi
    local vg=$!
    for _ in $(seq 1 120); do
        curl -s -o /dev/null "http://127.0.0.1:$proxy_port/" && break
        sleep 0.5
    done
    wrk -t1 -c1 -d"${1}s" "http://127.0.0.1:$proxy_port/" | awk '/requests in/ {print $1}'
    kill -TERM $vg
    wait $vg || true
}
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }

req_a=$(run "$short" "$work/a.out"); ir_a=$(total "$work/a.out")
req_b=$(run "$long" "$work/b.out"); ir_b=$(total "$work/b.out")
echo "$proxy: $req_a requests -> $ir_a instructions; $req_b requests -> $ir_b instructions"
echo "$proxy: $(( (ir_b - ir_a) / (req_b - req_a) )) instructions per request"
