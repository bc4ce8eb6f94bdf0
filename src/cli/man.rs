use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

use super::Cli;

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write volumed.1 and one page per subcommand (volumed-dlq-replay.1,
    /// ...) into this directory instead of printing volumed(1).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// What the CLI definition does not say: the files, signals and exit codes
/// of `volumed run`, appended to volumed(1) in roff.
const EXTRA: &str = r#".SH ENVIRONMENT
Every setting of the configuration file can be given as a \fBVOLUMED_*\fR
variable, which overrides the file; \fBvolumed config check\fR prints the
effective values with secrets masked.
.SH FILES
.TP
\fI/etc/volumed/volumed.toml\fR
The configuration file when neither \fB\-\-config\fR nor \fBVOLUMED_CONFIG\fR
names one.
.TP
\fI/var/lib/volumed\fR
State of the local backend and the default place of the NBD export
directory or configuration.
.SH SIGNALS
\fBvolumed run\fR stops gracefully on SIGTERM or SIGINT (a second one exits
at once with status 130) and re\-reads its configuration on SIGHUP.
.SH EXIT STATUS
0 on success; 2 when a command fails, with the reason on standard error.
"#;

/// `volumed man`: the manual page volumed(1), generated from the CLI
/// definition, as roff on stdout (`volumed man | man -l -` reads it), or
/// every page into a directory with `--out-dir`.
pub fn run(args: &ManArgs) -> Result<ExitCode> {
    match &args.out_dir {
        Some(dir) => write_pages(dir)?,
        None => std::io::stdout().lock().write_all(&render()?)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn render() -> Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    out.extend_from_slice(EXTRA.as_bytes());
    Ok(out)
}

fn write_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the pages into {}", dir.display()))?;
    // The top page with the sections the definition does not carry.
    std::fs::write(dir.join("volumed.1"), render()?)
        .with_context(|| format!("cannot write {}", dir.join("volumed.1").display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_is_roff_and_lists_the_subcommands() {
        let page = String::from_utf8(render().expect("rendered")).expect("utf-8");
        assert!(page.contains(".TH volumed 1"), "{page}");
        for sub in ["run", "dlq", "reconcile", "topology", "completions", "man"] {
            assert!(
                page.contains(&format!("volumed\\-{sub}(1)")),
                "{sub} missing"
            );
        }
        assert!(page.contains(".SH SIGNALS"), "{page}");
    }

    #[test]
    fn out_dir_writes_a_page_per_subcommand() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_pages(dir.path()).expect("pages written");
        for page in [
            "volumed.1",
            "volumed-dlq.1",
            "volumed-dlq-replay.1",
            "volumed-run.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).expect(page);
            assert!(text.contains(".TH"), "{page}");
        }
        let top = std::fs::read_to_string(dir.path().join("volumed.1")).expect("top");
        assert!(top.contains(".SH FILES"));
    }
}
