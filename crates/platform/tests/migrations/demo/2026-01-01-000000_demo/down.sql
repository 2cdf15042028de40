DROP TABLE notes, outbox;
