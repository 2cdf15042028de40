-- Credits an agent earned from outside the orchestrator's own steps (rewards), one row per
-- source event, so a redelivered event is counted once.
CREATE TABLE earnings (
    source      text PRIMARY KEY,
    agent_id    uuid NOT NULL,
    amount      bigint NOT NULL CHECK (amount >= 0),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
