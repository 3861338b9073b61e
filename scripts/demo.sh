#!/usr/bin/env bash
# The demo (`make demo`): a controller on loopback with its embedded database, a bootstrap token,
# and a node in a sandbox root booted by device-steps.sh (identitymgr → enrollmgr → heartbeatd);
# then the operator's view from both sides, and the controller stopped and restarted to show the
# node noticing and recovering. On a terminal it keeps running until Ctrl-C; either way it stops
# everything it started, by pid, and removes the sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/dist
[ -x "$bin/powernode-agent" ] && [ -x "$bin/powernode-controller" ] || {
    echo "demo: run 'make dist' first (make demo does)" >&2
    exit 1
}

work=$(mktemp -d /tmp/powernode-demo.XXXXXX)
root=$work/node
data=$work/controller
controller_pid=
cleanup() {
    scripts/device-steps.sh --root "$root" --stop >/dev/null 2>&1 || true
    [ -n "$controller_pid" ] && kill "$controller_pid" 2>/dev/null && wait "$controller_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

start_controller() { # [listen address]
    "$bin/powernode-controller" serve --data "$data" --listen "${1:-127.0.0.1:0}" \
        --heartbeat-interval 5s >"$work/controller.out" 2>"$work/controller.log" &
    controller_pid=$!
    for _ in $(seq 100); do
        grep -q '^listening on ' "$work/controller.out" 2>/dev/null && break
        sleep 0.1
    done
    listen=$(sed -n 's/^listening on //p' "$work/controller.out")
    [ -n "$listen" ] || { echo "demo: the controller did not start:" >&2; cat "$work/controller.log" >&2; exit 1; }
}

step "a controller on loopback (CA, server certificate and SQLite database in $data)"
start_controller
echo "listening on $listen"
token=$("$bin/powernode-controller" token create --data "$data" --ttl 10m)
echo "bootstrap token created (single use, 10 minutes)"

step "a node in the sandbox root $root: its kernel command line carries identity, token, controller and CA"
mkdir -p "$root/proc/sys/kernel/random" "$root/etc/powernode"
cp "$data/ca.crt.pem" "$root/etc/powernode/controller-ca.pem"
cat /proc/sys/kernel/random/boot_id >"$root/proc/sys/kernel/random/boot_id"
cp /proc/uptime /proc/loadavg /proc/meminfo "$root/proc/"
echo demo-node >"$root/etc/hostname"
echo "console=ttyS0 powernode.instance_uuid=$(cat /proc/sys/kernel/random/uuid)" \
    "powernode.bootstrap_token=$token powernode.controller_url=https://$listen" \
    "powernode.ca_file=/etc/powernode/controller-ca.pem" >"$root/proc/cmdline"
sed "s/$token/<token>/" "$root/proc/cmdline"

step "booting it with device-steps.sh"
run scripts/device-steps.sh --root "$root" --timeout 60

step "the node's view"
run "$bin/powernode-agent" --root "$root" status
run "$bin/ipcmonitor" --root "$root" enrollmgr/EnrollmentStatus

step "the controller's view"
run "$bin/powernode-controller" nodes list --data "$data"

step "the controller goes away: the node notices and backs off"
kill "$controller_pid"; wait "$controller_pid" 2>/dev/null || true; controller_pid=
run "$bin/powernode-agent" --root "$root" wait heartbeatd/ControllerStatus --field reachable=false --timeout 60
step "it comes back on the same address: the node recovers, nothing is enrolled again"
start_controller "$listen"
run "$bin/powernode-agent" --root "$root" wait heartbeatd/ControllerStatus --field reachable=true --timeout 90
run "$bin/powernode-controller" nodes list --data "$data"

if [ -t 0 ]; then
    step "running; press Ctrl-C to stop everything"
    while sleep 5; do "$bin/powernode-controller" nodes list --data "$data" | tail -n +2; done
fi
step "stopping the agents and the controller, removing $work"
