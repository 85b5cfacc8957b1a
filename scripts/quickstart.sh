#!/usr/bin/env bash
# Installs what is missing, builds the release binaries, and runs `srctl quickstart` (arguments are
# passed on, for example --size-mib 1024 or --output json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked --release --workspace --bins
exec target/release/srctl quickstart "$@"
