# Sourced by the demo, e2e-node.sh and bench-modules.sh: what their EXIT traps share. Each
# function succeeds whatever happens, so a trap running under `set -e` gets to its end.

# stop_pid PID: SIGTERM to a process this script started (if PID is set), then reap it.
stop_pid() {
    [ -n "${1:-}" ] || return 0
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# unmount_under DIR: lazily unmounts every mount point below DIR, deepest first (mountmgr
# leaves its stacks mounted when it stops, by design: a node keeps running its modules).
unmount_under() {
    grep " $1/" /proc/self/mountinfo 2>/dev/null | awk '{print $5}' | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done || true
}
