#!/usr/bin/env bash
# Throughput benchmark (make bench runs up + a release build first).
# Restarts the broker on empty state so the run starts clean (noida-db keeps everything in memory),
# recreates the topics with `tally migrate`, then runs `tally bench`.
#   TALLY_BIN:   tally binary (default $CARGO_TARGET_DIR/release/tally)
#   BENCH_COUNT: events (default 1000000)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
# shellcheck source=env.sh
source "$here/env.sh"

TALLY_BIN="${TALLY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/tally}"
[[ -x "$TALLY_BIN" ]] || die "tally binary not found at $TALLY_BIN (run: cargo build --release -p tally, or set TALLY_BIN)"

log "restarting the broker on empty state"
"$here/broker.sh" down
rm -rf "$STATE/noida"
"$here/broker.sh" up

log "tally migrate (recreates the topics on the fresh broker)"
"$TALLY_BIN" migrate

log "tally bench --count ${BENCH_COUNT:-1000000}"
"$TALLY_BIN" bench --count "${BENCH_COUNT:-1000000}"
