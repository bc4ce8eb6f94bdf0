use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::Cli;
use crate::topology::Topology;

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Print the RabbitMQ definitions file for one host
    /// (`rabbitmqctl import_definitions FILE`).
    Definitions {
        /// Host id (default: VOLUMED_HOST_ID).
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
}

pub fn run(cli: &Cli, cmd: &TopologyCommand) -> Result<ExitCode> {
    match cmd {
        TopologyCommand::Definitions { host, vhost } => {
            let config = cli.load_config()?;
            let host = host.clone().unwrap_or(config.host_id.clone());
            crate::config::validate_host_id(&host)?;
            let doc = Topology::for_host(&host, config.delivery_limit, &config.retry_delays)
                .definitions(vhost);
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
