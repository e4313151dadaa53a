#!/usr/bin/env bash
# Valv benchmark: synthetic patients -> import -> HTTPS load with wrk, on this machine.
#
#   bench/run.sh [PATIENTS] [SECONDS] [CONNECTIONS]      (defaults: 200 10 32)
#
# Prints the machine, the commands and, per scenario, requests/s with p50/p99 latency.
# Needs: wrk (apt-get install -y wrk). Everything runs on 127.0.0.1 and stops by itself.
set -euo pipefail
PATIENTS=${1:-200}
SECONDS_PER_RUN=${2:-10}
CONNS=${3:-32}
THREADS=2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench.XXXXXX)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$out"' EXIT

command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "load generator: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $THREADS threads, $CONNS connections, ${SECONDS_PER_RUN}s per run, on the same 2 cores as the server"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data="$out/valv-data"

echo "== import"
# The admin key `valv init` prints sees no patient data (admins get 403 on FHIR data); every FHIR
# request here uses a service key that acts by its SMART system/ scopes.
"$valv" --data-dir "$data" init >/dev/null
svc_key=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope 'system/*.cruds system/CareTeam.cud system/Consent.cud system/Patient.cud system/Organization.cud' | tail -1)
"$valv" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
"$valv" --data-dir "$data" import "$out"/synth/*.json 2>/dev/null | head -1

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
VALV_LOG=warn "$valv" --data-dir "$data" serve --listen "127.0.0.1:$port" >/dev/null 2>"$out/server.log" &
server_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
base="https://127.0.0.1:$port"

# Ids and identifiers to spread reads and searches over many patients.
fetch() { curl -sk -H "Authorization: Bearer $svc_key" "$base$1"; }
fetch "/fhir/Observation?_count=1000" | python3 -c 'import json,sys; [print(e["resource"]["id"]) for e in json.load(sys.stdin).get("entry",[])]' > "$out/obs-ids"
fetch "/fhir/Patient?_count=1000" | python3 -c '
import json,sys
b=json.load(sys.stdin)
for e in b.get("entry",[]):
    r=e["resource"]
    for i in r.get("identifier",[]):
        if i.get("system")=="urn:valv:synthetic:mrn": print(i["system"]+"|"+i["value"])
' > "$out/mrns"
[ -s "$out/obs-ids" ] && [ -s "$out/mrns" ] || { echo "bench: the service key read no data: $(fetch "/fhir/Observation?_count=1" | head -c 300)" >&2; exit 1; }
pid=$(fetch "/fhir/Patient?_count=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])')
echo "ids: $(wc -l < "$out/obs-ids") observations, $(wc -l < "$out/mrns") patient identifiers"

# Every script ends with the same report: requests/s, p50 and p99 in ms, errors.
report='done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end'
cat > "$out/list.lua" <<LUA
local items = {}
local prefix, method, body = "", "GET", nil
function init(args)
  for line in io.lines(args[1]) do items[#items + 1] = line end
  prefix = args[2]
end
request = function()
  local item = items[math.random(#items)]
  item = item:gsub("|", "%%7C")
  return wrk.format("GET", prefix .. item, {["Authorization"] = "Bearer $svc_key"})
end
$report
LUA
cat > "$out/create.lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $svc_key"
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.headers["Prefer"] = "return=minimal"
wrk.body = '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/$pid"},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}'
$report
LUA
cat > "$out/plain.lua" <<LUA
$report
LUA

declare -A RPS
run() {
  local key=$1 name=$2; shift 2
  local line
  line=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" --latency "$@" | grep '^RESULT')
  read -r _ rps p50 p99 errors <<<"$line"
  printf '%-36s %9s req/s   p50 %7s ms   p99 %7s ms   errors %s\n' "$name" "$rps" "$p50" "$p99" "$errors"
  RPS[$key]=$rps
}

echo "== load (wrk -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s)"
run healthz "healthz (same TLS stack, no auth)" -s "$out/plain.lua" "$base/healthz"
run read "read Observation by id (audited)" -s "$out/list.lua" "$base" -- "$out/obs-ids" "/fhir/Observation/"
run search "search Patient by identifier" -s "$out/list.lua" "$base" -- "$out/mrns" "/fhir/Patient?identifier="
run create "create Observation (fsync)" -s "$out/create.lua" "$base/fhir/Observation"
python3 - "${RPS[healthz]}" "${RPS[read]}" <<'PY'
import sys
h, r = float(sys.argv[1]), float(sys.argv[2])
print(f"audited reads run at {100*r/h:.0f}% of /healthz through the same TLS stack")
PY
