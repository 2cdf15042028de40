-- Attention (DESIGN.md §4 "Attention"). Runs with search_path = attention.

-- Every prompt an agent showed the human, keyed by the agent's idempotency id as well as by
-- its own id. A prompt moves only pending → rewarding → rewarded, or pending → dismissed |
-- expired; `rewarding` (scores fixed, reward being minted) → dismissed only when the economy
-- refuses the mint for good (the agent's account is closed), with that refusal kept.
CREATE TABLE prompts (
    prompt_id       uuid PRIMARY KEY,
    agent_id        uuid NOT NULL,
    idempotency_id  text NOT NULL,
    -- Fingerprint of the request, to tell a retry from a different prompt with the same id.
    request_hash    bytea NOT NULL,
    -- The window that carried the attention, its slots and what it paid.
    execution_id    text NOT NULL,
    window_slots    bigint NOT NULL CHECK (window_slots > 0),
    paid_micros     bigint NOT NULL CHECK (paid_micros >= 0),
    content         text NOT NULL,
    status          text NOT NULL
                    CHECK (status IN ('pending', 'rewarding', 'rewarded', 'dismissed', 'expired')),
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    interesting     integer CHECK (interesting BETWEEN 0 AND 10),
    useful          integer CHECK (useful BETWEEN 0 AND 10),
    understandable  integer CHECK (understandable BETWEEN 0 AND 10),
    reward_micros   bigint NOT NULL DEFAULT 0 CHECK (reward_micros >= 0),
    reason          text NOT NULL DEFAULT '',
    -- The economy's refusal of the reward (a syntropism.v1.Error), when it refused for good.
    refusal         bytea,
    resolved_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (agent_id, idempotency_id),
    CHECK (status NOT IN ('rewarding', 'rewarded')
           OR (interesting IS NOT NULL AND useful IS NOT NULL AND understandable IS NOT NULL)),
    CHECK ((status IN ('pending', 'rewarding')) = (resolved_at IS NULL))
);
-- Slots used per window.
CREATE INDEX prompts_execution ON prompts (execution_id);
-- The human's queue: most paid for first, then oldest.
CREATE INDEX prompts_pending ON prompts (paid_micros DESC, created_at) WHERE status = 'pending';
-- The sweep: pending prompts by expiry, rewards left half-way.
CREATE INDEX prompts_expiring ON prompts (expires_at) WHERE status = 'pending';
CREATE INDEX prompts_rewarding ON prompts (updated_at) WHERE status = 'rewarding';

-- The transactional outbox (see syntropism_platform::outbox).
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL,
    subject     text NOT NULL,
    envelope    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox ALTER COLUMN envelope SET STORAGE EXTERNAL;
