//! `volumed reconcile`: compare records with the world, report each drift,
//! and with `--apply` repair what is safe.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::Cli;
use crate::reconcile::Reconciler;

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Repair what is safe to repair (default: report only).
    #[arg(long)]
    pub apply: bool,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: &Cli, a: &ReconcileArgs) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let appliance_vm = config.require_appliance_vm()?;
    let pool = crate::db::connect(&config.database_url, 2).await?;
    let backend = crate::backend::build(&config, appliance_vm)?;
    let r = Reconciler::from_config(&config, appliance_vm, pool.clone(), backend);
    let report = r.run(a.apply).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    pool.close().await;
    // Exit 1 when drift remains for a person to look at.
    let open = report
        .drifts
        .iter()
        .any(|d| !d.repair.starts_with("repaired"));
    Ok(if open {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
