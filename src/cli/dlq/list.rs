use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use sqlx::PgPool;

use super::FilterArgs;

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(pool: &PgPool, a: &ListArgs) -> Result<ExitCode> {
    let rows = crate::dlq::list(pool, &a.filter.filter()?).await?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>6} {:<10} {:<20} {:<20} {:<36} {:>5} {:<20} STATUS",
        "ID", "HOST", "REASON", "CODE", "VOLUME", "DEATHS", "FIRST SEEN"
    );
    for r in &rows {
        println!(
            "{:>6} {:<10} {:<20} {:<20} {:<36} {:>5} {:<20} {}",
            r.id,
            r.host,
            r.reason,
            r.error_code.as_deref().unwrap_or("-"),
            r.volume_id
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            r.death_count,
            r.first_seen.format("%Y-%m-%d %H:%M:%S"),
            r.status
        );
    }
    eprintln!("{} dead letter(s)", rows.len());
    Ok(ExitCode::SUCCESS)
}
