#!/usr/bin/env bash
# Bootstrap for a developer machine or CI: installs whatever is missing, then
# starts Postgres and NATS. Machines are not kept between sessions, so this
# must bring a bare Debian bookworm box up on its own; rerunning it on a ready
# box must stay quick, so the package manager is only touched when something
# is actually missing.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
SCRIPTS_DIR="$SYNTROPISM_ROOT/scripts"

APT_UPDATED=0

# Status of a package as dpkg sees it ("installed", "unpacked", ...), empty if
# dpkg has never heard of it.
pkg_status() {
    dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true
}

# A package dpkg knows but has not finished configuring (e.g. a background apt
# job is still running, or one was interrupted) needs apt even when its files
# are already on disk.
pkg_unfinished() {
    local status
    status="$(pkg_status "$1")"
    [[ -n "$status" && "$status" != installed ]]
}

# Runs apt-get, waiting out locks held by another apt/dpkg process instead of
# failing. DPkg::Lock::Timeout covers the dpkg lock only; the lists and
# archives locks need the retry loop.
apt_get() {
    local deadline=$((SECONDS + 900)) out rc repaired=0
    out="$(mktemp)"
    while :; do
        rc=0
        apt-get -q -o DPkg::Lock::Timeout=600 "$@" 2>&1 | tee "$out" >&2 || rc=$?
        ((rc == 0)) && break
        if grep -q 'Could not get lock\|Unable to acquire the dpkg frontend lock' "$out" &&
            ((SECONDS < deadline)); then
            info "apt is busy with another process; waiting"
            sleep 5
        elif grep -q 'dpkg --configure -a' "$out" && ((repaired == 0)); then
            info "finishing an interrupted dpkg run first"
            dpkg --configure -a
            repaired=1
        else
            rm -f -- "$out"
            die "apt-get $* failed (exit $rc)"
        fi
    done
    rm -f -- "$out"
}

apt_install() {
    is_root || die "missing packages ($*); rerun scripts/setup.sh as root"
    export DEBIAN_FRONTEND=noninteractive
    if ((APT_UPDATED == 0)); then
        info "apt-get update"
        apt_get update
        APT_UPDATED=1
    fi
    info "apt-get install $*"
    apt_get install -y --no-install-recommends "$@"
}

missing_apt_packages() {
    local missing=() bin
    local need_pg=0
    for bin in initdb pg_ctl postgres pg_isready psql; do
        [[ -x "$PG_BIN/$bin" ]] || need_pg=1
    done
    [[ -x "$PG_BIN/pgbench" || -x /usr/bin/pgbench ]] || need_pg=1
    getent passwd postgres >/dev/null || need_pg=1
    if ((need_pg)) || pkg_unfinished postgresql || pkg_unfinished postgresql-15; then
        missing+=(postgresql)
    fi
    if [[ "$(pkg_status postgresql-contrib)" != installed ]]; then
        missing+=(postgresql-contrib)
    fi
    if ! find_nats_server >/dev/null || pkg_unfinished nats-server; then
        missing+=(nats-server)
    fi
    if ! command -v curl >/dev/null 2>&1; then
        missing+=(curl)
    fi
    if ((${#missing[@]})); then
        printf '%s\n' "${missing[@]}"
    fi
}

# The pip that installed just, as a command array.
PIP=()
pick_pip() {
    if command -v pip >/dev/null 2>&1; then
        PIP=(pip)
    elif command -v pip3 >/dev/null 2>&1; then
        PIP=(pip3)
    elif python3 -m pip --version >/dev/null 2>&1; then
        PIP=(python3 -m pip)
    else
        die "just is missing and no pip was found to install it (pip install rust-just)"
    fi
}

# Where pip put the `just` binary, from the package's file list (works for
# system, pyenv, venv and --user installs alike).
pip_just_path() {
    local location rel
    location="$("${PIP[@]}" show -f rust-just 2>/dev/null | sed -n 's/^Location: //p')"
    rel="$("${PIP[@]}" show -f rust-just 2>/dev/null |
        sed -n 's/^ *\(.*bin\/just\)$/\1/p' | head -n 1)"
    [[ -n "$location" && -n "$rel" ]] || return 1
    realpath -m -- "$location/$rel"
}

# `just` is not packaged in bookworm; PyPI's rust-just ships the upstream
# binary.
JUST_PATH=""
ensure_just() {
    if JUST_PATH="$(command -v just 2>/dev/null)"; then
        return 0
    fi
    pick_pip
    info "installing just: ${PIP[*]} install rust-just"
    local log
    log="$(mktemp)"
    export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    if ! "${PIP[@]}" install -q rust-just >"$log" 2>&1; then
        # Debian's own python refuses pip installs (PEP 668); rust-just only
        # drops a standalone binary, so overriding that is harmless.
        if grep -q externally-managed-environment "$log"; then
            info "python is externally managed (PEP 668); retrying with --break-system-packages"
            "${PIP[@]}" install -q --break-system-packages rust-just >&2
        else
            cat -- "$log" >&2
            rm -f -- "$log"
            die "pip install rust-just failed"
        fi
    fi
    rm -f -- "$log"

    # pyenv only exposes new console scripts after a rehash (its pip shim
    # usually does this, but not when pip was called another way).
    if command -v pyenv >/dev/null 2>&1; then
        pyenv rehash >/dev/null 2>&1 || true
    fi
    hash -r
    if JUST_PATH="$(command -v just 2>/dev/null)"; then
        return 0
    fi

    local installed
    if ! installed="$(pip_just_path)" || [[ ! -x "$installed" ]]; then
        die "pip installed rust-just but the just binary could not be located"
    fi
    # pip's bin dir is not on PATH: a link in /usr/local/bin puts it there
    # for every shell without editing anyone's profile.
    # Never clobber a real file there (e.g. one another pip installed).
    if is_root && [[ -d /usr/local/bin && -w /usr/local/bin ]] &&
        [[ ! -e /usr/local/bin/just || -L /usr/local/bin/just ]]; then
        ln -sf -- "$installed" /usr/local/bin/just
        JUST_PATH=/usr/local/bin/just
        info "linked /usr/local/bin/just -> $installed"
    else
        JUST_PATH="$installed"
        warn "just is installed at $installed, which is not on PATH;" \
            "add $(dirname -- "$installed") to PATH"
    fi
}

main() {
    local missing=()
    mapfile -t missing < <(missing_apt_packages)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
        # Recheck so a package that installed without the expected files
        # (e.g. a future PostgreSQL major) fails here, not in postgres.sh.
        mapfile -t missing < <(missing_apt_packages)
        ((${#missing[@]} == 0)) ||
            die "still missing after apt-get install: ${missing[*]}"
    fi
    ensure_just

    "$SCRIPTS_DIR/postgres.sh" start
    "$SCRIPTS_DIR/nats.sh" start

    ensure_state_dir
    cat <<EOF

Syntropism dev services are up.
  Postgres  $(pg_url)
  NATS      $(nats_url)  (JetStream on; monitoring $(nats_monitor_url))
  just      $JUST_PATH
  state     $STATE_DIR  (logs in $STATE_DIR/log)
Stop with scripts/postgres.sh stop / scripts/nats.sh stop.
EOF
}

main "$@"
