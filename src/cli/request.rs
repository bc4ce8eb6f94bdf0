//! `volumed attach` and `volumed detach`: publish a request, optionally
//! wait for its completion event.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use uuid::Uuid;

use super::Cli;
use crate::client::{Client, Outgoing};

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[arg(long)]
    pub volume: Uuid,
    #[arg(long)]
    pub vm: Uuid,
    /// Attach without exporting over NBD.
    #[arg(long)]
    pub no_export: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    #[arg(long)]
    pub volume: Uuid,
    /// Fail if the volume is attached to a VM other than this one.
    #[arg(long)]
    pub vm: Option<Uuid>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct Common {
    /// Wait for the completion event, print it, and exit 1 if it is a failure.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait (exit 2 when they pass).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Target host id (default: VOLUMED_HOST_ID).
    #[arg(long)]
    pub host: Option<String>,
}

pub async fn attach(cli: &Cli, a: &AttachArgs) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let host = a.common.host.clone().unwrap_or(config.host_id.clone());
    let req = Outgoing::attach(&host, a.volume, a.vm, !a.no_export);
    send(&config, req, &a.common).await
}

pub async fn detach(cli: &Cli, a: &DetachArgs) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let host = a.common.host.clone().unwrap_or(config.host_id.clone());
    let req = Outgoing::detach(&host, a.volume, a.vm);
    send(&config, req, &a.common).await
}

async fn send(config: &crate::config::Config, req: Outgoing, c: &Common) -> Result<ExitCode> {
    let client = Client::connect_tls(&config.amqp_url, &config.amqp_tls).await?;
    let id = req.request_id;
    if !c.wait {
        client.publish(&req).await?;
        println!("{id}");
        client.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("request {id} published; waiting for its event");
    let result = client
        .request_and_wait(req, Duration::from_secs(c.timeout))
        .await;
    client.close().await;
    match result {
        Ok(event) => {
            println!("{}", serde_json::to_string_pretty(&event)?);
            Ok(if event.event_type.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}
