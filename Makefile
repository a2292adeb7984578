# Chartline — the README's two commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: run test services lint fmt clippy layering unit schemas bench soak deps

## Builds and starts the platform on the embedded default (SQLite + in-process bus).
run:
	$(CARGO) run -p chartline -- demo

## Everything CI checks. Brings up PostgreSQL and NATS JetStream first when needed.
test: services fmt clippy layering unit

services:
	bash scripts/ensure-services.sh
	bash scripts/ensure-browser.sh

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

layering:
	bash scripts/check-layering.sh

unit:
	$(CARGO) test --workspace

## Regenerates proto/schemas/*.json from the Rust types (commit the result).
schemas:
	CHARTLINE_BLESS=1 $(CARGO) test -p chartline-proto schemas
	CHARTLINE_BLESS=1 $(CARGO) test -p chartline-tests committed_sdl

## Benchmarks in release mode; writes target/bench/*.json and report.md.
bench: services
	bash scripts/bench.sh

## Load and fault suite (not part of `make test`): the distributed deployment under load
## and chaos for SOAK_SECS seconds (default 300), then the invariants. See scripts/soak.sh.
soak: services
	bash scripts/soak.sh

## Installs the system packages the project needs (Debian; as root).
deps:
	bash scripts/ensure-services.sh
	bash scripts/ensure-browser.sh
