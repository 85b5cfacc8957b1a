# Sourced by the bench scripts: installs what is missing and builds the binaries, optimized, or as a
# debug build when SHORT=1 (the short mode CI runs, so the scripts keep working; its timings mean
# nothing), or uses BENCH_BIN's binaries. Sets $bin to the directory of the binaries.
scripts/setup.sh
if [ -n "${BENCH_BIN:-}" ]; then
  # Binaries built elsewhere (for example an older commit's, to compare two builds in one go).
  case $BENCH_BIN in
    /*) bin=$BENCH_BIN ;;
    *) echo "BENCH_BIN must be an absolute path" >&2; exit 1 ;;
  esac
elif [ "${SHORT:-}" = 1 ]; then
  cargo build --locked --workspace --bins 2>&1 | tail -1
  bin=target/debug
else
  cargo build --locked --release --workspace --bins 2>&1 | tail -1
  bin=target/release
fi
SR_BIN_DIR=$(cd "$bin" && pwd)
export SR_BIN_DIR
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
    try:
        d = json.load(urllib.request.urlopen(url, context=ctx, timeout=10))["disks"][0]
    except (OSError, ValueError):
        time.sleep(0.2)
        continue
    if d["initial_copy"]["done"] and d["dirty_bytes"] == 0 and not d["resync"]["active"] and d["applied_seq"] >= d["last_seq"]:
        print(f"{time.time() - start:.2f}")
        sys.exit(0)
    time.sleep(0.02)
sys.exit(f"replication did not catch up in 30 minutes ({url})")
PY
}

# The pid of the component of the `srctl local` deployment in $1 whose config is $2 (agent, ps, mt).
component_pid() {
  local cfg
  cfg="$(cd "$1" && pwd -P)/$2.toml"
  # Not this awk itself, whose own arguments hold the string too.
  ps -eo pid=,args= | awk -v s="run --config $cfg" 'index($0, s) && $2 !~ /(^|\/)awk$/ {print $1; exit}'
}

# With APART=1, puts the process server's and master target's state under $1/dep on a tmpfs of its own,
# as on hosts of their own, so their writes and fsyncs no longer share the protected disk's device. Sets
# `apart` (the tmpfs directory, for the caller's cleanup to remove; empty otherwise).
apart=""
place_apart() {
  [ "${APART:-}" = 1 ] || return 0
  apart=$(mktemp -d /dev/shm/sr-bench.XXXXXX)
  mkdir -p "$1/dep" "$apart/ps" "$apart/mt"
  ln -s "$apart/ps" "$1/dep/ps"
  ln -s "$apart/mt" "$1/dep/mt"
}

# Starts `srctl local` serving the disk image $2 from $1/dep in the background (the caller's environment
# passes through; the caller's trap stops $lpid), waits for its address file, and sets agent_uri,
# replica_uri, agent_http, mt_http, ps_http and certs.
lpid=""
start_local() {
  "$bin/srctl" local --dir "$1/dep" --disk "disk0=$2" >"$1/local.json" 2>"$1/local.err" &
  lpid=$!
  for _ in $(seq 300); do [ -s "$1/local.json" ] && break; sleep 0.1; done
  [ -s "$1/local.json" ] || { echo "srctl local did not start:"; cat "$1/local.err"; exit 1; }
  eval "$(python3 - "$1/local.json" <<'PY'
import json, shlex, sys
j = json.load(open(sys.argv[1]))
e = j["exports"][0]
pairs = [("agent_uri", e["uri"]), ("replica_uri", e["replica_uri"]), ("agent_http", j["agent_http"]),
         ("mt_http", j["mt_http"]), ("ps_http", j["ps_http"])]
for k, v in pairs:
    print(f"{k}={shlex.quote(v)}")
PY
)"
  certs=$1/dep/certs
}
