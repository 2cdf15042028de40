-- The scheduler (DESIGN.md §4 "Bids and clearing"). Runs with search_path = scheduler.
--
-- A bid's life: placing (row written, escrow being held) → pending (escrowed, waiting for a
-- round) → settling (chosen by a round whose settlement is under way) → won | expired; or
-- pending → cancelling (escrow being released) → cancelled; or placing → rejected (the escrow
-- was refused). The in-between states make every step that calls the economy restartable: a
-- crash leaves a row that says what to finish, and the economy's idempotency ids make
-- finishing it safe.

CREATE TYPE bid_status AS ENUM
    ('placing', 'rejected', 'pending', 'cancelling', 'cancelled', 'settling', 'won', 'expired');

CREATE SEQUENCE bid_ids;

CREATE TABLE bids (
    id              bigint PRIMARY KEY DEFAULT nextval('bid_ids'),
    bidder          uuid NOT NULL,
    beneficiary     uuid NOT NULL,
    cpu_millicores  bigint NOT NULL CHECK (cpu_millicores > 0),
    memory_mib      bigint NOT NULL CHECK (memory_mib > 0),
    duration_ms     bigint NOT NULL CHECK (duration_ms > 0),
    llm_tokens      bigint NOT NULL CHECK (llm_tokens >= 0),
    attention_slots bigint NOT NULL CHECK (attention_slots >= 0),
    amount_micros   bigint NOT NULL CHECK (amount_micros > 0),
    reserve_micros  bigint NOT NULL CHECK (reserve_micros >= 0 AND reserve_micros <= amount_micros),
    status          bid_status NOT NULL DEFAULT 'placing',
    placed_at       timestamptz NOT NULL DEFAULT now(),
    not_before      timestamptz,
    expires_at      timestamptz NOT NULL,
    hold_id         bigint,
    round           bigint,
    paid_micros     bigint CHECK (paid_micros >= 0 AND paid_micros <= amount_micros),
    resolved_at     timestamptz,
    -- Why a placing bid was rejected (an encoded syntropism.v1.Error), replayed on retry.
    rejection       bytea,
    -- The bidder's idempotency id and the fingerprint of the request.
    request_key     text NOT NULL,
    request_hash    bytea NOT NULL,
    UNIQUE (bidder, request_key),
    CONSTRAINT escrowed CHECK (status IN ('placing', 'rejected') OR hold_id IS NOT NULL),
    CONSTRAINT won_has_price CHECK ((status = 'won') = (paid_micros IS NOT NULL)),
    CONSTRAINT rejected_has_reason CHECK ((status = 'rejected') = (rejection IS NOT NULL)),
    CONSTRAINT times_are_sane CHECK (not_before IS NULL OR not_before < expires_at)
);
CREATE INDEX bids_open ON bids (status, id) WHERE status IN ('placing', 'pending', 'cancelling', 'settling');
CREATE INDEX bids_by_bidder ON bids (bidder, id DESC);
CREATE INDEX bids_open_by_bidder ON bids (bidder)
    WHERE status IN ('placing', 'pending', 'settling', 'cancelling');
CREATE INDEX bids_by_round ON bids (round) WHERE round IS NOT NULL;

-- Each clearing round, exactly once: its clock and plan are stored before the economy is asked
-- to settle it, so a retry (or another replica) finishes the same round the same way.
CREATE TABLE rounds (
    round           bigint PRIMARY KEY CHECK (round >= 0),
    clock           timestamptz NOT NULL,
    -- planned (bids chosen, plan stored) → settled (economy done, bids updated) → reported
    -- (market told).
    status          text NOT NULL CHECK (status IN ('planned', 'settled', 'reported')),
    -- The economy batch that settles it (an encoded syntropism.v1.BatchRequest), if any.
    settlement      bytea,
    -- The reply (an encoded syntropism.v1.ClearResponse).
    response        bytea NOT NULL,
    -- What the market is told (an encoded syntropism.v1.ReportRoundRequest).
    report          bytea NOT NULL,
    -- The bids this round expires (their escrow is released by the settlement).
    expired         bigint[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The transactional outbox (see syntropism_platform::outbox).
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL,
    subject     text NOT NULL,
    envelope    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox ALTER COLUMN envelope SET STORAGE EXTERNAL;
