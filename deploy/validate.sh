#!/usr/bin/env bash
# Validates deploy/ as far as a machine without a Docker engine or a cluster can
# (make validate-deploy; part of make test). Installs what it needs once, idempotently:
# a virtualenv in ~/.cache/tally/validate-venv with deploy/requirements-validate.txt
# (kubernetes-validate: the Kubernetes API schemas; check-jsonschema: the compose-spec
# schema), Debian's prometheus package for promtool, and, where no kubectl or kustomize is
# on PATH, Debian's kubernetes-client if the distribution has it.
#   - deploy/validate.py: Kubernetes manifests and the `kustomize build` output against the
#     Kubernetes and CRD schemas, kustomization.yaml's resources, tally config keys,
#     cross-references (see its docstring), docker-compose.yml against the compose-spec schema;
#   - deploy/k8s/prometheusrule.yaml is what gen-prometheusrule.sh makes of alerts.yml;
#   - promtool check rules on the PrometheusRule's rules, promtool check config on the
#     compose Prometheus config;
#   - `docker compose config -q` where the compose plugin exists;
#   - the Dockerfile's stages, ENTRYPOINT/CMD, USER and COPY sources.
set -euo pipefail
# shellcheck source=local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/local/common.sh"
# shellcheck source=prometheus/install.sh
source "$REPO/deploy/prometheus/install.sh"
cd "$REPO"

fail=0
ok() { printf 'ok    %s\n' "$*"; }
bad() { printf 'FAIL  %s\n' "$*"; fail=1; }
skip() { printf 'skip  %s\n' "$*"; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---- tools ------------------------------------------------------------------------------------
venv="$CACHE/validate-venv"
req=deploy/requirements-validate.txt
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
  have python3 || apt_install python3 python3-venv
  if ! python3 -m venv --clear "$venv" >>"$LOGS/validate-venv.log" 2>&1; then
    # Debian's python3 has venv's ensurepip in a package of its own.
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv --clear "$venv" >>"$LOGS/validate-venv.log" 2>&1 || die "python3 -m venv failed (see $LOGS/validate-venv.log)"
  fi
  log "installing $req into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >>"$LOGS/validate-venv.log" 2>&1 ||
    die "pip install -r $req failed (see $LOGS/validate-venv.log)"
  printf '%s\n' "$want" >"$venv/.requirements.sha256"
fi
"$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$venv: Python >= 3.11 needed (tomllib)"

ensure_prometheus

if ! have kubectl && ! have kustomize && have apt-get; then
  # Debian 12 ships kubectl 1.20 (its kustomize builds deploy/k8s) as kubernetes-client;
  # later releases may not: then the build is skipped.
  (apt_install kubernetes-client) || warn "no kubernetes-client package here"
fi

# ---- kustomize build --------------------------------------------------------------------------
kout=()
if have kubectl; then
  kver="$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')"
  if kubectl kustomize deploy/k8s >"$tmp/kustomize.yaml" 2>"$tmp/kustomize.err"; then
    ok "kubectl kustomize deploy/k8s (kustomize ${kver:-built into kubectl})"
    kout=(--kustomize-output "$tmp/kustomize.yaml")
  else
    bad "kubectl kustomize deploy/k8s: $(cat "$tmp/kustomize.err")"
  fi
elif have kustomize; then
  if kustomize build deploy/k8s >"$tmp/kustomize.yaml" 2>"$tmp/kustomize.err"; then
    ok "kustomize build deploy/k8s ($(kustomize version 2>/dev/null | head -n1))"
    kout=(--kustomize-output "$tmp/kustomize.yaml")
  else
    bad "kustomize build deploy/k8s: $(cat "$tmp/kustomize.err")"
  fi
else
  skip "kustomize build: neither kubectl nor kustomize here (each manifest and kustomization.yaml's resources are still checked)"
fi

# ---- schemas and consistency ------------------------------------------------------------------
if "$venv/bin/python" deploy/validate.py "${kout[@]}" --rules-out "$tmp/rules.yml" --prom-config-out "$tmp/prometheus.yml"; then
  ok "deploy/validate.py (schemas, kustomization, config keys, cross-references, compose)"
else
  bad "deploy/validate.py"
fi

if deploy/k8s/gen-prometheusrule.sh --check; then
  ok "deploy/k8s/prometheusrule.yaml is generated from deploy/prometheus/alerts.yml"
else
  bad "deploy/k8s/prometheusrule.yaml is stale (make k8s-prometheusrule)"
fi

# ---- promtool ---------------------------------------------------------------------------------
if [[ -s "$tmp/rules.yml" ]] && promtool check rules "$tmp/rules.yml" >"$tmp/promtool.out" 2>&1; then
  ok "promtool check rules: the PrometheusRule's rules ($(grep -o '[0-9]* rules found' "$tmp/promtool.out"))"
else
  bad "promtool check rules (PrometheusRule): $(cat "$tmp/promtool.out" 2>/dev/null)"
fi
if [[ -s "$tmp/prometheus.yml" ]] && promtool check config "$tmp/prometheus.yml" >"$tmp/promtool.out" 2>&1; then
  ok "promtool check config: the compose Prometheus config (deploy/prometheus/prometheus.compose.yml)"
else
  bad "promtool check config (compose Prometheus config): $(cat "$tmp/promtool.out" 2>/dev/null)"
fi

# ---- docker compose ---------------------------------------------------------------------------
compose_file=deploy/docker-compose.yml
if have docker && docker compose version >/dev/null 2>&1; then
  if docker compose -f "$compose_file" config -q; then ok "docker compose config -q"; else bad "docker compose config -q"; fi
else
  skip "docker compose config: no compose plugin here (the compose-spec schema was checked)"
fi

# ---- Dockerfile -------------------------------------------------------------------------------
df=deploy/Dockerfile
dockerfile_ok=1
grep -Eq '^FROM rust:1-bookworm AS builder' "$df" || { echo "  FAIL  $df: no 'FROM rust:1-bookworm AS builder'"; dockerfile_ok=0; }
grep -Eq '^FROM debian:bookworm-slim' "$df" || { echo "  FAIL  $df: no 'FROM debian:bookworm-slim'"; dockerfile_ok=0; }
grep -Eq 'cargo build --release .*-p tally' "$df" || { echo "  FAIL  $df: no 'cargo build --release -p tally'"; dockerfile_ok=0; }
grep -Eq '^ENTRYPOINT \["tally"\]' "$df" || { echo "  FAIL  $df: ENTRYPOINT is not [\"tally\"]"; dockerfile_ok=0; }
grep -Eq '^CMD \["run"\]' "$df" || { echo "  FAIL  $df: CMD is not [\"run\"]"; dockerfile_ok=0; }
grep -Eq '^USER 10001' "$df" || { echo "  FAIL  $df: no USER 10001 (the uid the k8s manifests run as)"; dockerfile_ok=0; }
# TLS through the system OpenSSL (rdkafka's ssl feature, native-tls): headers to build, the
# library to run.
if grep -Eq '^rdkafka.*"ssl"|^native-tls|^hyper-tls' Cargo.toml; then
  grep -Eq 'install .*libssl-dev' "$df" || { echo "  FAIL  $df: the builder does not install libssl-dev (Cargo.toml builds with OpenSSL)"; dockerfile_ok=0; }
  grep -Eq 'install .*libssl3' "$df" || { echo "  FAIL  $df: the runtime image does not install libssl3 (Cargo.toml builds with OpenSSL)"; dockerfile_ok=0; }
fi
# Every workspace member must be in the build context (cargo loads every member's manifest).
while read -r member; do
  grep -Eq "^COPY ${member}/? " "$df" || { echo "  FAIL  $df: workspace member $member is not copied into the builder"; dockerfile_ok=0; }
done < <("$venv/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]))')
# Every COPY source from the build context must exist.
while read -r src; do
  [[ -e "$src" ]] || { echo "  FAIL  $df: COPY source '$src' does not exist"; dockerfile_ok=0; }
done < <(awk '/^COPY / && !/--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$df")
if ((dockerfile_ok)); then ok "$df: stages, build command, ENTRYPOINT/CMD, USER, workspace members and COPY sources, OpenSSL packages"; else bad "$df"; fi
if have hadolint; then
  if hadolint "$df"; then ok "hadolint $df"; else bad "hadolint $df"; fi
fi
skip "docker build, docker compose up, kubectl apply: no Docker engine or cluster on this machine"

if ((fail)); then
  echo "deploy validation: FAILED"
  exit 1
fi
echo "deploy validation: ok"
