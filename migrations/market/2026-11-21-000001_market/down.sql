DROP TABLE outbox, rounds, catalogue;
DROP FUNCTION is_vector;
