-- The statements that finish an operation, as two functions, so that the
-- daemon finishes an operation in one round trip to the database instead of
-- one per statement. They change nothing in the tables (expand only): the
-- previous release does not call them and runs unchanged against this
-- schema. Both run with the caller's rights.

-- An attachment change: what `volume_attachments` and `nbd_exports` become
-- after an operation or a reconciler repair.
--   p_kind:   'none' | 'upsert' | 'remove' | 'remove_export'
--   p_export: for 'upsert', 'keep' | 'set' | 'remove'
CREATE FUNCTION volumed_apply_change(
    p_host          text,
    p_request_id    uuid,
    p_kind          text,
    p_volume_id     uuid,
    p_vm_id         uuid,
    p_device_path   text,
    p_stable_path   text,
    p_export        text,
    p_export_name   text,
    p_engine        text,
    p_port          integer,
    p_metadata      jsonb
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_kind = 'upsert' THEN
        -- A device path recorded for another volume is stale by definition
        -- (the kernel recycled the name): this volume owns it now.
        IF p_device_path IS NOT NULL THEN
            UPDATE volume_attachments SET device_path = NULL, stable_path = NULL
             WHERE host = p_host AND device_path = p_device_path
               AND volume_id <> p_volume_id;
        END IF;
        INSERT INTO volume_attachments
            (volume_id, vm_id, host, device_path, stable_path, request_id)
        VALUES (p_volume_id, p_vm_id, p_host, p_device_path, p_stable_path, p_request_id)
        ON CONFLICT (volume_id) DO UPDATE
           SET vm_id = EXCLUDED.vm_id, host = EXCLUDED.host,
               device_path = EXCLUDED.device_path, stable_path = EXCLUDED.stable_path,
               request_id = EXCLUDED.request_id, attached_at = now();
        IF p_export = 'remove' THEN
            DELETE FROM nbd_exports WHERE volume_id = p_volume_id;
        ELSIF p_export = 'set' AND p_device_path IS NOT NULL AND p_stable_path IS NOT NULL THEN
            INSERT INTO nbd_exports (export_name, volume_id, host, engine, device_path,
                                     stable_path, port, request_id, metadata)
            VALUES (p_export_name, p_volume_id, p_host, p_engine, p_device_path,
                    p_stable_path, p_port, p_request_id, p_metadata)
            ON CONFLICT (export_name) DO UPDATE
               SET host = EXCLUDED.host, engine = EXCLUDED.engine,
                   device_path = EXCLUDED.device_path,
                   stable_path = EXCLUDED.stable_path, port = EXCLUDED.port,
                   request_id = EXCLUDED.request_id, metadata = EXCLUDED.metadata;
        END IF;
    ELSIF p_kind = 'remove_export' THEN
        DELETE FROM nbd_exports WHERE volume_id = p_volume_id;
    ELSIF p_kind = 'remove' THEN
        DELETE FROM nbd_exports WHERE volume_id = p_volume_id;
        DELETE FROM volume_attachments WHERE volume_id = p_volume_id;
    ELSIF p_kind <> 'none' THEN
        RAISE EXCEPTION 'unknown attachment change %', p_kind;
    END IF;
END
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
    p_kind           text,
    p_change_volume  uuid,
    p_change_vm      uuid,
    p_device_path    text,
    p_stable_path    text,
    p_export         text,
    p_export_name    text,
    p_engine         text,
    p_port           integer,
    p_export_meta    jsonb,
    p_event_id       uuid,
    p_event_request  uuid,
    p_event_host     text,
    p_routing_key    text,
    p_body           jsonb,
    p_correlation_id text,
    p_reply_to       text,
    p_traceparent    text
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
    PERFORM volumed_apply_change(p_host, p_request_id, p_kind, p_change_volume, p_change_vm,
                                 p_device_path, p_stable_path, p_export, p_export_name,
                                 p_engine, p_port, p_export_meta);
    INSERT INTO outbox (event_id, request_id, host, routing_key, body, correlation_id,
                        reply_to, traceparent, generation)
    VALUES (p_event_id, p_event_request, p_event_host, p_routing_key, p_body,
            p_correlation_id, p_reply_to, p_traceparent,
            COALESCE((SELECT generation FROM operations WHERE request_id = p_event_request), 0));
    RETURN true;
END
$$;
