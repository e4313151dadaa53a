#!/usr/bin/env bash
# How fast an unauthenticated flood grows the audit log (issue 10: at most 10 MB per hour).
# One address (127.0.0.1) sends GET /fhir/Patient without a credential at full speed
# (wrk -t2 -c32) for SECONDS; the script prints the requests answered, the audit entries and
# bytes stored (sealed entry, leaf hash, index columns) and their rate per hour.
#
#   bench/run-flood-log.sh [SECONDS]   (default 60)
#
# Needs wrk, python3. Loopback only; stops by itself.
set -euo pipefail
SECS=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-flood.XXXXXX)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$out"' EXIT
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-flood-log.sh $SECS (wrk -t2 -c32 -d${SECS}s, no credential, default limits)"
(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
"$valv" --data-dir "$out/d" init >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
VALV_LOG=warn "$valv" --data-dir "$out/d" serve --listen "127.0.0.1:$port" >/dev/null 2>&1 &
server_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
size() {
  python3 -c "import sqlite3; print(*sqlite3.connect('$out/d/valv-audit.db').execute('select count(*), coalesce(sum(length(sealed)+length(leaf_hash)+coalesce(length(patient_token),0)+coalesce(length(query_sealed),0)),0) from audit_entries').fetchone())"
}
read -r n0 b0 < <(size)
wrk -t2 -c32 -d"${SECS}s" "https://127.0.0.1:$port/fhir/Patient" > "$out/wrk.txt" 2>&1
sleep 12   # the last windows close (10 s for rate-limit refusals) and their summaries are written
read -r n1 b1 < <(size)
requests=$(awk '/requests in/{print $1}' "$out/wrk.txt")
python3 - "$requests" "$((n1 - n0))" "$((b1 - b0))" "$SECS" <<'PY'
import sys
req, n, b, s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"requests answered: {req:,} in {s} s ({req / s:,.0f}/s), all refused (401 or 429)")
print(f"audit entries added: {n:,} ({b:,} bytes) -> {n * 3600 / s:,.0f} entries and {b * 3600 / s / 1e6:.1f} MB per hour of flood")
PY
