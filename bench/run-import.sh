#!/usr/bin/env bash
# `valv import` on SQLite and on PostgreSQL (issues "speed" and "postgres").
#
#   bench/run-import.sh [ROUNDS] [PATIENTS]   (defaults: 3 1000)
#
# Two data sets: PATIENTS synthetic patients from `valv synth --seed 1` (small bundles, ~32
# resources each), and the six Synthea bundles of ../shared/testdata/synthea (or
# $VALV_SYNTHEA_DIR) copied ten times (large bundles, ~200 resources each; Synthea's ids are
# urn:uuid references, so each copy makes new resources). Each round imports each set into a
# fresh data directory on SQLite and into a fresh database on a PostgreSQL 15 cluster of its own
# (Debian's binaries, initdb into /tmp, fsync and synchronous_commit on). Every resource is
# validated, decided on, sealed, indexed and audited, as through POST /fhir.
#
# Prints the machine, each import and the medians. Needs PostgreSQL 15 (apt-get install -y
# postgresql-15); stops everything it started.
set -euo pipefail
ROUNDS=${1:-3}
PATIENTS=${2:-1000}
PGBIN=${VALV_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
synthea=${VALV_SYNTHEA_DIR:-$root/../shared/testdata/synthea}
out=$(mktemp -d /tmp/valv-bench-import.XXXXXX)
chmod 755 "$out"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$out/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$out"
}
trap cleanup EXIT
[ -x "$PGBIN/initdb" ] || { echo "bench: PostgreSQL 15 is not installed (apt-get install -y postgresql-15)" >&2; exit 1; }
ls "$synthea"/*.json >/dev/null 2>&1 || { echo "bench: no Synthea bundles in $synthea (set VALV_SYNTHEA_DIR)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown); PostgreSQL: $("$PGBIN/postgres" --version)"
echo "command: bench/run-import.sh $ROUNDS $PATIENTS"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"

mkdir -p "$out/pg" "$out/synthea"
[ "$(id -u)" = 0 ] && chown postgres: "$out/pg"
as_pg "$PGBIN/initdb" -D "$out/pg/data" -A trust -U postgres -E UTF8 --locale=C >/dev/null
pgport=$(free_port)
as_pg "$PGBIN/pg_ctl" -D "$out/pg/data" -l "$out/pg/log" -w start \
  -o "-c listen_addresses=127.0.0.1 -p $pgport -c unix_socket_directories=$out/pg -c shared_buffers=256MB" >/dev/null
as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$pgport" -U postgres -q -c "CREATE ROLE valv_owner LOGIN"

"$valv" synth --patients "$PATIENTS" --out "$out/synth" --seed 1 >/dev/null
for i in $(seq 1 10); do for f in "$synthea"/*.json; do cp "$f" "$out/synthea/$i-$(basename "$f")"; done; done

import() { # backend set
  local data="$out/data-$1-$2"
  rm -rf "$data"
  if [ "$1" = postgres ]; then
    as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$pgport" -U postgres -q -c "DROP DATABASE IF EXISTS valv" -c "CREATE DATABASE valv OWNER valv_owner" 2>/dev/null
    export VALV_STORE=postgres VALV_DATABASE_URL="host=127.0.0.1 port=$pgport user=valv_owner dbname=valv"
  fi
  "$valv" --data-dir "$data" init >/dev/null
  "$valv" --data-dir "$data" import "$out/$2"/*.json 2>/dev/null | head -1
  unset VALV_STORE VALV_DATABASE_URL
  rm -rf "$data"
}

results="$out/results"
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round"
  for set in synth synthea; do
    for backend in sqlite postgres; do
      line=$(import "$backend" "$set")
      rate=$(echo "$line" | sed -E 's/.*\(([0-9]+) resources\/s\).*/\1/')
      printf '%-9s %-8s %s\n' "$backend" "$set" "$line"
      echo "$backend $set $rate" >> "$results"
    done
  done
done
echo "== medians of $ROUNDS rounds (resources/s; target >= 10,000)"
python3 - "$results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for backend in ("sqlite", "postgres"):
    for s in ("synth", "synthea"):
        rates = [int(r[2]) for r in rows if r[0] == backend and r[1] == s]
        print(f"{backend:9} {s:8} {statistics.median(rates):8.0f}/s   rounds: {' '.join(map(str, rates))}")
PY
