#!/usr/bin/env bash
# Fleet benchmark: the controller with 10,000 simulated nodes living as real ones do, on each
# storage backend, and the closed-loop heartbeat maximum of 1,000 nodes.
#
# Builds in release, then for each backend of BENCH_BACKENDS ("sqlite postgres"):
#   1. starts `powernode-controller serve --listen 127.0.0.1:0 --data <tmp>` (postgres: with
#      `--database postgres://…` on a throwaway PostgreSQL cluster started here, fsync on,
#      from scripts/lib/postgres.sh) and runs `loadgen --mode fleet`: BENCH_NODES (10,000)
#      nodes enrol (real CSRs, BENCH_SETUP_CONCURRENCY at a time), then each heartbeats every
#      BENCH_INTERVAL s (30, staggered evenly) with a body of a few KiB, leases after every
#      heartbeat, holds a watch, raises an event batch in BENCH_EVENT_FRACTION (5%) of its
#      intervals and gets a task for BENCH_TASK_FRACTION (2%) of them through the operator API,
#      which it leases and completes; every node calls from its own source address in
#      127.0.0.0/8. BENCH_WARMUP s (35) of warm-up, then BENCH_SECONDS s (60) measured:
#      heartbeats/s, latency from the scheduled send time (p50/p99/max), errors by kind,
#      controller CPU (% of one core) and RSS, rss_kib_per_node = (RSS at the end - RSS
#      before the first node) / nodes;
#   2. starts a fresh controller (postgres: a fresh database) and runs loadgen's closed loop
#      (`--mode heartbeat --phases closed`) with 1,000 nodes: the ~330 B body bench-controller
#      has always used (closed_loop_1000_heartbeats_per_s, the target), then another 1,000
#      nodes with the fleet's body (closed_loop_1000_fleet_body_heartbeats_per_s, for
#      information).
# When `serve` has no --database option yet, the postgres backend is reported as
# {"skipped": "..."} and pass is false.
#
# Connections (BENCH_CONNECTIONS): `persistent` holds two keep-alive connections per node
# (calls and watch; 2 x nodes descriptors in the controller and in loadgen each); `per-call`
# opens a new one for every call, watches included, as the node's transport does (one held
# connection per node, the watch). `auto` (the default) takes persistent when the hard limit
# on open files allows 2 x nodes + 512, per-call otherwise, and says so.
#
# Targets (10,000 nodes, 30 s interval, watches held): p99 <= 50 ms, 0 errors (warm-up
# included), controller CPU <= 50% of one core, rss_kib_per_node <= 32, heartbeats/s at least
# 98% of nodes / interval; closed loop >= 3,000/s on SQLite, >= 2,000/s on PostgreSQL.
#
# Everything is on 127.0.0.1 and bounded; only processes started here are stopped (by pid;
# the PostgreSQL cluster by pg_ctl on its own data directory) and the temp dirs are removed
# on exit. Human-readable lines go to stderr; the last stdout line is one JSON object. Exit 0
# when the measurements were taken (whether or not targets were met), 1 when one failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh
# shellcheck source=scripts/lib/controller.sh
. scripts/lib/controller.sh

nodes=${BENCH_NODES:-10000}
interval=${BENCH_INTERVAL:-30}
warmup=${BENCH_WARMUP:-35}
seconds=${BENCH_SECONDS:-60}
closed_nodes=${BENCH_CLOSED_NODES:-1000}
closed_warmup=${BENCH_CLOSED_WARMUP:-3}
closed_seconds=${BENCH_CLOSED_SECONDS:-20}
backends=${BENCH_BACKENDS:-sqlite postgres}
connections=${BENCH_CONNECTIONS:-auto}
concurrency=${BENCH_SETUP_CONCURRENCY:-32}
event_fraction=${BENCH_EVENT_FRACTION:-0.05}
task_fraction=${BENCH_TASK_FRACTION:-0.02}

log() { echo "bench-fleet: $*" >&2; }
# The backend is chosen here, not by the environment `serve` would read.
unset POWERNODE_DATABASE

case $interval in
    ''|*[!0-9]*|0) log "BENCH_INTERVAL is whole seconds, at least 1"; exit 2 ;;
esac

log "building (release)"
cargo build --release --quiet -p powernode-controller --bins
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-fleet.XXXXXX")
cleanup() {
    controller_stop
    pg_stop
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Descriptors: every held connection, on each side (loadgen and the controller inherit this).
hard=$(ulimit -Hn)
persistent_need=$(( nodes * 2 + 512 ))
if [ "$connections" = auto ]; then
    if [ "$hard" = unlimited ] || [ "$hard" -ge "$persistent_need" ]; then
        connections=persistent
    else
        connections=per-call
        log "the hard limit on open files is $hard, under the $persistent_need that $nodes nodes" \
            "with two persistent connections each need: using per-call connections (what the" \
            "node's transport does; set BENCH_CONNECTIONS to choose)"
    fi
fi
ulimit -n "$hard"

# start_controller NAME [SERVE_ARG...]: a controller on a free loopback port with its data
# under $work/NAME; sets pid and addr.
start_controller() {
    local name=$1
    shift
    controller_start "$bin" "$work/$name" "$work/$name" --heartbeat-interval "${interval}s" "$@"
    log "controller ($name) pid $pid on $addr"
}

# controller_log_errors NAME: how many error or panic lines the controller logged.
controller_log_errors() {
    local count
    count=$(grep -ciE 'error|panic' "$work/$1.err" || true)
    if [ "$count" -gt 0 ]; then
        log "the controller ($1) logged $count error lines, the first:"
        grep -m 5 -iE 'error|panic' "$work/$1.err" >&2 || true
    fi
    echo "$count"
}

# run_loadgen NAME OUT ARG...: loadgen against the running controller NAME; its JSON in
# $work/OUT.json.
run_loadgen() {
    local name=$1 out=$2
    shift 2
    if ! "$bin/loadgen" --addr "$addr" --data "$work/$name" --controller-pid "$pid" "$@" \
        >"$work/$out.loadgen" 2> >(sed 's/^/  /' >&2); then
        log "loadgen ($out) failed"
        return 1
    fi
    tail -n 1 "$work/$out.loadgen" >"$work/$out.json"
}

# bench_backend BACKEND: the fleet and the closed loops, into $work/BACKEND-{fleet,closed,
# closed-fleet-body}.json and BACKEND-{fleet,closed}.log-errors; or BACKEND.skipped, why not.
bench_backend() {
    local backend=$1 fleet_db=() closed_db=()
    if [ "$backend" = postgres ]; then
        if ! "$bin/powernode-controller" serve --help | grep -q -- --database; then
            log "SKIPPED postgres: this powernode-controller has no 'serve --database' yet"
            echo "powernode-controller serve has no --database option yet" >"$work/$backend.skipped"
            return 0
        fi
        if ! pg_bindir >/dev/null; then
            echo "PostgreSQL is not installed" >"$work/$backend.skipped"
            return 0
        fi
        # Beside $work, not in it: the cluster's owner must reach it.
        pgdir=$(mktemp -d "${TMPDIR:-/tmp}/bench-fleet-pg.XXXXXX")
        rmdir "$pgdir"
        pg_start "$pgdir" "max_connections=500" "fsync=on" "synchronous_commit=on"
        log "PostgreSQL at $PG_URL (fsync on)"
        "$PG_BIN/psql" -q -v ON_ERROR_STOP=1 "$PG_URL/postgres" \
            -c "CREATE DATABASE fleet" -c "CREATE DATABASE closed" >/dev/null
        fleet_db=(--database "$PG_URL/fleet")
        closed_db=(--database "$PG_URL/closed")
    fi

    start_controller "$backend-fleet" "${fleet_db[@]}"
    run_loadgen "$backend-fleet" "$backend-fleet" --mode fleet --nodes "$nodes" --interval-s "$interval" \
        --warmup-s "$warmup" --duration-s "$seconds" --connections "$connections" \
        --setup-concurrency "$concurrency" --event-fraction "$event_fraction" \
        --task-fraction "$task_fraction"
    controller_stop
    controller_log_errors "$backend-fleet" >"$work/$backend-fleet.log-errors"

    start_controller "$backend-closed" "${closed_db[@]}"
    run_loadgen "$backend-closed" "$backend-closed" --mode heartbeat --phases closed \
        --nodes "$closed_nodes" --warmup-s "$closed_warmup" --duration-s "$closed_seconds" \
        --setup-concurrency "$concurrency"
    run_loadgen "$backend-closed" "$backend-closed-fleet-body" --mode heartbeat --phases closed --nodes "$closed_nodes" \
        --warmup-s "$closed_warmup" --duration-s "$closed_seconds" \
        --setup-concurrency "$concurrency" --body fleet
    controller_stop
    controller_log_errors "$backend-closed" >"$work/$backend-closed.log-errors"
    pg_stop
}

for backend in $backends; do
    case $backend in
        sqlite|postgres) ;;
        *) log "unknown backend $backend (sqlite, postgres)"; exit 2 ;;
    esac
    log "== $backend: $nodes nodes every $interval s, $connections connections, ${warmup} s" \
        "warm-up + ${seconds} s; then the closed loop of $closed_nodes nodes"
    bench_backend "$backend"
done

python3 - "$work" "$nodes" "$interval" "$backends" <<'PY'
import json, os, sys

work, nodes, interval, backends = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split()
targets = {
    "nodes": 10000,
    "interval_s": 30,
    "p99_ms": 50,
    "errors": 0,
    "controller_cpu_pct": 50,
    "rss_kib_per_node": 32,
    "heartbeats_per_s_of_expected": 0.98,
    "closed_loop_1000_heartbeats_per_s": {"sqlite": 3000, "postgres": 2000},
}

def load(name):
    with open(os.path.join(work, name)) as f:
        return json.loads(f.read())

def le(value, limit):
    return value is not None and value <= limit

out = {}
passed = True
for backend in backends:
    skipped = os.path.join(work, f"{backend}.skipped")
    if os.path.exists(skipped):
        out[backend] = {"skipped": open(skipped).read().strip()}
        passed = False
        continue
    fleet = load(f"{backend}-fleet.json")
    closed = load(f"{backend}-closed.json")["closed"]
    closed_fleet = load(f"{backend}-closed-fleet-body.json")["closed"]
    log_errors = sum(int(open(os.path.join(work, f"{backend}-{run}.log-errors")).read() or 0)
                     for run in ("fleet", "closed"))
    errors = fleet["errors"] + fleet["warmup_errors"]
    result = {
        "nodes": fleet["nodes"],
        "heartbeats_per_s": fleet["heartbeats_per_s"],
        "p50_ms": fleet["p50_ms"],
        "p99_ms": fleet["p99_ms"],
        "max_ms": fleet["max_ms"],
        "controller_cpu_pct": fleet["controller_cpu_pct"],
        "controller_rss_mib": fleet["controller_rss_mib"],
        "rss_kib_per_node": fleet["rss_kib_per_node"],
        "errors": errors,
        "closed_loop_1000_heartbeats_per_s": closed["heartbeats_per_s"],
        "closed_loop_1000_fleet_body_heartbeats_per_s": closed_fleet["heartbeats_per_s"],
        "closed_loop_errors": closed["errors"] + closed_fleet["errors"],
        "expected_per_s": fleet["expected_per_s"],
        "interval_s": fleet["interval_s"],
        "connections": fleet["connections"],
        "setup_s": fleet["setup"]["total_s"],
        "errors_by_kind": fleet["errors_by_kind"],
        "warmup_errors_by_kind": fleet["warmup_errors_by_kind"],
        "controller_hwm_mib": fleet["controller_hwm_mib"],
        "controller_log_errors": log_errors,
        "fleet": fleet,
    }
    checks = {
        "nodes": fleet["nodes"] >= targets["nodes"],
        "interval_s": fleet["interval_s"] <= targets["interval_s"] and fleet["watch"],
        "p99_ms": le(fleet["p99_ms"], targets["p99_ms"]),
        "errors": errors == 0 and result["closed_loop_errors"] == 0,
        "controller_cpu_pct": le(fleet["controller_cpu_pct"], targets["controller_cpu_pct"]),
        "rss_kib_per_node": le(fleet["rss_kib_per_node"], targets["rss_kib_per_node"]),
        "kept_up": fleet["heartbeats_per_s"]
            >= targets["heartbeats_per_s_of_expected"] * fleet["expected_per_s"],
        "closed_loop": (closed["heartbeats_per_s"] or 0)
            >= targets["closed_loop_1000_heartbeats_per_s"][backend],
    }
    result["missed"] = [name for name, ok in checks.items() if not ok]
    result["pass"] = not result["missed"]
    passed = passed and result["pass"]
    out[backend] = result
    print(f"bench-fleet: {backend}: {fleet['nodes']} nodes every {fleet['interval_s']:g} s "
          f"({fleet['connections']}): {fleet['heartbeats_per_s']}/s (expected "
          f"{fleet['expected_per_s']}), p50 {fleet['p50_ms']} ms, p99 {fleet['p99_ms']} ms, "
          f"max {fleet['max_ms']} ms, {errors} errors, controller CPU "
          f"{fleet['controller_cpu_pct']}% of one core, RSS {fleet['controller_rss_mib']} MiB "
          f"({fleet['rss_kib_per_node']} KiB/node), setup {fleet['setup']['total_s']} s; "
          f"closed loop {closed['heartbeats_per_s']}/s ({closed_fleet['heartbeats_per_s']}/s "
          f"with the fleet body); {'pass' if result['pass'] else 'missed: ' + ', '.join(result['missed'])}",
          file=sys.stderr)
out["targets"] = targets
out["pass"] = passed
print(json.dumps(out))
PY
