-- The economy ledger (DESIGN.md §4 "Money"). Runs with search_path = economy.
--
-- Invariants held by the database itself, not only by the service:
--   * balances change only through transfer rows and holds (triggers below), and every transfer
--     moves the same amount out of one account and into another, so the sum of all balances
--     stays exactly zero;
--   * an agent's available balance (balance - pending holds) is never negative (CHECK);
--   * transfers are immutable (no UPDATE, DELETE or TRUNCATE);
--   * a hold only moves pending → posted | voided, and never changes its amount or accounts.
--
-- No hot row: the system accounts `mint` and `burn` are split into shards (rows with the same
-- account id); a transaction touches one shard of each, chosen at random, so mints and burns do
-- not serialise unrelated transfers. Their balance is the sum of their shards.

CREATE TYPE account_kind AS ENUM ('agent', 'mint', 'burn');
CREATE TYPE account_status AS ENUM ('open', 'closed');
CREATE TYPE transfer_kind AS ENUM ('transfer', 'mint', 'hold_post', 'close_burn');
CREATE TYPE mint_reason AS ENUM ('reward', 'genesis_grant');
CREATE TYPE hold_status AS ENUM ('pending', 'posted', 'voided');

CREATE TABLE accounts (
    id          bigint NOT NULL,
    shard       smallint NOT NULL DEFAULT 0,
    kind        account_kind NOT NULL,
    agent_id    uuid,
    status      account_status NOT NULL DEFAULT 'open',
    balance     bigint NOT NULL DEFAULT 0,
    pending     bigint NOT NULL DEFAULT 0,
    opened_at   timestamptz NOT NULL DEFAULT now(),
    closed_at   timestamptz,
    PRIMARY KEY (id, shard),
    CONSTRAINT agent_has_id CHECK ((kind = 'agent') = (agent_id IS NOT NULL)),
    CONSTRAINT agent_single_shard CHECK (kind <> 'agent' OR shard = 0),
    CONSTRAINT pending_not_negative CHECK (pending >= 0),
    CONSTRAINT available_not_negative CHECK (kind <> 'agent' OR balance - pending >= 0),
    CONSTRAINT mint_only_issues CHECK (kind <> 'mint' OR balance <= 0),
    CONSTRAINT burn_only_absorbs CHECK (kind <> 'burn' OR balance >= 0),
    CONSTRAINT closed_has_time CHECK ((status = 'closed') = (closed_at IS NOT NULL))
);
-- Room on each page for the new version of an updated row: balance updates stay HOT (no new
-- index entries), which matters when a batch updates thousands of accounts.
ALTER TABLE accounts SET (fillfactor = 70);
CREATE UNIQUE INDEX accounts_agent ON accounts (agent_id) WHERE agent_id IS NOT NULL;
CREATE SEQUENCE agent_account_ids START 1000;

-- The two system accounts, 64 shards each (more shards than any plausible number of
-- concurrent writers on one database).
INSERT INTO accounts (id, shard, kind)
SELECT 1, s, 'mint'::account_kind FROM generate_series(0, 63) AS s
UNION ALL
SELECT 2, s, 'burn'::account_kind FROM generate_series(0, 63) AS s;

CREATE TABLE holds (
    id              bigint PRIMARY KEY,
    debit_id        bigint NOT NULL,
    debit_shard     smallint NOT NULL DEFAULT 0,
    credit_id       bigint NOT NULL,
    credit_shard    smallint NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    status          hold_status NOT NULL DEFAULT 'pending',
    posted_amount   bigint CHECK (posted_amount > 0 AND posted_amount <= amount),
    memo            text NOT NULL DEFAULT '',
    request_key     text NOT NULL,
    created_at      timestamptz NOT NULL,
    resolved_at     timestamptz,
    FOREIGN KEY (debit_id, debit_shard) REFERENCES accounts (id, shard),
    FOREIGN KEY (credit_id, credit_shard) REFERENCES accounts (id, shard),
    CONSTRAINT hold_debits_an_agent CHECK (debit_shard = 0 AND debit_id >= 1000),
    CONSTRAINT hold_not_to_self CHECK (debit_id <> credit_id),
    CONSTRAINT hold_not_to_mint CHECK (credit_id <> 1),
    CONSTRAINT posted_has_amount CHECK ((status = 'posted') = (posted_amount IS NOT NULL)),
    CONSTRAINT resolved_has_time CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE INDEX holds_pending_by_debit ON holds (debit_id) WHERE status = 'pending';
CREATE SEQUENCE hold_ids;

CREATE TABLE transfers (
    id              bigint PRIMARY KEY,
    debit_id        bigint NOT NULL,
    debit_shard     smallint NOT NULL,
    credit_id       bigint NOT NULL,
    credit_shard    smallint NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    kind            transfer_kind NOT NULL,
    mint_reason     mint_reason,
    memo            text NOT NULL DEFAULT '',
    hold_id         bigint REFERENCES holds (id),
    request_key     text NOT NULL,
    created_at      timestamptz NOT NULL,
    -- No foreign keys to accounts: apply_transfers() updates every account shard a statement
    -- names and refuses the statement if one is missing, which is the same guarantee without a
    -- per-row lookup (two per transfer, two thousand per batch).
    CONSTRAINT transfer_not_to_self CHECK (debit_id <> credit_id),
    CONSTRAINT only_mint_issues CHECK ((kind = 'mint') = (debit_id = 1)),
    CONSTRAINT mint_has_reason CHECK ((kind = 'mint') = (mint_reason IS NOT NULL)),
    CONSTRAINT burn_never_pays CHECK (debit_id <> 2),
    CONSTRAINT nothing_pays_mint CHECK (credit_id <> 1),
    CONSTRAINT post_has_hold CHECK ((kind = 'hold_post') = (hold_id IS NOT NULL))
);
CREATE SEQUENCE transfer_ids;
CREATE INDEX transfers_by_debit ON transfers (debit_id, id DESC);
CREATE INDEX transfers_by_credit ON transfers (credit_id, id DESC);

-- Idempotency: the first outcome of every mutation, keyed by caller scope and id.
CREATE TABLE idempotency (
    scope           text NOT NULL,
    key             text NOT NULL,
    request_hash    bytea NOT NULL,
    is_error        boolean NOT NULL,
    outcome         bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
) WITH (fillfactor = 50);
-- Claimed at the start of a transaction and given its outcome at the end: the room left on each
-- page keeps that update HOT (no second index entry).
-- Outcomes and envelopes are protobuf, written once and read rarely: compressing them on every
-- insert costs more CPU than the space is worth.
ALTER TABLE idempotency ALTER COLUMN outcome SET STORAGE EXTERNAL;

-- The transactional outbox (see syntropism_platform::outbox).
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    -- Unique by construction (UUIDv7); JetStream de-duplicates on it, so no index here.
    event_id    text NOT NULL,
    subject     text NOT NULL,
    envelope    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox ALTER COLUMN envelope SET STORAGE EXTERNAL;

---------------------------------------------------------------------------------------------
-- Balances move only through transfers and holds.

-- Balances are changed only by the ledger's own triggers below (apply_transfers, reserve_holds,
-- release_holds), whose UPDATEs run one trigger level down; any statement that sets a balance
-- directly is refused. Per statement, so a batch updating two thousand accounts pays once.
CREATE FUNCTION guard_balance_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'balances change only through transfers and holds' USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER accounts_balances_guard BEFORE UPDATE OF balance, pending ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION guard_balance_updates();

-- Accounts open empty, keep their identity, close for good, and are never deleted. Row-level,
-- but only for inserts and for updates that name these columns (never a balance update).
CREATE FUNCTION guard_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.balance <> 0 OR NEW.pending <> 0 THEN
            RAISE EXCEPTION 'accounts open with a zero balance' USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.id, NEW.shard, NEW.kind, NEW.agent_id, NEW.opened_at)
       IS DISTINCT FROM (OLD.id, OLD.shard, OLD.kind, OLD.agent_id, OLD.opened_at)
       OR (OLD.status = 'closed' AND NEW.status <> 'closed') THEN
        RAISE EXCEPTION 'account identity is immutable and closing is final'
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER accounts_guard BEFORE INSERT OR UPDATE OF id, shard, kind, agent_id, opened_at, status ON accounts
    FOR EACH ROW EXECUTE FUNCTION guard_accounts();

CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never deleted', TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER accounts_never_deleted BEFORE DELETE OR TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete();

-- Applies a statement's new transfers: each moves `amount` from debit to credit, netted per
-- account shard so a batch of a thousand transfers is one UPDATE.
--
-- PL/pgSQL caches a statement's plan from its first execution, and a transition table's size
-- varies from one row to thousands: a plan made for a big batch (hash join, sequential scan)
-- makes every later single transfer slow, and the reverse. So small statements use the cached
-- plan of the static query (only ever planned for small inputs) and big ones are planned for
-- their real size through EXECUTE.
CREATE FUNCTION apply_transfers() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    expected bigint;
    updated bigint;
BEGIN
    IF (SELECT count(*) FROM new_transfers) <= 16 THEN
        WITH legs AS (
            SELECT debit_id AS id, debit_shard AS shard, -amount::numeric AS delta FROM new_transfers
            UNION ALL
            SELECT credit_id, credit_shard, amount::numeric FROM new_transfers
        ), net AS (
            SELECT id, shard, sum(delta) AS delta FROM legs GROUP BY id, shard
        ), changed AS (
            UPDATE accounts a SET balance = (a.balance + net.delta)::bigint
            FROM net WHERE a.id = net.id AND a.shard = net.shard
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM net) INTO updated, expected;
    ELSE
        EXECUTE $q$
            WITH legs AS (
                SELECT debit_id AS id, debit_shard AS shard, -amount::numeric AS delta FROM new_transfers
                UNION ALL
                SELECT credit_id, credit_shard, amount::numeric FROM new_transfers
            ), net AS (
                SELECT id, shard, sum(delta) AS delta FROM legs GROUP BY id, shard
            ), changed AS (
                UPDATE accounts a SET balance = (a.balance + net.delta)::bigint
                FROM net WHERE a.id = net.id AND a.shard = net.shard
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM net)
        $q$ INTO updated, expected;
    END IF;
    IF updated <> expected THEN
        RAISE EXCEPTION 'transfer references a missing account shard' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER transfers_apply AFTER INSERT ON transfers
    REFERENCING NEW TABLE AS new_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION apply_transfers();

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER transfers_immutable BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- A new hold reserves its amount on the debit account (planned per size, as above).
CREATE FUNCTION reserve_holds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_holds WHERE status <> 'pending') THEN
        RAISE EXCEPTION 'holds are created pending' USING ERRCODE = 'check_violation';
    END IF;
    IF (SELECT count(*) FROM new_holds) <= 16 THEN
        UPDATE accounts a SET pending = (a.pending + n.amount)::bigint
        FROM (SELECT debit_id, sum(amount) AS amount FROM new_holds GROUP BY debit_id) n
        WHERE a.id = n.debit_id AND a.shard = 0;
    ELSE
        EXECUTE $q$
            UPDATE accounts a SET pending = (a.pending + n.amount)::bigint
            FROM (SELECT debit_id, sum(amount) AS amount FROM new_holds GROUP BY debit_id) n
            WHERE a.id = n.debit_id AND a.shard = 0
        $q$;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER holds_reserve AFTER INSERT ON holds
    REFERENCING NEW TABLE AS new_holds
    FOR EACH STATEMENT EXECUTE FUNCTION reserve_holds();

-- Only pending → posted | voided; nothing else about a hold ever changes.
CREATE FUNCTION guard_holds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'holds are never deleted' USING ERRCODE = 'restrict_violation';
    END IF;
    IF OLD.status <> 'pending' OR NEW.status = 'pending'
       OR (NEW.id, NEW.debit_id, NEW.debit_shard, NEW.credit_id, NEW.credit_shard, NEW.amount,
           NEW.memo, NEW.request_key, NEW.created_at)
          IS DISTINCT FROM
          (OLD.id, OLD.debit_id, OLD.debit_shard, OLD.credit_id, OLD.credit_shard, OLD.amount,
           OLD.memo, OLD.request_key, OLD.created_at) THEN
        RAISE EXCEPTION 'a hold only moves from pending to posted or voided'
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER holds_guard BEFORE UPDATE OR DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION guard_holds();

-- A resolved hold releases its reservation (a post's transfer row moves the money).
CREATE FUNCTION release_holds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM new_holds) <= 16 THEN
        UPDATE accounts a SET pending = (a.pending - r.amount)::bigint
        FROM (SELECT n.debit_id, sum(n.amount) AS amount
              FROM new_holds n JOIN old_holds o ON o.id = n.id
              WHERE o.status = 'pending' AND n.status <> 'pending'
              GROUP BY n.debit_id) r
        WHERE a.id = r.debit_id AND a.shard = 0;
    ELSE
        EXECUTE $q$
            UPDATE accounts a SET pending = (a.pending - r.amount)::bigint
            FROM (SELECT n.debit_id, sum(n.amount) AS amount
                  FROM new_holds n JOIN old_holds o ON o.id = n.id
                  WHERE o.status = 'pending' AND n.status <> 'pending'
                  GROUP BY n.debit_id) r
            WHERE a.id = r.debit_id AND a.shard = 0
        $q$;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER holds_release AFTER UPDATE ON holds
    REFERENCING OLD TABLE AS old_holds NEW TABLE AS new_holds
    FOR EACH STATEMENT EXECUTE FUNCTION release_holds();
