//! Broker connections.

use anyhow::{Context, Result};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::config::{AmqpTls, SecretUrl};

/// Opens a named connection; the name shows in the broker's connection list
/// (`rabbitmqctl list_connections client_properties`), which is how an
/// operator tells the consumer from the relay of which host.
///
/// Bounded by [`CONNECT_TIMEOUT`]: a broker that accepts TCP but never
/// finishes the handshake (overloaded, or refusing the vhost in a way the
/// client does not notice) must not stall a reconnect loop forever.
pub async fn connect(url: &SecretUrl, name: &str) -> Result<Connection> {
    connect_with(url, &AmqpTls::default(), name).await
}

/// Like [`connect`], with the configured TLS settings: for `amqps://` the
/// server certificate is verified against the system's roots plus
/// `VOLUMED_AMQP_CA_FILE`, and the client certificate is presented when
/// one is configured.
pub async fn connect_with(url: &SecretUrl, tls: &AmqpTls, name: &str) -> Result<Connection> {
    let config = OwnedTLSConfig {
        identity: tls.client_cert_der.as_ref().map(|der| OwnedIdentity {
            der: der.clone(),
            password: tls.client_cert_password.expose().to_owned(),
        }),
        cert_chain: tls.ca_pem.clone(),
    };
    // The URL's own words are kept out of the error: it holds the password.
    let mut uri: AMQPUri = url.expose().parse().map_err(|e: String| {
        anyhow::anyhow!("{url} is not an AMQP URL: {}", e.replace(url.expose(), "…"))
    })?;
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(FRAME_MAX);
    }
    let connect = Connection::connect_uri_with_config(
        uri,
        // The connection's tasks and socket run on the caller's tokio
        // runtime rather than on lapin's own executor and reactor threads,
        // which cost a thread hop (a futex wake) for every frame.
        ConnectionProperties::default()
            .with_connection_name(name.into())
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
        config,
    );
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to RabbitMQ at {url}"))
}

/// The largest frame asked for, unless the URL names one (`?frame_max=`).
/// The client keeps a send and a receive buffer of 32 frames for each
/// connection, allocated and written in full: at RabbitMQ's default of
/// 128 KiB that is 8 MiB a connection, most of the daemon's memory at rest.
/// Requests and events are a few hundred bytes; a larger body is simply
/// sent in several frames.
pub const FRAME_MAX: u32 = 16 * 1024;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
