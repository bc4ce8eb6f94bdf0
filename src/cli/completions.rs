use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: Shell,
}

/// `volumed completions SHELL`: the completion script, generated from the
/// CLI definition, on stdout. For example
/// `volumed completions bash > /usr/share/bash-completion/completions/volumed`.
pub fn run(args: &CompletionsArgs) -> Result<ExitCode> {
    let script = render(args.shell);
    std::io::stdout().lock().write_all(&script)?;
    Ok(ExitCode::SUCCESS)
}

fn render(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "volumed", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_the_subcommands() {
        let bash = String::from_utf8(render(Shell::Bash)).expect("utf-8");
        assert!(bash.contains("complete -F _volumed"), "{bash}");
        for word in ["dlq", "reconcile", "replay", "--older-than", "completions"] {
            assert!(bash.contains(word), "bash completion lacks {word}");
        }
        for shell in [Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(render(shell)).expect("utf-8");
            assert!(
                script.contains("dlq") && script.contains("reconcile"),
                "{shell}"
            );
        }
    }
}
