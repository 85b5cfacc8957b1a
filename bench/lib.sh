# Sourced by the bench scripts: installs what is missing and builds the binaries, optimized, or as a
# debug build when SHORT=1 (the short mode CI runs, so the scripts keep working; its timings mean
# nothing). Sets $bin to the directory of the binaries.
scripts/setup.sh
if [ "${SHORT:-}" = 1 ]; then
  cargo build --locked --workspace --bins 2>&1 | tail -1
  bin=target/debug
else
  cargo build --locked --release --workspace --bins 2>&1 | tail -1
  bin=target/release
fi
export SR_BIN_DIR="$PWD/$bin"
mkdir -p bench/out

# Waits until the agent at $1 (certificates in $2) has copied, compared, shipped and had applied every
# change of its first disk; prints the seconds it took.
wait_caught_up() {
  python3 - "$1" "$2" <<'PY'
import json, ssl, sys, time, urllib.request
url = f"https://{sys.argv[1]}/v1/status"
ctx = ssl.create_default_context(cafile=f"{sys.argv[2]}/ca.pem")
ctx.load_cert_chain(f"{sys.argv[2]}/cs.pem", f"{sys.argv[2]}/cs.key")
start = time.time()
while time.time() < start + 1800:
    d = json.load(urllib.request.urlopen(url, context=ctx))["disks"][0]
    if d["initial_copy"]["done"] and d["dirty_bytes"] == 0 and not d["resync"]["active"] and d["applied_seq"] >= d["last_seq"]:
        print(f"{time.time() - start:.2f}")
        sys.exit(0)
    time.sleep(0.02)
sys.exit("replication did not catch up in 30 minutes")
PY
}

# The pid of the component of the `srctl local` deployment in $1 whose config is $2 (agent, ps, mt).
component_pid() {
  pgrep -f "run --config $PWD/$1/$2.toml" | head -1
}
