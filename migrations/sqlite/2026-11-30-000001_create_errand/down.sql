DROP TABLE leader;
DROP TABLE workers;
DROP TABLE job_attempts;
DROP TABLE jobs;
DROP TABLE queues;
