#!/usr/bin/env bash
# Replication across an emulated WAN (two sites of network namespaces, a userspace link with latency,
# loss and a bandwidth cap) beside a plain TCP copy (nbdcopy into qemu-nbd on the other site) over the
# same link in the same run; see tests/src/bin/wan_bench.rs. Needs root (network namespaces).
#
#   bench/wan.sh                 # SIZE_MIB=256 BURST_MIB=64 MBIT=200
#   SHORT=1 bench/wan.sh         # SETTINGS=50/1 SIZE_MIB=32 BURST_MIB=16, debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SHORT:-}" = 1 ]; then
  export SETTINGS=${SETTINGS:-50/1} SIZE_MIB=${SIZE_MIB:-32} BURST_MIB=${BURST_MIB:-16}
fi
. bench/lib.sh
"$bin/wan_bench" "$PWD/bench/out/wan" | tee bench/out/wan.md
