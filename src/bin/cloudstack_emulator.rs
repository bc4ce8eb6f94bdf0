//! `cloudstack-emulator`: serves the CloudStack API emulator
//! (`volumed::cloudstack::emulator`) for local trials of volumed.
//!
//! Prints the API URL on stdout once it listens, logs to stderr (filter from
//! `RUST_LOG`, default `info`), and stops on SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;
use uuid::Uuid;
use volumed::cloudstack::emulator::{api_url, Emulator, EmulatorConfig};

// No `Debug` derive: the secret key must never be printed.
/// Emulates the CloudStack API (volumes, VMs, attach/detach jobs) in memory,
/// and the appliance VM's udev links.
#[derive(Parser)]
#[command(name = "cloudstack-emulator", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The API key requests must carry.
    #[arg(long, env = "CLOUDSTACK_EMULATOR_API_KEY")]
    api_key: String,
    /// The secret key requests must be signed with (prefer the environment
    /// variable: command lines are visible to other users).
    #[arg(long, env = "CLOUDSTACK_EMULATOR_SECRET_KEY", hide_env_values = true)]
    secret_key: String,
    /// The VM volumed runs in; attaching to it makes device links appear.
    #[arg(long)]
    appliance_vm: Uuid,
    /// Where `virtio-<serial>` links appear (stands for /dev/disk/by-id).
    #[arg(long)]
    device_dir: PathBuf,
    /// Where the sparse backing files of volumes are created.
    #[arg(long)]
    data_dir: PathBuf,
    /// How long each attach/detach job runs.
    #[arg(long, default_value_t = 2000)]
    job_latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    for dir in [&args.device_dir, &args.data_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let emulator = Emulator::new(EmulatorConfig {
        api_key: args.api_key,
        secret_key: args.secret_key,
        appliance_vm: args.appliance_vm,
        device_dir: args.device_dir,
        data_dir: args.data_dir,
        job_latency: Duration::from_millis(args.job_latency_ms),
    });
    println!("{}", api_url(addr));
    emulator
        .serve(listener, shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(cause = %err, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Args::command().debug_assert();
    }
}
