#!/usr/bin/env bash
# Valv on PostgreSQL against Valv on SQLite, on this machine (issue "postgres").
#
#   bench/run-postgres.sh [PATIENTS] [SECONDS] [CONNECTIONS] [ROUNDS]   (defaults: 200 10 32 3)
#
# Starts a PostgreSQL 15 cluster of its own (Debian's binaries, initdb into /tmp, a free loopback
# port, fsync and synchronous_commit on — the defaults — shared_buffers 256MB), initialises one
# data directory on SQLite and one on PostgreSQL, imports the same synthetic patients into each
# (timed), serves both — and a second server on the PostgreSQL database — and drives them with wrk
# in interleaved rounds:
#
#   read     GET /fhir/Observation/{id} over 1,000 ids, audited (SQLite, PostgreSQL)
#   search   GET /fhir/Patient?identifier=urn:valv:synthetic:mrn|… over every patient: a
#            blind-index lookup (SQLite's token B-tree, PostgreSQL's GIN index), decrypt,
#            re-check, audit, Bundle (SQLite, PostgreSQL)
#   create   POST /fhir/Observation, Prefer: return=minimal (SQLite, PostgreSQL)
#   two      reads from two wrk processes (1 thread, CONNECTIONS/2 each): both against one
#            PostgreSQL server, then one against each of two servers on the same database
#
# Each round starts from a settled database (CHECKPOINT, no autovacuum running): reads first,
# creates last.
#
# Prints the machine, every round, then the medians and the ratios the issue asks for.
# Needs: wrk, PostgreSQL 15 (apt-get install -y wrk postgresql-15). Stops everything it started.
set -euo pipefail
PATIENTS=${1:-200}
SECONDS_PER_RUN=${2:-10}
CONNS=${3:-32}
ROUNDS=${4:-3}
PGBIN=${VALV_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-pg.XXXXXX)
chmod 755 "$out"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  as_pg "$PGBIN/pg_ctl" -D "$out/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$out"
}
trap cleanup EXIT
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
[ -x "$PGBIN/initdb" ] || { echo "bench: PostgreSQL 15 is not installed (apt-get install -y postgresql-15)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown); PostgreSQL: $("$PGBIN/postgres" --version)"
echo "command: bench/run-postgres.sh $PATIENTS $SECONDS_PER_RUN $CONNS $ROUNDS"
echo "load generator: wrk, $CONNS connections, ${SECONDS_PER_RUN}s per run, on the same $(nproc) cores as the servers and PostgreSQL"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"

mkdir -p "$out/pg"
[ "$(id -u)" = 0 ] && chown postgres: "$out/pg"
as_pg "$PGBIN/initdb" -D "$out/pg/data" -A trust -U postgres -E UTF8 --locale=C >/dev/null
pgport=$(free_port)
as_pg "$PGBIN/pg_ctl" -D "$out/pg/data" -l "$out/pg/log" -w start \
  -o "-c listen_addresses=127.0.0.1 -p $pgport -c unix_socket_directories=$out/pg -c shared_buffers=256MB -c max_connections=100" >/dev/null
as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$pgport" -U postgres -q -c "CREATE ROLE valv_owner LOGIN" -c "CREATE DATABASE valv OWNER valv_owner"
pgurl="host=127.0.0.1 port=$pgport user=valv_owner dbname=valv"

"$valv" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
svc_scopes='system/*.cruds system/CareTeam.cud system/Consent.cud system/Patient.cud system/Organization.cud'
declare -A KEY PORT
echo "== import ($PATIENTS synthetic patients, valv import)"
for backend in sqlite postgres; do
  data="$out/$backend"
  if [ "$backend" = postgres ]; then export VALV_STORE=postgres VALV_DATABASE_URL="$pgurl"; fi
  "$valv" --data-dir "$data" init >/dev/null
  KEY[$backend]=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope "$svc_scopes" | tail -1)
  printf '%-9s %s\n' "$backend" "$("$valv" --data-dir "$data" import "$out"/synth/*.json 2>/dev/null | head -1)"
  unset VALV_STORE VALV_DATABASE_URL
done
cp -r "$out/postgres" "$out/postgres2"

serve() { # name data-dir
  local port; port=$(free_port)
  VALV_LOG=warn VALV_LIMITS_NEW_CONNECTIONS_PER_MINUTE=6000000 VALV_LIMITS_NEW_CONNECTIONS_BURST=100000 \
    "$valv" --data-dir "$2" serve --listen "127.0.0.1:$port" >/dev/null 2>"$out/$1.log" &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  PORT[$1]=$port
}
serve sqlite "$out/sqlite"; serve postgres "$out/postgres"; serve postgres2 "$out/postgres2"
KEY[postgres2]=${KEY[postgres]}

fetch() { curl -sk -H "Authorization: Bearer ${KEY[$1]}" "https://127.0.0.1:${PORT[$1]}$2"; }
for backend in sqlite postgres; do
  fetch "$backend" "/fhir/Observation?_count=1000" | python3 -c 'import json,sys; [print(e["resource"]["id"]) for e in json.load(sys.stdin).get("entry",[])]' > "$out/$backend.ids"
  [ -s "$out/$backend.ids" ] || { echo "bench: no observations on $backend: $(fetch "$backend" "/fhir/Observation?_count=1" | head -c 300)" >&2; exit 1; }
  fetch "$backend" "/fhir/Patient?_count=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])' > "$out/$backend.patient"
  fetch "$backend" "/fhir/Patient?_count=1000" | python3 -c '
import json,sys
for e in json.load(sys.stdin).get("entry",[]):
    for i in e["resource"].get("identifier",[]):
        if i.get("system")=="urn:valv:synthetic:mrn": print(i["system"]+"|"+i["value"])
' > "$out/$backend.mrns"
  [ -s "$out/$backend.mrns" ] || { echo "bench: no patient identifiers on $backend" >&2; exit 1; }
done
cp "$out/postgres.ids" "$out/postgres2.ids"
observation() { echo '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/'"$(cat "$out/$1.patient")"'"},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}'; }
for backend in sqlite postgres; do
  status=$(curl -sk -o "$out/preflight" -w '%{http_code}' -H "Authorization: Bearer ${KEY[$backend]}" -H 'Content-Type: application/fhir+json' -d "$(observation "$backend")" "https://127.0.0.1:${PORT[$backend]}/fhir/Observation")
  [ "$status" = 201 ] || { echo "bench: a create on $backend answered $status: $(head -c 300 "$out/preflight")" >&2; exit 1; }
done

report='done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end'
# The first answer other than 2xx of each script is kept, to be shown after the runs.
failure() {
  cat <<LUA
local told = false
response = function(status, headers, body)
  if status >= 300 and not told then
    told = true
    local f = io.open("$out/$1.failure", "a"); f:write(status, " ", body, "\\n"); f:close()
  end
end
LUA
}
for backend in sqlite postgres postgres2; do
  cat > "$out/$backend-read.lua" <<LUA
local items = {}
function init(args) for line in io.lines(args[1]) do items[#items + 1] = line end end
request = function()
  return wrk.format("GET", "/fhir/Observation/" .. items[math.random(#items)], {["Authorization"] = "Bearer ${KEY[$backend]}"})
end
$(failure "$backend-read")
$report
LUA
done
for backend in sqlite postgres; do
  cat > "$out/$backend-search.lua" <<LUA
local items = {}
function init(args) for line in io.lines(args[1]) do items[#items + 1] = line end end
request = function()
  return wrk.format("GET", "/fhir/Patient?identifier=" .. items[math.random(#items)], {["Authorization"] = "Bearer ${KEY[$backend]}"})
end
$(failure "$backend-search")
$report
LUA
  cat > "$out/$backend-create.lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer ${KEY[$backend]}"
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.headers["Prefer"] = "return=minimal"
wrk.body = '$(observation "$backend")'
$(failure "$backend-create")
$report
LUA
done

results="$out/results"
: > "$results"
wrk_on() { # target path threads conns script [args…]
  local target=$1 path=$2 threads=$3 conns=$4 script=$5; shift 5
  wrk -t"$threads" -c"$conns" -d"${SECONDS_PER_RUN}s" --latency -s "$script" "https://127.0.0.1:${PORT[$target]}$path" "$@" | grep '^RESULT'
}
record() { # scenario line
  read -r _ rps p50 p99 errors <<<"$2"
  printf '%-34s %8s req/s   p50 %7s ms   p99 %7s ms   errors %s\n' "$1" "$rps" "$p50" "$p99" "$errors"
  echo "$1 $rps $p50 $p99 $errors" >> "$results"
}
# The creates of a round leave PostgreSQL work behind (a checkpoint, autovacuum of the grown
# tables) that would land in the next round's reads: each round starts after a CHECKPOINT and
# once no autovacuum worker runs (at most 120 s), so every read run starts from the same state.
settle() {
  as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$pgport" -U postgres -q -c CHECKPOINT
  for _ in $(seq 120); do
    busy=$(as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$pgport" -U postgres -Atc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
    [ "$busy" = 0 ] && break
    sleep 1
  done
  sleep 2
}
sum_of_two() { awk '{r+=$2; if ($3>p50) p50=$3; if ($4>p99) p99=$4; e+=$5} END {print "RESULT", r, p50, p99, e}'; }
half=$((CONNS / 2))
for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  settle
  for backend in sqlite postgres; do
    record "read/$backend" "$(wrk_on "$backend" / 2 "$CONNS" "$out/$backend-read.lua" -- "$out/$backend.ids")"
  done
  a=$(wrk_on postgres / 1 "$half" "$out/postgres-read.lua" -- "$out/postgres.ids" & wrk_on postgres / 1 "$half" "$out/postgres-read.lua" -- "$out/postgres.ids"; wait)
  record "read/postgres-one-server-2wrk" "$(echo "$a" | sum_of_two)"
  b=$(wrk_on postgres / 1 "$half" "$out/postgres-read.lua" -- "$out/postgres.ids" & wrk_on postgres2 / 1 "$half" "$out/postgres2-read.lua" -- "$out/postgres2.ids"; wait)
  record "read/postgres-two-servers" "$(echo "$b" | sum_of_two)"
  for backend in sqlite postgres; do
    record "search/$backend" "$(wrk_on "$backend" / 2 "$CONNS" "$out/$backend-search.lua" -- "$out/$backend.mrns")"
  done
  for backend in sqlite postgres; do
    record "create/$backend" "$(wrk_on "$backend" /fhir/Observation 2 "$CONNS" "$out/$backend-create.lua")"
  done
done

for f in "$out"/*.failure; do [ -e "$f" ] && echo "first failure of $(basename "$f" .failure): $(head -c 300 "$f")"; done
echo "== medians of $ROUNDS rounds (p50/p99: the worse of the two wrk processes where two ran)"
python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99, errors = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99), int(errors)))
med = {}
for name, runs in rows.items():
    m = [statistics.median(r[i] for r in runs) for i in range(3)]
    med[name] = m[0]
    print(f"{name:34s} {m[0]:8.0f} req/s   p50 {m[1]:7.2f} ms   p99 {m[2]:7.2f} ms   errors {sum(r[3] for r in runs)}")
print(f"reads on PostgreSQL: {100 * med['read/postgres'] / med['read/sqlite']:.0f}% of SQLite (target >= 70%)")
print(f"searches by identifier on PostgreSQL: {100 * med['search/postgres'] / med['search/sqlite']:.0f}% of SQLite")
print(f"creates on PostgreSQL: {med['create/postgres']:.0f}/s (target >= 3,000/s); {100 * med['create/postgres'] / med['create/sqlite']:.0f}% of SQLite")
print(f"two servers on one database: {med['read/postgres-two-servers'] / med['read/postgres-one-server-2wrk']:.2f}x one server under the same load (target >= 1)")
PY
