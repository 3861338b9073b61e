#!/usr/bin/env python3
"""The soak's convergence check (scripts/soak.sh): polls a sandbox node until it is back in the
state the driver expects, or a timeout passes, and prints one JSON line saying which.

Converged means, all in one poll:
  - every agent up, Running, with the pid the driver started, no quarantined checkpoint;
  - enrollmgr Enrolled with the fingerprint it had at the start, the one certificate file
    unchanged in persist/powernode/pki (never enrolled again, nothing archived);
  - heartbeatd reachable, its applied generation the controller's desired one;
  - exactly the expected modules, each Active; the mount target Mounted with the expected
    layer digests (bottom first);
  - in /proc/self/mountinfo under the root: the expected stack exactly once (each layer's erofs,
    the slot's tmpfs upper, the overlay), in the slot MountStatus names, `current` pointing at
    it, and nothing else; no loop device bound to a file under the work directory that no
    mount uses; no file under a `.quarantine/` directory;
  - with --stack, the stack's mounts are the very ones it had before (same mount ids): a kill
    in a round that did not change the desired state must not remount anything;
then, once, the controller: one node, one certificate.

The time is taken at the start of the poll that saw it all (polls are --interval apart, 0.05 s
by default), from --since (the kill, as the driver's $EPOCHREALTIME). On timeout the problems of
the last poll are printed, and what was still mounted or bound that should not be: those are the
leaks.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

TARGET_DIR = "run/powernode-mounts"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the node's sandbox root")
    p.add_argument("--work", required=True, help="the soak's directory: loop devices bound to files under it count")
    p.add_argument("--agent-bin", required=True, help="powernode-agent")
    p.add_argument("--controller-bin", required=True, help="powernode-controller")
    p.add_argument("--data", required=True, help="the controller's data directory")
    p.add_argument("--node-id", required=True)
    p.add_argument("--agent", action="append", default=[], metavar="NAME=PID", help="an agent and the pid it must have")
    p.add_argument("--module", action="append", default=[], metavar="NAME=DIGEST",
                   help="an expected module and its image digest, bottom of the stack first")
    p.add_argument("--target", default="modules", help="the mount target")
    p.add_argument("--generation", type=int, required=True, help="the controller's desired generation")
    p.add_argument("--fingerprint", required=True, help="EnrollmentStatus.cert_fingerprint at the start")
    p.add_argument("--cert-sha256", required=True, help="SHA-256 of pki/cert.pem at the start")
    p.add_argument("--stack", default="", metavar="IDS",
                   help="mount ids the stack must still have (comma-separated): a round that changed nothing must not remount it")
    p.add_argument("--since", type=float, required=True, help="when the clock started (epoch seconds)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=0.05)
    return p.parse_args()


def run(argv):
    """What a command prints, or (None, why) if it fails."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return None, f"{' '.join(argv[-2:])}: exit {r.returncode}: {r.stderr.strip()[-200:]}"
    return r.stdout, None


def run_json(argv):
    """The JSON document a command prints, or (None, why)."""
    out, err = run(argv)
    if out is None:
        return None, err
    try:
        return json.loads(out), None
    except ValueError as e:
        return None, f"{' '.join(argv[-2:])}: not JSON ({e})"


def topic_value(args, publication):
    """The value of the `global` item of a publication (ipcmonitor --json: a header line, then
    one line per item), or (None, why)."""
    out, err = run([args.agent_bin, "--root", args.root, "run", "ipcmonitor", publication, "--json"])
    if out is None:
        return None, err
    for line in out.splitlines():
        try:
            item = json.loads(line)
        except ValueError as e:
            return None, f"{publication}: not JSON ({e})"
        if item.get("key") == "global":
            return item.get("value"), None
    return None, f"{publication}: no global item"


def unescape(field):
    """A mountinfo path field with its octal escapes (\\040 for a space) decoded."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(root):
    """(mount id, mount point, fs type, source) of every mount at or below root."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            point = unescape(fields[4])
            fstype, source = right.split()[:2]
            if point == root or point.startswith(root + "/"):
                found.append((fields[0], point, fstype, unescape(source)))
    return found


def loop_devices(work):
    """{'/dev/loopN': backing file} for loop devices bound to a file under work."""
    bound = {}
    for dev in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{dev}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(work + "/"):
            bound[f"/dev/{dev}"] = backing
    return bound


def quarantined(root):
    """Every file under a .quarantine directory of a checkpoint directory."""
    found = []
    for top in ("run/powernode", "persist/powernode"):
        for d, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [x for x in dirs if os.path.join(d, x) != os.path.join(root, "persist/powernode/store")]
            if "/.quarantine" in d:
                found.extend(os.path.join(d, f) for f in files)
    return sorted(found)


def layer_dir(index, name):
    """mountmgr's layers/<i>-<name> (layout::layer_dir_name): anything outside [A-Za-z0-9._-] is _."""
    safe = "".join(c if c.isalnum() and c.isascii() or c in "._-" else "_" for c in name)
    return f"{index}-{safe}"


def check_agents(args, status, problems):
    by_name = {a.get("agent"): a for a in status.get("agents", [])}
    for spec in args.agent:
        name, pid = spec.split("=")
        a = by_name.get(name)
        if a is None:
            problems.append(f"{name}: no AgentStatus")
        elif not a.get("up") or a.get("state") != "Running" or str(a.get("pid")) != pid:
            problems.append(f"{name}: up={a.get('up')} state={a.get('state')} pid={a.get('pid')} (want Running, pid {pid})")
        elif a.get("quarantined_checkpoints"):
            problems.append(f"{name}: {a['quarantined_checkpoints']} quarantined checkpoints")


def check_identity(args, problems):
    enrollment, err = topic_value(args, "enrollmgr/EnrollmentStatus")
    if enrollment is None:
        problems.append(err)
    elif enrollment.get("state") != "Enrolled" or enrollment.get("cert_fingerprint") != args.fingerprint:
        problems.append(f"enrollment: {enrollment.get('state')} fingerprint {enrollment.get('cert_fingerprint')}")
    pki = os.path.join(args.root, "persist/powernode/pki")
    certs = sorted(f for f in os.listdir(pki) if f.startswith("cert")) if os.path.isdir(pki) else []
    if certs != ["cert.pem"]:
        problems.append(f"pki: certificate files {certs}, want [cert.pem]")
    else:
        with open(os.path.join(pki, "cert.pem"), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != args.cert_sha256:
                problems.append("pki: cert.pem changed (enrolled again?)")


def check_controller_status(args, problems):
    cs, err = topic_value(args, "heartbeatd/ControllerStatus")
    if cs is None:
        problems.append(err)
    elif not cs.get("reachable") or cs.get("applied_generation") != args.generation:
        problems.append(f"heartbeatd: reachable={cs.get('reachable')} applied_generation={cs.get('applied_generation')}"
                        f" (want {args.generation})")


def check_modules(args, status, expected, problems):
    modules = {m.get("name"): m for m in status.get("modules", [])}
    if sorted(modules) != sorted(name for name, _ in expected):
        problems.append(f"modules {sorted(modules)}, want {sorted(n for n, _ in expected)}")
    for name, m in modules.items():
        if m.get("state") != "Active":
            problems.append(f"module {name}: {m.get('state')} {m.get('error') or ''}".rstrip())
    mounts = {m.get("target"): m for m in status.get("mounts", [])}
    ms = mounts.get(args.target)
    want = [digest for _, digest in expected]
    if ms is None:
        if expected:
            problems.append(f"no MountStatus for {args.target}")
        return None
    if ms.get("state") != "Mounted" or ms.get("layers") != want:
        problems.append(f"mount {args.target}: {ms.get('state')} layers {ms.get('layers')} {ms.get('error') or ''}".rstrip())
        return None
    return ms.get("slot")


def expected_mounts(args, slot, expected):
    """{mount point: fs type} of the stack in slot."""
    if not expected or slot is None:
        return {}
    base = os.path.join(args.root, TARGET_DIR, args.target, slot)
    want = {os.path.join(base, "layers", layer_dir(i, name)): "erofs" for i, (name, _) in enumerate(expected)}
    want[os.path.join(base, "upper")] = "tmpfs"
    want[os.path.join(base, "merged")] = "overlay"
    return want


def check_mounts(args, slot, expected, problems, leaks):
    """The stack exactly once and nothing else; what else is there goes to leaks too. Returns
    the stack's mount ids, in mount point order."""
    want = expected_mounts(args, slot, expected)
    found = mounts_under(args.root)
    seen = {}
    for mount_id, point, fstype, _ in found:
        if want.get(point) == fstype and point not in seen:
            seen[point] = mount_id
        else:
            leaks.append(f"mount {mount_id} {fstype} {point}")
    for point in sorted(set(want) - set(seen)):
        problems.append(f"not mounted: {point}")
    sources = {source for _, _, _, source in found}
    for dev, backing in loop_devices(args.work).items():
        if dev not in sources:
            leaks.append(f"loop {dev} -> {backing} (no mount uses it)")
    current = os.path.join(args.root, TARGET_DIR, args.target, "current")
    link = os.readlink(current) if os.path.islink(current) else None
    if want and link != f"{slot}/merged":
        problems.append(f"current -> {link}, want {slot}/merged")
    if not want and link is not None:
        problems.append(f"current -> {link} with no stack")
    return ",".join(seen[point] for point in sorted(seen))


def poll(args, expected):
    """(problems, leaks, quarantined files, the stack's mount ids) seen now."""
    problems, leaks = [], []
    status, err = run_json([args.agent_bin, "--root", args.root, "status", "--json"])
    if status is None:
        return [err], leaks, [], ""
    check_agents(args, status, problems)
    slot = check_modules(args, status, expected, problems)
    if slot is None and expected:
        # MountStatus is not right (that is a problem already): judge the mounts by the slot
        # `current` names, so that what is mounted besides it still counts as a leak.
        link = os.readlink(os.path.join(args.root, TARGET_DIR, args.target, "current")) \
            if os.path.islink(os.path.join(args.root, TARGET_DIR, args.target, "current")) else ""
        slot = link.split("/")[0] or None
    stack = check_mounts(args, slot, expected, problems, leaks)
    if args.stack and stack != args.stack and not problems:
        problems.append(f"the unchanged stack was mounted again (mount ids {args.stack} -> {stack})")
    check_controller_status(args, problems)
    check_identity(args, problems)
    found = quarantined(args.root)
    return problems + leaks + [f"quarantined: {q}" for q in found], leaks, found, stack


def controller_view(args):
    """What is wrong on the controller's side: more than one node or certificate."""
    nodes, err = run_json([args.controller_bin, "nodes", "list", "--data", args.data, "--json"])
    if nodes is None:
        return [err]
    node, err = run_json([args.controller_bin, "node", "show", args.node_id, "--data", args.data, "--json"])
    if node is None:
        return [err]
    problems = []
    if len(nodes) != 1:
        problems.append(f"controller: {len(nodes)} nodes, want 1")
    if len(node.get("certificates", [])) != 1:
        problems.append(f"controller: {len(node.get('certificates', []))} certificates issued, want 1")
    return problems


def main():
    args = parse_args()
    expected = [tuple(m.split("=", 1)) for m in args.module]
    deadline = args.since + args.timeout
    while True:
        started = time.time()
        problems, leaks, found, stack = poll(args, expected)
        if not problems:
            problems = controller_view(args)
            result = {"converged": not problems, "seconds": round(started - args.since, 3),
                      "problems": problems, "leaks": [], "quarantined": [], "stack": stack}
            break
        if time.time() >= deadline:
            result = {"converged": False, "seconds": round(time.time() - args.since, 3),
                      "problems": problems, "leaks": leaks, "quarantined": found, "stack": stack}
            break
        time.sleep(max(0.0, args.interval - (time.time() - started)))
    print(json.dumps(result))
    return 0 if result["converged"] else 1


if __name__ == "__main__":
    sys.exit(main())
