#!/usr/bin/env bash
# KEK rotation benchmark (issue "lifecycle": at least 20,000 data keys rewrapped per second with
# the local provider; PKCS#11 measured): data keys moved under a new KEK version per second, the
# way the server's background rewrap and `valv keys rotate --wait` do it — first with a key file,
# then (when SoftHSM2 is installed) with a SoftHSM2 token made for the run, then (when moto_server
# is installed) with AWS KMS as moto emulates it.
#
#   bench/run-keys.sh [KEYS] [ROUNDS] [TOKEN_KEYS] [KMS_KEYS]   (defaults: 100000 3 20000 2000)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
keys=${1:-100000}; rounds=${2:-3}; token_keys=${3:-20000}
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc) cores; memory: $(free -g | awk '/Mem:/{print $2}') GiB"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "command: bench/run-keys.sh $keys $rounds $token_keys ${4:-2000}"
(cd "$root" && cargo build --release --locked -q -p valv-store --example rewrap_bench)
bin="$root/target/release/examples/rewrap_bench"
echo "== key file"
VALV_KEY_PROVIDER=file "$bin" "$keys" "$rounds"
module=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so 2>/dev/null | head -1 || true)
if [ -z "$module" ] || ! command -v softhsm2-util >/dev/null; then
  echo "== PKCS#11: SoftHSM2 is not installed (apt-get install -y softhsm2); skipped"
  exit 0
fi
tmp=$(mktemp -d /tmp/valv-bench-keys.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$tmp/tokens" > "$tmp/softhsm2.conf"
export SOFTHSM2_CONF="$tmp/softhsm2.conf"
softhsm2-util --init-token --free --label valv-bench --pin 246813 --so-pin 135792 >/dev/null
echo 246813 > "$tmp/pin"; chmod 600 "$tmp/pin"
echo "== PKCS#11 (SoftHSM2 $(dpkg-query -W -f '${Version}' softhsm2 2>/dev/null || echo '?'), token in a temporary directory)"
VALV_KEY_PROVIDER="pkcs11:token=valv-bench;object=valv-kek?module-path=$module&pin-source=file:$tmp/pin" "$bin" "$token_keys" "$rounds"
if ! command -v moto_server >/dev/null; then
  echo "== AWS KMS: moto_server is not installed (pip install \"moto[server]\"); skipped"
  exit 0
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
echo "== AWS KMS (moto $(pip show moto 2>/dev/null | awk '/^Version/{print $2}') on loopback, an emulator: no network round trip, no real KMS)"
AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench VALV_KEY_PROVIDER="aws-kms:alias/valv-bench?region=eu-north-1&endpoint=http://127.0.0.1:$port" "$bin" "${4:-2000}" "$rounds"
