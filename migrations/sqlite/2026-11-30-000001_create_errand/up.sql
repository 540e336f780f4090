-- errand's tables on SQLite: the same tables, columns and indexes as on
-- PostgreSQL (instants are epoch milliseconds from the database clock). Ids are
-- INTEGER PRIMARY KEY (the 64-bit rowid); AUTOINCREMENT so that a pruned id is
-- never handed to a new job, which would make old links point at the wrong job.

CREATE TABLE queues (
    name       TEXT NOT NULL PRIMARY KEY,
    paused     BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at BIGINT NOT NULL
);

CREATE TABLE jobs (
    id               INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    queue            TEXT NOT NULL,
    kind             TEXT NOT NULL,
    args             TEXT NOT NULL,
    state            TEXT NOT NULL
        CHECK (state IN ('queued', 'running', 'retrying', 'completed', 'dead', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_at           BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    timeout_ms       BIGINT NOT NULL,
    lease_id         BIGINT NOT NULL DEFAULT 0,
    locked_by        TEXT,
    heartbeat_at     BIGINT,
    deadline_at      BIGINT,
    rescue_count     INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    unique_key       TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
);

-- Claims read only claimable rows, in claim order.
CREATE INDEX jobs_claimable ON jobs (queue, priority, run_at, id)
    WHERE state IN ('queued', 'retrying');
-- The rescuer scans running rows only.
CREATE INDEX jobs_running ON jobs (heartbeat_at) WHERE state = 'running';
-- At most one unfinished job per unique key.
CREATE UNIQUE INDEX jobs_unique_key ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running', 'retrying');
-- The pruner deletes finished rows by age.
CREATE INDEX jobs_finished ON jobs (state, finished_at);

CREATE TABLE job_attempts (
    id          INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    job_id      BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    worker      TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    outcome     TEXT NOT NULL,
    error       TEXT
);

CREATE INDEX job_attempts_job ON job_attempts (job_id, attempt);

CREATE TABLE workers (
    id           TEXT NOT NULL PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    queues       TEXT NOT NULL,
    concurrency  INTEGER NOT NULL,
    version      TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

CREATE TABLE leader (
    name       TEXT NOT NULL PRIMARY KEY,
    holder     TEXT NOT NULL,
    term       BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
