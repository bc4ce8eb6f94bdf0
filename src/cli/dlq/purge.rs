use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use sqlx::PgPool;

use super::{confirm, FilterArgs};

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print what would be deleted and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

pub async fn run(pool: &PgPool, a: &PurgeArgs) -> Result<ExitCode> {
    let filter = a.filter.filter()?;
    let rows = crate::dlq::list(pool, &filter).await?;
    println!("plan: delete {} dead letter(s):", rows.len());
    for r in &rows {
        println!(
            "  {} {} ({}) first seen {}",
            r.id,
            r.message_id.as_deref().unwrap_or("-"),
            r.reason,
            r.first_seen.to_rfc3339()
        );
    }
    if rows.is_empty() || a.dry_run {
        if a.dry_run {
            println!("dry run: nothing deleted");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !a.yes && !confirm(&format!("delete {} dead letter(s)?", rows.len()))? {
        eprintln!("nothing deleted");
        return Ok(ExitCode::from(1));
    }
    // Only what was listed: a dead letter arriving meanwhile is kept.
    let mut filter = filter;
    filter.ids = rows.iter().map(|r| r.id).collect();
    let n = crate::dlq::purge(pool, &filter).await?;
    println!("deleted {n} dead letter(s)");
    Ok(ExitCode::SUCCESS)
}
