//! The dead-letter store: the daemon consumes `volumed.dead.<host>` and
//! keeps each message in PostgreSQL with its reason, headers and body,
//! acknowledging only after the commit. Operators list, inspect, replay and
//! purge them with `volumed dlq`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde_json::{json, Map, Value};
use sqlx::{PgPool, Row as _};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::Config;
use crate::consumer::{
    ERROR_CODE_HEADER, ERROR_HEADER, ORIGINAL_KEY_HEADER, REASON_HEADER, RETRIES_HEADER,
};
use crate::contract::parse_uuid;
use crate::topology::{self, REQUESTS_EXCHANGE};
use crate::worker::db_retry;

/// Header a replayed message carries: how many times it was replayed.
pub const REPLAY_HEADER: &str = "x-volumed-replay";
pub const REPLAYED_BY_HEADER: &str = "x-volumed-replayed-by";

/// Consumes the host's dead-letter queue into the store until `stop`.
pub async fn ingest(config: Arc<Config>, pool: PgPool, stop: CancellationToken) -> Result<()> {
    const FIRST: Duration = Duration::from_millis(200);
    let mut delay = FIRST;
    loop {
        let mut connected = false;
        match ingest_once(&config, &pool, &stop, &mut connected).await {
            Ok(()) => return Ok(()),
            Err(e) => warn!(host = %config.host_id, cause = %format!("{e:#}"), retry_in = ?delay,
                            "dead-letter ingester interrupted; reconnecting"),
        }
        if connected {
            delay = FIRST;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn ingest_once(
    config: &Config,
    pool: &PgPool,
    stop: &CancellationToken,
    connected: &mut bool,
) -> Result<()> {
    let conn = crate::amqp::connect_with(
        &config.amqp_url,
        &config.amqp_tls,
        &format!("volumed-dead-letters {}", config.host_id),
    )
    .await?;
    let ch = conn.create_channel().await?;
    // Declared here too (idempotent): at start-up the ingester may connect
    // before the request consumer has declared the topology.
    topology::Topology::for_host(&config.host_id, config.delivery_limit, &config.retry_delays)
        .declare(&ch)
        .await?;
    ch.basic_qos(32, BasicQosOptions::default()).await?;
    let queue = topology::dead_queue(&config.host_id);
    let mut deliveries = ch
        .basic_consume(
            &queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming {queue}"))?;
    *connected = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = conn.close(200, "volumed stopping").await;
                return Ok(());
            }
            next = deliveries.next() => match next {
                Some(Ok(d)) => {
                    let record = DeadLetter::from_delivery(&config.host_id, &d);
                    // Committed before the ack: a dead letter is never lost
                    // between the queue and the store.
                    let id = db_retry("store dead letter", || record.store(pool)).await?;
                    info!(dead_letter.id = id, message.id = record.message_id.as_deref().unwrap_or("-"),
                          reason = %record.reason, host = %config.host_id, "dead letter stored");
                    d.acker.ack(BasicAckOptions::default()).await?;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(anyhow!("the broker cancelled the dead-letter consumer")),
            }
        }
    }
}

/// A dead letter as it is stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub host: String,
    pub message_id: Option<String>,
    pub request_id: Option<Uuid>,
    pub volume_id: Option<Uuid>,
    pub reason: String,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub original_exchange: String,
    pub original_routing_key: String,
    pub headers: Value,
    pub properties: Value,
    pub body: Vec<u8>,
    pub death_count: i32,
}

impl DeadLetter {
    /// Reads what the message says about itself: volumed's headers when
    /// volumed dead-lettered it, the broker's `x-death` otherwise.
    pub fn from_delivery(host: &str, d: &Delivery) -> DeadLetter {
        let headers = d.properties.headers().clone().unwrap_or_default();
        let text = |k: &str| match headers.inner().get(k) {
            Some(AMQPValue::LongString(s)) => Some(clean(&s.to_string())),
            Some(AMQPValue::ShortString(s)) => Some(clean(s.as_str())),
            _ => None,
        };
        let death = match headers.inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => match a.as_slice().first() {
                Some(AMQPValue::FieldTable(t)) => Some(t.clone()),
                _ => None,
            },
            _ => None,
        };
        let death_text = |k: &str| -> Option<String> {
            death.as_ref().and_then(|t| match t.inner().get(k) {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
                _ => None,
            })
        };
        let death_key = death
            .as_ref()
            .and_then(|t| match t.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(a)) => a.as_slice().iter().find_map(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                }),
                _ => None,
            });
        let death_count = death
            .as_ref()
            .and_then(|t| match t.inner().get("count") {
                Some(AMQPValue::LongLongInt(n)) => i32::try_from(*n).ok(),
                Some(AMQPValue::LongInt(n)) => Some(*n),
                _ => None,
            })
            .unwrap_or(1);
        let body: Option<Value> = serde_json::from_slice(&d.data).ok();
        let body_uuid = |k: &str| {
            body.as_ref()
                .and_then(|b| b.get(k))
                .and_then(Value::as_str)
                .and_then(parse_uuid)
        };
        let message_id = d
            .properties
            .message_id()
            .as_ref()
            .map(|m| clean(m.as_str()));
        DeadLetter {
            host: host.to_owned(),
            request_id: message_id
                .as_deref()
                .and_then(parse_uuid)
                .or_else(|| body_uuid("request_id")),
            volume_id: body_uuid("volume_id"),
            message_id,
            reason: text(REASON_HEADER)
                .or_else(|| death_text("reason"))
                .unwrap_or_else(|| "unknown".into()),
            error_code: text(ERROR_CODE_HEADER),
            error_message: text(ERROR_HEADER),
            // Every request was first published to volumed.requests with
            // the host as routing key; the x-death entries may name a retry
            // queue it passed through instead, which is not where a replay
            // belongs.
            original_exchange: REQUESTS_EXCHANGE.into(),
            original_routing_key: text(ORIGINAL_KEY_HEADER)
                .or(death_key.filter(|k| k.as_str() == host))
                .unwrap_or_else(|| host.to_owned()),
            headers: field_table_json(&headers),
            properties: properties_json(&d.properties),
            body: d.data.clone(),
            death_count,
        }
    }

    /// Stores the dead letter; a message still dead from before gets its
    /// row updated. Returns the row id.
    pub async fn store(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO dead_letters (host, message_id, request_id, volume_id, reason, error_code,
                                       error_message, original_exchange, original_routing_key,
                                       headers, properties, body, death_count)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (host, message_id) WHERE status = 'dead' AND message_id IS NOT NULL
             DO UPDATE SET reason = EXCLUDED.reason, error_code = EXCLUDED.error_code,
                           error_message = EXCLUDED.error_message, headers = EXCLUDED.headers,
                           properties = EXCLUDED.properties, body = EXCLUDED.body,
                           death_count = dead_letters.death_count + 1, last_seen = now()
             RETURNING id",
        )
        .bind(&self.host)
        .bind(&self.message_id)
        .bind(self.request_id)
        .bind(self.volume_id)
        .bind(&self.reason)
        .bind(&self.error_code)
        .bind(&self.error_message)
        .bind(&self.original_exchange)
        .bind(&self.original_routing_key)
        .bind(&self.headers)
        .bind(&self.properties)
        .bind(&self.body)
        .bind(self.death_count)
        .fetch_one(pool)
        .await
    }
}

/// PostgreSQL text cannot hold U+0000; a dead letter carrying one is
/// stored with U+FFFD in its place rather than block the queue.
fn clean(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::ShortString(s) => json!(clean(s.as_str())),
        AMQPValue::LongString(s) => json!(clean(&s.to_string())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => field_table_json(t),
        AMQPValue::ByteArray(b) => json!(format!("{b:?}")),
        AMQPValue::Void => Value::Null,
    }
}

fn field_table_json(t: &FieldTable) -> Value {
    let mut m = Map::new();
    for (k, v) in t.inner() {
        m.insert(clean(k.as_str()), amqp_json(v));
    }
    Value::Object(m)
}

fn properties_json(p: &BasicProperties) -> Value {
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| clean(s.as_str()));
    json!({
        "message_id": s(p.message_id()),
        "correlation_id": s(p.correlation_id()),
        "reply_to": s(p.reply_to()),
        "content_type": s(p.content_type()),
        "type": s(p.kind()),
        "delivery_mode": p.delivery_mode(),
    })
}

/// Filters of `dlq list`, `replay --all` and `purge`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub host: Option<String>,
    pub reason: Option<String>,
    pub code: Option<String>,
    pub volume: Option<Uuid>,
    /// Only dead letters first seen before this instant.
    pub before: Option<DateTime<Utc>>,
    /// Only dead letters first seen after this instant.
    pub after: Option<DateTime<Utc>>,
    /// `dead` (default), `replayed`, or any.
    pub status: Option<String>,
    pub ids: Vec<i64>,
}

/// A stored dead letter as listed.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Stored {
    pub id: i64,
    pub host: String,
    pub message_id: Option<String>,
    pub request_id: Option<Uuid>,
    pub volume_id: Option<Uuid>,
    pub reason: String,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub original_exchange: String,
    pub original_routing_key: String,
    pub headers: Value,
    pub properties: Value,
    #[serde(skip)]
    pub body: Vec<u8>,
    pub death_count: i32,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub status: String,
    pub replayed_at: Option<DateTime<Utc>>,
}

const SELECT: &str = "SELECT id, host, message_id, request_id, volume_id, reason, error_code,
        error_message, original_exchange, original_routing_key, headers, properties, body,
        death_count, first_seen, last_seen, status, replayed_at FROM dead_letters";

const WHERE: &str = " WHERE ($1::text IS NULL OR host = $1)
          AND ($2::text IS NULL OR reason = $2)
          AND ($3::text IS NULL OR error_code = $3)
          AND ($4::uuid IS NULL OR volume_id = $4)
          AND ($5::timestamptz IS NULL OR first_seen < $5)
          AND ($6::timestamptz IS NULL OR first_seen > $6)
          AND ($7::text = 'any' OR status = $7)
          AND (cardinality($8::bigint[]) = 0 OR id = ANY($8))";

fn bind<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    f: &'q Filter,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    q.bind(&f.host)
        .bind(&f.reason)
        .bind(&f.code)
        .bind(f.volume)
        .bind(f.before)
        .bind(f.after)
        .bind(f.status.clone().unwrap_or_else(|| "dead".into()))
        .bind(&f.ids)
}

pub async fn list(pool: &PgPool, f: &Filter) -> Result<Vec<Stored>, sqlx::Error> {
    let sql = format!("{SELECT}{WHERE} ORDER BY id");
    bind(sqlx::query_as::<_, Stored>(&sql), f)
        .fetch_all(pool)
        .await
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<Stored>, sqlx::Error> {
    let sql = format!("{SELECT} WHERE id = $1");
    sqlx::query_as::<_, Stored>(&sql)
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// The replays recorded for a dead letter.
pub async fn replays(
    pool: &PgPool,
    id: i64,
) -> Result<Vec<(DateTime<Utc>, String, String)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT replayed_at, replayed_by, routing_key FROM dead_letter_replays
          WHERE dead_letter_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}

/// Deletes the dead letters matching `f`; returns how many.
pub async fn purge(pool: &PgPool, f: &Filter) -> Result<u64, sqlx::Error> {
    let sql = format!("DELETE FROM dead_letters{WHERE} RETURNING id");
    let gone: Vec<(i64,)> = bind(sqlx::query_as(&sql), f).fetch_all(pool).await?;
    Ok(gone.len() as u64)
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    Republished,
    /// The request finished since (its terminal event exists): replaying
    /// it would do nothing, so it is not republished.
    AlreadyDone {
        state: String,
    },
    AlreadyReplayed,
}

/// The journal state of a dead letter's request, if terminal. Only a
/// success makes a replay pointless; a failed request is replayed.
pub async fn finished_state(pool: &PgPool, row: &Stored) -> Result<Option<String>, sqlx::Error> {
    let Some(id) = row.request_id else {
        return Ok(None);
    };
    sqlx::query_scalar(
        "SELECT state FROM operations WHERE request_id = $1 AND state IN ('succeeded', 'failed')",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Republishes one dead letter to its original routing key with confirms,
/// keeping its message id, with the retry budget reset and a replay header;
/// marks it replayed and records the replay only after the confirm.
pub async fn replay(pool: &PgPool, ch: &Channel, row: &Stored, by: &str) -> Result<Replayed> {
    if row.status != "dead" {
        return Ok(Replayed::AlreadyReplayed);
    }
    match finished_state(pool, row).await?.as_deref() {
        Some("succeeded") => {
            return Ok(Replayed::AlreadyDone {
                state: "succeeded".into(),
            })
        }
        Some(_) => {
            // Failed (its budget spent, say): the replay is a new life of
            // the request. The journal is reopened before the message is
            // republished, or the daemon would take the replay for a
            // redelivery of a finished request.
            if let Some(id) = row.request_id {
                sqlx::query(
                    "UPDATE operations SET state = 'running', step = 'replayed',
                            generation = generation + 1, finished_at = NULL,
                            error_code = NULL, error_message = NULL, cloud_job_id = NULL,
                            updated_at = now()
                      WHERE request_id = $1 AND state = 'failed'",
                )
                .bind(id)
                .execute(pool)
                .await?;
            }
        }
        None => {}
    }
    let mut headers = FieldTable::default();
    if let Value::Object(h) = &row.headers {
        for (k, v) in h {
            // The broker's and volumed's bookkeeping of the earlier life
            // goes; the retry budget starts over.
            let drop = k == "x-death"
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death")
                || k == "x-delivery-count"
                || k == RETRIES_HEADER
                || k == REASON_HEADER
                || k == ERROR_CODE_HEADER
                || k == ERROR_HEADER
                || k == ORIGINAL_KEY_HEADER;
            if drop {
                continue;
            }
            let value = match v {
                Value::String(s) => AMQPValue::LongString(s.as_str().into()),
                Value::Number(n) if n.is_i64() => AMQPValue::LongLongInt(n.as_i64().unwrap_or(0)),
                Value::Bool(b) => AMQPValue::Boolean(*b),
                other => AMQPValue::LongString(other.to_string().as_str().into()),
            };
            headers.insert(k.as_str().into(), value);
        }
    }
    let previous: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letter_replays WHERE message_id IS NOT DISTINCT FROM $1",
    )
    .bind(&row.message_id)
    .fetch_one(pool)
    .await?;
    headers.insert(REPLAY_HEADER.into(), AMQPValue::LongLongInt(previous + 1));
    headers.insert(REPLAYED_BY_HEADER.into(), AMQPValue::LongString(by.into()));
    let p = &row.properties;
    let text = |k: &str| p.get(k).and_then(Value::as_str).map(|s| s.to_owned());
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_content_type(
            text("content_type")
                .unwrap_or_else(|| "application/json".into())
                .into(),
        );
    if let Some(v) = text("message_id") {
        props = props.with_message_id(v.into());
    }
    if let Some(v) = text("correlation_id") {
        props = props.with_correlation_id(v.into());
    }
    if let Some(v) = text("reply_to") {
        props = props.with_reply_to(v.into());
    }
    let confirm = ch
        .basic_publish(
            &row.original_exchange,
            &row.original_routing_key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &row.body,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => {}
        Confirmation::Ack(Some(_)) => {
            return Err(anyhow!(
                "no queue takes {} / {}: is the daemon for that host set up?",
                row.original_exchange,
                row.original_routing_key
            ))
        }
        Confirmation::Nack(_) => return Err(anyhow!("the broker refused the replay")),
    }
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE dead_letters SET status = 'replayed', replayed_at = now() WHERE id = $1")
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO dead_letter_replays (dead_letter_id, message_id, request_id, routing_key, replayed_by)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(row.id)
    .bind(&row.message_id)
    .bind(row.request_id)
    .bind(&row.original_routing_key)
    .bind(by)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Replayed::Republished)
}

/// A confirm-mode channel for replays.
pub async fn replay_channel(config: &Config) -> Result<(lapin::Connection, Channel)> {
    let conn =
        crate::amqp::connect_with(&config.amqp_url, &config.amqp_tls, "volumed-dlq-replay").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}
