#!/usr/bin/env bash
# End-to-end test of a node against the reference controller, with real processes: the
# controller binary on loopback and the agents booted by device-steps.sh in a sandbox root.
# Checks, each step failing the test with what it saw:
#   1. enroll and first heartbeat; the controller lists exactly one node;
#   2. every agent restarted: nothing is enrolled again (same certificate, one node);
#   3. the controller restarted on the same address: heartbeats resume;
#   4. certificate rotation with short-lived certificates while heartbeats keep flowing, the
#      old certificate archived;
#   5. the controller down for a while: ControllerStatus unreachable, failures counted, recovery;
#   6. a second node with the used bootstrap token: BadToken, never enrolled;
#   7. modules assigned through the controller (built, pushed to a loopback docker-registry and
#      signed with the controller's tooling): two signed ones stacked by priority with files of
#      both in the union, an unsigned one refused; all of it reported to the controller; every
#      agent restarted without the stack changing; then one removed: the stack switches (needs
#      root, docker-registry and mkfs.erofs; skipped without, a failure under CI=true).
# Uses the debug binaries `cargo test` builds (or BIN=dir). Run by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/registry.sh
. scripts/lib/cleanup.sh
. scripts/lib/require.sh
bin=${BIN:-$PWD/target/debug}
[ -x "$bin/powernode-agent" ] && [ -x "$bin/powernode-controller" ] ||
    cargo build --quiet -p powernode-agent -p powernode-controller
agent=$bin/powernode-agent
ctl=$bin/powernode-controller

work=$(mktemp -d /tmp/powernode-e2e.XXXXXX)
node=$work/node
other=$work/other
data=$work/controller
controller_pid=
registry_pid=
cleanup() {
    scripts/device-steps.sh --root "$node" --stop >/dev/null 2>&1 || true
    scripts/device-steps.sh --root "$other" --stop >/dev/null 2>&1 || true
    stop_pid "$controller_pid"
    stop_pid "$registry_pid"
    unmount_under "$work"
    rm -rf "$work"
}
trap cleanup EXIT

passed=0
ok() { echo "e2e ok: $*"; passed=$((passed + 1)); }
fail() {
    echo "e2e FAILED: $*" >&2
    for f in "$node"/run/powernode/*.log "$work/controller.log"; do
        [ -f "$f" ] && { echo "--- $f" >&2; tail -n 8 "$f" >&2; }
    done
    echo "$passed passed, 1 failed"
    exit 1
}
# field ROOT TOPIC FIELD: a field of the topic's "global" item, as JSON text.
field() {
    "$agent" --root "$1" wait "$2" --key global --timeout 10 2>/dev/null |
        python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)['value']['$3']))"
}
wait_for() { # ROOT TOPIC FIELD=VALUE TIMEOUT WHAT
    "$agent" --root "$1" wait "$2" --field "$3" --timeout "$4" >/dev/null 2>&1 || fail "$5"
}
node_count() { "$ctl" nodes list --data "$data" --json | python3 -c "import json,sys; print(len(json.load(sys.stdin)))"; }
cert_count() {
    "$ctl" node show "$1" --data "$data" --json | python3 -c "import json,sys; print(len(json.load(sys.stdin)['certificates']))"
}

start_controller() { # [listen address]
    : >"$work/controller.out"
    "$ctl" serve --data "$data" --listen "${1:-127.0.0.1:0}" --cert-lifetime 24s \
        --heartbeat-interval 1s >"$work/controller.out" 2>>"$work/controller.log" &
    controller_pid=$!
    for _ in $(seq 200); do grep -q '^listening on ' "$work/controller.out" && break; sleep 0.05; done
    listen=$(sed -n 's/^listening on //p' "$work/controller.out")
    [ -n "$listen" ] || fail "the controller did not start"
}
stop_controller() { stop_pid "$controller_pid"; controller_pid=; }

# A registry for the module step, when this machine can run one.
modules=false
if require "e2e step 7 (modules)" root docker-registry mkfs.erofs; then
    modules=true
    start_registry "$work/registry"
    export COSIGN_PASSWORD=e2e
    "$ctl" module keygen --out "$work/keys" >/dev/null
fi

sandbox() { # ROOT TOKEN
    mkdir -p "$1/proc/sys/kernel/random" "$1/etc/powernode/trust"
    if $modules; then
        printf '[modules]\nplain_http = ["%s"]\n' "$registry" >"$1/etc/powernode/agent.toml"
        cp "$work/keys/cosign.pub" "$1/etc/powernode/trust/"
        echo 'keys = ["cosign.pub"]' >"$1/etc/powernode/trust/default.toml"
    fi
    cp "$data/ca.crt.pem" "$1/etc/powernode/controller-ca.pem"
    cat /proc/sys/kernel/random/uuid >"$1/proc/sys/kernel/random/boot_id"
    cp /proc/uptime /proc/loadavg /proc/meminfo "$1/proc/"
    echo "e2e-$(basename "$1")" >"$1/etc/hostname"
    echo "powernode.instance_uuid=$(cat /proc/sys/kernel/random/uuid) powernode.bootstrap_token=$2" \
        "powernode.controller_url=https://$listen powernode.ca_file=/etc/powernode/controller-ca.pem" >"$1/proc/cmdline"
}

start_controller
token=$("$ctl" token create --data "$data" --ttl 10m)
sandbox "$node" "$token"

# 1. enroll and first heartbeat
scripts/device-steps.sh --root "$node" --bin "$bin" --timeout 60 >/dev/null || fail "device-steps did not boot the node"
node_id=$(field "$node" enrollmgr/EnrollmentStatus node_id | tr -d '"')
fingerprint=$(field "$node" enrollmgr/EnrollmentStatus cert_fingerprint)
[ "$(node_count)" = 1 ] || fail "the controller lists $(node_count) nodes, expected 1"
ok "enrolled as $node_id and heartbeating"

# 2. every agent restarted: nothing enrolled again
scripts/device-steps.sh --root "$node" --stop >/dev/null
scripts/device-steps.sh --root "$node" --bin "$bin" --timeout 60 >/dev/null || fail "the node did not come back after restarting its agents"
[ "$(field "$node" enrollmgr/EnrollmentStatus cert_fingerprint)" = "$fingerprint" ] || fail "the certificate changed across an agent restart"
[ "$(cert_count "$node_id")" = 1 ] || fail "the controller issued $(cert_count "$node_id") certificates, expected 1"
ok "agents restarted without enrolling again"

# 3. controller restarted on the same address
stop_controller
wait_for "$node" heartbeatd/ControllerStatus reachable=false 30 "the node did not notice the controller stopping"
start_controller "$listen"
wait_for "$node" heartbeatd/ControllerStatus reachable=true 60 "heartbeats did not resume after the controller restarted"
[ "$(node_count)" = 1 ] || fail "the controller lists $(node_count) nodes after its restart"
ok "controller restarted, heartbeats resumed"

# 4. rotation (24 s certificates rotate at 75%) while heartbeats keep flowing
deadline=$((SECONDS + 60))
while [ "$(field "$node" enrollmgr/EnrollmentStatus cert_fingerprint)" = "$fingerprint" ]; do
    [ $SECONDS -lt $deadline ] || fail "the certificate was not rotated within 60 s"
    sleep 1
done
ls "$node"/persist/powernode/pki/cert.*.pem >/dev/null 2>&1 || fail "no archived certificate in pki/"
before=$(field "$node" heartbeatd/ControllerStatus last_success_ms)
sleep 3
after=$(field "$node" heartbeatd/ControllerStatus last_success_ms)
[ "$after" -gt "$before" ] || fail "no heartbeat succeeded after the rotation"
[ "$(field "$node" heartbeatd/ControllerStatus reachable)" = true ] || fail "controller unreachable after rotation"
ok "certificate rotated, old one archived, heartbeats flowing"

# 5. controller down for a while: unreachable, failures counted, recovery
stop_controller
wait_for "$node" heartbeatd/ControllerStatus reachable=false 30 "the node did not notice the controller stopping"
sleep 4
failures=$(field "$node" heartbeatd/ControllerStatus consecutive_failures)
[ "$failures" -ge 2 ] || fail "only $failures consecutive failures counted while the controller was down"
start_controller "$listen"
wait_for "$node" heartbeatd/ControllerStatus consecutive_failures=0 60 "the node did not recover"
ok "controller outage: $failures failures counted, recovered"

# 6. a second node with the used token is refused
sandbox "$other" "$token"
mkdir -p "$other/run/powernode"
for a in identitymgr enrollmgr; do
    "$agent" --root "$other" run "$a" >"$other/run/powernode/$a.log" 2>&1 &
    echo $! >"$other/run/powernode/$a.pid" # so that cleanup's device-steps.sh --stop ends them
done
wait_for "$other" enrollmgr/EnrollmentStatus state=BadToken 60 "a reused bootstrap token was not refused"
[ "$(node_count)" = 1 ] || fail "the reused token enrolled a second node"
ok "reused bootstrap token refused"

# 7. modules through the controller
module_state() { # NAME: its state, from the node
    "$agent" --root "$node" wait modulemgr/ModuleStatus --key "$1" --timeout 5 2>/dev/null |
        python3 -c "import json,sys; print(json.load(sys.stdin)['value']['state'])" 2>/dev/null || echo none
}
union() { cat "$node/run/powernode-mounts/modules/current/$1" 2>/dev/null || echo "(missing)"; }
reported() { # NAME FIELD: what the controller last heard of a module
    "$ctl" node show "$node_id" --data "$data" --json | python3 -c "
import json, sys
d = json.load(sys.stdin)
hb = d.get('last_heartbeat') or {}
body = hb.get('body') or {}
body = json.loads(body) if isinstance(body, str) else body
mods = [m for m in body.get('modules', []) if m['name'] == '$1']
print(mods[0].get('$2') if mods else 'none')"
}
if $modules; then
    for name in base tools rogue; do
        mkdir -p "$work/src/$name/etc"
        echo "$name" >"$work/src/$name/etc/$name.txt"
        echo "from $name" >"$work/src/$name/etc/shared.txt"
        "$ctl" module build "$work/src/$name" --name "$name" --version 1 --out "$work/out" >/dev/null ||
            fail "module build $name"
        "$ctl" module push "$work/out/$name-1-"*.manifest.json --to "$registry/e2e/$name:1" --plain-http >/dev/null ||
            fail "module push $name"
    done
    for name in base tools; do
        "$ctl" module sign "$registry/e2e/$name:1" --key "$work/keys/cosign.key" --plain-http >/dev/null ||
            fail "module sign $name"
    done
    "$ctl" module assign --node "$node_id" --data "$data" --plain-http --priority base=10 --priority tools=20 \
        "$registry/e2e/base:1" "$registry/e2e/tools:1" "$registry/e2e/rogue:1" >/dev/null || fail "module assign"
    for name in base tools; do
        "$agent" --root "$node" wait modulemgr/ModuleStatus --key "$name" --field state=Active --timeout 60 >/dev/null ||
            fail "$name did not become active (it is $(module_state "$name"))"
    done
    "$agent" --root "$node" wait modulemgr/ModuleStatus --key rogue --field state=Failed --timeout 60 >/dev/null ||
        fail "the unsigned module was not refused (it is $(module_state rogue))"
    [ "$(module_state base)" = Active ] && [ "$(module_state tools)" = Active ] || fail "base and tools are not both active"
    [ "$(union etc/base.txt)" = base ] && [ "$(union etc/tools.txt)" = tools ] || fail "the union lacks files of base or tools"
    [ "$(union etc/shared.txt)" = "from tools" ] || fail "the higher priority module does not win: $(union etc/shared.txt)"
    [ "$(union etc/rogue.txt)" = "(missing)" ] || fail "the unsigned module's files are in the union"
    deadline=$((SECONDS + 30))
    until [ "$(reported tools state)" = Active ] && [ "$(reported rogue state)" = Failed ]; do
        [ $SECONDS -lt $deadline ] || fail "the controller was not told: tools $(reported tools state), rogue $(reported rogue state)"
        sleep 1
    done
    reason=$(reported rogue error)
    case $reason in *signature*) ;; *) fail "the controller's reason for rogue does not name the signature: $reason" ;; esac
    ok "modules: base and tools stacked by priority, rogue refused ($reason), all reported"

    # Every agent restarted: the stack stays mounted throughout, nothing is collected from the
    # store, and the modules come back Active.
    blobs=$(ls "$node/persist/powernode/store/sha256" | wc -l)
    mount_generation() {
        "$agent" --root "$node" wait mountmgr/MountStatus --key modules --field state=Mounted --timeout 30 2>/dev/null |
            python3 -c "import json,sys; print(json.load(sys.stdin)['value']['generation'])"
    }
    generation=$(mount_generation)
    scripts/device-steps.sh --root "$node" --stop >/dev/null
    [ "$(union etc/tools.txt)" = tools ] || fail "the stack went away when the agents stopped"
    scripts/device-steps.sh --root "$node" --bin "$bin" --timeout 60 >/dev/null || fail "the node did not come back"
    for name in base tools; do
        "$agent" --root "$node" wait modulemgr/ModuleStatus --key "$name" --field state=Active --timeout 60 >/dev/null ||
            fail "$name is not active again after the restart (it is $(module_state "$name"))"
    done
    [ "$(union etc/tools.txt)" = tools ] && [ "$(union etc/base.txt)" = base ] || fail "the stack changed across the restart"
    [ "$(ls "$node/persist/powernode/store/sha256" | wc -l)" -ge "$blobs" ] || fail "blobs were collected across the restart"
    [ "$(mount_generation)" = "$generation" ] || fail "the restart built a new stack (generation $generation -> $(mount_generation))"
    ok "modules: every agent restarted, the stack stayed, nothing re-downloaded"

    "$ctl" module assign --node "$node_id" --data "$data" --plain-http --priority base=10 "$registry/e2e/base:1" >/dev/null ||
        fail "module assign (one)"
    deadline=$((SECONDS + 60))
    until [ "$(union etc/tools.txt)" = "(missing)" ]; do
        [ $SECONDS -lt $deadline ] || fail "tools was not taken out of the stack"
        sleep 0.5
    done
    [ "$(union etc/shared.txt)" = "from base" ] || fail "after the switch shared.txt is $(union etc/shared.txt)"
    ok "modules: tools removed, the stack switched"
else
    echo "e2e skipped: step 7 (modules)"
fi

echo "$passed passed, 0 failed"
