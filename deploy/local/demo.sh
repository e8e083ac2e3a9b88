#!/usr/bin/env bash
# End-to-end demo against the local services (make demo runs up + build first):
# migrate, seed, run the pipeline in the background on all three streams, generate
# ~25 s of usage traffic plus policy decisions (OPA decision logs among them) and
# audit events (duplicates, late and malformed messages included), wait until it
# caught up, stop, report, and verify every tenant's audit log against its signed
# checkpoints.
#   TALLY_BIN: tally binary (default $CARGO_TARGET_DIR/debug/tally)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
# shellcheck source=env.sh
source "$here/env.sh"

TALLY_BIN="${TALLY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/tally}"
[[ -x "$TALLY_BIN" ]] || die "tally binary not found at $TALLY_BIN (run: make build, or set TALLY_BIN)"
RUN_LOG="$LOGS/demo-run.log"

run_pid=""
stop_run() {
  [[ -n "$run_pid" ]] || return 0
  if kill -0 "$run_pid" 2>/dev/null; then
    log "stopping tally run (pid $run_pid) with SIGTERM"
    kill -TERM "$run_pid" 2>/dev/null || true
    local deadline=$((SECONDS + 40))
    while kill -0 "$run_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$run_pid" 2>/dev/null; then
      warn "tally run did not stop within 40 s; sending SIGKILL"
      kill -KILL "$run_pid" 2>/dev/null || true
    fi
  fi
  local rc=0
  wait "$run_pid" 2>/dev/null || rc=$?
  run_pid=""
  return "$rc"
}
trap 'stop_run || true' EXIT
trap 'exit 130' INT TERM

# The audit log's signing key and the pseudonym key: made once per checkout,
# kept in .local/ (never commit such keys; production reads them from secrets).
KEYS="$STATE/demo-audit-keys.env"
if [[ ! -s "$KEYS" ]]; then
  log "making the demo's audit signing key and pseudonym key ($KEYS)"
  keys="$("$TALLY_BIN" audit keygen demo.tally.local/audit | grep -v '^#')"
  {
    printf 'export TALLY__AUDIT__SIGNING_KEY=%q\n' "$(sed -n 1p <<<"$keys")"
    printf 'export TALLY_DEMO_PUBLIC_KEY=%q\n' "$(sed -n 2p <<<"$keys")"
    printf 'export TALLY__AUDIT__PSEUDONYM_KEY=%q\n' "$(head -c 32 /dev/urandom | base64)"
  } >"$KEYS"
  chmod 600 "$KEYS"
fi
# shellcheck source=/dev/null
source "$KEYS"
export TALLY_CONFIG="${TALLY_CONFIG:-$here/demo.toml}"

log "tally migrate"
"$TALLY_BIN" migrate
log "tally seed"
# budgets and quotas are sized for 200k events; this run sends 60k
"$TALLY_BIN" seed --scale 0.3

log "starting tally run in the background (log: $RUN_LOG)"
: >"$RUN_LOG"
# Static membership: a restart after a crash takes the partitions back at once.
TALLY__KAFKA__INSTANCE_ID="${TALLY__KAFKA__INSTANCE_ID:-demo-1}" "$TALLY_BIN" run >>"$RUN_LOG" 2>&1 &
run_pid=$!
sleep 1
kill -0 "$run_pid" 2>/dev/null || { tail -n 30 "$RUN_LOG" >&2; die "tally run exited at once"; }

log "tally gen: 60000 events at 2500/s (~25 s), mixed encodings, 2% duplicates, 2% late, 0.5% malformed"
"$TALLY_BIN" gen --count 60000 --rate 2500 --encoding mixed --duplicates 0.02 --late 0.02 --malformed 0.005

log "tally gen: 6000 policy decisions (30% as OPA decision-log events) and 6000 audit events, 2% duplicates, 0.5% malformed"
"$TALLY_BIN" gen --stream policy --count 6000 --opa-share 0.3 --duplicates 0.02 --malformed 0.005
"$TALLY_BIN" gen --stream audit --count 6000 --duplicates 0.02 --malformed 0.005

log "waiting for the pipeline to catch up"
"$TALLY_BIN" wait-idle --timeout 90

rc=0
stop_run || rc=$?
if ((rc != 0)); then
  warn "tally run exited with status $rc (log: $RUN_LOG)"
fi

log "tally report"
"$TALLY_BIN" report --limit 15

log "tally audit verify: every tenant's log recomputed from ClickHouse against its signed checkpoints"
vrc=0
"$TALLY_BIN" audit verify || vrc=$?
if ((vrc != 0)); then
  warn "tally audit verify exited with $vrc"
  rc=$vrc
else
  log "audit logs intact; an auditor checks them with the public key $TALLY_DEMO_PUBLIC_KEY"
fi
exit "$rc"
