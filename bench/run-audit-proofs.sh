#!/usr/bin/env bash
# Audit proofs and start time on a large log: ENTRIES entries (random leaf hashes, 400-byte bodies)
# are planted in a fresh data directory, `valv serve` integrates them once, then
#   - consistency proofs (from a random size to the checkpoint's) and inclusion proofs (a random
#     leaf in the checkpoint's tree), 41 of each over one kept-alive connection: median latency;
#   - `valv serve` start time, from exec until /healthz answers: median of 3 restarts.
#
#   bench/run-audit-proofs.sh [ENTRIES] [VALV_BINARY] [FIRST_BINARY]
#       (defaults: 1000000, target/release/valv, the same). With FIRST_BINARY (e.g. a build from
#       before tiles) the first start and the proofs are that binary's, and the first restart is
#       VALV_BINARY's upgrade of that log.
#
# The planted bodies do not open, so `valv audit verify` would report them; neither start nor
# proofs open bodies. Needs sqlite3 and curl.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-1000000}
bin=${2:-}
if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --locked -q -p valv)
  bin=$root/target/release/valv
fi
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown); binary: $bin"
work=$(mktemp -d)
data=$work/data
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
url=https://127.0.0.1:$port

"${3:-$bin}" --data-dir "$data" init >/dev/null 2>&1
base=$(sqlite3 "$data/valv-audit.db" "SELECT coalesce(max(idx) + 1, 0) FROM audit_entries")
sqlite3 "$data/valv-audit.db" "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < $n - 1)
  INSERT INTO audit_entries (idx, leaf_hash, sealed) SELECT $base + i, randomblob(32), randomblob(400) FROM c;"
size=$((base + n))
echo "log: $size entries; audit log file $(du -m "$data/valv-audit.db" | cut -f1) MiB"

first=${3:-$bin}
serve() {
  "${1:-$bin}" --data-dir "$data" serve --listen "127.0.0.1:$port" >>"$work/serve.log" 2>&1 &
  pid=$!
}
healthy() {
  curl -sk --max-time 2 -o /dev/null -w '%{http_code}' "$url/healthz" 2>/dev/null | grep -q 200
}
stop() {
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
}

# First start: integrates the planted entries (and, with tiles, writes them).
started=$(date +%s.%N)
serve "$first"
until [ "$(curl -sk --max-time 5 "$url/audit/checkpoint" 2>/dev/null | sed -n 2p)" = "$size" ]; do sleep 0.2; done
echo "first start and integration of $n entries: $(echo "$(date +%s.%N) - $started" | bc) s"

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
args=()
for _ in $(seq 41); do args+=(-o /dev/null "$url/audit/proof/consistency?from=$((1 + RANDOM * 32768 % (size - 1) + RANDOM % 2))&to=$size"); done
echo "consistency proof, median of 41: $(curl -sk -w '%{time_total}\n' "${args[@]}" | median) s"
args=()
for _ in $(seq 41); do args+=(-o /dev/null "$url/audit/proof/inclusion?index=$(((RANDOM * 32768 + RANDOM) % size))&size=$size"); done
echo "inclusion proof, median of 41: $(curl -sk -w '%{time_total}\n' "${args[@]}" | median) s"
stop

times=()
for _ in 1 2 3; do
  started=$(date +%s.%N)
  serve
  until healthy; do sleep 0.02; done
  times+=("$(echo "$(date +%s.%N) - $started" | bc)")
  stop
done
echo "valv serve start (exec to /healthz 200) at $size entries: median $(printf '%s\n' "${times[@]}" | median) s (runs: ${times[*]})"
