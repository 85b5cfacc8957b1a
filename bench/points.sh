#!/usr/bin/env bash
# Time from request to a readable disk at the latest point and at a point 12 hours back (simulated
# churn), on sparse 1 GiB and 64 GiB disks, on the real master-target binary; beside a qcow2 overlay
# served by qemu-nbd and a sparse full copy, in the same run. See master-target/benches/points.rs.
#
#   bench/points.sh                       # BATCHES=4320 WRITES=48 SIZES_GIB=1,64
#   BATCHES=500 SIZES_GIB=1 bench/points.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked --release --workspace --bins 2>&1 | tail -1
mkdir -p bench/out
BENCH_DIR="$PWD/bench/out" cargo bench --locked -p master-target --bench points
