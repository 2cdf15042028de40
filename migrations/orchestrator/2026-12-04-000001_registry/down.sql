DROP TABLE outbox;
DROP TABLE spawns;
DROP TABLE genesis;
DROP TABLE leader;
DROP TABLE ticks;
DROP TABLE executions;
DROP TABLE agents;
