#!/usr/bin/env bash
# Sign-in under attack: audited FHIR reads/s for a signed-in physician (of patients in their care,
# through CareTeams the script creates), alone and beside a flood of wrong-password logins
# against /auth/login, on this machine.
#
#   bench/run-auth.sh [SECONDS] [READ_CONNECTIONS] [FLOOD_CONNECTIONS]     (defaults: 10 32 64)
#
# Scenarios (each prints reads/s with p50/p99, then what the flood met, from /metrics):
#   1. reads alone (a physician's session token);
#   2. reads beside a login flood from one address, default limits: the per-address rate limit
#      answers 429 and the account locks after 5 failures;
#   3. reads beside the same flood with the rate limit lifted (standing in for a flood from many
#      addresses): every attempt reaches Argon2, whose concurrency is bounded (half the cores,
#      then a queue of 64, then 503), so clinical reads keep the other core.
# Needs: wrk, python3, curl. Everything runs on 127.0.0.1 and stops by itself.
set -euo pipefail
SECONDS_PER_RUN=${1:-10}
CONNS=${2:-32}
FLOOD_CONNS=${3:-64}
THREADS=2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-auth.XXXXXX)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$out"' EXIT

command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-auth.sh $SECONDS_PER_RUN $CONNS $FLOOD_CONNS (wrk -t$THREADS; reads -c$CONNS, flood -c$FLOOD_CONNS; all on the same 2 cores as the server)"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data="$out/valv-data"
# The admin key `valv init` prints sees no patient data (403 on FHIR data): the setup's FHIR
# requests use a service key acting by its SMART system/ scopes.
"$valv" --data-dir "$data" init >/dev/null
svc_key=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope 'system/*.cruds system/CareTeam.cud system/Consent.cud system/Patient.cud system/Organization.cud' | tail -1)
"$valv" synth --patients 20 --out "$out/synth" --seed 1 >/dev/null
"$valv" --data-dir "$data" import "$out"/synth/*.json >/dev/null 2>&1

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="https://127.0.0.1:$port"
start_server() {
  VALV_LOG=warn "$valv" --data-dir "$data" serve --listen "127.0.0.1:$port" >/dev/null 2>>"$out/server.log" &
  server_pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
}
stop_server() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; }

# The reader is a physician, and physicians read only the records of patients in their care:
# with the service key, create their Practitioner and a hospital, put every synthetic patient's
# care unit under the hospital (the reader's unit, so the patients are not another provider's),
# and give every patient an active CareTeam naming the reader. Then list the Observations to read.
start_server
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
def ids(path):
    b = call("GET", path)
    return [e["resource"] for e in b.get("entry", [])]
meta = {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}]}
dr = call("POST", "/fhir/Practitioner", {"resourceType": "Practitioner", "meta": meta, "active": True,
          "name": [{"family": "Reader", "given": ["Bench"], "prefix": ["Dr."]}]})["id"]
hospital = call("POST", "/fhir/Organization", {"resourceType": "Organization", "meta": meta, "active": True,
                "name": "Bench hospital"})["id"]
patients = ids("/fhir/Patient?_count=1000")
units = set()
for p in patients:
    ref = p.get("managingOrganization", {}).get("reference", "")
    if ref.startswith("Organization/"):
        units.add(ref.split("/", 1)[1])
    call("POST", "/fhir/CareTeam", {"resourceType": "CareTeam", "meta": meta, "status": "active", "name": "Bench reader's patients",
         "subject": {"reference": "Patient/" + p["id"]},
         "participant": [{"member": {"reference": "Practitioner/" + dr},
                          "role": [{"coding": [{"system": "http://snomed.info/sct", "code": "309343006"}]}]}]})
for u in units:
    org = call("GET", "/fhir/Organization/" + u)
    org["partOf"] = {"reference": "Organization/" + hospital}
    call("PUT", "/fhir/Organization/" + u, org)
obs = [r["id"] for r in ids("/fhir/Observation?_count=1000")]
open(out + "/practitioner", "w").write(dr)
open(out + "/unit", "w").write(hospital)
open(out + "/obs-ids", "w").write("".join(i + "\n" for i in obs))
print(f"setup: Practitioner/{dr} in Organization/{hospital}; {len(patients)} CareTeams, {len(units)} units under the hospital, {len(obs)} observations to read")
PY
stop_server
# The reader: a physician with their Practitioner and unit, provisioned with a password and TOTP.
uri=$(echo "correct horse battery staple" | "$valv" --data-dir "$data" user add --username bench.reader --role physician \
  --practitioner "$(cat "$out/practitioner")" --unit "$(cat "$out/unit")" --password-stdin | tail -1)
secret=${uri#*secret=}; secret=${secret%%&*}

totp() {
  python3 - "$secret" <<'PY'
import base64, hashlib, hmac, struct, sys, time
s = sys.argv[1]; key = base64.b32decode(s + "=" * (-len(s) % 8))
h = hmac.new(key, struct.pack(">Q", int(time.time()) // 30), hashlib.sha1).digest()
o = h[-1] & 15
print("%06d" % ((struct.unpack(">I", h[o:o + 4])[0] & 0x7fffffff) % 1000000))
PY
}
login() {
  curl -sk "$base/auth/login" -H 'content-type: application/json' \
    -d "{\"username\":\"bench.reader\",\"password\":\"correct horse battery staple\",\"totp\":\"$(totp)\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
# A read the reader must be permitted, or the figures would measure refusals.
check_read() {
  local code
  code=$(curl -sk -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $1" "$base/fhir/Observation/$(head -1 "$out/obs-ids")")
  [ "$code" = 200 ] || { echo "bench: the signed-in reader got HTTP $code reading an Observation of a patient in their care" >&2; exit 1; }
}
metric() { curl -sk "$base/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
status_count() { curl -sk "$base/metrics" | awk -v s="status=\"$1\"" 'index($0, "valv_http_requests_total{route=\"auth_login\"") && index($0, s) { print $2 }' | head -1; }

report='done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end'
write_read_script() {
  cat > "$out/read.lua" <<LUA
local items = {}
function init(args) for line in io.lines(args[1]) do items[#items + 1] = line end end
request = function()
  return wrk.format("GET", "/fhir/Observation/" .. items[math.random(#items)], {["Authorization"] = "Bearer $1"})
end
$report
LUA
}
cat > "$out/flood.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/auth/login", nil, '{"username":"bench.reader","password":"wrong guess number ' .. n .. '","totp":"123456"}')
end
LUA

reads() {
  local name=$1 line
  line=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" --latency -s "$out/read.lua" "$base" -- "$out/obs-ids" | grep '^RESULT')
  read -r _ rps p50 p99 errors <<<"$line"
  printf '%-58s %7s reads/s   p50 %7s ms   p99 %7s ms   errors %s\n' "$name" "$rps" "$p50" "$p99" "$errors"
}
# Reads measured while a flood of wrong-password logins runs beside them.
beside_flood() {
  wrk -t1 -c"$FLOOD_CONNS" -d"$((SECONDS_PER_RUN + 2))s" -s "$out/flood.lua" "$base" >/dev/null 2>&1 &
  local flood=$!
  sleep 1
  reads "$1"
  wait "$flood" || true
  flood_summary
}
flood_summary() {
  local a b c
  a=$(status_count 401); b=$(status_count 429); c=$(status_count 503)
  echo "   flood met: ${a:-0} x 401, ${b:-0} x 429, ${c:-0} x 503; lockouts $(metric valv_lockouts_total), rate-limited $(metric valv_auth_rate_limited_total)"
}

start_server
token=$(login)
check_read "$token"
write_read_script "$token"
echo "== reads by a signed-in physician, patients in their care ($(wc -l < "$out/obs-ids") observations), wrk -c$CONNS -d${SECONDS_PER_RUN}s"
reads "1. alone"
beside_flood "2. beside a login flood, default limits"

# 3. The same flood with the per-address limit lifted: every attempt is hashed.
stop_server
python3 - "$data/valv.toml" <<'PY'
import re, sys
p = sys.argv[1]; t = open(p).read()
t = re.sub(r"(?m)^rate_per_minute = .*$", "rate_per_minute = 100000000", t)
t = re.sub(r"(?m)^rate_burst = .*$", "rate_burst = 100000000", t)
open(p, "w").write(t)
PY
"$valv" --data-dir "$data" user unlock bench.reader >/dev/null
start_server
sleep 31  # a fresh TOTP step for the new login
token=$(login)
check_read "$token"
write_read_script "$token"
beside_flood "3. beside a login flood, rate limit lifted (many addresses)"
echo "   Argon2id: $(awk '/^argon2_memory_kib/ {print $3}' "$data/valv.toml") KiB, $(awk '/^argon2_iterations/ {print $3}' "$data/valv.toml") passes; hash concurrency $(awk '/^hash_concurrency/ {print $3}' "$data/valv.toml") (0: half the cores), queue $(awk '/^hash_queue/ {print $3}' "$data/valv.toml")"
stop_server
