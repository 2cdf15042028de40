-- The sandbox runner (DESIGN.md §4 "Execution windows"). Runs with search_path = sandbox.

-- Every runner that ever started, with its capacity and a heartbeat: a run whose runner
-- stopped beating is lost.
CREATE TABLE runners (
    runner_id       text PRIMARY KEY,
    cpu_millicores  bigint NOT NULL CHECK (cpu_millicores > 0),
    memory_mib      bigint NOT NULL CHECK (memory_mib > 0),
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per execution, claimed before its container is created: the primary key is what
-- makes a run happen at most once, whichever runner is asked and however often.
CREATE TABLE runs (
    execution_id        text PRIMARY KEY,
    agent_id            uuid NOT NULL,
    runner_id           text NOT NULL REFERENCES runners,
    -- SHA-256 of the request: the same id with a different request is a conflict.
    request_hash        bytea NOT NULL,
    -- cpu millicores, memory MiB, duration ms, llm tokens, attention slots.
    bundle              bigint[] NOT NULL CHECK (cardinality(bundle) = 5),
    status              text NOT NULL CHECK (status IN ('running', 'finished')),
    outcome             text CHECK (outcome IN ('completed', 'failed', 'timed_out', 'oom_killed', 'lost')),
    exit_code           bigint NOT NULL DEFAULT 0,
    cpu_time_ms         bigint NOT NULL DEFAULT 0 CHECK (cpu_time_ms >= 0),
    peak_memory_bytes   bigint NOT NULL DEFAULT 0 CHECK (peak_memory_bytes >= 0),
    wall_time_ms        bigint NOT NULL DEFAULT 0 CHECK (wall_time_ms >= 0),
    log_tail            text NOT NULL DEFAULT '',
    log_truncated       boolean NOT NULL DEFAULT false,
    error               text NOT NULL DEFAULT '',
    started_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    CHECK ((status = 'finished') = (outcome IS NOT NULL AND finished_at IS NOT NULL))
);
CREATE INDEX runs_running ON runs (runner_id) WHERE status = 'running';
CREATE INDEX runs_agent ON runs (agent_id, started_at);

-- The transactional outbox (see syntropism_platform::outbox).
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL,
    subject     text NOT NULL,
    envelope    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox ALTER COLUMN envelope SET STORAGE EXTERNAL;
