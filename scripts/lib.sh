#!/usr/bin/env bash
# Shared helpers for the scripts in this directory. Meant to be sourced:
#   source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
# Every value other code relies on (ports, paths, URLs) is defined here once,
# so postgres.sh, nats.sh and setup.sh cannot drift apart.
# Settings defined here are consumed by the scripts that source this file.
# shellcheck disable=SC2034
set -euo pipefail

# Sourcing twice must not reset STATE_DIR after ensure_state_dir made it
# absolute.
if [[ -n "${_SYNTROPISM_LIB_SOURCED:-}" ]]; then
    return 0
fi
_SYNTROPISM_LIB_SOURCED=1

# Physical path: the postgres user must traverse real directories, not links.
SYNTROPISM_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
SCRIPT_NAME="$(basename -- "${0:-syntropism}")"

STATE_DIR="${SYNTROPISM_STATE_DIR:-$SYNTROPISM_ROOT/.run}"
PG_BIN="${SYNTROPISM_PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_PORT="${SYNTROPISM_PG_PORT:-55432}"
PG_USER=syntropism
PG_PASSWORD=syntropism
PG_DB=syntropism
NATS_PORT="${SYNTROPISM_NATS_PORT:-4222}"
NATS_MONITOR_PORT="${SYNTROPISM_NATS_MONITOR_PORT:-8222}"

# Long enough for a cold start on a loaded 2-core CI box, short enough that a
# broken service fails the run quickly.
START_TIMEOUT="${SYNTROPISM_START_TIMEOUT:-60}"

info() { printf '[%s] %s\n' "$SCRIPT_NAME" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() {
    printf '[%s] ERROR: %s\n' "$SCRIPT_NAME" "$*" >&2
    exit 1
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# initdb, pg_ctl and postgres refuse to run as root, so as root we drop to the
# `postgres` system user that the Debian package creates.
as_postgres() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Creates the state and log dirs and makes STATE_DIR absolute (a relative
# SYNTROPISM_STATE_DIR would otherwise change meaning under `runuser`).
ensure_state_dir() {
    # The explicit mode keeps what we create traversable for the postgres
    # user even under a restrictive umask; existing dirs are left alone.
    if [[ ! -d "$STATE_DIR" ]]; then
        mkdir -p -- "$STATE_DIR"
        chmod 755 -- "$STATE_DIR"
    fi
    STATE_DIR="$(cd -- "$STATE_DIR" && pwd -P)"
    [[ -d "$STATE_DIR/log" ]] || mkdir -m 755 -- "$STATE_DIR/log"
}

# For commands that only look (stop, status): makes STATE_DIR absolute if it
# exists, without creating anything.
existing_state_dir() {
    [[ -d "$STATE_DIR" ]] || return 1
    STATE_DIR="$(cd -- "$STATE_DIR" && pwd -P)"
}

# Prints the pid on the first line of a pid file, or nothing.
read_pid_file() {
    local file=$1 pid=""
    if [[ -r "$file" ]]; then
        read -r pid <"$file" || true
    fi
    [[ "$pid" =~ ^[0-9]+$ ]] && printf '%s\n' "$pid"
    return 0
}

# True if PID exists and is not a zombie (a child that died while we still
# wait on it stays in /proc as a zombie until we exit).
pid_alive() {
    local pid=$1 stat state
    [[ -n "$pid" ]] || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
        state="${stat##*) }"
        [[ "${state%% *}" != Z ]]
    else
        # No procfs: kill -0 is the best we have.
        kill -0 "$pid" 2>/dev/null
    fi
}

# True if PID is alive and its executable name is NAME. Checking the name
# guards against stale pid files whose number was reused after a reboot or a
# container restart.
pid_is() {
    local pid=$1 name=$2 comm=""
    pid_alive "$pid" || return 1
    [[ -r "/proc/$pid/comm" ]] || return 0
    read -r comm 2>/dev/null <"/proc/$pid/comm" || return 1
    [[ "$comm" == "$name" ]]
}

# True if something accepts TCP connections on 127.0.0.1:PORT. Uses bash's
# /dev/tcp so it needs neither curl nor nc.
port_open() {
    local port=$1
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

# Names what listens on PORT (for "port in use" errors), if ss can tell.
port_owner() {
    local port=$1 owner=""
    if command -v ss >/dev/null 2>&1; then
        owner="$(ss -Hltnp "sport = :$port" 2>/dev/null |
            sed -n 's/.*users:((\("[^"]*",pid=[0-9]*\).*/\1/p' | head -n 1)"
    fi
    printf '%s\n' "${owner:-unknown process}"
}

# Prints the last lines of a log, to put next to an error message.
show_log_tail() {
    local file=$1
    if [[ -r "$file" ]]; then
        printf -- '----- last lines of %s -----\n' "$file" >&2
        tail -n 30 -- "$file" >&2 || true
        printf -- '-----\n' >&2
    fi
}

# --- Postgres -------------------------------------------------------------

pg_url() {
    printf 'postgres://%s:%s@127.0.0.1:%s/%s\n' "$PG_USER" "$PG_PASSWORD" "$PG_PORT" "$PG_DB"
}

# The unix socket path ($dir/.s.PGSQL.$port) must fit in sun_path (107 usable
# bytes); a deep checkout would exceed it, so fall back to /tmp then. The port
# in the socket name keeps instances apart there.
pg_socket_dir() {
    local dir="$STATE_DIR/postgres-socket"
    local sock="$dir/.s.PGSQL.$PG_PORT"
    if ((${#sock} > 107)); then
        dir=/tmp
    fi
    printf '%s\n' "$dir"
}

# --- NATS -----------------------------------------------------------------

nats_url() { printf 'nats://127.0.0.1:%s\n' "$NATS_PORT"; }
nats_monitor_url() { printf 'http://127.0.0.1:%s\n' "$NATS_MONITOR_PORT"; }

# Debian installs nats-server into /usr/sbin, which is not on a normal
# user's PATH.
find_nats_server() {
    local candidate
    if candidate="$(command -v nats-server 2>/dev/null)"; then
        printf '%s\n' "$candidate"
        return 0
    fi
    for candidate in /usr/sbin/nats-server /usr/bin/nats-server; do
        if [[ -x "$candidate" ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}
