-- The definitions of the first migration.
CREATE OR REPLACE FUNCTION apply_transfers() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE FUNCTION reserve_holds() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE FUNCTION release_holds() RETURNS trigger LANGUAGE plpgsql AS $$
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

