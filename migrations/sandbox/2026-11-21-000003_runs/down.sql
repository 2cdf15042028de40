DROP TABLE outbox;
DROP TABLE runs;
DROP TABLE runners;
