#!/usr/bin/env bash
# Private NATS server with JetStream for development and CI, with its store
# under the state dir so it never mixes with a system-wide server's data.
#
# Usage: scripts/nats.sh start|stop|status
#   start   start in the background and wait until healthy; no-op if running
#   stop    graceful stop; fine if already stopped
#   status  prints the state; exits 0 if healthy, 3 if stopped, 1 if unhealthy
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: $SCRIPT_NAME start|stop|status" >&2
    exit 2
}

set_paths() {
    NATS_STORE="$STATE_DIR/nats"
    NATS_LOG="$STATE_DIR/log/nats.log"
    NATS_PID_FILE="$STATE_DIR/nats.pid"
    NATS_CONF="$STATE_DIR/nats.conf"
    NATS_IDENTITY_DIR="$STATE_DIR/nats-identity"
}

nats_pid() { read_pid_file "$NATS_PID_FILE"; }

# Pid plus process name, so a stale pid file whose number now belongs to
# another process does not count as running.
nats_is_running() {
    pid_is "$(nats_pid)" nats-server
}

# /healthz only answers ok once JetStream is up, which is what callers need;
# without curl the open client port is the best available signal.
nats_healthy() {
    if command -v curl >/dev/null 2>&1; then
        curl -sf --max-time 2 "$(nats_monitor_url)/healthz" >/dev/null 2>&1
    else
        port_open "$NATS_PORT"
    fi
}

# The listen addresses live in a config file because the command line has no
# flag for the monitoring host; rewritten on every start so port variables
# take effect.
write_config() {
    cat >"$NATS_CONF" <<EOF
# Managed by scripts/nats.sh: rewritten on every start, edits are lost.
server_name: "syntropism-dev"
listen: "127.0.0.1:$NATS_PORT"
http: "127.0.0.1:$NATS_MONITOR_PORT"
# Operator mode: the trusted operator and accounts (nats-identity); every client needs a user
# JWT signed by them (services: nats-identity/<service>.creds).
include "nats-identity/auth.conf"
EOF
}

# The operator, account and service keys (created once, kept in the state dir) and the
# server's authorisation settings derived from them.
write_identity() {
    info "writing NATS identities to $NATS_IDENTITY_DIR"
    (cd "$SYNTROPISM_ROOT" && cargo run --release --locked -q -p syntropism-identity \
        --bin nats-identity -- --dir "$NATS_IDENTITY_DIR" init) >/dev/null ||
        die "nats-identity failed"
}

cmd_start() {
    local bin
    bin="$(find_nats_server)" ||
        die "nats-server not found; run scripts/setup.sh (installs nats-server)"
    ensure_state_dir
    set_paths

    if nats_is_running; then
        info "already running (pid $(nats_pid)) on $(nats_url)"
        wait_until_healthy ""
        return 0
    fi
    rm -f -- "$NATS_PID_FILE"

    local port
    for port in "$NATS_PORT" "$NATS_MONITOR_PORT"; do
        if port_open "$port"; then
            die "port $port on 127.0.0.1 is already in use ($(port_owner "$port"));" \
                "stop it (another checkout's scripts/nats.sh stop?) or set" \
                "SYNTROPISM_NATS_PORT / SYNTROPISM_NATS_MONITOR_PORT"
        fi
    done

    mkdir -p -- "$NATS_STORE"
    write_identity
    write_config

    info "starting on $(nats_url) (log: $NATS_LOG)"
    # setsid puts the server in its own session so a Ctrl-C or hang-up aimed
    # at whoever ran this script does not take the server down with it.
    nohup setsid "$bin" --config "$NATS_CONF" --jetstream --store_dir "$NATS_STORE" \
        --pid "$NATS_PID_FILE" </dev/null >>"$NATS_LOG" 2>&1 &
    local launcher=$!
    wait_until_healthy "$launcher"
    info "ready: $(nats_url) (monitoring $(nats_monitor_url))"
}

# LAUNCHER is the pid we started (empty when the server was already running);
# watching it lets a server that dies at once fail fast instead of after the
# timeout.
wait_until_healthy() {
    local launcher=$1
    local started=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
    until nats_healthy; do
        if [[ -n "$launcher" ]] && ! pid_alive "$launcher" &&
            ! nats_is_running && ((SECONDS - started >= 2)); then
            show_log_tail "$NATS_LOG"
            die "nats-server exited during startup; see $NATS_LOG"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$NATS_LOG"
            die "nats-server not healthy at $(nats_monitor_url)/healthz within" \
                "${START_TIMEOUT}s; see $NATS_LOG"
        fi
        sleep 0.2
    done
}

cmd_stop() {
    if ! existing_state_dir; then
        info "not running"
        return 0
    fi
    set_paths
    if ! nats_is_running; then
        info "not running"
        rm -f -- "$NATS_PID_FILE"
        return 0
    fi

    local pid deadline
    pid="$(nats_pid)"
    info "stopping (pid $pid)"
    # SIGTERM makes nats-server flush JetStream state before exiting.
    kill -TERM "$pid"
    deadline=$((SECONDS + 30))
    while pid_is "$pid" nats-server; do
        if ((SECONDS >= deadline)); then
            warn "still running after 30s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f -- "$NATS_PID_FILE"
    info "stopped"
}

cmd_status() {
    existing_state_dir || true
    set_paths
    if ! nats_is_running; then
        echo "nats: stopped"
        exit 3
    fi
    if nats_healthy; then
        echo "nats: running (pid $(nats_pid)), healthy at $(nats_url), monitoring $(nats_monitor_url)"
    else
        echo "nats: running (pid $(nats_pid)) but NOT healthy; see $NATS_LOG"
        exit 1
    fi
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
    esac
}

main "$@"
