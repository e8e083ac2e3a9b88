#!/usr/bin/env bash
# Benchmark (make bench runs up + a release build first): tally-bench against private
# services started here, so the figures count only this run's traffic and nobody else's
# topics or tables are touched:
#   - noida-db on 127.0.0.1:$BENCH_BROKER_PORT (default 29092), empty state (it keeps
#     everything in memory: a fresh one per run);
#   - ClickHouse 18.16 on 127.0.0.1:$BENCH_CH_HTTP_PORT / $BENCH_CH_TCP_PORT (28123 / 29000)
#     with the <kafka> settings its Kafka engine needs (read only at server start:
#     auto_offset_reset=smallest, receive_message_max_bytes for noida's one-reply fetches);
#   - Postgres is the shared one (database tally_bench).
# Both are stopped afterwards (BENCH_KEEP=1 keeps them).
#   TALLY_BIN / TALLY_BENCH_BIN: binaries (default $CARGO_TARGET_DIR/release/{tally,tally-bench})
#   BENCH_COUNT: events (default 1000000); BENCH_ARGS: more tally-bench flags
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
# shellcheck source=env.sh
source "$here/env.sh"

target="${CARGO_TARGET_DIR:-$REPO/target}/release"
TALLY_BIN="${TALLY_BIN:-$target/tally}"
TALLY_BENCH_BIN="${TALLY_BENCH_BIN:-$target/tally-bench}"
[[ -x "$TALLY_BIN" ]] || die "tally binary not found at $TALLY_BIN (cargo build --release -p tally -p tally-bench)"
[[ -x "$TALLY_BENCH_BIN" ]] || die "tally-bench binary not found at $TALLY_BENCH_BIN (cargo build --release -p tally -p tally-bench)"
export TALLY_BIN

BROKER_PORT="${BENCH_BROKER_PORT:-29092}"
CH_HTTP="${BENCH_CH_HTTP_PORT:-28123}"
CH_TCP="${BENCH_CH_TCP_PORT:-29000}"
DIR="$STATE/bench"
NOIDA_BIN="$CACHE/noida/bin/noida-db"
CH_BIN=/usr/sbin/clickhouse-server

for p in "$BROKER_PORT" "$CH_HTTP" "$CH_TCP"; do
  port_open 127.0.0.1 "$p" && die "port $p is in use: stop the earlier bench services or set BENCH_*_PORT"
done
[[ -x "$NOIDA_BIN" ]] || "$here/broker.sh" up # builds noida-db into the cache if missing
[[ -x "$CH_BIN" ]] || "$here/clickhouse.sh" up

rm -rf "$DIR"
mkdir -p "$DIR/noida" "$DIR/ch/etc/config.d" "$DIR/ch/log" "$DIR/ch/data" "$DIR/ch/tmp" "$DIR/ch/user_files" "$DIR/ch/format_schemas"
cat >"$DIR/ch/etc/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>$DIR/ch/log/server.log</log><errorlog>$DIR/ch/log/server.err.log</errorlog><size>100M</size><count>2</count></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CH_HTTP</http_port>
    <tcp_port>$CH_TCP</tcp_port>
    <path>$DIR/ch/data/</path>
    <tmp_path>$DIR/ch/tmp/</tmp_path>
    <user_files_path>$DIR/ch/user_files/</user_files_path>
    <format_schema_path>$DIR/ch/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <max_concurrent_queries>100</max_concurrent_queries>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
</yandex>
XML
cat >"$DIR/ch/etc/users.xml" <<'XML'
<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
# The Kafka engine's librdkafka settings (dots written as underscores).
cat >"$DIR/ch/etc/config.d/kafka.xml" <<'XML'
<?xml version="1.0"?>
<yandex>
    <kafka>
        <auto_offset_reset>smallest</auto_offset_reset>
        <receive_message_max_bytes>2147483647</receive_message_max_bytes>
    </kafka>
</yandex>
XML

stop_services() {
  [[ "${BENCH_KEEP:-0}" == 1 ]] && { log "bench services left running (BENCH_KEEP=1)"; return 0; }
  stop_pid bench-clickhouse 60
  stop_pid bench-noida 20
}
trap stop_services EXIT

log "starting a private noida-db on 127.0.0.1:$BROKER_PORT and ClickHouse on $CH_HTTP/$CH_TCP (files in $DIR)"
start_bg bench-noida "$DIR/noida.log" "$NOIDA_BIN" start --data-dir "$DIR/noida" --only kafka --host 127.0.0.1 --kafka-port "$BROKER_PORT"
(cd "$DIR/ch" && start_bg bench-clickhouse "$DIR/ch/log/stdout.log" "$CH_BIN" --config-file="$DIR/ch/etc/config.xml")
wait_for 30 "noida-db on $BROKER_PORT" port_open 127.0.0.1 "$BROKER_PORT"
wait_for 60 "ClickHouse /ping on $CH_HTTP" bash -c "[[ \"\$(curl -s http://127.0.0.1:$CH_HTTP/ping)\" == Ok* ]]"

export TALLY__KAFKA__BROKERS="127.0.0.1:$BROKER_PORT"
export TALLY__CLICKHOUSE__URL="http://127.0.0.1:$CH_HTTP"
TALLY_BENCH_BROKER_PID="$(read_pid bench-noida)"
TALLY_BENCH_CLICKHOUSE_PID="$(read_pid bench-clickhouse)"
export TALLY_BENCH_BROKER_PID TALLY_BENCH_CLICKHOUSE_PID TALLY_REPO="$REPO"

log "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
log "tally-bench --count ${BENCH_COUNT:-1000000} ${BENCH_ARGS:-}"
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
"$TALLY_BENCH_BIN" --count "${BENCH_COUNT:-1000000}" ${BENCH_ARGS:-}
