-- Every error an operation met, one row per failed attempt, so that
-- `volumed dlq show` tells the whole story of a request and not only its
-- last error. Written in the statement or transaction that records the
-- retry or the failure, so the history never disagrees with the journal.
-- A new table only (expand): the previous release neither reads nor writes
-- it and runs unchanged against this schema.
CREATE TABLE operation_errors (
    id          bigserial   PRIMARY KEY,
    request_id  uuid        NOT NULL REFERENCES operations (request_id) ON DELETE CASCADE,
    -- The operation's generation (a replay starts a new one) and the
    -- journal's attempt number when the error happened.
    generation  integer     NOT NULL,
    attempt     integer     NOT NULL,
    code        text        NOT NULL,
    message     text        NOT NULL,
    retryable   boolean     NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operation_errors_request ON operation_errors (request_id, id);
