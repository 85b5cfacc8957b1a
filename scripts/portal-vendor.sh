#!/usr/bin/env bash
# The portal's third-party files (config-server/portal/vendor) are exactly those of the npm package
# they come from, at the version pinned here. With --update, takes them from the registry; without,
# checks the committed copies against it (CI runs the check).
set -euo pipefail
cd "$(dirname "$0")/.."
UPLOT_VERSION=1.6.32
vendor=config-server/portal/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$UPLOT_VERSION" >/dev/null && tar xzf "uplot-$UPLOT_VERSION.tgz")
pairs=("dist/uPlot.iife.min.js:uPlot.iife.min.js" "dist/uPlot.min.css:uPlot.min.css" "LICENSE:uPlot.LICENSE")
status=0
for pair in "${pairs[@]}"; do
  from="$tmp/package/${pair%%:*}"
  to="$vendor/${pair#*:}"
  if [ "${1:-}" = "--update" ]; then
    cp "$from" "$to"
  elif ! cmp -s "$from" "$to"; then
    echo "portal-vendor: $to differs from uplot@$UPLOT_VERSION's ${pair%%:*}: run scripts/portal-vendor.sh --update" >&2
    status=1
  fi
done
[ $status -eq 0 ] && echo "portal-vendor: $vendor matches uplot@$UPLOT_VERSION"
exit $status
