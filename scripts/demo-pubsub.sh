#!/usr/bin/env bash
# The pubsub demo (`make demo-pubsub`), in a sandbox root: the identitymgr agent resolves the node's identity
# from a kernel command line; a publisher process is watched with ipcmonitor and the status CLI,
# killed with SIGKILL and restarted to show that its state survives in checkpoints. Agents join
# this demo as they land (docs/architecture.md).
# Stops everything it started, by PID, on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet -p powernode-pubsub --bin pubsub-peer
bin=$PWD/dist
peer=$PWD/target/release/pubsub-peer
[ -x "$bin/powernode-agent" ] || { echo "demo: run 'make dist' first (make demo-pubsub does)" >&2; exit 1; }

root=$(mktemp -d /tmp/powernode-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
export POWERNODE_ROOT=$root

start_publisher() {
    "$peer" publish --root "$root" --agent demo --keys 3 --health --restarted >"$root/publisher.log" 2>&1 &
    pids+=($!)
    publisher=$!
}

step "sandbox root $root: a kernel command line, a boot id and a hostname for the node"
mkdir -p "$root/proc/sys/kernel/random" "$root/etc"
uuid=$(cat /proc/sys/kernel/random/uuid)
echo "console=ttyS0 powernode.instance_uuid=$uuid" >"$root/proc/cmdline"
cat /proc/sys/kernel/random/boot_id >"$root/proc/sys/kernel/random/boot_id"
echo demo-node >"$root/etc/hostname"
cat "$root/proc/cmdline"

step "starting identitymgr (the first agent) and waiting for the identity"
"$bin/identitymgr" --root "$root" 2>"$root/identitymgr.log" &
pids+=($!)
run "$bin/powernode-agent" wait identitymgr/NodeIdentity --field state=Resolved --timeout 20
run "$bin/ipcmonitor" identitymgr/NodeIdentity

step "starting a publisher process (demo/TestItem, 3 items, plus its own AgentStatus)"
start_publisher
run "$bin/powernode-agent" wait demo/AgentStatus --field state=Running --timeout 10 >/dev/null
echo "publisher pid $publisher is up"

step "every publication, its items and whether its publisher is up"
run "$bin/ipcmonitor" --list

step "an item of a known topic, decoded through the types registry"
run "$bin/ipcmonitor" demo/AgentStatus

step "following it for 3 s: the publisher refreshes last_loop_ms every second"
timeout 3 "$bin/ipcmonitor" demo/AgentStatus --follow --json || true

step "operator view"
run "$bin/powernode-agent" status

step "kill -9 the publisher: status falls back to the checkpoint files and says so"
kill -9 "$publisher"
wait "$publisher" 2>/dev/null || true
run "$bin/powernode-agent" status

step "restart it: it reloads its map from the checkpoints (see its first line)"
start_publisher
run "$bin/powernode-agent" wait demo/TestItem --key k2 --timeout 10 >/dev/null
head -n 1 "$root/publisher.log"
run "$bin/powernode-agent" wait demo/AgentStatus --field state=Running --timeout 10 >/dev/null
run "$bin/powernode-agent" status

step "done; stopping identitymgr and pid $publisher, removing $root"
