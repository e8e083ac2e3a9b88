# shellcheck shell=bash
# Sourced (after deploy/local/common.sh): ensure_prometheus installs Debian's prometheus
# package when promtool or prometheus is missing. A Prometheus server the install starts
# (the package's service) is stopped and disabled: only what the install started, so
# port 9090 stays free and no server runs that nobody asked for.

# Pids of running Prometheus servers.
prometheus_pids() {
  local p
  for p in /proc/[0-9]*; do
    [[ "$(readlink "$p/exe" 2>/dev/null)" == /usr/bin/prometheus ]] && printf '%s\n' "${p#/proc/}"
  done
  return 0
}

ensure_prometheus() {
  if have promtool && have prometheus; then
    return 0
  fi
  local before pid
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
}
