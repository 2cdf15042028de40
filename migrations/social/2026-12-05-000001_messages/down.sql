DROP TABLE outbox;
DROP TABLE posts;
DROP TABLE messages;
