#!/usr/bin/env bash
# make observe: tally's metrics and alerts in a real Prometheus, locally.
# Starts Prometheus (Debian's package, installed if missing) on a free port with a generated
# config that scrapes a local `tally run` every 2 s and loads deploy/prometheus/alerts.yml;
# runs tally as the demo does (migrate, seed, run, gen) on topics and a consumer group of its
# own, with 5% malformed messages, so that TallyDeadLetterRate fires; shows, through
# Prometheus' HTTP API, the target's health, the scraped series and the alerts going
# pending and firing; then stops what it started. State: .local/observe (wiped each run).
#   OBSERVE_FOR=10s     `for:` of every rule in the loaded copy of alerts.yml (the rules'
#                       10-minute holds would outlast the run); OBSERVE_FOR=keep loads the
#                       file unchanged and succeeds once the alert is pending
#   OBSERVE_TIMEOUT=180 seconds to wait for a firing alert
#   OBSERVE_KEEP=1      leave Prometheus and tally running (prints how to stop them)
#   TALLY_BIN           tally binary (default $CARGO_TARGET_DIR/debug/tally)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
# shellcheck source=env.sh
source "$here/env.sh"
# shellcheck source=../prometheus/install.sh
source "$REPO/deploy/prometheus/install.sh"

TALLY_BIN="${TALLY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/tally}"
[[ -x "$TALLY_BIN" ]] || die "tally binary not found at $TALLY_BIN (run: make build, or set TALLY_BIN)"
OBSERVE_FOR="${OBSERVE_FOR:-10s}"
OBSERVE_TIMEOUT="${OBSERVE_TIMEOUT:-180}"
ALERT=TallyDeadLetterRate
OBS="$STATE/observe"

ensure_prometheus
ensure_curl
have python3 || apt_install python3

# ---- what this run started, stopped on exit ----------------------------------------------------
prom_pid=""
run_pid=""
stop_one() { # NAME PID
  local name="$1" pid="$2" deadline
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 40))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    warn "$name did not stop within 40 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  if [[ "${OBSERVE_KEEP:-}" == 1 ]]; then
    log "left running (OBSERVE_KEEP=1): tally pid $run_pid, prometheus pid $prom_pid; stop them with: kill $run_pid $prom_pid"
    return 0
  fi
  stop_one "tally run" "$run_pid"
  stop_one prometheus "$prom_pid"
  rm -f "$OBS/tally.pid" "$OBS/prometheus.pid"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A previous run that was killed before its clean-up: stop what its pid files name, if it is
# still what this script started.
for name in tally prometheus; do
  f="$OBS/$name.pid"
  if [[ -s "$f" ]]; then
    pid="$(tr -dc '0-9' <"$f")"
    if [[ -n "$pid" ]] && grep -q "$OBS" "/proc/$pid/environ" "/proc/$pid/cmdline" 2>/dev/null; then
      stop_one "$name left by an earlier observe run" "$pid"
    fi
    rm -f "$f"
  fi
done
rm -rf "$OBS"
mkdir -p "$OBS"

# free_port FROM: the first port from FROM on that nothing listens on.
free_port() {
  local p
  for ((p = $1; p < $1 + 200; p++)); do
    port_open 127.0.0.1 "$p" || { printf '%s\n' "$p"; return 0; }
  done
  die "no free port in $1..$(($1 + 199))"
}
tally_port="$(free_port 19898)"
prom_port="$(free_port 19090)"

# ---- tally's settings: the local services, topics and a group of its own ------------------------
export TALLY_CONFIG="$here/demo.toml"
export TALLY__SERVER__LISTEN="127.0.0.1:$tally_port"
export TALLY__KAFKA__GROUP_ID=tally-observe
export TALLY__KAFKA__INSTANCE_ID=observe-1
export TALLY__KAFKA__USAGE_TOPIC=observe.llm.usage.v1
export TALLY__KAFKA__DLQ_TOPIC=observe.llm.usage.v1.dlq
export TALLY__KAFKA__VIOLATION_TOPIC=observe.compliance.violation.v1
export TALLY__POLICY__TOPIC=observe.policy.decision.v1
export TALLY__POLICY__DLQ_TOPIC=observe.policy.decision.v1.dlq
export TALLY__AUDIT__TOPIC=observe.audit.event.v1
export TALLY__AUDIT__DLQ_TOPIC=observe.audit.event.v1.dlq
export TALLY__AUDIT__CHECKPOINT_TOPIC=observe.audit.checkpoint.v1
keys="$("$TALLY_BIN" audit keygen observe.tally.local/audit | grep -v '^#')"
TALLY__AUDIT__SIGNING_KEY="$(sed -n 1p <<<"$keys")"
TALLY__AUDIT__PSEUDONYM_KEY="$(head -c 32 /dev/urandom | base64)"
export TALLY__AUDIT__SIGNING_KEY TALLY__AUDIT__PSEUDONYM_KEY

# ---- Prometheus -------------------------------------------------------------------------------
rules="$OBS/alerts.yml"
if [[ "$OBSERVE_FOR" == keep ]]; then
  cp "$REPO/deploy/prometheus/alerts.yml" "$rules"
  log "rules: deploy/prometheus/alerts.yml unchanged"
else
  sed -E "s/^([[:space:]]+for:)[[:space:]].*/\1 $OBSERVE_FOR/" "$REPO/deploy/prometheus/alerts.yml" >"$rules"
  log "rules: deploy/prometheus/alerts.yml with every 'for:' set to $OBSERVE_FOR (expressions unchanged; OBSERVE_FOR=keep loads it as it is)"
fi
cat >"$OBS/prometheus.yml" <<EOF
# Generated by deploy/local/observe.sh
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
  - $rules
scrape_configs:
  - job_name: tally
    static_configs:
      - targets: ["127.0.0.1:$tally_port"]
EOF
promtool check config "$OBS/prometheus.yml" >"$OBS/promtool.log" 2>&1 || { cat "$OBS/promtool.log" >&2; die "promtool check config failed"; }

prom="http://127.0.0.1:$prom_port"
log "starting Prometheus on $prom (config $OBS/prometheus.yml, log $OBS/prometheus.log)"
prometheus --config.file="$OBS/prometheus.yml" --storage.tsdb.path="$OBS/data" \
  --storage.tsdb.retention.time=1h --web.listen-address="127.0.0.1:$prom_port" \
  >"$OBS/prometheus.log" 2>&1 </dev/null &
prom_pid=$!
printf '%s\n' "$prom_pid" >"$OBS/prometheus.pid"
wait_for 30 "Prometheus at $prom" curl -fsS "$prom/-/ready" ||
  { tail -n 20 "$OBS/prometheus.log" >&2; die "Prometheus did not start"; }

# Formats Prometheus API answers (stdin) for the terminal: fmt.py query|alerts|targets|rules
cat >"$OBS/fmt.py" <<'PY'
import json, sys

data = json.load(sys.stdin)["data"]
mode = sys.argv[1]


def labels(d, skip=("__name__",)):
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if k not in skip) + "}"


if mode == "query":
    if not data["result"]:
        print("    (no series)")
    for r in data["result"]:
        print(f"    {labels(r['metric'])} {r['value'][1]}")
elif mode == "alerts":
    for a in data["alerts"]:
        print(f"{a['state']:8} {a['labels']['alertname']} {labels(a['labels'], ('alertname',))} active since {a['activeAt']}")
elif mode == "targets":
    for t in data["activeTargets"]:
        print(f"  job={t['labels']['job']} {t['scrapeUrl']} health={t['health']} last error={t['lastError'] or '-'}")
elif mode == "rules":
    for g in data["groups"]:
        bad = [r["name"] for r in g["rules"] if r.get("health") != "ok"]
        state = "errors in " + ", ".join(bad) if bad else "ok"
        print(f"  group {g['name']} from {g['file']}: {len(g['rules'])} rules, evaluation {state}")
PY
# api PATH [CURL_ARGS...]: GET Prometheus' HTTP API, the JSON on stdout.
api() { local path="$1"; shift; curl -fsS -G "$prom$path" "$@"; }
# show_query TITLE PROMQL: the query's result, one series a line.
show_query() {
  printf '  %s\n    GET /api/v1/query?query=%s\n' "$1" "$2"
  api /api/v1/query --data-urlencode "query=$2" | python3 "$OBS/fmt.py" query
}
# alerts: one line per active alert (state, name, labels).
alerts() { api /api/v1/alerts | python3 "$OBS/fmt.py" alerts; }

# ---- tally ------------------------------------------------------------------------------------
log "tally migrate"
"$TALLY_BIN" migrate >"$OBS/migrate.log" 2>&1 || { cat "$OBS/migrate.log" >&2; die "tally migrate failed"; }
log "tally seed"
"$TALLY_BIN" seed --scale 0.3 >"$OBS/seed.log" 2>&1 || { cat "$OBS/seed.log" >&2; die "tally seed failed"; }
log "starting tally run, /metrics on 127.0.0.1:$tally_port (log $OBS/tally.log)"
"$TALLY_BIN" run >"$OBS/tally.log" 2>&1 </dev/null &
run_pid=$!
printf '%s\n' "$run_pid" >"$OBS/tally.pid"
wait_for 60 "tally's /livez" curl -fsS "http://127.0.0.1:$tally_port/livez" ||
  { tail -n 30 "$OBS/tally.log" >&2; die "tally run did not come up"; }

log "Prometheus' target (GET /api/v1/targets):"
wait_for 30 "the scrape of tally" bash -c "curl -fsS '$prom/api/v1/targets' | grep -q '\"health\":\"up\"'" ||
  warn "the target is not up yet"
api /api/v1/targets | python3 "$OBS/fmt.py" targets >&2

log "tally gen (in the background): 30000 usage events at 2000/s, 3000 policy and 3000 audit events at 200/s, 5% malformed (dead letters)"
gen_pids=()
"$TALLY_BIN" gen --count 30000 --rate 2000 --malformed 0.05 --duplicates 0.01 >"$OBS/gen-usage.log" 2>&1 &
gen_pids+=($!)
"$TALLY_BIN" gen --stream policy --count 3000 --rate 200 --malformed 0.05 >"$OBS/gen-policy.log" 2>&1 &
gen_pids+=($!)
"$TALLY_BIN" gen --stream audit --count 3000 --rate 200 --malformed 0.05 >"$OBS/gen-audit.log" 2>&1 &
gen_pids+=($!)

# ---- alerts -----------------------------------------------------------------------------------
log "watching the alerts until $ALERT fires, at most ${OBSERVE_TIMEOUT}s (GET /api/v1/alerts every 2 s)"
deadline=$((SECONDS + OBSERVE_TIMEOUT))
last=""
fired=0
generating=1
while ((SECONDS < deadline)); do
  now="$(alerts)"
  if [[ "$now" != "$last" ]]; then
    log "active alerts:"
    if [[ -n "$now" ]]; then sed 's/^/  /' <<<"$now" >&2; else echo "  (none)" >&2; fi
    last="$now"
  fi
  if ((generating)) && ! kill -0 "${gen_pids[@]}" 2>/dev/null; then
    generating=0
    for pid in "${gen_pids[@]}"; do
      wait "$pid" || { cat "$OBS"/gen-*.log >&2; die "tally gen failed"; }
    done
    log "tally gen done:"
    grep -h '^gen: sent [0-9]* messages to' "$OBS"/gen-*.log | sed 's/^/  /' >&2
  fi
  if grep -q "^firing  *$ALERT " <<<"$now" ||
    { [[ "$OBSERVE_FOR" == keep ]] && grep -q "^pending  *$ALERT " <<<"$now"; }; then
    fired=1
    ((generating)) || break
  fi
  kill -0 "$run_pid" 2>/dev/null || { tail -n 30 "$OBS/tally.log" >&2; die "tally run exited"; }
  sleep 2
done

log "series scraped from tally, queried through Prometheus (GET /api/v1/query):"
{
  show_query "scrape health" 'up{job="tally"}'
  show_query "messages consumed per stream" 'sum by (stream) (tally_messages_consumed_total{job="tally"})'
  show_query "dead letters per stream" 'sum by (stream) (tally_dead_letters_total{job="tally"})'
  show_query "the most frequent dead-letter classes" 'topk(5, sum by (stream, class) (tally_dead_letters_total{job="tally"}))'
  show_query "$ALERT's expression (dead-lettered share over 10 min, alert above 0.01)" \
    'sum by (job, stream) (rate(tally_dead_letters_total[10m])) / sum by (job, stream) (rate(tally_messages_consumed_total[10m]))'
  show_query "the ALERTS series" 'ALERTS{job="tally"}'
} >&2
log "rule groups loaded (GET /api/v1/rules):"
api /api/v1/rules | python3 "$OBS/fmt.py" rules >&2

if ((fired)) && [[ "$OBSERVE_FOR" == keep ]]; then
  log "$ALERT is pending in Prometheus at $prom (with the rules' own 'for:' it fires after 10 minutes of dead letters)"
elif ((fired)); then
  log "$ALERT is firing in Prometheus at $prom"
else
  err "$ALERT did not fire within ${OBSERVE_TIMEOUT}s (tally log: $OBS/tally.log)"
  exit 1
fi
