#!/usr/bin/env bash
# Failover, commit, reprotect and unplanned failover of one disk of SIZE_MIB random data, timed from the
# API (job start to success, polled every 10 ms), with the bytes the reprotect shipped beside rsync
# --inplace --no-whole-file bringing a copy of the stale original disk up to date in the same run.
# Churn: SIZE_MIB/16 MiB before the failover, half that on the failed-over disk before the commit, and
# SIZE_MIB/16 MiB more through the recovery site's agent before the reprotect.
#
#   bench/failover.sh            # SIZE_MIB=1024
#   SHORT=1 bench/failover.sh    # SIZE_MIB=64, debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SHORT:-}" = 1 ] && export SIZE_MIB=${SIZE_MIB:-64}
. bench/lib.sh
"$bin/failover_bench" "$PWD/bench/out/failover" | tee bench/out/failover.json
