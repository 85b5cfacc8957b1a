#!/usr/bin/env bash
# Resync of a disk whose replica diverged: SIZE_MIB of random data replicated, the master target
# stopped, 1% of the replica's 4 KiB blocks overwritten at random, the master target started again,
# then a checksum resync (POST /v1/resync on the agent) until the replica is identical again. Time and
# bytes on the wire (the process server's counters), beside rsync --inplace --no-whole-file --stats
# bringing a copy of the same diverged replica back to the source, in the same run. Page caches are
# dropped before each (when run as root), so both read their files from the disk.
#
#   bench/resync.sh              # SIZE_MIB=4096
#   SHORT=1 bench/resync.sh      # SIZE_MIB=64, debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SHORT:-}" = 1 ] && SIZE_MIB=${SIZE_MIB:-64}
SIZE_MIB=${SIZE_MIB:-4096}
. bench/lib.sh
out=bench/out/resync
rm -rf "$out"
mkdir -p "$out"
echo "making a ${SIZE_MIB} MiB source of random data" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$out/source.img"

mtpid=""
cleanup() {
  [ -n "$lpid" ] && kill "$lpid" 2>/dev/null || true
  [ -n "$mtpid" ] && kill "$mtpid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
start_local "$out" "$out/source.img"
replica="$out/dep/mt/replicas/item-1-disk-1.img"
tls=(--cacert "$certs/ca.pem" --cert "$certs/cs.pem" --key "$certs/cs.key")
metric() { curl -s "${tls[@]}" "https://$ps_http/metrics" | awk -v m="$1" '$1 == m {s += $2} END {printf "%.0f", s}'; }

echo "initial replication" >&2
wait_caught_up "$agent_http" "$certs" >/dev/null

# Diverge the replica: 1% of its 4 KiB blocks, with the master target stopped.
mt_old=$(component_pid "$out/dep" mt)
kill "$mt_old"
# Gone, or a zombie (srctl local reaps its children only when it stops).
for _ in $(seq 400); do
  s=$(awk '{print $3}' "/proc/$mt_old/stat" 2>/dev/null) && [ "$s" != Z ] || break
  sleep 0.05
done
python3 - "$replica" "$SIZE_MIB" >"$out/changed" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
blocks = (mib << 20) // 4096
random.seed(7)
chosen = random.sample(range(blocks), blocks // 100)
with open(path, "r+b") as f:
    for b in chosen:
        f.seek(b * 4096)
        f.write(os.urandom(4096))
print(len(chosen) * 4096)
PY
changed=$(cat "$out/changed")
cp --sparse=always "$replica" "$out/rsync-dest.img"
"$bin/master-target" run --config "$(pwd)/$out/dep/mt.toml" 2>>"$out/dep/logs/mt.log" &
mtpid=$!
sleep 1

# Both runs start with cold caches: each reads its two files from the disk.
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || echo "(could not drop caches: not root)" >&2
in0=$(metric sr_process_server_received_bytes_total)
out0=$(metric sr_process_server_forwarded_bytes_total)
sum0=$(metric sr_process_server_checksum_bytes_total)
t0=$(date +%s.%N)
curl -s "${tls[@]}" -X POST "https://$agent_http/v1/resync" >/dev/null
wait_caught_up "$agent_http" "$certs" >/dev/null
t1=$(date +%s.%N)
in1=$(metric sr_process_server_received_bytes_total)
out1=$(metric sr_process_server_forwarded_bytes_total)
sum1=$(metric sr_process_server_checksum_bytes_total)
# The replica is served over NBD with TLS (nbds://, which qemu does not spell): copy it, then compare.
nbdcopy "$replica_uri" "$out/replica-copy.img"
qemu-img compare -f raw -F raw "$out/source.img" "$out/replica-copy.img" >/dev/null

# The peer: rsync's delta transfer of the same source onto a copy of the same diverged replica.
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
r0=$(date +%s.%N)
rsync --inplace --no-whole-file --stats "$out/source.img" "$out/rsync-dest.img" >"$out/rsync.stats"
r1=$(date +%s.%N)
cmp "$out/source.img" "$out/rsync-dest.img"
rsync_bytes=$(awk -F': ' '/Total bytes sent/ {gsub(",","",$2); s+=$2} /Total bytes received/ {gsub(",","",$2); s+=$2} END {print s}' "$out/rsync.stats")

python3 - <<PY
changed = $changed
ours_s, rsync_s = $t1 - $t0, $r1 - $r0
shipped, forwarded, sums = $in1 - $in0, $out1 - $out0, $sum1 - $sum0
rsync_bytes = $rsync_bytes
mib = lambda b: f"{b / 2**20:.1f} MiB"
print(f"| {$SIZE_MIB} MiB, 1% of 4 KiB blocks changed ({mib(changed)}) | time s | bytes on the wire | vs changed bytes |")
print("|---|---:|---:|---:|")
print(f"| resync (checksum trees, agent -> process server) | {ours_s:.1f} | {mib(shipped + sums)} (data {mib(shipped)}, checksums {mib(sums)}) | {(shipped + sums) / changed:.2f}x |")
print(f"| same, process server -> master target (compressed, sealed) | | {mib(forwarded)} | {forwarded / changed:.2f}x |")
print(f"| rsync --inplace --no-whole-file | {rsync_s:.1f} | {mib(rsync_bytes)} | {rsync_bytes / changed:.2f}x |")
print(f"\nresync time / rsync time: {ours_s / rsync_s:.2f}; both end byte-identical (qemu-img compare, cmp)")
PY
