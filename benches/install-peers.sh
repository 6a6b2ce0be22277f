#!/usr/bin/env bash
# Installs the peer proxies and load tools the benchmark compares against:
# nginx, HAProxy, wrk, h2load (Debian package nghttp2-client, for the `h2`
# scenario), the openssl command line (RSA certificates, `--tls-key
# rsa2048`), and valgrind and python3 for instructions-per-request.sh.
# Idempotent: does nothing when all are present.
# Needs root (or sudo) and Debian/Ubuntu apt.
set -euo pipefail

want=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || want+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || want+=(haproxy)
command -v wrk >/dev/null 2>&1 || want+=(wrk)
command -v h2load >/dev/null 2>&1 || want+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || want+=(openssl)
command -v valgrind >/dev/null 2>&1 || want+=(valgrind)
command -v python3 >/dev/null 2>&1 || want+=(python3)

if [ ${#want[@]} -eq 0 ]; then
    echo "install-peers: nginx, haproxy, wrk, h2load, openssl, valgrind and python3 already present"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

echo "install-peers: installing ${want[*]}"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${want[@]}"

# The packages may start system services; the benchmark starts its own
# instances with generated configs, so stop the system ones if they run.
for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        $SUDO systemctl stop "$svc" || true
    fi
done
echo "install-peers: done"
