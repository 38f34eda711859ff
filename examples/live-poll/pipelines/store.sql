-- Every vote into PostgreSQL, exactly once (the sink stores its positions in the
-- same transaction as the rows).
CREATE SINK db WITH (connector = 'postgres', url = '${PG_URL}', table = 'votes', create_table = true,
                     batch_rows = 5000);
INSERT INTO db SELECT poll, option, voter, _timestamp AS voted_at FROM votes;
