#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 60) each. Needs cargo-fuzz and a nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
for t in wire_frame batch_payload nbd_client journal_segment undo_segment cache_record; do
  echo "fuzz: $t for ${SECONDS_EACH}s"
  cargo +nightly fuzz run "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096
done
