#!/usr/bin/env bash
# Checks the Helm chart, the alert rules and the Grafana dashboards without a cluster: helm lint
# (strict) and helm template through kubernetes-validate for the default values and each example,
# promtool's checks and unit tests of the rules, the dashboards against their generator, and the
# entrypoint's shell syntax. The test that every query names exported metrics is
# tests/tests/dashboards.rs. KUBE_VERSIONS picks the Kubernetes schemas (default: 1.30.0, an old
# supported release, and 1.35.0, a current one).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
chart=charts/site-recovery
kubes=${KUBE_VERSIONS:-1.30.0 1.35.0}
for values in "" "$chart"/examples/*.yaml; do
  args=()
  [ -n "$values" ] && args=(-f "$values")
  echo "chart-check: ${values:-default values}"
  helm lint --strict --quiet "$chart" "${args[@]}"
  for kube in $kubes; do
    helm template check "$chart" "${args[@]}" | kubernetes-validate --strict --quiet -k "$kube" -
  done
done
# The optional resources too (dashboards; kubernetes-validate has no schema for the Prometheus
# operator's ServiceMonitor and PrometheusRule, whose rules promtool checks below).
helm template check "$chart" --set metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true \
  --set metrics.dashboards.enabled=true | kubernetes-validate --strict --quiet -k "${kubes##* }" -
promtool check rules "$chart/files/rules.yaml"
(cd "$chart/files" && promtool test rules rules.test.yaml)
python3 scripts/dashboards.py --check
sh -n "$chart/files/entrypoint.sh"
echo "chart-check: all passed"
