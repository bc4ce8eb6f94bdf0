//! The broker topology, described once and used twice: declared by the
//! daemon at start-up, and rendered as a RabbitMQ definitions file for
//! `queue-topology/` (`volumed topology definitions --host H`).

use anyhow::{Context, Result};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use serde_json::{json, Value};

/// Requests, routed by host id.
pub const REQUESTS_EXCHANGE: &str = "volumed.requests";
/// Completion events, routed by event type.
pub const EVENTS_EXCHANGE: &str = "volumed.events";
/// Requests waiting to be retried, routed by `<host>.<delay>` to one
/// queue per delay step; expired messages return to `volumed.requests`.
pub const RETRY_EXCHANGE: &str = "volumed.retry";
/// Dead letters, routed by host id (the broker keeps a dead-lettered
/// request's original routing key, which is the host id).
pub const DEAD_EXCHANGE: &str = "volumed.dead";

pub fn request_queue(host: &str) -> String {
    format!("{REQUESTS_EXCHANGE}.{host}")
}

pub fn dead_queue(host: &str) -> String {
    format!("{DEAD_EXCHANGE}.{host}")
}

/// The routing key (and queue name suffix) of a host's retry step.
pub fn retry_key(host: &str, delay: std::time::Duration) -> String {
    format!("{host}.{}", crate::config::delay_label(delay))
}

pub fn retry_queue(host: &str, delay: std::time::Duration) -> String {
    format!("{RETRY_EXCHANGE}.{}", retry_key(host, delay))
}

/// The RabbitMQ permissions (configure, write, read regular expressions) a
/// daemon's broker user needs, and no more: its own queues, the four
/// exchanges, and the default exchange (`amq.default`) for replies to a
/// sender's `reply_to` queue. It cannot read, purge, delete or redeclare
/// another host's queues. RabbitMQ's write permission names exchanges, not
/// routing keys, so it can publish to `volumed.requests` (its retry queues
/// dead-letter there, which needs write) and through the default exchange:
/// hosts that must not be able to send each other requests need a vhost
/// each. Checked against a real broker in `tests/security.rs`.
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Permissions {
    pub fn for_host(host: &str) -> Permissions {
        // Host ids are [A-Za-z0-9._-]: only the dot needs escaping.
        let h = host.replace('.', "\\.");
        let own = format!("^volumed\\.(requests|dead)\\.{h}$|^volumed\\.retry\\.{h}\\.[^.]+$");
        Permissions {
            // Declaring: the exchanges and its own queues.
            configure: format!("^volumed\\.(requests|events|dead|retry)$|{own}"),
            // Publishing (events, dead letters, retries, replies) and
            // binding its queues.
            write: format!("^volumed\\.(requests|events|dead|retry)$|^amq\\.default$|{own}"),
            // Consuming its queues and binding them to the exchanges.
            read: format!("^volumed\\.(requests|dead|retry)$|{own}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Str(&'static str),
    Owned(String),
    Int(i64),
}

#[derive(Debug, Clone)]
pub struct ExchangeSpec {
    pub name: &'static str,
    pub kind: &'static str,
}

#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub args: Vec<(&'static str, Arg)>,
}

#[derive(Debug, Clone)]
pub struct BindingSpec {
    pub exchange: &'static str,
    pub queue: String,
    pub key: String,
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<BindingSpec>,
}

impl Topology {
    /// Everything one host's daemon needs. `delivery_limit` is the broker's
    /// poison guard: a message redelivered that many times (a daemon that
    /// crashes on it every time) is dead-lettered instead of looping.
    pub fn for_host(
        host: &str,
        delivery_limit: u32,
        retry_delays: &[std::time::Duration],
    ) -> Topology {
        let mut t = Topology::base(host, delivery_limit);
        t.exchanges.push(ExchangeSpec {
            name: RETRY_EXCHANGE,
            kind: "direct",
        });
        for d in retry_delays {
            // Messages wait here with a per-message expiration no longer
            // than the step (jitter only shortens it), so the head of the
            // queue is never held up by much, then return to the requests.
            t.queues.push(QueueSpec {
                name: retry_queue(host, *d),
                args: vec![
                    ("x-queue-type", Arg::Str("quorum")),
                    ("x-dead-letter-exchange", Arg::Str(REQUESTS_EXCHANGE)),
                    ("x-dead-letter-routing-key", Arg::Owned(host.to_owned())),
                    ("x-dead-letter-strategy", Arg::Str("at-least-once")),
                    ("x-overflow", Arg::Str("reject-publish")),
                ],
            });
            t.bindings.push(BindingSpec {
                exchange: RETRY_EXCHANGE,
                queue: retry_queue(host, *d),
                key: retry_key(host, *d),
            });
        }
        t
    }

    fn base(host: &str, delivery_limit: u32) -> Topology {
        Topology {
            exchanges: vec![
                ExchangeSpec {
                    name: REQUESTS_EXCHANGE,
                    kind: "direct",
                },
                ExchangeSpec {
                    name: EVENTS_EXCHANGE,
                    kind: "topic",
                },
                ExchangeSpec {
                    name: DEAD_EXCHANGE,
                    kind: "direct",
                },
            ],
            queues: vec![
                QueueSpec {
                    name: request_queue(host),
                    args: vec![
                        ("x-queue-type", Arg::Str("quorum")),
                        ("x-dead-letter-exchange", Arg::Str(DEAD_EXCHANGE)),
                        // At-least-once dead-lettering needs reject-publish
                        // overflow; without it the broker silently falls
                        // back to at-most-once.
                        ("x-dead-letter-strategy", Arg::Str("at-least-once")),
                        ("x-overflow", Arg::Str("reject-publish")),
                        ("x-delivery-limit", Arg::Int(i64::from(delivery_limit))),
                    ],
                },
                QueueSpec {
                    name: dead_queue(host),
                    args: vec![("x-queue-type", Arg::Str("quorum"))],
                },
            ],
            bindings: vec![
                BindingSpec {
                    exchange: REQUESTS_EXCHANGE,
                    queue: request_queue(host),
                    key: host.to_owned(),
                },
                BindingSpec {
                    exchange: DEAD_EXCHANGE,
                    queue: dead_queue(host),
                    key: host.to_owned(),
                },
            ],
        }
    }

    /// Declares everything (idempotent). A conflicting existing declaration
    /// makes the broker close the channel with PRECONDITION_FAILED; the error
    /// says which object and what to do instead of changing it.
    pub async fn declare(&self, ch: &Channel) -> Result<()> {
        for x in &self.exchanges {
            let kind = match x.kind {
                "topic" => ExchangeKind::Topic,
                _ => ExchangeKind::Direct,
            };
            ch.exchange_declare(
                x.name,
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| declare_error(e, "exchange", x.name))?;
        }
        for q in &self.queues {
            let mut args = FieldTable::default();
            for (k, v) in &q.args {
                let value = match v {
                    Arg::Str(s) => AMQPValue::LongString((*s).into()),
                    Arg::Owned(s) => AMQPValue::LongString(s.as_str().into()),
                    Arg::Int(i) => AMQPValue::LongLongInt(*i),
                };
                args.insert((*k).into(), value);
            }
            ch.queue_declare(
                &q.name,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| declare_error(e, "queue", &q.name))?;
        }
        for b in &self.bindings {
            ch.queue_bind(
                &b.queue,
                b.exchange,
                &b.key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding queue {} to {}", b.queue, b.exchange))?;
        }
        Ok(())
    }

    /// The RabbitMQ definitions document (`rabbitmqctl import_definitions`).
    pub fn definitions(&self, vhost: &str) -> Value {
        let exchanges: Vec<Value> = self
            .exchanges
            .iter()
            .map(|x| {
                json!({"name": x.name, "vhost": vhost, "type": x.kind, "durable": true,
                       "auto_delete": false, "internal": false, "arguments": {}})
            })
            .collect();
        let queues: Vec<Value> = self
            .queues
            .iter()
            .map(|q| {
                let args: serde_json::Map<String, Value> = q
                    .args
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Arg::Str(s) => json!(s),
                            Arg::Owned(s) => json!(s),
                            Arg::Int(i) => json!(i),
                        };
                        ((*k).to_owned(), v)
                    })
                    .collect();
                json!({"name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                       "arguments": args})
            })
            .collect();
        let bindings: Vec<Value> = self
            .bindings
            .iter()
            .map(|b| {
                json!({"source": b.exchange, "vhost": vhost, "destination": b.queue,
                       "destination_type": "queue", "routing_key": b.key, "arguments": {}})
            })
            .collect();
        json!({"exchanges": exchanges, "queues": queues, "bindings": bindings})
    }
}

/// A declaration error with what the operator should do about it: a
/// conflicting object (PRECONDITION_FAILED) or a missing permission
/// (ACCESS_REFUSED) are both fixed outside volumed.
fn declare_error(e: lapin::Error, kind: &str, name: &str) -> anyhow::Error {
    let text = e.to_string();
    let hint = if text.contains("ACCESS_REFUSED") {
        "the broker user lacks a permission; `volumed topology permissions` prints what it needs"
            .to_owned()
    } else if text.contains("PRECONDITION_FAILED") {
        format!(
            "an existing {kind} of that name has different settings; volumed never changes \
             it: align the settings (e.g. VOLUMED_DELIVERY_LIMIT) or delete the {kind} after \
             draining it"
        )
    } else {
        "the broker refused the declaration".to_owned()
    };
    anyhow::Error::new(e).context(format!("declaring {kind} {name}: {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_definitions_match_the_code() {
        let shipped: Value =
            serde_json::from_str(include_str!("../queue-topology/definitions.json"))
                .expect("queue-topology/definitions.json is JSON");
        let delays = crate::config::parse_delays(crate::config::DEFAULT_RETRY_DELAYS)
            .expect("default delays");
        let generated = Topology::for_host("oma-1", 10, &delays).definitions("/");
        assert_eq!(
            shipped, generated,
            "regenerate with: volumed topology definitions --host oma-1 > queue-topology/definitions.json"
        );
    }
}
