#!/usr/bin/env bash
# The living economy on this machine: sets up and starts PostgreSQL and NATS (operator mode,
# generated credentials), builds the agent image and every service, starts them (run.sh), and
# prints one progress line per tick (`syntropism watch`) until Ctrl-C, which stops everything.
#
# While it runs, reward genesis's prompts from another terminal:
#   target/release/syntropism prompts
#   target/release/syntropism reward <prompt-id> 7 5 8 --reason "nice primes"
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

"$SYNTROPISM_ROOT/scripts/setup.sh"
info "building the operator CLI (release)"
(cd "$SYNTROPISM_ROOT" && cargo build --release --locked --bin syntropism)
target_dir="${CARGO_TARGET_DIR:-$SYNTROPISM_ROOT/target}"
export SYNTROPISM_NATS_URL="nats://127.0.0.1:$NATS_PORT"
export SYNTROPISM_CREDS="$STATE_DIR/nats-identity/cli.creds"

# The services' own logs go to a file; this terminal shows the ticks.
ensure_state_dir
services_log="$STATE_DIR/log/services.log"
info "starting every service (their logs: $services_log)"
"$SYNTROPISM_ROOT/scripts/run.sh" >>"$services_log" 2>&1 &
run_pid=$!
watch_pid=""
stop() {
    trap - INT TERM
    [[ -z "$watch_pid" ]] || kill -TERM "$watch_pid" 2>/dev/null || true
    kill -TERM "$run_pid" 2>/dev/null || true
    wait "$run_pid" 2>/dev/null || true
    info "stopped"
}
trap stop INT TERM

# Wait for the orchestrator (the last to start) to answer, then follow the ticks.
for _ in $(seq 1 600); do
    kill -0 "$run_pid" 2>/dev/null || die "the services did not start (see $services_log)"
    if "$target_dir/release/syntropism" --timeout 2 status >/dev/null 2>&1; then
        break
    fi
    sleep 1
done
info "the economy is running; Ctrl-C stops it. In another terminal: $target_dir/release/syntropism prompts"
"$target_dir/release/syntropism" watch &
watch_pid=$!
wait "$run_pid"
