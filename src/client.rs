//! The client library for the services that use volumed (the migration and
//! failover services), also used by the CLI, the benchmark and the tests.
//!
//! Publish a request with publisher confirms and await its completion event
//! on a private reply queue, or subscribe to the event exchange with a
//! filter:
//!
//! ```no_run
//! # async fn demo() -> Result<(), volumed::client::ClientError> {
//! use std::time::Duration;
//! use volumed::client::{Client, Outgoing};
//! let url = volumed::config::SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f");
//! let client = Client::connect(&url).await?;
//! let volume = uuid::Uuid::new_v4();
//! let vm = uuid::Uuid::new_v4();
//! let event = client
//!     .request_and_wait(Outgoing::attach("oma-1", volume, vm, true), Duration::from_secs(300))
//!     .await?;
//! println!("{:?} {:?}", event.event_type, event.export);
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! Errors are a [`ClientError`], whose kinds a caller branches on: a
//! [`ClientError::Timeout`] means the outcome is unknown (publish the same
//! request again later: the request id makes that safe), while
//! [`ClientError::NoQueue`] means no daemon was ever set up for the host.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::config::{AmqpTls, SecretUrl};
use crate::contract::Event;
use crate::topology::{EVENTS_EXCHANGE, REQUESTS_EXCHANGE};
use crate::trace::{self, TraceParent};

/// What can go wrong for a client, by what the caller does about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No event arrived in time. The request may still be processed: its
    /// outcome is unknown, not failed.
    #[error("no event for request {request_id} within {waited:?}")]
    Timeout { request_id: Uuid, waited: Duration },
    /// The broker routed the request to no queue: no volumed has declared
    /// the queue of this host on this broker (and virtual host).
    #[error("no queue for host {host:?}: is a volumed with VOLUMED_HOST_ID={host} set up on this broker?")]
    NoQueue { host: String },
    /// The broker refused the publish (a full queue, a resource alarm).
    #[error("the broker refused the request (nack); try again later")]
    Refused,
    /// The broker could not be reached, or the connection or channel failed.
    #[error("broker: {0}")]
    Broker(String),
    /// A message on the event queue that is not a volumed event.
    #[error("undecodable event: {0}")]
    Decode(String),
}

impl From<lapin::Error> for ClientError {
    fn from(e: lapin::Error) -> Self {
        ClientError::Broker(e.to_string())
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

pub struct Client {
    conn: Connection,
    ch: Channel,
}

/// A request to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub request_id: Uuid,
    pub host: String,
    pub body: Value,
    pub reply_to: Option<String>,
    /// A W3C `traceparent` header to send; the completion event carries the
    /// same trace id.
    pub traceparent: Option<String>,
}

impl Outgoing {
    /// Attach `volume` to `vm`; `export` serves it over NBD when `vm` is
    /// the appliance VM of `host`.
    pub fn attach(host: &str, volume: Uuid, vm: Uuid, export: bool) -> Self {
        let request_id = Uuid::new_v4();
        Outgoing {
            request_id,
            host: host.to_owned(),
            body: json!({"op": "attach", "request_id": request_id, "volume_id": volume,
                         "vm_id": vm, "export": export}),
            reply_to: None,
            traceparent: None,
        }
    }

    /// Detach `volume`; with `vm`, only when it is attached to that VM.
    pub fn detach(host: &str, volume: Uuid, vm: Option<Uuid>) -> Self {
        let request_id = Uuid::new_v4();
        let mut body = json!({"op": "detach", "request_id": request_id, "volume_id": volume});
        if let Some(vm) = vm {
            body["vm_id"] = json!(vm);
        }
        Outgoing {
            request_id,
            host: host.to_owned(),
            body,
            reply_to: None,
            traceparent: None,
        }
    }

    /// Sends the request as part of an existing trace.
    pub fn with_trace(mut self, traceparent: &TraceParent) -> Self {
        self.traceparent = Some(traceparent.to_string());
        self
    }
}

/// Which events a subscription delivers. The type pattern is applied by the
/// broker (a topic binding); the volume, request and host filters here.
#[derive(Debug, Clone)]
pub struct EventFilter {
    /// A topic pattern over event types: `#` for all, `volume.attach.*`.
    pub pattern: String,
    pub volume: Option<Uuid>,
    pub request: Option<Uuid>,
    pub host: Option<String>,
}

impl Default for EventFilter {
    fn default() -> Self {
        EventFilter {
            pattern: "#".into(),
            volume: None,
            request: None,
            host: None,
        }
    }
}

impl EventFilter {
    /// Events of these types (`volume.attach.succeeded`, `volume.*.failed`).
    pub fn types(pattern: &str) -> Self {
        EventFilter {
            pattern: pattern.into(),
            ..Default::default()
        }
    }

    pub fn volume(mut self, volume: Uuid) -> Self {
        self.volume = Some(volume);
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.into());
        self
    }

    pub fn request(mut self, request: Uuid) -> Self {
        self.request = Some(request);
        self
    }

    /// Whether an event passes the filters that are not the type pattern.
    pub fn matches(&self, e: &Event) -> bool {
        self.volume.is_none_or(|v| e.volume_id == Some(v))
            && self.request.is_none_or(|r| e.request_id == r)
            && self.host.as_deref().is_none_or(|h| e.host == h)
    }
}

/// An event with the trace context it was published with.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: Event,
    /// The event's `traceparent` header, when it has a valid one.
    pub trace: Option<TraceParent>,
}

/// A stream of completion events from a private queue that disappears with
/// the connection.
pub struct Subscription {
    pub queue: String,
    consumer: Consumer,
    filter: EventFilter,
}

impl Subscription {
    /// The next event that passes the filter, or `None` when `timeout`
    /// passes first.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Event>> {
        Ok(self.next_received(timeout).await?.map(|r| r.event))
    }

    /// Like [`Subscription::next`], with the event's trace context.
    pub async fn next_received(&mut self, timeout: Duration) -> Result<Option<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let d = match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => {
                    return Err(ClientError::Broker(
                        "the event subscription was closed by the broker".into(),
                    ))
                }
                Ok(Some(d)) => d?,
            };
            d.acker.ack(BasicAckOptions::default()).await?;
            let event: Event = serde_json::from_slice(&d.data).map_err(|e| {
                ClientError::Decode(format!("{e}: {}", String::from_utf8_lossy(&d.data)))
            })?;
            if !self.filter.matches(&event) {
                continue;
            }
            let trace = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(trace::HEADER) {
                    Some(AMQPValue::LongString(v)) => std::str::from_utf8(v.as_bytes()).ok(),
                    Some(AMQPValue::ShortString(v)) => Some(v.as_str()),
                    _ => None,
                })
                .and_then(TraceParent::parse);
            return Ok(Some(Received { event, trace }));
        }
    }

    /// Waits for the event of one request, skipping others.
    pub async fn wait_for(&mut self, request_id: Uuid, timeout: Duration) -> Result<Event> {
        Ok(self.wait_received(request_id, timeout).await?.event)
    }

    /// Like [`Subscription::wait_for`], with the event's trace context.
    pub async fn wait_received(&mut self, request_id: Uuid, timeout: Duration) -> Result<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_received(left).await? {
                Some(r) if r.event.request_id == request_id => return Ok(r),
                Some(_) => continue,
                None => {
                    return Err(ClientError::Timeout {
                        request_id,
                        waited: timeout,
                    })
                }
            }
        }
    }
}

impl Client {
    /// Connects (within 10 s) and opens a channel in confirm mode. An
    /// `amqps://` URL is verified against the system's trusted roots.
    pub async fn connect(url: &SecretUrl) -> Result<Client> {
        Self::connect_tls(url, &AmqpTls::default()).await
    }

    /// Like [`Client::connect`], with a CA file and client certificate.
    pub async fn connect_tls(url: &SecretUrl, tls: &AmqpTls) -> Result<Client> {
        let conn = crate::amqp::connect_with(url, tls, "volumed-client")
            .await
            .map_err(|e| ClientError::Broker(format!("{e:#}")))?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Client { conn, ch })
    }

    /// Publishes a request and waits for the broker's confirm. Fails with
    /// [`ClientError::NoQueue`] when no queue took it.
    pub async fn publish(&self, req: &Outgoing) -> Result<()> {
        let confirm = self.send(req).await?;
        settle(&req.host, confirm.await?)
    }

    /// Publishes every request of `reqs` without waiting for each one's
    /// confirmation, then waits for all of them: a wave of requests costs
    /// one round trip to the broker rather than one per request. `sending`
    /// is called just before each request goes out (the benchmark stamps
    /// it). The
    /// first refusal is returned once every confirmation is in; the
    /// others were accepted. A channel that fails while sending ends the
    /// call at once with that error: the requests sent before it may have
    /// been taken, so publish them again (their request ids make a second
    /// copy harmless).
    pub async fn publish_many(
        &self,
        reqs: &[Outgoing],
        mut sending: impl FnMut(&Outgoing),
    ) -> Result<()> {
        let mut pending = Vec::with_capacity(reqs.len());
        for r in reqs {
            sending(r);
            pending.push((r, self.send(r).await?));
        }
        let mut first = Ok(());
        for (r, confirm) in pending {
            let outcome = match confirm.await {
                Ok(c) => settle(&r.host, c),
                Err(e) => Err(e.into()),
            };
            if first.is_ok() {
                first = outcome;
            }
        }
        first
    }

    async fn send(&self, req: &Outgoing) -> Result<lapin::publisher_confirm::PublisherConfirm> {
        let body = serde_json::to_vec(&req.body)
            .map_err(|e| ClientError::Decode(format!("request body: {e}")))?;
        let mut props = BasicProperties::default();
        if let Some(t) = &req.traceparent {
            let mut headers = FieldTable::default();
            headers.insert(
                trace::HEADER.into(),
                AMQPValue::LongString(t.as_str().into()),
            );
            props = props.with_headers(headers);
        }
        self.send_with(
            &req.host,
            &body,
            Some(req.request_id),
            req.reply_to.as_deref(),
            props,
        )
        .await
    }

    /// Publishes arbitrary bytes as a request (tests use it for bad input).
    pub async fn publish_raw(
        &self,
        host: &str,
        body: &[u8],
        message_id: Option<Uuid>,
        reply_to: Option<&str>,
    ) -> Result<()> {
        let confirm = self
            .send_with(host, body, message_id, reply_to, BasicProperties::default())
            .await?;
        settle(host, confirm.await?)
    }

    async fn send_with(
        &self,
        host: &str,
        body: &[u8],
        message_id: Option<Uuid>,
        reply_to: Option<&str>,
        props: BasicProperties,
    ) -> Result<lapin::publisher_confirm::PublisherConfirm> {
        let mut props = props
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.to_string().into());
        }
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        Ok(self
            .ch
            .basic_publish(
                REQUESTS_EXCHANGE,
                host,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?)
    }

    /// Subscribes to events whose type matches `pattern` (`#` for all).
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription> {
        self.subscribe_filtered(EventFilter::types(pattern)).await
    }

    /// Subscribes to the events that pass `filter`, on a private queue.
    pub async fn subscribe_filtered(&self, filter: EventFilter) -> Result<Subscription> {
        self.subscription(Some(filter)).await
    }

    /// A private queue bound to the event exchange with the filter's
    /// pattern, or bound to nothing (a reply queue) when `filter` is None.
    async fn subscription(&self, filter: Option<EventFilter>) -> Result<Subscription> {
        let ch = self.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                "",
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue = q.name().to_string();
        if let Some(f) = &filter {
            ch.queue_bind(
                &queue,
                EVENTS_EXCHANGE,
                &f.pattern,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                ClientError::Broker(format!(
                    "binding to {EVENTS_EXCHANGE}: has a volumed started on this broker yet? ({e})"
                ))
            })?;
        }
        let consumer = ch
            .basic_consume(
                &queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Subscription {
            queue,
            consumer,
            filter: filter.unwrap_or_default(),
        })
    }

    /// Publishes a request and waits for its completion event, which comes
    /// back on a private reply queue (`reply_to`). On
    /// [`ClientError::Timeout`] the outcome is unknown.
    pub async fn request_and_wait(&self, req: Outgoing, timeout: Duration) -> Result<Event> {
        Ok(self.request_and_receive(req, timeout).await?.event)
    }

    /// Like [`Client::request_and_wait`], with the event's trace context.
    pub async fn request_and_receive(
        &self,
        mut req: Outgoing,
        timeout: Duration,
    ) -> Result<Received> {
        let mut sub = self.subscription(None).await?;
        req.reply_to = Some(sub.queue.clone());
        self.publish(&req).await?;
        sub.wait_received(req.request_id, timeout).await
    }

    /// Attaches a volume and waits for the outcome.
    pub async fn attach_and_wait(
        &self,
        host: &str,
        volume: Uuid,
        vm: Uuid,
        export: bool,
        timeout: Duration,
    ) -> Result<Event> {
        self.request_and_wait(Outgoing::attach(host, volume, vm, export), timeout)
            .await
    }

    /// Detaches a volume and waits for the outcome.
    pub async fn detach_and_wait(
        &self,
        host: &str,
        volume: Uuid,
        vm: Option<Uuid>,
        timeout: Duration,
    ) -> Result<Event> {
        self.request_and_wait(Outgoing::detach(host, volume, vm), timeout)
            .await
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "bye").await;
    }
}

/// What a publisher confirmation says of a request sent to `host`.
fn settle(host: &str, confirm: Confirmation) -> Result<()> {
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        // A mandatory message returned with its ack: no queue took it.
        Confirmation::Ack(Some(_)) => Err(ClientError::NoQueue { host: host.into() }),
        Confirmation::Nack(_) => Err(ClientError::Refused),
    }
}
