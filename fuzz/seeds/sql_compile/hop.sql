SET 'allowed-lateness' = '2s';
INSERT INTO city_counts
SELECT city, window_start, window_end,
       COUNT(*) AS tweets,
       COUNT(*) FILTER (WHERE retweet) AS retweets,
       COUNT(DISTINCT user_id) AS users, SUM(v) AS s, AVG(v), MIN(v), MAX(v),
       APPROX_COUNT_DISTINCT(user_id)
FROM HOP(tweets, created_at, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE)
GROUP BY city, window_start, window_end
HAVING COUNT(*) > 1
EMIT FINAL;
