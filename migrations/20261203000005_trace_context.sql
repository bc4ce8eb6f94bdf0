-- The W3C traceparent each event is published with (same trace id as the
-- request's). Nullable: rows written before this migration, and events
-- that answer no request (reconciler repairs), have none. Adding a
-- nullable column leaves the previous release able to run.
ALTER TABLE outbox ADD COLUMN traceparent text;
