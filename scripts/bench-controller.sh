#!/usr/bin/env bash
# Controller benchmark (issue 3): N simulated nodes heartbeating over mTLS on loopback.
#
# Builds the controller and its load generator in release, starts
#   powernode-controller serve --data <tmp> --listen 127.0.0.1:0
# reads its "listening on ADDR" line, then runs `loadgen`, which creates N bootstrap tokens
# (operator API, bearer token from <data>/operator.token), enrolls N nodes (Ed25519 key, CSR,
# POST /node_api/v1/enroll), opens one persistent mTLS connection per node (HTTP/1.1
# keep-alive) and runs two phases of BENCH_WARMUP s warm-up + BENCH_SECONDS s measured:
#   paced  - the N nodes together offer BENCH_RATE heartbeats/s (each node every N/rate s);
#            latency from the scheduled send time
#   closed - every node sends its next heartbeat as soon as its previous one was answered
# The controller's peak RSS is VmHWM from /proc/<pid>/status at the end.
#
# Targets (2-core machine): >= 2,000 heartbeats/s with 1,000 nodes, p99 <= 50 ms.
# heartbeats_per_s is the closed-loop (maximum) rate; p50_ms/p99_ms are those of the paced
# phase at the target rate (a closed loop of 1,000 nodes has by construction
# latency = 1,000 / rate, so its p99 says nothing the rate does not).
#
# Everything is on 127.0.0.1 and bounded; only the controller started here is stopped (by
# pid) and the temp dir is removed on exit. Human-readable lines go to stderr; the last
# stdout line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=${BENCH_NODES:-1000}
rate=${BENCH_RATE:-2000}
warmup=${BENCH_WARMUP:-3}
seconds=${BENCH_SECONDS:-20}
target_rate=2000
target_p99=50

cargo build --release --quiet -p powernode-controller --bins
bin=$PWD/target/release

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-controller.XXXXXX")
pid=
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Enough descriptors for N connections on each side.
ulimit -n "$(( nodes * 2 + 256 ))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"

RUST_LOG=${RUST_LOG:-warn} "$bin/powernode-controller" serve --data "$work/data" \
    --listen 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
pid=$!
addr=
for _ in $(seq 100); do
    addr=$(sed -n 's/^listening on //p' "$work/serve.out")
    [ -n "$addr" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/serve.err" >&2; exit 1; }
    sleep 0.1
done
[ -n "$addr" ] || { echo "bench-controller: controller did not start" >&2; exit 1; }
echo "bench-controller: controller pid $pid on $addr, $nodes nodes, $(nproc) CPUs" >&2

"$bin/loadgen" --addr "$addr" --data "$work/data" --nodes "$nodes" --rate "$rate" \
    --warmup-s "$warmup" --duration-s "$seconds" --controller-pid "$pid" >"$work/loadgen.out"
rss_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
db_kib=$(du -sk "$work/data" | cut -f1)
if grep -qiE 'error|panic' "$work/serve.err"; then
    echo "bench-controller: controller errors:" >&2
    grep -iE 'error|panic' "$work/serve.err" | head -5 >&2
fi

python3 - "$(tail -n 1 "$work/loadgen.out")" "$rss_kib" "$db_kib" "$target_rate" "$target_p99" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
rss_mib = int(sys.argv[2]) / 1024
target_rate, target_p99 = float(sys.argv[4]), float(sys.argv[5])
closed, paced = r["closed"], r["paced"]
rate_ok = closed["heartbeats_per_s"] >= target_rate and closed["errors"] == 0
# The paced phase must also have kept up with what it was offered.
p99_ok = (paced["p99_ms"] <= target_p99 and paced["errors"] == 0
          and paced["heartbeats_per_s"] >= 0.98 * r["offered_per_s"])
out = {
    "nodes": r["nodes"],
    "heartbeats_per_s": closed["heartbeats_per_s"],
    "p50_ms": paced["p50_ms"],
    "p99_ms": paced["p99_ms"],
    "controller_rss_mib": round(rss_mib, 1),
    "paced": paced,
    "closed": closed,
    "offered_per_s": r["offered_per_s"],
    "enroll_s": r["enroll_s"],
    "connect_s": r["connect_s"],
    "data_dir_mib": round(int(sys.argv[3]) / 1024, 1),
    "target_heartbeats_per_s": target_rate,
    "target_p99_ms": target_p99,
    "target_rate_met": rate_ok,
    "target_p99_met": p99_ok,
    "targets_met": rate_ok and p99_ok,
}
print(f"bench-controller: {closed['heartbeats_per_s']:.0f} heartbeats/s closed loop "
      f"(target >= {target_rate:.0f}: {'met' if rate_ok else 'NOT met'}); "
      f"at {r['offered_per_s']:.0f}/s offered p50 {paced['p50_ms']} ms p99 {paced['p99_ms']} ms "
      f"(target <= {target_p99:.0f}: {'met' if p99_ok else 'NOT met'}); "
      f"controller peak RSS {rss_mib:.1f} MiB", file=sys.stderr)
print(json.dumps(out))
PY
