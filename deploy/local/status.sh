#!/usr/bin/env bash
# One line per local service: name, address, version, up/DOWN. Exits 1 if any is DOWN.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

out="$("$here/broker.sh" status; "$here/clickhouse.sh" status; "$here/postgres.sh" status)"
printf '%s\n' "$out"
if grep -q 'DOWN' <<<"$out"; then exit 1; fi
