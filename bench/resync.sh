#!/usr/bin/env bash
# Resync of a disk whose replica diverged: SIZE_GIB of random data replicated, the master target
# stopped, 1% of the replica's 4 KiB blocks overwritten at random, the master target started again,
# then a checksum resync (POST /v1/resync on the agent) until the replica is identical again. Time and
# bytes on the wire (the process server's counters), beside rsync --inplace --no-whole-file --stats
# bringing a copy of the same diverged replica back to the source, in the same run. Page caches are
# dropped before each (when run as root), so both read their files from the disk.
#
#   bench/resync.sh              # SIZE_GIB=4
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-4}
scripts/setup.sh
cargo build --locked --release --workspace --bins 2>&1 | tail -1
out=bench/out/resync
rm -rf "$out"
mkdir -p "$out"
echo "making a ${SIZE_GIB} GiB source of random data" >&2
head -c "$((SIZE_GIB << 30))" /dev/urandom >"$out/source.img"

target/release/srctl local --dir "$out/dep" --disk "disk0=$out/source.img" >"$out/local.json" 2>"$out/local.err" &
lpid=$!
mtpid=""
cleanup() {
  kill "$lpid" 2>/dev/null || true
  [ -n "$mtpid" ] && kill "$mtpid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 300); do [ -s "$out/local.json" ] && break; sleep 0.1; done
[ -s "$out/local.json" ] || { echo "srctl local did not start:"; cat "$out/local.err"; exit 1; }
json() { python3 -c "import json,sys; j=json.load(open('$out/local.json')); print($1)"; }
agent_http=$(json 'j["agent_http"]')
ps_http=$(json 'j["ps_http"]')
replica_uri=$(json 'j["exports"][0]["replica_uri"]')
replica="$out/dep/mt/replicas/item-1-disk-1.img"
# The components' APIs take the orchestrator's certificate that srctl local made.
certs="$out/dep/certs"
# Polls the agent every 20 ms until the disk is copied, compared, shipped and applied.
wait_caught_up() {
  python3 - "$agent_http" "$certs" <<'PY'
import json, ssl, sys, time, urllib.request
url = f"https://{sys.argv[1]}/v1/status"
ctx = ssl.create_default_context(cafile=f"{sys.argv[2]}/ca.pem")
ctx.load_cert_chain(f"{sys.argv[2]}/cs.pem", f"{sys.argv[2]}/cs.key")
deadline = time.time() + 1800
while time.time() < deadline:
    d = json.load(urllib.request.urlopen(url, context=ctx))["disks"][0]
    if d["initial_copy"]["done"] and d["dirty_bytes"] == 0 and not d["resync"]["active"] and d["applied_seq"] >= d["last_seq"]:
        sys.exit(0)
    time.sleep(0.02)
sys.exit("replication did not catch up")
PY
}
tls=(--cacert "$certs/ca.pem" --cert "$certs/cs.pem" --key "$certs/cs.key")
metric() { curl -s "${tls[@]}" "https://$ps_http/metrics" | awk -v m="$1" '$1 == m {s += $2} END {printf "%.0f", s}'; }

echo "initial replication" >&2
wait_caught_up

# Diverge the replica: 1% of its 4 KiB blocks, with the master target stopped.
pkill -f "run --config $(pwd)/$out/dep/mt.toml"
sleep 1
python3 - "$replica" "$SIZE_GIB" >"$out/changed" <<'PY'
import os, random, sys
path, gib = sys.argv[1], int(sys.argv[2])
blocks = (gib << 30) // 4096
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
target/release/master-target run --config "$(pwd)/$out/dep/mt.toml" 2>>"$out/dep/logs/mt.log" &
mtpid=$!
sleep 1

# Both runs start with cold caches: each reads its two 4 GiB files from the disk.
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || echo "(could not drop caches: not root)" >&2
in0=$(metric sr_process_server_received_bytes_total)
out0=$(metric sr_process_server_forwarded_bytes_total)
sum0=$(metric sr_process_server_checksum_bytes_total)
t0=$(date +%s.%N)
curl -s "${tls[@]}" -X POST "https://$agent_http/v1/resync" >/dev/null
wait_caught_up
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
print(f"| {$SIZE_GIB} GiB, 1% of 4 KiB blocks changed ({mib(changed)}) | time s | bytes on the wire | vs changed bytes |")
print("|---|---:|---:|---:|")
print(f"| resync (checksum trees, agent -> process server) | {ours_s:.1f} | {mib(shipped + sums)} (data {mib(shipped)}, checksums {mib(sums)}) | {(shipped + sums) / changed:.2f}x |")
print(f"| same, process server -> master target (compressed, sealed) | | {mib(forwarded)} | {forwarded / changed:.2f}x |")
print(f"| rsync --inplace --no-whole-file | {rsync_s:.1f} | {mib(rsync_bytes)} | {rsync_bytes / changed:.2f}x |")
print(f"\nresync time / rsync time: {ours_s / rsync_s:.2f}; both end byte-identical (qemu-img compare, cmp)")
PY
