//! The outbox relay: publishes committed events to `volumed.events` (and to
//! a request's `reply_to`) with publisher confirms, and marks a row sent only
//! after the broker confirmed it.
//!
//! It wakes when a worker of its process commits an event
//! ([`db::OUTBOX_BELL`]), on the `volumed_outbox` notification (events
//! written by other processes) and on a poll, so an event is never stuck
//! behind a missed wake-up or a broker outage. Delivery
//! is at-least-once: if the process dies between the confirm and the commit
//! of `sent_at`, the event is published again with the same `event_id`, which
//! is what subscribers deduplicate on.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::db::{self, PendingEvent};
use crate::topology::EVENTS_EXCHANGE;

/// Rows per transaction: their confirms are awaited together, so a batch
/// costs one round of confirms, not one per event.
const BATCH: i64 = 256;

/// How long the relay waits after a commit of its own process before it
/// takes the batch: the events of a burst are published in fewer, larger
/// batches, for at most this much latency per event.
const GATHER: Duration = Duration::from_millis(5);

pub struct Relay {
    pub config: Arc<Config>,
    pub pool: PgPool,
    /// For the batches' transactions: a "sent" mark lost in a crash of
    /// PostgreSQL only means the event is published again (same
    /// `event_id`), so it need not wait for the disk.
    pub relaxed: PgPool,
}

impl Relay {
    /// Publishes until `stop` is cancelled, then drains what is pending (the
    /// caller bounds that with a timeout) and returns.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> Result<()> {
        const FIRST: Duration = Duration::from_millis(200);
        let mut delay = FIRST;
        loop {
            let mut connected = false;
            let result = self.run_once(&stop, &mut connected).await;
            if connected {
                delay = FIRST;
            }
            match result {
                Ok(()) => return Ok(()),
                Err(e) => warn!(host = %self.config.host_id, cause = %format!("{e:#}"),
                                retry_in = ?delay, "outbox relay interrupted; reconnecting"),
            }
            tokio::select! {
                // Stopping while the broker is away: the events stay in the
                // outbox, and the next start publishes them.
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn run_once(&self, stop: &CancellationToken, connected: &mut bool) -> Result<()> {
        let cfg = &self.config;
        let conn = crate::amqp::connect_with(
            &cfg.amqp_url,
            &cfg.amqp_tls,
            &format!("volumed-relay {}", cfg.host_id),
        )
        .await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .context("cannot listen for outbox notifications")?;
        listener.listen(db::OUTBOX_CHANNEL).await?;
        info!(host = %cfg.host_id, "outbox relay connected");
        *connected = true;
        loop {
            self.publish_pending(&ch).await?;
            tokio::select! {
                _ = stop.cancelled() => {
                    self.publish_pending(&ch).await?;
                    let _ = conn.close(200, "volumed stopping").await;
                    return Ok(());
                }
                _ = db::OUTBOX_BELL.notified() => {
                    // Let the finishes of the next few milliseconds join
                    // this batch: a batch costs three statements and a
                    // round of confirms whatever its size.
                    tokio::time::sleep(GATHER).await;
                }
                n = listener.recv() => {
                    if let Err(e) = n {
                        // The listener reconnects on its next call; the
                        // poll below covers the gap.
                        debug!(cause = %e, "outbox listener interrupted");
                        tokio::time::sleep(cfg.outbox_poll_interval).await;
                    }
                }
                _ = tokio::time::sleep(cfg.outbox_poll_interval) => {}
            }
        }
    }

    /// Publishes every pending event of this host, batch by batch.
    pub async fn publish_pending(&self, ch: &Channel) -> Result<usize> {
        let mut total = 0;
        loop {
            let mut tx = self.relaxed.begin().await?;
            // Taken and marked in one statement; the rows stay locked while
            // their confirms are awaited, so a second relay of the same host
            // cannot publish them meanwhile, and the marks show only once
            // the commit below follows the confirms.
            let rows = db::claim_pending(&mut tx, &self.config.host_id, BATCH).await?;
            if rows.is_empty() {
                tx.commit().await?;
                return Ok(total);
            }
            let mut inflight = Vec::with_capacity(rows.len());
            for row in &rows {
                inflight.push(publish(ch, row).await?);
            }
            let mut sent = Vec::new();
            let mut unroutable = Vec::new();
            let mut refused = Vec::new();
            for (row, (main, reply)) in rows.iter().zip(inflight) {
                match main.await? {
                    Confirmation::Ack(None) | Confirmation::NotRequested => sent.push(row.id),
                    Confirmation::Ack(Some(_)) => {
                        // No queue is bound for this event type: nobody
                        // subscribed. The row keeps the event for operators.
                        warn!(event.id = %row.event_id, request.id = %row.request_id,
                              event.type = %row.routing_key,
                              "event unroutable: no queue is bound to volumed.events for it");
                        sent.push(row.id);
                        unroutable.push(row.id);
                    }
                    Confirmation::Nack(_) => {
                        warn!(event.id = %row.event_id, "broker refused the event; will retry");
                        refused.push(row.id);
                    }
                }
                if let Some(reply) = reply {
                    // The reply copy is best effort: a vanished reply queue
                    // must not hold back the event stream.
                    if let Err(e) = reply.await {
                        debug!(event.id = %row.event_id, cause = %e, "reply_to copy not confirmed");
                    }
                }
            }
            db::settle_claimed(&mut tx, &refused, &unroutable).await?;
            tx.commit().await?;
            total += sent.len();
            crate::metrics::get()
                .events_published
                .inc_by(sent.len() as u64);
            debug!(count = sent.len(), "events published");
            if !refused.is_empty() {
                // Try the refused ones at the next poll rather than spin.
                return Ok(total);
            }
            if (rows.len() as i64) < BATCH {
                // That was all there was; what was committed since rang
                // the bell and is taken at the next turn.
                return Ok(total);
            }
        }
    }
}

async fn publish(
    ch: &Channel,
    row: &PendingEvent,
) -> Result<(PublisherConfirm, Option<PublisherConfirm>)> {
    let body = serde_json::to_vec(&row.body)?;
    let mut headers = FieldTable::default();
    if let Some(c) = &row.correlation_id {
        // The request's own correlation id travels as a header; the
        // property carries the request id, as the contract says.
        headers.insert(
            "x-request-correlation-id".into(),
            AMQPValue::LongString(c.as_str().into()),
        );
    }
    if let Some(t) = &row.traceparent {
        headers.insert(
            crate::trace::HEADER.into(),
            AMQPValue::LongString(t.as_str().into()),
        );
    }
    let props = BasicProperties::default()
        .with_message_id(row.event_id.to_string().into())
        .with_correlation_id(row.request_id.to_string().into())
        .with_type(row.routing_key.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let main = ch
        .basic_publish(
            EVENTS_EXCHANGE,
            &row.routing_key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            props.clone(),
        )
        .await?;
    let reply = match &row.reply_to {
        Some(q) => Some(
            ch.basic_publish("", q, BasicPublishOptions::default(), &body, props)
                .await?,
        ),
        None => None,
    };
    Ok((main, reply))
}
