INSERT INTO flagged SELECT * FROM raw WHERE lower(comment) LIKE '%rizz%' OR comment ~* 'no\s+cap';
INSERT INTO names SELECT upper(name) AS who, length(comment) AS len, CAST(a AS BIGINT) + 1 AS n,
  CASE WHEN x IN (1, 2) THEN 'a' ELSE concat('b', y) END AS c, payload->>'id' AS id, user.id AS u,
  _key, _timestamp, header('h'), coalesce(n, 0), substring(s FROM 2 FOR 3), date_trunc('minute', t),
  extract(hour FROM to_timestamp(t)), regexp_like(s, '^a', 'i'), round(v, 2), abs(v) % 3
FROM raw WHERE v BETWEEN 1 AND 10 AND s IS NOT NULL;
