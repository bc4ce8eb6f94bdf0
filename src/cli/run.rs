use std::process::ExitCode;

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use super::Cli;

/// `volumed run`: the daemon, stopped by SIGTERM or SIGINT.
pub async fn run(cli: &Cli) -> Result<ExitCode> {
    let config = cli.load_config()?;
    crate::telemetry::init(config.log_format);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "stopping"),
        }
        // A second signal means "now": exit without waiting for in-flight
        // operations. Nothing unacknowledged is lost; it is redelivered.
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!(
                "second signal: exiting at once; unfinished requests will be redelivered"
            );
            std::process::exit(130);
        });
    };
    crate::daemon::run(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
