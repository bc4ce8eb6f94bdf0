//! Broker connections.

use anyhow::{Context, Result};
use lapin::{Connection, ConnectionProperties};

use crate::config::SecretUrl;

/// Opens a named connection; the name shows in the broker's connection list
/// (`rabbitmqctl list_connections client_properties`), which is how an
/// operator tells the consumer from the relay of which host.
///
/// Bounded by [`CONNECT_TIMEOUT`]: a broker that accepts TCP but never
/// finishes the handshake (overloaded, or refusing the vhost in a way the
/// client does not notice) must not stall a reconnect loop forever.
pub async fn connect(url: &SecretUrl, name: &str) -> Result<Connection> {
    let connect = Connection::connect(
        url.expose(),
        ConnectionProperties::default().with_connection_name(name.into()),
    );
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to RabbitMQ at {url}"))
}

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
