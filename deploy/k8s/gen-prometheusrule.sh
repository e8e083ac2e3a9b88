#!/usr/bin/env bash
# Writes prometheusrule.yaml (a Prometheus Operator PrometheusRule) from
# deploy/prometheus/alerts.yml, so the cluster's rules are the ones promtool tests:
# the rule file's `groups:` become the resource's spec, comments included.
#   deploy/k8s/gen-prometheusrule.sh           # (re)write deploy/k8s/prometheusrule.yaml
#   deploy/k8s/gen-prometheusrule.sh --check   # exit 1 if the committed file is stale
#   deploy/k8s/gen-prometheusrule.sh --stdout  # print it
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/../prometheus/alerts.yml"
out="$here/prometheusrule.yaml"

render() {
  cat <<'HEAD'
# GENERATED from deploy/prometheus/alerts.yml by deploy/k8s/gen-prometheusrule.sh: do not edit;
# change alerts.yml (and alerts_test.yml) and run `make k8s-prometheusrule`.
# Your Prometheus selects PrometheusRules by label (e.g. kube-prometheus-stack: release=<name>):
# add that label with a kustomize patch.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: tally
  namespace: tally
  labels:
    app.kubernetes.io/name: tally
    app.kubernetes.io/part-of: tally
spec:
HEAD
  # alerts.yml from its top-level `groups:` on, two spaces deeper (blank lines stay empty).
  awk 'found || /^groups:/ { found = 1; if ($0 == "") print ""; else print "  " $0 }
       END { if (!found) { print "no top-level groups: in alerts.yml" > "/dev/stderr"; exit 1 } }' "$src"
}

case "${1:-}" in
  --stdout) render ;;
  --check)
    if ! diff -u "$out" <(render) >&2; then
      echo "deploy/k8s/prometheusrule.yaml is stale: run make k8s-prometheusrule (deploy/k8s/gen-prometheusrule.sh)" >&2
      exit 1
    fi
    ;;
  "")
    tmp="$(mktemp "$out.XXXXXX")"
    render >"$tmp"
    mv "$tmp" "$out"
    echo "wrote $out"
    ;;
  *) echo "usage: $0 [--check|--stdout]" >&2; exit 2 ;;
esac
