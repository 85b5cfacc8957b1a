#!/usr/bin/env bash
# Runs every test: unit tests, storage conformance suites and the end-to-end tests that start the real
# binaries on loopback and drive them with qemu-io, qemu-img, nbdcopy, nbdinfo and fio.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The Helm chart, alert rules and dashboards (no cluster needed).
scripts/chart-check.sh
# The portal's embedded third-party files are those of their pinned npm packages.
scripts/portal-vendor.sh
# The end-to-end tests start the service binaries from target/debug: build them first.
cargo build --locked --workspace --bins
cargo nextest run --locked --workspace --no-fail-fast "$@"
