#!/usr/bin/env bash
# A protected disk in steady state beside unprotected peers, in the same run: fio's nbd engine against
# the agent's export (SIZE of random data, protected, initial replication done and the replica caught
# up before each job) and against qemu-nbd and nbdkit serving a copy of the same image. Jobs: 4 KiB
# random writes at QD32, 1 MiB sequential writes at QD32 (each ending with a FLUSH), 4 KiB random writes
# at QD1 with a FLUSH after each, 4 KiB random reads at QD32; RUNTIME seconds each. Also 1 MiB
# sequential writes over the disk once (no time limit): no write overtakes one not yet applied.
#   - pinned: fio and the NBD server under test on core 0, the process server and master target on
#     core 1 (in a deployment they run on other hosts);
#   - unpinned: everything shares both cores.
# Also: the initial replication's speed, how long the replica took to catch up after each job, whether
# the journal reached its limit during the job (changes then go to the dirty map, each newly dirtied
# block synced before the write: a slower, degraded mode), peak memory, and a byte-for-byte check of
# the replica at the end. JOURNAL_LIMIT sets the agent's journal limit (8G: a burst of RUNTIME seconds
# of 1 MiB writes fits; the default is half the disk).
#
#   bench/nbd-throughput.sh            # SIZE=1G RUNTIME=10, pinned and unpinned
#   SHORT=1 bench/nbd-throughput.sh    # SIZE=64M RUNTIME=1, pinned only, debug build (CI)
#   ONLY=QD1 PINNINGS=pinned bench/nbd-throughput.sh   # the jobs whose names contain ONLY
#   APART=1 bench/nbd-throughput.sh  # the process server's and master target's state on a tmpfs (bench/lib.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SHORT:-}" = 1 ]; then
  SIZE=${SIZE:-64M} RUNTIME=${RUNTIME:-1} PINNINGS=${PINNINGS:-pinned}
fi
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
JOURNAL_LIMIT=${JOURNAL_LIMIT:-8G}
PINNINGS=${PINNINGS:-pinned unpinned}
. bench/lib.sh
out=bench/out/nbd
rm -rf "$out"
mkdir -p "$out"
bytes=$(numfmt --from=iec "$SIZE")
echo "making $SIZE of random data" >&2
head -c "$bytes" /dev/urandom >"$out/agent.img"
cp "$out/agent.img" "$out/qemu.img"
cp "$out/agent.img" "$out/nbdkit.img"
place_apart "$out"

started=$(date +%s.%N)
qpid=""
kpid=""
cleanup() {
  [ -n "$lpid" ] && kill "$lpid" 2>/dev/null || true
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
  [ -n "$kpid" ] && kill "$kpid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -z "$apart" ] || rm -rf "$apart"
}
trap cleanup EXIT
SR_AGENT__JOURNAL__LIMIT_BYTES=$(numfmt --from=iec "$JOURNAL_LIMIT") start_local "$out" "$out/agent.img"
echo "initial replication" >&2
wait_caught_up "$agent_http" "$certs" >/dev/null
initial=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
qport=$(port)
qemu-nbd -f raw -x disk0 -b 127.0.0.1 -p "$qport" -t --cache=writeback "$out/qemu.img" &
qpid=$!
kport=$(port)
nbdkit -f -i 127.0.0.1 -p "$kport" file "$out/nbdkit.img" &
kpid=$!
qemu_uri="nbd://127.0.0.1:$qport/disk0"
nbdkit_uri="nbd://127.0.0.1:$kport/"
for u in "$qemu_uri" "$nbdkit_uri"; do
  for _ in $(seq 100); do nbdinfo --size "$u" >/dev/null 2>&1 && break; sleep 0.1; done
done

# Pins the NBD servers (and fio, through $on_fio) to core 0 and the rest of the pipeline to core 1, or
# lets everything share both.
pin() {
  local front rest
  if [ "$1" = pinned ]; then front=0 rest=1; else front=0,1 rest=0,1; fi
  for p in "$(component_pid "$out/dep" agent)" "$qpid" "$kpid"; do taskset -a -pc "$front" "$p" >/dev/null; done
  for c in ps mt; do taskset -a -pc "$rest" "$(component_pid "$out/dep" "$c")" >/dev/null; done
  on_fio=(taskset -c "$front")
}

# One fio job against $1 (the rest of the arguments are fio's); prints bytes per second and IOPS.
fio_run() {
  local uri=$1 rw=$2
  shift 2
  local timed=(--time_based --runtime="$RUNTIME")
  if [ "${1:-}" = --once ]; then
    timed=()
    shift
  fi
  "${on_fio[@]}" fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --size="$SIZE" "${timed[@]}" \
    --randrepeat=0 --output-format=json "$@" 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print(d["bw_bytes"], round(d["iops"]))'
}

jobs=(
  "4k random writes, QD32|randwrite --bs=4k --iodepth=32 --end_fsync=1"
  "1M sequential writes, QD32|write --bs=1m --iodepth=32 --end_fsync=1"
  "1M sequential writes, QD32, one pass|write --once --bs=1m --iodepth=32 --end_fsync=1"
  "4k random writes, QD1, FLUSH after each|randwrite --bs=4k --iodepth=1 --fsync=1"
  "4k random reads, QD32|randread --bs=4k --iodepth=32"
)
results="$out/results"
: >"$results"
for pinning in $PINNINGS; do
  pin "$pinning"
  for job in "${jobs[@]}"; do
    name=${job%%|*}
    [[ "$name" == *"${ONLY:-}"* ]] || continue
    read -r -a args <<<"${job#*|}"
    echo "$pinning: $name" >&2
    q=$(fio_run "$qemu_uri" "${args[@]}")
    k=$(fio_run "$nbdkit_uri" "${args[@]}")
    wait_caught_up "$agent_http" "$certs" >/dev/null
    overflows=$(grep -c "journal reached its limit" "$out/dep/logs/agent.log" || true)
    a=$(fio_run "$agent_uri" "${args[@]}")
    c=$(wait_caught_up "$agent_http" "$certs")
    o=no
    [ "$(grep -c "journal reached its limit" "$out/dep/logs/agent.log" || true)" -gt "$overflows" ] && o=yes
    echo "$pinning|$name|$q|$k|$a|$c|$o" >>"$results"
  done
done

nbdcopy "$replica_uri" "$out/replica.img"
qemu-img compare -f raw -F raw "$out/agent.img" "$out/replica.img" >/dev/null
mem="peak resident memory (VmHWM):"
for c in agent ps mt; do
  pid=$(component_pid "$out/dep" "$c" || true)
  [ -n "$pid" ] && mem="$mem $c $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' "/proc/$pid/status"),"
done

python3 - "$results" "$SIZE" "$RUNTIME" "$JOURNAL_LIMIT" <<'PY'
import sys
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
print(f"SIZE={sys.argv[2]} of random data, RUNTIME={sys.argv[3]} s per job, journal limit {sys.argv[4]}; MiB/s (IOPS for the QD1 job)\n")
print("| cores | job | qemu-nbd | nbdkit | protected disk | vs qemu-nbd | vs nbdkit | replica caught up after, s | journal overflowed |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|")
for pinning, job, q, k, a, caught, overflowed in rows:
    (qb, qi), (kb, ki), (ab, ai) = (tuple(map(float, x.split())) for x in (q, k, a))
    if "QD1" in job:
        f = lambda b, i: f"{i:.0f}"
        qv, kv, av = qi, ki, ai
    else:
        f = lambda b, i: f"{b / 2**20:.1f}"
        qv, kv, av = qb, kb, ab
    print(f"| {pinning} | {job} | {f(qb, qi)} | {f(kb, ki)} | {f(ab, ai)} | {av / qv:.2f}x | {av / kv:.2f}x | {caught} | {overflowed} |")
PY
echo
echo "initial replication of $SIZE of random data: $initial s ($(python3 -c "print(f'{$bytes / 2**20 / $initial:.0f}')") MiB/s, from start to caught up)"
echo "replica at the end: identical to the source (qemu-img compare)"
echo "${mem%,}"
