#!/usr/bin/env bash
# Benchmark: pull + verify + mount of a 256 MiB module from a loopback registry, against the
# floor of hashing the same bytes with SHA-256, measured in the same run (docs/performance.md).
#
#   scripts/bench-modules.sh [SIZE_MIB]      (default 256; needs root, docker-registry, mkfs.erofs)
#
# The floor is SHA-256 of the image file with the page cache warm, best of 3, measured with
# both `openssl dgst -sha256` (SHA-NI where the CPU has it: the fastest SHA-256 here, and the
# `sha256_mib_per_s` the ratio is taken against) and `sha256sum` (coreutils, reported beside
# it). Then the real agents (release build) pull, verify and mount the signed module, three
# rounds (attach, Active, detach, the store collected, again); the times come from
# modulemgr/ModuleStatus as `ipcmonitor --follow --json` prints it: from `attach` to the status
# leaving Verifying (pulled and verified), and to Active (mounted); medians are reported.
# modulemgr's peak RSS is VmHWM from /proc/<pid>/status over all rounds. The phases of each
# round go to stderr: resolve, download (Downloading until the store has the image), verify
# tail (Verifying: what verification adds after the download), mount; from the agents' logs the
# store's SHA-256 time (`hash_ms`), how much of the image the verifier hashed while it arrived
# (`hashed_early_mib`) and its time after the download (`tail_ms`). The last line is one JSON
# object.
#
# After the rounds (the kernel's deferred work of tearing down 1000 stacks would slow the first
# round down), mountmgr's `bench-switch` example (release build) switches a stack at a mount
# path 1000 times on a node root of its own while a thread opens and reads a file there in a
# tight loop (docs/mountmgr.md, "The switch"): `switch_gap_failures` counts the opens and reads
# that failed (0: the path never showed less than a whole tree), `switch_ms` is the median time
# from a new MountConfig to its Mounted answer.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/registry.sh
. scripts/lib/cleanup.sh

size_mib=${1:-256}
[ "$(id -u)" = 0 ] || { echo "bench-modules: needs root (it mounts erofs and overlayfs)" >&2; exit 2; }
for tool in docker-registry mkfs.erofs python3; do
    command -v "$tool" >/dev/null || { echo "bench-modules: $tool is not installed" >&2; exit 2; }
done

cargo build --release -q -p powernode-agent -p powernode-controller
cargo build --release -q -p mountmgr --example bench-switch
bin=$PWD/target/release
agent=$bin/powernode-agent
ctl=$bin/powernode-controller

work=$(mktemp -d /var/tmp/bench-modules.XXXXXX)
root=$work/root
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    unmount_under "$work"
    rm -rf "$work"
}
trap cleanup EXIT

# The registry, on a free loopback port.
start_registry "$work/registry"
pids+=("$registry_pid")

# The module: one file of random bytes (erofs stores it uncompressed: the image is as big).
mkdir -p "$work/tree"
head -c "$((size_mib << 20))" /dev/urandom >"$work/tree/payload.bin"
echo "bench-modules: building and pushing a ${size_mib} MiB module" >&2
$ctl module build "$work/tree" --name big --version 1 --out "$work/out" >/dev/null
image=$(ls "$work"/out/*.erofs)
export COSIGN_PASSWORD=bench
$ctl module keygen --out "$work/keys" >/dev/null
$ctl module push "$work"/out/*.manifest.json --to "$registry/bench/big:1" --plain-http >/dev/null
$ctl module sign "$registry/bench/big:1" --key "$work/keys/cosign.key" --plain-http >/dev/null

# The floor: SHA-256 of the image, page cache warm, best of 3 for each tool.
cat "$image" >/dev/null
floors=$(python3 - "$image" "$size_mib" <<'EOF'
import subprocess, sys, time
path, size = sys.argv[1], int(sys.argv[2])
def best(cmd):
    times = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.monotonic() - t)
    return size / min(times)
print(f"{best(['openssl', 'dgst', '-sha256', path]):.1f} {best(['sha256sum', path]):.1f}")
EOF
)

# The node. Its run/ is a tmpfs, as on a real node (DESIGN: sockets and non-persistent
# checkpoints): on the disk, every status checkpoint's fsync would queue behind the writeback
# of the image being stored.
mkdir -p "$root/etc/powernode/trust" "$root/run"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
cat >"$root/etc/powernode/agent.toml" <<EOF
[modules]
plain_http = ["$registry"]
EOF
cp "$work/keys/cosign.pub" "$root/etc/powernode/trust/"
echo 'keys = ["cosign.pub"]' >"$root/etc/powernode/trust/default.toml"
for a in verifier mountmgr modulemgr; do
    "$agent" run "$a" --root "$root" >"$work/$a.log" 2>&1 &
    pids+=($!)
    [ "$a" = modulemgr ] && modulemgr_pid=$!
done
"$agent" --root "$root" wait modulemgr/AgentStatus --field state=Running --timeout 30 >/dev/null

python3 - "$agent" "$root" "$registry" "$size_mib" "$floors" "$modulemgr_pid" "$work" <<'EOF'
import json, os, re, statistics, subprocess, sys, time
agent, root, registry, size, floors, pid, work = sys.argv[1:8]
size = int(size)
floor, sha256sum = (float(x) for x in floors.split())
store = f"{root}/persist/powernode/store/sha256"

def attach_once():
    follow = subprocess.Popen([agent, "run", "ipcmonitor", "--root", root,
                               "modulemgr/ModuleStatus", "--follow", "--json"],
                              stdout=subprocess.PIPE, text=True)
    follow.stdout.readline()  # the snapshot header: following from here on
    t0 = time.monotonic()
    subprocess.run([agent, "--root", root, "attach", f"{registry}/bench/big:1", "--name", "big",
                    "--no-wait"], check=True, stderr=subprocess.DEVNULL)
    verified = None
    first = {}  # state -> seconds since attach when first seen
    for line in follow.stdout:
        event = json.loads(line)
        value = event.get("value") or {}
        if event.get("key") != "big" or not value:
            continue
        state, now = value.get("state"), time.monotonic()
        first.setdefault(state, now - t0)
        if state == "Failed":
            sys.exit(f"bench-modules: the module failed: {value.get('error')}")
        if verified is None and state in ("Mounting", "Active"):
            verified = now - t0
        if state == "Active":
            follow.kill()
            downloading = first.get("Downloading", 0.0)
            verifying = first.get("Verifying", downloading)
            mounting = first.get("Mounting", verified)
            phases.append({"resolve": downloading, "download": verifying - downloading,
                           "verify_tail": mounting - verifying, "mount": now - t0 - mounting})
            return verified, now - t0
    sys.exit("bench-modules: ipcmonitor ended before the module was active")

def detach_and_collect():
    subprocess.run([agent, "--root", root, "detach", "big"], check=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while os.listdir(store):
        if time.monotonic() > deadline:
            sys.exit("bench-modules: the detached module's blob was not collected")
        time.sleep(0.05)

rounds, phases = [], []
for i in range(3):
    rounds.append(attach_once())
    if i < 2:
        detach_and_collect()
with open(f"/proc/{pid}/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
verified = statistics.median(r[0] for r in rounds)
active = statistics.median(r[1] for r in rounds)
rate = size / verified
result = {
    "module_mib": size,
    "sha256_mib_per_s": floor,
    "sha256sum_mib_per_s": sha256sum,
    "pull_verify_mib_per_s": round(rate, 1),
    "ratio": round(rate / floor, 2),
    "ratio_vs_sha256sum": round(rate / sha256sum, 2),
    "attach_total_s": round(active, 3),
    "modulemgr_peak_rss_mib": round(hwm / 1024, 1),
}
print(f"floor: sha256 {floor} MiB/s (openssl), {sha256sum} MiB/s (sha256sum); "
      f"pull+verify {result['pull_verify_mib_per_s']} MiB/s = {result['ratio']}x / "
      f"{result['ratio_vs_sha256sum']}x (target 0.5x); attach to active {result['attach_total_s']} s; "
      f"modulemgr peak RSS {result['modulemgr_peak_rss_mib']} MiB (target 32); "
      f"rounds (verified s, active s): {[(round(a, 3), round(b, 3)) for a, b in rounds]}",
      file=sys.stderr)
def logged(agent_name, message, field):
    """The values of `field=N` on the log lines of `agent_name` that say `message`."""
    try:
        text = open(f"{work}/{agent_name}.log", errors="replace").read()
    except OSError:
        return []
    return [int(m.group(1)) for line in text.splitlines() if message in line
            for m in [re.search(rf"\b{field}=(\d+)", line)] if m]
med = lambda key: round(statistics.median(p[key] for p in phases), 3)
hash_ms = logged("modulemgr", "blob hashed while it was written", "hash_ms")[-3:]
early = logged("verifier", "module verified", "hashed_early_mib")[-3:]
tail = logged("verifier", "module verified", "tail_ms")[-3:]
print(f"phases (medians, s): resolve {med('resolve')}, download {med('download')}, "
      f"verify after the download {med('verify_tail')}, mount {med('mount')}; "
      f"store SHA-256 busy {hash_ms} ms; verifier hashed while arriving {early} of {size} MiB, "
      f"then took {tail} ms; per round: {phases}", file=sys.stderr)
with open(f"{work}/pull.json", "w") as f:
    json.dump(result, f)
EOF

# The stack switch under a reader.
"$bin/examples/bench-switch" "$work/switch" 1000 >"$work/switch.json"
python3 - "$work" <<'EOF'
import json, sys
work = sys.argv[1]
with open(f"{work}/pull.json") as f:
    result = json.load(f)
with open(f"{work}/switch.json") as f:
    switch = json.load(f)
result["switch_gap_failures"] = switch["switch_gap_failures"]
result["switch_ms"] = switch["switch_ms"]
print(f"stack switch: {switch}", file=sys.stderr)
print(json.dumps(result))
EOF
