#!/usr/bin/env bash
# Events benchmark: the floor and the events pipeline measured in ONE run, as a ratio.
#
#   floor: pubsub throughput, 1 KiB items, one subscriber, checkpoints on tmpfs
#          (pubsub-peer bench-throughput, exactly as scripts/bench-pubsub.sh measures it)
#   events: one agent raises 1 KiB events -> the real eventd journals them (group commit,
#           acknowledgement) -> the real controller on loopback accepts them
#           (the bench-events example of powernode-agent)
#
# The node's processes (floor, raiser, eventd, enrollmgr) are pinned to one CPU; the controller
# to the other, as it would be another machine. Every measurement gets a fresh directory on
# tmpfs, removed right after, and the set is repeated BENCH_ROUNDS times (default 3)
# interleaved, reporting medians (sums for lost and duplicated, the maximum for RSS).
#
# The last line is one JSON object with floor_items_per_s, events_per_s,
# raise_to_controller_p50_ms, raise_to_controller_p99_ms, events_lost, events_duplicated,
# eventd_peak_rss_mib (and eventd_peak_anon_mib, its own memory without the shared binary's
# code; node_cpu_us_per_event, the CPU time of the raiser, eventd and enrollmgr per event).
# Targets: events_per_s >= 0.5 x floor, p99 <= 100 ms, 0 lost, 0 duplicated, eventd RSS
# <= 16 MiB. Exit status 0 even when a target is missed (the JSON's
# targets_met says); 1 when a measurement failed.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${BENCH_ROUNDS:-3}
count=${BENCH_EVENTS:-100000}
latency_count=${BENCH_LATENCY_EVENTS:-2000}
rate=${BENCH_RATE:-500}

echo "bench-events: building (release)" >&2
cargo build --release --quiet -p powernode-pubsub --bin pubsub-peer
cargo build --release --quiet -p powernode-agent -p powernode-controller
cargo build --release --quiet -p powernode-agent --example bench-events
target=${CARGO_TARGET_DIR:-$PWD/target}
peer=$target/release/pubsub-peer
bench=$target/release/examples/bench-events

shm=/dev/shm
if [ "$(stat -f -c %T "$shm" 2>/dev/null)" != tmpfs ]; then
    echo "bench-events: $shm is not tmpfs; the floor and the journal are measured on tmpfs" >&2
    exit 1
fi
work=$(mktemp -d -p "$shm" bench-events.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The node's CPU is the first this shell may use; the controller's another one, if any.
cpus=$(taskset -pc $$ | sed 's/.*: //')
node_cpu=$(python3 -c 'import os; print(sorted(os.sched_getaffinity(0))[0])')
controller_cpu=$(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(c[1] if len(c) > 1 else c[0])')
results=$work/results.jsonl

# run NAME COMMAND...: one measurement in a fresh directory, its JSON tagged with NAME.
run() {
    local name=$1; shift
    local dir="$work/run"
    rm -rf "$dir"; mkdir -p "$dir"
    local out
    if ! out=$("$@" "$dir" | tail -n 1); then
        echo "bench-events: $name failed; its logs:" >&2
        tail -n 20 "$dir"/*.log >&2 || true
        exit 1
    fi
    rm -rf "$dir"
    printf '{"name":"%s","result":%s}\n' "$name" "$out" >>"$results"
    printf '  %-10s %s\n' "$name" "$out" >&2
}

echo "bench-events: $rounds rounds; node on CPU $node_cpu, controller on CPU $controller_cpu (of $cpus); tmpfs at $work" >&2
for round in $(seq "$rounds"); do
    echo "round $round" >&2
    run floor taskset -c "$node_cpu" "$peer" bench-throughput --size 1024 --count 20000 --subscribers 1 --root
    run events taskset -c "$node_cpu" "$bench" --agent-bin "$target/release/powernode-agent" \
        --controller-bin "$target/release/powernode-controller" --controller-cpu "$controller_cpu" \
        --count "$count" --latency-count "$latency_count" --rate "$rate" --size 1024 --dir
done

python3 - "$results" "$rounds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def each(name, field):
    return [r["result"][field] for r in rows if r["name"] == name]
med = lambda name, field: statistics.median(each(name, field))
floor = med("floor", "items_per_s")
eps = med("events", "events_per_s")
out = {
    "rounds": int(sys.argv[2]),
    "floor_items_per_s": round(floor),
    "events_per_s": round(eps),
    "delivered_per_s": round(med("events", "delivered_per_s")),
    "raise_to_controller_p50_ms": med("events", "raise_to_controller_p50_ms"),
    "raise_to_controller_p99_ms": med("events", "raise_to_controller_p99_ms"),
    "raise_to_controller_max_ms": max(each("events", "raise_to_controller_max_ms")),
    "events_lost": sum(each("events", "events_lost")),
    "events_duplicated": sum(each("events", "events_duplicated")),
    "eventd_peak_rss_mib": max(each("events", "eventd_peak_rss_mib")),
    "eventd_peak_anon_mib": max(each("events", "eventd_peak_anon_mib")),
    "throughput_ratio": round(eps / floor, 3),
    "node_cpu_us_per_event": med("events", "node_cpu_us_per_event"),
    "raiser_cpu_us_per_event": med("events", "raiser_cpu_us_per_event"),
    "eventd_cpu_us_per_event": med("events", "eventd_cpu_us_per_event"),
    "floor_us_per_item": round(1e6 / floor, 2),
}
out["targets_met"] = (
    out["throughput_ratio"] >= 0.5
    and out["raise_to_controller_p99_ms"] <= 100
    and out["events_lost"] == 0
    and out["events_duplicated"] == 0
    and out["eventd_peak_rss_mib"] <= 16
)
print(f"throughput: {eps:.0f} events/s = {out['throughput_ratio']} x floor {floor:.0f} items/s (target >= 0.5)", file=sys.stderr)
print(f"latency raise -> controller: p50 {out['raise_to_controller_p50_ms']} ms, p99 {out['raise_to_controller_p99_ms']} ms (target p99 <= 100)", file=sys.stderr)
print(f"node CPU per event {out['node_cpu_us_per_event']} us (raiser {out['raiser_cpu_us_per_event']}, eventd {out['eventd_cpu_us_per_event']}); the floor's item {out['floor_us_per_item']} us", file=sys.stderr)
print(f"lost {out['events_lost']}, duplicated {out['events_duplicated']}, eventd peak RSS {out['eventd_peak_rss_mib']} MiB (target <= 16), of it its own (anonymous) {out['eventd_peak_anon_mib']} MiB", file=sys.stderr)
print(json.dumps(out))
PY
