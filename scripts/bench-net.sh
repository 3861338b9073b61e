#!/usr/bin/env bash
# Network benchmark (issue 12): netmgr's WireGuard tunnel against the bare underlay and
# against wireguard-go, and how fast netmgr applies a large NetworkConfig.
#
# Builds in release, then, in ONE run:
#   - two network namespaces joined by a veth pair (192.0.2.1/24 and 192.0.2.2/24);
#   - wireguard-go (Debian's package, configured with `wg`) in both: overlay 10.77.0.0/24,
#     port 51821, MTU 1420 (what netmgr sets);
#   - netmgr in both (the bench-net example plays heartbeatd for each: overlay 10.88.0.0/16,
#     port 51820, each the other's peer);
#   - iperf3 TCP from the first namespace to the second over the veth (the ceiling), over
#     wireguard-go and over netmgr's tunnel, BENCH_SECONDS (10) each, BENCH_ROUNDS (3)
#     rounds interleaved, medians;
#   - the time from publishing a NetworkConfig of BENCH_PEERS (1,000) peers (random keys,
#     distinct /32s) to netmgr's NetworkStatus saying that generation is applied and Up,
#     then the same with one of them changed, BENCH_APPLY_ROUNDS (3) times, medians;
#   - the peak RSS (VmHWM) of netmgr and of its device process.
# Targets: netmgr_vs_wireguard_go >= 0.9; apply_1000_peers_ms < 1000; change_one_of_1000_ms
# < 50; netmgr_rss_mib + device_rss_mib <= 24.
#
# Needs root, ip, iperf3, wireguard-go and wg. Nothing is pinned: every process shares
# the machine's CPUs, as the two ends of a tunnel on one host do. The namespaces (and the
# links in them), every process started in them and the temp dir (on tmpfs, as a node's run/
# is) are removed on exit, also on failure. The last stdout line is one JSON object, with
# targets_met; exit 0 even when a target is missed, 1 when a measurement failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/require.sh
. scripts/lib/require.sh

seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
peers=${BENCH_PEERS:-1000}
apply_rounds=${BENCH_APPLY_ROUNDS:-3}

require bench-net root ip iperf3 wireguard-go wg || exit 1

echo "bench-net: building (release)" >&2
cargo build --release --quiet -p powernode-agent
cargo build --release --quiet -p powernode-agent --example bench-net
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

# Names of this run only: namespaces, and wireguard-go's interfaces, whose UAPI sockets are
# /var/run/wireguard/<name>.sock on the shared file system (15 bytes at most).
ns_a=pnbench$$-a
ns_b=pnbench$$-b
wg_a=pnbwg$$a
wg_b=pnbwg$$b
work=$(mktemp -d -p /dev/shm bench-net.XXXXXX)
bench_pid=
wireguard_go_pids=()

cleanup() {
    if [ -n "$bench_pid" ]; then
        kill -TERM "$bench_pid" 2>/dev/null || true
        wait "$bench_pid" 2>/dev/null || true
    fi
    # Whatever still runs in the namespaces was started by this run: netmgr, its devices
    # (which outlive netmgr by design), wireguard-go, iperf3.
    local ns pid left
    for ns in "$ns_a" "$ns_b"; do
        [ -e "/run/netns/$ns" ] || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
        for _ in $(seq 30); do
            left=$(ip netns pids "$ns" 2>/dev/null || true)
            [ -z "$left" ] && break
            sleep 0.1
        done
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -f "/var/run/wireguard/$wg_a.sock" "/var/run/wireguard/$wg_b.sock"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "bench-net: namespaces $ns_a, $ns_b; work dir $work; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
ip netns add "$ns_a"
ip netns add "$ns_b"
ip -n "$ns_a" link add veth0 type veth peer name veth0 netns "$ns_b"
for side in a b; do
    ns=ns_$side
    n=$([ "$side" = a ] && echo 1 || echo 2)
    ip -n "${!ns}" addr add "192.0.2.$n/24" dev veth0
    ip -n "${!ns}" link set veth0 up
    ip -n "${!ns}" link set lo up
done

# wireguard-go in each namespace, configured with wg.
for side in a b; do
    ns=ns_$side
    name=wg_$side
    (umask 077 && wg genkey >"$work/wg-$side.key")
    wg pubkey <"$work/wg-$side.key" >"$work/wg-$side.pub"
    # `ip netns exec` execs: $! is wireguard-go.
    ip netns exec "${!ns}" wireguard-go -f "${!name}" >"$work/wireguard-go-$side.log" 2>&1 &
    wireguard_go_pids+=("$!")
    for _ in $(seq 100); do
        [ -S "/var/run/wireguard/${!name}.sock" ] && break
        sleep 0.1
    done
    [ -S "/var/run/wireguard/${!name}.sock" ] || {
        echo "bench-net: wireguard-go did not start; its log:" >&2
        cat "$work/wireguard-go-$side.log" >&2
        exit 1
    }
done
for side in a b; do
    ns=ns_$side
    name=wg_$side
    if [ "$side" = a ]; then n=1 other=b; else n=2 other=a; fi
    m=$((3 - n))
    ip netns exec "${!ns}" wg set "${!name}" private-key "$work/wg-$side.key" listen-port 51821 \
        peer "$(cat "$work/wg-$other.pub")" endpoint "192.0.2.$m:51821" allowed-ips "10.77.0.$m/32"
    ip -n "${!ns}" addr add "10.77.0.$n/24" dev "${!name}"
    ip -n "${!ns}" link set "${!name}" mtu 1420 up
done

echo "bench-net: $rounds rounds of ${seconds} s each over veth, wireguard-go and netmgr; then $peers peers, $apply_rounds times" >&2
"$bin/examples/bench-net" --agent-bin "$bin/powernode-agent" --dir "$work" \
    --ns-a "$ns_a" --ns-b "$ns_b" --underlay-a 192.0.2.1 --underlay-b 192.0.2.2 \
    --wireguard-go-b 10.77.0.2 --seconds "$seconds" --rounds "$rounds" --peers "$peers" \
    --apply-rounds "$apply_rounds" >"$work/bench.out" &
bench_pid=$!
if ! wait "$bench_pid"; then
    bench_pid=
    echo "bench-net: the measurement failed; the logs:" >&2
    for log in "$work"/*/netmgr.log "$work"/*/run/powernode/netmgr/device/*.log "$work"/*.log; do
        [ -f "$log" ] || continue
        echo "--- $log" >&2
        tail -n 20 "$log" >&2
    done
    exit 1
fi
bench_pid=
result=$(tail -n 1 "$work/bench.out")
# wireguard-go's peak RSS (one peer, the same traffic), for comparison: the larger of the two.
wireguard_go_kib=0
for pid in "${wireguard_go_pids[@]}"; do
    kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${kib:-0}" -gt "$wireguard_go_kib" ] && wireguard_go_kib=$kib
done

python3 - "$result" "$wireguard_go_kib" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
out["wireguard_go_rss_mib"] = round(int(sys.argv[2]) / 1024, 1)
out["targets_met"] = (out["netmgr_vs_wireguard_go"] >= 0.9
                      and out["apply_1000_peers_ms"] < 1000
                      and out["change_one_of_1000_ms"] < 50
                      and out["netmgr_rss_mib"] + out["device_rss_mib"] <= 24)
print(f"veth {out['veth_mbit_s']} Mbit/s, wireguard-go {out['wireguard_go_mbit_s']} Mbit/s, "
      f"netmgr {out['netmgr_mbit_s']} Mbit/s ({out['netmgr_vs_wireguard_go']} x wireguard-go); "
      f"{out['peers']} peers applied in {out['apply_1000_peers_ms']} ms, one changed in "
      f"{out['change_one_of_1000_ms']} ms; netmgr {out['netmgr_rss_mib']} MiB + device "
      f"{out['device_rss_mib']} MiB peak RSS", file=sys.stderr)
print(json.dumps(out))
PY
