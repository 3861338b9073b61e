# shellcheck shell=bash
# Sourced by scripts that need a PostgreSQL server of their own (the controller's test suite
# on PostgreSQL, bench-fleet.sh): a throwaway cluster from Debian's `postgresql` package,
# initdb'd into a temp dir as an unprivileged user (`postgres` when run as root), on
# 127.0.0.1 and a unix socket in that dir, trusting local connections, stopped and deleted
# by pg_stop.
#
#   pg_start DIR [SETTING=VALUE...]   starts a cluster in DIR (created, must not exist); sets
#                                     PG_URL=postgres://USER@127.0.0.1:PORT (no database)
#   pg_createdb NAME                  creates database NAME on it (its URL: $PG_URL/NAME)
#   pg_stop                           stops it (fast shutdown) and removes DIR

pg_bindir() {
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] || { echo "postgresql is not installed (apt-get install postgresql)" >&2; return 1; }
    echo "$dir"
}

pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs a command as the cluster's owner.
pg_as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
    local dir=$1 bin port user setting
    shift
    bin=$(pg_bindir) || return 1
    port=$(pg_free_port)
    user=$(if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    PG_DIR=$dir
    PG_BIN=$bin
    pg_as_owner "$bin/initdb" -D "$dir/data" -U "$user" --auth=trust -E UTF8 --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        for setting in "$@"; do echo "${setting%%=*} = ${setting#*=}"; done
    } >>"$dir/data/postgresql.conf"
    pg_as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null ||
        { cat "$dir/server.log" >&2; return 1; }
    PG_URL="postgres://$user@127.0.0.1:$port"
    export PG_URL
}

pg_createdb() {
    "$PG_BIN/psql" -q -v ON_ERROR_STOP=1 "$PG_URL/postgres" -c "CREATE DATABASE $1" >/dev/null
}

pg_stop() {
    [ -n "${PG_DIR:-}" ] || return 0
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
    PG_DIR=
}
