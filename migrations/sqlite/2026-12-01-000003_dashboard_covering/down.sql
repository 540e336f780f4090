DROP INDEX jobs_dead_groups;
CREATE INDEX jobs_dead_groups ON jobs (kind, error_signature) WHERE state = 'dead';
DROP INDEX jobs_unfinished;
