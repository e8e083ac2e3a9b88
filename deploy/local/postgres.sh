#!/usr/bin/env bash
# Local PostgreSQL on 127.0.0.1:5432 with role `tally` and database `tally`.
# The machine's PostgreSQL is shared with other projects: an already running server is used
# as is, and `down` only stops a cluster that these scripts started (marker file).
# Usage: postgres.sh up|down|status
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOST=127.0.0.1
PORT=5432
MARKER="$PIDS/postgres.started-by-tally"
export PGCONNECT_TIMEOUT=5

pg_ready() {
  if have pg_isready; then
    pg_isready -q -h "$HOST" -p "$PORT"
  else
    port_open "$HOST" "$PORT"
  fi
}

# psql as a superuser: over TCP as `postgres` (works with trust auth), otherwise through the
# local socket with peer auth as the postgres OS user (a fresh Debian install).
ADMIN_MODE=""
pick_admin() {
  [[ -n "$ADMIN_MODE" ]] && return 0
  if psql -h "$HOST" -p "$PORT" -U postgres -d postgres -XAtqc 'select 1' >/dev/null 2>&1; then
    ADMIN_MODE=tcp
  elif [[ "$(id -u)" == 0 ]] && runuser -u postgres -- psql -p "$PORT" -d postgres -XAtqc 'select 1' >/dev/null 2>&1; then
    ADMIN_MODE=runuser
  elif have sudo && sudo -n -u postgres psql -p "$PORT" -d postgres -XAtqc 'select 1' >/dev/null 2>&1; then
    ADMIN_MODE=sudo
  else
    die "cannot connect to PostgreSQL as a superuser (tried psql -h $HOST -U postgres, and peer auth as the postgres OS user)"
  fi
}

pg_admin() {
  pick_admin
  case "$ADMIN_MODE" in
    tcp) psql -h "$HOST" -p "$PORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1" ;;
    runuser) (cd / && runuser -u postgres -- psql -p "$PORT" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1") ;;
    sudo) (cd / && sudo -n -u postgres psql -p "$PORT" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1") ;;
  esac
}

tally_connects() {
  psql -h "$HOST" -p "$PORT" -U tally -d tally -XAtqc 'select 1' </dev/null >/dev/null 2>&1
}

# first_cluster: "VERSION NAME" of the installed cluster on our port (else the first one).
first_cluster() {
  pg_lsclusters -h 2>/dev/null | awk -v port="$PORT" '
    $3 == port { print $1, $2; found = 1; exit }
    NR == 1 { first = $1 " " $2 }
    END { if (!found && first != "") print first }'
}

start_cluster() {
  local cl ver name
  cl="$(first_cluster)"
  [[ -n "$cl" ]] || die "no PostgreSQL cluster found (pg_lsclusters shows none); create one with pg_createcluster"
  read -r ver name <<<"$cl"
  log "starting PostgreSQL cluster $ver/$name"
  pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start ||
    die "pg_ctlcluster $ver $name start failed (see /var/log/postgresql/postgresql-$ver-$name.log)"
  printf '%s %s\n' "$ver" "$name" >"$MARKER"
}

cmd_up() {
  if pg_ready; then
    if [[ -f "$MARKER" ]]; then
      log "postgres: already running (started by tally) at $HOST:$PORT"
    else
      log "postgres: using the PostgreSQL already running at $HOST:$PORT"
    fi
  else
    if ! have pg_lsclusters || [[ -z "$(first_cluster)" ]]; then
      apt_install postgresql
    fi
    start_cluster
    wait_for 30 "PostgreSQL at $HOST:$PORT" pg_ready || die "PostgreSQL did not become ready on $HOST:$PORT"
  fi

  if tally_connects; then
    return 0 # role, database and access are already in place
  fi
  if [[ "$(pg_admin "select 1 from pg_roles where rolname = 'tally'")" != 1 ]]; then
    log "creating role tally"
    pg_admin "CREATE ROLE tally LOGIN SUPERUSER" >/dev/null
  fi
  if [[ "$(pg_admin "select 1 from pg_database where datname = 'tally'")" != 1 ]]; then
    log "creating database tally"
    pg_admin "CREATE DATABASE tally OWNER tally" >/dev/null
  fi
  if ! tally_connects; then
    local hba
    hba="$(pg_admin 'SHOW hba_file')"
    [[ -w "$hba" ]] || die "role tally cannot connect over $HOST and $hba is not writable; add 'host all all 127.0.0.1/32 trust' at its top by hand"
    log "NOTE: role tally cannot connect over $HOST:$PORT; adding 'host all all 127.0.0.1/32 trust' at the top of $hba and reloading"
    cp -p "$hba" "$hba.before-tally"
    { echo "host all all 127.0.0.1/32 trust  # added by tally deploy/local/postgres.sh"; cat "$hba.before-tally"; } >"$hba"
    pg_admin 'SELECT pg_reload_conf()' >/dev/null
    wait_for 10 "role tally to connect to $HOST:$PORT/tally" tally_connects ||
      die "role tally still cannot connect to $HOST:$PORT/tally"
  fi
  log "postgres: role and database tally ready at $HOST:$PORT"
}

cmd_down() {
  if [[ -f "$MARKER" ]]; then
    local ver name
    read -r ver name <"$MARKER"
    log "stopping PostgreSQL cluster $ver/$name (started by tally)"
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" stop || warn "pg_ctlcluster $ver $name stop failed"
    rm -f "$MARKER"
  else
    log "postgres: left running (it was not started by tally; the machine's PostgreSQL is shared)"
  fi
}

cmd_status() {
  local version state
  if pg_ready; then
    version="$(psql -h "$HOST" -p "$PORT" -U tally -d tally -XAtqc 'SHOW server_version' 2>/dev/null </dev/null ||
      psql -h "$HOST" -p "$PORT" -U postgres -d postgres -XAtqc 'SHOW server_version' 2>/dev/null </dev/null || echo '?')"
    version="${version%% *}"
    if [[ -f "$MARKER" ]]; then state=up; else state="up (shared, not started by tally)"; fi
    tally_connects || state="$state; role/db tally NOT ready (run up)"
  else
    version="-"
    state=DOWN
  fi
  printf '%-11s %-22s %-28s %s\n' postgres "$HOST:$PORT" "PostgreSQL $version" "$state"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: $0 up|down|status" ;;
esac
