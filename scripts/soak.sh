#!/usr/bin/env bash
# The soak: a whole node as `make demo` builds it (a controller and a docker-registry on
# loopback, three signed modules, every agent device-steps.sh starts), and a driver that keeps
# changing the node's desired state while it SIGKILLs a random agent at a random moment,
# restarts it as its unit would, and checks after every kill that the node converges.
#
#   scripts/soak.sh [--kills N] [--seconds S] [--timeout S] [--seed N] [--log FILE] [--bin DIR]
#
#   --kills N     stop after N kills (default 1000; `make soak` and `make test` run 100)
#   --seconds S   stop after S seconds of soaking as well (default: no time limit)
#   --timeout S   a kill not converged within S seconds is a failure (default 30)
#   --seed N      seed of the random choices, to replay a run (default: random, printed)
#   --log FILE    write the log of every kill (agent, moment, time or what was wrong) to FILE
#   --bin DIR     where powernode-agent and powernode-controller are (default dist/, `make dist`)
#
# The agents are those of the binary's dispatch table (`powernode-agent agents`) that
# device-steps.sh starts (`device-steps.sh --list`). Each round picks one and a moment:
#   idle      a random moment (0-0.5 s) with nothing else going on;
#   restart   right after a restart: the agent is restarted (SIGTERM, as `systemctl restart`),
#             then killed 0-0.3 s into its new life (settings, checkpoints, recovery);
#   switch    during a switch: a new module set is assigned on the controller, the kill lands
#             0-1.5 s later (heartbeat reply, resolve, verify, the mount switch), or, half the
#             time, within 50 ms of mountmgr starting to build the new stack;
#   download  mid-download: an assignment that brings the large module back (it was
#             garbage-collected when it left), the kill lands once it is Downloading.
# The agent is restarted at once with the command line device-steps.sh uses (its unit's
# RestartSec=2s is left out: the time measured is the node's recovery, not systemd's delay),
# and the node must converge (scripts/lib/soak_check.py says exactly what that checks: every
# agent Running, the applied generation caught up, the expected stack mounted exactly once,
# no leaked mount or loop device, no quarantined file, one certificate, one node).
# The convergence time runs from the kill. A round that does not converge in time is logged
# with what was wrong (and the agents' logs are kept), and the soak goes on.
#
# The last line is one JSON object: kills, converged, failures (converged + failures = kills),
# converge_p50_s, converge_p99_s, converge_max_s (over the converged kills), leaked_mounts
# (mounts and loop devices still there at a failed check), quarantined (files found),
# events_lost, events_duplicated (of the agent.started event every start raises, counted on
# the controller once the node has delivered everything: scripts/lib/soak_events.py).
# Needs root, docker-registry and mkfs.erofs: skipped (exit 0) without them, a failure under
# CI=true (scripts/lib/require.sh). Exit 1 if any kill failed or an event was lost or duplicated.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/registry.sh
. scripts/lib/cleanup.sh
. scripts/lib/require.sh

kills_wanted=1000
seconds=0
timeout=30
seed=$((RANDOM * 32768 + RANDOM))
bin=$PWD/dist
keep_log=
while [ $# -gt 0 ]; do
    case $1 in
        --kills) kills_wanted=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --log) keep_log=$2; shift 2 ;;
        --bin) bin=$(cd "$2" && pwd); shift 2 ;;
        -h|--help) sed -n '2,/^set -e/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "soak: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for n in "$kills_wanted" "$seconds" "$timeout" "$seed"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "soak: $n is not a whole number (see --help)" >&2; exit 2; }
done
require soak root docker-registry mkfs.erofs || exit 0
[ -x "$bin/powernode-agent" ] && [ -x "$bin/powernode-controller" ] || {
    echo "soak: no powernode-agent or powernode-controller in $bin (make dist)" >&2
    exit 1
}
agent_bin=$bin/powernode-agent
# The interpreter itself rather than a version manager's shim (pyenv's costs a few hundred ms):
# the check's start-up counts in every convergence time.
python=$(python3 -c 'import sys; print(sys.executable)')
ctl=$bin/powernode-controller
RANDOM=$seed

work=$(mktemp -d /tmp/powernode-soak.XXXXXX)
root=$work/node
run_dir=$root/run/powernode
data=$work/controller
log=$work/soak.log
controller_pid=
registry_pid=
agents=()

say() { echo "soak: $*" >&2; }

# --- Cleanup: everything this script started, by pid; the stacks mountmgr leaves; $work.

cleanup() {
    local i
    for ((i = ${#agents[@]} - 1; i >= 0; i--)); do stop_agent "${agents[$i]}"; done
    stop_pid "$controller_pid"
    stop_pid "$registry_pid"
    unmount_under "$work"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Agents: started, stopped and killed the way their units are.

pid_of() { cat "$run_dir/$1.pid"; }

# gone PID: the process has exited, every thread of it, as systemd sees it before it restarts
# a unit. A zombie whose threads have all exited counts: an agent device-steps.sh started was
# orphaned when it returned, and whoever adopted it may be slow to reap it (or never do). A
# zombie leader whose other threads still run (a SIGKILLed agent's writer thread finishing its
# write) still holds its files and locks: not gone.
gone() {
    local state
    state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 0
    [ "$state" = Z ] && [ "$(ls "/proc/$1/task" 2>/dev/null | wc -l)" -le 1 ]
}

wait_gone() { # PID SECONDS
    local i
    for ((i = 0; i < $2 * 100; i++)); do gone "$1" && return 0; sleep 0.01; done
    gone "$1"
}

# start_agent AGENT: what device-steps.sh does for each step (and systemd's ExecStart=):
# the same command line, its log appended to, a new pid file. Disowned: the shell still reaps
# it, without a "Killed" line for every kill.
start_agent() {
    "$agent_bin" --root "$root" run "$1" >>"$run_dir/$1.log" 2>&1 &
    echo $! >"$run_dir/$1.pid"
    disown $!
}

# stop_agent AGENT: SIGTERM, as systemctl stop; SIGKILL past the unit's TimeoutStopSec=40s.
stop_agent() {
    local pid
    pid=$(pid_of "$1" 2>/dev/null) || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    wait_gone "$pid" 40 || { kill -KILL "$pid" 2>/dev/null; wait_gone "$pid" 5 || true; }
}

# kill_agent AGENT: SIGKILL; sets $killed_at (when the clock of this round starts).
kill_agent() {
    local pid
    pid=$(pid_of "$1")
    killed_at=$EPOCHREALTIME
    kill -KILL "$pid"
    wait_gone "$pid" 5 || { say "$1 (pid $pid) survived SIGKILL"; exit 1; }
}

# The agents under test: the dispatch table's, as device-steps.sh boots them (in its order).
list_agents() {
    local table steps a
    table=$("$agent_bin" agents)
    steps=$(scripts/device-steps.sh --list)
    for a in $table; do
        grep -qx "$a" <<<"$steps" || say "warning: $a is in the dispatch table but device-steps.sh does not start it: not soaked"
    done
    for a in $steps; do
        grep -qx "$a" <<<"$table" && agents+=("$a")
    done
    [ ${#agents[@]} -gt 0 ] || { say "no agents to soak"; exit 1; }
}

# --- The controller, the registry and the modules, as the demo sets them up.

start_controller() {
    # A 1 s heartbeat interval, the node's minimum: a desired-state change reaches the node
    # within a second.
    "$ctl" serve --data "$data" --listen 127.0.0.1:0 --heartbeat-interval 1s \
        >"$work/controller.out" 2>"$work/controller.log" &
    controller_pid=$!
    for _ in $(seq 200); do grep -q '^listening on ' "$work/controller.out" && break; sleep 0.05; done
    listen=$(sed -n 's/^listening on //p' "$work/controller.out")
    [ -n "$listen" ] || { say "the controller did not start:"; cat "$work/controller.log" >&2; exit 1; }
}

# The modules a desired state picks from, bottom of the stack first (by priority). big is
# large enough (random, incompressible) that downloading it takes a few hundred ms over
# loopback, so that a kill can land in the middle; tools has a health check, so a switch to a
# stack with it runs a process in the new stack before switching.
module_names=(base tools big)
declare -A priority=([base]=10 [tools]=20 [big]=30) ref digest

build_module() { # NAME
    local name=$1 src=$work/src/$1 out
    mkdir -p "$src/etc" "$src/bin"
    echo "$name" >"$src/etc/$name.txt"
    echo "from $name" >"$src/etc/shared.txt"
    local flags=()
    case $name in
        tools)
            printf '#!/bin/sh\nexit 0\n' >"$src/bin/check"
            chmod 755 "$src/bin/check"
            flags=(--health-check bin/check) ;;
        big) head -c $((48 << 20)) /dev/urandom >"$src/etc/blob" ;;
    esac
    out=$("$ctl" module build "$src" --name "$name" --version 1 --priority "${priority[$name]}" \
        "${flags[@]}" --out "$work/out" --json)
    digest[$name]=$(json_field "$out" image_digest)
    out=$("$ctl" module push "$work/out/$name-1-"*.manifest.json --to "$registry/soak/$name:1" --plain-http --json)
    ref[$name]=$(json_field "$out" pinned)
    "$ctl" module sign "${ref[$name]}" --key "$work/keys/cosign.key" --plain-http >/dev/null
}

# json_field JSON PATH: the value at a dotted path; a list one element a line.
json_field() {
    "$python" -c '
import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v = v[k]
print("\n".join(map(str, v)) if isinstance(v, list) else v)' "$1" "$2"
}

# --- The node.

make_sandbox() { # TOKEN
    mkdir -p "$root/proc/sys/kernel/random" "$root/etc/powernode/trust" "$run_dir"
    cp "$data/ca.crt.pem" "$root/etc/powernode/controller-ca.pem"
    cat /proc/sys/kernel/random/boot_id >"$root/proc/sys/kernel/random/boot_id"
    cp /proc/uptime /proc/loadavg /proc/meminfo "$root/proc/"
    echo soak-node >"$root/etc/hostname"
    echo "powernode.instance_uuid=$(cat /proc/sys/kernel/random/uuid) powernode.bootstrap_token=$1" \
        "powernode.controller_url=https://$listen powernode.ca_file=/etc/powernode/controller-ca.pem" >"$root/proc/cmdline"
    # No confirmation window after a switch: each round checks that exactly one stack is
    # mounted, and a window would keep the previous one for a minute (docs/mountmgr.md).
    printf '[modules]\nplain_http = ["%s"]\n[mounts]\nconfirm_window_s = 0\n' "$registry" \
        >"$root/etc/powernode/agent.toml"
    cp "$work/keys/cosign.pub" "$root/etc/powernode/trust/"
    echo 'keys = ["cosign.pub"]' >"$root/etc/powernode/trust/default.toml"
}

# --- Desired state: a subset of module_names, as a bit mask (bit i = module_names[i]).

assigned=0
mask=0
generation=0

assign() { # MASK
    local i refs=() out
    for i in "${!module_names[@]}"; do
        (($1 >> i & 1)) && refs+=("${ref[${module_names[$i]}]}")
    done
    [ ${#refs[@]} -gt 0 ] || refs=(--none)
    out=$("$ctl" module assign --node "$node_id" --data "$data" --plain-http --json "${refs[@]}")
    generation=$(json_field "$out" generation)
    assigned=$1
}

# other_mask [WITH] [WITHOUT]: sets $mask to a random set other than the assigned one, with
# module bit WITH set and bit WITHOUT clear where given. (Not echoed: $RANDOM in a command
# substitution is reseeded, and --seed would no longer replay the choices.)
other_mask() {
    local with=${1:-} without=${2:-}
    while :; do
        mask=$((RANDOM % (1 << ${#module_names[@]})))
        [ "$mask" != "$assigned" ] || continue
        [ -z "$with" ] || ((mask >> with & 1)) || continue
        [ -z "$without" ] || ! ((mask >> without & 1)) || continue
        return
    done
}

# --- Convergence.

# converge SINCE TIMEOUT [STACK]: runs the check, sets $result (its JSON line); 0 if converged.
# STACK: the mount ids the stack must keep (the round changed nothing).
converge() {
    local args=() a i
    [ -z "${3:-}" ] || args+=(--stack "$3")
    for a in "${agents[@]}"; do args+=(--agent "$a=$(pid_of "$a")"); done
    for i in "${!module_names[@]}"; do
        ((assigned >> i & 1)) && args+=(--module "${module_names[$i]}=${digest[${module_names[$i]}]}")
    done
    result=$("$python" scripts/lib/soak_check.py --root "$root" --work "$work" --agent-bin "$agent_bin" \
        --controller-bin "$ctl" --data "$data" --node-id "$node_id" --generation "$generation" \
        --fingerprint "$fingerprint" --cert-sha256 "$cert_sha256" --since "$1" --timeout "$2" \
        "${args[@]}") && return 0
    return 1
}

# --- The moments of a kill. Each leaves $victim to be killed next.

sleep_ms() { sleep "$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)))"; }
big_bit=2

moment_idle() { sleep_ms $((RANDOM % 500)); }

# The process started here may die before it raises agent.started: the event tally allows it.
moment_restart() {
    stop_agent "$victim"
    start_agent "$victim"
    early_starts[$victim]=$((${early_starts[$victim]:-0} + 1))
    sleep_ms $((RANDOM % 300))
}

# Half the time the kill lands anywhere in the 1.5 s after the assignment; the other half
# within 50 ms of mountmgr starting to build the new stack (health check, switch, retire).
moment_switch() {
    other_mask
    assign "$mask"
    if ((RANDOM % 2)); then
        sleep_ms $((RANDOM % 1500))
    else
        "$agent_bin" --root "$root" wait mountmgr/MountStatus --key modules --field state=Mounting \
            --timeout 3 >/dev/null 2>&1 && moment=switch-mounting || moment=switch-mounting-missed
        sleep_ms $((RANDOM % 50))
    fi
}

# Falls back to a switch that takes big away when it is assigned (the next download round can
# bring it back).
moment_download() {
    if ((assigned >> big_bit & 1)); then
        moment=switch
        other_mask "" "$big_bit"
        assign "$mask"
        sleep_ms $((RANDOM % 1500))
        return
    fi
    other_mask "$big_bit"
    assign "$mask"
    "$agent_bin" --root "$root" wait modulemgr/ModuleStatus --key big --field state=Downloading \
        --timeout 5 >/dev/null 2>&1 || moment=download-missed
    sleep_ms $((RANDOM % 100))
    moment="$moment($(big_progress))"
}

# big_progress: big's state and bytes done, as the log shows where the kill landed.
big_progress() {
    "$agent_bin" --root "$root" wait modulemgr/ModuleStatus --key big --timeout 0.5 2>/dev/null |
        "$python" -c "import json,sys; v=json.load(sys.stdin)['value']; print(f\"{v['state']} {v['bytes_done'] >> 20} of {(v['bytes_total'] or 0) >> 20} MiB\")" 2>/dev/null ||
        echo unknown
}

pick_moment() {
    local r=$((RANDOM % 100))
    if ((r < 25)); then moment=idle
    elif ((r < 50)); then moment=restart
    elif ((r < 75)); then moment=switch
    else moment=download
    fi
}

# --- Bookkeeping.

kills=0
# Per agent, for the event tally: processes seen Running (each raised agent.started), and those
# killed too early, or never seen converged, to be sure they did.
declare -A running_starts early_starts
converged=0
failures=0
: >"$work/times" >"$work/leaks" >"$work/quarantined"
failed_dir=

record() { # ROUND AGENT MOMENT CONVERGED
    local seconds
    seconds=$(json_field "$result" seconds)
    if [ "$4" = yes ]; then
        converged=$((converged + 1))
        echo "$seconds" >>"$work/times"
        printf '%d %s %s converged %ss\n' "$1" "$2" "$3" "$seconds" >>"$log"
    else
        failures=$((failures + 1))
        printf '%d %s %s FAILED after %ss: %s\n' "$1" "$2" "$3" "$seconds" "$result" >>"$log"
        say "kill $1 ($2, $3) did not converge within ${timeout}s: $(json_field "$result" problems)"
        json_field "$result" leaks >>"$work/leaks"
        json_field "$result" quarantined >>"$work/quarantined"
        keep_failure "$1"
    fi
}

# keep_failure ROUND: the agents' logs and the soak log as they were, outside $work.
keep_failure() {
    [ -n "$failed_dir" ] || failed_dir=$(mktemp -d /tmp/powernode-soak-failed.XXXXXX)
    mkdir -p "$failed_dir/kill-$1"
    cp "$run_dir"/*.log "$log" "$work/controller.log" "$failed_dir/kill-$1/" 2>/dev/null || true
    "$agent_bin" --root "$root" status >"$failed_dir/kill-$1/status.txt" 2>&1 || true
    grep " $root/" /proc/self/mountinfo >"$failed_dir/kill-$1/mountinfo.txt" || true
}

# tally_events: sets $events_lost and $events_duplicated from the controller's agent.started
# events, once nothing is left to deliver. Without eventd nothing is delivered: nothing counted.
events_lost=0
events_duplicated=0
tally_events() {
    local args=() a tally
    if ! printf '%s\n' "${agents[@]}" | grep -qx eventd; then
        say "no eventd among the agents: events not counted (events_lost and events_duplicated are 0)"
        return
    fi
    for a in "${agents[@]}"; do
        args+=(--started "$a=${running_starts[$a]}" --early "$a=${early_starts[$a]:-0}")
    done
    tally=$("$python" scripts/lib/soak_events.py --root "$root" --agent-bin "$agent_bin" \
        --data "$data" --listen "$listen" --node-id "$node_id" "${args[@]}")
    events_lost=$(json_field "$tally" events_lost)
    events_duplicated=$(json_field "$tally" events_duplicated)
    say "agent.started events: $(json_field "$tally" delivered) on the controller for at least" \
        "$(json_field "$tally" raised_at_least) starts raised; $events_lost lost, $events_duplicated duplicated"
    json_field "$tally" problems | while read -r p; do [ -z "$p" ] || say "events: $p"; done
}

summary() { # the last line
    "$python" - "$work/times" "$kills" "$converged" "$failures" \
        "$(sort -u "$work/leaks" | grep -c . || true)" "$(sort -u "$work/quarantined" | grep -c . || true)" \
        "$events_lost" "$events_duplicated" <<'EOF'
import json, math, sys
times = sorted(float(t) for t in open(sys.argv[1]).read().split())
def rank(p):  # nearest rank
    return times[max(0, math.ceil(p * len(times)) - 1)] if times else None
kills, converged, failures, leaked, quarantined, lost, duplicated = (int(x) for x in sys.argv[2:9])
print(json.dumps({"kills": kills, "converged": converged, "failures": failures,
                  "converge_p50_s": rank(0.50), "converge_p99_s": rank(0.99),
                  "converge_max_s": times[-1] if times else None,
                  "leaked_mounts": leaked, "quarantined": quarantined,
                  "events_lost": lost, "events_duplicated": duplicated}))
EOF
}

# --- The run.

list_agents
say "agents: ${agents[*]}; seed $seed; work directory $work"
start_controller
start_registry "$work/registry"
export COSIGN_PASSWORD=soak
"$ctl" module keygen --out "$work/keys" >/dev/null
for name in "${module_names[@]}"; do build_module "$name"; done
make_sandbox "$("$ctl" token create --data "$data" --ttl 10m)"
scripts/device-steps.sh --root "$root" --bin "$bin" --timeout 60 >"$work/device-steps.log" 2>&1 || {
    say "device-steps.sh did not boot the node:"; cat "$work/device-steps.log" >&2; exit 1
}
enrollment=$("$agent_bin" --root "$root" wait enrollmgr/EnrollmentStatus --field state=Enrolled --timeout 10)
node_id=$(json_field "$enrollment" value.node_id)
fingerprint=$(json_field "$enrollment" value.cert_fingerprint)
cert_sha256=$(sha256sum "$root/persist/powernode/pki/cert.pem" | cut -d' ' -f1)
assign 7
converge "$EPOCHREALTIME" 120 || { say "the node never converged before the first kill: $result"; exit 1; }
stack=$(json_field "$result" stack)
for a in "${agents[@]}"; do running_starts[$a]=1; done
say "node $node_id booted, all modules active; soaking"

started=$SECONDS
round=0
while ((kills < kills_wanted)) && { ((seconds == 0)) || ((SECONDS - started < seconds)); }; do
    round=$((round + 1))
    victim=${agents[$((RANDOM % ${#agents[@]}))]}
    pick_moment
    "moment_${moment}"
    kill_agent "$victim"
    kills=$((kills + 1))
    start_agent "$victim"
    # A round that changed nothing must find the stack it left, not a new mount of it.
    case $moment in idle | restart) keep=$stack ;; *) keep= ;; esac
    if converge "$killed_at" "$timeout" "$keep"; then
        record "$round" "$victim" "$moment" yes
        stack=$(json_field "$result" stack)
        running_starts[$victim]=$((running_starts[$victim] + 1))
    else
        record "$round" "$victim" "$moment" no
        stack=
        early_starts[$victim]=$((${early_starts[$victim]:-0} + 1))
    fi
    ((kills % 50)) || say "$kills kills, $failures failed, $((SECONDS - started)) s"
done
say "$kills kills in $((SECONDS - started)) s"
[ -z "$keep_log" ] || cp "$log" "$keep_log"
[ -z "$failed_dir" ] || { cp "$log" "$failed_dir/"; say "failures kept in $failed_dir"; }
tally_events
summary
[ "$failures" = 0 ] && [ "$events_lost" = 0 ] && [ "$events_duplicated" = 0 ]
