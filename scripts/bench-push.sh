#!/usr/bin/env bash
# Push benchmark (issue 11): how fast the controller's changes reach nodes while a fleet of
# them holds watches, and how many tasks the controller leases and completes a second.
#
# Builds in release, starts `powernode-controller serve` (heartbeat interval 30 s, so that
# nothing here is carried by a heartbeat) on loopback, then
#   1. loadgen --mode push: BENCH_NODES (1,000) simulated nodes enrol, and each holds
#      GET /node_api/v1/watch for BENCH_HOLD s while the controller's RSS and descriptors are
#      sampled;
#   2. meanwhile the bench-push example boots one real node (enrollmgr, heartbeatd, execd)
#      and, BENCH_ROUNDS times each, sets its desired modules in the controller's database
#      (desired -> heartbeatd/ModuleConfig published) and creates a node.exec task
#      (task -> execd/TaskStatus published);
#   3. then every simulated node gets BENCH_TASKS tasks through the operator API and leases
#      and completes them one at a time, closed loop, until none is left: tasks_per_s.
# Targets: desired_to_node_p99_ms and task_to_start_p99_ms < 1,000 with 1,000 nodes
# watching; controller RSS <= 128 MiB; tasks_per_s >= 1,000.
#
# Everything is on 127.0.0.1 and bounded; only processes started here are stopped (by pid)
# and the temp dir is removed on exit. The last stdout line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=${BENCH_NODES:-1000}
hold=${BENCH_HOLD:-40}
rounds=${BENCH_ROUNDS:-20}
tasks=${BENCH_TASKS:-5}

echo "bench-push: building (release)" >&2
cargo build --release --quiet -p powernode-controller --bins
cargo build --release --quiet -p powernode-agent
cargo build --release --quiet -p powernode-agent --example bench-push
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-push.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
ulimit -n "$(( nodes * 2 + 512 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"

"$bin/powernode-controller" serve --data "$work/data" --listen 127.0.0.1:0 \
    --heartbeat-interval 30s >"$work/controller.out" 2>"$work/controller.log" &
controller=$!
pids+=("$controller")
for _ in $(seq 100); do
    grep -q '^listening on ' "$work/controller.out" 2>/dev/null && break
    sleep 0.1
done
listen=$(sed -n 's/^listening on //p' "$work/controller.out")
[ -n "$listen" ] || { echo "bench-push: the controller did not start" >&2; cat "$work/controller.log" >&2; exit 1; }
echo "bench-push: controller on $listen (pid $controller)" >&2

"$bin/loadgen" --mode push --addr "$listen" --data "$work/data" --nodes "$nodes" \
    --hold-s "$hold" --tasks-per-node "$tasks" --controller-pid "$controller" \
    >"$work/loadgen.out" 2> >(sed 's/^/  /' >&2) &
loadgen=$!
pids+=("$loadgen")
for _ in $(seq 1200); do
    grep -q '^watching ' "$work/loadgen.out" 2>/dev/null && break
    kill -0 "$loadgen" 2>/dev/null || { echo "bench-push: loadgen failed" >&2; exit 1; }
    sleep 0.1
done
grep -q '^watching ' "$work/loadgen.out" || { echo "bench-push: the watches were never held" >&2; exit 1; }

mkdir -p "$work/node"
real=$("$bin/examples/bench-push" --agent-bin "$bin/powernode-agent" \
    --controller-bin "$bin/powernode-controller" --data "$work/data" --listen "$listen" \
    --dir "$work/node" --rounds "$rounds" | tail -n 1) || {
    echo "bench-push: the real node's measurement failed; its logs:" >&2
    tail -n 20 "$work"/node/*.log >&2 || true
    exit 1
}
echo "  real node: $real" >&2
wait "$loadgen" || { echo "bench-push: loadgen failed" >&2; exit 1; }
simulated=$(tail -n 1 "$work/loadgen.out")

python3 - "$real" "$simulated" <<'PY'
import json, sys
real, sim = json.loads(sys.argv[1]), json.loads(sys.argv[2])
watch, tasks = sim["watch"], sim["tasks"]
out = {
    "watching_nodes": watch["watching_nodes"],
    "watches_answered_early": watch["answered_early"],
    "desired_to_node_p50_ms": real["desired_to_node_p50_ms"],
    "desired_to_node_p99_ms": real["desired_to_node_p99_ms"],
    "task_to_start_p50_ms": real["task_to_start_p50_ms"],
    "task_to_start_p99_ms": real["task_to_start_p99_ms"],
    "controller_rss_mib": watch["controller_rss_mib"],
    "controller_fds": watch["controller_fds"],
    "tasks_per_s": tasks["tasks_per_s"],
    "task_errors": tasks["errors"],
}
out["targets_met"] = (out["desired_to_node_p99_ms"] < 1000 and out["task_to_start_p99_ms"] < 1000
                      and out["controller_rss_mib"] <= 128 and out["tasks_per_s"] >= 1000
                      and out["watches_answered_early"] == 0 and out["task_errors"] == 0)
print(f"with {out['watching_nodes']} nodes watching: desired -> node p50 {out['desired_to_node_p50_ms']} ms, "
      f"p99 {out['desired_to_node_p99_ms']} ms; task -> start p50 {out['task_to_start_p50_ms']} ms, "
      f"p99 {out['task_to_start_p99_ms']} ms; controller {out['controller_rss_mib']} MiB, "
      f"{out['controller_fds']} fds; {out['tasks_per_s']} tasks/s", file=sys.stderr)
print(json.dumps(out))
PY
