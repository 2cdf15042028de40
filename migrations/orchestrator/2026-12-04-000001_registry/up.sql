-- The orchestrator (DESIGN.md §4 "Execution windows", "Life and death"). Runs with
-- search_path = orchestrator.

-- The agent registry. `spawning`: a child whose spawn has not completed (invisible to agents).
CREATE TABLE agents (
    agent_id        uuid PRIMARY KEY,
    status          text NOT NULL CHECK (status IN ('spawning', 'alive', 'dormant', 'dead')),
    -- [parent, grandparent, …]; empty for genesis.
    lineage         uuid[] NOT NULL DEFAULT '{}',
    execution_count bigint NOT NULL DEFAULT 0,
    earned_micros   bigint NOT NULL DEFAULT 0,
    spent_micros    bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_window_at  timestamptz,
    died_at         timestamptz,
    death_cause     text NOT NULL DEFAULT '',
    CHECK ((status = 'dead') = (died_at IS NOT NULL))
);
CREATE INDEX agents_living ON agents (status) WHERE status IN ('alive', 'dormant');

-- One row per allocation executed, keyed by round and bid as well as by its id, so a tick
-- redone by another leader finds the executions it already created.
CREATE TABLE executions (
    execution_id    text PRIMARY KEY,
    agent_id        uuid NOT NULL REFERENCES agents,
    round           bigint NOT NULL,
    bid_id          bigint NOT NULL,
    -- cpu millicores, memory MiB, duration ms, llm tokens, attention slots.
    bundle          bigint[] NOT NULL CHECK (cardinality(bundle) = 5),
    paid_micros     bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('created', 'running', 'finished')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    deadline        timestamptz,
    -- The sandbox.run request as first sent (a retry sends the same bytes) and the runner's
    -- record once the window ended.
    request         bytea,
    run             bytea,
    finished_at     timestamptz,
    UNIQUE (round, bid_id)
);
CREATE INDEX executions_open ON executions (agent_id) WHERE status <> 'finished';
CREATE INDEX executions_agent ON executions (agent_id, created_at DESC);

-- Ticks: one row per round cleared. A tick another leader left unfinished is redone.
CREATE TABLE ticks (
    tick            bigint PRIMARY KEY,
    leader          text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    allocations     integer NOT NULL DEFAULT 0,
    duration_ms     bigint,
    overran         boolean NOT NULL DEFAULT false
);

-- The leader's lease: one row. A replica leads while it renews the lease; `term` grows with
-- every change of leader, and every write of a tick checks it (fencing).
CREATE TABLE leader (
    id          integer PRIMARY KEY CHECK (id = 1),
    holder      text NOT NULL,
    term        bigint NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- Genesis, once: its agent id and how far it got.
CREATE TABLE genesis (
    id          integer PRIMARY KEY CHECK (id = 1),
    agent_id    uuid NOT NULL,
    done        boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Spawns in progress and done: (parent, idempotency id) → child. A spawn's steps are each
-- idempotent; an unfinished one is carried forward by the leader.
CREATE TABLE spawns (
    parent_id       uuid NOT NULL,
    idempotency_id  text NOT NULL,
    child_id        uuid NOT NULL UNIQUE,
    request_hash    bytea NOT NULL,
    request         bytea NOT NULL,
    state           text NOT NULL CHECK (state IN ('started', 'paid', 'done', 'failed')),
    first_bid_id    bigint,
    error           bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (parent_id, idempotency_id)
);
CREATE INDEX spawns_unfinished ON spawns (created_at) WHERE state IN ('started', 'paid');

-- The transactional outbox (see syntropism_platform::outbox).
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL,
    subject     text NOT NULL,
    envelope    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox ALTER COLUMN envelope SET STORAGE EXTERNAL;
