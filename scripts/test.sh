#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL, nats-server and Docker, installing and
# starting them first (setup.sh) and building the agent runtime image. Extra arguments go to `cargo nextest run` (e.g. a test filter).
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

"$SYNTROPISM_ROOT/scripts/setup.sh"
# The agent runtime image (tests run agents in it); a no-op when it is up to date.
"$SYNTROPISM_ROOT/deploy/agent-runtime/build.sh"
if ! cargo nextest --version >/dev/null 2>&1; then
    info "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
export SYNTROPISM_PG_PORT="$PG_PORT"
cd "$SYNTROPISM_ROOT"
exec cargo nextest run --workspace --locked "$@"
