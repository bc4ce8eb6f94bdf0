-- Dead letters: every message that ended in volumed.dead.<host>, with why,
-- so operators can list, inspect, replay and purge them.
CREATE TABLE dead_letters (
    id                    bigserial   PRIMARY KEY,
    host                  text        NOT NULL,
    message_id            text,
    request_id            uuid,
    volume_id             uuid,
    -- volumed's reason (malformed_body, retries_exhausted, ...) or the
    -- broker's (delivery_limit, rejected, expired).
    reason                text        NOT NULL,
    error_code            text,
    error_message         text,
    original_exchange     text        NOT NULL,
    original_routing_key  text        NOT NULL,
    headers               jsonb       NOT NULL DEFAULT '{}'::jsonb,
    properties            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    body                  bytea       NOT NULL,
    death_count           integer     NOT NULL DEFAULT 1,
    first_seen            timestamptz NOT NULL DEFAULT now(),
    last_seen             timestamptz NOT NULL DEFAULT now(),
    status                text        NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'replayed')),
    replayed_at           timestamptz
);
-- A message dead-lettered again while its earlier copy is still dead
-- updates that row rather than adding one.
CREATE UNIQUE INDEX dead_letters_open ON dead_letters (host, message_id)
    WHERE status = 'dead' AND message_id IS NOT NULL;
CREATE INDEX dead_letters_seen ON dead_letters (host, status, first_seen);

-- Every replay, kept even when its dead letter is purged.
CREATE TABLE dead_letter_replays (
    id              bigserial   PRIMARY KEY,
    dead_letter_id  bigint      REFERENCES dead_letters (id) ON DELETE SET NULL,
    message_id      text,
    request_id      uuid,
    routing_key     text        NOT NULL,
    replayed_by     text        NOT NULL,
    replayed_at     timestamptz NOT NULL DEFAULT now()
);

-- A replay gives a finished request a new life: its generation goes up,
-- and each generation ends in exactly one terminal event.
ALTER TABLE operations ADD COLUMN generation integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN generation integer NOT NULL DEFAULT 0;
ALTER TABLE outbox DROP CONSTRAINT outbox_request_id_key;
ALTER TABLE outbox ADD CONSTRAINT outbox_request_generation_key UNIQUE (request_id, generation);
