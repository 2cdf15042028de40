#!/usr/bin/env bash
# Private PostgreSQL 15 cluster for development and CI, kept under the state
# dir so it never touches a system cluster and can be wiped with `rm -rf .run`.
#
# Usage: scripts/postgres.sh start|stop|status|url|psql [psql args...]
#   start   initialise (first time), start, wait until ready, create the db
#   stop    fast shutdown; fine if already stopped
#   status  prints the state; exits 0 if accepting connections, 3 if stopped,
#           1 if running but not accepting connections
#   url     prints the superuser URL
#   psql    runs psql as the superuser on the syntropism db (args pass through)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage: $SCRIPT_NAME start|stop|status|url|psql [psql args...]" >&2
    exit 2
}

set_paths() {
    PG_DATA="$STATE_DIR/postgres"
    PG_LOG="$STATE_DIR/log/postgres.log"
    PG_SOCKET_DIR="$(pg_socket_dir)"
}

require_pg_binaries() {
    local bin
    for bin in initdb pg_ctl postgres pg_isready psql; do
        [[ -x "$PG_BIN/$bin" ]] ||
            die "$PG_BIN/$bin not found; run scripts/setup.sh (installs postgresql)"
    done
}

# The server runs as `postgres` when we are root, so that user needs search
# permission on every directory down to the state dir. Checking up front gives
# a clear message instead of a cryptic initdb/pg_ctl permission error.
check_postgres_user_access() {
    is_root || return 0
    id -u postgres >/dev/null 2>&1 ||
        die "no 'postgres' system user; run scripts/setup.sh (installs postgresql)"
    runuser -u postgres -- test -x "$STATE_DIR" ||
        die "the postgres user cannot reach $STATE_DIR: a parent directory is not" \
            "traversable by others (e.g. mode 700). Run 'chmod o+x' on the parents," \
            "or set SYNTROPISM_STATE_DIR to a reachable path such as /var/tmp/syntropism."
}

# Owned by postgres when root so the server (not us) can write into it.
own_by_postgres() {
    if is_root; then
        chown postgres:postgres -- "$@"
    fi
}

pg_pid() { read_pid_file "$PG_DATA/postmaster.pid"; }

# Based on the pid file plus the process name rather than `pg_ctl status`,
# which trusts a stale pid that happens to be reused by another process.
pg_is_running() {
    pid_is "$(pg_pid)" postgres
}

pg_accepting() {
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d "$PG_DB" -U "$PG_USER" >/dev/null 2>&1
}

# Admin queries go over the unix socket, where auth is `trust`, so they keep
# working even if someone changes the superuser's password.
admin_psql() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$PG_PORT" \
        -U "$PG_USER" "$@"
}

init_cluster() {
    [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
    if [[ -d "$PG_DATA" && -n "$(ls -A -- "$PG_DATA")" ]]; then
        die "$PG_DATA exists but holds no initialised cluster; remove it and retry"
    fi

    info "initialising cluster in $PG_DATA"
    [[ -d "$PG_DATA" ]] || mkdir -m 700 -- "$PG_DATA"
    own_by_postgres "$PG_DATA"

    # --pwfile keeps the password out of the process list; the file must be
    # readable by the user initdb runs as.
    PWFILE="$(mktemp "$STATE_DIR/.pgpass.XXXXXX")"
    trap 'rm -f -- "$PWFILE"' EXIT
    printf '%s\n' "$PG_PASSWORD" >"$PWFILE"
    own_by_postgres "$PWFILE"

    local initdb_log="$STATE_DIR/log/initdb.log"
    if ! as_postgres "$PG_BIN/initdb" \
        --pgdata="$PG_DATA" \
        --username="$PG_USER" \
        --pwfile="$PWFILE" \
        --auth-local=trust \
        --auth-host=scram-sha-256 \
        --encoding=UTF8 \
        --locale=C >"$initdb_log" 2>&1; then
        show_log_tail "$initdb_log"
        die "initdb failed (full output in $initdb_log)"
    fi
    rm -f -- "$PWFILE"
}

# Rewritten on every start (between markers, appended to postgresql.conf) so
# a changed SYNTROPISM_PG_PORT or a moved state dir takes effect without a
# re-initdb.
write_config() {
    local conf="$PG_DATA/postgresql.conf" tmp
    local socket_dir_sql="${PG_SOCKET_DIR//\'/\'\'}"
    tmp="$(mktemp)"
    sed '/^# BEGIN syntropism$/,/^# END syntropism$/d' "$conf" >"$tmp"
    cat >>"$tmp" <<EOF
# BEGIN syntropism
# Managed by scripts/postgres.sh: rewritten on every start, edits are lost.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$socket_dir_sql'
# Tests open many pools concurrently.
max_connections = 400
shared_buffers = 256MB
# Durability is part of what we test: never trade it for speed here. (The outbox relay's
# deletes alone commit asynchronously, per transaction: losing one only republishes events,
# which are de-duplicated.)
fsync = on
synchronous_commit = on
# A write-heavy ledger: checkpoint by time, not every ~0.5 GB of WAL (the default 1 GB
# max_wal_size), so full-page images after each checkpoint do not multiply the WAL every
# commit must flush. Crash recovery replays at most this much WAL.
max_wal_size = 8GB
checkpoint_timeout = 15min
# END syntropism
EOF
    # `cat >` rather than `mv` keeps the file's owner (postgres) and mode.
    if ! cmp -s "$tmp" "$conf"; then
        cat "$tmp" >"$conf"
    fi
    rm -f -- "$tmp"
}

wait_until_accepting() {
    local deadline=$((SECONDS + START_TIMEOUT))
    until pg_accepting; do
        if ((SECONDS >= deadline)); then
            show_log_tail "$PG_LOG"
            die "Postgres did not accept connections on 127.0.0.1:$PG_PORT within" \
                "${START_TIMEOUT}s; see $PG_LOG"
        fi
        sleep 0.2
    done
}

ensure_database() {
    local exists
    exists="$(admin_psql -d postgres -tA \
        -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")"
    if [[ "$exists" != 1 ]]; then
        info "creating database $PG_DB"
        admin_psql -d postgres -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\""
    fi
}

cmd_start() {
    require_pg_binaries
    ensure_state_dir
    set_paths
    check_postgres_user_access

    if pg_is_running; then
        info "already running (pid $(pg_pid)) on 127.0.0.1:$PG_PORT"
        wait_until_accepting
        ensure_database
        return 0
    fi

    if port_open "$PG_PORT"; then
        die "port $PG_PORT on 127.0.0.1 is already in use ($(port_owner "$PG_PORT"));" \
            "stop it (another checkout's scripts/postgres.sh stop?) or set SYNTROPISM_PG_PORT"
    fi

    init_cluster

    if [[ "$PG_SOCKET_DIR" != /tmp ]]; then
        [[ -d "$PG_SOCKET_DIR" ]] || mkdir -m 755 -- "$PG_SOCKET_DIR"
        own_by_postgres "$PG_SOCKET_DIR"
    fi
    # pg_ctl opens the log as the server user.
    touch -- "$PG_LOG"
    own_by_postgres "$PG_LOG"
    write_config

    # We already know no live postgres owns it; the server would refuse to
    # start if the recorded pid had been reused by an unrelated process.
    rm -f -- "$PG_DATA/postmaster.pid"

    info "starting on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
    if ! as_postgres "$PG_BIN/pg_ctl" --pgdata="$PG_DATA" --log="$PG_LOG" \
        --wait --timeout="$START_TIMEOUT" --silent start; then
        show_log_tail "$PG_LOG"
        die "Postgres failed to start; see $PG_LOG"
    fi
    wait_until_accepting
    ensure_database
    info "ready: $(pg_url)"
}

cmd_stop() {
    if ! existing_state_dir; then
        info "not running"
        return 0
    fi
    set_paths
    if ! pg_is_running; then
        info "not running"
        return 0
    fi
    info "stopping (pid $(pg_pid))"
    as_postgres "$PG_BIN/pg_ctl" --pgdata="$PG_DATA" --mode=fast \
        --wait --timeout="$START_TIMEOUT" --silent stop ||
        die "pg_ctl stop failed; see $PG_LOG"
    info "stopped"
}

cmd_status() {
    existing_state_dir || true
    set_paths
    if ! pg_is_running; then
        echo "postgres: stopped (data dir $PG_DATA)"
        exit 3
    fi
    if pg_accepting; then
        echo "postgres: running (pid $(pg_pid)), accepting connections at $(pg_url)"
    else
        echo "postgres: running (pid $(pg_pid)) but NOT accepting connections; see $PG_LOG"
        exit 1
    fi
}

cmd_psql() {
    local psql="$PG_BIN/psql"
    [[ -x "$psql" ]] || psql="$(command -v psql)" ||
        die "psql not found; run scripts/setup.sh"
    # --dbname first so every extra argument keeps its usual psql meaning.
    exec "$psql" --dbname="$(pg_url)" "$@"
}

main() {
    local cmd="${1:-}"
    if [[ $# -gt 0 ]]; then shift; fi
    case "$cmd" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) pg_url ;;
    psql) cmd_psql "$@" ;;
    *) usage ;;
    esac
}

main "$@"
