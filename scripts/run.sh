#!/usr/bin/env bash
# Runs Syntropism on this machine: installs and starts PostgreSQL and nats-server (setup.sh),
# builds the services in release mode and runs them in the foreground; Ctrl-C (or SIGTERM) stops
# them gracefully. With arguments, runs only the named services (e.g. `scripts/run.sh economy`).
#
# Each service reads defaults → optional file ($SYNTROPISM_CONFIG) → SYNTROPISM__* variables;
# this script only fills in the local URLs where they are not already set.
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

ALL_SERVICES=(economy market scheduler sandbox-runner attention social orchestrator)
# Health/metrics ports, one per service (see README).
declare -A HTTP_PORTS=([economy]=9101 [market]=9102 [scheduler]=9103 [sandbox-runner]=9104
    [orchestrator]=9105 [attention]=9106 [social]=9107)
# Each service's Postgres role, schema and NATS identity.
declare -A ROLES=([economy]=economy [market]=market [scheduler]=scheduler [sandbox-runner]=sandbox
    [orchestrator]=orchestrator [attention]=attention [social]=social)

services=("$@")
[[ ${#services[@]} -gt 0 ]] || services=("${ALL_SERVICES[@]}")
for service in "${services[@]}"; do
    [[ -n "${HTTP_PORTS[$service]:-}" ]] || die "unknown service '$service' (known: ${ALL_SERVICES[*]})"
done

"$SYNTROPISM_ROOT/scripts/setup.sh"
if [[ " ${services[*]} " == *" sandbox-runner "* ]]; then
    # The image agents run in (a no-op when up to date).
    "$SYNTROPISM_ROOT/deploy/agent-runtime/build.sh"
fi

info "building ${services[*]} (release)"
bins=()
for service in "${services[@]}"; do bins+=(--bin "$service"); done
(cd "$SYNTROPISM_ROOT" && cargo build --release --locked "${bins[@]}")
target_dir="${CARGO_TARGET_DIR:-$SYNTROPISM_ROOT/target}"

export SYNTROPISM__NATS__URL="${SYNTROPISM__NATS__URL:-nats://127.0.0.1:$NATS_PORT}"
admin_url="postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"

pids=()
stopping=""
stop_all() {
    [[ -z "$stopping" ]] || return 0
    stopping=1
    trap - INT TERM
    info "stopping ${services[*]}"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap stop_all INT TERM

# Runners and the orchestrator share the agents' workspaces; the orchestrator signs executions'
# credentials with the development keys and starts genesis from workspaces/genesis.
export SYNTROPISM__SANDBOX__WORKSPACE_ROOT="${SYNTROPISM__SANDBOX__WORKSPACE_ROOT:-$STATE_DIR/workspaces}"
export SYNTROPISM__ORCHESTRATOR__WORKSPACE_ROOT="${SYNTROPISM__ORCHESTRATOR__WORKSPACE_ROOT:-$SYNTROPISM__SANDBOX__WORKSPACE_ROOT}"
export SYNTROPISM__ORCHESTRATOR__ARCHIVE_ROOT="${SYNTROPISM__ORCHESTRATOR__ARCHIVE_ROOT:-$STATE_DIR/archive}"
export SYNTROPISM__ORCHESTRATOR__IDENTITY_DIR="${SYNTROPISM__ORCHESTRATOR__IDENTITY_DIR:-$STATE_DIR/nats-identity}"
export SYNTROPISM__ORCHESTRATOR__GENESIS_DIR="${SYNTROPISM__ORCHESTRATOR__GENESIS_DIR:-$SYNTROPISM_ROOT/workspaces/genesis}"

for service in "${services[@]}"; do
    role="${ROLES[$service]}"
    # Each service connects with its own role to its own schema; the admin URL lets it create
    # both on first start. Development passwords: the role name. NATS runs in operator mode:
    # each service connects with its own credentials (scripts/nats.sh wrote them).
    env \
        SYNTROPISM__NATS__CREDENTIALS_FILE="${SYNTROPISM__NATS__CREDENTIALS_FILE:-$STATE_DIR/nats-identity/$role.creds}" \
        SYNTROPISM__DATABASE__URL="${SYNTROPISM__DATABASE__URL:-postgres://$role:$role@127.0.0.1:$PG_PORT/$PG_DB}" \
        SYNTROPISM__DATABASE__ADMIN_URL="${SYNTROPISM__DATABASE__ADMIN_URL:-$admin_url}" \
        SYNTROPISM__HTTP__LISTEN="${SYNTROPISM__HTTP__LISTEN:-127.0.0.1:${HTTP_PORTS[$service]}}" \
        "$target_dir/release/$service" &
    pids+=($!)
    info "$service started (pid $!), health and metrics on http://127.0.0.1:${HTTP_PORTS[$service]}/{healthz,readyz,metrics}"
done
info "running; press Ctrl-C to stop"
# Stop everything as soon as any service exits on its own.
set +e
wait -n "${pids[@]}"
status=$?
set -e
stop_all
exit "$status"
