//! The command line: one file per command.

mod bench;
mod completions;
mod config_check;
mod dlq;
mod events;
mod exports;
mod man;
mod migrate;
mod reconcile;
mod request;
mod run;
mod topology;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "volumed",
    version,
    about = "Volume daemon for VM migrations into Apache CloudStack"
)]
pub struct Cli {
    /// Configuration file (TOML); `VOLUMED_*` environment settings override it.
    #[arg(long, global = true, env = "VOLUMED_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume requests, do the work, publish events.
    Run,
    /// Apply database migrations and exit.
    Migrate,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(config_check::ConfigCommand),
    /// Manage volumes of the local backend.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Ask the daemon to attach a volume to a VM.
    Attach(request::AttachArgs),
    /// Ask the daemon to detach a volume.
    Detach(request::DetachArgs),
    /// Print completion events as they are published.
    Events(events::EventsArgs),
    /// List NBD exports with their live status.
    Exports(exports::ExportsArgs),
    /// Dead letters: list, show, replay, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Compare records with the backend, devices and NBD exports; repair
    /// with --apply.
    Reconcile(reconcile::ReconcileArgs),
    /// Measure the daemon against the bare pipeline on the same broker and
    /// database.
    Bench(bench::BenchArgs),
    /// Broker topology as code.
    #[command(subcommand)]
    Topology(topology::TopologyCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Print the manual page volumed(1) as roff, or write every page.
    Man(man::ManArgs),
}

impl Cli {
    pub fn load_config(&self) -> Result<Config> {
        Config::load(self.config.as_deref())
    }
}

/// Runs a parsed command line and returns the process exit code.
pub async fn execute(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Run => run::run(&cli).await,
        Command::Migrate => migrate::run(&cli).await,
        Command::Config(c) => config_check::run(&cli, c),
        Command::Volume(c) => volume::run(&cli, c),
        Command::Attach(a) => request::attach(&cli, a).await,
        Command::Detach(a) => request::detach(&cli, a).await,
        Command::Events(a) => events::run(&cli, a).await,
        Command::Exports(a) => exports::run(&cli, a).await,
        Command::Dlq(c) => dlq::run(&cli, c).await,
        Command::Reconcile(a) => reconcile::run(&cli, a).await,
        Command::Bench(a) => bench::run(&cli, a).await,
        Command::Topology(c) => topology::run(&cli, c),
        Command::Completions(a) => completions::run(a),
        Command::Man(a) => man::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_commands() {
        for args in [
            vec!["volumed", "run"],
            vec!["volumed", "config", "check"],
            vec!["volumed", "volume", "create", "--size", "64MiB"],
            vec![
                "volumed",
                "volume",
                "delete",
                "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3",
            ],
            vec![
                "volumed",
                "attach",
                "--volume",
                "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3",
                "--vm",
                "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3",
                "--wait",
            ],
            vec![
                "volumed",
                "detach",
                "--volume",
                "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3",
            ],
            vec!["volumed", "events", "--json"],
            vec!["volumed", "exports", "--json"],
            vec![
                "volumed",
                "dlq",
                "list",
                "--reason",
                "delivery_limit",
                "--older-than",
                "1h",
            ],
            vec!["volumed", "dlq", "show", "7"],
            vec!["volumed", "reconcile", "--apply", "--json"],
            vec![
                "volumed",
                "bench",
                "--requests",
                "500",
                "--backend",
                "emulator",
                "--vms",
                "20",
            ],
            vec!["volumed", "dlq", "replay", "7", "8", "--dry-run"],
            vec![
                "volumed", "dlq", "replay", "--all", "--host", "oma-1", "--rate", "5", "--yes",
            ],
            vec!["volumed", "dlq", "purge", "--older-than", "7d", "--dry-run"],
            vec!["volumed", "topology", "definitions", "--host", "oma-1"],
            vec!["volumed", "completions", "bash"],
            vec!["volumed", "completions", "zsh"],
            vec!["volumed", "man"],
            vec!["volumed", "man", "--out-dir", "/tmp/man1"],
        ] {
            Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(Cli::try_parse_from(["volumed", "attach", "--volume", "x"]).is_err());
        assert!(Cli::try_parse_from(["volumed", "completions", "cmd.exe"]).is_err());
    }
}
