//! `volumed bench`: the daemon under a burst of requests, measured against
//! the floor of the same pipeline on the same broker and database.
//!
//! The daemon runs as a child process on a host id of its own
//! (`bench-<id>`), with its own data, device and NBD directories, so the
//! benchmark can run beside a production daemon on the same broker and
//! database; what it created is removed at the end. The floor is the bare
//! pipeline every request must pass: consume, one commit, one confirmed
//! publish, ack. Absolute times on shared machines are noisy; the ratios to
//! the floor, measured in the same run, are the yardstick.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::client::{Client, Outgoing};
use crate::config::Config;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub requests: usize,
    pub volumes: usize,
    /// VMs the volumes are attached to; the first is the appliance.
    pub vms: usize,
    /// `local` or `emulator`.
    pub backend: String,
    pub latency: Duration,
    pub engine: String,
    pub workers: usize,
    pub floor: bool,
    /// Where the daemon's own files go (its export directory or nbd-server
    /// configuration, its pidfile); the system's temporary directory when
    /// `None`.
    pub state_dir: Option<std::path::PathBuf>,
    /// Keep this many requests in flight (published, no event yet),
    /// publishing more as events arrive, instead of publishing them all at
    /// once; `None` for one burst. See [`Plan::check`].
    pub queued: Option<usize>,
}

impl Plan {
    /// Refuses plans the benchmark cannot measure.
    pub fn check(&self) -> Result<()> {
        if self.volumes == 0 || self.vms == 0 || self.requests == 0 {
            bail!("requests, volumes and VMs must be at least 1");
        }
        if let Some(q) = self.queued {
            if q == 0 {
                bail!("--queued must be at least 1");
            }
            if self.requests < 2 * q {
                bail!(
                    "--queued {q} needs --requests of at least {}: the rate at that depth is \
                     taken while the requests are topped up, which must be half the run or more",
                    2 * q
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Figures {
    pub requests: usize,
    pub seconds: f64,
    pub throughput_per_s: f64,
    /// Throughput over the middle 80 % of the events (from the 10th
    /// percentile of arrival times to the 90th): the rate once the burst is
    /// flowing, without its start (the first batches, connections opened
    /// on first use) and its tail. This is the figure to compare between
    /// runs of different lengths.
    pub sustained_per_s: f64,
    /// From the first publish to the first event: what the pipeline costs
    /// before anything comes out (connections and statements used for the
    /// first time, the first batches).
    pub first_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The most requests published and without an outcome at once, seen
    /// after each publish: the whole burst without `--queued`.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub daemon: Figures,
    pub floor: Option<Figures>,
    /// daemon throughput / floor throughput.
    pub throughput_ratio: Option<f64>,
    /// The same for the sustained throughputs.
    pub sustained_ratio: Option<f64>,
    /// daemon p99 / floor p99.
    pub p99_ratio: Option<f64>,
    pub failed_events: usize,
    pub nbd_engine: String,
    pub nbd_reloads: i64,
    pub nbd_restarts: i64,
    pub export_changes: i64,
    pub reloads_per_export_change: f64,
    pub db_commits_per_operation: f64,
    /// With `--queued`: the depth asked for. The sustained rate is then
    /// the rate at that depth (see [`figures`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<usize>,
    pub daemon_idle_rss_mib: f64,
    pub daemon_peak_rss_mib: f64,
    /// Mean time to reach each step of an operation from the previous one,
    /// in ms, from the daemon's own metrics (`op/step`, in step order).
    pub step_means_ms: Vec<(String, f64)>,
    /// With `--rounds` above 1: every round's figures, in the order they
    /// ran. The rest of the report is the median round's (see
    /// [`median_round`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Round>,
    /// Publish time and event time of each request, for plots.
    #[serde(skip)]
    pub samples: Vec<(Duration, Duration)>,
}

/// One round's headline figures.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub throughput_per_s: f64,
    pub sustained_per_s: f64,
    pub p99_ms: f64,
    pub throughput_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
    pub failed_events: usize,
}

impl Round {
    pub fn of(r: &Report) -> Round {
        Round {
            throughput_per_s: r.daemon.throughput_per_s,
            sustained_per_s: r.daemon.sustained_per_s,
            p99_ms: r.daemon.p99_ms,
            throughput_ratio: r.throughput_ratio,
            p99_ratio: r.p99_ratio,
            failed_events: r.failed_events,
        }
    }
}

/// The round whose report stands for all of them: the median by
/// throughput against the floor, or by the daemon's own throughput when
/// there is no floor (of an even number, the upper of the two middle
/// ones). `None` for no rounds.
pub fn median_round(rounds: &[Round]) -> Option<usize> {
    let key = |r: &Round| r.throughput_ratio.unwrap_or(r.throughput_per_s);
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|a, b| key(&rounds[*a]).total_cmp(&key(&rounds[*b])));
    order.get(rounds.len() / 2).copied()
}

impl Report {
    pub fn render(&self) -> String {
        let row = |name: &str, f: &Figures| {
            format!(
                "| {name:<7} | {:>8} | {:>7.2} | {:>8.1} | {:>9.1} | {:>8.1} | {:>7.1} | {:>7.1} | {:>7.1} | {:>7.1} |\n",
                f.requests,
                f.seconds,
                f.throughput_per_s,
                f.sustained_per_s,
                f.first_ms,
                f.p50_ms,
                f.p90_ms,
                f.p99_ms,
                f.max_ms
            )
        };
        let mut out = String::from(
            "|         | requests | seconds | req/s    | sustained | first ms | p50 ms  | p90 ms  | p99 ms  | max ms  |\n\
             |---------|----------|---------|----------|-----------|----------|---------|---------|---------|---------|\n",
        );
        out.push_str(&row("daemon", &self.daemon));
        if let Some(f) = &self.floor {
            out.push_str(&row("floor", f));
        }
        let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "\nthroughput / floor: {}   sustained / floor: {}   p99 / floor: {}\n\
             failed events: {}\n\
             {} reloads, {} restarts for {} export changes ({:.3} reloads per change)\n\
             database commits per operation: {:.2}\n\
             daemon RSS: idle {:.1} MiB, peak {:.1} MiB\n",
            ratio(self.throughput_ratio),
            ratio(self.sustained_ratio),
            ratio(self.p99_ratio),
            self.failed_events,
            self.nbd_reloads,
            self.nbd_restarts,
            self.export_changes,
            self.reloads_per_export_change,
            self.db_commits_per_operation,
            self.daemon_idle_rss_mib,
            self.daemon_peak_rss_mib
        ));
        if let Some(q) = self.queued {
            let floor = match &self.floor {
                Some(f) => format!(", the floor {}", f.max_in_flight),
                None => String::new(),
            };
            out.push_str(&format!(
                "kept {q} requests in flight (at most {} seen in the daemon{floor}); \
                 sustained: the rate while they were topped up\n",
                self.daemon.max_in_flight
            ));
        }
        if self.rounds.len() > 1 {
            let list = |f: &dyn Fn(&Round) -> String| {
                self.rounds.iter().map(f).collect::<Vec<_>>().join(", ")
            };
            out.push_str(&format!(
                "{} rounds, the median one above; per round: req/s {}; throughput / floor {}; p99 / floor {}\n",
                self.rounds.len(),
                list(&|r| format!("{:.0}", r.throughput_per_s)),
                list(&|r| ratio(r.throughput_ratio)),
                list(&|r| ratio(r.p99_ratio)),
            ));
        }
        if !self.step_means_ms.is_empty() {
            out.push_str("mean time per step (ms):");
            for (step, ms) in &self.step_means_ms {
                out.push_str(&format!(" {step} {ms:.1};"));
            }
            out.push('\n');
        }
        out
    }
}

/// The daemon's reconciliations so far, whatever their outcome, from the
/// metrics text.
fn reconciliations(text: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("volumed_reconciliations_total{"))
        .filter_map(|rest| rest.split_once("} "))
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

/// Mean step durations from the metrics text: the `_sum` and `_count` of
/// `volumed_operation_step_duration_seconds`, plus whole operations.
fn step_means(text: &str) -> Vec<(String, f64)> {
    let mut sums: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for line in text.lines() {
        for (metric, prefix) in [
            ("volumed_operation_step_duration_seconds", ""),
            ("volumed_operation_duration_seconds", "whole "),
        ] {
            let Some(rest) = line.strip_prefix(metric) else {
                continue;
            };
            let (is_sum, rest) = if let Some(r) = rest.strip_prefix("_sum{") {
                (true, r)
            } else if let Some(r) = rest.strip_prefix("_count{") {
                (false, r)
            } else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let label = |k: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let key = format!(
                "{prefix}{}/{}{}",
                label("op"),
                label("step"),
                label("outcome")
            );
            let e = sums.entry(key).or_default();
            if is_sum {
                e.0 += v;
            } else {
                e.1 += v;
            }
        }
    }
    sums.into_iter()
        .filter(|(_, (_, n))| *n > 0.0)
        .map(|(k, (sum, n))| (k, sum / n * 1000.0))
        .collect()
}

/// The figures of a run from each request's latency and the arrival time
/// of each event (from the first publish). The sustained rate is taken
/// from the 10th percentile of arrivals to the 90th, or to `until` when
/// given (with `--queued`, the last top-up: the queue's depth held until
/// then).
fn figures(
    mut lat: Vec<Duration>,
    mut arrivals: Vec<Duration>,
    until: Option<Duration>,
) -> Figures {
    lat.sort();
    arrivals.sort();
    let seconds = arrivals.last().copied().unwrap_or_default().as_secs_f64();
    let pick = |v: &[Duration], q: f64| {
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    };
    let ms = |q: f64| pick(&lat, q).as_secs_f64() * 1000.0;
    let (from, to) = (pick(&arrivals, 0.1), until.unwrap_or(pick(&arrivals, 0.9)));
    let middle = arrivals.iter().filter(|a| **a >= from && **a <= to).count();
    let span = to.saturating_sub(from).as_secs_f64();
    Figures {
        requests: lat.len(),
        seconds,
        throughput_per_s: if seconds > 0.0 {
            lat.len() as f64 / seconds
        } else {
            0.0
        },
        sustained_per_s: if span > 0.0 {
            middle.saturating_sub(1) as f64 / span
        } else {
            0.0
        },
        first_ms: arrivals.first().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
        // Known only to the caller that fed the run (see `Drive`).
        max_in_flight: 0,
    }
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn commits(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

/// Runs the plan.
pub async fn run(config: &Config, plan: &Plan) -> Result<Report> {
    plan.check()?;
    let pool = crate::db::connect(&config.database_url, 4).await?;
    crate::db::migrate(&pool).await?;
    vacuum(&pool).await;
    let id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let host = format!("bench-{id}");
    // What the daemon keeps itself (its export directory or nbd-server
    // configuration, pidfile) goes to the state directory asked for, or to
    // the temporary directory, on disk.
    // What stands for the cloud (the local backend's volumes and state, the
    // emulator's) and for the kernel's /dev/disk/by-id (a devtmpfs on a
    // real appliance) goes to memory when /dev/shm exists, so the figures
    // are the daemon's and not those of the stand-ins' file churn.
    let dir = plan
        .state_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("volumed-bench-{id}"));
    let emulated = emulated_root().join(format!("volumed-bench-{id}"));
    let (data, devices) = (emulated.join("data"), emulated.join("by-id"));
    std::fs::create_dir_all(&devices)?;
    std::fs::create_dir_all(&dir)?;
    let appliance = Uuid::new_v4();
    let vms: Vec<Uuid> = std::iter::once(appliance)
        .chain((1..plan.vms).map(|_| Uuid::new_v4()))
        .collect();

    let mut env: Vec<(String, String)> = vec![
        ("VOLUMED_HOST_ID".into(), host.clone()),
        ("VOLUMED_AMQP_URL".into(), config.amqp_url.expose().into()),
        (
            "VOLUMED_DATABASE_URL".into(),
            config.database_url.expose().into(),
        ),
        ("VOLUMED_DATA_DIR".into(), data.display().to_string()),
        ("VOLUMED_DEVICE_DIR".into(), devices.display().to_string()),
        ("VOLUMED_APPLIANCE_VM_ID".into(), appliance.to_string()),
        ("VOLUMED_WORKERS".into(), plan.workers.to_string()),
        ("VOLUMED_NBD_ENGINE".into(), plan.engine.clone()),
        ("VOLUMED_NBD_PORT".into(), free_port()?.to_string()),
        (
            "VOLUMED_NBD_CONFIG".into(),
            dir.join(match plan.engine.as_str() {
                "nbd-server" => "nbd-server/config",
                _ => "exports",
            })
            .display()
            .to_string(),
        ),
        (
            "VOLUMED_NBD_PIDFILE".into(),
            dir.join("nbd.pid").display().to_string(),
        ),
        (
            "VOLUMED_HTTP_LISTEN".into(),
            format!("127.0.0.1:{}", free_port()?),
        ),
        ("VOLUMED_RECONCILE_INTERVAL_SECS".into(), "0".into()),
        ("VOLUMED_RECONCILE_APPLY".into(), "false".into()),
        // The daemon's log goes to the benchmark's stderr: quiet unless
        // VOLUMED_BENCH_LOG asks for more.
        (
            "VOLUMED_LOG".into(),
            std::env::var("VOLUMED_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    let mut volumes = Vec::with_capacity(plan.volumes);
    let _emulator = match plan.backend.as_str() {
        "local" => {
            env.push(("VOLUMED_BACKEND".into(), "local".into()));
            env.push((
                "VOLUMED_LOCAL_LATENCY_MS".into(),
                plan.latency.as_millis().to_string(),
            ));
            for _ in 0..plan.volumes {
                volumes.push(crate::backend::local::LocalBackend::create_volume(
                    &data,
                    1 << 20,
                )?);
            }
            None
        }
        "emulator" => {
            let secret = Uuid::new_v4().simple().to_string();
            let cfg = crate::cloudstack::emulator::EmulatorConfig {
                api_key: "bench".into(),
                secret_key: secret.clone(),
                appliance_vm: appliance,
                device_dir: devices.clone(),
                data_dir: emulated.join("cloud"),
                job_latency: plan.latency,
            };
            std::fs::create_dir_all(&cfg.data_dir)?;
            let (emu, _addr, task) = crate::cloudstack::emulator::Emulator::spawn(cfg).await?;
            for (i, vm) in vms.iter().enumerate().skip(1) {
                emu.create_vm(*vm, &format!("bench-vm-{i}"));
            }
            for _ in 0..plan.volumes {
                volumes.push(emu.create_volume(1 << 20)?);
            }
            env.push(("VOLUMED_BACKEND".into(), "cloudstack".into()));
            env.push(("VOLUMED_CLOUDSTACK_URL".into(), emu.url()));
            env.push(("VOLUMED_CLOUDSTACK_API_KEY".into(), "bench".into()));
            env.push(("VOLUMED_CLOUDSTACK_SECRET_KEY".into(), secret));
            Some((emu, task))
        }
        other => bail!("unknown bench backend {other:?}: use local or emulator"),
    };

    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("run")
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the daemon")?;
    let pid = child.id().context("daemon pid")?;
    let http = env
        .iter()
        .find(|(k, _)| k == "VOLUMED_HTTP_LISTEN")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let started = Instant::now();
    loop {
        let ready = reqwest::get(format!("http://{http}/readyz"))
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ready {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the daemon did not become ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The daemon reconciles once, 5 s after it starts: the burst waits for
    // it, or a long run would count it against the daemon's rate (and
    // the daemon's rest would not be measured at rest).
    let started = Instant::now();
    loop {
        let text = match reqwest::get(format!("http://{http}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if reconciliations(&text) >= 1.0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the daemon's start-up reconciliation did not end within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss, _) = rss(pid);

    // The burst.
    let client = Client::connect_tls(&config.amqp_url, &config.amqp_tls).await?;
    let sub = client.subscribe("#").await?;
    let mut requests = Vec::with_capacity(plan.requests);
    for i in 0..plan.requests {
        let v = i % plan.volumes;
        let vm = vms[v % vms.len()];
        let r = if (i / plan.volumes).is_multiple_of(2) {
            Outgoing::attach(&host, volumes[v], vm, true)
        } else {
            Outgoing::detach(&host, volumes[v], None)
        };
        requests.push(r);
    }
    let commits_before = commits(&pool).await?;
    let t0 = Instant::now();
    let (seen, mut events) = arrivals(t0, sub);
    let run = drive(
        plan.requests,
        plan.queued,
        t0,
        async |range, published| {
            client
                .publish_many(&requests[range], |r| {
                    published.insert(r.request_id, t0.elapsed());
                })
                .await?;
            Ok(())
        },
        &mut events,
    )
    .await?;
    seen.abort();
    let (_, peak_rss) = rss(pid);
    let step_means_ms = match reqwest::get(format!("http://{http}/metrics")).await {
        Ok(r) => step_means(&r.text().await.unwrap_or_default()),
        Err(_) => Vec::new(),
    };
    let samples = run.samples();
    let daemon = run.figures();
    let (reloads, restarts, changes): (i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(reloads), 0)::bigint, COALESCE(sum(restarts), 0)::bigint,
                COALESCE(sum(changes), 0)::bigint FROM nbd_stats WHERE host = $1",
    )
    .bind(&host)
    .fetch_one(&pool)
    .await?;

    // Stop and clean up the daemon's traces.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    // A busy PostgreSQL session reports its commits to the statistics
    // only now and then (up to 10 s late); one that ends reports them at
    // once. So the count is read once the daemon's sessions are gone; it
    // includes its shutdown (a last relay pass, nothing per request).
    let commits_after = commits(&pool).await?;
    client.close().await;
    cleanup(config, &pool, &host).await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&emulated);

    let floor = if plan.floor {
        Some(floor(config, &pool, plan).await?)
    } else {
        None
    };
    pool.close().await;
    let ops = plan.requests.max(1) as f64;
    Ok(Report {
        throughput_ratio: floor
            .as_ref()
            .map(|f| daemon.throughput_per_s / f.throughput_per_s),
        sustained_ratio: floor
            .as_ref()
            .map(|f| daemon.sustained_per_s / f.sustained_per_s.max(0.001)),
        p99_ratio: floor.as_ref().map(|f| daemon.p99_ms / f.p99_ms.max(0.001)),
        daemon,
        floor,
        failed_events: run.failed + (plan.requests - run.done.len()),
        nbd_engine: plan.engine.clone(),
        nbd_reloads: reloads,
        nbd_restarts: restarts,
        export_changes: changes,
        reloads_per_export_change: if changes > 0 {
            reloads as f64 / changes as f64
        } else {
            0.0
        },
        db_commits_per_operation: (commits_after - commits_before) as f64 / ops,
        queued: plan.queued,
        daemon_idle_rss_mib: idle_rss,
        daemon_peak_rss_mib: peak_rss,
        step_means_ms,
        rounds: Vec::new(),
        samples,
    })
}

/// A run ends when no outcome has arrived for this long (a lost request
/// then counts as failed) or when it has lasted [`RUN_LIMIT`].
const QUIET_LIMIT: Duration = Duration::from_secs(60);
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// How one pipeline's run went: when each request went out and when its
/// outcome came back, both from the first publish.
struct Drive {
    published: HashMap<Uuid, Duration>,
    done: HashMap<Uuid, Duration>,
    failed: usize,
    max_in_flight: usize,
    /// With a depth to keep: when the last request was published, so the
    /// end of the time the depth was held.
    topped_up: Option<Duration>,
}

impl Drive {
    /// Publish time and outcome time of each request that got an outcome,
    /// in publish order.
    fn samples(&self) -> Vec<(Duration, Duration)> {
        let mut samples: Vec<(Duration, Duration)> = self
            .done
            .iter()
            .map(|(id, at)| (self.published[id], *at))
            .collect();
        samples.sort();
        samples
    }

    fn figures(&self) -> Figures {
        let samples = self.samples();
        Figures {
            max_in_flight: self.max_in_flight,
            ..figures(
                samples
                    .iter()
                    .map(|(p, at)| at.saturating_sub(*p))
                    .collect(),
                samples.iter().map(|(_, at)| *at).collect(),
                self.topped_up,
            )
        }
    }
}

/// Feeds a pipeline `total` requests and collects their outcomes. Without
/// `queued` every request is published at once (confirmations awaited
/// after the last one is sent), so the pipeline starts with the whole burst
/// queued; with `queued = Q` only the first Q go out, and each outcome that
/// arrives lets one more go, so Q stay in flight until the last request is
/// published. The daemon and the floor are fed by this same loop, so the
/// two are measured alike.
///
/// `publish(range, published)` sends the requests of that range and
/// records each one's publish time; `outcomes` yields each request's id,
/// its arrival time and whether it succeeded.
async fn drive(
    total: usize,
    queued: Option<usize>,
    t0: Instant,
    mut publish: impl AsyncFnMut(std::ops::Range<usize>, &mut HashMap<Uuid, Duration>) -> Result<()>,
    outcomes: &mut tokio::sync::mpsc::UnboundedReceiver<(Uuid, Duration, bool)>,
) -> Result<Drive> {
    let mut run = Drive {
        published: HashMap::with_capacity(total),
        done: HashMap::with_capacity(total),
        failed: 0,
        max_in_flight: 0,
        topped_up: None,
    };
    let first = queued.unwrap_or(total).min(total);
    publish(0..first, &mut run.published).await?;
    let mut sent = first;
    run.max_in_flight = first;
    while run.done.len() < total && t0.elapsed() < RUN_LIMIT {
        let Ok(Some(mut outcome)) = tokio::time::timeout(QUIET_LIMIT, outcomes.recv()).await else {
            break;
        };
        let mut finished = 0;
        // Every outcome already received counts before the next top-up, so
        // that one publish covers all of them.
        loop {
            let (id, at, succeeded) = outcome;
            if run.published.contains_key(&id) && !run.done.contains_key(&id) {
                run.done.insert(id, at);
                finished += 1;
                if !succeeded {
                    run.failed += 1;
                }
            }
            match outcomes.try_recv() {
                Ok(o) => outcome = o,
                Err(_) => break,
            }
        }
        if queued.is_some() && finished > 0 && sent < total {
            let more = finished.min(total - sent);
            publish(sent..sent + more, &mut run.published).await?;
            sent += more;
            run.max_in_flight = run.max_in_flight.max(sent - run.done.len());
            if sent == total {
                run.topped_up = Some(t0.elapsed());
            }
        }
    }
    Ok(run)
}

/// Where the stand-ins for the cloud and the device directory live:
/// /dev/shm (memory) when it is there, else the temporary directory.
fn emulated_root() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// Receives events in a task of its own and stamps each with its arrival
/// time, so that publishing the burst does not delay (and so inflate) the
/// times of the events that arrive meanwhile.
fn arrivals(
    t0: Instant,
    mut sub: crate::client::Subscription,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<(Uuid, Duration, bool)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(Some(e)) = sub.next(QUIET_LIMIT).await {
            let outcome = (e.request_id, t0.elapsed(), e.event_type.succeeded());
            if tx.send(outcome).is_err() {
                break;
            }
        }
    });
    (task, rx)
}

/// The daemon's tables, each touched by every operation.
const CHURNED: [&str; 5] = [
    "operations",
    "outbox",
    "volume_attachments",
    "nbd_exports",
    "operation_errors",
];

/// Vacuums the daemon's tables before a run, so that every run starts from
/// tables without the dead rows of the runs before it (each run deletes
/// its rows when it ends). PostgreSQL's autovacuum does this on its own;
/// on a server where it is off, runs one after another would otherwise be
/// measured on ever larger tables and indexes: the relay's look for
/// pending events and every finish walk the dead entries. A role that
/// does not own a table gets a warning from PostgreSQL and that table is
/// left as it is.
async fn vacuum(pool: &PgPool) {
    for table in CHURNED {
        if let Err(e) = sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
            .execute(pool)
            .await
        {
            eprintln!("volumed bench: cannot vacuum {table}: {e}");
        }
    }
}

/// Removes the bench host's rows and queues.
async fn cleanup(config: &Config, pool: &PgPool, host: &str) {
    for sql in [
        "DELETE FROM nbd_exports WHERE host = $1",
        "DELETE FROM volume_attachments WHERE host = $1",
        "DELETE FROM outbox WHERE host = $1",
        "DELETE FROM operations WHERE host = $1",
        "DELETE FROM dead_letters WHERE host = $1",
        "DELETE FROM nbd_stats WHERE host = $1",
    ] {
        let _ = sqlx::query(sql).bind(host).execute(pool).await;
    }
    if let Ok(conn) =
        crate::amqp::connect_with(&config.amqp_url, &config.amqp_tls, "volumed-bench").await
    {
        if let Ok(ch) = conn.create_channel().await {
            let topo = crate::topology::Topology::for_host(
                host,
                config.delivery_limit,
                &config.retry_delays,
            );
            for q in topo.queues {
                let _ = ch
                    .queue_delete(&q.name, QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bench done").await;
    }
}

/// The floor: the same number of messages through consume → one commit →
/// one confirmed publish → ack, with the daemon's worker count and prefetch.
async fn floor(config: &Config, pool: &PgPool, plan: &Plan) -> Result<Figures> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS volumed_bench_floor (id uuid PRIMARY KEY, body jsonb NOT NULL)",
    )
    .execute(pool)
    .await?;
    let id = Uuid::new_v4().simple().to_string();
    let (inq, outq) = (
        format!("volumed.bench.in.{id}"),
        format!("volumed.bench.out.{id}"),
    );
    let conn = crate::amqp::connect_with(&config.amqp_url, &config.amqp_tls, "volumed-bench-floor")
        .await?;
    let ch = conn.create_channel().await?;
    let declare = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // The input is a quorum queue like the daemon's request queue: the
    // floor must pay what the daemon pays for each delivery it takes.
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(&inq, declare, quorum).await?;
    ch.queue_declare(&outq, declare, FieldTable::default())
        .await?;
    let prefetch = (plan.workers * 2) as u16;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let out_ch = conn.create_channel().await?;
    out_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let out_ch = Arc::new(out_ch);
    let permits = Arc::new(Semaphore::new(plan.workers));
    let mut consumer = ch
        .basic_consume(
            &inq,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let pool2 = pool.clone();
    let worker = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let permit = Arc::clone(&permits).acquire_owned().await;
            let (pool, out_ch) = (pool2.clone(), Arc::clone(&out_ch));
            tokio::spawn(async move {
                let _permit = permit;
                let key = Uuid::new_v4();
                let committed = async {
                    let mut tx = pool.begin().await?;
                    sqlx::query("INSERT INTO volumed_bench_floor (id, body) VALUES ($1, $2)")
                        .bind(key)
                        .bind(serde_json::json!({"n": d.data.len()}))
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await
                };
                if committed.await.is_err() {
                    return;
                }
                let props = d.properties.clone().with_delivery_mode(2);
                let confirmed = out_ch
                    .basic_publish(
                        "",
                        d.routing_key.as_str().replace(".in.", ".out.").as_str(),
                        BasicPublishOptions::default(),
                        &d.data,
                        props,
                    )
                    .await;
                if let Ok(c) = confirmed {
                    let _ = c.await;
                }
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            });
        }
    });
    let pub_ch = conn.create_channel().await?;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let recv_ch = conn.create_channel().await?;
    let mut out = recv_ch
        .basic_consume(
            &outq,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let body =
        serde_json::to_vec(&serde_json::json!({"op": "attach", "volume_id": Uuid::new_v4()}))?;
    let ids: Vec<Uuid> = (0..plan.requests).map(|_| Uuid::new_v4()).collect();
    let t0 = Instant::now();
    // Arrivals stamped as they come, as for the daemon (see `arrivals`).
    let (stamp, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let receiver = tokio::spawn(async move {
        while let Some(Ok(d)) = out.next().await {
            let at = t0.elapsed();
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().parse());
            if let Some(Ok(id)) = id {
                if stamp.send((id, at, true)).is_err() {
                    break;
                }
            }
        }
    });
    // Sent as the daemon's requests are: every message of a slice before
    // any confirmation is awaited.
    let run = drive(
        plan.requests,
        plan.queued,
        t0,
        async |range, published| {
            let mut confirms = Vec::with_capacity(range.len());
            for id in &ids[range] {
                published.insert(*id, t0.elapsed());
                let props = BasicProperties::default()
                    .with_message_id(id.to_string().into())
                    .with_delivery_mode(2);
                confirms.push(
                    pub_ch
                        .basic_publish("", &inq, BasicPublishOptions::default(), &body, props)
                        .await?,
                );
            }
            for c in confirms {
                c.await?;
            }
            Ok(())
        },
        &mut arrived,
    )
    .await?;
    receiver.abort();
    worker.abort();
    let _ = conn.close(200, "floor done").await;
    // The queues go on a connection of their own: RabbitMQ 3.10 may close
    // the consuming channel when its quorum queue is deleted under its
    // consumer, and a delete sent on that channel would then be lost,
    // leaving the output queue behind.
    match crate::amqp::connect_with(&config.amqp_url, &config.amqp_tls, "volumed-bench-cleanup")
        .await
    {
        Ok(c) => {
            if let Ok(ch) = c.create_channel().await {
                for q in [&outq, &inq] {
                    if let Err(e) = ch.queue_delete(q, QueueDeleteOptions::default()).await {
                        eprintln!("volumed bench: cannot delete queue {q}: {e}");
                    }
                }
            }
            let _ = c.close(200, "floor cleaned up").await;
        }
        Err(e) => eprintln!("volumed bench: cannot delete queues {inq} and {outq}: {e:#}"),
    }
    sqlx::query("DROP TABLE IF EXISTS volumed_bench_floor")
        .execute(pool)
        .await?;
    Ok(run.figures())
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;

    fn round(throughput_per_s: f64, throughput_ratio: Option<f64>) -> Round {
        Round {
            throughput_per_s,
            sustained_per_s: throughput_per_s,
            p99_ms: 1.0,
            throughput_ratio,
            p99_ratio: None,
            failed_events: 0,
        }
    }

    #[test]
    fn the_median_round_is_taken_by_ratio_or_else_by_throughput() {
        assert_eq!(median_round(&[]), None);
        let by_ratio = [
            round(900.0, Some(0.7)),
            round(1000.0, Some(0.4)),
            round(800.0, Some(0.5)),
        ];
        assert_eq!(median_round(&by_ratio), Some(2), "0.5 is the middle ratio");
        let no_floor = [round(900.0, None), round(1000.0, None), round(800.0, None)];
        assert_eq!(median_round(&no_floor), Some(0));
        let even = [
            round(1.0, None),
            round(4.0, None),
            round(3.0, None),
            round(2.0, None),
        ];
        assert_eq!(median_round(&even), Some(2), "the upper middle of four");
    }

    fn plan(requests: usize, queued: Option<usize>, floor: bool) -> Plan {
        Plan {
            requests,
            volumes: 10,
            vms: 1,
            backend: "local".into(),
            latency: Duration::ZERO,
            engine: "nbdkit".into(),
            workers: 4,
            floor,
            state_dir: None,
            queued,
        }
    }

    #[test]
    fn a_queued_plan_needs_twice_as_many_requests() {
        assert!(plan(20, None, true).check().is_ok());
        assert!(plan(20, Some(10), false).check().is_ok());
        // The floor is fed the same way as the daemon, so it can keep a
        // depth too.
        assert!(plan(20, Some(10), true).check().is_ok());
        let e = plan(19, Some(10), true).check().expect_err("too few");
        assert!(e.to_string().contains("at least 20"), "{e}");
        assert!(plan(20, Some(0), false).check().is_err());
        assert!(plan(0, None, false).check().is_err());
    }

    /// Feeds `drive` a pipeline that answers every request as soon as it
    /// is published (the last one with a failure) and returns the ranges
    /// it was asked to publish, with the run.
    async fn drive_instant(total: usize, queued: Option<usize>) -> (Vec<Range<usize>>, Drive) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ids: Vec<Uuid> = (0..total).map(|_| Uuid::new_v4()).collect();
        let mut calls = Vec::new();
        let t0 = Instant::now();
        let run = drive(
            total,
            queued,
            t0,
            async |range: Range<usize>, published: &mut HashMap<Uuid, Duration>| {
                calls.push(range.clone());
                for i in range {
                    published.insert(ids[i], t0.elapsed());
                    tx.send((ids[i], t0.elapsed(), i + 1 < total))
                        .expect("the receiver lives as long as the run");
                }
                Ok(())
            },
            &mut rx,
        )
        .await
        .expect("run");
        (calls, run)
    }

    #[tokio::test]
    async fn a_depth_is_kept_by_publishing_one_more_for_each_outcome() {
        let (calls, run) = drive_instant(10, Some(3)).await;
        // Three at first; then the three outcomes that are in are all
        // counted before one top-up of the same size.
        assert_eq!(calls, vec![0..3, 3..6, 6..9, 9..10]);
        assert_eq!(run.max_in_flight, 3);
        assert_eq!(run.done.len(), 10);
        assert_eq!(run.failed, 1, "the last request failed");
        assert!(
            run.topped_up.is_some(),
            "the last top-up is when the depth ends"
        );
        assert_eq!(run.figures().max_in_flight, 3);
    }

    #[tokio::test]
    async fn without_a_depth_the_whole_burst_is_published_at_once() {
        let (calls, run) = drive_instant(5, None).await;
        assert_eq!(calls, vec![0..5]);
        assert_eq!(run.max_in_flight, 5);
        assert_eq!(run.done.len(), 5);
        assert!(run.topped_up.is_none());
    }

    #[test]
    fn the_sustained_rate_at_a_depth_ends_at_the_last_top_up() {
        // 100 events a millisecond apart while the queue was topped up,
        // then a slow drain of 100 more, 10 ms apart.
        let mut arrivals: Vec<Duration> = (0..100).map(Duration::from_millis).collect();
        arrivals.extend((0..100).map(|i| Duration::from_millis(100 + i * 10)));
        let lat = vec![Duration::from_millis(5); arrivals.len()];
        let burst = figures(lat.clone(), arrivals.clone(), None);
        let held = figures(lat, arrivals, Some(Duration::from_millis(99)));
        // From the 10th percentile (20 ms) to 99 ms: 79 intervals in 79 ms.
        assert!((held.sustained_per_s - 1000.0).abs() < 1.0, "{held:?}");
        assert!(burst.sustained_per_s < 300.0, "the drain counts: {burst:?}");
    }

    #[test]
    fn reconciliations_are_summed_over_their_outcomes() {
        let text = "# HELP volumed_reconciliations_total Reconciliations.\n\
                    # TYPE volumed_reconciliations_total counter\n\
                    volumed_reconciliations_total{outcome=\"clean\"} 1\n\
                    volumed_reconciliations_total{outcome=\"drift\"} 2\n\
                    volumed_requests_total{op=\"attach\",outcome=\"succeeded\"} 7\n";
        assert_eq!(reconciliations(text), 3.0);
        assert_eq!(reconciliations(""), 0.0, "none before the first run");
    }

    #[test]
    fn the_sustained_rate_leaves_out_a_slow_start() {
        // Ten events over the first second, then ninety at 100 per second.
        let mut arrivals: Vec<Duration> = (0..10).map(|i| Duration::from_millis(i * 100)).collect();
        arrivals.extend((0..90).map(|i| Duration::from_millis(1000 + i * 10)));
        let lat = vec![Duration::from_millis(5); arrivals.len()];
        let f = figures(lat, arrivals, None);
        assert_eq!(f.requests, 100);
        assert!((f.seconds - 1.89).abs() < 1e-9, "{f:?}");
        assert!(f.throughput_per_s < 60.0, "{f:?}");
        assert!((f.sustained_per_s - 100.0).abs() < 1.0, "{f:?}");
        assert_eq!(f.p99_ms, 5.0);
    }

    #[test]
    fn an_empty_run_has_no_rates() {
        let f = figures(Vec::new(), Vec::new(), None);
        assert_eq!((f.throughput_per_s, f.sustained_per_s), (0.0, 0.0));
    }
}
