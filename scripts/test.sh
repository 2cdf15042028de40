#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL and nats-server, installing and starting
# them first (setup.sh). Extra arguments go to `cargo nextest run` (e.g. a test filter).
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

"$SYNTROPISM_ROOT/scripts/setup.sh"
if ! cargo nextest --version >/dev/null 2>&1; then
    info "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
export SYNTROPISM_PG_PORT="$PG_PORT"
cd "$SYNTROPISM_ROOT"
exec cargo nextest run --workspace --locked "$@"
