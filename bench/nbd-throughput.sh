#!/usr/bin/env bash
# Write throughput through the agent's NBD export beside qemu-nbd serving the same kind of file, in the
# same run, with the same fio jobs: SIZE of 4 KiB random writes and SIZE of 1 MiB sequential writes at
# queue depth QD. The agent is measured twice:
#   - "agent, pipeline on": process server and master target run on the same two cores and replicate
#     every write while fio runs (a protected machine's real load, plus the other sites' load);
#   - "agent front end": the agent alone, journaling every write, with no process server to ship to.
# Then: how long the replica took to catch up, and a byte-for-byte check of it.
#
#   bench/nbd-throughput.sh            # SIZE=1G QD=32 ROUNDS=2
#   SIZE=256M ROUNDS=1 bench/nbd-throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
QD=${QD:-32}
ROUNDS=${ROUNDS:-2}
scripts/setup.sh
cargo build --locked --release --workspace --bins 2>&1 | tail -1
out=bench/out/nbd
rm -rf "$out"
mkdir -p "$out"
truncate -s "$SIZE" "$out/agent.img" "$out/qemu.img"

target/release/srctl local --dir "$out/dep" --disk "disk0=$out/agent.img" >"$out/local.json" 2>"$out/local.err" &
lpid=$!
qpid=""
cleanup() {
  kill "$lpid" 2>/dev/null || true
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 300); do [ -s "$out/local.json" ] && break; sleep 0.1; done
[ -s "$out/local.json" ] || { echo "srctl local did not start:"; cat "$out/local.err"; exit 1; }
json() { python3 -c "import json,sys; j=json.load(open('$out/local.json')); print($1)"; }
agent_uri=$(json 'j["exports"][0]["uri"]')
replica_uri=$(json 'j["exports"][0]["replica_uri"]')
agent_http=$(json 'j["agent_http"]')
mt_http=$(json 'j["mt_http"]')
qport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
qemu-nbd -f raw -x disk0 -b 127.0.0.1 -p "$qport" -t --cache=writeback "$out/qemu.img" &
qpid=$!
for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$qport/disk0" >/dev/null 2>&1 && break; sleep 0.1; done
qemu_uri="nbd://127.0.0.1:$qport/disk0"

# Prints the write bandwidth of one fio job in bytes per second.
fio_bw() {
  fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --size="$SIZE" --iodepth="$QD" \
      --randrepeat=0 --end_fsync=1 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); print(json.loads(s[s.index("{"):])["jobs"][0]["write"]["bw_bytes"])'
}

# The components' APIs take the orchestrator's certificate that srctl local made.
certs="$out/dep/certs"
status() { target/release/srctl status "$1" --cert "$certs/cs.pem" --key "$certs/cs.key" --ca "$certs/ca.pem"; }
applied() {
  status "$mt_http" | python3 -c 'import json,sys; r=json.load(sys.stdin)["replicas"]; print(r[0]["applied_seq"] if r else 0)'
}
last() {
  status "$agent_http" | python3 -c 'import json,sys; print(json.load(sys.stdin)["disks"][0]["last_seq"])'
}

declare -A qemu_bw pipe_bw front_bw
workloads=("randwrite 4k" "write 1m")
started=$(date +%s.%N)
for w in "${workloads[@]}"; do
  set -- $w
  best_q=0; best_a=0
  for _ in $(seq "$ROUNDS"); do
    q=$(fio_bw "$qemu_uri" "$1" "$2"); [ "$q" -gt "$best_q" ] && best_q=$q
    a=$(fio_bw "$agent_uri" "$1" "$2"); [ "$a" -gt "$best_a" ] && best_a=$a
  done
  qemu_bw[$w]=$best_q; pipe_bw[$w]=$best_a
done
writes_done=$(date +%s.%N)
for _ in $(seq 6000); do
  [ "$(applied)" -ge "$(last)" ] && break
  sleep 0.1
done
caught_up=$(date +%s.%N)
# The replica is served over NBD with TLS (nbds://, which qemu does not spell): copy it, then compare.
nbdcopy "$replica_uri" "$out/replica.img"
qemu-img compare -f raw -F raw "$out/agent.img" "$out/replica.img" >/dev/null
catch="replica caught up $(python3 -c "print(f'{$caught_up-$writes_done:.1f} s after the last write, {$caught_up-$started:.1f} s after the first')"); qemu-img compare: identical"

mem="peak resident memory (VmHWM):"
for c in agent ps mt; do
  pid=$(pgrep -f "run --config $(pwd)/$out/dep/$c.toml" | head -1 || true)
  [ -n "$pid" ] && mem="$mem $c $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' "/proc/$pid/status"),"
done

# The agent alone: same config, fresh journal, nothing to ship to.
kill "$lpid"; wait "$lpid" 2>/dev/null || true
rm -f "$out/agent.img"; truncate -s "$SIZE" "$out/agent.img"
SR_AGENT__DATA_DIR="$out/agent-alone" SR_AGENT__PROCESS_SERVER="127.0.0.1:9" \
  target/release/mobility-agent run --config "$out/dep/agent.toml" 2>"$out/agent-alone.log" &
lpid=$!
for _ in $(seq 100); do nbdinfo --size "$agent_uri" >/dev/null 2>&1 && break; sleep 0.1; done
for w in "${workloads[@]}"; do
  set -- $w
  best_a=0
  for _ in $(seq "$ROUNDS"); do
    a=$(fio_bw "$agent_uri" "$1" "$2"); [ "$a" -gt "$best_a" ] && best_a=$a
  done
  front_bw[$w]=$best_a
done

echo "| workload ($SIZE, qd=$QD) | qemu-nbd MiB/s | agent front end MiB/s | ratio | agent, pipeline on MiB/s | ratio |"
echo "|---|---|---|---|---|---|"
for w in "${workloads[@]}"; do
  python3 -c "q=${qemu_bw[$w]}; f=${front_bw[$w]}; p=${pipe_bw[$w]}; print(f'| $w | {q/2**20:.1f} | {f/2**20:.1f} | {f/q:.2f}x | {p/2**20:.1f} | {p/q:.2f}x |')"
done
echo
echo "$catch"
echo "${mem%,}"
