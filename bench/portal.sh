#!/usr/bin/env bash
# The portal's answer times with ITEMS protected items and JOBS jobs in the store: every API call its
# pages make (ROUNDS times, beside /healthz on the same server) and every page in headless Chromium,
# from navigation until its data shows.
#
#   bench/portal.sh                       # ITEMS=1000 JOBS=10000 ROUNDS=30
#   SHORT=1 bench/portal.sh               # ITEMS=100 JOBS=1000 ROUNDS=3, a debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SHORT:-}" = 1 ] && export ITEMS=${ITEMS:-100} JOBS=${JOBS:-1000} ROUNDS=${ROUNDS:-3}
. bench/lib.sh
"$bin/portal_bench" bench/out/portal
