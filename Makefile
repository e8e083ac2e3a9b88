# tally: developer entry points. Local services run from deploy/local/ (state in .local/;
# services that another checkout started are reused as they are).
# Assumes a Rust toolchain (rustup/cargo) on PATH.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Per checkout: binaries from one clone must never run as another clone's (a shared dir
# lets two clones overwrite each other's test binaries mid-run). Set it to share on purpose.
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
# The checkout that tests drive (deploy/local scripts, SQL, logs), decided at run time.
export TALLY_REPO_ROOT := $(CURDIR)

# rustup installs into ~/.cargo/bin, which a non-login shell (CI) may not have on PATH.
ifneq ($(wildcard $(HOME)/.cargo/bin/cargo),)
export PATH := $(HOME)/.cargo/bin:$(PATH)
endif

LOCAL := deploy/local
ENV   := $(LOCAL)/env.sh
CARGO := cargo

.PHONY: help up down status build migrate demo test test-chaos bench fuzz fmt lint clean-state validate-deploy check-cargo json-schemas check-observability k8s-prometheusrule observe

help:
	@echo "make up | down | status     local broker (TALLY_BROKER=noida|tansu), ClickHouse, PostgreSQL"
	@echo "make build                  cargo build --workspace --bins"
	@echo "make migrate                create topics and tables (tally migrate)"
	@echo "make demo                   up + build + an end-to-end run with a report"
	@echo "make test                   up + cargo test --workspace + ClickHouse dialect check (chdb)"
	@echo "make test-chaos             up + the ignored chaos tests (kills, rebalances, long sink outages)"
	@echo "make bench                  up + release build + tally-bench vs the ClickHouse Kafka engine (BENCH_COUNT=1000000)"
	@echo "make fuzz                   decoders fuzzed, FUZZ_INPUTS=10000000 per codec (optimised, overflow checks)"
	@echo "make fmt | lint             rustfmt / rustfmt --check + clippy -D warnings"
	@echo "make json-schemas           regenerate schemas/json/ from the Avro schemas"
	@echo "make validate-deploy        deploy/: k8s manifests and CRDs, compose file against their JSON schemas, cross-checks"
	@echo "make k8s-prometheusrule     regenerate deploy/k8s/prometheusrule.yaml from deploy/prometheus/alerts.yml"
	@echo "make observe                up + build + a local Prometheus scraping tally, alerts.yml loaded, one alert firing"
	@echo "make check-observability    promtool check + unit tests of deploy/prometheus/alerts.yml (installs prometheus if missing)"
	@echo "make clean-state            down + delete .local/"
	@echo "CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)"

check-cargo:
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "error: cargo not found on PATH. Install Rust with rustup (https://rustup.rs) and make sure ~/.cargo/bin is on PATH." >&2; \
	  exit 1; }

up:
	@$(LOCAL)/up.sh

down:
	@$(LOCAL)/down.sh

status:
	@$(LOCAL)/status.sh

build: check-cargo
	$(CARGO) build --workspace --bins

migrate: build
	$(ENV) $(CARGO_TARGET_DIR)/debug/tally migrate

demo: up build
	TALLY_BIN=$(CARGO_TARGET_DIR)/debug/tally $(LOCAL)/demo.sh

# Tests run the tally binary built with failpoints (`cargo run`/`cargo build` without the
# feature would rebuild it without them, and every failpoint test would then refuse to run).
test: up check-cargo check-observability validate-deploy
	$(CARGO) build --workspace --bins --features tally/failpoints
	$(ENV) $(CARGO_TARGET_DIR)/debug/tally migrate
	$(ENV) $(CARGO) test --workspace --features tally/failpoints --no-fail-fast
	python3 tests/chdb/check_dialect.py

test-chaos: up check-cargo
	$(CARGO) build --workspace --bins --features tally/failpoints
	$(ENV) $(CARGO) test -p tally-tests --test exactly_once -- --ignored --nocapture --test-threads=1
	$(ENV) $(CARGO) test -p tally-tests --test outages -- --ignored --nocapture --test-threads=1

bench: up check-cargo
	$(CARGO) build --release -p tally -p tally-bench
	TALLY_BIN=$(CARGO_TARGET_DIR)/release/tally TALLY_BENCH_BIN=$(CARGO_TARGET_DIR)/release/tally-bench $(LOCAL)/bench.sh

# Decoder fuzzing (schemas/tests/fuzz.rs; `make test` runs 100k inputs per codec). Peak RSS
# of the fuzz process itself, not cargo's, via /usr/bin/time when installed.
FUZZ_INPUTS ?= 10000000
fuzz: check-cargo
	@bin="$$($(CARGO) test --profile fuzz -p tally-schemas --test fuzz --no-run --message-format=json \
	  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)"; \
	time="$$(test -x /usr/bin/time && echo /usr/bin/time -v || true)"; \
	cd schemas && TALLY_FUZZ_INPUTS=$(FUZZ_INPUTS) nice -n 19 $$time "$$bin" --nocapture

fmt: check-cargo
	$(CARGO) fmt --all

lint: check-cargo
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

validate-deploy:
	deploy/validate.sh

k8s-prometheusrule:
	deploy/k8s/gen-prometheusrule.sh

# A real Prometheus (Debian's package) scraping a local tally run, alerts.yml loaded, until an
# alert fires; stops what it started (deploy/local/observe.sh, state in .local/observe).
observe: up build
	TALLY_BIN=$(CARGO_TARGET_DIR)/debug/tally $(LOCAL)/observe.sh

# The JSON Schemas of the JSON encodings (schemas/json/), generated from schemas/avro/;
# `make test` fails when the committed ones are stale.
json-schemas: check-cargo
	TALLY_UPDATE_JSON_SCHEMAS=1 $(CARGO) test -p tally-schemas --test json_schema

# Alert rules: `promtool check rules` and `promtool test rules` (deploy/prometheus/check.sh).
# The dashboard's and the rules' metric names are checked against a live /metrics by
# tests/tests/observability.rs.
check-observability:
	deploy/prometheus/check.sh

clean-state: down
	rm -rf .local
