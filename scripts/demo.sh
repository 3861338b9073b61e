#!/usr/bin/env bash
# The demo (`make demo`): a controller on loopback with its embedded database, a bootstrap token,
# and a node in a sandbox root booted by device-steps.sh (identitymgr → enrollmgr → verifier,
# mountmgr, modulemgr → heartbeatd); a sample module built with mkfs.erofs, pushed to a loopback
# docker-registry, signed and assigned to the node, which pulls, verifies and mounts it, and a
# second one signed by a key the node does not trust, which its verifier rejects; then the
# operator's view from both sides, the controller stopped and restarted to show the node
# noticing and recovering, and the events the node's agents raised as the controller stored
# them. (The module part needs root, docker-registry and erofs-utils.) On a terminal it keeps
# running until Ctrl-C; either way it stops everything it started, by pid, and removes the
# sandbox. With root and wireguard-tools it also joins the node to an overlay network and shows
# its WireGuard interface (pn0, on this machine for the length of the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/registry.sh
. scripts/lib/cleanup.sh
bin=$PWD/dist
[ -x "$bin/powernode-agent" ] && [ -x "$bin/powernode-controller" ] || {
    echo "demo: run 'make dist' first (make demo does)" >&2
    exit 1
}

work=$(mktemp -d /tmp/powernode-demo.XXXXXX)
root=$work/node
data=$work/controller
controller_pid=
registry_pid=
cleanup() {
    scripts/device-steps.sh --root "$root" --stop >/dev/null 2>&1 || true
    stop_pid "$controller_pid"
    stop_pid "$registry_pid"
    unmount_under "$work"
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

modules=false
if [ "$(id -u)" = 0 ] && command -v docker-registry >/dev/null && command -v mkfs.erofs >/dev/null; then
    modules=true
    step "a module registry on loopback (docker-registry), and a signing key"
    start_registry "$work/registry"
    echo "registry at $registry"
    export COSIGN_PASSWORD=demo
    run "$bin/powernode-controller" module keygen --out "$work/keys"
else
    echo "demo: modules left out (they need root, docker-registry and erofs-utils)" >&2
fi

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
if $modules; then
    mkdir -p "$root/etc/powernode/trust"
    printf '[modules]\nplain_http = ["%s"]\n' "$registry" >"$root/etc/powernode/agent.toml"
    cp "$work/keys/cosign.pub" "$root/etc/powernode/trust/"
    echo 'keys = ["cosign.pub"]' >"$root/etc/powernode/trust/default.toml"
    echo "trust policy: modules must be signed by $work/keys/cosign.pub"
fi

step "booting it with device-steps.sh"
run scripts/device-steps.sh --root "$root" --timeout 60
node_id=$("$bin/powernode-agent" --root "$root" wait enrollmgr/EnrollmentStatus --timeout 5 |
    python3 -c "import json,sys; print(json.load(sys.stdin)['value']['node_id'])")

if $modules; then
    step "a sample module: built with mkfs.erofs, pushed, signed, assigned to the node"
    mkdir -p "$work/hello/bin" "$work/hello/etc"
    printf '#!/bin/sh\necho "hello from a powernode module"\n' >"$work/hello/bin/hello"
    chmod 755 "$work/hello/bin/hello"
    echo "This file comes from the hello module." >"$work/hello/etc/motd"
    run "$bin/powernode-controller" module build "$work/hello" --name hello --version 1.0 \
        --health-check "bin/hello" --out "$work/out"
    run "$bin/powernode-controller" module push "$work"/out/hello-1.0-*.manifest.json \
        --to "$registry/demo/hello:1.0" --plain-http
    run "$bin/powernode-controller" module sign "$registry/demo/hello:1.0" --key "$work/keys/cosign.key" --plain-http
    run "$bin/powernode-controller" module assign --node "$node_id" --data "$data" --plain-http "$registry/demo/hello:1.0"
    assigned=$(date +%s%N)
    "$bin/powernode-agent" --root "$root" wait heartbeatd/ModuleConfig --key hello --timeout 10 >/dev/null
    echo "the assignment reached the node (heartbeatd/ModuleConfig) $(( ($(date +%s%N) - assigned) / 1000000 )) ms" \
        "after the command returned: the node's held watch, not its next heartbeat"
    step "the node pulls, verifies and mounts it"
    run "$bin/powernode-agent" --root "$root" wait modulemgr/ModuleStatus --key hello --field state=Active --timeout 120
    run cat "$root/run/powernode-mounts/modules/current/etc/motd"
    run "$root/run/powernode-mounts/modules/current/bin/hello"

    step "a module signed by a key the node does not trust: the verifier rejects it, the stack stays"
    run "$bin/powernode-controller" module keygen --out "$work/untrusted-keys"
    mkdir -p "$work/rogue/etc"
    echo "This file must never be mounted." >"$work/rogue/etc/rogue"
    run "$bin/powernode-controller" module build "$work/rogue" --name rogue --version 1.0 --out "$work/out"
    run "$bin/powernode-controller" module push "$work"/out/rogue-1.0-*.manifest.json \
        --to "$registry/demo/rogue:1.0" --plain-http
    run "$bin/powernode-controller" module sign "$registry/demo/rogue:1.0" --key "$work/untrusted-keys/cosign.key" --plain-http
    run "$bin/powernode-controller" module assign --node "$node_id" --data "$data" --plain-http \
        "$registry/demo/hello:1.0" "$registry/demo/rogue:1.0"
    run "$bin/powernode-agent" --root "$root" wait modulemgr/ModuleStatus --key rogue --field state=Failed --timeout 120
    if [ -e "$root/run/powernode-mounts/modules/current/etc/rogue" ]; then
        echo "demo: the rejected module was mounted" >&2
        exit 1
    fi
    echo "etc/rogue is not in the stack; etc/motd still is: $(cat "$root/run/powernode-mounts/modules/current/etc/motd")"
fi

step "a task: a NodeScript created on the controller, leased by the node, run by its execd"
task_id=$("$bin/powernode-controller" task create --data "$data" --node "$node_id" --kind node.exec \
    --args '{"script": "echo \"hello from $(hostname), kernel $(uname -r)\"; echo \"running as $(id -un)\""}' \
    --timeout 30s)
echo "created $task_id"
for _ in $(seq 100); do
    state=$("$bin/powernode-controller" task show "$task_id" --data "$data" --json |
        python3 -c "import json,sys; print(json.load(sys.stdin)['state'])")
    case $state in succeeded | failed | interrupted | cancelled) break ;; esac
    sleep 0.1
done
run "$bin/powernode-controller" task show "$task_id" --data "$data"
[ "$state" = succeeded ] || { echo "demo: the task ended $state" >&2; exit 1; }
run "$bin/powernode-controller" tasks --data "$data"

if [ "$(id -u)" = 0 ] && command -v wg >/dev/null && command -v nsenter >/dev/null; then
    step "an overlay network: the node joins it; netmgr brings up its WireGuard interface (the kernel's, or the userspace device where the kernel has none)"
    run "$bin/powernode-controller" network create demo --cidr 10.213.77.0/24 --data "$data"
    run "$bin/powernode-controller" network join demo --node "$node_id" --data "$data"
    run "$bin/powernode-agent" --root "$root" wait netmgr/NetworkStatus --field state=Up --timeout 60
    # The controller hears of the node's key and endpoints with its next heartbeat.
    for _ in $(seq 30); do
        "$bin/powernode-controller" network show demo --data "$data" --json | grep -q '"public_key": "' && break
        sleep 1
    done
    run "$bin/powernode-controller" network show demo --data "$data"
    # Under a sandbox root the userspace device has a mount namespace of its own, where its UAPI
    # socket is /run/wireguard/pn0.sock (docs/network.md): wg reads it there. Kernel WireGuard
    # has no device process: wg reads the kernel.
    if [ -f "$root/run/powernode/netmgr/device/pn0.pid" ]; then
        device_pid=$(cat "$root/run/powernode/netmgr/device/pn0.pid")
        run nsenter -t "$device_pid" -m wg show pn0
    else
        run wg show pn0
    fi
else
    echo "demo: the overlay network left out (it needs root, wireguard-tools and nsenter)" >&2
fi

step "the node's view"
run "$bin/powernode-agent" --root "$root" status
run "$bin/ipcmonitor" --root "$root" enrollmgr/EnrollmentStatus

step "the controller's view"
run "$bin/powernode-controller" nodes list --data "$data"
if $modules; then
    # The controller hears of the active module with the next heartbeat.
    for _ in $(seq 30); do
        "$bin/powernode-controller" node show "$node_id" --data "$data" --json |
            grep -q '"state": "Active"' && break
        sleep 1
    done
    run "$bin/powernode-controller" node show "$node_id" --data "$data"
fi

step "the controller goes away: the node notices and backs off"
stop_pid "$controller_pid"; controller_pid=
run "$bin/powernode-agent" --root "$root" wait heartbeatd/ControllerStatus --field reachable=false --timeout 60
step "it comes back on the same address: the node recovers, nothing is enrolled again"
start_controller "$listen"
run "$bin/powernode-agent" --root "$root" wait heartbeatd/ControllerStatus --field reachable=true --timeout 90
run "$bin/powernode-controller" nodes list --data "$data"

step "the node's events, journalled by its eventd and delivered to the controller"
if $modules; then
    # eventd delivers in order and backed off while the controller was away: wait for the
    # rejection to arrive.
    for _ in $(seq 60); do
        [ -n "$("$bin/powernode-controller" events --data "$data" --kind module.rejected --json)" ] && break
        sleep 1
    done
fi
run "$bin/powernode-controller" events --data "$data" --node "$node_id"
run "$bin/powernode-controller" events --data "$data" --node "$node_id" --severity warning
if "$bin/powernode-agent" events --help >/dev/null 2>&1; then
    step "the same events on the node"
    run "$bin/powernode-agent" --root "$root" events
fi

if [ -t 0 ]; then
    step "running; press Ctrl-C to stop everything"
    while sleep 5; do "$bin/powernode-controller" nodes list --data "$data" | tail -n +2; done
fi
step "stopping the agents and the controller, removing $work"
