-- Covering partial indexes for the dashboard, measured at 1,000,000 jobs
-- (examples/dashboard_bench.rs): counts of unfinished and dead jobs per
-- queue, and the dead-letter groups, read from the index alone instead of
-- visiting tens of thousands of table pages.

CREATE INDEX jobs_unfinished ON jobs (state, queue, run_at)
    WHERE state IN ('queued', 'retrying', 'running');

DROP INDEX jobs_dead_groups;
CREATE INDEX jobs_dead_groups ON jobs (state, kind, error_signature, queue, finished_at, id)
    WHERE state = 'dead';
