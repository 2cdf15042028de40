DROP TABLE outbox, idempotency, transfers, holds, accounts CASCADE;
DROP SEQUENCE IF EXISTS agent_account_ids, hold_ids, transfer_ids;
DROP FUNCTION IF EXISTS guard_balance_updates, guard_accounts, refuse_delete, apply_transfers, refuse_change, reserve_holds, guard_holds, release_holds;
DROP TYPE IF EXISTS account_kind, account_status, transfer_kind, mint_reason, hold_status;
