#!/usr/bin/env bash
# A database on a protected disk beside the same database on qemu-nbd, in the same run: each export
# becomes a block device (nbdfuse exposes it as a file, losetup makes that a loop device), gets ext4 and
# a PostgreSQL 15 cluster, and pgbench runs TPC-B with CLIENTS clients for DURATION s (one fsync per commit:
# a FLUSH through the NBD server each time). Both disks start as the same empty image of SIZE. Printed:
# transactions per second and latency for each, the ratio, then, after a clean stop (PostgreSQL stopped,
# file system unmounted, FLUSHed), whether the replica equals the protected disk byte for byte.
# Needs root (loop devices, FUSE mounts). APART=1 puts the process server's and master target's state on a
# tmpfs: on this one-disk machine their fsyncs otherwise queue with the protected disk's (in a
# deployment they run on other hosts).
#
#   bench/pgbench.sh              # SIZE=2G SCALE=20 CLIENTS=4 DURATION=60 ROUNDS=2
#   SHORT=1 bench/pgbench.sh      # SIZE=256M SCALE=2 DURATION=5 ROUNDS=1, debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SHORT:-}" = 1 ]; then
  SIZE=${SIZE:-256M} SCALE=${SCALE:-2} DURATION=${DURATION:-5} ROUNDS=${ROUNDS:-1}
fi
SIZE=${SIZE:-2G}
SCALE=${SCALE:-20}
CLIENTS=${CLIENTS:-4}
DURATION=${DURATION:-60}
ROUNDS=${ROUNDS:-2}
. bench/lib.sh
pgbin=/usr/lib/postgresql/15/bin
[ -x "$pgbin/postgres" ] || { echo "PostgreSQL 15 is not installed (scripts/setup.sh installs it)"; exit 1; }
out=$PWD/bench/out/pgbench
for m in "$out"/*/mnt; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done 2>/dev/null || true
rm -rf "$out"
mkdir -p "$out"
truncate -s "$SIZE" "$out/agent.img" "$out/qemu.img"
place_apart "$out"

qpid=""
mounted=()  # the directories under $out with something mounted
cleanup() {
  for d in "${mounted[@]}"; do
    [ -n "$d" ] || continue
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$d/mnt/data" stop -m immediate >/dev/null 2>&1 || true
    umount "$d/mnt" 2>/dev/null || true
    [ -f "$d/loop" ] && losetup -d "$(cat "$d/loop")" 2>/dev/null || true
    umount "$d/fuse" 2>/dev/null || true
  done
  [ -n "$lpid" ] && kill "$lpid" 2>/dev/null || true
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -z "$apart" ] || rm -rf "$apart"
}
trap cleanup EXIT
start_local "$out" "$out/agent.img"
wait_caught_up "$agent_http" "$certs" >/dev/null
qport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
qemu-nbd -f raw -x disk0 -b 127.0.0.1 -p "$qport" -t --cache=writeback "$out/qemu.img" &
qpid=$!
qemu_uri="nbd://127.0.0.1:$qport/disk0"
for _ in $(seq 100); do nbdinfo --size "$qemu_uri" >/dev/null 2>&1 && break; sleep 0.1; done

# Mounts the export at $2 as ext4 under $out/$1 and starts a cluster on it at port $3.
start_db() {
  local d=$out/$1 uri=$2 port=$3
  mkdir -p "$d/fuse" "$d/mnt"
  nbdfuse "$d/fuse" "$uri" &
  for _ in $(seq 100); do [ -e "$d/fuse/nbd" ] && break; sleep 0.1; done
  [ -e "$d/fuse/nbd" ] || { echo "nbdfuse did not expose $uri"; exit 1; }
  mounted+=("$d")
  losetup -f --show "$d/fuse/nbd" >"$d/loop"
  mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$(cat "$d/loop")"
  mount "$(cat "$d/loop")" "$d/mnt"
  mkdir "$d/mnt/data"
  chown postgres: "$d/mnt/data"
  runuser -u postgres -- "$pgbin/initdb" --data-checksums -A trust -D "$d/mnt/data" >/dev/null
  touch "$d/pg.log"
  chown postgres: "$d/pg.log"
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$d/mnt/data" -l "$d/pg.log" -w \
    -o "-p $port -k /tmp -c listen_addresses='' -c shared_buffers=128MB" start >/dev/null
  runuser -u postgres -- pgbench -q -i -s "$SCALE" -h /tmp -p "$port" postgres >/dev/null 2>&1
}

# Stops the cluster and unmounts everything under $out/$1 (each step flushes).
stop_db() {
  local d=$out/$1
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$d/mnt/data" -w stop -m fast >/dev/null
  umount "$d/mnt"
  losetup -d "$(cat "$d/loop")"
  rm -f "$d/loop"
  umount "$d/fuse"
  mounted=("${mounted[@]/$d}")
}

# One pgbench run; prints "tps latency_ms".
bench() {
  runuser -u postgres -- pgbench -c "$CLIENTS" -j 2 -T "$DURATION" -h /tmp -p "$1" postgres 2>/dev/null |
    awk '/^tps = / {tps=$3} /^latency average = / {lat=$4} END {print tps, lat}'
}

start_db agent "$agent_uri" 55431
start_db qemu "$qemu_uri" 55432
results=()
for _ in $(seq "$ROUNDS"); do
  q=$(bench 55432)
  a=$(bench 55431)
  results+=("$q|$a")
done
stop_db agent
stop_db qemu
caught=$(wait_caught_up "$agent_http" "$certs")
nbdcopy "$replica_uri" "$out/replica.img"
qemu-img compare -f raw -F raw "$out/agent.img" "$out/replica.img" >/dev/null

echo "pgbench TPC-B, scale $SCALE, $CLIENTS clients, $DURATION s a round, ext4 on a $SIZE disk (nbdfuse + loop)${APART:+, process server and master target on a tmpfs}"
echo
echo "| round | qemu-nbd tps | latency ms | protected disk tps | latency ms | ratio |"
echo "|---|---:|---:|---:|---:|---:|"
i=0
for r in "${results[@]}"; do
  i=$((i + 1))
  read -r qt ql <<<"${r%%|*}"
  read -r at al <<<"${r#*|}"
  python3 -c "print(f'| $i | {$qt:.0f} | {$ql:.2f} | {$at:.0f} | {$al:.2f} | {$at / $qt:.2f}x |')"
done
echo
echo "after a clean stop the replica caught up in $caught s and equals the protected disk (qemu-img compare)"
