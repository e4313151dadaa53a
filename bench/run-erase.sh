#!/usr/bin/env bash
# Erasure by key destruction (issue "lifecycle": a patient with 10,000 resources erased in at
# most 1 s): the whole `valv erase` command (process start, opening the data directory, the
# erasure transaction, the WAL truncation, the audit entry, the signed ledger), against a data
# directory holding ROUNDS such patients beside 50 ordinary synthetic ones.
#
#   bench/run-erase.sh [RESOURCES] [ROUNDS]     (defaults: 10000 3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-10000}; rounds=${2:-3}
out=$(mktemp -d /tmp/valv-bench-erase.XXXXXX)
trap 'rm -rf "$out"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-erase.sh $n $rounds"
(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
"$valv" --data-dir "$out/d" init >/dev/null
"$valv" synth --patients 50 --out "$out/synth" --seed 1 >/dev/null
"$valv" --data-dir "$out/d" import "$out"/synth/*.json >/dev/null 2>&1
python3 - "$out" "$n" "$rounds" <<'PY'
import json, sys, uuid
out, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    p = f"urn:uuid:{uuid.uuid4()}"
    entries = [{"fullUrl": p, "resource": {"resourceType": "Patient", "name": [{"family": f"Erasebench{r}"}]}, "request": {"method": "POST", "url": "Patient"}}]
    for i in range(n - 1):
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"}, "subject": {"reference": p},
            "effectiveDateTime": f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}", "valueQuantity": {"value": 60 + i % 40, "unit": "/min"}},
            "request": {"method": "POST", "url": "Observation"}})
    json.dump({"resourceType": "Bundle", "type": "transaction", "entry": entries}, open(f"{out}/big-{r}.json", "w"))
PY
"$valv" --data-dir "$out/d" import "$out"/big-*.json 2>/dev/null | head -1
db="$out/d/valv.db"
for r in $(seq 0 $((rounds - 1))); do
  id=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select patient from resources where patient is not null and patient not in (select patient from erasures) group by patient having count(*) >= ? order by patient limit 1 offset ?', (int(sys.argv[2]), int(sys.argv[3]))).fetchone()[0])" "$db" "$n" 0)
  start=$(date +%s.%N)
  line=$("$valv" --data-dir "$out/d" erase --patient "$id" --reason "bench round $r" | head -1)
  end=$(date +%s.%N)
  python3 -c "print(f'round $((r + 1)): {float($end) - float($start):.3f} s  ($line)')"
done | tee "$out/times"
python3 - "$out/times" <<'PY'
import statistics, sys
t = [float(l.split()[2]) for l in open(sys.argv[1])]
print(f"median: {statistics.median(t):.3f} s for the whole valv erase command (target <= 1 s)")
PY
