#!/usr/bin/env bash
# Every benchmark in its short mode (SHORT=1: small sizes, a debug build), so the scripts keep working.
# CI runs this; its figures mean nothing and nothing is asserted on them. The real runs are the scripts
# themselves without SHORT (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export SHORT=1
mkdir -p bench/out
for b in seal nbd-throughput lag pgbench failover resync points wan portal; do
  echo "== bench/$b.sh (short)"
  start=$(date +%s)
  bash "bench/$b.sh" >"bench/out/short-$b.log" 2>&1 || { tail -40 "bench/out/short-$b.log"; echo "bench/$b.sh failed"; exit 1; }
  tail -4 "bench/out/short-$b.log"
  echo "   ($(($(date +%s) - start)) s)"
done
