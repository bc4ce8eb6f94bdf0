use std::process::ExitCode;

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use super::Cli;

/// `volumed run`: the daemon, stopped by SIGTERM or SIGINT; SIGHUP reloads
/// the configuration (see `daemon::RELOADABLE` for what a reload applies).
pub async fn run(cli: &Cli) -> Result<ExitCode> {
    let config = cli.load_config()?;
    crate::telemetry::init(config.log_format, config.log_filter.as_deref());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Installed before the daemon starts, so that a SIGHUP (systemctl
    // reload) never takes the default action, which is to exit.
    let mut hup = signal(SignalKind::hangup())?;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let hup_task = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "reloading the configuration");
            if reload_tx.send(()).is_err() {
                return;
            }
        }
    });
    let path = cli.config.clone();
    let reloads = crate::daemon::Reloads {
        requests: reload_rx,
        load: Box::new(move || crate::config::Config::load(path.as_deref())),
    };
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
    let result = crate::daemon::run(config, shutdown, reloads).await;
    hup_task.abort();
    result?;
    Ok(ExitCode::SUCCESS)
}
