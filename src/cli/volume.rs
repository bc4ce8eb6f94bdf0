use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use uuid::Uuid;

use super::Cli;
use crate::backend::local::{parse_size, LocalBackend};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a sparse volume under VOLUMED_DATA_DIR and print its id.
    Create {
        /// Size, e.g. 64MiB, 10GiB.
        #[arg(long)]
        size: String,
    },
    /// Delete a volume that is not attached.
    Delete { id: Uuid },
}

pub fn run(cli: &Cli, cmd: &VolumeCommand) -> Result<ExitCode> {
    let config = cli.load_config()?;
    match cmd {
        VolumeCommand::Create { size } => {
            let id = LocalBackend::create_volume(&config.data_dir, parse_size(size)?)?;
            println!("{id}");
        }
        VolumeCommand::Delete { id } => {
            LocalBackend::delete_volume(&config.data_dir, *id)?;
            eprintln!("deleted volume {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
