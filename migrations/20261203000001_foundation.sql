-- The operation journal: one row per request id, the unit of idempotency.
CREATE TABLE operations (
    request_id     uuid        PRIMARY KEY,
    host           text        NOT NULL,
    op             text        NOT NULL CHECK (op IN ('attach', 'detach', 'unknown')),
    volume_id      uuid,
    vm_id          uuid,
    -- running: a worker has started (or a crash interrupted) the operation;
    -- succeeded / failed: terminal, its event is in the outbox.
    state          text        NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    step           text        NOT NULL DEFAULT 'received',
    attempts       integer     NOT NULL DEFAULT 1 CHECK (attempts >= 0),
    error_code     text,
    error_message  text,
    job_id         text,
    metadata       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    CHECK ((state = 'running') = (finished_at IS NULL))
);
CREATE INDEX operations_unfinished ON operations (host, updated_at) WHERE state = 'running';
CREATE INDEX operations_volume ON operations (volume_id, created_at);

-- Where each volume is attached, as volumed last established it, and the
-- block device it has on this host when attached to the appliance VM.
CREATE TABLE volume_attachments (
    volume_id    uuid        PRIMARY KEY,          -- one attachment per volume
    vm_id        uuid        NOT NULL,
    host         text        NOT NULL,
    device_path  text,
    stable_path  text,
    request_id   uuid        NOT NULL,
    attached_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((device_path IS NULL) = (stable_path IS NULL))
);
-- A device name belongs to one volume at a time on a host.
CREATE UNIQUE INDEX volume_attachments_device ON volume_attachments (host, device_path)
    WHERE device_path IS NOT NULL;
CREATE UNIQUE INDEX volume_attachments_stable ON volume_attachments (host, stable_path)
    WHERE stable_path IS NOT NULL;

-- Transactional outbox: written in the transaction that finishes an
-- operation, published by the relay, marked sent after the broker confirms.
CREATE TABLE outbox (
    id              bigserial   PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    -- At most one terminal event per request (invariant 1).
    request_id      uuid        NOT NULL UNIQUE,
    host            text        NOT NULL,
    routing_key     text        NOT NULL,
    body            jsonb       NOT NULL,
    correlation_id  text,
    reply_to        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    -- Set when the broker returned the event as unroutable (no queue bound).
    unroutable      boolean     NOT NULL DEFAULT false,
    publish_attempts integer    NOT NULL DEFAULT 0
);
CREATE INDEX outbox_pending ON outbox (host, id) WHERE sent_at IS NULL;
