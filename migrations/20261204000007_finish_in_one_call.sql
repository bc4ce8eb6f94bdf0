-- The statements that finish an operation, as functions, so that the daemon
-- finishes an operation in one round trip to the database instead of one per
-- statement. They change nothing in the tables (expand only): the previous
-- release does not call them and runs unchanged against this schema. All run
-- with the caller's rights.

-- An attachment change: what `volume_attachments` and `nbd_exports` become
-- after an operation or a reconciler repair.
--   kind:   'none' | 'upsert' | 'remove' | 'remove_export'
--   export: for 'upsert', 'keep' | 'set' | 'remove'; with 'set', the export's
--           name, engine, port and metadata.
CREATE TYPE volumed_change AS (
    kind         text,
    volume_id    uuid,
    vm_id        uuid,
    device_path  text,
    stable_path  text,
    export       text,
    export_name  text,
    engine       text,
    port         integer,
    metadata     jsonb
);

-- An event for the outbox.
CREATE TYPE volumed_event AS (
    event_id        uuid,
    request_id      uuid,
    host            text,
    routing_key     text,
    body            jsonb,
    correlation_id  text,
    reply_to        text,
    traceparent     text
);

CREATE FUNCTION volumed_apply_change(p_host text, p_request_id uuid, c volumed_change)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF c.kind = 'upsert' THEN
        -- A device path recorded for another volume is stale by definition
        -- (the kernel recycled the name): this volume owns it now.
        IF c.device_path IS NOT NULL THEN
            UPDATE volume_attachments SET device_path = NULL, stable_path = NULL
             WHERE host = p_host AND device_path = c.device_path
               AND volume_id <> c.volume_id;
        END IF;
        INSERT INTO volume_attachments
            (volume_id, vm_id, host, device_path, stable_path, request_id)
        VALUES (c.volume_id, c.vm_id, p_host, c.device_path, c.stable_path, p_request_id)
        ON CONFLICT (volume_id) DO UPDATE
           SET vm_id = EXCLUDED.vm_id, host = EXCLUDED.host,
               device_path = EXCLUDED.device_path, stable_path = EXCLUDED.stable_path,
               request_id = EXCLUDED.request_id, attached_at = now();
        IF c.export = 'remove' THEN
            DELETE FROM nbd_exports WHERE volume_id = c.volume_id;
        ELSIF c.export = 'set' AND c.device_path IS NOT NULL AND c.stable_path IS NOT NULL THEN
            INSERT INTO nbd_exports (export_name, volume_id, host, engine, device_path,
                                     stable_path, port, request_id, metadata)
            VALUES (c.export_name, c.volume_id, p_host, c.engine, c.device_path,
                    c.stable_path, c.port, p_request_id, c.metadata)
            ON CONFLICT (export_name) DO UPDATE
               SET host = EXCLUDED.host, engine = EXCLUDED.engine,
                   device_path = EXCLUDED.device_path,
                   stable_path = EXCLUDED.stable_path, port = EXCLUDED.port,
                   request_id = EXCLUDED.request_id, metadata = EXCLUDED.metadata;
        END IF;
    ELSIF c.kind = 'remove_export' THEN
        DELETE FROM nbd_exports WHERE volume_id = c.volume_id;
    ELSIF c.kind = 'remove' THEN
        DELETE FROM nbd_exports WHERE volume_id = c.volume_id;
        DELETE FROM volume_attachments WHERE volume_id = c.volume_id;
    ELSIF c.kind <> 'none' THEN
        RAISE EXCEPTION 'unknown attachment change %', c.kind;
    END IF;
END
$$;

-- Writes an event to the outbox, under the generation of its request.
CREATE FUNCTION volumed_insert_event(e volumed_event)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO outbox (event_id, request_id, host, routing_key, body, correlation_id,
                        reply_to, traceparent, generation)
    VALUES (e.event_id, e.request_id, e.host, e.routing_key, e.body, e.correlation_id,
            e.reply_to, e.traceparent,
            COALESCE((SELECT generation FROM operations WHERE request_id = e.request_id), 0));
$$;

-- Finishes an operation: its terminal journal row (upserted, because a
-- request refused by the decoder never had a running row), its error in the
-- error history, its attachment change and its event in the outbox. Returns
-- false, having written nothing, when the request was already terminal.
-- Called as one statement, it is one transaction.
CREATE FUNCTION volumed_finish(
    p_request_id     uuid,
    p_host           text,
    p_op             text,
    p_volume_id      uuid,
    p_vm_id          uuid,
    p_state          text,
    p_error_code     text,
    p_error_message  text,
    p_retryable      boolean,
    p_change         volumed_change,
    p_event          volumed_event
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_generation integer;
    v_attempts   integer;
BEGIN
    INSERT INTO operations (request_id, host, op, volume_id, vm_id, state, step, attempts,
                            error_code, error_message, finished_at)
    VALUES (p_request_id, p_host, p_op, p_volume_id, p_vm_id, p_state, 'committed', 1,
            p_error_code, p_error_message, now())
    ON CONFLICT (request_id) DO UPDATE
       SET state = EXCLUDED.state, step = 'committed', error_code = EXCLUDED.error_code,
           error_message = EXCLUDED.error_message, updated_at = now(), finished_at = now()
     WHERE operations.state = 'running'
    RETURNING generation, attempts INTO v_generation, v_attempts;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_error_code IS NOT NULL THEN
        INSERT INTO operation_errors (request_id, generation, attempt, code, message, retryable)
        VALUES (p_request_id, v_generation, v_attempts, p_error_code, p_error_message,
                p_retryable);
    END IF;
    PERFORM volumed_apply_change(p_host, p_request_id, p_change);
    PERFORM volumed_insert_event(p_event);
    RETURN true;
END
$$;
