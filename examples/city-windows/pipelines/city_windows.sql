-- Seed 003's Spark job: per city, tweets, retweets and distinct users in 5-minute
-- windows refreshed every minute, kept up to date in PostgreSQL (upserts on the city
-- and the window; each changed window at most every second, the final value when
-- the window closes).
-- A source partition that delivers nothing holds the watermark back (windows stay open)
-- until it has been silent this long: short here, since a replay's producer may send
-- everything to one of the two partitions for a while.
SET 'idle-timeout' = '3s';
CREATE SINK db WITH (connector = 'postgres', url = '${PG_URL}', table = 'city_windows',
                     primary_key = 'city, window_start', create_table = true);
INSERT INTO db
SELECT city, window_start, window_end,
       COUNT(*) AS tweets,
       COUNT(*) FILTER (WHERE retweet) AS retweets,
       COUNT(DISTINCT user_id) AS users
FROM HOP(tweets, created_at, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)
GROUP BY city, window_start, window_end;
