#!/usr/bin/env bash
# Medical files over HTTPS on this machine (issue 13's targets):
#
#   bench/run-files.sh [ROUNDS] [SIZE_MB] [RANGE_FILE_MB]   (defaults: 3 1024 2048)
#
# One SQLite data directory, local file store, no scanner, the release binary; curl (HTTP/1.1,
# TLS 1.3, one connection per transfer) on the same two cores. Each round:
#
#   upload     POST /fhir/Binary, a SIZE_MB file of random bytes: MB/s (curl's average)
#   download   GET it back raw: MB/s; the bytes' SHA-256 checked against the upload's
#   RSS        the server's resident memory sampled every 20 ms during the upload and the
#              download: growth over the idle server before (MiB)
# Then once: a RANGE_FILE_MB file, and 20 reads of 1 MiB at random offsets inside it (Range):
# median and p95 latency; and 100 downloads of a 10 MB file at once: errors, wall time, RSS
# growth. Prints the machine, every round, then the medians. Stops everything it started.
set -euo pipefail
ROUNDS=${1:-3}
SIZE_MB=${2:-1024}
RANGE_MB=${3:-2048}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-files.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  cp "$out/serve.log" /tmp/valv-bench-files-serve.log 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT

echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-files.sh $ROUNDS $SIZE_MB $RANGE_MB"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data="$out/data"
"$valv" --data-dir "$data" init >/dev/null
key=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope "system/*.cruds system/Patient.cud" | tail -n1)
# One client address opens 100 connections at once below: the per-address caps are raised
# for it (a real deployment sees many addresses).
VALV_FILES_MAX_BYTES=$(( (SIZE_MB > RANGE_MB ? SIZE_MB : RANGE_MB) * 1048576 + 1 )) \
VALV_LIMITS_MAX_CONNECTIONS_PER_ADDRESS=256 VALV_LIMITS_NEW_CONNECTIONS_PER_MINUTE=6000000 VALV_LIMITS_NEW_CONNECTIONS_BURST=100000 \
  "$valv" --data-dir "$data" serve --listen 127.0.0.1:0 > "$out/serve.out" 2> "$out/serve.log" &
server=$!
pids+=($server)
for _ in $(seq 200); do grep -q "Valv serving" "$out/serve.out" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/^Valv serving HTTPS on \(https:[^ ]*\/fhir\).*/\1/p' "$out/serve.out")
[ -n "$base" ] || { echo "bench: valv serve did not start: $(cat "$out/serve.log")" >&2; exit 1; }
cacert="$data/tls/cert.pem"
auth="Authorization: Bearer $key"
patient=$(curl -sS --cacert "$cacert" -H "$auth" -H 'Content-Type: application/fhir+json' \
  -d '{"resourceType":"Patient","name":[{"family":"Bench"}]}' "$base/Patient" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$server/status"; }
# Samples the server's RSS every 20 ms into $1 until $2 exists.
sample() { while [ ! -e "$2" ]; do rss_kib >> "$1"; sleep 0.02; done; }
peak_growth() { sort -n "$1" | tail -1 | awk -v idle="$2" '{printf "%.1f", ($1 - idle) / 1024}'; }

upload() { # file content-type -> id, prints "MB/s" to fd 3
  curl -sS --cacert "$cacert" -H "$auth" -H "Content-Type: $2" -H "X-Security-Context: Patient/$patient" \
    -X POST -T "$1" -o "$out/up.json" -w '%{speed_upload}\n' "$base/Binary" >&3
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("id") or sys.exit("bench: upload refused: " + json.dumps(d)))' "$out/up.json"
}

head -c $((SIZE_MB * 1048576)) /dev/urandom > "$out/file"
want=$(sha256sum "$out/file" | cut -d' ' -f1)
ups=(); downs=(); up_rss=(); down_rss=()
for r in $(seq "$ROUNDS"); do
  idle=$(rss_kib)
  rm -f "$out/done"; : > "$out/rss.up"; sample "$out/rss.up" "$out/done" & sp=$!
  id=$(upload "$out/file" application/octet-stream 3>"$out/speed.up")
  touch "$out/done"; wait $sp
  : > "$out/rss.down"; rm -f "$out/done"; sample "$out/rss.down" "$out/done" & sp=$!
  speed_down=$(curl -sS --cacert "$cacert" -H "$auth" -H 'Accept: application/octet-stream' -o "$out/back" -w '%{speed_download}' "$base/Binary/$id")
  touch "$out/done"; wait $sp
  got=$(sha256sum "$out/back" | cut -d' ' -f1); rm -f "$out/back"
  [ "$got" = "$want" ] || { echo "bench: round $r: the download differs from the upload" >&2; exit 1; }
  up=$(awk '{printf "%.0f", $1 / 1048576}' "$out/speed.up"); down=$(awk -v s="$speed_down" 'BEGIN{printf "%.0f", s / 1048576}')
  ur=$(peak_growth "$out/rss.up" "$idle"); dr=$(peak_growth "$out/rss.down" "$idle")
  echo "round $r: upload $up MB/s (RSS +$ur MiB), download $down MB/s (RSS +$dr MiB), sha256 ok"
  ups+=("$up"); downs+=("$down"); up_rss+=("$ur"); down_rss+=("$dr")
  # Keep the disk: the object is left (a Binary cannot be deleted with its object), the data dir goes at the end.
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
echo "== ${SIZE_MB} MiB file, medians of $ROUNDS rounds"
echo "upload: $(median "${ups[@]}") MB/s (target >= 300), RSS growth $(median "${up_rss[@]}") MiB (target <= 64)"
echo "download: $(median "${downs[@]}") MB/s (target >= 300), RSS growth $(median "${down_rss[@]}") MiB (target <= 64)"
rm -f "$out/file"

head -c $((RANGE_MB * 1048576)) /dev/urandom > "$out/big"
big=$(upload "$out/big" application/dicom 3>/dev/null)
times=()
for i in $(seq 20); do
  start=$(( (RANDOM * 32768 + RANDOM) % ((RANGE_MB - 1) * 1048576) ))
  t=$(curl -sS --cacert "$cacert" -H "$auth" -H 'Accept: application/dicom' -r "$start-$((start + 1048575))" -o "$out/part" -w '%{http_code} %{time_total}' "$base/Binary/$big")
  [ "${t%% *}" = 206 ] || { echo "bench: range read answered ${t%% *}" >&2; exit 1; }
  cmp -s "$out/part" <(tail -c +$((start + 1)) "$out/big" | head -c 1048576) || { echo "bench: a range read differs" >&2; exit 1; }
  times+=("$(awk -v s="${t#* }" 'BEGIN{printf "%.2f", s * 1000}')")
done
rm -f "$out/big" "$out/part"
p95=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int(NR*0.95)]}')
echo "== 1 MiB ranges of a ${RANGE_MB} MiB file, 20 reads at random offsets (one TLS connection each, handshake included)"
echo "range: median $(median "${times[@]}") ms, p95 $p95 ms (target <= 20)"

head -c $((10 * 1048576)) /dev/urandom > "$out/ten"
ten=$(upload "$out/ten" application/octet-stream 3>/dev/null)
idle=$(rss_kib); : > "$out/rss.par"; rm -f "$out/done"; sample "$out/rss.par" "$out/done" & sp=$!
t0=$(date +%s.%N)
codes=$(seq 100 | xargs -P 100 -I{} curl -sS --cacert "$cacert" -H "$auth" -H 'Accept: application/octet-stream' -o /dev/null -w '%{http_code} %{size_download}\n' "$base/Binary/$ten" 2>/dev/null | sort | uniq -c || true)
t1=$(date +%s.%N)
touch "$out/done"; wait $sp
echo "== 100 parallel downloads of a 10 MiB file"
echo "answers (count, status, bytes): $(echo "$codes" | xargs)"
echo "wall: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b - a}') s; RSS growth $(peak_growth "$out/rss.par" "$idle") MiB"
