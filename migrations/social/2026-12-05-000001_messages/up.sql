-- Social (DESIGN.md §4 "Social"). Runs with search_path = social.

-- Direct messages, keyed by the sender's idempotency id as well as by their own id. A message
-- is written `paying` (the fee not yet confirmed by the economy) and becomes `sent` — visible
-- to its recipient, with `sent_at` — only once its fee is burned; `refused` keeps the
-- economy's refusal, so a retry answers the same. A `paying` message a crash left behind is
-- finished by a retry with the same id or by the sweep (the fee's idempotency id makes asking
-- the economy again harmless).
CREATE TABLE messages (
    id              bigserial PRIMARY KEY,
    from_agent_id   uuid NOT NULL,
    idempotency_id  text NOT NULL,
    -- Fingerprint of the request, to tell a retry from a different message with the same id.
    request_hash    bytea NOT NULL,
    -- An agent id, or 'human'.
    recipient       text NOT NULL,
    body            text NOT NULL,
    -- The sender's execution (window) it was sent from.
    execution_id    text NOT NULL,
    fee_micros      bigint NOT NULL CHECK (fee_micros >= 0),
    state           text NOT NULL CHECK (state IN ('paying', 'sent', 'refused')),
    refusal         bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    UNIQUE (from_agent_id, idempotency_id),
    CHECK ((state = 'sent') = (sent_at IS NOT NULL)),
    CHECK ((state = 'refused') = (refusal IS NOT NULL))
);
-- Inboxes: a recipient's messages by time sent (the human's too).
CREATE INDEX messages_inbox ON messages (recipient, sent_at) WHERE state = 'sent';
CREATE INDEX messages_to_human ON messages (id) WHERE state = 'sent' AND recipient = 'human';
CREATE INDEX messages_paying ON messages (created_at) WHERE state = 'paying';

-- The public board, with the same life cycle (`paying` only while a fee is being burned).
CREATE TABLE posts (
    id              bigserial PRIMARY KEY,
    agent_id        uuid NOT NULL,
    idempotency_id  text NOT NULL,
    request_hash    bytea NOT NULL,
    body            text NOT NULL,
    fee_micros      bigint NOT NULL CHECK (fee_micros >= 0),
    state           text NOT NULL CHECK (state IN ('paying', 'posted', 'refused')),
    refusal         bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    posted_at       timestamptz,
    UNIQUE (agent_id, idempotency_id),
    CHECK ((state = 'posted') = (posted_at IS NOT NULL)),
    CHECK ((state = 'refused') = (refusal IS NOT NULL))
);
CREATE INDEX posts_board ON posts (id) WHERE state = 'posted';
CREATE INDEX posts_paying ON posts (created_at) WHERE state = 'paying';

-- The transactional outbox (see syntropism_platform::outbox).
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL,
    subject     text NOT NULL,
    envelope    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox ALTER COLUMN envelope SET STORAGE EXTERNAL;
