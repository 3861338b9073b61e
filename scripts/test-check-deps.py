#!/usr/bin/env python3
"""Tests of scripts/check-deps.py on synthetic `cargo metadata` JSON (run by `make deps`)."""

import contextlib
import importlib.util
import io
import json
import tempfile
import unittest
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "check_deps", Path(__file__).resolve().parent / "check-deps.py")
deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(deps)

CONFIG = """
[bans]
multiple-versions = "warn"
deny = [{ name = "openssl-sys", reason = "rustls only" }]
[licenses]
allow = ["MIT", "Apache-2.0"]
"""


def pid(name, version):
    return f"test#{name}@{version}"


class Metadata:
    """A tiny workspace: packages, edges (with kinds) and the members."""

    def __init__(self):
        self.packages, self.nodes, self.members = [], {}, []

    def crate(self, name, version="1.0.0", license="MIT", member=False, features=None,
              enabled=()):
        self.packages.append({"id": pid(name, version), "name": name, "version": version,
                              "license": license, "license_file": None, "dependencies": [],
                              "features": features or {}})
        self.nodes[pid(name, version)] = {"id": pid(name, version), "deps": [],
                                          "features": list(enabled)}
        if member:
            self.members.append(pid(name, version))
        return self

    def dep(self, parent, child, kind=None, optional=False):
        """`parent` (name or name@version) depends on `child` with `kind` (None = normal)."""
        p, c = (self._id(x) for x in (parent, child))
        self.nodes[p]["deps"].append({"name": child.split("@")[0], "pkg": c,
                                      "dep_kinds": [{"kind": kind, "target": None}]})
        package = next(x for x in self.packages if x["id"] == p)
        package["dependencies"].append({"name": child.split("@")[0], "rename": None,
                                        "kind": kind, "optional": optional})
        return self

    def _id(self, spec):
        name, _, version = spec.partition("@")
        return next(p["id"] for p in self.packages
                    if p["name"] == name and (not version or p["version"] == version))

    def json(self):
        return {"packages": self.packages, "workspace_members": self.members,
                "resolve": {"nodes": list(self.nodes.values())}}


def config(text=CONFIG):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return deps.load_config(f.name)
    finally:
        Path(f.name).unlink()


class Spdx(unittest.TestCase):
    def ok(self, expr, allow):
        return deps.satisfy(deps.parse_spdx(expr), {a.lower() for a in allow}) is not None

    def test_or_needs_one_and_needs_both(self):
        self.assertTrue(self.ok("MIT OR Apache-2.0", ["Apache-2.0"]))
        self.assertTrue(self.ok("MIT OR Apache-2.0", ["MIT"]))
        self.assertFalse(self.ok("MIT OR Apache-2.0", ["ISC"]))
        self.assertFalse(self.ok("Apache-2.0 AND ISC", ["Apache-2.0"]))
        self.assertTrue(self.ok("Apache-2.0 AND ISC", ["Apache-2.0", "ISC"]))

    def test_precedence_parentheses_and_legacy_slash(self):
        # AND binds tighter: MIT OR (Apache-2.0 AND ISC).
        self.assertTrue(self.ok("MIT OR Apache-2.0 AND ISC", ["MIT"]))
        self.assertFalse(self.ok("(MIT OR Apache-2.0) AND ISC", ["MIT"]))
        self.assertTrue(self.ok("(MIT OR Apache-2.0) AND Unicode-3.0", ["MIT", "Unicode-3.0"]))
        self.assertTrue(self.ok("MIT/Apache-2.0", ["Apache-2.0"]))
        self.assertTrue(self.ok("Apache-2.0 / MIT", ["MIT"]))
        self.assertFalse(self.ok("GPL-3.0-only/LGPL-2.1-only", ["MIT"]))

    def test_with_exception(self):
        expr = "Apache-2.0 WITH LLVM-exception OR GPL-2.0-only"
        self.assertTrue(self.ok(expr, ["Apache-2.0"]))
        self.assertTrue(self.ok(expr, ["Apache-2.0 WITH LLVM-exception"]))
        self.assertFalse(self.ok("GPL-2.0-only WITH Classpath-exception-2.0", ["MIT"]))

    def test_what_satisfied_it(self):
        tree = deps.parse_spdx("(MIT OR Apache-2.0) AND ISC")
        self.assertEqual(deps.satisfy(tree, {"apache-2.0", "isc"}), {"Apache-2.0", "ISC"})

    def test_malformed_expressions_are_errors(self):
        for expr in ["", "MIT OR", "(MIT", "MIT)", "MIT AND AND ISC", "MIT ISC", "MIT, ISC",
                     "WITH x"]:
            with self.assertRaises(deps.SpdxError, msg=expr):
                deps.parse_spdx(expr)


class Checks(unittest.TestCase):
    def test_banned_and_gpl_fail_naming_the_chain(self):
        meta = (Metadata().crate("app", member=True).crate("tls").crate("openssl-sys")
                .crate("gpl", license="GPL-3.0-only")
                .dep("app", "tls").dep("tls", "openssl-sys").dep("app", "gpl", kind="dev"))
        failures, _, count = deps.check(meta.json(), config())
        self.assertEqual(count, 4)
        self.assertEqual(len(failures), 2, failures)
        self.assertIn("banned crate openssl-sys 1.0.0 (rustls only), pulled in by "
                      "app -> tls -> openssl-sys", failures[0])
        self.assertIn("gpl 1.0.0 is licensed 'GPL-3.0-only'", failures[1])
        self.assertIn("app -[dev]-> gpl", failures[1])

    def test_main_exits_1_on_a_banned_crate(self):
        meta = Metadata().crate("app", member=True).crate("openssl-sys").dep("app", "openssl-sys")
        with tempfile.TemporaryDirectory() as d:
            Path(d, "deny.toml").write_text(CONFIG)
            Path(d, "meta.json").write_text(json.dumps(meta.json()))
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = deps.main(["--config", f"{d}/deny.toml", "--metadata", f"{d}/meta.json"])
        self.assertEqual(rc, 1)
        self.assertIn("FAIL banned crate openssl-sys", err.getvalue())

    def test_a_clean_tree_passes(self):
        meta = (Metadata().crate("app", member=True, license="Apache-2.0")
                .crate("dual", license="MIT OR Apache-2.0").dep("app", "dual"))
        failures, report, _ = deps.check(meta.json(), config())
        self.assertEqual(failures, [])
        self.assertEqual(report, ["licenses used: Apache-2.0 (1), MIT (1)"])

    def test_no_license_field_needs_an_exception_with_a_reason(self):
        meta = Metadata().crate("app", member=True).crate("bare", license=None).dep("app", "bare")
        failures, _, _ = deps.check(meta.json(), config())
        self.assertEqual(len(failures), 1)
        self.assertIn("bare 1.0.0 has no license field", failures[0])
        allowed = CONFIG + 'exceptions = [{ name = "bare", reason = "MIT in its README" }]\n'
        self.assertEqual(deps.check(meta.json(), config(allowed))[0], [])
        with self.assertRaises(deps.ConfigError):
            config(CONFIG + 'exceptions = [{ name = "bare", allow = ["ISC"] }]\n')

    def test_an_exception_allows_a_license_for_that_crate_only(self):
        meta = (Metadata().crate("app", member=True).crate("a", license="ISC")
                .crate("b", license="ISC").dep("app", "a").dep("app", "b"))
        text = CONFIG + 'exceptions = [{ crate = "a", allow = ["ISC"], reason = "checked" }]\n'
        failures, _, _ = deps.check(meta.json(), config(text))
        self.assertEqual(len(failures), 1)
        self.assertIn("b 1.0.0 is licensed 'ISC'", failures[0])

    def test_duplicates_are_reported_not_failed(self):
        meta = (Metadata().crate("app", member=True).crate("x").crate("y")
                .crate("dup", "1.0.0").crate("dup", "2.0.0")
                .dep("app", "x").dep("app", "y").dep("x", "dup@1.0.0").dep("y", "dup@2.0.0"))
        failures, report, _ = deps.check(meta.json(), config())
        self.assertEqual(failures, [])
        self.assertIn("dup: 1.0.0 (by x), 2.0.0 (by y)", "\n".join(report))
        denied = CONFIG.replace('"warn"', '"deny"')
        self.assertEqual(len(deps.check(meta.json(), config(denied))[0]), 1)

    def test_what_is_not_built_does_not_count(self):
        # A dependency's own dev-dependency; an optional one only a weak feature names
        # (`gpl?/std`: cargo metadata keeps the edge, cargo builds nothing); members' dev
        # dependencies when exclude-dev is set.
        meta = (Metadata().crate("app", member=True).crate("lib", enabled=["std"],
                                                           features={"std": ["gpl?/std"]})
                .crate("gpl", license="GPL-3.0-only").crate("tool", license="GPL-3.0-only")
                .dep("app", "lib").dep("lib", "gpl", optional=True).dep("lib", "tool", "dev")
                .dep("app", "tool", "dev"))
        self.assertEqual(len(deps.check(meta.json(), config())[0]), 1)  # app -[dev]-> tool
        no_dev = "[graph]\nexclude-dev = true\n" + CONFIG
        failures, _, count = deps.check(meta.json(), config(no_dev))
        self.assertEqual((failures, count), ([], 2))
        # Turned on for real (`dep:gpl`), it counts.
        meta.nodes[pid("lib", "1.0.0")]["features"] = ["gpl"]
        meta.packages[1]["features"]["gpl"] = ["dep:gpl"]
        self.assertIn("gpl 1.0.0 is licensed", "\n".join(deps.check(meta.json(), config(no_dev))[0]))


if __name__ == "__main__":
    unittest.main()
