//! A small client for the services that use volumed (and for its CLI and
//! tests): publish requests with confirms, and receive completion events.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::config::SecretUrl;
use crate::contract::Event;
use crate::topology::{EVENTS_EXCHANGE, REQUESTS_EXCHANGE};

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
}

impl Outgoing {
    pub fn attach(host: &str, volume: Uuid, vm: Uuid, export: bool) -> Self {
        let request_id = Uuid::new_v4();
        Outgoing {
            request_id,
            host: host.to_owned(),
            body: json!({"op": "attach", "request_id": request_id, "volume_id": volume,
                         "vm_id": vm, "export": export}),
            reply_to: None,
        }
    }

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
        }
    }
}

/// A stream of completion events from a private queue.
pub struct Subscription {
    pub queue: String,
    consumer: Consumer,
}

impl Subscription {
    /// The next event, or `None` when `timeout` passes first.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Event>> {
        let d = match tokio::time::timeout(timeout, self.consumer.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => bail!("the event subscription was closed by the broker"),
            Ok(Some(d)) => d?,
        };
        d.acker.ack(BasicAckOptions::default()).await?;
        let event: Event = serde_json::from_slice(&d.data)
            .with_context(|| format!("undecodable event: {}", String::from_utf8_lossy(&d.data)))?;
        Ok(Some(event))
    }

    /// Waits for the event of one request, skipping others.
    pub async fn wait_for(&mut self, request_id: Uuid, timeout: Duration) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Some(e) if e.request_id == request_id => return Ok(e),
                Some(_) => continue,
                None => bail!("no event for request {request_id} within {timeout:?}"),
            }
        }
    }
}

impl Client {
    pub async fn connect(url: &SecretUrl) -> Result<Client> {
        let conn = crate::amqp::connect(url, "volumed-client").await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Client { conn, ch })
    }

    /// Publishes a request and waits for the broker's confirm. Fails when
    /// no queue took it (no daemon has ever run for that host).
    pub async fn publish(&self, req: &Outgoing) -> Result<()> {
        let body = serde_json::to_vec(&req.body)?;
        self.publish_raw(
            &req.host,
            &body,
            Some(req.request_id),
            req.reply_to.as_deref(),
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
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.to_string().into());
        }
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        let confirm = self
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
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(anyhow!(
                "no queue for host {host:?}: is a volumed with VOLUMED_HOST_ID={host} set up?"
            )),
            Confirmation::Nack(_) => Err(anyhow!("the broker refused the request")),
        }
    }

    /// Subscribes to events whose type matches `pattern` (`#` for all) on a
    /// private queue that disappears with this connection.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription> {
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
        if !pattern.is_empty() {
            ch.queue_bind(
                &queue,
                EVENTS_EXCHANGE,
                pattern,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding to volumed.events: has a volumed started on this broker yet?")?;
        }
        let consumer = ch
            .basic_consume(
                &queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Subscription { queue, consumer })
    }

    /// Publishes a request and waits for its completion event, which comes
    /// back on a private reply queue (`reply_to`).
    pub async fn request_and_wait(&self, mut req: Outgoing, timeout: Duration) -> Result<Event> {
        let mut sub = self.subscribe("").await?;
        req.reply_to = Some(sub.queue.clone());
        self.publish(&req).await?;
        sub.wait_for(req.request_id, timeout).await
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "bye").await;
    }
}
