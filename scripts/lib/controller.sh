# shellcheck shell=bash
# Sourced by the benchmark scripts: a controller of their own on a free loopback port, stopped
# by its pid.
#
#   controller_start BIN DATA LOG [SERVE_ARG...]
#       starts BIN/powernode-controller serve --data DATA --listen 127.0.0.1:0 SERVE_ARG...
#       (RUST_LOG=warn unless set), stdout in LOG.out and stderr in LOG.err; sets pid and addr
#       (HOST:PORT); fails, printing the end of its stderr, when it exits or does not listen
#       within 30 s
#   controller_stop
#       SIGTERM, SIGKILL after 10 s, reaped; nothing when none runs

pid=
addr=

controller_start() {
    local bin=$1 data=$2 log=$3
    shift 3
    RUST_LOG=${RUST_LOG:-warn} "$bin/powernode-controller" serve --data "$data" \
        --listen 127.0.0.1:0 "$@" >"$log.out" 2>"$log.err" &
    pid=$!
    addr=
    for _ in $(seq 300); do
        addr=$(sed -n 's/^listening on //p' "$log.out")
        [ -n "$addr" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "the controller ($data) did not start:" >&2
    tail -n 20 "$log.err" >&2
    return 1
}

controller_stop() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    pid=
}
