#!/usr/bin/env bash
# Backup and restore (issue "lifecycle": >= 50,000 resources/s each way with a 100k-resource,
# 1M-audit-entry data directory, RSS flat, reads losing <= 20% while a backup runs).
#
#   bench/run-backup.sh [PATIENTS] [AUDIT_ENTRIES] [ROUNDS] [SECONDS]   (defaults: 3600 1000000 3 10)
#
# Builds the data directory (synthetic patients, ~28 resources each; audited reads by id until
# the log holds AUDIT_ENTRIES entries), then ROUNDS times `valv backup` and `valv restore` into a
# new directory (decrypt, load, manifest, audit log recomputed and checked, sample decryptions),
# all on the data as built; then ROUNDS times reads by id (wrk -t2 -c32) for SECONDS with no
# backup, with backups back to back, and with none again (the ratio is against the mean of the
# two unloaded runs; these reads add audit entries, hence they come last). Prints medians, and
# each command's peak RSS (/usr/bin/time). Needs wrk and /usr/bin/time.
# BACKUP_BENCH_DIR=DIR builds the data directory there once and reuses it on later runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
patients=${1:-3600}; entries=${2:-1000000}; rounds=${3:-3}; secs=${4:-10}
out=$(mktemp -d /tmp/valv-bench-backup.XXXXXX)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$out"' EXIT
for t in wrk /usr/bin/time age-keygen; do command -v "$t" >/dev/null || { echo "bench: $t is not installed" >&2; exit 1; }; done
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-backup.sh $patients $entries $rounds $secs"
(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data=${BACKUP_BENCH_DIR:-$out/d}
if [ ! -f "$data/bench-key" ]; then
  "$valv" --data-dir "$data" init >/dev/null
  "$valv" --data-dir "$data" apikey create --name bench --role service --scope 'system/*.cruds system/Patient.cud' | tail -1 > "$data/bench-key"
  "$valv" synth --patients "$patients" --out "$out/synth" --seed 1 >/dev/null
  "$valv" --data-dir "$data" import "$out"/synth/*.json 2>/dev/null | head -1
  rm -rf "$out/synth"
fi
key=$(cat "$data/bench-key")
age-keygen -o "$out/id.txt" 2>/dev/null
recipient=$(grep -o 'age1[a-z0-9]*' "$out/id.txt" | head -1)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
VALV_LOG=warn VALV_LIMITS_NEW_CONNECTIONS_PER_MINUTE=6000000 VALV_LIMITS_NEW_CONNECTIONS_BURST=100000 \
  "$valv" --data-dir "$data" serve --listen "127.0.0.1:$port" >/dev/null 2>"$out/server.log" &
server_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
base="https://127.0.0.1:$port"
curl -sk -H "Authorization: Bearer $key" "$base/fhir/Observation?_count=1000" | python3 -c 'import json,sys; [print(e["resource"]["id"]) for e in json.load(sys.stdin).get("entry",[])]' > "$out/ids"
cat > "$out/read.lua" <<LUA
local ids = {}
function init(args) for l in io.lines(args[1]) do ids[#ids + 1] = l end end
request = function() return wrk.format("GET", "/fhir/Observation/" .. ids[math.random(#ids)], {["Authorization"] = "Bearer $key"}) end
done = function(s) io.write(string.format("RPS %.0f\n", s.requests / (s.duration / 1e6))) end
LUA
reads() { wrk -t2 -c32 -d"$1s" -s "$out/read.lua" "$base" -- "$out/ids" | awk '/^RPS/{print $2}'; }
count() { python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('attach database ? as audit', (sys.argv[2],)); print(c.execute(sys.argv[3]).fetchone()[0])" "$data/valv.db" "$data/valv-audit.db" "$1"; }
while [ "$(count 'select count(*) from audit_entries')" -lt "$entries" ]; do reads 20 >/dev/null; done
resources=$(count 'select count(*) from resources')
echo "data: $resources resources, $(count 'select count(*) from versions') versions, $(count 'select count(*) from audit_entries') audit entries, $(du -sh "$data/valv.db" | cut -f1) database, $(du -sh "$data/valv-audit.db" | cut -f1) audit log file"

peak() { awk '/Maximum resident/{printf "%.0f MiB", $6/1024}' "$1"; }
# Backups and restores first, all on the data as built (the read rounds below add entries).
for r in $(seq 1 "$rounds"); do
  b="$out/b$r"; mkdir -p "$b"
  start=$(date +%s.%N)
  /usr/bin/time -v "$valv" --data-dir "$data" backup --out "$b/one.age" --recipient "$recipient" >/dev/null 2>"$out/time-backup"
  end=$(date +%s.%N)
  size=$(du -m "$b/one.age" | cut -f1)
  rm -rf "$out/r"
  rstart=$(date +%s.%N)
  /usr/bin/time -v "$valv" --data-dir "$out/r" restore "$b/one.age" --identity "$out/id.txt" >/dev/null 2>"$out/time-restore"
  rend=$(date +%s.%N)
  python3 - "$r" "$resources" "$start" "$end" "$rstart" "$rend" "$size" "$(peak "$out/time-backup")" "$(peak "$out/time-restore")" <<'PY' | tee -a "$out/rounds"
import sys
r, n, s, e, rs, re, size, pb, pr = sys.argv[1:]
n = int(n); bt = float(e) - float(s); rt = float(re) - float(rs)
print(f"round {r}: backup {bt:.2f} s ({n/bt:,.0f} resources/s, {size} MiB, peak RSS {pb}); restore {rt:.2f} s ({n/rt:,.0f} resources/s, peak RSS {pr})")
PY
  rm -rf "$b" "$out/r"
done
# Reads by id with no backup, with backups back to back, and with none again.
for r in $(seq 1 "$rounds"); do
  b="$out/b$r"; mkdir -p "$b"
  before=$(reads "$secs")
  ( i=0; while :; do i=$((i+1)); "$valv" --data-dir "$data" backup --out "$b/loop-$i.age" --recipient "$recipient" >/dev/null 2>&1; rm -f "$b/loop-$i.age"; done ) &
  loop=$!
  during=$(reads "$secs")
  kill "$loop"; wait "$loop" 2>/dev/null || true
  after=$(reads "$secs")
  python3 -c "import sys; b, d, a = map(float, sys.argv[2:]); print(f'round {sys.argv[1]}: reads {b:.0f}/{d:.0f}/{a:.0f} per s = {100 * d / ((b + a) / 2):.1f}% during backups')" "$r" "$before" "$during" "$after" | tee -a "$out/loss"
  rm -rf "$b"
done
python3 - "$out/rounds" "$out/loss" <<'PY'
import re, statistics, sys
rows = [l for l in open(sys.argv[1])] + [l for l in open(sys.argv[2])]
num = lambda pat: statistics.median([float(m.group(1).replace(",", "")) for m in (re.search(pat, l) for l in rows) if m])
backup = num(r"backup [0-9.]+ s [(]([0-9,]+) resources/s")
restore = num(r"restore [0-9.]+ s [(]([0-9,]+) resources/s")
reads = num(r"= ([0-9.]+)% during")
print(f"median: backup {backup:,.0f} resources/s, restore {restore:,.0f} resources/s (targets >= 50,000), reads during backups {reads:.1f}% of unloaded (target >= 80%)")
PY
