#!/usr/bin/env bash
# Detection with the snooping facts, on this machine: how fast the engine of a real `valv serve`
# catches up on an audit log of signed-in physicians' patient reads, looking up for each read
# the person (account, Practitioner, relatives by blind-index token) and the patient (episodes
# opened from the store, security labels), against the same log judged without the snooping
# rules (intrusion rules only: no fact is looked up).
#
#   bench/run-detect-facts.sh [PATIENTS] [SECONDS] [CONNECTIONS] [ROUNDS]   (defaults: 1000 20 32 3)
#
# 1. Setup: `valv synth` patients imported; two physicians in one unit, every patient on a care
#    team of that unit; detection off.
# 2. Load: wrk reads random Observations as the two physicians (half the connections each) for
#    SECONDS: every read is a patient access in the audit log.
# 3. Rounds, on copies of the stopped data directory: detection on, the hour's delay before an
#    access is judged set to 0 (so every access is due at once), the snooping rules on or off;
#    timed from the server listening to the engine having read every entry and judged every
#    access (`valv_detection_lag_entries` 0, `valv_detection_judged_total` still), the server's
#    start included. Medians.
# Needs: wrk, python3, curl.
set -euo pipefail
PATIENTS=${1:-1000}
SECONDS_LOAD=${2:-20}
CONNS=${3:-32}
ROUNDS=${4:-3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-facts.XXXXXX)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$out"' EXIT
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-detect-facts.sh $PATIENTS $SECONDS_LOAD $CONNS $ROUNDS"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data="$out/valv-data"
"$valv" --data-dir "$data" init >/dev/null
svc_key=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope 'system/*.cruds system/CareTeam.cud system/Patient.cud system/Organization.cud system/Practitioner.cud' | tail -1)
"$valv" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
"$valv" --data-dir "$data" import "$out"/synth/*.json >/dev/null 2>&1
# Sets `key = value` in the [detect] section of a data directory's valv.toml.
detect_set() { sed -i "/^\[detect\]/,/^\[/ s/^$2 = .*/$2 = $3/" "$1/valv.toml"; grep -q "^$2 = $3\$" "$1/valv.toml"; }
detect_set "$data" enabled false

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="https://127.0.0.1:$port"
start_server() {
  # The setup opens a connection per request, far beyond a client's usual rate of new ones.
  VALV_LIMITS_NEW_CONNECTIONS_PER_MINUTE=6000000 VALV_LIMITS_NEW_CONNECTIONS_BURST=100000 VALV_LOG=warn "$valv" --data-dir "$1" serve --listen "127.0.0.1:$port" >/dev/null 2>>"$out/server.log" &
  server_pid=$!
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.02; done
  echo "bench: the server did not start; see $out/server.log" >&2; exit 1
}
stop_server() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; }
metric() { curl -sk "$base/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

# Two physicians (their Practitioners with a family name and an address, so the relative lookup
# runs) in one unit; every patient on an active CareTeam of the unit, their care units under it.
start_server "$data"
python3 - "$base" "$svc_key" "$out" <<'PY'
import json, ssl, sys, urllib.error, urllib.request
base, key, out = sys.argv[1:4]
tls = ssl.create_default_context(); tls.check_hostname = False; tls.verify_mode = ssl.CERT_NONE
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/fhir+json"})
    try:
        with urllib.request.urlopen(req, context=tls) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        sys.exit(f"bench: {method} {path}: {e.code} {e.read()[:300]!r}")
def all_of(path):
    found, url = [], path
    while url:
        b = call("GET", url)
        found += [e["resource"] for e in b.get("entry", [])]
        nxt = [l["url"] for l in b.get("link", []) if l["relation"] == "next"]
        url = nxt[0][len(base):] if nxt else None
    return found
unit = call("POST", "/fhir/Organization", {"resourceType": "Organization", "active": True, "name": "Bench ward"})["id"]
doctors = []
for family in ["Lindqvist", "Bergström"]:
    doctors.append(call("POST", "/fhir/Practitioner", {"resourceType": "Practitioner", "active": True, "name": [{"family": family, "given": ["Bench"]}],
                        "address": [{"line": [f"{family}vägen 1"], "postalCode": "11122", "city": "Stockholm"}]})["id"])
patients = all_of("/fhir/Patient?_count=1000")
# The patients' own care units under the ward, so they are not another provider's patients.
units = {p.get("managingOrganization", {}).get("reference", "").split("/", 1)[-1] for p in patients if p.get("managingOrganization", {}).get("reference", "").startswith("Organization/")}
for u in units:
    org = call("GET", "/fhir/Organization/" + u)
    org["partOf"] = {"reference": "Organization/" + unit}
    call("PUT", "/fhir/Organization/" + u, org)
for p in patients:
    call("POST", "/fhir/CareTeam", {"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/" + p["id"]},
         "participant": [{"member": {"reference": "Organization/" + unit}}]})
obs = [r["id"] for r in all_of("/fhir/Observation?_count=1000")]
open(out + "/unit", "w").write(unit)
open(out + "/doctors", "w").write("\n".join(doctors) + "\n")
open(out + "/obs-ids", "w").write("".join(i + "\n" for i in obs))
print(f"setup: {len(patients)} patients on care teams of Organization/{unit}; {len(obs)} observations to read; 2 physicians")
PY
stop_server

password="correct horse battery staple"
secrets=()
i=0
while read -r dr; do
  uri=$(echo "$password" | "$valv" --data-dir "$data" user add --username "bench.dr$i" --role physician --practitioner "$dr" --unit "$(cat "$out/unit")" --password-stdin | tail -1)
  s=${uri#*secret=}; secrets+=("${s%%&*}")
  i=$((i + 1))
done < "$out/doctors"

login() {
  local code
  code=$(python3 - "$2" <<'PY'
import base64, hashlib, hmac, struct, sys, time
s = sys.argv[1]; key = base64.b32decode(s + "=" * (-len(s) % 8))
h = hmac.new(key, struct.pack(">Q", int(time.time()) // 30), hashlib.sha1).digest()
o = h[-1] & 15
print("%06d" % ((struct.unpack(">I", h[o:o + 4])[0] & 0x7fffffff) % 1000000))
PY
)
  curl -sk "$base/auth/login" -H 'content-type: application/json' -d "{\"username\":\"$1\",\"password\":\"$password\",\"totp\":\"$code\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}

echo "== load: ${SECONDS_LOAD}s of reads by two physicians, wrk -t2 -c$CONNS"
start_server "$data"
pids=()
for n in 0 1; do
  token=$(login "bench.dr$n" "${secrets[$n]}")
  code=$(curl -sk -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$base/fhir/Observation/$(head -1 "$out/obs-ids")")
  [ "$code" = 200 ] || { echo "bench: physician $n got HTTP $code reading an Observation of a patient on their unit's care team" >&2; exit 1; }
  cat > "$out/read$n.lua" <<LUA
local items = {}
function init(args) for line in io.lines(args[1]) do items[#items + 1] = line end end
request = function() return wrk.format("GET", "/fhir/Observation/" .. items[math.random(#items)], {["Authorization"] = "Bearer $token"}) end
LUA
  wrk -t1 -c$((CONNS / 2)) -d"${SECONDS_LOAD}s" -s "$out/read$n.lua" "$base" -- "$out/obs-ids" > "$out/wrk$n.txt" &
  pids+=($!)
done
wait "${pids[@]}"
grep -h "Requests/sec\|Non-2xx" "$out"/wrk?.txt | sed 's/^/  /'
stop_server

# One round: a copy of the log, detection on, judged at once; prints "SECONDS ENTRIES JUDGED".
round() {
  local copy="$out/round" snooping=$1 start done_at size=0 judged=0 last=-1 still=0
  rm -rf "$copy"; cp -a "$data" "$copy"
  detect_set "$copy" enabled true
  detect_set "$copy" explain_delay_minutes 0
  detect_set "$copy" snooping "$snooping"
  # Timed from before the start (the engine begins before the port opens): the startup counts
  # against the rate.
  start=$(date +%s.%N)
  done_at=$start
  start_server "$copy"
  # Done when neither the lag nor the count of judged accesses has moved for four polls; the
  # time is that of the last poll that saw a change.
  while [ "$still" -lt 4 ]; do
    size=$(metric valv_detection_lag_entries); judged=$(metric valv_detection_judged_total)
    if [ "${size:-1}" != 0 ] || [ "$judged" != "$last" ]; then done_at=$(date +%s.%N); still=0; else still=$((still + 1)); fi
    last=$judged
    sleep 0.05
  done
  stop_server
  local entries
  entries=$(grep -c . <("$valv" --data-dir "$copy" audit export 2>/dev/null) || true)
  echo "$(python3 -c "print(round($done_at - $start, 3))") $entries $judged"
}

echo "== rounds (interleaved: snooping on, then off)"
: > "$out/on"; : > "$out/off"
for r in $(seq "$ROUNDS"); do
  for mode in true false; do
    res=$(round "$mode")
    echo "  round $r snooping=$mode: $res (seconds, entries, accesses judged)"
    echo "$res" >> "$out/$([ "$mode" = true ] && echo on || echo off)"
  done
done
python3 - "$out/on" "$out/off" <<'PY'
import statistics, sys
def load(p):
    rows = [list(map(float, l.split())) for l in open(p) if l.strip()]
    return statistics.median(r[1] / r[0] for r in rows), statistics.median(r[2] / r[0] for r in rows), rows[0][1], statistics.median(r[2] for r in rows)
on_e, on_j, entries, judged = load(sys.argv[1])
off_e, _, _, _ = load(sys.argv[2])
print(f"log: {entries:.0f} entries; accesses judged with snooping on: {judged:.0f}")
print(f"catch-up with snooping facts: median {on_e:,.0f} entries/s ({on_j:,.0f} accesses judged/s)")
print(f"catch-up without (intrusion rules only): median {off_e:,.0f} entries/s; ratio {on_e / off_e:.2f}")
PY
