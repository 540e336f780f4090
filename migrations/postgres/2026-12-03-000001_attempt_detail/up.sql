-- What an attempt learned, as JSON: an HTTP job's status, duration and
-- response excerpt, an email's SMTP reply. Set by kinds that record it
-- (JobContext::record); a snoozed attempt (429 with Retry-After) keeps a row
-- with outcome 'snoozed' so that the wait shows on the job's page.
ALTER TABLE job_attempts ADD COLUMN detail TEXT;
