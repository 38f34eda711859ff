-- Consumer 1: every submission into PostgreSQL, exactly once (the sink stores its
-- positions in the same transaction as the rows).
CREATE SINK db WITH (connector = 'postgres', url = '${PG_URL}', table = 'submissions',
                     create_table = true);
INSERT INTO db
SELECT id, name, CAST(roll AS BIGINT) AS roll, email, course, message, _timestamp AS received_at
FROM forms;
