DROP TABLE earnings;
