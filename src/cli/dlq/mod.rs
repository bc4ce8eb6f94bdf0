//! `volumed dlq`: the dead letters, one file per command.

mod list;
mod purge;
mod replay;
mod show;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Result};
use chrono::Utc;
use clap::{Args, Subcommand};
use uuid::Uuid;

use super::Cli;
use crate::dlq::Filter;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters.
    List(list::ListArgs),
    /// Show one dead letter: body, headers, error and replay history.
    Show(show::ShowArgs),
    /// Republish dead letters to their original queue.
    Replay(replay::ReplayArgs),
    /// Delete dead letters.
    Purge(purge::PurgeArgs),
}

/// Filters shared by the commands that select several dead letters.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only this host's (default: every host).
    #[arg(long)]
    pub host: Option<String>,
    /// Only this reason (e.g. retries_exhausted, delivery_limit, malformed_body).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this error code.
    #[arg(long)]
    pub code: Option<String>,
    /// Only this volume's.
    #[arg(long)]
    pub volume: Option<Uuid>,
    /// Only those first seen longer ago than this (30s, 15m, 2h, 7d).
    #[arg(long)]
    pub older_than: Option<String>,
    /// Only those first seen more recently than this.
    #[arg(long)]
    pub newer_than: Option<String>,
    /// dead (default), replayed or any.
    #[arg(long, default_value = "dead")]
    pub status: String,
}

impl FilterArgs {
    pub fn filter(&self) -> Result<Filter> {
        if !["dead", "replayed", "any"].contains(&self.status.as_str()) {
            bail!("--status must be dead, replayed or any");
        }
        let ago = |s: &Option<String>| -> Result<Option<chrono::DateTime<Utc>>> {
            match s {
                None => Ok(None),
                Some(s) => Ok(Some(
                    Utc::now() - chrono::Duration::from_std(parse_age(s)?)?,
                )),
            }
        };
        Ok(Filter {
            host: self.host.clone(),
            reason: self.reason.clone(),
            code: self.code.clone(),
            volume: self.volume,
            before: ago(&self.older_than)?,
            after: ago(&self.newer_than)?,
            status: Some(self.status.clone()),
            ids: Vec::new(),
        })
    }
}

/// Parses an age such as `90s`, `15m`, `2h`, `7d`.
pub fn parse_age(s: &str) -> Result<std::time::Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("age {s:?} must start with a number"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("age {s:?}: use s, m, h or d"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// Asks for confirmation of a destructive step. Without a terminal to ask
/// (a script, CI) the answer is no: pass --yes.
pub fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        eprintln!("{question} -- no terminal to ask; pass --yes to proceed");
        return Ok(false);
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES"))
}

pub async fn run(cli: &Cli, cmd: &DlqCommand) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let pool = crate::db::connect(&config.database_url, 2).await?;
    let code = match cmd {
        DlqCommand::List(a) => list::run(&pool, a).await,
        DlqCommand::Show(a) => show::run(&pool, a).await,
        DlqCommand::Replay(a) => replay::run(&config, &pool, a).await,
        DlqCommand::Purge(a) => purge::run(&pool, a).await,
    };
    pool.close().await;
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("90s").expect("ok").as_secs(), 90);
        assert_eq!(parse_age("2h").expect("ok").as_secs(), 7200);
        assert_eq!(parse_age("7d").expect("ok").as_secs(), 604_800);
        assert!(parse_age("soon").is_err());
        assert!(parse_age("5y").is_err());
    }
}
