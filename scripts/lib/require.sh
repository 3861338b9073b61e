# Sourced by the test scripts: the one place a test step decides it cannot run on this machine
# (the same rule as `powernode_pubsub::testing::require` for the Rust tests).
#
#   require STEP NEED...   succeeds when every NEED is there: `root` (uid 0) or a program on
#                          PATH. Otherwise prints "skipped STEP: needs NEED" and returns 1; when
#                          CI=true it prints why and exits 1 instead, so CI can never pass by
#                          testing nothing.

require() {
    local step=$1 need missing=
    shift
    for need in "$@"; do
        if [ "$need" = root ]; then
            [ "$(id -u)" = 0 ] || { missing=root; break; }
        elif ! command -v "$need" >/dev/null 2>&1; then
            missing="$need, which is not on PATH"
            break
        fi
    done
    [ -n "$missing" ] || return 0
    if [ "${CI:-}" = true ]; then
        echo "$step cannot run: needs $missing; under CI=true a test may not skip" >&2
        exit 1
    fi
    echo "skipped $step: needs $missing" >&2
    return 1
}
