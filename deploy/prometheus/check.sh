#!/usr/bin/env bash
# Checks the alerting rules: `promtool check rules alerts.yml` and the unit tests of
# alerts_test.yml (`promtool test rules`). Installs Debian's prometheus package when
# promtool is missing (deploy/prometheus/install.sh: a Prometheus server the install starts
# is stopped and disabled, so port 9090 stays free).
set -euo pipefail
# shellcheck source=../local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/common.sh"
# shellcheck source=install.sh
source "$REPO/deploy/prometheus/install.sh"
cd "$REPO/deploy/prometheus"

ensure_prometheus

promtool check rules alerts.yml
promtool test rules alerts_test.yml
