//! Test harness: every test owns a RabbitMQ vhost, a PostgreSQL database and
//! temporary directories, and runs the real `volumed` binary against them.
//! Nothing is shared between tests, so they run in parallel; everything is
//! removed when the test's `Env` is dropped, even after a failure.
//!
//! A test that cannot reach RabbitMQ or PostgreSQL fails with the command to
//! start them; it never skips.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use uuid::Uuid;
use volumed::client::Client;
use volumed::config::SecretUrl;
use volumed::contract::Event;

pub const ADMIN_DB: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const WAIT: Duration = Duration::from_secs(60);

pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("rabbitmqctl not runnable ({e}); run scripts/ensure-services.sh")
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}\n(is RabbitMQ running? `rabbitmq-server -detached`)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sql` as the PostgreSQL superuser on the `postgres` database.
fn psql_run(sql: &str) -> std::io::Result<std::process::Output> {
    Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .output()
}

/// Like [`psql`], for clean-up where a failure must not panic (in `Drop`).
#[allow(dead_code)] // not every test binary cleans up roles
pub fn psql_best_effort(sql: &str) {
    let _ = psql_run(sql);
}

pub fn psql(sql: &str) {
    let out = psql_run(sql).unwrap_or_else(|e| panic!("psql not runnable: {e}"));
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}\n(is PostgreSQL running? `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`)",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One test's private world.
pub struct Env {
    pub name: String,
    pub vhost: String,
    pub amqp_url: SecretUrl,
    pub db_url: SecretUrl,
    pub dir: tempfile::TempDir,
    pub appliance: Uuid,
    pub pool: PgPool,
    /// NBD and HTTP ports of each host's daemon, stable across restarts.
    ports: Mutex<HashMap<String, u16>>,
}

/// A TCP port nothing listens on right now (the kernel's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The NBD servers and client tools the end-to-end tests drive. A missing
/// one would otherwise show up much later as an attach that times out.
fn require_nbd_tools() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["nbdkit", "nbd-server", "nbdinfo"] {
        let found = std::env::split_paths(&path).any(|d| d.join(tool).is_file());
        assert!(
            found,
            "{tool} is not on PATH: run scripts/ensure-services.sh (it installs the NBD packages)"
        );
    }
}

impl Env {
    pub async fn new(test: &str) -> Env {
        Self::build(test, true).await
    }

    /// Like [`Env::new`] with an empty database: no migration applied, for
    /// tests of `volumed migrate` itself.
    pub async fn new_unmigrated(test: &str) -> Env {
        Self::build(test, false).await
    }

    async fn build(test: &str, migrated: bool) -> Env {
        require_nbd_tools();
        let name = format!("vt_{}_{}", test, &Uuid::new_v4().simple().to_string()[..8]);
        let vhost = name.clone();
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        psql(&format!("CREATE DATABASE {name}"));
        let amqp_url = SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"));
        let db_url = SecretUrl::new(format!("postgres://postgres@127.0.0.1:5432/{name}"));
        let pool = volumed::db::connect(&db_url, 4)
            .await
            .expect("test database reachable");
        if migrated {
            volumed::db::migrate(&pool).await.expect("migrations apply");
        }
        Env {
            name,
            vhost,
            amqp_url,
            db_url,
            dir: tempfile::tempdir().expect("tempdir"),
            appliance: Uuid::new_v4(),
            pool,
            ports: Mutex::default(),
        }
    }

    pub fn data_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(host).join("data")
    }

    pub fn device_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(host).join("by-id")
    }

    /// The NBD port of `host`'s daemon.
    pub fn nbd_port(&self, host: &str) -> u16 {
        *self
            .ports
            .lock()
            .expect("ports lock")
            .entry(host.to_owned())
            .or_insert_with(free_port)
    }

    /// The health endpoint port of `host`'s daemon.
    pub fn http_port(&self, host: &str) -> u16 {
        *self
            .ports
            .lock()
            .expect("ports lock")
            .entry(format!("{host}/http"))
            .or_insert_with(free_port)
    }

    /// The environment a daemon for `host` runs with.
    pub fn daemon_env(&self, host: &str) -> Vec<(String, String)> {
        [
            ("VOLUMED_NBD_PORT", self.nbd_port(host).to_string()),
            (
                "VOLUMED_HTTP_LISTEN",
                format!("127.0.0.1:{}", self.http_port(host)),
            ),
            ("VOLUMED_HOST_ID", host.to_string()),
            ("VOLUMED_AMQP_URL", self.amqp_url.expose().to_string()),
            ("VOLUMED_DATABASE_URL", self.db_url.expose().to_string()),
            ("VOLUMED_BACKEND", "local".into()),
            (
                "VOLUMED_DATA_DIR",
                self.data_dir(host).display().to_string(),
            ),
            (
                "VOLUMED_DEVICE_DIR",
                self.device_dir(host).display().to_string(),
            ),
            ("VOLUMED_APPLIANCE_VM_ID", self.appliance.to_string()),
            ("VOLUMED_WORKERS", "4".into()),
            ("VOLUMED_DEVICE_TIMEOUT_SECS", "10".into()),
            ("VOLUMED_OUTBOX_POLL_MS", "200".into()),
            ("VOLUMED_SHUTDOWN_TIMEOUT_SECS", "20".into()),
            // Retries within a test's patience; tests that study retries
            // set their own.
            ("VOLUMED_RETRY_DELAYS", "200ms,500ms,1s,2s".into()),
            (
                "VOLUMED_LOG",
                "info,volumed=debug,lapin=warn,sqlx=warn".into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts a daemon and waits until it consumes.
    pub fn start(&self, host: &str, extra: &[(&str, &str)]) -> Daemon {
        let d = self.spawn(host, extra);
        d.wait_log("consuming requests", WAIT);
        d
    }

    /// Starts a daemon without waiting for it.
    pub fn spawn(&self, host: &str, extra: &[(&str, &str)]) -> Daemon {
        let mut env: HashMap<String, String> = self.daemon_env(host).into_iter().collect();
        env.insert("VOLUMED_TEST_NAME".into(), self.name.clone());
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        Daemon::spawn(&["run"], &env)
    }

    /// Runs a CLI command to completion against this env's host.
    pub fn cli(&self, host: &str, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_volumed"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.daemon_env(host))
            .output()
            .expect("volumed runs")
    }

    pub fn create_volume(&self, host: &str) -> Uuid {
        volumed::backend::local::LocalBackend::create_volume(&self.data_dir(host), 4 << 20)
            .expect("volume created")
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.amqp_url)
            .await
            .expect("broker reachable")
    }

    /// A durable queue bound to every event, which outlives connections
    /// (for tests that cut the broker off).
    pub async fn durable_event_queue(&self, name: &str) {
        self.durable_queue(
            name,
            volumed::topology::EVENTS_EXCHANGE,
            lapin::ExchangeKind::Topic,
            &["#"],
        )
        .await;
    }

    /// Declares the durable `exchange` (as the daemon does) and a durable
    /// queue `name` bound to it with each of `keys`.
    pub async fn durable_queue(
        &self,
        name: &str,
        exchange: &str,
        kind: lapin::ExchangeKind,
        keys: &[&str],
    ) {
        let conn = volumed::amqp::connect(&self.amqp_url, "test")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            name,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        ch.exchange_declare(
            exchange,
            kind,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
        for key in keys {
            ch.queue_bind(
                name,
                exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        }
        let _ = conn.close(200, "done").await;
    }

    /// Takes every message currently in a queue.
    pub async fn drain_queue(&self, name: &str) -> Vec<lapin::message::BasicGetMessage> {
        let conn = volumed::amqp::connect(&self.amqp_url, "test")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(name, BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            out.push(m);
        }
        let _ = conn.close(200, "done").await;
        out
    }

    /// Messages ready in a queue, from the queue itself (`list_queues`
    /// figures are periodic statistics and lag). Unacknowledged messages are
    /// not counted: stop the consumers first to count everything.
    pub async fn queue_depth(&self, name: &str) -> u32 {
        self.queue(name).await.message_count()
    }

    /// A queue as the broker reports it now (a passive declare).
    pub async fn queue(&self, name: &str) -> lapin::Queue {
        let conn = volumed::amqp::connect(&self.amqp_url, "test")
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                name,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = conn.close(200, "done").await;
        q
    }

    /// Every attach and detach the local backend did, volume by volume.
    pub fn call_log(&self, host: &str) -> Vec<String> {
        volumed::backend::local::LocalBackend::call_history(&self.data_dir(host))
    }

    /// Every attach and detach the local backend refused because it would
    /// have repeated a change (a caller's duplicate), volume by volume.
    pub fn refused_calls(&self, host: &str) -> Vec<String> {
        volumed::backend::local::LocalBackend::refused_calls(&self.data_dir(host))
    }

    /// Polls a SQL count until it reaches `want`.
    pub async fn wait_count(&self, sql: &str, want: i64) {
        let start = Instant::now();
        loop {
            let n: i64 = sqlx::query_scalar(sql)
                .fetch_one(&self.pool)
                .await
                .expect(sql);
            if n == want {
                return;
            }
            assert!(start.elapsed() < WAIT, "{sql}: {n}, never reached {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Kills every process whose command line mentions `needle` (the NBD
/// servers a test's daemons started under its temporary directory, which
/// outlive a killed daemon by design).
pub fn kill_processes_mentioning(needle: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        kill_processes_mentioning(&self.dir.path().display().to_string());
        // Synchronous and best effort: runs after a failed assertion too.
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .output();
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

/// A broker user of one test (named after it, so unique), deleted when the
/// test ends, even after a failure.
pub struct BrokerUser(pub String);

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

/// A running `volumed` process with its log captured line by line.
pub struct Daemon {
    pub child: Child,
    lines: Arc<(Mutex<Log>, Condvar)>,
}

/// What the daemon wrote to stderr so far, and whether the pipe closed.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    closed: bool,
}

impl Daemon {
    pub fn spawn(args: &[&str], env: &HashMap<String, String>) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_volumed"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("volumed starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let sink = Arc::clone(&lines);
        let echo = std::env::var("VOLUMED_TEST_ECHO").is_ok();
        std::thread::spawn(move || {
            let (m, cv) = &*sink;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[volumed] {line}");
                }
                m.lock().expect("log lock").lines.push(line);
                cv.notify_all();
            }
            m.lock().expect("log lock").closed = true;
            cv.notify_all();
        });
        Daemon { child, lines }
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.0.lock().expect("log lock").lines.clone()
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let (m, cv) = &*self.lines;
        let deadline = Instant::now() + timeout;
        let mut log = m.lock().expect("log lock");
        loop {
            if log.lines.iter().any(|l| l.contains(needle)) {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no log line with {needle:?} within {timeout:?}; log:\n{}",
                log.lines.join("\n")
            );
            log = cv.wait_timeout(log, deadline - now).expect("log lock").0;
        }
    }

    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    pub fn sigint(&self) {
        self.signal(nix::sys::signal::Signal::SIGINT);
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal");
    }

    /// Waits for the process to exit, and for the reader to take in what
    /// it wrote last: without that a test that reads the log right after
    /// the exit can find it empty (seen in CI).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.wait_log_closed(deadline.max(Instant::now() + Duration::from_secs(5)));
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "volumed did not exit within {timeout:?}; log:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the stderr pipe has closed: every line is in. A child
    /// the daemon left running could hold the pipe open, so the wait is
    /// bounded; what was read by then is what the test sees.
    fn wait_log_closed(&self, deadline: Instant) {
        let (m, cv) = &*self.lines;
        let mut log = m.lock().expect("log lock");
        while !log.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            log = cv.wait_timeout(log, deadline - now).expect("log lock").0;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Collects events until `n` distinct requests have one, then keeps
/// listening for `grace` to catch duplicates.
pub async fn collect_events(
    sub: &mut volumed::client::Subscription,
    n: usize,
    grace: Duration,
) -> HashMap<Uuid, Vec<Event>> {
    let mut by_request: HashMap<Uuid, Vec<Event>> = HashMap::new();
    let deadline = Instant::now() + WAIT;
    while by_request.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = sub
            .next(left)
            .await
            .expect("event stream")
            .unwrap_or_else(|| panic!("only {} of {n} requests got an event", by_request.len()));
        by_request.entry(e.request_id).or_default().push(e);
    }
    while let Some(e) = sub.next(grace).await.expect("event stream") {
        by_request.entry(e.request_id).or_default().push(e);
    }
    by_request
}

pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// A TCP proxy a test can cut: every connection through it is dropped and
/// new ones are refused until it is restored. It stands between a daemon and
/// PostgreSQL (or RabbitMQ) so one test can take "the database" away
/// without touching the server other tests share.
pub struct Proxy {
    pub port: u16,
    down: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (d, c) = (Arc::clone(&down), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if d.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().expect("proxy lock").push(task.abort_handle());
            }
        });
        Proxy {
            port,
            down,
            conns,
            accept,
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("proxy lock").drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The ids of the events in a queue, by request: a request may have the
/// same event more than once (at-least-once publishing), never two events.
pub fn event_ids_by_request(
    msgs: &[lapin::message::BasicGetMessage],
) -> HashMap<Uuid, std::collections::HashSet<Uuid>> {
    let mut out: HashMap<Uuid, std::collections::HashSet<Uuid>> = HashMap::new();
    for m in msgs {
        let e: Event = serde_json::from_slice(&m.delivery.data).expect("event");
        out.entry(e.request_id).or_default().insert(e.event_id);
    }
    out
}

/// GET a path on a daemon's health endpoint: (status, body).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("health endpoint answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Scrapes `/metrics` and parses it as Prometheus text: sample name with
/// sorted labels → value.
pub async fn scrape(port: u16) -> HashMap<String, f64> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics endpoint answers");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = resp.text().await.expect("body");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let mut out = HashMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count).unwrap_or(0.0),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
    }
    out
}

/// A standalone nbdkit serving the files of `dir` (its `file` plugin in
/// directory mode) on a free loopback port, once it answers a listing.
/// It dies with the test process (`--exit-with-parent`); kill it sooner
/// with the returned child.
pub async fn nbdkit_serving(dir: &Path) -> (Child, u16) {
    let port = free_port();
    let child = Command::new("nbdkit")
        .args([
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg("file")
        .arg(format!("dir={}", dir.display()))
        .spawn()
        .expect("nbdkit starts (run scripts/ensure-services.sh)");
    let deadline = Instant::now() + WAIT;
    while volumed::nbd::proto::list("127.0.0.1", port, Duration::from_secs(1))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nbdkit never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, port)
}
