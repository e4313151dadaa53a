#!/usr/bin/env bash
# Valv beside the ceiling and a peer, in one run (issue "speed", item 1):
#
#   bench/run-compare.sh [SECONDS] [ROUNDS] [PATIENTS]   (defaults: 10 3 200)
#
# - ceiling: bench/ceiling, a bare axum + rustls TLS 1.3 server answering a fixed 1 KiB Patient
#   (no Valv code): what an HTTPS server can at best do here.
# - Valv: the release binary, SQLite, every protection on (TLS 1.3, a service key decided per
#   request, audit made durable before each answer, per-patient encryption).
# - Helios HFS 0.2.7 (`cargo install --locked helios-hfs`, installed under target/helios when
#   missing; its defaults: SQLite, plain HTTP, no authentication, no audit, no encryption).
#
# The same data in Valv and Helios: PATIENTS synthetic patients from `valv synth --seed 1`
# (transaction Bundles), loaded with `valv import` into Valv and POSTed bundle by bundle (one
# client) to Helios — the import figures. Then ROUNDS interleaved rounds of SECONDS each with
# `wrk -t2 -c32` (the load generator shares the two cores): reads by id of Patient and
# Observation (random ids of the loaded data), search Observation?_count=20&patient=<random
# patient> (the same page size for both),
# create Observation. Prints the machine, every round, then medians and the ratios the issue
# asks for. Last, Valv alone is restarted with room for 256 connections from one address and read
# by Patient id over 256 connections for SECONDS: its peak resident memory (VmHWM; the issue asks
# < 256 MiB). Needs wrk, python3, cargo. Stops everything it started.
set -euo pipefail
SECONDS_PER_RUN=${1:-10}
ROUNDS=${2:-3}
PATIENTS=${3:-200}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-compare.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-compare.sh $SECONDS_PER_RUN $ROUNDS $PATIENTS"
echo "load generator: wrk -t2 -c32, ${SECONDS_PER_RUN}s per run, on the same $(nproc) cores as the servers (one server runs at a time)"

(cd "$root" && cargo build --release --locked -q)
(cd "$here/ceiling" && cargo build --release -q --target-dir "$root/target/ceiling")
hfs=$(command -v hfs || true)
if [ -z "$hfs" ]; then
  hfs="$root/target/helios/bin/hfs"
  [ -x "$hfs" ] || { echo "== installing helios-hfs 0.2.7 (cargo install --locked; tens of minutes the first time)"; cargo install --locked helios-hfs --version 0.2.7 --root "$root/target/helios" -q; }
fi
valv="$root/target/release/valv"
ceiling="$root/target/ceiling/release/valv-bench-ceiling"

"$valv" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
resources=$(python3 -c 'import glob,json,sys; print(sum(len(json.load(open(f))["entry"]) for f in glob.glob(sys.argv[1] + "/*.json")))' "$out/synth")

# Every wrk run ends with one line: requests/s, p50 and p99 in ms, errors.
report='done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end'
# list.lua FILE PREFIX [TOKEN]: GET PREFIX..<a random line of FILE>.
cat > "$out/list.lua" <<LUA
local items, prefix, auth = {}, "", nil
function init(args)
  for line in io.lines(args[1]) do items[#items + 1] = line end
  prefix = args[2]
  if args[3] then auth = "Bearer " .. args[3] end
end
request = function()
  local headers = {}
  if auth then headers["Authorization"] = auth end
  return wrk.format("GET", prefix .. items[math.random(#items)], headers)
end
$report
LUA
# create.lua PATIENT [TOKEN]: POST an Observation.
cat > "$out/create.lua" <<LUA
local auth = nil
function init(args)
  if args[2] then auth = "Bearer " .. args[2] end
  wrk.body = '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/' .. args[1] .. '"},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}'
end
request = function()
  local headers = {["Content-Type"] = "application/fhir+json", ["Prefer"] = "return=minimal"}
  if auth then headers["Authorization"] = auth end
  return wrk.format("POST", nil, headers, wrk.body)
end
$report
LUA
cat > "$out/plain.lua" <<LUA
$report
LUA

wait_line() { # FILE PATTERN: until a line matches (10 s)
  for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "bench: no '$2' in $1: $(tail -5 "$1")" >&2; exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Ids of a server: FILE_PREFIX BASE [TOKEN] -> FILE_PREFIX.patients, FILE_PREFIX.observations.
collect_ids() {
  BASE="$2" TOKEN="${3:-}" OUT="$1" python3 - <<'PY'
import json, os, ssl, urllib.request
base, token, out = os.environ["BASE"], os.environ["TOKEN"], os.environ["OUT"]
ctx = ssl._create_unverified_context()
def ids(t):
    req = urllib.request.Request(f"{base}/{t}?_count=1000", headers={"Authorization": f"Bearer {token}"} if token else {})
    b = json.load(urllib.request.urlopen(req, context=ctx))
    return [e["resource"]["id"] for e in b.get("entry", [])]
for t, name in (("Patient", "patients"), ("Observation", "observations")):
    got = ids(t)
    if not got: raise SystemExit(f"bench: {base}/{t} returned no ids")
    open(f"{out}.{name}", "w").write("\n".join(got) + "\n")
PY
}

echo "== load: $PATIENTS synthetic patients, $resources resources"
data="$out/valv-data"
"$valv" --data-dir "$data" init >/dev/null
key=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope 'system/*.cruds system/Patient.cud' | tail -1)
imported=$("$valv" --data-dir "$data" import "$out"/synth/*.json 2>/dev/null | head -1)
echo "$imported"
# valv import's own rate: from its first bundle to its last commit (as Helios's, without start-up).
valv_import=$(sed -n 's/.*(\([0-9]*\) resources\/s).*/\1/p' <<<"$imported")
VALV_LOG=warn "$valv" --data-dir "$data" serve --listen 127.0.0.1:0 > "$out/valv.out" 2> "$out/valv.log" &
valv_pid=$!
pids+=($valv_pid)
wait_line "$out/valv.out" "Valv serving"
valv_base=$(sed -n 's/^Valv serving HTTPS on \(https:[^ ]*\/fhir\).*/\1/p' "$out/valv.out")
collect_ids "$out/valv" "$valv_base" "$key"

hport=$(free_port)
(cd "$out" && exec "$hfs" --port "$hport" > "$out/hfs.out" 2>&1) &
pids+=($!)
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$hport/metadata" && break; sleep 0.1; done
helios_base="http://127.0.0.1:$hport"
helios_import=$(BASE="$helios_base" DIR="$out/synth" python3 - <<'PY'
import glob, http.client, json, os, time, urllib.parse
u = urllib.parse.urlparse(os.environ["BASE"])
conn = http.client.HTTPConnection(u.hostname, u.port)
files = sorted(glob.glob(os.environ["DIR"] + "/*.json"))
n, t = 0, time.perf_counter()
for f in files:
    body = open(f, "rb").read()
    conn.request("POST", "/", body, {"Content-Type": "application/fhir+json"})
    r = conn.getresponse(); data = r.read()
    if r.status >= 300: raise SystemExit(f"bench: Helios refused {f}: {r.status} {data[:300]!r}")
    n += len(json.loads(body)["entry"])
print(round(n / (time.perf_counter() - t)))
PY
)
collect_ids "$out/helios" "$helios_base"
echo "import: Valv (valv import) $valv_import resources/s; Helios (POSTed transactions, one client) $helios_import resources/s"

cport=$(free_port)
"$ceiling" "127.0.0.1:$cport" > "$out/ceiling.out" 2>&1 &
pids+=($!)
wait_line "$out/ceiling.out" "ceiling serving"
ceiling_base="https://127.0.0.1:$cport/fhir"

declare -A R
measure() { # NAME ARGS...: wrk, one figure pair into R[NAME]
  local name=$1 line; shift
  line=$(wrk -t2 -c32 -d"${SECONDS_PER_RUN}s" --latency "$@" | grep '^RESULT' || echo "RESULT 0 0 0 -1")
  read -r _ rps p50 p99 errors <<<"$line"
  R[$name]+="$rps "
  R[$name.p99]+="$p99 "
  printf '  %-30s %9s/s  p50 %7s ms  p99 %7s ms  errors %s\n' "$name" "$rps" "$p50" "$p99" "$errors"
}
vp=$(head -1 "$out/valv.patients"); hp=$(head -1 "$out/helios.patients")
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  measure ceiling -s "$out/plain.lua" "$ceiling_base/Patient/x"
  measure valv.patient -s "$out/list.lua" "$valv_base" -- "$out/valv.patients" "/fhir/Patient/" "$key"
  measure helios.patient -s "$out/list.lua" "$helios_base" -- "$out/helios.patients" "/Patient/"
  measure valv.observation -s "$out/list.lua" "$valv_base" -- "$out/valv.observations" "/fhir/Observation/" "$key"
  measure helios.observation -s "$out/list.lua" "$helios_base" -- "$out/helios.observations" "/Observation/"
  measure valv.search -s "$out/list.lua" "$valv_base" -- "$out/valv.patients" "/fhir/Observation?_count=20&patient=" "$key"
  measure helios.search -s "$out/list.lua" "$helios_base" -- "$out/helios.patients" "/Observation?_count=20&patient="
  measure valv.create -s "$out/create.lua" "$valv_base/Observation" -- "$vp" "$key"
  measure helios.create -s "$out/create.lua" "$helios_base/Observation" -- "$hp"
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
m() { median "${R[$1]}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf (b > 0 ? "%.2f" : "n/a"), (b > 0 ? a / b : 0) }'; }
echo "== medians of $ROUNDS rounds (requests/s; p99 ms)"
printf '%-22s %10s %20s %10s %13s %12s\n' request ceiling "Valv (p99 ms)" Helios "Valv/ceiling" "Valv/Helios"
for what in patient observation search create; do
  c=$( [ "$what" = patient ] || [ "$what" = observation ] && m ceiling || echo "")
  printf '%-22s %10s %20s %10s %13s %12s\n' "$what" "${c:--}" "$(m valv.$what) ($(median "${R[valv.$what.p99]}"))" "$(m helios.$what)" \
    "$( [ -n "$c" ] && ratio "$(m valv.$what)" "$c" || echo -)" "$(ratio "$(m valv.$what)" "$(m helios.$what)")"
done
printf '%-22s %10s %20s %10s %13s %12s\n' "import (resources/s)" - "$valv_import" "$helios_import" - "$(ratio "$valv_import" "$helios_import")"
echo "targets (issue \"speed\"): reads >= 0.33 of the ceiling and >= 2x Helios; search >= 2x Helios; creates >= 6,000/s; import >= 10,000/s"

echo "== memory: Valv restarted, reads of Patient by id over 256 connections for ${SECONDS_PER_RUN}s"
kill "$valv_pid"; wait "$valv_pid" 2>/dev/null || true
# One source address holds all 256 (the defaults allow 64 and bursts of 200 new connections).
printf '[limits]\nmax_connections_per_address = 512\nnew_connections_burst = 512\n' > "$data/valv.toml"
VALV_LOG=warn "$valv" --data-dir "$data" serve --listen 127.0.0.1:0 > "$out/valv.out" 2> "$out/valv.log" &
valv_pid=$!
pids+=($valv_pid)
wait_line "$out/valv.out" "Valv serving"
valv_base=$(sed -n 's/^Valv serving HTTPS on \(https:[^ ]*\/fhir\).*/\1/p' "$out/valv.out")
line=$(wrk -t2 -c256 -d"${SECONDS_PER_RUN}s" --latency -s "$out/list.lua" "$valv_base" -- "$out/valv.patients" "/fhir/Patient/" "$key" | grep '^RESULT' || echo "RESULT 0 0 0 -1")
read -r _ rps p50 p99 errors <<<"$line"
hwm=$(awk '/^VmHWM/{printf "%.0f", $2/1024}' "/proc/$valv_pid/status")
echo "256 connections: $rps reads/s, p50 $p50 ms, p99 $p99 ms, errors $errors; Valv's peak RSS (VmHWM) $hwm MiB (target < 256 MiB)"
