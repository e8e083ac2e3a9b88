#!/usr/bin/env bash
# Connection env for tally against the local services.
#   eval "$(deploy/local/env.sh)"      # export into the current shell
#   source deploy/local/env.sh          # same, quietly
#   deploy/local/env.sh CMD [ARGS...]   # run CMD with it
_tally_env() {
  export TALLY__KAFKA__BROKERS=127.0.0.1:9092
  export TALLY__CLICKHOUSE__URL=http://127.0.0.1:8123
  export TALLY__POSTGRES__URL=postgres://tally@127.0.0.1:5432/tally
}
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  _tally_env # sourced
  unset -f _tally_env
  return 0
fi
set -euo pipefail
_tally_env
if (($# > 0)); then
  exec "$@"
fi
printf 'export %s=%s\n' \
  TALLY__KAFKA__BROKERS "$TALLY__KAFKA__BROKERS" \
  TALLY__CLICKHOUSE__URL "$TALLY__CLICKHOUSE__URL" \
  TALLY__POSTGRES__URL "$TALLY__POSTGRES__URL"
