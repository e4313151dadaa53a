#!/usr/bin/env bash
# Resource exhaustion without credentials (issue 10): audited FHIR reads/s of a legitimate
# client (wrk, service key, from 127.0.0.1) alone and under each attack from one other address
# (127.0.0.2, so per-address limits fall on the attacker), with the server's memory.
#
#   bench/run-exhaustion.sh [SECONDS] [READ_CONNECTIONS] [ATTACK_CONNECTIONS] [ROUNDS]   (defaults: 10 32 500 5)
#
# The four runs (unloaded, idle, slow, bigbody) are repeated ROUNDS times, interleaved, and one
# more unloaded run closes the last round; each attack's ratio is taken against the mean of the
# unloaded runs before and after its round, and the medians are printed last (single runs on this
# shared two-core machine vary by ±20%). Each run also prints the server's CPU time per read, the
# attacker's CPU and the machine's idle time: the server's own cost of an attack shows there.
#
# Attacks (a Python asyncio client bound to 127.0.0.2, reconnecting as soon as it is dropped):
#   idle    ATTACK_CONNECTIONS connections held open: half TLS then silence, half HTTP/2 preface +
#           SETTINGS and no stream;
#   slow    ATTACK_CONNECTIONS POSTs to /auth/login (Content-Length 100000, and 4000) sending one
#           byte every 5 s;
#   bigbody 8 parallel POSTs of 28.6 MiB bodies to /auth/login, again and again;
#   flood   32 keep-alive connections sending GET /fhir/Patient without a credential, 16 pipelined
#           at a time, as fast as they are answered (the audit-log flood).
# The attacker runs under SCHED_IDLE (see ATTACKER_SCHED below).
# Targets: reads under attack >= 90% of unloaded; server RSS < 512 MiB.
# Needs: wrk, python3, curl. Everything runs on loopback and stops by itself.
set -euo pipefail
SECONDS_PER_RUN=${1:-10}
ROUNDS=${4:-5}
# The attacker stands for another machine: its own CPU must not be the server's. SCHED_IDLE
# (chrt --idle) runs it only when nothing else wants a core; ATTACKER_SCHED=nice gives the older
# nice 19, under which the Python tool still took ~30% of the CPU in the big-body run (perf).
case "${ATTACKER_SCHED:-idle}" in
  idle) attacker_sched="chrt --idle 0" ;;
  nice) attacker_sched="nice -n 19" ;;
  *) echo "bench: ATTACKER_SCHED is idle or nice" >&2; exit 1 ;;
esac
# PERF_DIR=/some/dir records the server with `perf record -g` during each measured run (perf-MODE-ROUND.data).
# MODES="slow bigbody" runs a subset of the attacks (all four by default).
MODES=${MODES-idle slow bigbody flood}
CONNS=${2:-32}
ATTACK=${3:-500}
THREADS=2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mktemp -d /tmp/valv-bench-exh.XXXXXX)
# (Never `kill 0`: that is this script's own process group.)
trap 'for p in ${attack_pid:-} ${server_pid:-}; do kill "$p" 2>/dev/null || true; done; rm -rf "$out"' EXIT

command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install -y wrk)" >&2; exit 1; }
python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.2", 0))' 2>/dev/null || { echo "bench: cannot bind 127.0.0.2 (the attacker's address)" >&2; exit 1; }
echo "== machine"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB; kernel $(uname -r)"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-exhaustion.sh $SECONDS_PER_RUN $CONNS $ATTACK (reads: wrk -t$THREADS -c$CONNS -d${SECONDS_PER_RUN}s from 127.0.0.1; attacker from 127.0.0.2; same cores)"

(cd "$root" && cargo build --release --locked -q)
valv="$root/target/release/valv"
data="$out/valv-data"
"$valv" --data-dir "$data" init >/dev/null
svc_key=$("$valv" --data-dir "$data" apikey create --name bench --role service --scope 'system/*.cruds' | tail -1)
"$valv" synth --patients 50 --out "$out/synth" --seed 1 >/dev/null
"$valv" --data-dir "$data" import "$out"/synth/*.json >/dev/null 2>&1

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
VALV_LOG=warn "$valv" --data-dir "$data" serve --listen "127.0.0.1:$port" >/dev/null 2>"$out/server.log" &
server_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
base="https://127.0.0.1:$port"
curl -sk -H "Authorization: Bearer $svc_key" "$base/fhir/Observation?_count=1000" \
  | python3 -c 'import json,sys; [print(e["resource"]["id"]) for e in json.load(sys.stdin).get("entry",[])]' > "$out/obs-ids"
[ -s "$out/obs-ids" ] || { echo "bench: the service key read no data" >&2; exit 1; }

cat > "$out/read.lua" <<LUA
local items = {}
function init(args) for line in io.lines(args[1]) do items[#items + 1] = line end end
request = function()
  return wrk.format("GET", "/fhir/Observation/" .. items[math.random(#items)], {["Authorization"] = "Bearer $svc_key"})
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA

cat > "$out/attack.py" <<'PY'
"""One attacker address (127.0.0.2), one attack, for a fixed time; prints what it managed."""
import asyncio, ssl, sys, time
mode, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
stats = {"connects": 0, "refused": 0, "closed_by_server": 0, "bytes_sent": 0, "answers": {}}
end = time.monotonic() + seconds

CONTEXTS = {}
def tls(alpn):
    # One context per ALPN list: building one loads the system's CA bundle (tens of ms).
    key = tuple(alpn or ())
    if key not in CONTEXTS:
        c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
        if alpn: c.set_alpn_protocols(alpn)
        CONTEXTS[key] = c
    return CONTEXTS[key]

async def open_conn(alpn):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=tls(alpn), local_addr=("127.0.0.2", 0), server_hostname="localhost"), 10)
        stats["connects"] += 1
        return r, w
    except Exception:
        stats["refused"] += 1
        await asyncio.sleep(0.01)
        return None

async def wait_closed(r, w, until):
    try:
        while time.monotonic() < until:
            data = await asyncio.wait_for(r.read(65536), max(0.01, until - time.monotonic()))
            if not data:
                stats["closed_by_server"] += 1
                break
            if data.startswith(b"HTTP/1.1 "):
                code = data[9:12].decode(errors="replace"); stats["answers"][code] = stats["answers"].get(code, 0) + 1
    except asyncio.TimeoutError:
        pass
    except Exception:
        stats["closed_by_server"] += 1
    w.transport.abort()

async def idle(i):
    h2 = i % 2 == 1
    while time.monotonic() < end:
        c = await open_conn(["h2"] if h2 else None)
        if not c: continue
        r, w = c
        if h2:
            w.write(PREFACE)
        await wait_closed(r, w, end)

async def slow(i):
    length = 100000 if i % 2 == 0 else 4000
    while time.monotonic() < end:
        c = await open_conn(["http/1.1"])
        if not c: continue
        r, w = c
        w.write(f"POST /auth/login HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n".encode())
        async def trickle():
            try:
                while time.monotonic() < end:
                    w.write(b" "); stats["bytes_sent"] += 1
                    await asyncio.sleep(5)
            except Exception:
                pass
        t = asyncio.ensure_future(trickle())
        await wait_closed(r, w, end)
        t.cancel()

async def bigbody(i):
    block = b" " * 65536
    size = 30_000_000
    while time.monotonic() < end:
        c = await open_conn(["http/1.1"])
        if not c: continue
        r, w = c
        w.write(f"POST /auth/login HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n".encode())
        reader = asyncio.ensure_future(wait_closed(r, w, end))
        try:
            for _ in range(size // len(block)):
                if reader.done() or w.is_closing() or time.monotonic() > end: break
                w.write(block)
                await w.drain()
                # drain() returns at once while the buffer is below its mark, without running the
                # loop's callbacks: yield, so a connection the server has closed is seen as closed
                # (otherwise the tool would go on encrypting the whole body into a dead transport
                # and count it as sent).
                await asyncio.sleep(0)
                if not w.is_closing(): stats["bytes_sent"] += len(block)
        except Exception:
            pass
        await reader

async def flood(i):
    # Unauthenticated reads as fast as the server answers them: keep-alive, 16 pipelined at a time.
    batch = b"GET /fhir/Patient HTTP/1.1\r\nhost: localhost\r\n\r\n" * 16
    while time.monotonic() < end:
        c = await open_conn(["http/1.1"])
        if not c: continue
        r, w = c
        try:
            while time.monotonic() < end:
                w.write(batch)
                got = 0
                while got < 16:
                    line = await asyncio.wait_for(r.readline(), max(0.01, end - time.monotonic()))
                    if not line: raise ConnectionResetError
                    if line.startswith(b"HTTP/1.1 "):
                        code = line[9:12].decode(errors="replace"); stats["answers"][code] = stats["answers"].get(code, 0) + 1
                        got += 1
                    elif line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    elif line == b"\r\n":
                        await r.readexactly(length)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            stats["closed_by_server"] += 1
        w.transport.abort()

async def main():
    attack = {"idle": idle, "slow": slow, "bigbody": bigbody, "flood": flood}[mode]
    await asyncio.gather(*(attack(i) for i in range(n)), return_exceptions=True)
    print(f"attack {mode}: {stats['connects']} connections made, {stats['refused']} refused or failed, {stats['closed_by_server']} closed by the server, "
          f"{stats['bytes_sent']} body bytes sent, answers {dict(sorted(stats['answers'].items()))}")

import logging
logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "socket.send() raised exception" once the server has closed
asyncio.run(main())
PY

rss() { awk '/^VmRSS/{printf "%.0f", $2/1024}' "/proc/$server_pid/status"; }
hwm() { awk '/^VmHWM/{printf "%.0f", $2/1024}' "/proc/$server_pid/status"; }
metric() { curl -sk "$base/metrics" | awk -v m="$1" '$1==m{print $2}'; }
# CPU time of a process in clock ticks (utime + stime), and the machine's idle ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
idle_ticks() { awk '/^cpu /{print $5}' /proc/stat; }
baseline=0
run() {
  local name=$1 mode=$2 n=$3 line peak=0 r
  attack_pid=
  if [ "$mode" != none ]; then
    # Ramp-up, the measured run, and a margin: the attacker stops by itself after that.
    $attacker_sched python3 "$out/attack.py" "$mode" "$port" "$n" "$((SECONDS_PER_RUN + 5))" > "$out/attack-$mode.log" 2>&1 &
    attack_pid=$!
    sleep 3
  fi
  ( while kill -0 "$server_pid" 2>/dev/null; do rss; echo; sleep 0.5; done ) > "$out/rss-$mode.log" &
  local sampler=$!
  local perf_pid=
  if [ -n "${PERF_DIR:-}" ]; then
    perf record -F 499 -g -p "$server_pid" -o "$PERF_DIR/perf-$mode-$round.data" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  local s0 a0 i0 t0
  s0=$(ticks "$server_pid"); a0=$(ticks "${attack_pid:-0}"); i0=$(idle_ticks); t0=$(date +%s.%N)
  line=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECONDS_PER_RUN}s" --latency -s "$out/read.lua" "$base" -- "$out/obs-ids" | grep '^RESULT')
  local cpu
  cpu=$(python3 -c "import sys; s, a, i, t, r = map(float, sys.argv[1:]); hz = 100.0
print(f'server CPU {1e6 * s / hz / max(1.0, r * t):.0f} us/read, attacker {100 * a / hz / t:.0f}% of a core, machine idle {100 * i / hz / t / $(nproc):.0f}%')" \
    "$(( $(ticks "$server_pid") - s0 ))" "$(( $(ticks "${attack_pid:-0}") - a0 ))" "$(( $(idle_ticks) - i0 ))" \
    "$(python3 -c "import time; print(time.time() - $t0)")" "$(echo "$line" | awk '{print $2}')")
  kill "$sampler" 2>/dev/null || true
  [ -n "$perf_pid" ] && wait "$perf_pid"
  peak=$(sort -n "$out/rss-$mode.log" | tail -1)
  read -r _ r p50 p99 errors <<<"$line"
  [ "$mode" = none ] && baseline=$r
  echo "$round $mode $r" >> "$out/results"
  printf '%-40s %7s reads/s (%5.1f%%)  p50 %6s ms  p99 %7s ms  errors %s  server RSS peak %s MiB, open connections %s\n' \
    "$name" "$r" "$(python3 -c "print(100*$r/max(1,$baseline))")" "$p50" "$p99" "$errors" "$peak" "$(metric valv_connections_open)"
  echo "    $cpu"
  if [ "$mode" != none ]; then
    wait "$attack_pid" 2>/dev/null || true
    echo "    $(cat "$out/attack-$mode.log")"
    # The next run starts on a server the attack has left: its connections (slow bodies wait for
    # their timeout, refused ones sit in the tarpit) are gone before it is measured again.
    for _ in $(seq 120); do [ "$(metric valv_connections_open)" -le 1 ] 2>/dev/null && break; sleep 0.5; done
    sleep 2
  fi
}

echo "== reads of Observation by id (audited), legitimate client from 127.0.0.1"
for round in $(seq "$ROUNDS"); do
  echo "-- round $round of $ROUNDS"
  run "unloaded" none 0
  for mode in $MODES; do
    case $mode in
      idle) run "idle connections ($ATTACK, TLS and HTTP/2)" idle "$ATTACK" ;;
      slow) run "slow bodies ($ATTACK, 1 byte / 5 s)" slow "$ATTACK" ;;
      bigbody) run "big bodies (8 x 28.6 MiB, repeated)" bigbody 8 ;;
      flood) run "unauthenticated GETs (32 connections)" flood 32 ;;
      *) echo "bench: MODES holds idle, slow, bigbody, flood" >&2; exit 1 ;;
    esac
  done
done
# A last unloaded run closes the sandwich: each attack is compared with the mean of the unloaded
# runs before and after its round, so a drift of the machine over the round does not count.
round=$((ROUNDS + 1))
echo "-- closing unloaded run"
run "unloaded" none 0
echo "== medians over $ROUNDS rounds (ratio: against the mean of the unloaded runs that open and close the round)"
python3 - "$out/results" <<'PY'
import statistics, sys
rows = [(int(k), m, float(r)) for k, m, r in (l.split() for l in open(sys.argv[1]))]
unloaded = {k: r for k, m, r in rows if m == "none"}
for mode in ["none", "idle", "slow", "bigbody", "flood"]:
    runs = [(k, r) for k, m, r in rows if m == mode and (mode != "none" or k in unloaded and k + 1 in unloaded)]
    if not runs: continue
    ratios = [r / ((unloaded[k] + unloaded[k + 1]) / 2) for k, r in runs]
    print(f"{mode:8} median {statistics.median(r for _, r in runs):8.0f} reads/s   median ratio {100 * statistics.median(ratios):5.1f}%   (ratios: {', '.join(f'{100 * x:.0f}%' for x in ratios)})")
PY
echo "== server after the attacks"
for m in valv_connections_refused_total valv_connections_idle_closed_total valv_tls_handshake_failures_total valv_request_bodies_timed_out_total valv_request_bodies_too_large_total valv_auth_rate_limited_total valv_unauthenticated_rate_limited_total valv_accept_errors_total; do
  printf '%-44s %s\n' "$m" "$(metric "$m")"
done
echo "server RSS now $(rss) MiB, peak over the whole run (VmHWM) $(hwm) MiB"
