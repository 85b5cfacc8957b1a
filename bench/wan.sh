#!/usr/bin/env bash
# Replication across an emulated WAN (two sites of network namespaces, a userspace link with latency,
# loss and a bandwidth cap) beside a plain TCP copy (nbdcopy into qemu-nbd on the other site) over the
# same link in the same run; see tests/src/bin/wan_bench.rs. Needs root (network namespaces).
#
#   bench/wan.sh                                   # SIZE_MIB=256 BURST_MIB=64 MBIT=200
#   SETTINGS=50/1 SIZE_MIB=32 BURST_MIB=16 bench/wan.sh   # short mode (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked --release --workspace --bins 2>&1 | tail -1
mkdir -p bench/out
target/release/wan_bench "$PWD/bench/out/wan" | tee bench/out/wan.md
