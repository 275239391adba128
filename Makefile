# Caravan: the two commands that set everything up on a fresh Debian machine.
#   make demo   — the main job end to end on a local, embedded setup
#   make test   — the whole test suite (format and clippy checks, unit and end-to-end tests)
# Both first run scripts/setup.sh (Debian packages; kube-apiserver built once
# from Debian's source package and cached in ~/.cache/caravan).

CARGO ?= cargo

.PHONY: demo test setup build crds lint images fuzz bench-package bench-relay bench-agent bench-job bench-signing bench-control-plane bench-fleet bench-index

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --bins

demo: setup build
	./target/debug/caravan-demo

test: setup build lint
	$(CARGO) nextest run --workspace --no-fail-fast

crds:
	$(CARGO) run -q -p caravan-api --bin crdgen

# The controller's and the relay's OCI images, from the release binaries,
# without a container engine (scripts/image.sh; `docker build` with the
# Dockerfile makes the same). Push: skopeo copy oci:target/images:TAG docker://…
images: setup
	$(CARGO) build --release -p caravan-controller -p caravan-relay -p caravan-agent
	rm -rf target/images/controller target/images/relay
	bash scripts/image.sh target/release/caravan-controller target/images/controller "" target/release/caravan-agent
	bash scripts/image.sh target/release/caravan-relay target/images/relay

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p caravan-controller --features fixtures --benches -- -D warnings
	# The fuzz targets build against today's types (`make fuzz` runs them).
	$(CARGO) check --manifest-path fuzz/Cargo.toml --bins

# Figures: build and push a 100 MiB and a 1 GiB package, distribute them, and
# print throughput and peak memory of every process (release builds), for the
# built-in cabinet and an OCI registry on loopback (layers fetched by the
# controller, or by the relay).
bench-package: setup
	$(CARGO) build --release --workspace --bins
	./target/release/caravan-bench-package

bench-agent: setup
	$(CARGO) build --release --workspace --bins
	./target/release/caravan-bench-agent

# Figures: a job to 200 real agents — API writes per agent per job and the
# time from the commit to the last agent's Succeeded (all at once, gated).
bench-job: setup
	$(CARGO) build --release --workspace --bins
	./target/release/caravan-bench-job

# Figures: the controller from a cold start with 10,000 Agents, 100 Sites and
# 1,000 Packages in the API server (time to all Ready, memory, CPU).
bench-control-plane: setup
	$(CARGO) build --release --workspace --bins
	./target/release/caravan-bench-control-plane

# Figures: 10,000 simulated agents that speak the real protocol (4 generator
# processes) and a job for all of them — commit to each agent's report (p50,
# p99), API writes per agent, memory per agent of the relay and controller.
bench-fleet: setup
	$(CARGO) build --release --workspace --bins
	./target/release/caravan-bench-fleet

# Figures: one computation of the controller's index with 20,000 agents —
# first, with nothing changed, and after a change that concerns one agent.
bench-index:
	$(CARGO) bench -p caravan-controller --features fixtures --bench index

# Figures: what signing desired state costs — controller documents per
# second (changed and unchanged) against serializing them unsigned, and the
# agent's time to verify one document.
bench-signing:
	$(CARGO) bench -p caravan-controller --bench signing

# Fuzz every parser of untrusted input (archives, Git manifests, desired
# state, reports, enrollment) for FUZZ_SECONDS each (default 60), on stable
# Rust: libFuzzer's coverage without a sanitizer (`-s none`).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = archive manifest desired reports enroll
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do $(CARGO) fuzz run $$t -s none -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

# Figures: the relay vs nginx serving the same cached 1 GiB blob to 64
# concurrent clients (throughput, CPU-seconds per GiB, ratios).
bench-relay: setup
	command -v nginx >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx)
	$(CARGO) build --release --workspace --bins
	./target/release/caravan-bench-relay
