# tally: developer entry points. Local services run from deploy/local/ (state in .local/).
# Assumes a Rust toolchain (rustup/cargo) on PATH.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# One shared target dir, so a fresh clone on the same machine reuses earlier builds.
CARGO_TARGET_DIR ?= $(HOME)/.cache/tally/target
export CARGO_TARGET_DIR

# rustup installs into ~/.cargo/bin, which a non-login shell (CI) may not have on PATH.
ifneq ($(wildcard $(HOME)/.cargo/bin/cargo),)
export PATH := $(HOME)/.cargo/bin:$(PATH)
endif

LOCAL := deploy/local
ENV   := $(LOCAL)/env.sh
CARGO := cargo

.PHONY: help up down status build migrate demo test test-chaos bench fmt lint clean-state validate-deploy check-cargo

help:
	@echo "make up | down | status     local broker (TALLY_BROKER=noida|tansu), ClickHouse, PostgreSQL"
	@echo "make build                  cargo build --workspace --bins"
	@echo "make migrate                create topics and tables (tally migrate)"
	@echo "make demo                   up + build + an end-to-end run with a report"
	@echo "make test                   up + cargo test --workspace + ClickHouse dialect check (chdb)"
	@echo "make test-chaos             up + the ignored chaos tests (kills, rebalances, long sink outages)"
	@echo "make bench                  up + release build + tally bench (BENCH_COUNT=1000000)"
	@echo "make fmt | lint             rustfmt / rustfmt --check + clippy -D warnings"
	@echo "make validate-deploy        check deploy/ Dockerfile, compose and k8s files"
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

test: up check-cargo
	$(CARGO) build --workspace --bins --features tally/failpoints
	$(ENV) $(CARGO) run -q -p tally -- migrate
	$(ENV) $(CARGO) test --workspace --no-fail-fast
	python3 tests/chdb/check_dialect.py

test-chaos: up check-cargo
	$(CARGO) build --workspace --bins --features tally/failpoints
	$(ENV) $(CARGO) test -p tally-tests --test exactly_once -- --ignored --nocapture --test-threads=1
	$(ENV) $(CARGO) test -p tally-tests --test outages -- --ignored --nocapture --test-threads=1

bench: up check-cargo
	$(CARGO) build --release -p tally
	TALLY_BIN=$(CARGO_TARGET_DIR)/release/tally $(LOCAL)/bench.sh

fmt: check-cargo
	$(CARGO) fmt --all

lint: check-cargo
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

validate-deploy:
	deploy/validate.sh

clean-state: down
	rm -rf .local
