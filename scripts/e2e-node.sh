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
#   6. a second node with the used bootstrap token: BadToken, never enrolled.
# Uses the debug binaries `cargo test` builds (or BIN=dir). Run by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
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
cleanup() {
    scripts/device-steps.sh --root "$node" --stop >/dev/null 2>&1 || true
    scripts/device-steps.sh --root "$other" --stop >/dev/null 2>&1 || true
    [ -n "$controller_pid" ] && kill "$controller_pid" 2>/dev/null && wait "$controller_pid" 2>/dev/null
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
stop_controller() { kill "$controller_pid"; wait "$controller_pid" 2>/dev/null || true; controller_pid=; }

sandbox() { # ROOT TOKEN
    mkdir -p "$1/proc/sys/kernel/random" "$1/etc/powernode"
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

echo "$passed passed, 0 failed"
