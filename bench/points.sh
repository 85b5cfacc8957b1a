#!/usr/bin/env bash
# Time from request to a readable disk at the latest point and at a point 30 days back (simulated
# churn), on sparse 1 GiB and 64 GiB disks, on the real master-target binary, with its start time and
# memory; beside a qcow2 overlay served by qemu-nbd and a sparse full copy, in the same run. See
# master-target/benches/points.rs.
#
#   bench/points.sh                       # BATCHES=4320 WRITES=48 HOURS=720 SIZES_GIB=1,64
#   BATCHES=500 SIZES_GIB=1 bench/points.sh
#   SHORT=1 bench/points.sh               # BATCHES=50 WRITES=8 SIZES_GIB=1, debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=bench
if [ "${SHORT:-}" = 1 ]; then
  export BATCHES=${BATCHES:-50} WRITES=${WRITES:-8} SIZES_GIB=${SIZES_GIB:-1}
  profile=dev
fi
. bench/lib.sh
BENCH_DIR="$PWD/bench/out" cargo bench --locked --profile "$profile" -p master-target --bench points
