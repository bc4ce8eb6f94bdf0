use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use sqlx::PgPool;

use super::{confirm, FilterArgs};
use crate::config::Config;
use crate::dlq::Replayed;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Dead letter ids to replay.
    pub ids: Vec<i64>,
    /// Replay every dead letter the filters select.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many replays per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Recorded as who replayed (default: the login name).
    #[arg(long)]
    pub by: Option<String>,
}

pub async fn run(config: &Config, pool: &PgPool, a: &ReplayArgs) -> Result<ExitCode> {
    if a.ids.is_empty() != a.all {
        bail!("name dead letter ids, or pass --all (with filters)");
    }
    let mut filter = a.filter.filter()?;
    filter.ids = a.ids.clone();
    if !a.ids.is_empty() {
        filter.status = Some("any".into());
    }
    let rows = crate::dlq::list(pool, &filter).await?;
    if rows.is_empty() {
        eprintln!("nothing to replay");
        return Ok(ExitCode::SUCCESS);
    }
    println!("plan: replay {} dead letter(s):", rows.len());
    for r in &rows {
        let note = match crate::dlq::finished_state(pool, r).await?.as_deref() {
            Some("succeeded") => "skip: request already succeeded".to_string(),
            _ if r.status != "dead" => "skip: already replayed".into(),
            Some(state) => format!(
                "request {state}: reopened and sent to {} / {}",
                r.original_exchange, r.original_routing_key
            ),
            None => format!("to {} / {}", r.original_exchange, r.original_routing_key),
        };
        println!(
            "  {} {} ({}) {note}",
            r.id,
            r.message_id.as_deref().unwrap_or("-"),
            r.reason
        );
    }
    if a.dry_run {
        println!("dry run: nothing replayed");
        return Ok(ExitCode::SUCCESS);
    }
    if !a.yes && !confirm(&format!("replay {} dead letter(s)?", rows.len()))? {
        eprintln!("not replayed");
        return Ok(ExitCode::from(1));
    }
    let by = a.by.clone().unwrap_or_else(login_name);
    let pause = match a.rate {
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64(1.0 / r)),
        Some(_) => bail!("--rate must be positive"),
        None => None,
    };
    let (conn, ch) = crate::dlq::replay_channel(config).await?;
    let mut failed = 0;
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            if let Some(p) = pause {
                tokio::time::sleep(p).await;
            }
        }
        match crate::dlq::replay(pool, &ch, r, &by).await {
            Ok(Replayed::Republished) => println!("{}: replayed", r.id),
            Ok(Replayed::AlreadyDone { state }) => println!(
                "{}: not replayed: request {} has already {state}; replaying would do nothing",
                r.id,
                r.request_id.map(|v| v.to_string()).unwrap_or_default()
            ),
            Ok(Replayed::AlreadyReplayed) => println!("{}: already replayed", r.id),
            Err(e) => {
                failed += 1;
                eprintln!("{}: replay failed, the dead letter is kept: {e:#}", r.id);
            }
        }
    }
    let _ = conn.close(200, "done").await;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn login_name() -> String {
    ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}
