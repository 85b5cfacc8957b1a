#!/usr/bin/env bash
# Installs what building and testing need and is missing: the Debian packages of the real NBD clients
# and tools the tests drive, and cargo-nextest. Safe to run again.
set -euo pipefail

need_pkgs=()
for pair in qemu-img:qemu-utils qemu-io:qemu-utils nbdcopy:libnbd-bin nbdinfo:libnbd-bin fio:fio \
            nbdkit:nbdkit mke2fs:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs rsync:rsync \
            tcpdump:tcpdump ethtool:ethtool ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
  echo "setup: installing ${need_pkgs[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not installed; install Rust (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
