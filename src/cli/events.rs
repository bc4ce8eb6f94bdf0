use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::Cli;
use crate::client::{Client, EventFilter};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Event types to follow, as a topic pattern (`volume.attach.*`).
    #[arg(long, default_value = "#")]
    pub pattern: String,
    /// Only events about this volume.
    #[arg(long)]
    pub volume: Option<uuid::Uuid>,
    /// Only events from this host (daemon).
    #[arg(long)]
    pub host: Option<String>,
    /// One JSON object per line instead of a summary line.
    #[arg(long)]
    pub json: bool,
}

/// `volumed events`: tail the event exchange until interrupted.
pub async fn run(cli: &Cli, a: &EventsArgs) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let client = Client::connect_tls(&config.amqp_url, &config.amqp_tls).await?;
    let filter = EventFilter {
        volume: a.volume,
        host: a.host.clone(),
        ..EventFilter::types(&a.pattern)
    };
    let mut sub = client.subscribe_filtered(filter).await?;
    eprintln!("subscribed to volumed.events ({})", a.pattern);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminated() => break,
            e = sub.next(Duration::from_secs(3600)) => {
                let Some(e) = e? else { continue };
                if a.json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    let detail = match (&e.error, &e.device) {
                        (Some(err), _) => format!("{}: {}", err.code, err.message),
                        (None, Some(d)) => d.stable_path.clone(),
                        (None, None) => String::new(),
                    };
                    println!(
                        "{} {} {} volume={} vm={} {}",
                        e.occurred_at.to_rfc3339(),
                        e.event_type.as_str(),
                        e.host,
                        e.volume_id.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                        e.vm_id.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                        detail
                    );
                }
            }
        }
    }
    client.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
