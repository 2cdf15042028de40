CREATE TABLE notes (id bigserial PRIMARY KEY, text text NOT NULL);
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL,
    subject text NOT NULL,
    envelope bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
