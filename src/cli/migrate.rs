use std::process::ExitCode;

use anyhow::Result;

use super::Cli;

/// `volumed migrate`: apply the schema migrations (also done by `run`).
pub async fn run(cli: &Cli) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let pool = crate::db::connect(&config.database_url, 2).await?;
    crate::db::migrate(&pool).await?;
    pool.close().await;
    println!("database schema is up to date");
    Ok(ExitCode::SUCCESS)
}
