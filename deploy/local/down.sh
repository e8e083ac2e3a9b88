#!/usr/bin/env bash
# Stop the local services that these scripts started. State stays in $STATE (.local/), so
# up.sh restarts from it. The machine's shared PostgreSQL is left alone unless up.sh started it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

rc=0
"$here/broker.sh" down || rc=1
"$here/clickhouse.sh" down || rc=1
"$here/postgres.sh" down || rc=1
exit "$rc"
