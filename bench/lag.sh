#!/usr/bin/env bash
# How far the replica trails the source under a steady churn, and what the pipeline costs doing it.
# SIZE of random data protected and caught up; then fio writes 64 KiB random blocks (half compressible)
# at RATE for RUNTIME seconds while a sampler reads the agent's newest sequence number and the master
# target's applied one every 50 ms. The replica's lag at a moment is how long the oldest change it lacks
# has been on the source (counted from the sample before the one that first saw it, so at most one
# sampling step too high). Printed: the lag's distribution,
# then a burst (BURST seconds of the same writes, unthrottled) and how long the replica took to catch up
# after it; the process server's CPU time per GiB it received and forwarded (compression on);
# the agent's peak resident memory during the churn.
# There is no peer here: qemu-nbd and nbdkit do not replicate. The churn's cost on the disk's own speed
# is bench/nbd-throughput.sh's.
#
#   bench/lag.sh               # SIZE=1G RATE=54m RUNTIME=60 BURST=10
#   APART=1 bench/lag.sh       # the process server's and master target's state on a tmpfs (bench/lib.sh)
#   SHORT=1 bench/lag.sh       # SIZE=64M RATE=8m RUNTIME=3 BURST=1, debug build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SHORT:-}" = 1 ]; then
  SIZE=${SIZE:-64M} RATE=${RATE:-8m} RUNTIME=${RUNTIME:-3} BURST=${BURST:-1}
fi
SIZE=${SIZE:-1G}
RATE=${RATE:-54m}
RUNTIME=${RUNTIME:-60}
BURST=${BURST:-10}
. bench/lib.sh
out=bench/out/lag
rm -rf "$out"
mkdir -p "$out"
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom >"$out/disk.img"
place_apart "$out"
spid=""
cleanup() {
  [ -n "$spid" ] && kill "$spid" 2>/dev/null || true
  [ -n "$lpid" ] && kill "$lpid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -z "$apart" ] || rm -rf "$apart"
}
trap cleanup EXIT
SR_AGENT__JOURNAL__LIMIT_BYTES=$(numfmt --from=iec 8G) start_local "$out" "$out/disk.img"
echo "initial replication" >&2
wait_caught_up "$agent_http" "$certs" >/dev/null

# Samples (time, agent's last seq, master target's applied seq, agent's RSS) every 50 ms until killed.
agent_pid=$(component_pid "$out/dep" agent)
python3 - "$agent_http" "$mt_http" "$certs" "$agent_pid" >"$out/samples" <<'PY' &
import json, ssl, sys, time, urllib.request
agent, mt, certs, pid = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=f"{certs}/ca.pem")
ctx.load_cert_chain(f"{certs}/cs.pem", f"{certs}/cs.key")
get = lambda host: json.load(urllib.request.urlopen(f"https://{host}/v1/status", context=ctx, timeout=5))
while True:
    t = time.time()
    try:
        last = get(agent)["disks"][0]["last_seq"]
        reps = get(mt)["replicas"]
        applied = reps[0]["applied_seq"] if reps else 0
        rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
        print(t, last, applied, rss, flush=True)
    except (OSError, ValueError, StopIteration):
        pass
    time.sleep(max(0, 0.05 - (time.time() - t)))
PY
spid=$!

tls=(--cacert "$certs/ca.pem" --cert "$certs/cs.pem" --key "$certs/cs.key")
metric() { curl -s "${tls[@]}" "https://$1/metrics" | awk -v m="$2" '$1 == m {s += $2} END {printf "%.0f", s}'; }
cpu() { awk '{print $14 + $15}' "/proc/$(component_pid "$out/dep" "$1")/stat"; }
# Bytes written to the machine's disks so far (every site shares them here).
disk_written() { awk '$3 ~ /^(vd[a-z]+|sd[a-z]+|xvd[a-z]+|nvme[0-9]+n[0-9]+)$/ {s += $10} END {printf "%.0f", s * 512}' /proc/diskstats; }
fio_churn() {
  fio --name=churn --ioengine=nbd --uri="$agent_uri" --rw=randwrite --bs=64k --iodepth=8 --size="$SIZE" \
    --time_based --runtime="$1" --buffer_compress_percentage=50 --refill_buffers --randrepeat=0 \
    --output-format=json "${@:2}" 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); print(json.loads(s[s.index("{"):])["jobs"][0]["write"]["bw_bytes"])'
}

echo "steady churn at $RATE for $RUNTIME s" >&2
fwd0=$(metric "$ps_http" sr_process_server_forwarded_bytes_total)
in0=$(metric "$ps_http" sr_process_server_received_bytes_total)
bin0=$(metric "$ps_http" sr_process_server_batches_received_total)
cpu0=$(cpu ps) acpu0=$(cpu agent) mcpu0=$(cpu mt)
disk0=$(disk_written)
steady_start=$(date +%s.%N)
steady_bw=$(fio_churn "$RUNTIME" --rate="$RATE")
steady_end=$(date +%s.%N)
disk1=$(disk_written)
wait_caught_up "$agent_http" "$certs" >/dev/null
fwd1=$(metric "$ps_http" sr_process_server_forwarded_bytes_total)
in1=$(metric "$ps_http" sr_process_server_received_bytes_total)
bin1=$(metric "$ps_http" sr_process_server_batches_received_total)
cpu1=$(cpu ps) acpu1=$(cpu agent) mcpu1=$(cpu mt)
caught_end=$(date +%s.%N)

echo "burst for $BURST s" >&2
burst_bw=$(fio_churn "$BURST")
burst_end=$(date +%s.%N)
catch=$(wait_caught_up "$agent_http" "$certs")
catch=$(python3 -c "import time; print(f'{time.time() - $burst_end:.2f}')")
kill "$spid" 2>/dev/null || true
wait "$spid" 2>/dev/null || true
spid=""
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$agent_pid/status")

python3 - "$out/samples" <<PY
import sys
hz = $(getconf CLK_TCK)
rows = [tuple(float(x) for x in l.split()) for l in open(sys.argv[1]) if len(l.split()) == 4]
t0, t1, tb = $steady_start, $steady_end, $burst_end
# When the source held each sequence number at the latest: the sample before the one that first saw it.
firsts, seen, prev = [], -1, None
for t, last, _, _ in rows:
    if last > seen:
        firsts.append((last, prev if prev is not None else t))
        seen = last
    prev = t
def held_since(applied):
    for last, t in firsts:
        if last >= applied:
            return t
    return None
lags = []
for t, last, applied, _ in rows:
    if t0 + 2 <= t <= t1:
        if applied >= last:
            lags.append(0.0)
        else:
            since = held_since(applied + 1)
            lags.append(t - since if since else 0.0)
lags.sort()
q = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))] if lags else float("nan")
mib = 2**20
print(f"steady churn: {$steady_bw / mib:.1f} MiB/s of 64 KiB random writes (half compressible) for {t1 - t0:.0f} s, {len(lags)} samples")
print()
print("| replica lag | p50 | p90 | p99 | max |")
print("|---|---:|---:|---:|---:|")
print(f"| seconds | {q(0.5):.2f} | {q(0.9):.2f} | {q(0.99):.2f} | {lags[-1] if lags else float('nan'):.2f} |")
print()
fwd, got, cpu = $fwd1 - $fwd0, $in1 - $in0, ($cpu1 - $cpu0) / hz
batches = $bin1 - $bin0
print(f"process server: {cpu:.1f} CPU s for {got / 2**30:.2f} GiB received (in {batches} batches, {got / max(batches, 1) / 1024:.0f} KiB each) and {fwd / 2**30:.2f} GiB forwarded: {cpu / max(got / 2**30, 1e-9):.2f} CPU s per GiB received")
secs = $caught_end - t0
print(f"CPU from the churn's start until the replica caught up ({secs:.0f} s), in cores: agent {($acpu1 - $acpu0) / hz / secs:.2f}, process server {cpu / secs:.2f}, master target {($mcpu1 - $mcpu0) / hz / secs:.2f}")
disk = ($disk1 - $disk0) / (t1 - t0)
print(f"the machine's disk wrote {disk / mib:.0f} MiB/s during the churn ({disk / max($steady_bw, 1):.1f}x the churn: the agent's journal and disk, the process server's cache, the master target's undo journal and replica share it here)")
rss = [r for t, _, _, r in rows if t0 <= t <= t1]
print(f"agent resident memory during the churn: peak {max(rss) / 1024:.0f} MiB" if rss else "no memory samples")
print(f"agent resident memory, peak over the whole run (initial copy and burst included): {$hwm / 1024:.0f} MiB")
print(f"burst: {$burst_bw / mib:.1f} MiB/s for $BURST s, unthrottled; the replica caught up {$catch} s after it ended")
PY
