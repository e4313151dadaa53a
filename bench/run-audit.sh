#!/usr/bin/env bash
# Audit log benchmark: durable appends/s through the group-commit writer under concurrency, and
# full-log verification rate (decrypt every entry, check its leaf hash, rebuild the tree).
#
#   bench/run-audit.sh [SECONDS] [CONCURRENCY] [VERIFY_ENTRIES]     (defaults: 10 256 200000)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
(cd "$root" && cargo build --release --locked -q -p valv-server --example audit_bench)
"$root/target/release/examples/audit_bench" "${1:-10}" "${2:-256}" "${3:-200000}"
