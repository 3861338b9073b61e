#!/usr/bin/env bash
# Controller benchmark: N simulated nodes heartbeating over mTLS on loopback, on each storage
# backend, BENCH_RUNS times in a row.
#
# Builds the controller and its load generator in release. For each backend of BENCH_BACKENDS
# ("sqlite postgres") and each of BENCH_RUNS (5) runs, starts a fresh
#   powernode-controller serve --data <tmp> --listen 127.0.0.1:0 [--database postgres://…]
# (postgres: a database of its own on a throwaway cluster started here with
# scripts/lib/postgres.sh, fsync on), reads its "listening on ADDR" line, then runs `loadgen`,
# which creates N bootstrap tokens (operator API), enrolls N nodes (Ed25519 key, CSR,
# POST /node_api/v1/enroll), opens one persistent mTLS connection per node (HTTP/1.1
# keep-alive) and runs two phases of BENCH_WARMUP s warm-up + BENCH_SECONDS s measured:
#   paced  - the N nodes together offer BENCH_RATE heartbeats/s (each node every N/rate s);
#            latency from the scheduled send time
#   closed - every node sends its next heartbeat as soon as its previous one was answered
# The controller's peak RSS is VmHWM from /proc/<pid>/status at the end of a run.
#
# Targets (2-core machine, shared with the load generator and the database): >= 2,000
# heartbeats/s with 1,000 nodes, and p99 <= 50 ms at 2,000/s paced — in every run, on both
# backends. heartbeats_per_s is the closed-loop (maximum) rate; p50_ms/p99_ms are those of the
# paced phase (a closed loop of 1,000 nodes has by construction latency = 1,000 / rate, so
# its p99 says nothing the rate does not).
#
# Everything is on 127.0.0.1 and bounded; only processes started here are stopped (by pid;
# the cluster by pg_ctl on its own data directory) and the temp dir is removed on exit.
# Human-readable lines go to stderr; the last stdout line is one JSON object:
#   {"sqlite": {"runs": [{p50_ms, p99_ms, max_ms, heartbeats_per_s, ...}, ...],
#               "p99_ms": [...], "all_met": bool}, "postgres": {...}, "targets_met": bool}
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh
# shellcheck source=scripts/lib/controller.sh
. scripts/lib/controller.sh

nodes=${BENCH_NODES:-1000}
rate=${BENCH_RATE:-2000}
warmup=${BENCH_WARMUP:-3}
seconds=${BENCH_SECONDS:-20}
runs=${BENCH_RUNS:-5}
backends=${BENCH_BACKENDS:-sqlite postgres}
target_rate=2000
target_p99=50

log() { echo "bench-controller: $*" >&2; }
# The backend is chosen here, not by the environment `serve` would read.
unset POWERNODE_DATABASE

cargo build --release --quiet -p powernode-controller --bins
bin=$PWD/target/release

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-controller.XXXXXX")
cleanup() {
    controller_stop
    pg_stop
    rm -rf "$work"
}
trap cleanup EXIT

# Enough descriptors for N connections on each side.
ulimit -n "$(( nodes * 2 + 256 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# One run on a fresh controller: its JSON line (loadgen's, with the peak RSS) to $1.
run_once() {
    local out=$1 database=$2 data
    data=$(mktemp -d "$work/data.XXXXXX")
    local backend_args=()
    [ -n "$database" ] && backend_args=(--database "$database")
    controller_start "$bin" "$data" "$data.serve" "${backend_args[@]}"
    "$bin/loadgen" --addr "$addr" --data "$data" --nodes "$nodes" --rate "$rate" \
        --warmup-s "$warmup" --duration-s "$seconds" --controller-pid "$pid" >"$data.loadgen.out"
    local rss_kib
    rss_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
    if grep -qiE 'error|panic' "$data.serve.err"; then
        log "controller errors:"
        grep -iE 'error|panic' "$data.serve.err" | head -5 >&2
    fi
    controller_stop
    python3 -c 'import json, sys
r = json.loads(sys.argv[1]); r["controller_rss_mib"] = round(int(sys.argv[2]) / 1024, 1)
print(json.dumps(r))' "$(tail -n 1 "$data.loadgen.out")" "$rss_kib" >"$out"
    rm -rf "$data" "$data".*
}

results=()
for backend in $backends; do
    case $backend in
        sqlite) server= ;;
        postgres)
            # Not under $work: the cluster's owner (postgres) must reach its directory.
            pgdir=$(mktemp -d "${TMPDIR:-/tmp}/bench-controller-pg.XXXXXX")
            rmdir "$pgdir"
            pg_start "$pgdir" max_connections=200 >/dev/null
            server=$PG_URL
            ;;
        *) log "unknown backend $backend"; exit 2 ;;
    esac
    for run in $(seq "$runs"); do
        database=
        if [ -n "$server" ]; then
            pg_createdb "bench_$run"
            database="$server/bench_$run"
        fi
        run_once "$work/$backend.$run.json" "$database"
        log "$backend run $run: $(python3 -c 'import json, sys
r = json.load(open(sys.argv[1])); p, c = r["paced"], r["closed"]
print("paced p50 {} ms p99 {} ms max {} ms; closed {:.0f}/s".format(
    p["p50_ms"], p["p99_ms"], p.get("max_ms"), c["heartbeats_per_s"]))' "$work/$backend.$run.json")"
        results+=("$backend=$work/$backend.$run.json")
    done
    [ "$backend" = postgres ] && pg_stop
done

python3 - "$target_rate" "$target_p99" "${results[@]}" <<'PY'
import json, sys
target_rate, target_p99 = float(sys.argv[1]), float(sys.argv[2])
out = {}
for arg in sys.argv[3:]:
    backend, path = arg.split("=", 1)
    r = json.load(open(path))
    paced, closed = r["paced"], r["closed"]
    run = {
        "p50_ms": paced["p50_ms"],
        "p99_ms": paced["p99_ms"],
        "max_ms": paced.get("max_ms"),
        "paced_per_s": paced["heartbeats_per_s"],
        "offered_per_s": r["offered_per_s"],
        "heartbeats_per_s": closed["heartbeats_per_s"],
        "errors": paced["errors"] + closed["errors"],
        "controller_rss_mib": r["controller_rss_mib"],
    }
    run["met"] = (paced["p99_ms"] <= target_p99 and run["errors"] == 0
                  and paced["heartbeats_per_s"] >= 0.98 * r["offered_per_s"]
                  and closed["heartbeats_per_s"] >= target_rate)
    out.setdefault(backend, {"runs": []})["runs"].append(run)
for backend, b in out.items():
    b["p99_ms"] = [run["p99_ms"] for run in b["runs"]]
    b["heartbeats_per_s"] = [round(run["heartbeats_per_s"]) for run in b["runs"]]
    b["all_met"] = all(run["met"] for run in b["runs"])
    print(f"bench-controller: {backend}: p99 {b['p99_ms']} ms (target <= {target_p99:.0f}), "
          f"closed loop {b['heartbeats_per_s']}/s (target >= {target_rate:.0f}): "
          f"{'met in every run' if b['all_met'] else 'NOT met in every run'}", file=sys.stderr)
out["target_heartbeats_per_s"] = target_rate
out["target_p99_ms"] = target_p99
out["targets_met"] = all(b["all_met"] for k, b in out.items() if isinstance(b, dict))
print(json.dumps(out))
PY
