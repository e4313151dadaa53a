#!/usr/bin/env bash
# Searches that shape their results, and $everything, on this machine (issue "FHIR for real
# clients", its targets):
#
#   bench/run-fhir.sh [SECONDS] [ROUNDS] [PATIENTS]   (defaults: 10 3 3000)
#
# One SQLite data directory, served by the release binary: first PATIENTS synthetic patients from
# `valv synth --seed 1` (~32 resources each: 3,000 make ~95k resources, the issue's "100k"),
# imported with `valv import`; then, through the API (transaction Bundles of 250), patient A with
# 1,000 Observations (10 LOINC codes, one date each) and patient B with 5,000. Then, single client (wrk -t1 -c1, keep-alive, audited as always), in interleaved
# rounds:
#
#   code      GET /fhir/Observation?patient=A&code=http://loinc.org|<one of the 10>  (100 matches, first 20)
#   plain     GET /fhir/Observation?patient=A&_count=20
#   include   the same with &_include=Observation:subject
#   sort      GET /fhir/Observation?patient=A&_sort=-date&_count=20  (1,000 decrypted and ordered)
#   everything  GET /fhir/Patient/B/$everything, every page (1,000 each) followed by its next link:
#             the wall time of the whole record, five times per round
#
# Prints the machine, every round, then the medians and the ratios the issue asks for.
# Needs: wrk, python3 (apt-get install -y wrk python3). Stops everything it started.
set -euo pipefail
SECONDS_PER_RUN=${1:-10}
ROUNDS=${2:-3}
PATIENTS=${3:-3000}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-fhir.XXXXXX)
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
echo "command: bench/run-fhir.sh $SECONDS_PER_RUN $ROUNDS $PATIENTS"
echo "load generator: wrk -t1 -c1 (one client, keep-alive), ${SECONDS_PER_RUN}s per run, on the same $(nproc) cores as the server"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data="$out/data"
key=$("$valv" --data-dir "$data" init | tail -n1)
if [ "$PATIENTS" -gt 0 ]; then
  "$valv" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
  echo "background: $("$valv" --data-dir "$data" import "$out/synth"/*.json 2>/dev/null | head -1)"
fi
loader=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope "system/*.cruds system/Patient.cud" | tail -n1)
"$valv" --data-dir "$data" serve --listen 127.0.0.1:0 > "$out/serve.out" 2> "$out/serve.log" &
pids+=($!)
for _ in $(seq 200); do grep -q "Valv serving" "$out/serve.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/^Valv serving HTTPS on \(https:[^ ]*\/fhir\).*/\1/p' "$out/serve.out")
[ -n "$base" ] || { echo "bench: valv serve did not start: $(cat "$out/serve.log")" >&2; exit 1; }
: "$key"

# Loads the two patients; prints "A B".
read -r A B < <(BASE="$base" KEY="$loader" python3 - <<'PY'
import http.client, json, os, ssl, urllib.parse
u = urllib.parse.urlparse(os.environ["BASE"])
conn = http.client.HTTPSConnection(u.hostname, u.port, context=ssl._create_unverified_context())
headers = {"Authorization": "Bearer " + os.environ["KEY"], "Content-Type": "application/fhir+json", "Prefer": "return=minimal"}
def post(path, body):
    conn.request("POST", u.path + path, json.dumps(body), headers)
    r = conn.getresponse(); data = r.read()
    if r.status >= 300: raise SystemExit(f"{path}: {r.status} {data[:300]!r}")
    return r, data
def patient(family):
    r, _ = post("/Patient", {"resourceType": "Patient", "name": [{"family": family}]})
    return r.getheader("Location").split("/Patient/")[1].split("/")[0]
def observations(pid, n):
    for start in range(0, n, 250):
        entries = []
        for i in range(start, min(n, start + 250)):
            entries.append({"resource": {"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": f"{8860 + i % 10}-4"}]},
                "subject": {"reference": f"Patient/{pid}"},
                "effectiveDateTime": f"{2000 + i % 25}-{1 + i % 12:02d}-{1 + i % 28:02d}",
                "valueQuantity": {"value": i, "unit": "mg"}},
                "request": {"method": "POST", "url": "Observation"}})
        post("", {"resourceType": "Bundle", "type": "transaction", "entry": entries})
a, b = patient("Benchsearch"), patient("Benchrecord")
observations(a, 1000)
observations(b, 5000)
print(a, b)
PY
)
echo "loaded: patient A $A (1,000 Observations), patient B $B (5,000)"

p50() { # wrk's median latency in ms
  wrk -t1 -c1 -d"${SECONDS_PER_RUN}s" --latency -H "Authorization: Bearer $loader" "$1" |
    awk '/^ +50%/ { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 }; printf "%.2f", v }'
}
everything() { # median wall ms of five whole-record fetches
  BASE="$base" KEY="$loader" PID="$B" python3 - <<'PY'
import http.client, json, os, ssl, statistics, time, urllib.parse
u = urllib.parse.urlparse(os.environ["BASE"])
conn = http.client.HTTPSConnection(u.hostname, u.port, context=ssl._create_unverified_context())
h = {"Authorization": "Bearer " + os.environ["KEY"]}
times = []
for _ in range(5):
    t, path, n = time.perf_counter(), f"{u.path}/Patient/{os.environ['PID']}/$everything", 0
    while path:
        conn.request("GET", path, headers=h); r = conn.getresponse(); b = json.loads(r.read())
        assert r.status == 200, b
        n += len(b.get("entry", []))
        nxt = [l["url"] for l in b.get("link", []) if l["relation"] == "next"]
        path = urllib.parse.urlparse(nxt[0])._replace(scheme="", netloc="").geturl() if nxt else None
    times.append((time.perf_counter() - t) * 1000)
    assert n == 5001, n
print(f"{statistics.median(times):.0f}")
PY
}

declare -A results
for round in $(seq "$ROUNDS"); do
  code=$(p50 "$base/Observation?patient=$A&code=http://loinc.org%7C8863-4")
  plain=$(p50 "$base/Observation?patient=$A&_count=20")
  include=$(p50 "$base/Observation?patient=$A&_count=20&_include=Observation:subject")
  sort=$(p50 "$base/Observation?patient=$A&_sort=-date&_count=20")
  every=$(everything)
  echo "round $round: code p50 $code ms; plain p50 $plain ms; include p50 $include ms; sort p50 $sort ms; \$everything (5,001) $every ms"
  results[code]+="$code "; results[plain]+="$plain "; results[include]+="$include "; results[sort]+="$sort "; results[every]+="$every "
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo "== medians of $ROUNDS rounds"
echo "search by patient + code: p50 $(median "${results[code]}") ms (target <= 5)"
echo "_include of the subject: p50 $(median "${results[include]}") ms vs plain $(median "${results[plain]}") ms = $(awk -v a="$(median "${results[include]}")" -v b="$(median "${results[plain]}")" 'BEGIN { printf "%.2f", a / b }')x (target <= 2x)"
echo "_sort=-date over 1,000 Observations: p50 $(median "${results[sort]}") ms (target <= 20)"
echo "\$everything of 5,001 resources: $(median "${results[every]}") ms (target <= 1000)"
