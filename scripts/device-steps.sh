#!/usr/bin/env bash
# Boots a node's agents in order where systemd does not (the sandbox demo, tests, a minimal
# image): starts each agent in the background and waits until its step holds before starting
# the next, printing what it waits for; on a timeout it stops and says what it last saw.
#
#   device-steps.sh [--root DIR] [--bin DIR] [--timeout SECONDS]   start and wait
#   device-steps.sh [--root DIR] --stop                            stop the agents it started
#   device-steps.sh --list                                         the agents it starts, in order
#
# Agents log to <root>/run/powernode/<agent>.log; their pids are in <root>/run/powernode/<agent>.pid.
#
# --stop drains the node (DESIGN §7): one agent at a time, SIGTERM, then wait until it has
# exited (SIGKILL after 40 s, as the units' TimeoutStopSec). The order is the reverse of the
# boot order, except that heartbeatd and eventd stop last: heartbeatd after the task runners
# (execd, modulemgr, enrollmgr), so it reports to the controller the tasks they were
# interrupted in instead of leaving their leases to run out; eventd after everyone, so it
# journals their last events and delivers what it can before it goes. netmgr's WireGuard
# device (wgdevice, which outlives a restart of netmgr by design) is stopped after netmgr.
set -euo pipefail

root=${POWERNODE_ROOT:-/}
bin=$(cd "$(dirname "$0")/.." && pwd)/dist
timeout=60
stop=false
list=false
while [ $# -gt 0 ]; do
    case $1 in
        --root) root=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --stop) stop=true; shift ;;
        --list) list=true; shift ;;
        -h|--help) sed -n '2,/^set -e/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "device-steps: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
run_dir=$root/run/powernode

# The boot order: agent, then the condition that must hold before the next one starts.
steps=(
    "identitymgr identitymgr/NodeIdentity --field state=Resolved"
    "enrollmgr enrollmgr/EnrollmentStatus --field state=Enrolled"
    "eventd eventd/AgentStatus --field state=Running"
    "verifier verifier/AgentStatus --field state=Running"
    "mountmgr mountmgr/AgentStatus --field state=Running"
    "modulemgr modulemgr/AgentStatus --field state=Running"
    "execd execd/AgentStatus --field state=Running"
    "heartbeatd heartbeatd/ControllerStatus --field reachable=true"
    "netmgr netmgr/AgentStatus --field state=Running"
)

# Stopped after every other agent, in this order (see --stop above).
stop_last=(heartbeatd eventd)
# Seconds --stop waits for an agent to drain before it kills it.
stop_timeout=40

if $list; then
    for step in "${steps[@]}"; do echo "${step%% *}"; done
    exit 0
fi
mkdir -p "$run_dir"

# gone PID: the process has exited. A zombie counts: an agent this script started was
# orphaned when the script returned, and whoever adopted it may be slow to reap it.
gone() {
    local state
    state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 0
    [ "$state" = Z ]
}

# stop_agent AGENT: SIGTERM, then wait for it to drain and exit.
stop_agent() {
    local agent=$1 pidfile=$run_dir/$1.pid pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # Only a process that is still this agent: a pid file can outlive its process.
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$agent"; then
        echo "device-steps: stopping $agent (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq $((stop_timeout * 10))); do gone "$pid" && break; sleep 0.1; done
        if ! gone "$pid"; then
            echo "device-steps: $agent (pid $pid) still running ${stop_timeout}s after SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

if $stop; then
    order=()
    for ((i = ${#steps[@]} - 1; i >= 0; i--)); do
        agent=${steps[$i]%% *}
        [[ " ${stop_last[*]} " == *" $agent "* ]] || order+=("$agent")
    done
    for agent in "${order[@]}" "${stop_last[@]}"; do
        stop_agent "$agent"
        # The data plane outlives netmgr, not the node: its devices go when it has gone.
        if [ "$agent" = netmgr ]; then
            for pidfile in "$run_dir"/netmgr/device/*.pid; do
                [ -f "$pidfile" ] || continue
                pid=$(cat "$pidfile")
                if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q wgdevice; then
                    echo "device-steps: stopping wgdevice (pid $pid)"
                    kill -TERM "$pid" 2>/dev/null || true
                    for _ in $(seq 50); do gone "$pid" && break; sleep 0.1; done
                    gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
                fi
                rm -f "$pidfile"
            done
            # Kernel WireGuard (where netmgr used it) has no process: the interfaces netmgr
            # marked as its own are deleted.
            for marker in "$run_dir"/netmgr/kernel/*; do
                [ -f "$marker" ] || continue
                iface=${marker##*/}
                if ip link show dev "$iface" type wireguard 2>/dev/null | grep -q .; then
                    echo "device-steps: deleting the kernel WireGuard interface $iface"
                    ip link del dev "$iface" || true
                fi
                rm -f "$marker"
            done
        fi
    done
    exit 0
fi

[ -x "$bin/powernode-agent" ] || { echo "device-steps: no $bin/powernode-agent (make dist)" >&2; exit 1; }
for step in "${steps[@]}"; do
    read -r agent topic condition <<<"$step"
    echo "device-steps: starting $agent, then waiting for $topic ${condition:-to have an item}"
    "$bin/powernode-agent" --root "$root" run "$agent" >>"$run_dir/$agent.log" 2>&1 &
    echo $! >"$run_dir/$agent.pid"
    # shellcheck disable=SC2086 # the condition is a list of flags
    if ! "$bin/powernode-agent" --root "$root" wait "$topic" $condition --timeout "$timeout" >/dev/null; then
        echo "device-steps: $agent did not get there within ${timeout}s; its log ($run_dir/$agent.log) ends:" >&2
        tail -n 5 "$run_dir/$agent.log" >&2 || true
        exit 1
    fi
    echo "device-steps: $agent ok"
done
echo "device-steps: all ${#steps[@]} steps done"
