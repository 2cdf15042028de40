-- The market (DESIGN.md §4 "Resources and bundles"). Runs with search_path = market.
--
-- Vectors are bigint[4] in the order cpu, memory, tokens, attention. Prices are nano-credits
-- per unit (cpu per millicore-second, memory per MiB-second, tokens per token, attention per
-- slot); supply is per round (cpu and memory as concurrent capacity).

CREATE FUNCTION is_vector(v bigint[]) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT cardinality(v) = 4 AND 0 <= ALL (v)
$$;

-- The one catalogue: seeded from configuration on first start, then changed by the operator.
CREATE TABLE catalogue (
    id              smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    supply          bigint[] NOT NULL CHECK (is_vector(supply)),
    max_window_ms   bigint NOT NULL CHECK (max_window_ms > 0),
    reserve         bigint[] NOT NULL CHECK (is_vector(reserve)),
    floor           bigint[] NOT NULL CHECK (is_vector(floor)),
    ceiling         bigint[] NOT NULL CHECK (is_vector(ceiling)),
    -- The prices discovered after the last round (the reserve prices before the first).
    discovered      bigint[] NOT NULL CHECK (is_vector(discovered)),
    price_rule      text NOT NULL,
    version         bigint NOT NULL CHECK (version > 0),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Every cleared round, as reported by the scheduler.
CREATE TABLE rounds (
    round           bigint PRIMARY KEY CHECK (round >= 0),
    cleared_at      timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    bids_due        integer NOT NULL CHECK (bids_due >= 0),
    winners         integer NOT NULL CHECK (winners >= 0),
    supply          bigint[] NOT NULL CHECK (is_vector(supply)),
    used            bigint[] NOT NULL CHECK (is_vector(used)),
    utilisation_ppm bigint[] NOT NULL CHECK (is_vector(utilisation_ppm)),
    paid_micros     bigint NOT NULL CHECK (paid_micros >= 0),
    discovered      bigint[] NOT NULL CHECK (is_vector(discovered)),
    price_rule      text NOT NULL,
    -- Fingerprint of the report, to tell a retry from a different report of the same round.
    request_hash    bytea NOT NULL
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
