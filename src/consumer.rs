//! The request consumer: receives deliveries, decodes them, hands valid
//! requests to the per-volume lanes and refused ones to the dead letters,
//! and settles every message in one place ([`settle`]) after its outcome is
//! committed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use chrono::Utc;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use lapin::acker::Acker;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};
use uuid::Uuid;

use crate::backend::BackendError;
use crate::config::Config;
use crate::contract::{self, Envelope, ErrorCode, Event, EventError, Rejection};
use crate::db::{self, AttachmentChange, Finish, Outgoing};
use crate::dispatcher::Dispatcher;
use crate::failpoint;
use crate::topology::{self, Topology};
use crate::trace::{self, TraceParent};
use crate::worker::{db_retry, Settle, Worker};

/// How often a closed gate asks the backend whether it accepts volumed's
/// configuration again.
const RECHECK: Duration = Duration::from_secs(30);

/// Header names added to a message this daemon dead-letters itself.
pub const REASON_HEADER: &str = "x-volumed-reason";
pub const ERROR_CODE_HEADER: &str = "x-volumed-error-code";
pub const ERROR_HEADER: &str = "x-volumed-error";
pub const HOST_HEADER: &str = "x-volumed-host";
pub const ORIGINAL_KEY_HEADER: &str = "x-volumed-original-routing-key";
/// How many times volumed retried a request (set on its way to a retry
/// queue; removed by a replay, which resets the budget).
pub const RETRIES_HEADER: &str = "x-volumed-retries";

/// A delivery on its way through a lane.
pub struct Job {
    pub request: contract::Request,
    pub delivery: Delivery,
    dead: Arc<Channel>,
    host: String,
}

/// The consumer's shared state.
pub struct Consumer {
    pub config: Arc<Config>,
    pub worker: Arc<Worker>,
    pub dispatcher: Arc<Dispatcher<Job>>,
}

/// Why the consumer stopped.
#[derive(Debug)]
pub enum Stopped {
    /// Shutdown was asked; the connection is handed back so that in-flight
    /// operations can still acknowledge before it is closed.
    Shutdown(Option<Connection>),
}

impl Consumer {
    /// Consumes until `stop` is cancelled, reconnecting with capped backoff
    /// when the broker goes away. Returns an error only for what a
    /// reconnect cannot fix (a conflicting topology).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> Result<Stopped> {
        const FIRST: Duration = Duration::from_millis(200);
        // Credentials are checked once before the first delivery: a
        // misconfigured daemon should not take messages at all.
        if let Err(BackendError::Config(reason)) = self.worker.backend.check().await {
            self.worker.gate.close(reason).await;
        }
        let mut delay = FIRST;
        loop {
            if stop.is_cancelled() {
                return Ok(Stopped::Shutdown(None));
            }
            let mut connected = false;
            let result = self.consume_once(&stop, &mut connected).await;
            if connected {
                // The last attempt worked for a while: start the backoff over.
                delay = FIRST;
            }
            match result {
                Ok(conn) => return Ok(Stopped::Shutdown(Some(conn))),
                Err(e) if is_precondition_failed(&e) => return Err(e),
                Err(e) => {
                    warn!(host = %self.config.host_id, cause = %format!("{e:#}"), retry_in = ?delay,
                          "request consumer lost the broker; reconnecting");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(Stopped::Shutdown(None)),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn consume_once(
        self: &Arc<Self>,
        stop: &CancellationToken,
        connected: &mut bool,
    ) -> Result<Connection> {
        let cfg = &self.config;
        let conn = crate::amqp::connect_with(
            &cfg.amqp_url,
            &cfg.amqp_tls,
            &format!("volumed-consumer {}", cfg.host_id),
        )
        .await?;
        let ch = conn.create_channel().await?;
        Topology::for_host(&cfg.host_id, cfg.delivery_limit, &cfg.retry_delays)
            .declare(&ch)
            .await?;
        ch.basic_qos(cfg.prefetch(), BasicQosOptions::default())
            .await?;
        let dead = conn.create_channel().await?;
        dead.confirm_select(ConfirmSelectOptions::default()).await?;
        let queue = topology::request_queue(&cfg.host_id);
        *connected = true;
        let dead = Arc::new(dead);
        let mut gate = self.worker.gate.watch();
        loop {
            // Closed gate: the backend refuses volumed's configuration.
            // Nothing is consumed; the backend is asked again periodically.
            while let Some(reason) = self.worker.gate.reason() {
                error!(host = %cfg.host_id, cause = %reason, retry_in = ?RECHECK,
                       "not consuming: the backend refuses volumed's configuration");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(conn),
                    _ = gate.changed() => continue,
                    _ = tokio::time::sleep(RECHECK) => {}
                }
                match self.worker.backend.check().await {
                    Ok(()) => {
                        info!(host = %cfg.host_id, "the backend accepts volumed's configuration again");
                        self.worker.gate.open();
                    }
                    Err(e) => debug!(cause = %e, "backend check still failing"),
                }
            }
            let tag = format!("volumed-{}-{}", cfg.host_id, Uuid::new_v4().simple());
            let mut deliveries = ch
                .basic_consume(
                    &queue,
                    &tag,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            self.worker.gate.set_consuming(true);
            info!(host = %cfg.host_id, queue, prefetch = cfg.prefetch(), "consuming requests");
            let paused = loop {
                tokio::select! {
                    _ = stop.cancelled() => break false,
                    _ = gate.changed() => {
                        if self.worker.gate.reason().is_some() {
                            break true;
                        }
                    }
                    next = deliveries.next() => match next {
                        Some(Ok(d)) => self.accept(d, &dead),
                        Some(Err(e)) => {
                            self.worker.gate.set_consuming(false);
                            return Err(e).context("request channel failed");
                        }
                        None => {
                            self.worker.gate.set_consuming(false);
                            return Err(anyhow!("the broker cancelled the request consumer"));
                        }
                    }
                }
            };
            // Stop new deliveries; what is prefetched and unread goes back
            // to the queue when the channel closes.
            if let Err(e) = ch.basic_cancel(&tag, BasicCancelOptions::default()).await {
                warn!(cause = %e, "cannot cancel the consumer cleanly");
            }
            if !paused {
                self.worker.gate.set_consuming(false);
                info!(host = %cfg.host_id, "stopped consuming");
                return Ok(conn);
            }
            // Deliveries already read are in the lanes and settle there;
            // those prefetched but unread go back to the queue now, or they
            // would stay unacknowledged on this channel while it is paused.
            let drain = async {
                while let Some(Ok(d)) = deliveries.next().await {
                    let _ = d.acker.reject(BasicRejectOptions { requeue: true }).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
            self.worker.gate.set_consuming(false);
        }
    }

    fn accept(self: &Arc<Self>, d: Delivery, dead: &Arc<Channel>) {
        let props = &d.properties;
        let env = Envelope {
            message_id: props.message_id().as_ref().map(ShortString::as_str),
            correlation_id: props.correlation_id().as_ref().map(ShortString::as_str),
            reply_to: props.reply_to().as_ref().map(ShortString::as_str),
            retries: retries_of(&d),
            traceparent: header_text(&d, trace::HEADER),
        };
        match contract::decode(&d.data, &env, self.config.max_message_bytes) {
            Ok(mut request) => {
                let trace = *request.trace.get_or_insert_with(TraceParent::new_root);
                let key = request.volume_id;
                let me = Arc::clone(self);
                self.dispatcher.dispatch(
                    key,
                    Job {
                        request,
                        delivery: d,
                        dead: Arc::clone(dead),
                        host: self.config.host_id.clone(),
                    },
                    move |job: Job| {
                        let me = Arc::clone(&me);
                        // The span covers the settle too, so the ack's log
                        // lines carry the ids like the operation's do.
                        let span = info_span!("message",
                            message.id = %job.request.request_id,
                            request.id = %job.request.request_id,
                            volume.id = %job.request.volume_id,
                            host = %me.config.host_id,
                            trace.id = %trace.trace_id_hex());
                        async move {
                            // A panic in one operation must not take the
                            // message with it: it goes back to the queue,
                            // and the delivery limit dead-letters a message
                            // that crashes the worker every time.
                            let work = async {
                                failpoint::hit_for("handle", &job.request.volume_id.to_string());
                                me.worker.handle(&job.request).await
                            };
                            let settle = match AssertUnwindSafe(work).catch_unwind().await {
                                Ok(settle) => settle,
                                Err(_) => {
                                    error!("the operation panicked; giving the message back");
                                    Settle::Requeue
                                }
                            };
                            settle_job(&job, settle).await;
                        }
                        .instrument(span)
                    },
                );
            }
            Err(rejection) => {
                let me = Arc::clone(self);
                let dead = Arc::clone(dead);
                let span = info_span!("rejected", message.id = env.message_id.unwrap_or("-"),
                    request.id = ?rejection.request_id, volume.id = ?rejection.volume_id,
                    host = %self.config.host_id);
                self.dispatcher
                    .tracker()
                    .spawn(async move { me.reject(d, rejection, &dead).await }.instrument(span));
            }
        }
    }

    /// A message the decoder refused: a failed event when the request can be
    /// named, then the dead letters with the reason, then the ack. Such a
    /// message can never succeed, so it is never requeued.
    async fn reject(&self, d: Delivery, r: Rejection, dead: &Channel) {
        warn!(error.code = %r.code, error.message = %r.message, "refused a request");
        crate::metrics::get().request(r.op.map_or("unknown", contract::Op::as_str), "refused");
        if let (Some(request_id), Some(op)) = (r.request_id, r.op) {
            let event = Event {
                event_id: Uuid::new_v4(),
                event_type: op.event_type(false),
                request_id,
                host: self.config.host_id.clone(),
                volume_id: r.volume_id,
                vm_id: r.vm_id,
                occurred_at: Utc::now(),
                device: None,
                export: None,
                error: Some(EventError {
                    code: r.code,
                    message: r.message.clone(),
                    retryable: false,
                }),
                attempts: 1,
                cloud_device_id: None,
                repair: None,
            };
            let finish = Finish {
                host: self.config.host_id.clone(),
                request_id,
                op: Some(op),
                volume_id: r.volume_id,
                vm_id: r.vm_id,
                error: Some((r.code, r.message.clone())),
                change: AttachmentChange::None,
                outgoing: Outgoing {
                    event,
                    // Kept only when storable and usable: a NUL cannot go
                    // into a text column (the event would be lost with the
                    // transaction), and an empty reply_to names no queue.
                    correlation_id: d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .filter(|s| !s.contains('\0')),
                    reply_to: d
                        .properties
                        .reply_to()
                        .as_ref()
                        .map(|s| s.to_string())
                        .filter(|s| !s.is_empty() && !s.contains('\0')),
                    traceparent: Some(
                        header_text(&d, trace::HEADER)
                            .and_then(TraceParent::parse)
                            .unwrap_or_else(TraceParent::new_root)
                            .child()
                            .to_string(),
                    ),
                },
            };
            if let Err(e) = db_retry("record refusal", || {
                db::finish_operation(&self.worker.pool, &finish)
            })
            .await
            {
                error!(cause = %e, "cannot record the refused request; dead-lettering it anyway");
            }
        }
        let settle = match dead_letter(
            dead,
            &d,
            &self.config.host_id,
            r.code.as_str(),
            r.code,
            &r.message,
        )
        .await
        {
            Ok(()) => Settle::Ack,
            Err(e) => {
                warn!(cause = %format!("{e:#}"), "cannot publish the dead letter; rejecting to the broker's dead-letter exchange instead");
                // Rejected without requeue, the broker dead-letters it
                // itself (reason `rejected`), without our reason header.
                if let Err(e) = d.acker.reject(BasicRejectOptions { requeue: false }).await {
                    warn!(cause = %e, "reject lost; the broker will redeliver the message");
                }
                return;
            }
        };
        settle_acker(&d.acker, settle).await;
    }
}

/// Settles a worker's job. This is the one place where a request is
/// acknowledged, given back, sent to wait for a retry or dead-lettered, and
/// it runs only after the worker returned, i.e. after the outcome (or the
/// decision to retry) was committed.
async fn settle_job(job: &Job, settle: Settle) {
    let d = &job.delivery;
    let republished = match &settle {
        Settle::DeadLetter {
            reason,
            code,
            message,
        } => Some(dead_letter(&job.dead, d, &job.host, reason, *code, message).await),
        Settle::Retry {
            step,
            delay,
            code,
            message,
        } => Some(
            retry_later(
                &job.dead,
                d,
                &job.host,
                job.request.retries + 1,
                *step,
                *delay,
                *code,
                message,
            )
            .await,
        ),
        _ => None,
    };
    let settle = match republished {
        None => settle,
        Some(Ok(())) => Settle::Ack,
        Some(Err(e)) => {
            // The message stays ours until it is safely elsewhere: give it
            // back to the queue; the delivery limit bounds the loop.
            warn!(cause = %format!("{e:#}"), ?settle, "cannot republish the message; giving it back");
            Settle::Requeue
        }
    };
    settle_acker(&d.acker, settle).await;
}

async fn settle_acker(acker: &Acker, settle: Settle) {
    let result = match &settle {
        Settle::Ack => acker.ack(BasicAckOptions::default()).await,
        // reject (not nack): counted by the delivery limit on every
        // RabbitMQ version.
        Settle::Requeue => acker.reject(BasicRejectOptions { requeue: true }).await,
        // Republished by `settle_job`; one that reaches here goes to the
        // broker's dead-letter exchange.
        Settle::DeadLetter { .. } | Settle::Retry { .. } => {
            acker.reject(BasicRejectOptions { requeue: false }).await
        }
    };
    if let Err(e) = result {
        // The channel is gone: the broker redelivers the message, and the
        // journal recognises it as finished. Nothing is lost.
        warn!(cause = %e, ?settle, "could not settle the message; its redelivery will be recognised");
    }
}

/// Publishes a copy of a delivery, with extra headers, and waits for the
/// broker's confirm. `mandatory`: a copy no queue takes is an error.
async fn republish(
    ch: &Channel,
    d: &Delivery,
    exchange: &str,
    key: &str,
    extra: Vec<(&str, AMQPValue)>,
    expiration: Option<Duration>,
) -> Result<()> {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert(k.into(), v);
    }
    // A fresh set of properties: the request's own `expiration`, say,
    // must not make a dead letter expire before it is stored.
    let p = &d.properties;
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = p.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = p.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = p.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(e) = expiration {
        props = props.with_expiration(e.as_millis().to_string().into());
    }
    let confirm = ch
        .basic_publish(
            exchange,
            key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &d.data,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(anyhow!("no queue takes {exchange} / {key}")),
        Confirmation::Nack(_) => Err(anyhow!("the broker refused the message on {exchange}")),
        Confirmation::NotRequested => Err(anyhow!("the channel is not in confirm mode")),
    }
}

/// Publishes a message to `volumed.dead` with the reason.
async fn dead_letter(
    ch: &Channel,
    d: &Delivery,
    host: &str,
    reason: &str,
    code: ErrorCode,
    message: &str,
) -> Result<()> {
    let s = |v: &str| AMQPValue::LongString(v.into());
    let extra = vec![
        (REASON_HEADER, s(reason)),
        (ERROR_CODE_HEADER, s(code.as_str())),
        (ERROR_HEADER, s(message)),
        (HOST_HEADER, s(host)),
        (ORIGINAL_KEY_HEADER, s(d.routing_key.as_str())),
    ];
    republish(ch, d, topology::DEAD_EXCHANGE, host, extra, None).await?;
    crate::metrics::get()
        .dead_letters
        .with_label_values(&[reason])
        .inc();
    Ok(())
}

/// Publishes a message to the retry queue of its delay step; it returns to
/// the request queue when its expiration passes.
#[allow(clippy::too_many_arguments)]
async fn retry_later(
    ch: &Channel,
    d: &Delivery,
    host: &str,
    retries: u32,
    step: Duration,
    delay: Duration,
    code: ErrorCode,
    message: &str,
) -> Result<()> {
    let extra = vec![
        (RETRIES_HEADER, AMQPValue::LongLongInt(i64::from(retries))),
        (
            ERROR_CODE_HEADER,
            AMQPValue::LongString(code.as_str().into()),
        ),
        (ERROR_HEADER, AMQPValue::LongString(message.into())),
    ];
    let key = topology::retry_key(host, step);
    republish(ch, d, topology::RETRY_EXCHANGE, &key, extra, Some(delay)).await
}

/// The retries header of a delivery (0 when absent or unreadable).
fn retries_of(d: &Delivery) -> u32 {
    let Some(headers) = d.properties.headers() else {
        return 0;
    };
    match headers.inner().get(RETRIES_HEADER) {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortShortInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

fn is_precondition_failed(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("PRECONDITION_FAILED")
}

/// Properties of a request message as the contract wants them.
pub fn request_properties(request_id: Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(request_id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// A text header of a delivery (long or short string), if present.
fn header_text<'a>(d: &'a Delivery, name: &str) -> Option<&'a str> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(v) => std::str::from_utf8(v.as_bytes()).ok(),
        AMQPValue::ShortString(v) => Some(v.as_str()),
        _ => None,
    }
}
