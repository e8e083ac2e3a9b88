# shellcheck shell=bash
# Sourced by the deploy/local scripts: paths, logging, port and pid-file helpers.
# Not meant to be executed directly.

if [[ -n "${TALLY_COMMON_SOURCED:-}" ]]; then
  return 0
fi
TALLY_COMMON_SOURCED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${TALLY_STATE_DIR:-$REPO/.local}"
CACHE="${TALLY_CACHE_DIR:-$HOME/.cache/tally}"
LOGS="$STATE/logs"
PIDS="$STATE/run"
export REPO STATE CACHE LOGS PIDS

mkdir -p "$STATE" "$LOGS" "$PIDS" "$CACHE"

# ---- logging -----------------------------------------------------------------
_ts() { date +%H:%M:%S; }
log()  { printf '[%s] %s\n' "$(_ts)" "$*" >&2; }
info() { log "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$(_ts)" "$*" >&2; }
err()  { printf '[%s] ERROR: %s\n' "$(_ts)" "$*" >&2; }
die()  { err "$*"; exit 1; }

# ---- network -----------------------------------------------------------------
# port_open HOST PORT: true if something accepts TCP connections there.
port_open() {
  local host="$1" port="$2"
  (exec 3<>"/dev/tcp/$host/$port") >/dev/null 2>&1
}

# wait_for TIMEOUT_SECONDS DESCRIPTION CMD [ARGS...]
# Polls CMD every 0.1 s until it succeeds; fails after TIMEOUT_SECONDS.
wait_for() {
  local timeout="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + timeout))
  while true; do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      err "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.1
  done
}

# ---- pid files ---------------------------------------------------------------
pid_file() { printf '%s/%s.pid' "$PIDS" "$1"; }

# read_pid NAME: prints the recorded pid (empty if none).
read_pid() {
  local f
  f="$(pid_file "$1")"
  [[ -f "$f" ]] && tr -dc '0-9' <"$f" || true
}

write_pid() { printf '%s\n' "$2" >"$(pid_file "$1")"; }

clear_pid() { rm -f "$(pid_file "$1")"; }

# pid_alive NAME: true if the recorded pid is a live process.
pid_alive() {
  local pid
  pid="$(read_pid "$1")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# pid_cmd PID: the process's command line (space separated), empty if gone.
pid_cmd() {
  [[ -r "/proc/$1/cmdline" ]] && tr '\0' ' ' <"/proc/$1/cmdline" || true
}

# stop_pid NAME [TIMEOUT]: SIGTERM the recorded process, wait, SIGKILL as a
# last resort, remove the pid file.
stop_pid() {
  local name="$1" timeout="${2:-20}" pid
  pid="$(read_pid "$name")"
  if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
    clear_pid "$name"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + timeout))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      warn "$name (pid $pid) did not exit after ${timeout}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.1
  done
  clear_pid "$name"
}

# start_bg NAME LOGFILE CMD [ARGS...]: start CMD detached (own session), record its pid.
start_bg() {
  local name="$1" logfile="$2"
  shift 2
  mkdir -p "$(dirname "$logfile")"
  setsid nohup "$@" >>"$logfile" 2>&1 </dev/null &
  write_pid "$name" "$!"
}

# ---- services another checkout started -----------------------------------------
# Every checkout keeps its own state dir, but the ports are the machine's: a service that
# another tally checkout (or TALLY_STATE_DIR) started is found by its command line and
# reused as it is, like the machine's PostgreSQL; `down` leaves it to its owner.

# pids_with_arg REGEX: pids whose command line has an argument matching REGEX (whole arg).
pids_with_arg() {
  grep -lzxE -- "$1" /proc/[0-9]*/cmdline 2>/dev/null | while IFS= read -r f; do
    f="${f#/proc/}"
    printf '%s\n' "${f%/cmdline}"
  done
}

# arg_value PID FLAG: the value after FLAG (or of FLAG=VALUE) in the process's command line.
arg_value() {
  local prev="" a
  while IFS= read -r -d '' a; do
    if [[ "$prev" == "$2" ]]; then
      printf '%s\n' "$a"
      return 0
    fi
    if [[ "$a" == "$2="* ]]; then
      printf '%s\n' "${a#"$2="}"
      return 0
    fi
    prev="$a"
  done 2>/dev/null <"/proc/$1/cmdline"
  return 1
}

# stop_hint STATE_DIR: how to stop a service that the checkout with STATE_DIR started.
stop_hint() {
  if [[ "$1" == - ]]; then
    printf 'from the checkout that started it (make down there)'
  else
    printf 'with: TALLY_STATE_DIR=%s make down' "$1"
  fi
}

# ---- misc --------------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1; }

apt_updated=""
apt_install() {
  have apt-get || die "apt-get not found; install $* by hand"
  local sudo=""
  if [[ "$(id -u)" != 0 ]]; then
    have sudo || die "need root (or sudo) to apt-get install $*"
    sudo="sudo"
  fi
  if [[ -z "$apt_updated" ]]; then
    log "apt-get update"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$LOGS/apt.log" 2>&1 ||
      die "apt-get update failed (see $LOGS/apt.log)"
    apt_updated=1
  fi
  log "apt-get install $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$LOGS/apt.log" 2>&1 ||
    die "apt-get install $* failed (see $LOGS/apt.log)"
}

ensure_curl() { have curl || apt_install curl ca-certificates; }

