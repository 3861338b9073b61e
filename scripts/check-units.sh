#!/usr/bin/env bash
# Verifies the systemd units in scripts/systemd with `systemd-analyze verify`, with @BINDIR@
# pointing at a built powernode-agent (default: the debug build that `cargo test` makes).
set -euo pipefail
cd "$(dirname "$0")/.."
bindir=${1:-$PWD/target/debug}
[ -x "$bindir/powernode-agent" ] || cargo build --quiet -p powernode-agent
if ! command -v systemd-analyze >/dev/null; then
    echo "check-units: systemd-analyze is not installed (apt-get install systemd)" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for unit in scripts/systemd/*; do
    sed "s|@BINDIR@|$bindir|g" "$unit" >"$work/$(basename "$unit")"
done
# Verify from inside the directory so the units find each other. systemd-analyze only warns
# about many mistakes (an unknown Type=, a misspelt key) and still exits 0: any diagnostic fails.
if ! out=$(cd "$work" && systemd-analyze verify --man=no ./* 2>&1) || [ -n "$out" ]; then
    echo "check-units: systemd-analyze verify found problems:" >&2
    echo "$out" >&2
    exit 1
fi
echo "check-units: $(ls "$work" | wc -l) units verified"
