#!/usr/bin/env bash
# Shows that deploy/validate.sh rejects broken deploy files: each case breaks one thing in a
# scratch copy of the checkout and expects validate.sh to fail with a given message.
#   deploy/tests/validate-selftest.sh      (about 1 s a case once validate.sh's tools are installed)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

pass=0
failed=0
# A scratch copy of what validate.sh reads.
prepare() {
  rm -rf "$scratch/repo"
  mkdir -p "$scratch/repo/consumers/src"
  cp -r "$repo/deploy" "$scratch/repo/"
  cp "$repo/consumers/src/config.defaults.toml" "$scratch/repo/consumers/src/"
  # COPY sources of the Dockerfile
  for d in Cargo.toml Cargo.lock schemas producers tests bench sql; do ln -s "$repo/$d" "$scratch/repo/$d"; done
}

# case NAME EXPECTED_OUTPUT_REGEX SHELL_SNIPPET (run in the scratch copy)
case_() {
  local name="$1" expect="$2" mutate="$3" out rc=0
  prepare
  (cd "$scratch/repo" && eval "$mutate")
  out="$(TALLY_STATE_DIR="$scratch/state" "$scratch/repo/deploy/validate.sh" 2>&1)" || rc=$?
  if ((rc != 0)) && grep -Eq -- "$expect" <<<"$out"; then
    printf 'ok    %s\n' "$name"
    pass=$((pass + 1))
  else
    printf 'FAIL  %s (exit %s; expected /%s/)\n' "$name" "$rc" "$expect"
    grep -E 'FAIL' <<<"$out" | head -n 5 | sed 's/^/        /'
    failed=$((failed + 1))
  fi
}

# The unchanged copy must pass.
prepare
if TALLY_STATE_DIR="$scratch/state" "$scratch/repo/deploy/validate.sh" >/dev/null 2>&1; then
  echo "ok    unchanged copy passes"
  pass=$((pass + 1))
else
  echo "FAIL  unchanged copy fails"
  failed=$((failed + 1))
fi

case_ "misspelt Deployment field (strict Kubernetes schema)" 'readinesProbe' \
  'sed -i "s/readinessProbe:/readinesProbe:/" deploy/k8s/deployment.yaml'
case_ "wrong type in a Deployment (Kubernetes schema)" 'containerPort' \
  'sed -i "s/containerPort: 9898/containerPort: \"9898\"/" deploy/k8s/deployment.yaml'
case_ "KEDA trigger metadata not a string (ScaledObject CRD)" 'CRD keda.sh_scaledobjects' \
  'sed -i "0,/lagThreshold: \"20000\"/s//lagThreshold: 20000/" deploy/k8s/scaledobject.yaml'
case_ "maxReplicaCount above kafka.usage_partitions" 'maxReplicaCount 16 <= kafka.usage_partitions 12' \
  'sed -i "s/maxReplicaCount: 8/maxReplicaCount: 16/" deploy/k8s/scaledobject.yaml'
case_ "a consumer group without a trigger" 'one trigger per consumer group' \
  'sed -i "s/consumerGroup: tally.audit/consumerGroup: tally.audits/" deploy/k8s/scaledobject.yaml'
case_ "unknown ServiceMonitor field (ServiceMonitor CRD)" 'scrapeIntervall' \
  'sed -i "s/      interval: 30s/      scrapeIntervall: 30s/" deploy/k8s/servicemonitor.yaml'
case_ "alerts.yml changed, PrometheusRule not regenerated" 'prometheusrule.yaml is stale' \
  'sed -i "s/for: 10m/for: 11m/" deploy/prometheus/alerts.yml'
case_ "invalid PromQL in the PrometheusRule (promtool)" 'promtool check rules' \
  'sed -i "s/expr: tally_relay_alive == 0/expr: tally_relay_alive ==/" deploy/prometheus/alerts.yml && deploy/k8s/gen-prometheusrule.sh >/dev/null'
case_ "kustomization applies the placeholder Secret" 'does not apply secret.yaml' \
  'sed -i "s/^  - configmap.yaml/  - configmap.yaml\n  - secret.yaml/" deploy/k8s/kustomization.yaml'
case_ "a manifest missing from kustomization.yaml" 'kustomization.yaml lists pdb.yaml' \
  'sed -i "/^  - pdb.yaml/d" deploy/k8s/kustomization.yaml'
case_ "unknown tally config key in the ConfigMap" 'commit_intervall_ms is not a tally config key' \
  'sed -i "s/commit_interval_ms = 5000/commit_intervall_ms = 5000/" deploy/k8s/configmap.yaml'
case_ "pending key not on the allow-list" 'password_file is not a tally config key' \
  'sed -i "/^postgres.password_file/d" deploy/pending-config-keys.txt'
case_ "secret file outside the Secret mount" 'is in a read-only mount of Secret tally-secrets' \
  'sed -i "s#/var/run/secrets/tally/postgres-password#/etc/tally/postgres-password#" deploy/k8s/configmap.yaml'
case_ "container without readOnlyRootFilesystem" 'readOnlyRootFilesystem' \
  'sed -i "0,/readOnlyRootFilesystem: true/s//readOnlyRootFilesystem: false/" deploy/k8s/deployment.yaml'
case_ "NetworkPolicy without egress to ClickHouse" 'egress to clickhouse.url' \
  'sed -i "s/- port: 8123/- port: 8124/" deploy/k8s/networkpolicy.yaml'
case_ "unknown compose service key (compose-spec schema)" 'compose-spec schema' \
  'sed -i "s/^    stop_grace_period: 30s/    stop_grace_periods: 30s/; s/^  stop_grace_period: 30s/  stop_grace_periods: 30s/" deploy/docker-compose.yml'
case_ "two tally instances with one instance_id" 'distinct kafka.instance_id' \
  'sed -i "s/TALLY__KAFKA__INSTANCE_ID: tally-2/TALLY__KAFKA__INSTANCE_ID: tally-1/" deploy/docker-compose.yml'
case_ "compose Prometheus not scraping tally-2" 'scrapes tally-2:9898' \
  'sed -i "s/, \"tally-2:9898\"//" deploy/prometheus/prometheus.compose.yml'
case_ "Grafana without the ClickHouse data source" 'vertamedia-clickhouse-datasource data source' \
  'sed -i "s/type: vertamedia-clickhouse-datasource/type: grafana-clickhouse-datasource/" deploy/grafana/provisioning/datasources/datasources.yml'
case_ "a workspace member not copied into the image" 'workspace member bench is not copied' \
  'sed -i "/^COPY bench /d" deploy/Dockerfile'
case_ "OpenSSL build without libssl3 at run time" 'does not install libssl3' \
  'sed "s/^rdkafka = .*/rdkafka = { version = \"0.39\", features = [\"ssl\"] }/" Cargo.toml >Cargo.toml.new && rm Cargo.toml && mv Cargo.toml.new Cargo.toml && sed -i "s/ libssl3//" deploy/Dockerfile'

echo "$pass passed, $failed failed"
((failed == 0))
