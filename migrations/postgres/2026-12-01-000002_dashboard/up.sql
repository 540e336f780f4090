-- What the dashboard needs to stay fast at millions of jobs.

-- A dead job's error with ids and numbers normalised away: dead letters are
-- grouped by (kind, error_signature). Set when a job goes dead, cleared on
-- replay.
ALTER TABLE jobs ADD COLUMN error_signature TEXT;

-- Job lists filtered by state, newest first, a page at a time.
CREATE INDEX jobs_state_id ON jobs (state, id);

-- Dead-letter groups.
CREATE INDEX jobs_dead_groups ON jobs (kind, error_signature) WHERE state = 'dead';

-- Failures per minute: only failed attempts are indexed.
CREATE INDEX job_attempts_failed ON job_attempts (finished_at) WHERE outcome <> 'completed';
