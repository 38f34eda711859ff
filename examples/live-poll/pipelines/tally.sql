-- The tally per poll and option, kept up to date: each changed count is emitted to
-- the topic `tally` at most every 100 ms (EMIT CHANGES, the default), which the
-- results page reads as a live stream.
SET 'emit-interval' = '100ms';
INSERT INTO tally SELECT poll, option, COUNT(*) AS votes FROM votes GROUP BY poll, option;
