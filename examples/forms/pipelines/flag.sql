-- Consumer 3: submissions whose message uses a word of slang.txt, into the topic
-- `flagged` (the run script writes one ILIKE per word).
INSERT INTO flagged SELECT id, name, message FROM forms WHERE ${SLANG_FILTER};
