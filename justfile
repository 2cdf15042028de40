# Syntropism developer recipes; `just` lists them. Everything here also works without `just`:
# each recipe is a plain command.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Install (Debian packages) and start PostgreSQL and nats-server under the project's control.
setup:
    scripts/setup.sh

# Start the project's PostgreSQL and nats-server (installing them if needed).
services-up: setup

# Stop the project's PostgreSQL and nats-server.
services-down:
    scripts/nats.sh stop
    scripts/postgres.sh stop

# Show whether the project's PostgreSQL and nats-server are running.
services-status:
    scripts/postgres.sh status || true
    scripts/nats.sh status || true

# Build every crate (release).
build:
    cargo build --workspace --release --locked

# The living economy: every service, genesis, one progress line per tick, until Ctrl-C.
demo:
    scripts/demo.sh

# Run the system (all services; or name some: `just run economy`) in the foreground.
run *services:
    scripts/run.sh {{services}}

# The operator CLI against the local system (e.g. `just cli prompts`).
cli *args:
    cargo run --release --locked -q --bin syntropism -- --creds .run/nats-identity/cli.creds {{args}}

# Run the economy service alone.
run-economy:
    scripts/run.sh economy

# Run the market service alone.
run-market:
    scripts/run.sh market

# Run the scheduler service alone.
run-scheduler:
    scripts/run.sh scheduler

# Run the whole test suite against real PostgreSQL and nats-server (args go to nextest).
test *args:
    scripts/test.sh {{args}}

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# Economy load benchmark against pgbench (seconds per step; see README for the knobs).
bench-economy seconds="10":
    scripts/setup.sh
    BENCH_SECONDS={{seconds}} cargo bench -p syntropism-economy --bench economy_load --locked

# Every benchmark.
bench: bench-economy bench-clearing bench-sandbox bench-economy-loop

# A psql shell on the project's database as the superuser.
psql *args:
    scripts/postgres.sh psql {{args}}

# What CI runs.
ci:
    .ci/run

# The clearing benchmarks: the pure clearing function on 10k, 100k and 1M bids, then one full
# round with 10k pending bids through NATS, Postgres and escrow settlement.
bench-clearing:
    cargo bench -p syntropism-scheduler --bench clearing --locked
    cargo bench -p syntropism-scheduler --bench round --locked

# NATS identities (operator mode): create the development keys if missing and write
# .run/nats-identity/auth.conf (nats-server authorisation) and a .creds file per service.
nats-config:
    cargo run --release --locked -p syntropism-identity --bin nats-identity -- --dir .run/nats-identity init

# The agent runtime image (Debian root filesystem via debootstrap + docker import; no registry
# needed). Rebuilt only when deploy/agent-runtime/ changes.
agent-image:
    deploy/agent-runtime/build.sh

# Refresh the Python SDK's copy of the compiled protobuf descriptors (after changing proto/).
sdk-descriptor:
    cargo run --locked -q -p syntropism-contracts --bin proto-descriptor -- sdk/python/syntropism/descriptor.bin

# Sandbox start-up: sandbox.run → the agent's first NATS request, beside `docker run --rm` and
# `docker start` of a pre-created container (BENCH_RUNS runs each, default 50).
bench-sandbox runs="50":
    scripts/setup.sh
    deploy/agent-runtime/build.sh
    BENCH_RUNS={{runs}} cargo bench -p syntropism-sandbox-runner --bench sandbox --locked

# The economy loop under load: BENCH_AGENTS (default 200) agents for 20 ticks, tick duration
# p50/p99 and executions per minute beside bare `docker run --rm` of the same count.
bench-economy-loop agents="200" ticks="20":
    scripts/setup.sh
    deploy/agent-runtime/build.sh
    BENCH_AGENTS={{agents}} BENCH_TICKS={{ticks}} cargo bench -p syntropism-orchestrator --bench economy_loop --locked

# Run the sandbox runner alone.
run-sandbox-runner:
    scripts/run.sh sandbox-runner

# Run the orchestrator alone.
run-orchestrator:
    scripts/run.sh orchestrator

# Run the attention service alone.
run-attention:
    scripts/run.sh attention

# Run the social service alone.
run-social:
    scripts/run.sh social
