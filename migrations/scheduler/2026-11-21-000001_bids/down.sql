DROP TABLE outbox, rounds, bids;
DROP SEQUENCE IF EXISTS bid_ids;
DROP TYPE bid_status;
