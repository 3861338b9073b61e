# powernode node agent. `make demo` runs it, `make test` checks it (what CI runs).
CARGO ?= cargo
DIST := dist
# Programs the multi-call binary answers to by name (argv[0]); agents join as they land.
PROGRAMS := ipcmonitor identitymgr enrollmgr heartbeatd modulemgr verifier mountmgr eventd execd netmgr wgdevice

# Where the units in dist/systemd expect the binary.
BINDIR ?= /usr/bin

.PHONY: all build test fmt lint deps unit unit-postgres units e2e soak dist demo demo-pubsub bench fuzz clean

all: build

build:
	$(CARGO) build --workspace

## test: formatting, lints, the dependency fence, every unit and integration test, the
## controller's suite again on PostgreSQL, the systemd units, a node booted against the real
## controller (scripts/e2e-node.sh), then 100 kills of the soak (scripts/soak.sh).
test: fmt lint deps unit unit-postgres units e2e soak

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## deps: banned crates, licenses and duplicate versions against deny.toml (docs/dependencies.md),
## after the checker's own tests.
deps:
	python3 scripts/test-check-deps.py
	CARGO=$(CARGO) scripts/check-deps.py

unit:
	$(CARGO) test --workspace

## unit-postgres: the controller's tests on a throwaway PostgreSQL server instead of SQLite.
unit-postgres:
	scripts/with-postgres.sh $(CARGO) test -p powernode-controller

units:
	scripts/check-units.sh

e2e:
	scripts/e2e-node.sh

## soak: a whole node (release build) whose agents are SIGKILLed at random moments while its
## desired state changes; every kill must converge (scripts/soak.sh, docs/reliability.md).
soak: dist
	scripts/soak.sh --kills 100

## dist: the release binaries (the node's multi-call executable and the reference controller),
## the argv[0] symlinks and the systemd units, in dist/.
dist:
	$(CARGO) build --release -p powernode-agent -p powernode-controller
	install -m 0755 target/release/powernode-agent $(DIST)/powernode-agent
	install -m 0755 target/release/powernode-controller $(DIST)/powernode-controller
	for p in $(PROGRAMS); do ln -sfn powernode-agent $(DIST)/$$p; done
	mkdir -p $(DIST)/systemd
	for u in scripts/systemd/*; do sed 's|@BINDIR@|$(BINDIR)|g' $$u > $(DIST)/systemd/$$(basename $$u); done

## demo: a controller on loopback and a node in a sandbox root that boots, enrolls and heartbeats.
demo: dist
	scripts/demo.sh

## demo-pubsub: a publisher watched with ipcmonitor and status, killed with SIGKILL and restarted.
demo-pubsub: dist
	scripts/demo-pubsub.sh

## bench: the pubsub benchmark (release build, pinned, ratios against floors).
bench:
	scripts/bench-pubsub.sh

## fuzz: every fuzz target in turn with afl.rs (scripts/fuzz.sh; needs `cargo install cargo-afl`).
## Not part of `make test`, which replays the corpora without afl. FUZZ_ARGS="--seconds 60".
fuzz:
	scripts/fuzz.sh $(FUZZ_ARGS)

clean:
	$(CARGO) clean
	find $(DIST) -mindepth 1 ! -name README.md -delete
