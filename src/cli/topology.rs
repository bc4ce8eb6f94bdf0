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
    /// Print the `rabbitmqctl set_permissions` command that limits one
    /// host's broker user to what its daemon needs.
    Permissions {
        /// Host id (default: VOLUMED_HOST_ID).
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "/")]
        vhost: String,
        /// The broker user (default: volumed-<host>).
        #[arg(long)]
        user: Option<String>,
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
        TopologyCommand::Permissions { host, vhost, user } => {
            let config = cli.load_config()?;
            let host = host.clone().unwrap_or(config.host_id.clone());
            crate::config::validate_host_id(&host)?;
            let user = user.clone().unwrap_or_else(|| format!("volumed-{host}"));
            let p = crate::topology::Permissions::for_host(&host);
            println!(
                "rabbitmqctl set_permissions -p '{vhost}' '{user}' '{}' '{}' '{}'",
                p.configure, p.write, p.read
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
