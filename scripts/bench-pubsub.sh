#!/usr/bin/env bash
# Pubsub benchmark: floors and pubsub figures measured in ONE run, as ratios.
#
#   raw SOCK_SEQPACKET round trip (64 B ping-pong, blocking, no tokio)   -> latency floor
#   pubsub publish->deliver latency, 64 B / 1 KiB / 64 KiB, one subscriber
#   raw atomic writes (temp + fsync + rename + dir fsync), 1 KiB, tmpfs   -> throughput floor
#   pubsub throughput, 1 KiB items, 1 and 4 subscribers, checkpoints on tmpfs
#
# Every process is pinned to the same CPU (taskset), every measurement gets a fresh directory
# on tmpfs that is removed right after, and the whole set is repeated BENCH_ROUNDS times
# (default 3) interleaved, reporting medians: tmpfs and the VM drift during a run, and
# interleaving exposes floor and pubsub to the same drift.
#
# The last line is one JSON object. Targets: pubsub_p50_us <= 2 x raw_rtt_p50_us and
# pubsub_items_per_s_1kib >= 0.5 x raw_atomic_writes_per_s.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${BENCH_ROUNDS:-3}
cargo build --release --quiet -p powernode-pubsub --bin pubsub-peer
peer=$PWD/target/release/pubsub-peer

shm=/dev/shm
if [ "$(stat -f -c %T "$shm" 2>/dev/null)" != tmpfs ]; then
    echo "bench-pubsub: $shm is not tmpfs; this benchmark measures checkpoints on tmpfs" >&2
    exit 1
fi
work=$(mktemp -d -p "$shm" bench-pubsub.XXXXXX)
trap 'rm -rf "$work"' EXIT
cpu=$(taskset -pc $$ | sed 's/.*: //; s/[,-].*//')
results=$work/results.jsonl

# run NAME ARGS...: one measurement in a fresh directory, pinned, its JSON tagged with NAME.
run() {
    local name=$1; shift
    local dir="$work/run"
    rm -rf "$dir"; mkdir -p "$dir"
    local out
    out=$(taskset -c "$cpu" "$peer" "$@" "$dir" | tail -n 1)
    rm -rf "$dir"
    printf '{"name":"%s","result":%s}\n' "$name" "$out" >>"$results"
    printf '  %-22s %s\n' "$name" "$out" >&2
}

echo "bench-pubsub: $rounds rounds pinned to CPU $cpu, tmpfs at $work" >&2
for round in $(seq "$rounds"); do
    echo "round $round" >&2
    run raw_rtt bench-rtt --count 20000 --dir
    run latency_64 bench-latency --size 64 --count 5000 --root
    run latency_1k bench-latency --size 1024 --count 5000 --root
    run latency_64k bench-latency --size 65536 --count 2000 --root
    run atomic_1k bench-atomic --size 1024 --count 20000 --dir
    run throughput_1sub bench-throughput --size 1024 --count 20000 --subscribers 1 --root
    run throughput_4sub bench-throughput --size 1024 --count 20000 --subscribers 4 --root
done

python3 - "$results" "$rounds" "$cpu" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(name, field):
    return statistics.median(r["result"][field] for r in rows if r["name"] == name)
rtt = med("raw_rtt", "p50_us")
lat = {s: (med(f"latency_{s}", "p50_us"), med(f"latency_{s}", "p99_us")) for s in ("64", "1k", "64k")}
# The headline latency is the worse of the 64 B and 1 KiB figures.
p50 = max(lat["64"][0], lat["1k"][0])
p99 = max(lat["64"][1], lat["1k"][1])
atomic = med("atomic_1k", "writes_per_s")
tp1 = med("throughput_1sub", "items_per_s")
tp4 = med("throughput_4sub", "items_per_s")
out = {
    "rounds": int(sys.argv[2]), "cpu": int(sys.argv[3]),
    "raw_rtt_p50_us": round(rtt, 2),
    "pubsub_p50_us": round(p50, 2), "pubsub_p99_us": round(p99, 2),
    "pubsub_p50_us_64b": lat["64"][0], "pubsub_p99_us_64b": lat["64"][1],
    "pubsub_p50_us_1kib": lat["1k"][0], "pubsub_p99_us_1kib": lat["1k"][1],
    "pubsub_p50_us_64kib": lat["64k"][0], "pubsub_p99_us_64kib": lat["64k"][1],
    "pubsub_items_per_s_1kib": round(tp1), "pubsub_items_per_s_1kib_4sub": round(tp4),
    "raw_atomic_writes_per_s": round(atomic),
    "latency_ratio": round(p50 / rtt, 3), "throughput_ratio": round(tp1 / atomic, 3),
}
out["targets_met"] = out["latency_ratio"] <= 2.0 and out["throughput_ratio"] >= 0.5
print(f"latency: pubsub p50 {p50:.2f} us = {out['latency_ratio']} x raw RTT {rtt:.2f} us (target <= 2)", file=sys.stderr)
print(f"throughput: {tp1:.0f} items/s = {out['throughput_ratio']} x raw atomic writes {atomic:.0f}/s (target >= 0.5)", file=sys.stderr)
print(json.dumps(out))
PY
