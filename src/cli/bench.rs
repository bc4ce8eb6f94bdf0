//! `volumed bench`: see `crate::bench`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::Cli;
use crate::bench::{self, Plan};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Requests to publish: all at once, or with `--queued`, that many in
    /// all.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Volumes they are spread over (attach, detach, attach, … per volume).
    #[arg(long, default_value_t = 200)]
    pub volumes: usize,
    /// VMs the volumes are attached to; the first is the appliance.
    #[arg(long, default_value_t = 1)]
    pub vms: usize,
    /// `local` or `emulator` (the CloudStack API emulator).
    #[arg(long, default_value = "local")]
    pub backend: String,
    /// Backend latency per change (local) or job latency (emulator), ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// `nbdkit` or `nbd-server`.
    #[arg(long, default_value = "nbdkit")]
    pub engine: String,
    /// The daemon's `VOLUMED_WORKERS`; the floor runs as many at once.
    #[arg(long, default_value_t = crate::config::DEFAULT_WORKERS)]
    pub workers: usize,
    /// Where the daemon's own files go (export directory, nbd-server
    /// configuration, pidfile): put it on the file system the appliance
    /// keeps `VOLUMED_NBD_CONFIG` on. Default: the temporary directory.
    #[arg(long)]
    pub state_dir: Option<std::path::PathBuf>,
    /// Skip the floor measurement.
    #[arg(long)]
    pub no_floor: bool,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Draw the latency distribution and the throughput over time to this
    /// PNG file.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// Run the whole measurement (daemon and floor) this many times, one
    /// after another, and report the median round, with every round's
    /// headline figures.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Keep this many requests in flight, publishing one more as each
    /// event arrives, instead of one burst of all of them, in the daemon
    /// and in the floor alike; the sustained rate is then the rate at that
    /// depth. Needs `--requests` of at least twice as many.
    #[arg(long)]
    pub queued: Option<usize>,
}

pub async fn run(cli: &Cli, a: &BenchArgs) -> Result<ExitCode> {
    let config = cli.load_config()?;
    let plan = Plan {
        requests: a.requests,
        volumes: a.volumes,
        vms: a.vms,
        backend: a.backend.clone(),
        latency: Duration::from_millis(a.latency_ms),
        engine: a.engine.clone(),
        workers: a.workers,
        floor: !a.no_floor,
        state_dir: a.state_dir.clone(),
        queued: a.queued,
    };
    plan.check()?;
    let mut reports = Vec::with_capacity(a.rounds as usize);
    for i in 0..a.rounds {
        if a.rounds > 1 {
            eprintln!("volumed bench: round {} of {}", i + 1, a.rounds);
        }
        reports.push(bench::run(&config, &plan).await?);
    }
    let rounds: Vec<bench::Round> = reports.iter().map(bench::Round::of).collect();
    let failed: usize = rounds.iter().map(|r| r.failed_events).sum();
    let median = bench::median_round(&rounds).unwrap_or(0);
    let mut report = reports.swap_remove(median);
    if rounds.len() > 1 {
        report.rounds = rounds;
    }
    if let Some(file) = &a.plot {
        crate::plot::draw(file, "volumed", &report.samples)?;
        eprintln!("plot written to {}", file.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    // A failed event in any round fails the run, not only in the median.
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
