//! PostgreSQL: the pool, migrations, and the journal / attachment / outbox
//! statements. Every statement that finishes an operation runs in one
//! transaction with the outbox insert (the transactional outbox).

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::config::SecretUrl;
use crate::contract::{ErrorCode, Event, Op, Request};

/// The channel the outbox relay listens on; the payload is the host id.
pub const OUTBOX_CHANNEL: &str = "volumed_outbox";

/// Rung after every commit of this process that finishes an operation
/// (with its event in the outbox): the relay of this process wakes on it.
/// Commits of other processes (another daemon of the host, the CLI's
/// repairs) reach it by the `volumed_outbox` notification or its poll.
pub static OUTBOX_BELL: tokio::sync::Notify = tokio::sync::Notify::const_new();

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool. `max` should cover the workers plus the relay and its
/// listener.
pub async fn connect(url: &SecretUrl, max: u32) -> Result<PgPool> {
    let opts: PgConnectOptions = url
        .expose()
        .parse()
        .with_context(|| format!("invalid database URL {url}"))?;
    pool_with(url, opts, max).await
}

/// A pool whose commits do not wait for the write-ahead log to reach the
/// disk (`synchronous_commit = off`), for records whose loss in a crash of
/// PostgreSQL itself costs nothing: the journal's start of an operation
/// (its message is not acknowledged yet and comes back), the steps it
/// reached, the relay's "sent" marks (the event is published again, with
/// the same `event_id`). PostgreSQL writes its log in order, so any later
/// ordinary commit (the one that finishes an operation, say) makes these
/// durable too. Outcomes never go through this pool.
pub async fn connect_relaxed(url: &SecretUrl, max: u32) -> Result<PgPool> {
    let opts: PgConnectOptions = url
        .expose()
        .parse()
        .with_context(|| format!("invalid database URL {url}"))?;
    pool_with(url, opts.options([("synchronous_commit", "off")]), max).await
}

async fn pool_with(url: &SecretUrl, opts: PgConnectOptions, max: u32) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max)
        // A statement waits at most this long for a connection; past it the
        // caller sees an error and retries, rather than hanging forever.
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts.application_name("volumed"))
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {url}"))
}

/// Applies this build's migrations that the database lacks. Migrations
/// of a later release that the database already has are left alone: they
/// only add to the schema (expand, then contract), so this build runs on
/// it, which is what lets a release be rolled back without touching the
/// database.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run(pool)
        .await
        .context("applying database migrations")
}

/// Checks, without changing anything, that every migration of this build
/// has been applied: for a daemon whose database role may not change the
/// schema (`VOLUMED_DATABASE_MIGRATE=false`). Needs only `SELECT` on
/// `_sqlx_migrations`.
pub async fn check_migrated(pool: &PgPool) -> Result<()> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .context(
                "cannot read the applied migrations (_sqlx_migrations): run `volumed migrate` \
                 with a role that may change the schema",
            )?;
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the database schema is behind this build (missing: {}); \
             VOLUMED_DATABASE_MIGRATE=false, so run `volumed migrate` first",
            missing.join(", ")
        );
    }
    Ok(())
}

/// What the journal says about a request when a worker picks it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// First or renewed attempt: the number of this attempt, and the
    /// backend job an earlier attempt started, if any.
    Run {
        attempts: i32,
        cloud_job: Option<String>,
    },
    /// Already terminal: its event is in the outbox; do nothing.
    Done { state: String },
    /// The id is journalled for a different operation or volume.
    Conflict { existing: String },
}

/// Records that a worker starts (or restarts after a crash) a request, in
/// one statement. A terminal row is left untouched, which is what makes a
/// redelivered request a no-op. The group of one of [`start_operations`].
pub async fn start_operation(
    pool: &PgPool,
    host: &str,
    req: &Request,
) -> Result<Start, sqlx::Error> {
    let mut started = start_operations(pool, host, std::slice::from_ref(req)).await?;
    started
        .pop()
        .ok_or_else(|| sqlx::Error::Protocol("no answer for a journal start".into()))
}

/// Why the journal did not start `req`: it already finished, or its id
/// names another operation.
async fn not_started(pool: &PgPool, req: &Request) -> Result<Start, sqlx::Error> {
    let (state, op, volume): (String, String, Option<Uuid>) =
        sqlx::query_as("SELECT state, op, volume_id FROM operations WHERE request_id = $1")
            .bind(req.request_id)
            .fetch_one(pool)
            .await?;
    if op != req.op.as_str() || volume != Some(req.volume_id) {
        let volume = volume.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        return Ok(Start::Conflict {
            existing: format!("{op} of volume {volume} ({state})"),
        });
    }
    Ok(Start::Done { state })
}

/// [`start_operation`] for several requests in one statement (on a pool
/// whose commits need not wait for the disk, see [`connect_relaxed`]). The
/// answers are in the order of `reqs`. A request the statement did not
/// start (already terminal, or its id taken by another operation) is then
/// looked up, which changes nothing: the statement's update skips such
/// rows.
///
/// Two requests with the same id in one group make the statement fail
/// (a row cannot be changed twice by it), as does any other error; it has
/// then written nothing, and the caller starts the requests one by one.
pub async fn start_operations(
    pool: &PgPool,
    host: &str,
    reqs: &[Request],
) -> Result<Vec<Start>, sqlx::Error> {
    let ids: Vec<Uuid> = reqs.iter().map(|r| r.request_id).collect();
    let ops: Vec<&str> = reqs.iter().map(|r| r.op.as_str()).collect();
    let volumes: Vec<Uuid> = reqs.iter().map(|r| r.volume_id).collect();
    let vms: Vec<Option<Uuid>> = reqs.iter().map(|r| r.vm_id).collect();
    let jobs: Vec<Option<&str>> = reqs.iter().map(|r| r.job_id.as_deref()).collect();
    let metadata: Vec<&serde_json::Value> = reqs.iter().map(|r| &r.metadata).collect();
    let rows = sqlx::query(
        "INSERT INTO operations (request_id, host, op, volume_id, vm_id, state, job_id, metadata)
         SELECT t.request_id, $2, t.op, t.volume_id, t.vm_id, 'running', t.job_id, t.metadata
           FROM unnest($1::uuid[], $3::text[], $4::uuid[], $5::uuid[], $6::text[], $7::jsonb[])
                AS t(request_id, op, volume_id, vm_id, job_id, metadata)
         ON CONFLICT (request_id) DO UPDATE
            SET attempts = operations.attempts + 1, updated_at = now()
            WHERE operations.state = 'running' AND operations.op = EXCLUDED.op
              AND operations.volume_id IS NOT DISTINCT FROM EXCLUDED.volume_id
         RETURNING request_id, attempts, cloud_job_id",
    )
    .bind(&ids)
    .bind(host)
    .bind(&ops)
    .bind(&volumes)
    .bind(&vms)
    .bind(&jobs)
    .bind(&metadata)
    .fetch_all(pool)
    .await?;
    let mut started = std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        let id: Uuid = r.try_get("request_id")?;
        started.insert(
            id,
            Start::Run {
                attempts: r.try_get("attempts")?,
                cloud_job: r.try_get("cloud_job_id")?,
            },
        );
    }
    let mut out = Vec::with_capacity(reqs.len());
    for req in reqs {
        match started.remove(&req.request_id) {
            Some(s) => out.push(s),
            None => out.push(not_started(pool, req).await?),
        }
    }
    Ok(out)
}

/// Records the steps several running operations reached, in one statement.
pub async fn record_steps(pool: &PgPool, ids: &[Uuid], steps: &[&str]) -> Result<(), sqlx::Error> {
    // Rows locked by a statement that is finishing (or starting) their
    // operation are skipped: such a step is moot, and waiting for them
    // could deadlock against a grouped finish that locks the same rows in
    // another order.
    sqlx::query(
        "WITH v AS (SELECT unnest($1::uuid[]) AS id, unnest($2::text[]) AS step),
              free AS (SELECT request_id FROM operations
                        WHERE request_id = ANY($1) AND state = 'running'
                          FOR UPDATE SKIP LOCKED)
         UPDATE operations o SET step = v.step, updated_at = now()
           FROM v JOIN free ON free.request_id = v.id
          WHERE o.request_id = v.id",
    )
    .bind(ids)
    .bind(steps)
    .execute(pool)
    .await?;
    Ok(())
}

/// Journals a transient failure whose request will be retried, and adds
/// it to the request's error history in the same statement. The job of the
/// failed attempt is forgotten: the retry starts over from a re-read.
pub async fn record_retry(
    pool: &PgPool,
    request_id: Uuid,
    code: ErrorCode,
    message: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH o AS (
            UPDATE operations SET step = 'retry_scheduled', error_code = $2, error_message = $3,
                   cloud_job_id = NULL, updated_at = now()
             WHERE request_id = $1 AND state = 'running'
         RETURNING request_id, generation, attempts)
         INSERT INTO operation_errors (request_id, generation, attempt, code, message, retryable)
         SELECT request_id, generation, attempts, $2, $3, $4 FROM o",
    )
    .bind(request_id)
    .bind(code.as_str())
    .bind(message)
    .bind(code.retryable())
    .execute(pool)
    .await?;
    Ok(())
}

/// One error of a request's history.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct ErrorEntry {
    pub generation: i32,
    pub attempt: i32,
    pub code: String,
    pub message: String,
    pub retryable: bool,
    pub at: DateTime<Utc>,
}

/// Every error a request met, oldest first, across its generations.
pub async fn error_history(
    pool: &PgPool,
    request_id: Uuid,
) -> Result<Vec<ErrorEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT generation, attempt, code, message, retryable, at FROM operation_errors
          WHERE request_id = $1 ORDER BY id",
    )
    .bind(request_id)
    .fetch_all(pool)
    .await
}

/// Journals the backend job an operation started, before it is polled.
pub async fn record_cloud_job(
    pool: &PgPool,
    request_id: Uuid,
    job: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE operations SET cloud_job_id = $2, step = 'backend_job_started', updated_at = now()
          WHERE request_id = $1 AND state = 'running'",
    )
    .bind(request_id)
    .bind(job)
    .execute(pool)
    .await?;
    Ok(())
}

/// The attachment change a finished operation makes.
#[derive(Debug, Clone)]
pub enum AttachmentChange {
    None,
    Upsert {
        volume_id: Uuid,
        vm_id: Uuid,
        device_path: Option<String>,
        stable_path: Option<String>,
        /// What happens to the volume's export row.
        export: ExportChange,
    },
    Remove {
        volume_id: Uuid,
    },
    /// The export was withdrawn but the volume stays attached.
    RemoveExport {
        volume_id: Uuid,
    },
}

/// The change to a volume's export row that goes with an attachment.
#[derive(Debug, Clone)]
pub enum ExportChange {
    /// Leave it as it is (the request did not touch exports).
    Keep,
    /// Record this export.
    Set(NewExport),
    /// The export is gone (withdrawn, or undone after a failed check).
    Remove,
}

/// An export to record.
#[derive(Debug, Clone)]
pub struct NewExport {
    pub name: String,
    pub engine: &'static str,
    pub port: u16,
    pub metadata: serde_json::Value,
}

/// An outbox row to write with the terminal state.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub event: Event,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// The W3C `traceparent` header the event is published with.
    pub traceparent: Option<String>,
}

/// How a request ended, as the journal records it.
#[derive(Debug, Clone)]
pub struct Finish {
    pub host: String,
    pub request_id: Uuid,
    pub op: Option<Op>,
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<Uuid>,
    pub error: Option<(ErrorCode, String)>,
    pub change: AttachmentChange,
    pub outgoing: Outgoing,
}

/// Writes the terminal state (with its error in the error history), the
/// attachment change and the outbox event in one transaction, and wakes the
/// relay. Returns false (and writes nothing) when the request was already
/// terminal: its event already exists.
///
/// The group of one of [`finish_operations`]: one statement, so one
/// transaction and one round trip, where the same statements sent one by
/// one cost eight.
pub async fn finish_operation(pool: &PgPool, f: &Finish) -> Result<bool, sqlx::Error> {
    let finished = finish_operations(pool, std::slice::from_ref(f)).await?;
    Ok(finished.first().copied().unwrap_or(false))
}

/// [`finish_operation`] for several operations in one statement, so in one
/// transaction with one commit: all of them are written, or none. The
/// answers are in the order of `fs`. The statement calls the database
/// function `volumed_finish_group` (migration `finish_groups_set_based`),
/// which writes each table once for the whole group, or hands a group of
/// one or two to `volumed_finish`, whose statements cost less for so few.
///
/// The operations of one group must not touch the same rows (the workers'
/// lanes run one operation per volume at a time, so they do not); a
/// statement that fails, whatever the reason, has written nothing, and the
/// caller can finish the operations one by one to learn which one failed.
pub async fn finish_operations(pool: &PgPool, fs: &[Finish]) -> Result<Vec<bool>, sqlx::Error> {
    if fs.is_empty() {
        return Ok(Vec::new());
    }
    let mut c = FinishColumns::default();
    for f in fs {
        c.push(f)?;
    }
    // No NOTIFY here: PostgreSQL holds a lock over every notifying commit
    // until its log record is on disk, which would make concurrent
    // finishes wait for each other's flushes rather than share one.
    let rows = c
        .bind(sqlx::query(
            "SELECT n FROM volumed_finish_group(
                $1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
                $7::text[], $8::text[], $9::bool[],
                ARRAY(SELECT ROW(kind, volume_id, vm_id, device_path, stable_path, export,
                                 export_name, engine, port, metadata)::volumed_change
                        FROM unnest($10::text[], $11::uuid[], $12::uuid[], $13::text[],
                                    $14::text[], $15::text[], $16::text[], $17::text[],
                                    $18::int4[], $19::jsonb[])
                             WITH ORDINALITY
                             AS c(kind, volume_id, vm_id, device_path, stable_path, export,
                                  export_name, engine, port, metadata, i)
                       ORDER BY i),
                ARRAY(SELECT ROW(event_id, request_id, host, routing_key, body,
                                 correlation_id, reply_to, traceparent)::volumed_event
                        FROM unnest($20::uuid[], $21::uuid[], $22::text[], $23::text[],
                                    $24::jsonb[], $25::text[], $26::text[], $27::text[])
                             WITH ORDINALITY
                             AS e(event_id, request_id, host, routing_key, body,
                                  correlation_id, reply_to, traceparent, i)
                       ORDER BY i)) AS n",
        ))
        .fetch_all(pool)
        .await?;
    let mut finished = vec![false; fs.len()];
    for r in rows {
        // Positions count from 1.
        let n: i32 = r.try_get(0)?;
        if let Some(slot) = usize::try_from(n - 1)
            .ok()
            .and_then(|i| finished.get_mut(i))
        {
            *slot = true;
        }
    }
    if finished.iter().any(|f| *f) {
        OUTBOX_BELL.notify_one();
    }
    Ok(finished)
}

/// The arguments of a `volumed_finish_group` call: one array per
/// parameter, each with an element per operation, in the order of the
/// function's parameters and of the fields of `volumed_change` and
/// `volumed_event`.
#[derive(Default)]
struct FinishColumns<'a> {
    request_id: Vec<Uuid>,
    host: Vec<&'a str>,
    op: Vec<&'static str>,
    volume_id: Vec<Option<Uuid>>,
    vm_id: Vec<Option<Uuid>>,
    state: Vec<&'static str>,
    code: Vec<Option<&'static str>>,
    message: Vec<Option<&'a str>>,
    retryable: Vec<Option<bool>>,
    kind: Vec<&'static str>,
    c_volume_id: Vec<Option<Uuid>>,
    c_vm_id: Vec<Option<Uuid>>,
    device_path: Vec<Option<&'a str>>,
    stable_path: Vec<Option<&'a str>>,
    export: Vec<Option<&'static str>>,
    export_name: Vec<Option<&'a str>>,
    engine: Vec<Option<&'static str>>,
    port: Vec<Option<i32>>,
    metadata: Vec<Option<serde_json::Value>>,
    event_id: Vec<Uuid>,
    e_request_id: Vec<Uuid>,
    e_host: Vec<&'a str>,
    routing_key: Vec<&'static str>,
    body: Vec<serde_json::Value>,
    correlation_id: Vec<Option<&'a str>>,
    reply_to: Vec<Option<&'a str>>,
    traceparent: Vec<Option<&'a str>>,
}

impl<'a> FinishColumns<'a> {
    /// Binds the columns as `$1` to `$27`, in the order of the fields.
    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.request_id)
            .bind(&self.host)
            .bind(&self.op)
            .bind(&self.volume_id)
            .bind(&self.vm_id)
            .bind(&self.state)
            .bind(&self.code)
            .bind(&self.message)
            .bind(&self.retryable)
            .bind(&self.kind)
            .bind(&self.c_volume_id)
            .bind(&self.c_vm_id)
            .bind(&self.device_path)
            .bind(&self.stable_path)
            .bind(&self.export)
            .bind(&self.export_name)
            .bind(&self.engine)
            .bind(&self.port)
            .bind(&self.metadata)
            .bind(&self.event_id)
            .bind(&self.e_request_id)
            .bind(&self.e_host)
            .bind(&self.routing_key)
            .bind(&self.body)
            .bind(&self.correlation_id)
            .bind(&self.reply_to)
            .bind(&self.traceparent)
    }

    fn push(&mut self, f: &'a Finish) -> Result<(), sqlx::Error> {
        let out = &f.outgoing;
        self.request_id.push(f.request_id);
        self.host.push(&f.host);
        self.op.push(f.op.map(Op::as_str).unwrap_or("unknown"));
        self.volume_id.push(f.volume_id);
        self.vm_id.push(f.vm_id);
        self.state.push(if f.error.is_none() {
            "succeeded"
        } else {
            "failed"
        });
        self.code.push(f.error.as_ref().map(|(c, _)| c.as_str()));
        self.message.push(f.error.as_ref().map(|(_, m)| m.as_str()));
        // The event's error says whether it may pass; an error without one
        // falls back to its code's class.
        self.retryable.push(f.error.as_ref().map(|(code, _)| {
            out.event
                .error
                .as_ref()
                .map_or(code.retryable(), |e| e.retryable)
        }));
        let c = ChangeArgs::of(&f.change);
        self.kind.push(c.kind);
        self.c_volume_id.push(c.volume_id);
        self.c_vm_id.push(c.vm_id);
        self.device_path.push(c.device_path);
        self.stable_path.push(c.stable_path);
        self.export.push(c.export);
        self.export_name.push(c.export_name);
        self.engine.push(c.engine);
        self.port.push(c.port);
        self.metadata.push(c.metadata.cloned());
        self.event_id.push(out.event.event_id);
        self.e_request_id.push(out.event.request_id);
        self.e_host.push(&out.event.host);
        self.routing_key.push(out.event.event_type.as_str());
        self.body.push(event_body(&out.event)?);
        self.correlation_id.push(out.correlation_id.as_deref());
        self.reply_to.push(out.reply_to.as_deref());
        self.traceparent.push(out.traceparent.as_deref());
        Ok(())
    }
}

/// An [`AttachmentChange`] as the fields of the database type
/// `volumed_change`.
struct ChangeArgs<'a> {
    kind: &'static str,
    volume_id: Option<Uuid>,
    vm_id: Option<Uuid>,
    device_path: Option<&'a str>,
    stable_path: Option<&'a str>,
    export: Option<&'static str>,
    export_name: Option<&'a str>,
    engine: Option<&'static str>,
    port: Option<i32>,
    metadata: Option<&'a serde_json::Value>,
}

impl<'a> ChangeArgs<'a> {
    fn of(change: &'a AttachmentChange) -> ChangeArgs<'a> {
        let mut a = ChangeArgs {
            kind: "none",
            volume_id: None,
            vm_id: None,
            device_path: None,
            stable_path: None,
            export: None,
            export_name: None,
            engine: None,
            port: None,
            metadata: None,
        };
        match change {
            AttachmentChange::None => {}
            AttachmentChange::Upsert {
                volume_id,
                vm_id,
                device_path,
                stable_path,
                export,
            } => {
                a.kind = "upsert";
                a.volume_id = Some(*volume_id);
                a.vm_id = Some(*vm_id);
                a.device_path = device_path.as_deref();
                a.stable_path = stable_path.as_deref();
                a.export = Some(match export {
                    ExportChange::Keep => "keep",
                    ExportChange::Set(_) => "set",
                    ExportChange::Remove => "remove",
                });
                if let ExportChange::Set(e) = export {
                    a.export_name = Some(&e.name);
                    a.engine = Some(e.engine);
                    a.port = Some(i32::from(e.port));
                    a.metadata = Some(&e.metadata);
                }
            }
            AttachmentChange::Remove { volume_id } => {
                a.kind = "remove";
                a.volume_id = Some(*volume_id);
            }
            AttachmentChange::RemoveExport { volume_id } => {
                a.kind = "remove_export";
                a.volume_id = Some(*volume_id);
            }
        }
        a
    }

    /// Binds the change's fields, in the order of `volumed_change`.
    fn bind_to<'q>(self, q: PgQuery<'q>) -> PgQuery<'q>
    where
        'a: 'q,
    {
        q.bind(self.kind)
            .bind(self.volume_id)
            .bind(self.vm_id)
            .bind(self.device_path)
            .bind(self.stable_path)
            .bind(self.export)
            .bind(self.export_name)
            .bind(self.engine)
            .bind(self.port)
            .bind(self.metadata)
    }
}

/// Applies an attachment change in the caller's transaction (the
/// reconciler's repairs; operations go through [`finish_operation`]).
pub async fn apply_change(
    tx: &mut Transaction<'_, Postgres>,
    host: &str,
    request_id: Uuid,
    change: &AttachmentChange,
) -> Result<(), sqlx::Error> {
    let query = sqlx::query(
        "SELECT volumed_apply_change($1, $2,
                ROW($3, $4, $5, $6, $7, $8, $9, $10, $11, $12)::volumed_change)",
    )
    .bind(host)
    .bind(request_id);
    ChangeArgs::of(change)
        .bind_to(query)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Writes an event that finishes no request (a reconciler repair) to the
/// outbox, in the caller's transaction, and notifies every relay once that
/// commits: repairs are rare and may come from the CLI.
pub async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    event: &Event,
) -> Result<(), sqlx::Error> {
    let out = Outgoing {
        event: event.clone(),
        correlation_id: None,
        reply_to: None,
        traceparent: None,
    };
    let query = sqlx::query(
        "SELECT volumed_insert_event(ROW($1, $2, $3, $4, $5, $6, $7, $8)::volumed_event),
                pg_notify($9, $3)",
    );
    bind_outgoing(query, &out)?
        .bind(OUTBOX_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Binds an outbox row's fields, in the order of the type `volumed_event`.
fn bind_outgoing<'q>(q: PgQuery<'q>, out: &'q Outgoing) -> Result<PgQuery<'q>, sqlx::Error> {
    let body = event_body(&out.event)?;
    Ok(q.bind(out.event.event_id)
        .bind(out.event.request_id)
        .bind(&out.event.host)
        .bind(out.event.event_type.as_str())
        .bind(body)
        .bind(&out.correlation_id)
        .bind(&out.reply_to)
        .bind(&out.traceparent))
}

/// An event as the outbox keeps it.
fn event_body(event: &Event) -> Result<serde_json::Value, sqlx::Error> {
    serde_json::to_value(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// One pending outbox row.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub id: i64,
    pub event_id: Uuid,
    pub request_id: Uuid,
    pub routing_key: String,
    pub body: serde_json::Value,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub traceparent: Option<String>,
}

/// Takes up to `limit` unsent events of a host, oldest first, and marks
/// them sent, in the caller's transaction: the mark only becomes visible
/// when the caller commits, which it does after the broker confirmed them
/// (a batch whose publishing fails is rolled back, and its rows are
/// pending again). The rows stay locked until then; rows locked by another
/// relay are skipped, so two relays never publish the same batch. Rows the
/// broker refused, or could not route, are told apart afterwards with
/// [`settle_claimed`].
pub async fn claim_pending(
    tx: &mut Transaction<'_, Postgres>,
    host: &str,
    limit: i64,
) -> Result<Vec<PendingEvent>, sqlx::Error> {
    // The batch is picked by an ARRAY(...) subquery, which PostgreSQL runs
    // once, before the update. Written as `id IN (SELECT ... LIMIT ...)`
    // the pick may become the inner side of a nested loop and run again
    // for every row of the outer scan: with statistics taken while the
    // table was empty, that claimed thousands of rows at once (the LIMIT
    // bounds each run, not the statement) and took seconds. The statement
    // is also planned afresh each time (not kept prepared), so the pick
    // follows the table's size as it is, not as it was when a plan was
    // kept: a plan made on an empty outbox reads the whole table for
    // every batch once it has grown.
    let rows = sqlx::query(
        "UPDATE outbox SET sent_at = now(), publish_attempts = publish_attempts + 1
          WHERE id = ANY (ARRAY(SELECT id FROM outbox WHERE host = $1 AND sent_at IS NULL
                                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED))
         RETURNING id, event_id, request_id, routing_key, body, correlation_id, reply_to,
                   traceparent",
    )
    .persistent(false)
    .bind(host)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    let mut pending = rows
        .into_iter()
        .map(|r| {
            Ok(PendingEvent {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                request_id: r.try_get("request_id")?,
                routing_key: r.try_get("routing_key")?,
                body: r.try_get("body")?,
                correlation_id: r.try_get("correlation_id")?,
                reply_to: r.try_get("reply_to")?,
                traceparent: r.try_get("traceparent")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    // RETURNING keeps no order: publish oldest first.
    pending.sort_by_key(|p| p.id);
    Ok(pending)
}

/// Corrects a claimed batch before its commit: rows the broker refused are
/// pending again (their attempt stays counted), rows no queue was bound
/// for are marked unroutable. Nothing to correct costs no statement.
pub async fn settle_claimed(
    tx: &mut Transaction<'_, Postgres>,
    refused: &[i64],
    unroutable: &[i64],
) -> Result<(), sqlx::Error> {
    if refused.is_empty() && unroutable.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE outbox SET sent_at = CASE WHEN id = ANY($1) THEN NULL ELSE sent_at END,
                unroutable = (id = ANY($2))
          WHERE id = ANY($1) OR id = ANY($2)",
    )
    .bind(refused)
    .bind(unroutable)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Unsent events of a host and the age of the oldest, for shutdown and
/// operators.
pub async fn outbox_backlog(
    pool: &PgPool,
    host: &str,
) -> Result<(i64, Option<DateTime<Utc>>), sqlx::Error> {
    let row = sqlx::query(
        "SELECT count(*) AS n, min(created_at) AS oldest FROM outbox
          WHERE host = $1 AND sent_at IS NULL",
    )
    .bind(host)
    .fetch_one(pool)
    .await?;
    Ok((row.try_get("n")?, row.try_get("oldest")?))
}

/// Whether an error is the database being unreachable (worth waiting for)
/// rather than a statement that will fail the same way every time.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        // With TLS built in, sqlx opens every connection with an SSLRequest
        // (sslmode=prefer). A server or proxy that accepts and closes at
        // once (a restart, a pooler whose backend is gone) shows up as a
        // protocol error about that request rather than an I/O error: it is
        // the database being away, not a bad statement.
        sqlx::Error::Protocol(m) => m.contains("SSLRequest"),
        sqlx::Error::Database(db) => {
            // Class 08: connection exception; 57P01..57P03: admin shutdown,
            // crash shutdown, cannot connect now; 40001/40P01: retry.
            let code = db.code().unwrap_or_default();
            code.starts_with("08") || code.starts_with("57P") || code == "40001" || code == "40P01"
        }
        _ => false,
    }
}

/// One recorded export.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ExportRow {
    pub export_name: String,
    pub volume_id: Uuid,
    pub host: String,
    pub engine: String,
    pub device_path: String,
    pub stable_path: String,
    pub port: i32,
    pub request_id: Uuid,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// The exports recorded for a host (every host when `host` is `None`).
pub async fn exports(pool: &PgPool, host: Option<&str>) -> Result<Vec<ExportRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT export_name, volume_id, host, engine, device_path, stable_path, port, request_id,
                metadata, created_at
           FROM nbd_exports WHERE $1::text IS NULL OR host = $1 ORDER BY export_name",
    )
    .bind(host)
    .fetch_all(pool)
    .await
}

/// Export engine counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct NbdStats {
    pub reloads: i64,
    pub restarts: i64,
    pub crashes: i64,
    pub changes: i64,
}

pub async fn bump_nbd_stats(
    pool: &PgPool,
    host: &str,
    engine: &str,
    by: &NbdStats,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO nbd_stats (host, engine, reloads, restarts, crashes, changes)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (host, engine) DO UPDATE
            SET reloads = nbd_stats.reloads + EXCLUDED.reloads,
                restarts = nbd_stats.restarts + EXCLUDED.restarts,
                crashes = nbd_stats.crashes + EXCLUDED.crashes,
                changes = nbd_stats.changes + EXCLUDED.changes,
                updated_at = now()",
    )
    .bind(host)
    .bind(engine)
    .bind(by.reloads)
    .bind(by.restarts)
    .bind(by.crashes)
    .bind(by.changes)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn nbd_stats(
    pool: &PgPool,
    host: &str,
    engine: &str,
) -> Result<Option<NbdStats>, sqlx::Error> {
    sqlx::query_as(
        "SELECT reloads, restarts, crashes, changes FROM nbd_stats
          WHERE host = $1 AND engine = $2",
    )
    .bind(host)
    .bind(engine)
    .fetch_optional(pool)
    .await
}

/// Whether an operation on `volume` is running.
pub async fn volume_busy<'e, E>(e: E, volume: Uuid) -> Result<bool, sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE volume_id = $1 AND state = 'running'",
    )
    .bind(volume)
    .fetch_one(e)
    .await?;
    Ok(n > 0)
}

/// Live exports of a host by engine (for the metrics).
pub async fn export_counts(pool: &PgPool, host: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT engine, count(*) FROM nbd_exports WHERE host = $1 GROUP BY engine")
        .bind(host)
        .fetch_all(pool)
        .await
}

/// The columns of an operation that the HTTP view shows, with its event
/// (when one was written) under `event`.
const OPERATION_VIEW: &str = "
    SELECT o.request_id, o.host, o.op, o.volume_id, o.vm_id, o.state, o.step, o.attempts,
           o.generation, o.error_code, o.error_message, o.job_id, o.cloud_job_id, o.metadata,
           o.created_at, o.updated_at, o.finished_at,
           (SELECT jsonb_build_object('event_id', e.event_id, 'type', e.routing_key,
                                      'created_at', e.created_at, 'sent_at', e.sent_at,
                                      'unroutable', e.unroutable, 'body', e.body)
              FROM outbox e
             WHERE e.request_id = o.request_id AND e.generation = o.generation) AS event
      FROM operations o";

/// One operation as JSON, or `None` when the id is unknown.
pub async fn operation_view(
    pool: &PgPool,
    request_id: Uuid,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(v) FROM ({OPERATION_VIEW} WHERE o.request_id = $1) v"
    ))
    .bind(request_id)
    .fetch_optional(pool)
    .await
}

/// What volumed knows of a volume: its attachment, its export and its
/// latest operations (newest first, at most 20). `None` when it knows
/// nothing.
pub async fn volume_view(
    pool: &PgPool,
    volume_id: Uuid,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    let attachment: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT to_jsonb(a) FROM (SELECT vm_id, host, device_path, stable_path, request_id,
                                         attached_at
                                    FROM volume_attachments WHERE volume_id = $1) a",
    )
    .bind(volume_id)
    .fetch_optional(pool)
    .await?;
    let export: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT to_jsonb(x) FROM (SELECT export_name, host, engine, device_path, stable_path,
                                         port, request_id, created_at
                                    FROM nbd_exports WHERE volume_id = $1) x",
    )
    .bind(volume_id)
    .fetch_optional(pool)
    .await?;
    let operations: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
        "SELECT to_jsonb(v) FROM ({OPERATION_VIEW} WHERE o.volume_id = $1
                                  ORDER BY o.created_at DESC LIMIT 20) v"
    ))
    .bind(volume_id)
    .fetch_all(pool)
    .await?;
    if attachment.is_none() && export.is_none() && operations.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::json!({
        "volume_id": volume_id,
        "attached": attachment.is_some(),
        "attachment": attachment,
        "export": export,
        "operations": operations,
    })))
}

#[cfg(test)]
mod tests {
    use super::is_connection_error;

    #[test]
    fn an_outage_is_told_from_a_bad_statement() {
        // What sqlx reports when the server accepts and closes before
        // answering the TLS request (seen through a cut proxy).
        let refused_tls = sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into());
        assert!(is_connection_error(&refused_tls));
        assert!(is_connection_error(&sqlx::Error::PoolTimedOut));
        assert!(!is_connection_error(&sqlx::Error::Protocol(
            "unknown message type: 'x'".into()
        )));
        assert!(!is_connection_error(&sqlx::Error::RowNotFound));
    }
}
