use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = volumed::cli::Cli::parse();
    match volumed::cli::execute(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("volumed: {e:#}");
            ExitCode::from(2)
        }
    }
}
