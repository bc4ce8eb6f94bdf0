//! Typed configuration: a TOML file, then `VOLUMED_*` environment overrides,
//! validated once at start-up.
//!
//! Every setting has the same name in both places: `host_id` in the file is
//! `VOLUMED_HOST_ID` in the environment. URLs that may carry passwords are
//! kept in [`SecretUrl`], whose `Debug` and `Display` mask the password.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use uuid::Uuid;

/// A URL whose password must never reach a log line or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(s: impl Into<String>) -> Self {
        SecretUrl(s.into())
    }

    /// The URL with its password, for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `****`.
    pub fn masked(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut u) => {
                if u.password().is_some() {
                    // Cannot fail: a URL that has a password can hold one.
                    let _ = u.set_password(Some("****"));
                }
                u.to_string()
            }
            // An unparsable URL is shown as nothing at all: it might be a
            // password pasted into the wrong setting.
            Err(_) => "<unparsable URL hidden>".into(),
        }
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

/// A secret string (an API secret key): never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"****\"")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("****")
    }
}

/// TLS settings of the broker connection (`VOLUMED_AMQP_CA_FILE`,
/// `VOLUMED_AMQP_CLIENT_CERT`, `VOLUMED_AMQP_CLIENT_CERT_PASSWORD`), used
/// with an `amqps://` URL. The files are read once at load time, so a
/// missing or unreadable one stops the daemon at start-up with its name
/// rather than at the first reconnection.
#[derive(Clone, Default)]
pub struct AmqpTls {
    /// PEM certificates trusted in addition to the system's.
    pub ca_file: Option<PathBuf>,
    pub ca_pem: Option<String>,
    /// A PKCS#12 bundle with the client certificate and its key.
    pub client_cert: Option<PathBuf>,
    pub client_cert_der: Option<Vec<u8>>,
    pub client_cert_password: Secret,
}

impl std::fmt::Debug for AmqpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTls")
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_cert_password", &self.client_cert_password)
            .finish()
    }
}

impl AmqpTls {
    /// Reads the files named by the settings; `url` must be `amqps://`
    /// when any is set, since they would otherwise be silently unused.
    fn load(
        url: &SecretUrl,
        ca_file: Option<PathBuf>,
        client_cert: Option<PathBuf>,
        password: Option<String>,
    ) -> Result<AmqpTls> {
        if (ca_file.is_some() || client_cert.is_some()) && !url.expose().starts_with("amqps://") {
            bail!(
                "VOLUMED_AMQP_CA_FILE / VOLUMED_AMQP_CLIENT_CERT need an amqps:// VOLUMED_AMQP_URL"
            );
        }
        let ca_pem = match &ca_file {
            Some(p) => {
                let pem = std::fs::read_to_string(p).with_context(|| {
                    format!("VOLUMED_AMQP_CA_FILE={}: cannot read", p.display())
                })?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    bail!(
                        "VOLUMED_AMQP_CA_FILE={}: no PEM certificate in the file",
                        p.display()
                    );
                }
                Some(pem)
            }
            None => None,
        };
        let client_cert_der = match &client_cert {
            Some(p) => Some(std::fs::read(p).with_context(|| {
                format!("VOLUMED_AMQP_CLIENT_CERT={}: cannot read", p.display())
            })?),
            None => None,
        };
        Ok(AmqpTls {
            ca_file,
            ca_pem,
            client_cert,
            client_cert_der,
            client_cert_password: Secret::new(password.unwrap_or_default()),
        })
    }
}

/// CloudStack API settings (`VOLUMED_CLOUDSTACK_*`).
#[derive(Debug, Clone)]
pub struct CloudStackConfig {
    /// The API endpoint, e.g. `https://cloud.example/client/api`.
    pub url: String,
    pub api_key: String,
    pub secret_key: Secret,
    /// One HTTP request, connection included.
    pub timeout: Duration,
    /// How long an asynchronous job is polled before the operation gives up.
    pub job_timeout: Duration,
    /// Verify the server's TLS certificate (on unless explicitly disabled).
    pub tls_verify: bool,
    /// PEM certificates trusted for the API in addition to the system's
    /// (`VOLUMED_CLOUDSTACK_CA_FILE`), read at load time.
    pub ca_file: Option<PathBuf>,
    pub ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Local,
    CloudStack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub host_id: String,
    pub amqp_url: SecretUrl,
    pub amqp_tls: AmqpTls,
    pub database_url: SecretUrl,
    /// Whether `volumed run` applies the migrations at start-up; when not,
    /// it only checks that they were applied (`volumed migrate`), so its
    /// database role needs no right to change the schema.
    pub database_migrate: bool,
    pub backend: BackendKind,
    pub data_dir: PathBuf,
    pub device_dir: PathBuf,
    /// Required by `volumed run`; other commands work without it.
    pub appliance_vm_id: Option<Uuid>,
    pub workers: usize,
    /// Unacknowledged deliveries per worker (the channel prefetch is
    /// `workers × prefetch_per_worker`).
    pub prefetch_per_worker: u16,
    pub device_timeout: Duration,
    pub max_message_bytes: usize,
    pub shutdown_timeout: Duration,
    pub outbox_poll_interval: Duration,
    pub delivery_limit: u32,
    pub local_latency: Duration,
    pub log_format: LogFormat,
    /// The log filter (`VOLUMED_LOG`, file key `log`); `None` leaves it to
    /// `RUST_LOG` or the default. Validated here, so a reload with a bad
    /// filter is refused as a whole.
    pub log_filter: Option<String>,
    pub nbd: NbdConfig,
    /// Present when `VOLUMED_BACKEND=cloudstack`.
    pub cloudstack: Option<CloudStackConfig>,
    /// Total attempts of a request whose failures are transient (the first
    /// one included) before it fails for good.
    pub retry_attempts: u32,
    /// The delay steps of the retry queues, shortest first; retry `n` waits
    /// about step `min(n, last)`.
    pub retry_delays: Vec<Duration>,
    /// Where `/healthz` and `/readyz` are served.
    pub http_listen: std::net::SocketAddr,
    /// How often the daemon reconciles after its start-up run; `None`
    /// (`VOLUMED_RECONCILE_INTERVAL_SECS=0`) runs it at start-up only.
    pub reconcile_interval: Option<Duration>,
    /// Whether the daemon's own reconciliations repair what is safe.
    pub reconcile_apply: bool,
    /// A running operation untouched this long is abandoned by the
    /// reconciler.
    pub stuck_after: Duration,
}

/// Operations run at once unless `VOLUMED_WORKERS` says otherwise. A
/// migration wave spans tens of VMs and hundreds of volumes, and a request
/// waiting for its VM's turn (cloud changes of one VM run one at a time)
/// holds its slot, so the slots must cover the VMs of a wave; the more
/// operations run at once, the more of them share each grouped journal
/// statement and export batch. A slot is a task, not a thread or a
/// connection, and the cloud still runs one change per VM at a time
/// whatever the number of slots.
pub const DEFAULT_WORKERS: usize = 128;

/// The default retry steps: with the default 5 attempts, each of the 4
/// retries has its own step.
pub const DEFAULT_RETRY_DELAYS: &str = "1s,5s,30s,2m";

/// Parses `1s,5s,30s,2m` (units ms, s, m, h).
pub fn parse_delays(s: &str) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let split = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        let (num, unit) = part.split_at(split);
        let n: u64 = num
            .parse()
            .with_context(|| format!("retry delay {part:?} must start with a number"))?;
        let too_long = || anyhow::anyhow!("retry delay {part:?} is out of range: 10ms to 24h");
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_long)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_long)?),
            other => bail!("retry delay {part:?} has unknown unit {other:?}: use ms, s, m or h"),
        };
        if d < Duration::from_millis(10) || d > Duration::from_secs(86_400) {
            bail!("retry delay {part:?} is out of range: 10ms to 24h");
        }
        out.push(d);
    }
    if out.is_empty() || out.len() > 10 {
        bail!("1 to 10 retry delays are needed, got {}", out.len());
    }
    if out.windows(2).any(|w| w[0] >= w[1]) {
        bail!("retry delays must grow: {s:?}");
    }
    Ok(out)
}

/// The name part a delay gives its retry queue: `500ms`, `5s`, `2m`.
pub fn delay_label(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdEngineKind {
    Nbdkit,
    NbdServer,
}

impl NbdEngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NbdEngineKind::Nbdkit => "nbdkit",
            NbdEngineKind::NbdServer => "nbd-server",
        }
    }
}

/// NBD export settings (`VOLUMED_NBD_*`).
#[derive(Debug, Clone)]
pub struct NbdConfig {
    pub engine: NbdEngineKind,
    /// nbdkit: the export directory; nbd-server: the base configuration file.
    pub config: PathBuf,
    pub port: u16,
    pub listen: String,
    /// nbd-server: the client addresses written into each export's authfile.
    pub allow: Vec<String>,
    /// Whether volumed starts, restarts and stops the server itself.
    pub manage: bool,
    pub pidfile: PathBuf,
    /// nbdkit: a TLS pre-shared-keys file; TLS is then required.
    pub tls_psk: Option<PathBuf>,
    /// How long the export manager waits for more changes to batch them
    /// under one lock hold and one reload.
    pub batch_window: Duration,
    /// Deadline of one live check.
    pub check_timeout: Duration,
    /// How long a detach waits for clients still connected to a withdrawn
    /// export to disconnect before it fails with `export_busy`.
    pub drain_timeout: Duration,
}

/// The file form: every field optional, unknown keys refused so a typo is
/// reported instead of silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host_id: Option<String>,
    amqp_url: Option<String>,
    amqp_ca_file: Option<PathBuf>,
    amqp_client_cert: Option<PathBuf>,
    amqp_client_cert_password: Option<String>,
    database_url: Option<String>,
    database_migrate: Option<bool>,
    backend: Option<String>,
    data_dir: Option<PathBuf>,
    device_dir: Option<PathBuf>,
    appliance_vm_id: Option<String>,
    workers: Option<u64>,
    prefetch_per_worker: Option<u64>,
    device_timeout_secs: Option<u64>,
    max_message_bytes: Option<u64>,
    shutdown_timeout_secs: Option<u64>,
    outbox_poll_ms: Option<u64>,
    delivery_limit: Option<u64>,
    local_latency_ms: Option<u64>,
    log_format: Option<String>,
    log: Option<String>,
    nbd_engine: Option<String>,
    nbd_config: Option<PathBuf>,
    nbd_port: Option<u64>,
    nbd_listen: Option<String>,
    nbd_allow: Option<Vec<String>>,
    nbd_manage: Option<bool>,
    nbd_pidfile: Option<PathBuf>,
    nbd_tls_psk: Option<PathBuf>,
    nbd_batch_window_ms: Option<u64>,
    nbd_check_timeout_secs: Option<u64>,
    nbd_drain_timeout_secs: Option<u64>,
    cloudstack_url: Option<String>,
    cloudstack_api_key: Option<String>,
    cloudstack_secret_key: Option<String>,
    cloudstack_timeout_secs: Option<u64>,
    cloudstack_job_timeout_secs: Option<u64>,
    cloudstack_tls_verify: Option<bool>,
    cloudstack_ca_file: Option<PathBuf>,
    retry_attempts: Option<u64>,
    retry_delays: Option<String>,
    http_listen: Option<String>,
    reconcile_interval_secs: Option<u64>,
    reconcile_apply: Option<bool>,
    stuck_after_secs: Option<u64>,
}

/// Where the file is looked for when neither `--config` nor
/// `VOLUMED_CONFIG` names one; a missing default file is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/volumed/volumed.toml";

/// The names of the environment settings, in the order `config check`
/// prints them.
pub const ENV_NAMES: &[&str] = &[
    "VOLUMED_HOST_ID",
    "VOLUMED_AMQP_URL",
    "VOLUMED_AMQP_CA_FILE",
    "VOLUMED_AMQP_CLIENT_CERT",
    "VOLUMED_AMQP_CLIENT_CERT_PASSWORD",
    "VOLUMED_DATABASE_URL",
    "VOLUMED_DATABASE_MIGRATE",
    "VOLUMED_BACKEND",
    "VOLUMED_DATA_DIR",
    "VOLUMED_DEVICE_DIR",
    "VOLUMED_APPLIANCE_VM_ID",
    "VOLUMED_WORKERS",
    "VOLUMED_PREFETCH_PER_WORKER",
    "VOLUMED_DEVICE_TIMEOUT_SECS",
    "VOLUMED_MAX_MESSAGE_BYTES",
    "VOLUMED_SHUTDOWN_TIMEOUT_SECS",
    "VOLUMED_OUTBOX_POLL_MS",
    "VOLUMED_DELIVERY_LIMIT",
    "VOLUMED_LOCAL_LATENCY_MS",
    "VOLUMED_LOG_FORMAT",
    "VOLUMED_LOG",
    "VOLUMED_NBD_ENGINE",
    "VOLUMED_NBD_CONFIG",
    "VOLUMED_NBD_PORT",
    "VOLUMED_NBD_LISTEN",
    "VOLUMED_NBD_ALLOW",
    "VOLUMED_NBD_MANAGE",
    "VOLUMED_NBD_PIDFILE",
    "VOLUMED_NBD_TLS_PSK",
    "VOLUMED_NBD_BATCH_WINDOW_MS",
    "VOLUMED_NBD_CHECK_TIMEOUT_SECS",
    "VOLUMED_NBD_DRAIN_TIMEOUT_SECS",
    "VOLUMED_CLOUDSTACK_URL",
    "VOLUMED_CLOUDSTACK_API_KEY",
    "VOLUMED_CLOUDSTACK_SECRET_KEY",
    "VOLUMED_CLOUDSTACK_TIMEOUT_SECS",
    "VOLUMED_CLOUDSTACK_JOB_TIMEOUT_SECS",
    "VOLUMED_CLOUDSTACK_TLS_VERIFY",
    "VOLUMED_CLOUDSTACK_CA_FILE",
    "VOLUMED_RETRY_ATTEMPTS",
    "VOLUMED_RETRY_DELAYS",
    "VOLUMED_HTTP_LISTEN",
    "VOLUMED_RECONCILE_INTERVAL_SECS",
    "VOLUMED_RECONCILE_APPLY",
    "VOLUMED_STUCK_AFTER_SECS",
];

impl Config {
    /// Loads the file (explicit path, else `VOLUMED_CONFIG`, else the default
    /// path when it exists), then applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::load_with(path, &env)
    }

    /// Like [`Config::load`] with an injectable environment, for tests.
    pub fn load_with(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let explicit = path
            .map(Path::to_path_buf)
            .or_else(|| env("VOLUMED_CONFIG").map(PathBuf::from));
        let file = match explicit {
            Some(p) => read_file(&p)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                read_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => FileConfig::default(),
        };

        let s = |name: &str, file: Option<String>| env(name).or(file);
        let flag = |name: &str, file: Option<bool>, default: bool| -> Result<bool> {
            match env(name).as_deref() {
                None => Ok(file.unwrap_or(default)),
                Some("true" | "1" | "yes") => Ok(true),
                Some("false" | "0" | "no") => Ok(false),
                Some(v) => bail!("{name}={v:?} is not a boolean: use true or false"),
            }
        };
        let n = |name: &str, file: Option<u64>| -> Result<Option<u64>> {
            match env(name) {
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .map(Some)
                    .with_context(|| format!("{name}={v:?} is not a non-negative integer")),
                None => Ok(file),
            }
        };

        let host_id = match s("VOLUMED_HOST_ID", file.host_id) {
            Some(h) => h,
            None => nix::unistd::gethostname()
                .context("VOLUMED_HOST_ID is not set and the hostname cannot be read")?
                .to_string_lossy()
                .into_owned(),
        };
        validate_host_id(&host_id)?;

        let backend = match s("VOLUMED_BACKEND", file.backend).as_deref() {
            None | Some("local") => BackendKind::Local,
            Some("cloudstack") => BackendKind::CloudStack,
            Some(other) => {
                bail!("VOLUMED_BACKEND={other:?} is not a backend: use \"local\" or \"cloudstack\"")
            }
        };
        let appliance_vm_id = match s("VOLUMED_APPLIANCE_VM_ID", file.appliance_vm_id) {
            None => None,
            Some(v) => Some(crate::contract::parse_uuid(v.trim()).with_context(|| {
                format!("VOLUMED_APPLIANCE_VM_ID={v:?} is not a hyphenated UUID")
            })?),
        };
        let workers = n("VOLUMED_WORKERS", file.workers)?.unwrap_or(DEFAULT_WORKERS as u64);
        if !(1..=256).contains(&workers) {
            bail!("VOLUMED_WORKERS={workers} is out of range: 1 to 256");
        }
        let prefetch_per_worker =
            n("VOLUMED_PREFETCH_PER_WORKER", file.prefetch_per_worker)?.unwrap_or(2);
        if !(1..=64).contains(&prefetch_per_worker) {
            bail!("VOLUMED_PREFETCH_PER_WORKER={prefetch_per_worker} is out of range: 1 to 64");
        }
        let delivery_limit = n("VOLUMED_DELIVERY_LIMIT", file.delivery_limit)?.unwrap_or(10);
        if !(1..=1000).contains(&delivery_limit) {
            bail!("VOLUMED_DELIVERY_LIMIT={delivery_limit} is out of range: 1 to 1000");
        }
        let max_message_bytes =
            n("VOLUMED_MAX_MESSAGE_BYTES", file.max_message_bytes)?.unwrap_or(64 * 1024);
        if !(256..=16 * 1024 * 1024).contains(&max_message_bytes) {
            bail!("VOLUMED_MAX_MESSAGE_BYTES={max_message_bytes} is out of range: 256 to 16 MiB");
        }
        // Every wait is bounded by a day: longer is a typo, and a huge value
        // would overflow the deadline arithmetic.
        let secs = |name: &str, file: Option<u64>, default: u64| -> Result<Duration> {
            let v = n(name, file)?.unwrap_or(default);
            if v > 86_400 {
                bail!("{name}={v} is out of range: at most 86400 seconds");
            }
            Ok(Duration::from_secs(v))
        };
        let millis = |name: &str, file: Option<u64>, default: u64| -> Result<Duration> {
            let v = n(name, file)?.unwrap_or(default);
            if v > 86_400_000 {
                bail!("{name}={v} is out of range: at most 86400000 ms");
            }
            Ok(Duration::from_millis(v))
        };
        let log_format = match s("VOLUMED_LOG_FORMAT", file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("VOLUMED_LOG_FORMAT={other:?} is not a format: use text or json"),
        };
        let log_filter = s("VOLUMED_LOG", file.log).filter(|v| !v.trim().is_empty());
        if let Some(f) = &log_filter {
            crate::telemetry::parse_filter(f).context("VOLUMED_LOG")?;
        }

        let amqp_url = SecretUrl::new(
            s("VOLUMED_AMQP_URL", file.amqp_url)
                .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        );
        check_url(&amqp_url, "VOLUMED_AMQP_URL", &["amqp", "amqps"])?;
        let amqp_tls = AmqpTls::load(
            &amqp_url,
            s("VOLUMED_AMQP_CA_FILE", None)
                .map(PathBuf::from)
                .or(file.amqp_ca_file),
            s("VOLUMED_AMQP_CLIENT_CERT", None)
                .map(PathBuf::from)
                .or(file.amqp_client_cert),
            s(
                "VOLUMED_AMQP_CLIENT_CERT_PASSWORD",
                file.amqp_client_cert_password,
            ),
        )?;
        let database_url = SecretUrl::new(
            s("VOLUMED_DATABASE_URL", file.database_url)
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/volumed".into()),
        );
        check_url(
            &database_url,
            "VOLUMED_DATABASE_URL",
            &["postgres", "postgresql"],
        )?;

        let database_migrate = flag("VOLUMED_DATABASE_MIGRATE", file.database_migrate, true)?;

        let data_dir = s("VOLUMED_DATA_DIR", None)
            .map(PathBuf::from)
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/volumed"));
        if !data_dir.is_absolute() {
            bail!(
                "VOLUMED_DATA_DIR={} must be an absolute path",
                data_dir.display()
            );
        }
        let nbd = {
            let engine = match s("VOLUMED_NBD_ENGINE", file.nbd_engine).as_deref() {
                None | Some("nbdkit") => NbdEngineKind::Nbdkit,
                Some("nbd-server") => NbdEngineKind::NbdServer,
                Some(other) => bail!(
                    "VOLUMED_NBD_ENGINE={other:?} is not an engine: use \"nbdkit\" or \"nbd-server\""
                ),
            };
            let port = n("VOLUMED_NBD_PORT", file.nbd_port)?.unwrap_or(10809);
            if !(1..=65535).contains(&port) {
                bail!("VOLUMED_NBD_PORT={port} is not a TCP port");
            }
            let listen =
                s("VOLUMED_NBD_LISTEN", file.nbd_listen).unwrap_or_else(|| "127.0.0.1".into());
            if listen.parse::<std::net::IpAddr>().is_err() {
                bail!("VOLUMED_NBD_LISTEN={listen:?} is not an IP address");
            }
            let allow: Vec<String> = match env("VOLUMED_NBD_ALLOW") {
                Some(v) => v
                    .split(',')
                    .map(|a| a.trim().to_owned())
                    .filter(|a| !a.is_empty())
                    .collect(),
                None => file.nbd_allow.unwrap_or_else(|| vec!["127.0.0.1".into()]),
            };
            for a in &allow {
                validate_allow(a)?;
            }
            let manage = flag("VOLUMED_NBD_MANAGE", file.nbd_manage, true)?;
            let default_config = match engine {
                NbdEngineKind::Nbdkit => data_dir.join("exports"),
                NbdEngineKind::NbdServer => data_dir.join("nbd-server").join("config"),
            };
            let config = s("VOLUMED_NBD_CONFIG", None)
                .map(PathBuf::from)
                .or(file.nbd_config)
                .unwrap_or(default_config);
            if !config.is_absolute() {
                bail!(
                    "VOLUMED_NBD_CONFIG={} must be an absolute path",
                    config.display()
                );
            }
            let pidfile = s("VOLUMED_NBD_PIDFILE", None)
                .map(PathBuf::from)
                .or(file.nbd_pidfile)
                .unwrap_or_else(|| data_dir.join(format!("{}.pid", engine.as_str())));
            let tls_psk = s("VOLUMED_NBD_TLS_PSK", None)
                .map(PathBuf::from)
                .or(file.nbd_tls_psk);
            if tls_psk.is_some() && engine == NbdEngineKind::NbdServer {
                bail!("VOLUMED_NBD_TLS_PSK applies to the nbdkit engine only");
            }
            NbdConfig {
                engine,
                config,
                port: port as u16,
                listen,
                allow,
                manage,
                pidfile,
                tls_psk,
                batch_window: millis("VOLUMED_NBD_BATCH_WINDOW_MS", file.nbd_batch_window_ms, 200)?,
                check_timeout: secs(
                    "VOLUMED_NBD_CHECK_TIMEOUT_SECS",
                    file.nbd_check_timeout_secs,
                    10,
                )?,
                drain_timeout: secs(
                    "VOLUMED_NBD_DRAIN_TIMEOUT_SECS",
                    file.nbd_drain_timeout_secs,
                    30,
                )?,
            }
        };

        let cloudstack = if backend == BackendKind::CloudStack {
            let need = |name: &str, v: Option<String>| {
                v.with_context(|| format!("{name} is required with VOLUMED_BACKEND=cloudstack"))
            };
            let url = need(
                "VOLUMED_CLOUDSTACK_URL",
                s("VOLUMED_CLOUDSTACK_URL", file.cloudstack_url),
            )?;
            match url::Url::parse(&url) {
                Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
                _ => bail!("VOLUMED_CLOUDSTACK_URL={url:?} is not an http(s) URL"),
            }
            let tls_verify = flag(
                "VOLUMED_CLOUDSTACK_TLS_VERIFY",
                file.cloudstack_tls_verify,
                true,
            )?;
            let ca_file = s("VOLUMED_CLOUDSTACK_CA_FILE", None)
                .map(PathBuf::from)
                .or(file.cloudstack_ca_file);
            let ca_pem = match &ca_file {
                Some(p) => Some(std::fs::read(p).with_context(|| {
                    format!("VOLUMED_CLOUDSTACK_CA_FILE={}: cannot read", p.display())
                })?),
                None => None,
            };
            Some(CloudStackConfig {
                url,
                api_key: need(
                    "VOLUMED_CLOUDSTACK_API_KEY",
                    s("VOLUMED_CLOUDSTACK_API_KEY", file.cloudstack_api_key),
                )?,
                secret_key: Secret::new(need(
                    "VOLUMED_CLOUDSTACK_SECRET_KEY",
                    s("VOLUMED_CLOUDSTACK_SECRET_KEY", file.cloudstack_secret_key),
                )?),
                timeout: secs(
                    "VOLUMED_CLOUDSTACK_TIMEOUT_SECS",
                    file.cloudstack_timeout_secs,
                    30,
                )?,
                job_timeout: secs(
                    "VOLUMED_CLOUDSTACK_JOB_TIMEOUT_SECS",
                    file.cloudstack_job_timeout_secs,
                    600,
                )?,
                tls_verify,
                ca_file,
                ca_pem,
            })
        } else {
            None
        };

        let retry_attempts = n("VOLUMED_RETRY_ATTEMPTS", file.retry_attempts)?.unwrap_or(5);
        if !(1..=100).contains(&retry_attempts) {
            bail!("VOLUMED_RETRY_ATTEMPTS={retry_attempts} is out of range: 1 to 100");
        }
        let delays_spec = s("VOLUMED_RETRY_DELAYS", file.retry_delays)
            .unwrap_or_else(|| DEFAULT_RETRY_DELAYS.into());
        let retry_delays = parse_delays(&delays_spec)
            .with_context(|| format!("VOLUMED_RETRY_DELAYS={delays_spec:?}"))?;

        let http_spec =
            s("VOLUMED_HTTP_LISTEN", file.http_listen).unwrap_or_else(|| "127.0.0.1:8090".into());
        let http_listen: std::net::SocketAddr = http_spec
            .parse()
            .with_context(|| format!("VOLUMED_HTTP_LISTEN={http_spec:?} is not an address:port"))?;

        let reconcile_interval = secs(
            "VOLUMED_RECONCILE_INTERVAL_SECS",
            file.reconcile_interval_secs,
            300,
        )?;
        let reconcile_apply = flag("VOLUMED_RECONCILE_APPLY", file.reconcile_apply, true)?;
        let stuck_after = secs("VOLUMED_STUCK_AFTER_SECS", file.stuck_after_secs, 3600)?;
        if stuck_after < Duration::from_secs(60) {
            bail!("VOLUMED_STUCK_AFTER_SECS must be at least 60");
        }

        Ok(Config {
            host_id,
            amqp_url,
            amqp_tls,
            database_url,
            database_migrate,
            backend,
            data_dir,
            device_dir: s("VOLUMED_DEVICE_DIR", None)
                .map(PathBuf::from)
                .or(file.device_dir)
                .unwrap_or_else(|| PathBuf::from("/dev/disk/by-id")),
            appliance_vm_id,
            workers: workers as usize,
            prefetch_per_worker: prefetch_per_worker as u16,
            device_timeout: secs("VOLUMED_DEVICE_TIMEOUT_SECS", file.device_timeout_secs, 30)?,
            max_message_bytes: max_message_bytes as usize,
            shutdown_timeout: secs(
                "VOLUMED_SHUTDOWN_TIMEOUT_SECS",
                file.shutdown_timeout_secs,
                30,
            )?,
            outbox_poll_interval: millis("VOLUMED_OUTBOX_POLL_MS", file.outbox_poll_ms, 1000)?
                .max(Duration::from_millis(10)),
            delivery_limit: delivery_limit as u32,
            local_latency: millis("VOLUMED_LOCAL_LATENCY_MS", file.local_latency_ms, 0)?,
            log_format,
            log_filter,
            nbd,
            cloudstack,
            retry_attempts: retry_attempts as u32,
            retry_delays,
            http_listen,
            reconcile_interval: (!reconcile_interval.is_zero()).then_some(reconcile_interval),
            reconcile_apply,
            stuck_after,
        })
    }

    /// The appliance VM id, which `run` cannot do without.
    pub fn require_appliance_vm(&self) -> Result<Uuid> {
        self.appliance_vm_id.context(
            "VOLUMED_APPLIANCE_VM_ID is not set: volumed must know its own VM to tell \
             local attaches from failover attaches",
        )
    }

    /// The prefetch count for the request channel.
    pub fn prefetch(&self) -> u16 {
        (self.workers as u16).saturating_mul(self.prefetch_per_worker)
    }

    /// The settings whose effective value differs between `self` and
    /// `new`, by environment name, in `config check` order. Secrets and the
    /// contents of the certificate files are compared too, but only their
    /// names are returned, so the list is safe to log.
    pub fn changed_settings(&self, new: &Config) -> Vec<&'static str> {
        let rows = |c: &Config| -> std::collections::HashMap<String, String> {
            c.render()
                .lines()
                .filter_map(|l| l.split_once(" = "))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let (old_rows, new_rows) = (rows(self), rows(new));
        let cs_secret = |c: &Config| {
            c.cloudstack
                .as_ref()
                .map(|cs| (cs.secret_key.expose().to_owned(), cs.ca_pem.clone()))
        };
        let unseen: Vec<(&'static str, bool)> = vec![
            (
                "VOLUMED_AMQP_URL",
                self.amqp_url.expose() != new.amqp_url.expose(),
            ),
            (
                "VOLUMED_DATABASE_URL",
                self.database_url.expose() != new.database_url.expose(),
            ),
            (
                "VOLUMED_AMQP_CA_FILE",
                self.amqp_tls.ca_pem != new.amqp_tls.ca_pem,
            ),
            (
                "VOLUMED_AMQP_CLIENT_CERT",
                self.amqp_tls.client_cert_der != new.amqp_tls.client_cert_der,
            ),
            (
                "VOLUMED_AMQP_CLIENT_CERT_PASSWORD",
                self.amqp_tls.client_cert_password != new.amqp_tls.client_cert_password,
            ),
            (
                "VOLUMED_CLOUDSTACK_SECRET_KEY",
                cs_secret(self) != cs_secret(new),
            ),
        ];
        ENV_NAMES
            .iter()
            .copied()
            .filter(|name| {
                old_rows.get(*name) != new_rows.get(*name)
                    || unseen.iter().any(|(n, changed)| n == name && *changed)
            })
            .collect()
    }

    /// `config check` output: one `NAME = value` line per setting, secrets
    /// masked.
    pub fn render(&self) -> String {
        let d = |d: Duration| d.as_millis().to_string();
        let rows: Vec<(&str, String)> = vec![
            ("VOLUMED_HOST_ID", self.host_id.clone()),
            ("VOLUMED_AMQP_URL", self.amqp_url.masked()),
            ("VOLUMED_AMQP_CA_FILE", opt_path(&self.amqp_tls.ca_file)),
            (
                "VOLUMED_AMQP_CLIENT_CERT",
                opt_path(&self.amqp_tls.client_cert),
            ),
            (
                "VOLUMED_AMQP_CLIENT_CERT_PASSWORD",
                self.amqp_tls.client_cert_password.to_string(),
            ),
            ("VOLUMED_DATABASE_URL", self.database_url.masked()),
            (
                "VOLUMED_DATABASE_MIGRATE",
                self.database_migrate.to_string(),
            ),
            (
                "VOLUMED_BACKEND",
                format!("{:?}", self.backend).to_lowercase(),
            ),
            ("VOLUMED_DATA_DIR", self.data_dir.display().to_string()),
            ("VOLUMED_DEVICE_DIR", self.device_dir.display().to_string()),
            (
                "VOLUMED_APPLIANCE_VM_ID",
                self.appliance_vm_id
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| "(not set)".into()),
            ),
            ("VOLUMED_WORKERS", self.workers.to_string()),
            (
                "VOLUMED_PREFETCH_PER_WORKER",
                self.prefetch_per_worker.to_string(),
            ),
            (
                "VOLUMED_DEVICE_TIMEOUT_SECS",
                self.device_timeout.as_secs().to_string(),
            ),
            (
                "VOLUMED_MAX_MESSAGE_BYTES",
                self.max_message_bytes.to_string(),
            ),
            (
                "VOLUMED_SHUTDOWN_TIMEOUT_SECS",
                self.shutdown_timeout.as_secs().to_string(),
            ),
            ("VOLUMED_OUTBOX_POLL_MS", d(self.outbox_poll_interval)),
            ("VOLUMED_DELIVERY_LIMIT", self.delivery_limit.to_string()),
            ("VOLUMED_LOCAL_LATENCY_MS", d(self.local_latency)),
            (
                "VOLUMED_LOG_FORMAT",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
            (
                "VOLUMED_LOG",
                self.log_filter
                    .clone()
                    .unwrap_or_else(|| "(RUST_LOG or the default)".into()),
            ),
            ("VOLUMED_NBD_ENGINE", self.nbd.engine.as_str().into()),
            ("VOLUMED_NBD_CONFIG", self.nbd.config.display().to_string()),
            ("VOLUMED_NBD_PORT", self.nbd.port.to_string()),
            ("VOLUMED_NBD_LISTEN", self.nbd.listen.clone()),
            ("VOLUMED_NBD_ALLOW", self.nbd.allow.join(",")),
            ("VOLUMED_NBD_MANAGE", self.nbd.manage.to_string()),
            (
                "VOLUMED_NBD_PIDFILE",
                self.nbd.pidfile.display().to_string(),
            ),
            (
                "VOLUMED_NBD_TLS_PSK",
                self.nbd
                    .tls_psk
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(off)".into()),
            ),
            ("VOLUMED_NBD_BATCH_WINDOW_MS", d(self.nbd.batch_window)),
            (
                "VOLUMED_NBD_CHECK_TIMEOUT_SECS",
                self.nbd.check_timeout.as_secs().to_string(),
            ),
            (
                "VOLUMED_NBD_DRAIN_TIMEOUT_SECS",
                self.nbd.drain_timeout.as_secs().to_string(),
            ),
        ];
        let mut rows = rows;
        rows.push(("VOLUMED_RETRY_ATTEMPTS", self.retry_attempts.to_string()));
        rows.push(("VOLUMED_HTTP_LISTEN", self.http_listen.to_string()));
        rows.push((
            "VOLUMED_RECONCILE_INTERVAL_SECS",
            self.reconcile_interval
                .map(|d| d.as_secs())
                .unwrap_or(0)
                .to_string(),
        ));
        rows.push(("VOLUMED_RECONCILE_APPLY", self.reconcile_apply.to_string()));
        rows.push((
            "VOLUMED_STUCK_AFTER_SECS",
            self.stuck_after.as_secs().to_string(),
        ));
        rows.push((
            "VOLUMED_RETRY_DELAYS",
            self.retry_delays
                .iter()
                .map(|d| delay_label(*d))
                .collect::<Vec<_>>()
                .join(","),
        ));
        if let Some(cs) = &self.cloudstack {
            rows.extend([
                ("VOLUMED_CLOUDSTACK_URL", cs.url.clone()),
                ("VOLUMED_CLOUDSTACK_API_KEY", cs.api_key.clone()),
                ("VOLUMED_CLOUDSTACK_SECRET_KEY", cs.secret_key.to_string()),
                (
                    "VOLUMED_CLOUDSTACK_TIMEOUT_SECS",
                    cs.timeout.as_secs().to_string(),
                ),
                (
                    "VOLUMED_CLOUDSTACK_JOB_TIMEOUT_SECS",
                    cs.job_timeout.as_secs().to_string(),
                ),
                ("VOLUMED_CLOUDSTACK_TLS_VERIFY", cs.tls_verify.to_string()),
                ("VOLUMED_CLOUDSTACK_CA_FILE", opt_path(&cs.ca_file)),
            ]);
        }
        rows.into_iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect()
    }
}

/// A path setting for `config check`: the path, or `(none)`.
fn opt_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(none)".into())
}

fn read_file(p: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read the configuration file {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid configuration file {}", p.display()))
}

/// Host ids become queue names and routing keys: keep them to a safe set.
pub fn validate_host_id(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        bail!("VOLUMED_HOST_ID={h:?} is invalid: use 1 to 64 characters from A-Z a-z 0-9 . _ -");
    }
    Ok(())
}

/// An authfile line for nbd-server: an IPv4/IPv6 address with an optional
/// prefix length. Anything else could smuggle text into the file.
fn validate_allow(a: &str) -> Result<()> {
    let (addr, prefix) = match a.split_once('/') {
        Some((addr, p)) => (addr, Some(p)),
        None => (a, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .with_context(|| format!("VOLUMED_NBD_ALLOW entry {a:?} is not an IP address"))?;
    if let Some(p) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match p.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => bail!("VOLUMED_NBD_ALLOW entry {a:?} has an invalid prefix length"),
        }
    }
    Ok(())
}

fn check_url(u: &SecretUrl, name: &str, schemes: &[&str]) -> Result<()> {
    match url::Url::parse(u.expose()) {
        Ok(parsed) if schemes.contains(&parsed.scheme()) => Ok(()),
        Ok(parsed) => bail!(
            "{name} has scheme {:?}; expected one of {schemes:?}",
            parsed.scheme()
        ),
        // The parse error is safe to show; the URL itself is not.
        Err(e) => bail!("{name} is not a valid URL: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut with_host = map.clone();
        with_host
            .entry("VOLUMED_HOST_ID".into())
            .or_insert_with(|| "oma-1".into());
        // Point at a missing explicit file only when a test asks for it.
        Config::load_with(None, &move |k| with_host.get(k).cloned())
    }

    #[test]
    fn defaults_are_sensible() {
        let c = load(&[]).expect("defaults load");
        assert_eq!(c.backend, BackendKind::Local);
        assert_eq!(
            c.workers, 128,
            "enough slots for the VMs and volumes of a wave"
        );
        assert_eq!(c.device_dir, PathBuf::from("/dev/disk/by-id"));
        assert_eq!(c.prefetch(), 256);
        assert_eq!(c.nbd.engine, NbdEngineKind::Nbdkit);
        assert_eq!(c.nbd.listen, "127.0.0.1");
        assert!(c.nbd.manage, "volumed runs its own NBD server by default");
    }

    #[test]
    fn passwords_are_masked_everywhere() {
        let c = load(&[
            ("VOLUMED_AMQP_URL", "amqp://u:hunter2@mq:5672/%2f"),
            ("VOLUMED_DATABASE_URL", "postgres://u:s3cr3t@db/v"),
        ])
        .expect("loads");
        let shown = format!("{c:?}\n{}", c.render());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("****"));
        assert_eq!(c.amqp_url.expose(), "amqp://u:hunter2@mq:5672/%2f");
    }

    #[test]
    fn config_check_shows_every_setting() {
        let c = load(&[
            ("VOLUMED_BACKEND", "cloudstack"),
            ("VOLUMED_CLOUDSTACK_URL", "https://cloud/client/api"),
            ("VOLUMED_CLOUDSTACK_API_KEY", "key"),
            ("VOLUMED_CLOUDSTACK_SECRET_KEY", "s"),
        ])
        .expect("loads");
        let shown = c.render();
        for name in ENV_NAMES {
            assert!(
                shown.contains(&format!("{name} = ")),
                "{name} missing:\n{shown}"
            );
        }
    }

    #[test]
    fn cloudstack_settings_are_required_and_the_secret_is_masked() {
        let err = load(&[("VOLUMED_BACKEND", "cloudstack")]).expect_err("url missing");
        assert!(err.to_string().contains("VOLUMED_CLOUDSTACK_URL"), "{err}");
        let c = load(&[
            ("VOLUMED_BACKEND", "cloudstack"),
            ("VOLUMED_CLOUDSTACK_URL", "https://cloud/client/api"),
            ("VOLUMED_CLOUDSTACK_API_KEY", "key"),
            ("VOLUMED_CLOUDSTACK_SECRET_KEY", "sup3rsecret"),
        ])
        .expect("loads");
        let shown = format!("{c:?}\n{}", c.render());
        assert!(!shown.contains("sup3rsecret"), "{shown}");
        let cs = c.cloudstack.expect("cloudstack settings");
        assert!(cs.tls_verify, "TLS verification on by default");
        assert_eq!(cs.secret_key.expose(), "sup3rsecret");
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (k, v) in [
            ("VOLUMED_WORKERS", "0"),
            ("VOLUMED_WORKERS", "many"),
            ("VOLUMED_BACKEND", "ceph"),
            ("VOLUMED_APPLIANCE_VM_ID", "vm-1"),
            ("VOLUMED_HOST_ID", "a/b"),
            ("VOLUMED_AMQP_URL", "http://x"),
            ("VOLUMED_NBD_ENGINE", "qemu"),
            ("VOLUMED_NBD_PORT", "70000"),
            ("VOLUMED_NBD_LISTEN", "localhost; rm"),
            ("VOLUMED_NBD_ALLOW", "10.0.0.0/8,evil\nline"),
            ("VOLUMED_NBD_MANAGE", "perhaps"),
            ("VOLUMED_NBD_CONFIG", "relative/path"),
            ("VOLUMED_DEVICE_TIMEOUT_SECS", "99999999999999"),
            ("VOLUMED_RETRY_DELAYS", "5s,1s"),
            ("VOLUMED_RETRY_DELAYS", "1parsec"),
            ("VOLUMED_RETRY_ATTEMPTS", "0"),
        ] {
            let err = load(&[(k, v)]).expect_err(k).to_string();
            assert!(err.contains(k), "{k}: {err}");
        }
    }

    #[test]
    fn changed_settings_name_secrets_without_showing_them() {
        let a = load(&[("VOLUMED_AMQP_URL", "amqp://u:one@mq/%2f")]).expect("loads");
        let b = load(&[
            ("VOLUMED_AMQP_URL", "amqp://u:two@mq/%2f"),
            ("VOLUMED_WORKERS", "2"),
            ("VOLUMED_LOG", "debug"),
        ])
        .expect("loads");
        assert!(a.changed_settings(&a.clone()).is_empty());
        assert_eq!(
            a.changed_settings(&b),
            ["VOLUMED_AMQP_URL", "VOLUMED_WORKERS", "VOLUMED_LOG"]
        );
        let err = load(&[("VOLUMED_LOG", "volumed=loud")]).expect_err("bad filter");
        assert!(format!("{err:#}").contains("VOLUMED_LOG"), "{err:#}");
    }

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("v.toml");
        std::fs::write(
            &p,
            "host_id = \"file-host\"\nworkers = 7\ndata_dir = \"/srv/v\"\n",
        )
        .expect("write");
        let env: HashMap<&str, &str> = [("VOLUMED_WORKERS", "3")].into();
        let c = Config::load_with(Some(&p), &|k| env.get(k).map(|s| s.to_string())).expect("loads");
        assert_eq!(c.host_id, "file-host");
        assert_eq!(c.workers, 3);
        assert_eq!(c.data_dir, PathBuf::from("/srv/v"));

        std::fs::write(&p, "wrokers = 7\n").expect("write");
        let err = Config::load_with(Some(&p), &|_| None).expect_err("typo refused");
        assert!(format!("{err:#}").contains("wrokers"), "{err:#}");
    }
}
