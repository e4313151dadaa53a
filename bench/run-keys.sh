#!/usr/bin/env bash
# KEK rotation benchmark (issue "lifecycle": at least 20,000 data keys rewrapped per second with
# the local provider): data keys moved under a new KEK version per second, the way the server's
# background rewrap and `valv keys rotate --wait` do it.
#
#   bench/run-keys.sh [KEYS] [ROUNDS]     (defaults: 100000 3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-keys.sh ${1:-100000} ${2:-3}"
(cd "$root" && cargo build --release --locked -q -p valv-store --example rewrap_bench)
"$root/target/release/examples/rewrap_bench" "${1:-100000}" "${2:-3}"
