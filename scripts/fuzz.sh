#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder that reads another process's or the network's bytes
# (fuzz/, docs/reliability.md "Fuzzing"), with afl.rs on the stable toolchain. One target at a
# time, each for --seconds S (or until --execs N); prints each target's executions and crashes
# from afl's fuzzer_stats, then one JSON line, and exits 1 if any target crashed.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/fuzz.sh [--seconds S] [--execs N] [--target NAME]... [--list]

  --seconds S    fuzz each target for S seconds (default 600)
  --execs N      stop a target once it has run about N executions (afl-fuzz -E), if sooner
  --target NAME  fuzz only NAME (repeatable); default: every target
  --list         list the targets and what each reads, then exit
  -h, --help     this text

Needs cargo-afl (the afl.rs harness builder, which brings its own afl-fuzz):
  cargo install cargo-afl
Builds with `cargo afl build --release --features afl` into $FUZZ_TARGET_DIR (default
target/fuzz); afl's findings go to $FUZZ_OUT/<target>/ (default $FUZZ_TARGET_DIR/out).
Exit status: 0 no crash, 1 a target crashed, 2 bad usage, 3 cargo-afl missing.
The last line of output is JSON: {"targets":[{"name","execs","crashes","seconds"}],"total_crashes"}.
EOF
}

seconds=600
execs=""
targets=()
list=false
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="${2:?--seconds needs a value}"; shift 2 ;;
        --execs) execs="${2:?--execs needs a value}"; shift 2 ;;
        --target) targets+=("${2:?--target needs a name}"); shift 2 ;;
        --list) list=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$seconds" in '' | *[!0-9]*) echo "fuzz.sh: --seconds must be a whole number" >&2; exit 2 ;; esac
case "$execs" in *[!0-9]*) echo "fuzz.sh: --execs must be a whole number" >&2; exit 2 ;; esac

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

# Nothing is installed behind the caller's back: say what is missing and how to get it.
if ! cargo afl --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-afl is missing; install it with:" >&2
    echo "    cargo install cargo-afl" >&2
    exit 3
fi

target_dir="${FUZZ_TARGET_DIR:-$repo/target/fuzz}"
out_root="${FUZZ_OUT:-$target_dir/out}"
echo "building the harness (cargo afl build --release --features afl) into $target_dir" >&2
CARGO_TARGET_DIR="$target_dir" cargo afl build --release --features afl -p powernode-fuzz --bin afl >&2
harness="$target_dir/release/afl"

if $list; then
    "$harness" --list
    exit 0
fi
mapfile -t known < <("$harness" --list | cut -f1)
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${known[@]}")
fi
for t in "${targets[@]}"; do
    if ! printf '%s\n' "${known[@]}" | grep -qx -- "$t"; then
        echo "fuzz.sh: no target $t (known: ${known[*]})" >&2
        exit 2
    fi
done

# afl-fuzz asks questions of a machine set up for benchmarks; answer them for a shared one:
# no CPU-frequency check, no core pinning (other work shares the cores), no UI, and no refusal
# when crashes go to a core-dump helper (afl still sees every crash by its signal).
export AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1

# stat FILE KEY: a value of afl's fuzzer_stats.
stat() { awk -F' *: *' -v k="$2" '$1 == k { print $2 }' "$1" 2>/dev/null; }

json=""
total_crashes=0
printf '%-26s %14s %8s %8s\n' TARGET EXECS CRASHES SECONDS
for t in "${targets[@]}"; do
    out="$out_root/$t"
    rm -rf "$out"
    mkdir -p "$out"
    # The settings target writes its files under TMPDIR on every input: in memory if possible.
    tmp="$(mktemp -d "${FUZZ_TMP:-/dev/shm}/powernode-fuzz.XXXXXX" 2>/dev/null || mktemp -d)"
    args=(-i "fuzz/corpus/$t" -o "$out" -V "$seconds")
    [ -n "$execs" ] && args+=(-E "$execs")
    if ! TMPDIR="$tmp" cargo afl fuzz "${args[@]}" -- "$harness" "$t" >"$out/afl.log" 2>&1; then
        rm -rf "$tmp"
        echo "fuzz.sh: afl-fuzz failed for $t; the end of $out/afl.log:" >&2
        tail -n 20 "$out/afl.log" >&2
        exit 1
    fi
    rm -rf "$tmp"
    stats="$out/default/fuzzer_stats"
    run_execs="$(stat "$stats" execs_done)"
    run_seconds="$(stat "$stats" run_time)"
    crashes="$(find "$out/default/crashes" -name 'id:*' 2>/dev/null | wc -l)"
    total_crashes=$((total_crashes + crashes))
    printf '%-26s %14s %8s %8s\n' "$t" "${run_execs:-0}" "$crashes" "${run_seconds:-0}"
    if [ "$crashes" -gt 0 ]; then
        echo "  crashing inputs: $out/default/crashes/ (replay one: $harness $t < FILE)" >&2
    fi
    json+="${json:+,}{\"name\":\"$t\",\"execs\":${run_execs:-0},\"crashes\":$crashes,\"seconds\":${run_seconds:-0}}"
done
echo "{\"targets\":[$json],\"total_crashes\":$total_crashes}"
[ "$total_crashes" -eq 0 ]
