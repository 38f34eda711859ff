-- Every reading into PostgreSQL, exactly once (the sink stores its positions in the
-- same transaction as the rows); the table's `stored_at` (clock_timestamp()) is when
-- each row went in.
CREATE SINK db WITH (connector = 'postgres', url = '${PG_URL}', table = 'readings', batch_interval = '20ms');
INSERT INTO db
SELECT sensor, CAST(seq AS BIGINT) AS seq, CAST(value AS DOUBLE) AS value, CAST(sent_at AS BIGINT) AS sent_at
FROM readings;
