#!/usr/bin/env bash
# Bulk Data $export on this machine (issue "FHIR for real clients": >= 10,000 resources/s
# written):
#
#   bench/run-export.sh [ROUNDS] [PATIENTS]   (defaults: 3 3000)
#
# One SQLite data directory: PATIENTS synthetic patients from `valv synth --seed 1` (~32
# resources each: 3,000 make ~100k resources), loaded with `valv import`, served by the release
# binary. Each round, as a service with every scope (so every resource is decided and exported):
#
#   write     GET /fhir/$export (Prefer: respond-async), then the status URL polled every 20 ms
#             until the manifest: resources in the manifest / wall time from kick-off to
#             manifest (reading, deciding, decrypting, writing the age-sealed files, fsync,
#             and the audit entries per type and patient made durable)
#   download  every file of the manifest, streamed and decrypted: resources / wall time
#
# Prints the machine, every round, then the medians. Needs python3. Stops everything it started.
set -euo pipefail
ROUNDS=${1:-3}
PATIENTS=${2:-3000}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-export.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$out"
}
trap cleanup EXIT

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-export.sh $ROUNDS $PATIENTS"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data="$out/data"
"$valv" --data-dir "$data" init >/dev/null
"$valv" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
"$valv" --data-dir "$data" import "$out/synth"/*.json 2>/dev/null | head -1
key=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope "system/*.cruds" | tail -n1)
"$valv" --data-dir "$data" serve --listen 127.0.0.1:0 > "$out/serve.out" 2> "$out/serve.log" &
pids+=($!)
for _ in $(seq 200); do grep -q "Valv serving" "$out/serve.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/^Valv serving HTTPS on \(https:[^ ]*\/fhir\).*/\1/p' "$out/serve.out")
[ -n "$base" ] || { echo "bench: valv serve did not start: $(cat "$out/serve.log")" >&2; exit 1; }

BASE="$base" KEY="$key" ROUNDS="$ROUNDS" python3 - <<'PY'
import http.client, json, os, ssl, statistics, time, urllib.parse
u = urllib.parse.urlparse(os.environ["BASE"])
ctx = ssl._create_unverified_context()
conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx)
auth = {"Authorization": "Bearer " + os.environ["KEY"]}
def path(url):
    return urllib.parse.urlparse(url)._replace(scheme="", netloc="").geturl()
writes, downloads = [], []
for rnd in range(1, int(os.environ["ROUNDS"]) + 1):
    t0 = time.perf_counter()
    conn.request("GET", u.path + "/$export", headers={**auth, "Prefer": "respond-async", "Accept": "application/fhir+json"})
    r = conn.getresponse(); r.read()
    assert r.status == 202, r.status
    status = path(r.getheader("Content-Location"))
    while True:
        conn.request("GET", status, headers=auth); r = conn.getresponse(); body = r.read()
        if r.status != 202: break
        time.sleep(0.02)
    assert r.status == 200, body[:300]
    t1 = time.perf_counter()
    manifest = json.loads(body)
    n = sum(o["count"] for o in manifest["output"])
    lines = 0
    for o in manifest["output"]:
        conn.request("GET", path(o["url"]), headers={**auth, "Accept": "application/fhir+ndjson"}); r = conn.getresponse()
        data = r.read(); assert r.status == 200, data[:300]
        lines += data.count(b"\n")
    t2 = time.perf_counter()
    assert lines == n, (lines, n)
    conn.request("DELETE", status, headers=auth); conn.getresponse().read()
    writes.append(n / (t1 - t0)); downloads.append(n / (t2 - t1))
    print(f"round {rnd}: {n} resources in {len(manifest['output'])} files; written {n / (t1 - t0):,.0f}/s ({t1 - t0:.2f} s); downloaded {n / (t2 - t1):,.0f}/s ({t2 - t1:.2f} s)")
print(f"== medians of {len(writes)} rounds")
print(f"export written: {statistics.median(writes):,.0f} resources/s (target >= 10,000)")
print(f"export downloaded: {statistics.median(downloads):,.0f} resources/s")
PY
