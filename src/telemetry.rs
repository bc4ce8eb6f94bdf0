//! Logging set-up: structured `tracing` output to stderr, text or JSON,
//! with a filter that a configuration reload can replace.

use std::sync::OnceLock;

use anyhow::{Context, Result};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The filter used when neither `VOLUMED_LOG` nor `RUST_LOG` gives one.
pub const DEFAULT_FILTER: &str = "info,lapin=warn,sqlx=warn";

/// The handle that swaps the filter of the installed subscriber; set by the
/// first [`init`] only.
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. The filter is `configured` (the
/// `VOLUMED_LOG` setting, already validated with the configuration), else
/// `RUST_LOG`, else [`DEFAULT_FILTER`]; an unparsable `RUST_LOG` is reported
/// and the default used.
pub fn init(format: LogFormat, configured: Option<&str>) {
    let filter = match configured {
        // Validated by the configuration: a failure here is not expected,
        // but falls back rather than running without logs.
        Some(spec) => EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER)),
        None => rust_log_or_default(),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // Colours only for a person at a terminal: under systemd, in a file or
    // a pipe, escape codes would land in the log.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // A second init (tests) is harmless: keep the first.
    let installed = match format {
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(true))
            .try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

fn rust_log_or_default() -> EnvFilter {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    match spec.as_deref().map(EnvFilter::try_new) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("volumed: invalid log filter {spec:?} ({e}); using {DEFAULT_FILTER:?}");
            EnvFilter::new(DEFAULT_FILTER)
        }
        None => EnvFilter::new(DEFAULT_FILTER),
    }
}

/// Checks a filter as [`init`] and [`set_filter`] would parse it.
pub fn parse_filter(spec: &str) -> Result<()> {
    EnvFilter::try_new(spec)
        .map(drop)
        .with_context(|| format!("{spec:?} is not a log filter"))
}

/// Replaces the filter of the running subscriber (a reload): `configured`
/// as in [`init`]. Fails when no subscriber was installed by [`init`].
pub fn set_filter(configured: Option<&str>) -> Result<()> {
    let filter = match configured {
        Some(spec) => {
            EnvFilter::try_new(spec).with_context(|| format!("{spec:?} is not a log filter"))?
        }
        None => rust_log_or_default(),
    };
    FILTER
        .get()
        .context("no reloadable log subscriber is installed")?
        .reload(filter)
        .context("cannot replace the log filter")
}
