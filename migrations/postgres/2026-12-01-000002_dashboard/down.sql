DROP INDEX job_attempts_failed;
DROP INDEX jobs_dead_groups;
DROP INDEX jobs_state_id;
ALTER TABLE jobs DROP COLUMN error_signature;
