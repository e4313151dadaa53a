#!/usr/bin/env bash
# Two builds of Valv on the same data, alternated (before/after figures for one change):
#
#   bench/run-ab.sh BINARY_A BINARY_B [ROUNDS] [SECONDS] [PATIENTS] [REQUEST]
#   (defaults: 3 8 200 search; REQUEST is one of search, patient, observation, create)
#
# Loads PATIENTS synthetic patients (`valv synth --seed 1`, `valv import` with BINARY_A) into one
# data directory, then in each of ROUNDS rounds serves it with A, then with B (one server at a
# time), each read for SECONDS with `wrk -t2 -c32` (the load generator shares the cores):
# search = Observation?_count=20&patient=<random patient>, patient / observation = reads by id of
# random loaded resources, create = POST an Observation (`Prefer: return=minimal`). With
# SEPARATE=1, A and B each serve a copy of the loaded directory of their own (for a change of the
# on-disk layout, which the newer binary migrates and the older one then cannot read);
# CONNECTIONS=N changes wrk's 32 connections (fewer: a lighter load, for latency). Prints
# every run and the medians. Build a "before" binary with
# `git worktree add /tmp/before <rev> && cargo build --release --manifest-path /tmp/before/Cargo.toml`.
set -euo pipefail
a=$(realpath "$1"); b=$(realpath "$2")
ROUNDS=${3:-3}; SECS=${4:-8}; PATIENTS=${5:-200}; REQUEST=${6:-search}
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
out=$(mktemp -d /tmp/valv-bench-ab.XXXXXX)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$out"; }
trap cleanup EXIT

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; kernel $(uname -r); $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "command: bench/run-ab.sh $1 $2 $ROUNDS $SECS $PATIENTS $REQUEST"
"$a" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
"$a" --data-dir "$out/data" init >/dev/null
key=$("$a" --data-dir "$out/data" apikey create --name bench --role service --scope 'system/*.cruds system/Patient.cud' | tail -1)
"$a" --data-dir "$out/data" import "$out"/synth/*.json 2>/dev/null | head -1

cat > "$out/list.lua" <<'LUA'
local items, prefix, auth = {}, "", nil
function init(args)
  for line in io.lines(args[1]) do items[#items + 1] = line end
  prefix, auth = args[2], "Bearer " .. args[3]
end
request = function() return wrk.format("GET", prefix .. items[math.random(#items)], {["Authorization"] = auth}) end
if os.getenv("VALV_BENCH_CREATE") then
  request = function()
    local body = '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/' .. items[math.random(#items)] .. '"},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}'
    return wrk.format("POST", prefix, {["Authorization"] = auth, ["Content-Type"] = "application/fhir+json", ["Prefer"] = "return=minimal"}, body)
  end
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout))
end
LUA

serve() { # BINARY: starts it on the data directory; sets $server and $base
  VALV_LOG=warn "$1" --data-dir "$out/data" serve --listen 127.0.0.1:0 > "$out/serve.out" 2> "$out/serve.log" &
  server=$!
  for _ in $(seq 600); do grep -q "Valv serving" "$out/serve.out" 2>/dev/null && break; sleep 0.05; done
  base=$(sed -n 's/^Valv serving HTTPS on \(https:[^ ]*\/fhir\).*/\1/p' "$out/serve.out")
  [ -n "$base" ] || { echo "bench: $1 did not start: $(tail -3 "$out/serve.log")" >&2; exit 1; }
}
stop() { kill "$server"; wait "$server" 2>/dev/null || true; server=""; }

serve "$a"
BASE="$base" TOKEN="$key" OUT="$out" python3 - <<'PY'
import json, os, ssl, urllib.request
base, token, out = os.environ["BASE"], os.environ["TOKEN"], os.environ["OUT"]
ctx = ssl._create_unverified_context()
for t, name in (("Patient", "patients"), ("Observation", "observations")):
    req = urllib.request.Request(f"{base}/{t}?_count=1000", headers={"Authorization": f"Bearer {token}"})
    ids = [e["resource"]["id"] for e in json.load(urllib.request.urlopen(req, context=ctx)).get("entry", [])]
    open(f"{out}/{name}", "w").write("\n".join(ids) + "\n")
PY
stop
case "$REQUEST" in
  search) list=patients; prefix="/fhir/Observation?_count=20&patient=" ;;
  patient) list=patients; prefix="/fhir/Patient/" ;;
  observation) list=observations; prefix="/fhir/Observation/" ;;
  create) list=patients; prefix="/fhir/Observation"; export VALV_BENCH_CREATE=1 ;;
  *) echo "bench: REQUEST is search, patient, observation or create" >&2; exit 1 ;;
esac

declare -A R
for round in $(seq "$ROUNDS"); do
  for which in A B; do
    bin=$a; [ "$which" = B ] && bin=$b
    if [ "${SEPARATE:-0}" = 1 ]; then # the served directory is the one of $which
      [ -f "$out/current" ] || { cp -a "$out/data" "$out/data-B"; echo A > "$out/current"; }
      cur=$(cat "$out/current")
      [ "$cur" = "$which" ] || { mv "$out/data" "$out/data-$cur"; mv "$out/data-$which" "$out/data"; echo "$which" > "$out/current"; }
    fi
    serve "$bin"
    line=$(wrk -t2 -c"${CONNECTIONS:-32}" -d"${SECS}s" --latency -s "$out/list.lua" "$base" -- "$out/$list" "$prefix" "$key" | grep '^RESULT' || echo "RESULT 0 0 0 -1")
    # The server's own view (its latency histogram, without the load generator's scheduling):
    # the share of requests answered within 5, 10 and 25 ms.
    served=$(curl -sk "${base%/fhir}/metrics" | python3 -c '
import sys
b = {}
for l in sys.stdin:
    if l.startswith("valv_http_request_duration_seconds_bucket{route=\"fhir_"):
        le = l.split("le=\"")[1].split("\"")[0]
        b[le] = b.get(le, 0) + int(float(l.split()[-1]))
n = b.get("+Inf", 0)
print("server: <=5 ms %.2f%%, <=10 ms %.2f%%, <=25 ms %.2f%%" % tuple(100 * b.get(k, 0) / max(n, 1) for k in ("0.005", "0.01", "0.025")))' || echo "server: no metrics")
    stop
    read -r _ rps p50 p99 errors <<<"$line"
    R[$which]+="$rps "
    printf 'round %s %s: %8s/s  p50 %6s ms  p99 %7s ms  errors %s  (%s)\n' "$round" "$which" "$rps" "$p50" "$p99" "$errors" "$served"
  done
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ma=$(median "${R[A]}"); mb=$(median "${R[B]}")
echo "medians ($REQUEST): A $ma/s, B $mb/s, B/A $(awk -v a="$ma" -v b="$mb" 'BEGIN { printf "%.2f", (a > 0 ? b / a : 0) }')"
