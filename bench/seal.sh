#!/usr/bin/env bash
# Sealing on one core: the data path's AES-256-GCM seal and open of 4 MiB batches
# (`cargo bench -p sr-common --bench codec`), beside OpenSSL's AES-256-GCM on the same buffer size in
# the same run (`openssl speed -evp aes-256-gcm`), both pinned to core 0; prints MiB/s and the ratio.
#
#   bench/seal.sh            # about 20 s of measuring
#   SHORT=1 bench/seal.sh    # a debug build and a shorter OpenSSL run (CI; its figures mean nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=3
profile=bench
if [ "${SHORT:-}" = 1 ]; then
  seconds=1
  profile=dev
fi
cargo bench --locked --profile "$profile" -p sr-common --bench codec --no-run 2>&1 | tail -1
ours=$(taskset -c 0 cargo bench --locked --profile "$profile" -q -p sr-common --bench codec 2>/dev/null | grep -E '^(seal|open) AES-256-GCM')
echo "$ours"
# openssl speed's last line: "aes-256-gcm  <kilobytes per second>k" for the one block size.
theirs_k=$(taskset -c 0 openssl speed -evp aes-256-gcm -bytes 4194304 -seconds "$seconds" 2>/dev/null | awk '/^(AES-256-GCM|aes-256-gcm)/ {v=$NF} END {sub("k","",v); print v}')
theirs=$(awk -v k="$theirs_k" 'BEGIN {printf "%.0f", k * 1000 / 1048576}')
echo "openssl $(openssl version | cut -d' ' -f2) AES-256-GCM seal, 4 MiB buffers: $theirs MiB/s"
for stage in seal open; do
  v=$(echo "$ours" | awk -v s="$stage" '$1 == s {print $(NF-1)}')
  awk -v a="$v" -v b="$theirs" -v s="$stage" 'BEGIN {printf "%s: %.0f MiB/s, %.2fx openssl\n", s, a, a / b}'
done
