INSERT INTO o SELECT user_id, window_start, window_end, COUNT(*) FROM SESSION(tweets, created_at, INTERVAL '30 seconds') GROUP BY 1, 2, 3 EMIT CHANGES;
INSERT INTO t SELECT city, COUNT(*) AS n FROM TUMBLE(tweets, _timestamp, INTERVAL '10' SECOND) GROUP BY city, window_start, window_end;
INSERT INTO p SELECT city, COUNT(*) AS votes FROM tweets GROUP BY city;
