#!/usr/bin/env bash
# Instructions wsgate's own process executes per proxied GET, counted by
# `valgrind --tool=callgrind`: a repeatable figure for A/B comparisons of the
# request path, where rates and CPU seconds on a shared 2-core machine move by
# ±10 % between runs. Kernel work (system calls, TCP) is not counted: it is the
# same for every proxy here (see BENCHMARKS.md, "Plain HTTP: where a request's
# CPU goes").
#
# usage: benches/instructions-per-request.sh [WSGATE_BINARY [REQUESTS [PROTOCOL]]]
#   WSGATE_BINARY  default target/release/wsgate (built if absent)
#   REQUESTS       default 20000, over 10 keep-alive connections
#   PROTOCOL       http (default: plain HTTP/1.1, h2load --h1), https (HTTP/1.1
#                  over TLS 1.3) or h2 (HTTP/2 over TLS 1.3, one stream at a
#                  time per connection); the backend is plain HTTP/1.1 always
#
# Needs nginx (the backend: a fixed 23-byte answer), h2load (nghttp2-client),
# valgrind, python3 and, for TLS, openssl (a self-signed ECDSA P-256
# certificate): benches/install-peers.sh installs them. Prints the
# instructions per request, and leaves the callgrind profile in the temporary
# directory it names (`callgrind_annotate` reads it).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$repo/target/release/wsgate}
requests=${2:-20000}
protocol=${3:-http}
case "$protocol" in
    http | https | h2) ;;
    *)
        echo "instructions-per-request: PROTOCOL is http, https or h2, not $protocol" >&2
        exit 1
        ;;
esac
if [ ! -x "$bin" ]; then
    (cd "$repo" && cargo build --release --bin wsgate)
fi
for tool in nginx h2load valgrind callgrind_control callgrind_annotate python3; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "instructions-per-request: $tool is missing (benches/install-peers.sh installs it)" >&2
        exit 1
    fi
done
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

dir=$(mktemp -d)
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
backend_port=$(free_port)
proxy_port=$(free_port)
user_line=""
if [ "$(id -u)" -eq 0 ]; then
    user_line="user root;"
fi
mkdir -p "$dir/nginx"
cat >"$dir/nginx.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
error_log $dir/nginx/error.log warn;
pid $dir/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/nginx/body;
    proxy_temp_path $dir/nginx/proxy;
    fastcgi_temp_path $dir/nginx/fastcgi;
    uwsgi_temp_path $dir/nginx/uwsgi;
    scgi_temp_path $dir/nginx/scgi;
    server {
        listen 127.0.0.1:$backend_port;
        keepalive_requests 1000000;
        location / { return 200 "hello from the backend\n"; }
    }
}
EOF
scheme=http
h1=--h1
tls_line=""
if [ "$protocol" != http ]; then
    if ! command -v openssl >/dev/null 2>&1; then
        echo "instructions-per-request: openssl is missing (benches/install-peers.sh installs it)" >&2
        exit 1
    fi
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
    scheme=https
    tls_line="tls = { certs = [ { cert = \"$dir/cert.pem\", key = \"$dir/key.pem\" } ] }"
    if [ "$protocol" = h2 ]; then
        h1=""
    fi
fi
cat >"$dir/wsgate.toml" <<EOF
workers = 1

[[listener]]
name = "bench"
listen = "127.0.0.1:$proxy_port"
$tls_line

[[route]]
name = "all"
path_prefix = "/"
pool = "backend"

[pool.backend]
backends = [ { addr = "127.0.0.1:$backend_port" } ]
EOF

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

"$nginx_bin" -c "$dir/nginx.conf" &
pids+=($!)
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    "$bin" run --config "$dir/wsgate.toml" >"$dir/wsgate.log" 2>&1 &
wsgate_pid=$!
pids+=("$wsgate_pid")

url="$scheme://127.0.0.1:$proxy_port/"
ready=""
for _ in $(seq 1 120); do
    if h2load $h1 -n 1 -c 1 "$url" 2>/dev/null | grep -q "1 succeeded"; then
        ready=yes
        break
    fi
    sleep 0.5
done
if [ -z "$ready" ]; then
    echo "instructions-per-request: wsgate did not answer on $url (log: $dir/wsgate.log)" >&2
    exit 1
fi

# A warm-up (connections, pools, caches), then the counters are zeroed and the
# measured requests run; the dump taken after them holds only those.
h2load $h1 -n 2000 -c 10 "$url" >/dev/null
callgrind_control -z "$wsgate_pid" >/dev/null 2>&1
h2load $h1 -n "$requests" -c 10 "$url" | grep -E "^requests:"
callgrind_control -d "$wsgate_pid" >/dev/null 2>&1
profile="$dir/callgrind.out.1"
for _ in $(seq 1 20); do
    [ -s "$profile" ] && break
    sleep 0.5
done
# Read from the profile itself: a pipe that stops at the first match would end `callgrind_annotate` with
# SIGPIPE, which `pipefail` makes this script's failure.
total=$(awk '/^(totals|summary):/ { print $2; exit }' "$profile")
echo "instructions: $total over $requests requests ($protocol): $((total / requests)) per request"
echo "profile: $profile"
