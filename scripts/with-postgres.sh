#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL server beside it, its URL in
# POWERNODE_TEST_POSTGRES (postgres://USER@127.0.0.1:PORT, no database): how `make test`
# runs the controller's test suite on PostgreSQL (controller/tests/common/database.rs gives
# every controller of a test a database of its own). The cluster skips fsync — a test checks
# what the controller does, not the disk — and is deleted afterwards, whatever the command did.
#
#   scripts/with-postgres.sh cargo test -p powernode-controller
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/require.sh
. scripts/lib/require.sh
# shellcheck source=lib/postgres.sh
. scripts/lib/postgres.sh

[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
if ! pg_bindir >/dev/null 2>&1; then
    require "the PostgreSQL run of: $*" initdb || exit 0
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/powernode-pg.XXXXXX")
rmdir "$dir"
trap pg_stop EXIT
pg_start "$dir" fsync=off synchronous_commit=off full_page_writes=off max_connections=1000
echo "with-postgres: PostgreSQL at $PG_URL" >&2
POWERNODE_TEST_POSTGRES=$PG_URL "$@"
