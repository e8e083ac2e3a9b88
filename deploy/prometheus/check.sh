#!/usr/bin/env bash
# Checks the alerting rules: `promtool check rules alerts.yml` and the unit tests of
# alerts_test.yml (`promtool test rules`). Installs Debian's prometheus package when
# promtool is missing; a Prometheus server the install starts is stopped and disabled
# (only what the install started: port 9090 stays free).
set -euo pipefail
# shellcheck source=../local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/common.sh"
cd "$REPO/deploy/prometheus"

# Pids of running Prometheus servers.
prometheus_pids() {
  local p
  for p in /proc/[0-9]*; do
    [[ "$(readlink "$p/exe" 2>/dev/null)" == /usr/bin/prometheus ]] && printf '%s\n' "${p#/proc/}"
  done
  return 0
}

if ! have promtool; then
  before="$(prometheus_pids)"
  apt_install prometheus
  have promtool || die "promtool still missing after apt-get install prometheus"
  if have systemctl && systemctl is-enabled prometheus >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  for pid in $(prometheus_pids); do
    if ! grep -qx "$pid" <<<"$before"; then
      log "stopping the prometheus server the install started (pid $pid)"
      kill "$pid" 2>/dev/null || true
    fi
  done
fi

promtool check rules alerts.yml
promtool test rules alerts_test.yml
