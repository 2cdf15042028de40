DROP TABLE outbox;
DROP TABLE prompts;
