#!/usr/bin/env bash
# Start the local services tally needs: Kafka-protocol broker, ClickHouse, PostgreSQL.
# Idempotent: a second run while everything is up returns in well under a second.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

"$here/broker.sh" up
"$here/clickhouse.sh" up
"$here/postgres.sh" up
log "all services up; connection env: eval \"\$($here/env.sh)\""
