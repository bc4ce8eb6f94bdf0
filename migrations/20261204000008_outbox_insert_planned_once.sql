-- The outbox insert of a finishing operation, planned once per session
-- instead of once per call. `volumed_insert_event` was a function in
-- LANGUAGE sql: PostgreSQL plans the body of such a function again at every
-- call it cannot inline, and one that writes is never inlined, so each
-- finished operation paid a planning of the insert (about a third of its
-- finishing call's time in pg_stat_statements). A PL/pgSQL body keeps its
-- plans for the session. `volumed_finish` also writes its event itself now,
-- with the generation it has just read, rather than through that function
-- and a second look at the journal row.
--
-- Same names, arguments and results as before, and no table changes
-- (expand only): the previous release calls these functions the same way
-- and runs unchanged against this schema. Grants on the functions are kept
-- by CREATE OR REPLACE.

CREATE OR REPLACE FUNCTION volumed_insert_event(e volumed_event)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (event_id, request_id, host, routing_key, body, correlation_id,
                        reply_to, traceparent, generation)
    VALUES (e.event_id, e.request_id, e.host, e.routing_key, e.body, e.correlation_id,
            e.reply_to, e.traceparent,
            COALESCE((SELECT generation FROM operations WHERE request_id = e.request_id), 0));
END
$$;

CREATE OR REPLACE FUNCTION volumed_finish(
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
    -- The event belongs to the generation just finished.
    INSERT INTO outbox (event_id, request_id, host, routing_key, body, correlation_id,
                        reply_to, traceparent, generation)
    VALUES ((p_event).event_id, (p_event).request_id, (p_event).host, (p_event).routing_key,
            (p_event).body, (p_event).correlation_id, (p_event).reply_to,
            (p_event).traceparent, v_generation);
    RETURN true;
END
$$;
