#!/usr/bin/env bash
# The detection rules' evaluation harness (issue 15's targets):
#
#   bench/run-detect.sh [SEEDS] [DAYS]   (defaults: 5 30)
#
# For each seed 1..SEEDS, a simulated month of a hospital (crates/valv-detect/src/simulate.rs:
# seven units on their shifts, 4,000 patients, encounters, stays, orders, notes, and the
# legitimate surprises: covering staff, undocumented consultations, quality review, break-glass
# in emergencies) with misuse of each kind injected and labelled, judged by the default rules.
# Prints each seed's table (cases, caught, alerts, true alerts, recall and precision per rule),
# then the medians over the seeds of overall snooping recall and precision and of the rules'
# throughput (entries per second, the facts worked out beforehand: the rules alone, not the
# server's reading and opening of entries).
set -euo pipefail
SEEDS=${1:-5}
DAYS=${2:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); commit $(git rev-parse --short HEAD)"
echo "command: bench/run-detect.sh $SEEDS $DAYS"
cargo build -q --release --locked -p valv-detect --example evaluate
bin=target/release/examples/evaluate
recalls=(); precisions=(); rates=()
for seed in $(seq 1 "$SEEDS"); do
  out=$("$bin" "$seed" "$DAYS")
  echo "$out"
  echo
  recalls+=("$(echo "$out" | awk '/^snooping overall/ {print $7}')")
  precisions+=("$(echo "$out" | awk '/^snooping overall/ {print $8}')")
  rates+=("$(echo "$out" | awk '/^judged in/ {print $5}')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "medians over $SEEDS seeds: snooping recall $(median "${recalls[@]}"), precision $(median "${precisions[@]}"), rules $(median "${rates[@]}") entries/s"
