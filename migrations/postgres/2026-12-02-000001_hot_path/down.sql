CREATE INDEX jobs_running ON jobs (heartbeat_at) WHERE state = 'running';
DROP INDEX jobs_state_id;
CREATE INDEX jobs_state_id ON jobs (state, id);
DROP INDEX jobs_finished;
CREATE INDEX jobs_finished ON jobs (state, finished_at);
