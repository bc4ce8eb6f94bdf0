use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::Cli;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and print the effective settings, secrets
    /// masked.
    Check,
}

pub fn run(cli: &Cli, cmd: &ConfigCommand) -> Result<ExitCode> {
    match cmd {
        ConfigCommand::Check => {
            let config = cli.load_config()?;
            print!("{}", config.render());
            if config.appliance_vm_id.is_none() {
                eprintln!("warning: VOLUMED_APPLIANCE_VM_ID is not set; `volumed run` needs it");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
