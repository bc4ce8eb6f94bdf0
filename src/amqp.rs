//! Broker connections.

use anyhow::{Context, Result};
use lapin::{Connection, ConnectionProperties};

use crate::config::SecretUrl;

/// Opens a named connection; the name shows in the broker's connection list
/// (`rabbitmqctl list_connections client_properties`), which is how an
/// operator tells the consumer from the relay of which host.
pub async fn connect(url: &SecretUrl, name: &str) -> Result<Connection> {
    Connection::connect(
        url.expose(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .with_context(|| format!("cannot connect to RabbitMQ at {url}"))
}
