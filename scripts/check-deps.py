#!/usr/bin/env python3
"""The dependency fence (`make deps`): checks the crates `cargo metadata` resolves against
deny.toml, a subset of cargo-deny's format, with the standard library only.

  [graph]     targets = [...]    triples whose dependencies count (cargo --filter-platform)
              exclude-dev = bool dev-dependencies of workspace members count unless true
  [bans]      deny = [{ name = "crate", reason = "..." }, ...]
              multiple-versions = "warn" | "deny" | "allow"
  [licenses]  allow = ["SPDX-id", ...]
              exceptions = [{ name = "crate", allow = [...], reason = "..." }, ...]

Fails (exit 1) when a banned crate is in the tree, naming the chain of crates that pulls it in;
when a crate's license expression cannot be satisfied from the allowed licenses (plus its
exception); when a crate has no `license` field and no exception. Duplicate versions are a
report. Usage: check-deps.py [--config deny.toml] [--metadata FILE] (FILE: the JSON of
`cargo metadata --format-version 1`; without it, cargo is run for the [graph] targets).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from collections import deque
from pathlib import Path


class ConfigError(Exception):
    """deny.toml asks for something this checker does not understand."""


class SpdxError(Exception):
    """A license expression that does not parse."""


# --- SPDX license expressions -------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\()|(\))|(/)|([A-Za-z0-9.+:-]+))")


def _tokens(expr):
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise SpdxError(f"unexpected {expr[pos:].strip()[:10]!r} in {expr!r}")
        pos = m.end()
        if m.group(3):
            out.append("OR")  # the legacy `MIT/Apache-2.0` separator
        else:
            word = m.group(m.lastindex)
            out.append(word.upper() if word.upper() in ("AND", "OR", "WITH") else word)
    return out


def parse_spdx(expr):
    """Parses an SPDX expression into nested tuples: ("or", [..]), ("and", [..]) or
    ("license", id, exception-or-None). WITH binds tighter than AND, AND tighter than OR."""
    toks = _tokens(expr)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        if pos >= len(toks):
            raise SpdxError(f"{expr!r} ends too early")
        pos += 1
        return toks[pos - 1]

    def ident(what):
        t = take()
        if t in ("AND", "OR", "WITH", "(", ")"):
            raise SpdxError(f"expected {what}, found {t!r} in {expr!r}")
        return t

    def operand():
        if peek() == "(":
            take()
            inner = either()
            if take() != ")":
                raise SpdxError(f"unbalanced parentheses in {expr!r}")
            return inner
        lic = ident("a license")
        exception = None
        if peek() == "WITH":
            take()
            exception = ident("an exception")
        return ("license", lic, exception)

    def both():
        terms = [operand()]
        while peek() == "AND":
            take()
            terms.append(operand())
        return terms[0] if len(terms) == 1 else ("and", terms)

    def either():
        terms = [both()]
        while peek() == "OR":
            take()
            terms.append(both())
        return terms[0] if len(terms) == 1 else ("or", terms)

    if not toks:
        raise SpdxError("empty license expression")
    tree = either()
    if pos != len(toks):
        raise SpdxError(f"unexpected {toks[pos]!r} in {expr!r}")
    return tree


def satisfy(tree, allowed):
    """The allowed licenses that satisfy `tree` (the first alternative that works for OR, all
    terms for AND), or None when it cannot be satisfied. `allowed` is a set of lower-case
    entries; `X WITH E` is satisfied by an entry `X WITH E` or by `X` (an exception only adds
    permissions)."""
    kind = tree[0]
    if kind == "license":
        _, lic, exception = tree
        names = [lic] if exception is None else [f"{lic} WITH {exception}", lic]
        for name in names:
            if name.lower() in allowed:
                return {name}
        return None
    if kind == "and":
        used = set()
        for term in tree[1]:
            got = satisfy(term, allowed)
            if got is None:
                return None
            used |= got
        return used
    for term in tree[1]:
        got = satisfy(term, allowed)
        if got is not None:
            return got
    return None


# --- deny.toml ----------------------------------------------------------------------------

def _crate_spec(entry, where):
    """`name` (or cargo-deny's newer `crate`), optionally `name@version`: (name, version)."""
    spec = entry.get("crate", entry.get("name"))
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{where}: an entry without `name`: {entry!r}")
    name, _, version = spec.partition("@")
    return name, entry.get("version", version or None)


def load_config(path):
    """Reads deny.toml into a plain dict the checks use."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    known = {"graph", "bans", "licenses"}
    if set(raw) - known:
        raise ConfigError(f"{path}: sections not checked here: {sorted(set(raw) - known)}")
    graph, bans, licenses = raw.get("graph", {}), raw.get("bans", {}), raw.get("licenses", {})
    multiple = bans.get("multiple-versions", "warn")
    if multiple not in ("warn", "deny", "allow"):
        raise ConfigError(f"{path}: bans.multiple-versions = {multiple!r}")
    deny = []
    for entry in bans.get("deny", []):
        name, version = _crate_spec(entry, "bans.deny")
        deny.append({"name": name, "version": version, "reason": entry.get("reason", "")})
    exceptions = []
    for entry in licenses.get("exceptions", []):
        name, version = _crate_spec(entry, "licenses.exceptions")
        if not entry.get("reason"):
            raise ConfigError(f"{path}: licenses.exceptions for {name} has no `reason`")
        exceptions.append({"name": name, "version": version, "allow": entry.get("allow", []),
                           "reason": entry["reason"]})
    return {
        "targets": list(graph.get("targets", [])),
        "exclude_dev": bool(graph.get("exclude-dev", False)),
        "deny": deny,
        "multiple_versions": multiple,
        "allow": list(licenses.get("allow", [])),
        "exceptions": exceptions,
    }


# --- the dependency graph -----------------------------------------------------------------

def _enabled(pkg, node, dep_name, kind):
    """Whether `pkg` really depends on `dep_name` with `kind`: the dependency is not optional,
    or an enabled feature turns it on (`dep:x` or `x/feature`; a weak `x?/feature` does not).
    cargo metadata's resolve keeps edges that only weak features name (cargo#10801)."""
    declared = [d for d in pkg.get("dependencies", [])
                if d["name"] == dep_name and (d.get("kind") or "normal") == kind]
    if not declared or any(not d.get("optional") for d in declared):
        return True
    features = pkg.get("features", {})
    on = [v for f in node.get("features", []) for v in features.get(f, [])]
    for d in declared:
        key = d.get("rename") or d["name"]
        if f"dep:{key}" in on or any(v.startswith(f"{key}/") for v in on):
            return True
        if key in node.get("features", []) and key not in features:
            return True  # an implicit feature, from a cargo that does not list them
    return False


def reachable(metadata, exclude_dev=False):
    """Every package id the workspace members reach, mapped to (parent id, dependency kind)
    of one shortest chain (None for the members). Members' normal, build and (unless
    `exclude_dev`) dev dependencies count; of other crates, normal and build ones."""
    packages = {p["id"]: p for p in metadata["packages"]}
    members = set(metadata["workspace_members"])
    nodes = {n["id"]: n for n in metadata["resolve"]["nodes"]}
    parent = {m: None for m in sorted(members)}
    queue = deque(sorted(members))
    while queue:
        pid = queue.popleft()
        node = nodes.get(pid, {})
        for dep in node.get("deps", []):
            if dep["pkg"] in parent:
                continue
            kinds = {k.get("kind") or "normal" for k in dep.get("dep_kinds", [{}])}
            if pid not in members or exclude_dev:
                kinds.discard("dev")
            name = packages[dep["pkg"]]["name"]
            kinds = {k for k in kinds if _enabled(packages[pid], node, name, k)}
            if not kinds:
                continue
            parent[dep["pkg"]] = (pid, "normal" if "normal" in kinds else sorted(kinds)[0])
            queue.append(dep["pkg"])
    return parent


def chain(parent, packages, pid):
    """`member -> crate -> ... -> pid`, non-normal edges marked (`-[dev]->`)."""
    steps = []
    while parent[pid] is not None:
        up, kind = parent[pid]
        steps.append((packages[pid]["name"], kind))
        pid = up
    text = packages[pid]["name"]
    for name, kind in reversed(steps):
        text += f" -[{kind}]-> {name}" if kind != "normal" else f" -> {name}"
    return text


# --- the checks ---------------------------------------------------------------------------

def _matches(spec, pkg):
    return spec["name"] == pkg["name"] and spec["version"] in (None, pkg["version"])


def check(metadata, config):
    """Returns (failures, report): lines that fail the check, and lines that only inform."""
    packages = {p["id"]: p for p in metadata["packages"]}
    parent = reachable(metadata, config["exclude_dev"])
    crates = sorted((packages[i] for i in parent), key=lambda p: (p["name"], p["version"]))
    failures, report = [], []

    for spec in config["deny"]:
        for pid, pkg in sorted(packages.items()):
            if pid in parent and _matches(spec, pkg):
                why = f" ({spec['reason']})" if spec["reason"] else ""
                failures.append(f"banned crate {pkg['name']} {pkg['version']}{why}, pulled in "
                                f"by {chain(parent, packages, pid)}")

    allow = {a.lower() for a in config["allow"]}
    used = {}
    used_exceptions = set()
    for pkg in crates:
        label = f"{pkg['name']} {pkg['version']}"
        exception = next((e for e in config["exceptions"] if _matches(e, pkg)), None)
        if exception:
            used_exceptions.add(exception["name"])
        expr = pkg.get("license")
        if not expr:
            if exception is None:
                failures.append(f"{label} has no license field (license-file: "
                                f"{pkg.get('license_file')}); add an exception with a reason")
            continue
        allowed = allow | {a.lower() for a in (exception or {}).get("allow", [])}
        try:
            got = satisfy(parse_spdx(expr), allowed)
        except SpdxError as e:
            failures.append(f"{label}: license expression does not parse: {e}")
            continue
        if got is None:
            failures.append(f"{label} is licensed {expr!r}, which the allowed licenses do not "
                            f"satisfy (pulled in by {chain(parent, packages, pkg['id'])})")
            continue
        for lic in got:
            used[lic] = used.get(lic, 0) + 1

    report.append("licenses used: " + ", ".join(
        f"{lic} ({n})" for lic, n in sorted(used.items(), key=lambda kv: (-kv[1], kv[0]))))
    unused = sorted(a for a in config["allow"] if a.lower() not in {u.lower() for u in used})
    if unused:
        report.append("allowed but used by no crate (prune them): " + ", ".join(unused))
    for e in config["exceptions"]:
        if e["name"] not in used_exceptions:
            report.append(f"exception for {e['name']} matches no crate in the tree")

    if config["multiple_versions"] != "allow":
        by_name = {}
        for pkg in crates:
            by_name.setdefault(pkg["name"], []).append(pkg)
        dependents = {}
        for node in metadata["resolve"]["nodes"]:
            if node["id"] in parent:
                up = packages[node["id"]]
                label = up["name"] + (f" {up['version']}" if len(by_name[up["name"]]) > 1 else "")
                for dep in node.get("deps", []):
                    if parent.get(dep["pkg"]) is not None:
                        dependents.setdefault(dep["pkg"], set()).add(label)
        dups = []
        for name, versions in sorted(by_name.items()):
            if len(versions) > 1:
                dups.append(f"  {name}: " + ", ".join(
                    f"{p['version']} (by {', '.join(sorted(dependents.get(p['id'], [])))})"
                    for p in versions))
        if dups:
            head = f"{len(dups)} crates in more than one version"
            if config["multiple_versions"] == "deny":
                failures.append(head + ":\n" + "\n".join(dups))
            else:
                report.append(head + " (reported, not a failure):\n" + "\n".join(dups))
    return failures, report, len(crates)


def cargo_metadata(root, targets):
    """The JSON of `cargo metadata --locked`, resolved for `targets` only."""
    cmd = [os.environ.get("CARGO", "cargo"), "metadata", "--format-version", "1", "--locked"]
    for t in targets:
        cmd += ["--filter-platform", t]
    out = subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.PIPE)
    return json.loads(out.stdout)


def main(argv=None):
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=here / "deny.toml")
    ap.add_argument("--metadata", type=Path, help="cargo metadata JSON (default: run cargo)")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except (ConfigError, tomllib.TOMLDecodeError) as e:
        print(f"deps: {args.config}: {e}", file=sys.stderr)
        return 2
    if args.metadata:
        metadata = json.loads(args.metadata.read_text())
    else:
        metadata = cargo_metadata(args.config.parent, config["targets"])
    failures, report, count = check(metadata, config)
    scope = "normal and build" + ("" if config["exclude_dev"] else ", members' dev")
    targets = ", ".join(config["targets"]) or "every target"
    print(f"deps: {count} crates ({scope} dependencies; {targets}) against {args.config.name}")
    for line in report:
        print(f"deps: {line}")
    for line in failures:
        print(f"deps: FAIL {line}", file=sys.stderr)
    if failures:
        print(f"deps: {len(failures)} problems; docs/dependencies.md says what is allowed",
              file=sys.stderr)
        return 1
    print("deps: ok: no banned crate, every license allowed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
