//! `volumed exports`: the exports the database records, with their live
//! status on the NBD server.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::Cli;
use crate::nbd::proto::{self, Open};

#[derive(Debug, Args)]
pub struct ExportsArgs {
    /// Every host's exports, not only this host's (live status is checked
    /// against this host's server only).
    #[arg(long)]
    pub all_hosts: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: &Cli, a: &ExportsArgs) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let pool = crate::db::connect(&config.database_url, 2).await?;
    let host = (!a.all_hosts).then_some(config.host_id.as_str());
    let rows = crate::db::exports(&pool, host).await?;
    let stats = crate::db::nbd_stats(&pool, &config.host_id, config.nbd.engine.as_str())
        .await?
        .unwrap_or_default();
    let timeout = Duration::from_secs(3);
    let nbd = &config.nbd;
    let mut all_live = true;
    if !a.json {
        println!(
            "host {} engine {} on {}:{}; reloads {}, restarts {}, crashes {}, changes {}",
            config.host_id,
            nbd.engine.as_str(),
            nbd.listen,
            nbd.port,
            stats.reloads,
            stats.restarts,
            stats.crashes,
            stats.changes
        );
        println!(
            "{:<42} {:<10} {:<8} {:<10} STABLE PATH",
            "EXPORT", "HOST", "PORT", "LIVE"
        );
    }
    for row in &rows {
        let live = if row.host == config.host_id {
            match proto::probe(&nbd.listen, nbd.port, &row.export_name, timeout).await {
                Ok(p) if p.listed && matches!(p.open, Open::Served { .. }) => "live".to_string(),
                Ok(p) => match p.open {
                    Open::Refused { message, .. } => format!("refused ({message})"),
                    Open::Served { .. } => "not listed".into(),
                },
                Err(e) => format!("down ({e})"),
            }
        } else {
            "other host".into()
        };
        all_live &= live == "live" || live == "other host";
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "export": row.export_name, "volume_id": row.volume_id, "host": row.host,
                    "engine": row.engine, "port": row.port, "device_path": row.device_path,
                    "stable_path": row.stable_path, "created_at": row.created_at,
                    "metadata": row.metadata, "live": live,
                })
            );
        } else {
            println!(
                "{:<42} {:<10} {:<8} {:<10} {}",
                row.export_name, row.host, row.port, live, row.stable_path
            );
        }
    }
    pool.close().await;
    // Exit 1 when a recorded export is not live, so scripts can alert on it.
    Ok(if all_live {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
