-- Idempotency-Key → the jobs a request created, so that a retried request
-- gets the same jobs back instead of new ones. The row is inserted first
-- (it serialises concurrent requests with the same key), and job_ids is
-- filled in the same transaction as the jobs.
CREATE TABLE idempotency_keys (
    key          TEXT NOT NULL PRIMARY KEY,
    request_hash TEXT NOT NULL,
    job_ids      TEXT,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);

CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Every operator action, from the API or the dashboard.
CREATE TABLE audit_log (
    id     INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at     BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    jobs   BIGINT NOT NULL,
    detail TEXT
);

CREATE INDEX audit_log_at ON audit_log (at);
