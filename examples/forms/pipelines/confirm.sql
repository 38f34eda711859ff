-- Consumer 2: a confirmation per submission, POSTed to a webhook in batches (at least
-- once: a retried batch carries the same Idempotency-Key).
CREATE SINK confirm WITH (connector = 'http', url = '${WEBHOOK_URL}');
INSERT INTO confirm SELECT id, name, email FROM forms;
