# Sourced by the demo, e2e-node.sh and bench-modules.sh: the OCI registry server from Debian's
# docker-registry package, on a free loopback port, storing under a directory of the caller's.
#
#   start_registry DIR    sets $registry (127.0.0.1:PORT) and $registry_pid; returns once the
#                         server accepts connections (non-zero if it does not within 10 s)
# The caller stops it by pid ($registry_pid) in its cleanup.

start_registry() {
    local dir=$1 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    registry=127.0.0.1:$port
    mkdir -p "$dir/data"
    printf 'version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: %s}\n' \
        "$dir/data" "$registry" >"$dir/config.yml"
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    registry_pid=$!
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the registry did not start; its log:" >&2
    cat "$dir/registry.log" >&2
    return 1
}
