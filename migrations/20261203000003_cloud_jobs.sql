-- The backend's asynchronous job started for an operation, journalled
-- before it is polled, so a restarted daemon polls the same job instead of
-- starting a second one.
ALTER TABLE operations ADD COLUMN cloud_job_id text;
