//! Logging set-up: structured `tracing` output to stderr, text or JSON.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. The filter comes from `VOLUMED_LOG`,
/// else `RUST_LOG`; the default is `info` for volumed with the AMQP and SQL
/// drivers at `warn`. An unparsable filter is reported and the default used.
pub fn init(format: LogFormat) {
    const DEFAULT: &str = "info,lapin=warn,sqlx=warn";
    let spec = ["VOLUMED_LOG", "RUST_LOG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
    let filter = match spec.as_deref().map(EnvFilter::try_new) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("volumed: invalid log filter {spec:?} ({e}); using {DEFAULT:?}");
            EnvFilter::new(DEFAULT)
        }
        None => EnvFilter::new(DEFAULT),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
