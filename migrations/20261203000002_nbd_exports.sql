-- NBD exports, changed in the same transaction as the attachment rows and
-- the outbox event.
CREATE TABLE nbd_exports (
    export_name  text        PRIMARY KEY,
    -- One export per volume, and only for an attached volume.
    volume_id    uuid        NOT NULL UNIQUE
                             REFERENCES volume_attachments (volume_id) ON DELETE CASCADE,
    host         text        NOT NULL,
    engine       text        NOT NULL CHECK (engine IN ('nbdkit', 'nbd-server')),
    device_path  text        NOT NULL,
    stable_path  text        NOT NULL,
    port         integer     NOT NULL CHECK (port BETWEEN 1 AND 65535),
    request_id   uuid        NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- A name is derived from its volume, so it can never name another.
    CHECK (export_name = 'vol-' || volume_id::text)
);
CREATE INDEX nbd_exports_host ON nbd_exports (host);

-- Counters of the export engine per host, for operators and benchmarks.
CREATE TABLE nbd_stats (
    host        text        NOT NULL,
    engine      text        NOT NULL,
    reloads     bigint      NOT NULL DEFAULT 0,
    restarts    bigint      NOT NULL DEFAULT 0,
    crashes     bigint      NOT NULL DEFAULT 0,
    changes     bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, engine)
);
