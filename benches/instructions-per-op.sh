#!/usr/bin/env bash
# Instructions wsgate's own process executes per operation of a wsgate-bench
# scenario, counted by `valgrind --tool=callgrind` over the whole process and
# divided by the operations the bench counted: per echoed message for `echo64`
# or `echo16k` (and over TLS `wss64`, `wss16k`, `wss16k_tls_backend`), per
# handshake (connect, upgrade, one echo, close) for `handshake` (over TLS
# `tls_handshake`, `tls_resume`). A repeatable figure for A/B comparisons of the tunnel and the
# upgrade path, where rates and CPU seconds on a shared 2-core machine move by
# 10-30 % between runs. Kernel work is not counted (BENCHMARKS.md, "Tunnels
# without shared locks", says how much of a message's CPU that is). Start-up
# and the bench's connections are counted too; over the default 8 seconds they
# are a small part.
#
# usage: benches/instructions-per-op.sh SCENARIO [WSGATE_BINARY [SECONDS]]
#   SCENARIO       a wsgate-bench load scenario, e.g. echo64, echo16k,
#                  handshake, wss64, tls_handshake (one worker)
#   WSGATE_BINARY  default target/release/wsgate (built if absent)
#   SECONDS        default 8
#
# Needs valgrind and python3 (benches/install-peers.sh installs them). Prints
# the instructions per operation and leaves the callgrind profile in the
# temporary directory it names (`callgrind_annotate` reads it).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
scenario=${1:?usage: benches/instructions-per-op.sh SCENARIO [WSGATE_BINARY [SECONDS]]}
bin=${2:-$repo/target/release/wsgate}
seconds=${3:-8}
for tool in valgrind python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "instructions-per-op: $tool is missing (benches/install-peers.sh installs it)" >&2
        exit 1
    fi
done
if [ ! -x "$bin" ]; then
    (cd "$repo" && cargo build --release --bin wsgate)
fi
(cd "$repo" && cargo build --release -p wsgate-bench)
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

dir=$(mktemp -d)
cat >"$dir/wsgate-under-callgrind" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out.%p" "$bin" "\$@"
WRAP
chmod +x "$dir/wsgate-under-callgrind"

"$repo/target/release/wsgate-bench" --targets wsgate --scenario "$scenario" --threads 1 --runs 1 \
    --duration "$seconds" --wsgate "$dir/wsgate-under-callgrind" --no-build --out "$dir/record.jsonl" \
    | grep -v '\.\.\.$' || true
ops=$(python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["ops"])' "$dir/record.jsonl")
# The proxy is the process that ran longest (`wsgate-bench` may run the binary for other things too): the
# largest profile.
profile=$(python3 -c 'import os, sys; print(max(sys.argv[1:], key=os.path.getsize))' "$dir"/callgrind.out.*)
total=$(awk '/^(totals|summary):/ { print $2; exit }' "$profile")
if [ -z "$ops" ] || [ "$ops" -eq 0 ]; then
    echo "instructions-per-op: the bench counted no operation (record: $dir/record.jsonl)" >&2
    exit 1
fi
echo "instructions: $total over $ops operations ($scenario): $((total / ops)) per operation"
echo "profile: $profile"
