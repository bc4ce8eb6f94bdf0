//! The chaos suite: a burst of attach/detach requests while the daemon is
//! killed with SIGKILL at random moments, the broker drops every connection,
//! the database goes away and comes back, and the NBD server is killed;
//! then the design's invariants are checked.
//!
//! The short form runs with the tests. The long form runs on demand:
//! `VOLUMED_CHAOS_SCALE=10 cargo test --test chaos -- --nocapture`
//! (scale multiplies volumes, requests and kills).
//!
//! By default the broker "restart" closes every connection of the test's
//! vhost and the database "restart" cuts a proxy in front of PostgreSQL:
//! the shared servers keep serving the other tests that run alongside. Run
//! alone, `VOLUMED_CHAOS_REAL_RESTARTS=1` restarts the real RabbitMQ
//! (`rabbitmqctl stop_app` / `start_app`) and PostgreSQL (`pg_ctlcluster
//! restart`) instead; never set it while other tests run.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Env, Proxy};
use rand::Rng;
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::nbd::proto::{self, Open};

const HOST: &str = "oma-chaos";

fn scale() -> usize {
    std::env::var("VOLUMED_CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

struct Figures {
    requests: usize,
    kills: usize,
    broker_drops: usize,
    database_cuts: usize,
    nbd_kills: usize,
    lost: usize,
    duplicate_events: usize,
    duplicate_effects: usize,
    drift: usize,
    foreign_data: usize,
    first_completion_after_restart: Vec<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_every_invariant() {
    let scale = scale();
    let env = Env::new("chaos").await;
    env.durable_event_queue("test.events").await;
    let proxy = Proxy::start(5432).await;
    let db_url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, env.name);
    let daemon_env: Vec<(&str, String)> = vec![
        ("VOLUMED_DATABASE_URL", db_url.clone()),
        ("VOLUMED_WORKERS", "4".into()),
        ("VOLUMED_LOCAL_LATENCY_MS", "30".into()),
        ("VOLUMED_RETRY_DELAYS", "100ms,300ms,1s".into()),
        ("VOLUMED_RETRY_ATTEMPTS", "8".into()),
        ("VOLUMED_RECONCILE_INTERVAL_SECS", "0".into()),
        ("VOLUMED_RECONCILE_APPLY", "false".into()),
    ];
    let pairs: Vec<(&str, &str)> = daemon_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = env.start(HOST, &pairs);

    // Requests: per volume, attach / detach alternating, ending attached.
    let volumes: Vec<Uuid> = (0..8 * scale).map(|_| env.create_volume(HOST)).collect();
    let per_volume = 7;
    let client = env.client().await;
    let mut requests = Vec::new();
    for step in 0..per_volume {
        for &v in &volumes {
            let r = if step % 2 == 0 {
                Outgoing::attach(HOST, v, env.appliance, true)
            } else {
                Outgoing::detach(HOST, v, None)
            };
            client.publish(&r).await.expect("publish");
            requests.push(r.request_id);
        }
    }
    client.close().await;

    let mut f = Figures {
        requests: requests.len(),
        kills: 0,
        broker_drops: 0,
        database_cuts: 0,
        nbd_kills: 0,
        lost: 0,
        duplicate_events: 0,
        duplicate_effects: 0,
        drift: 0,
        foreign_data: 0,
        first_completion_after_restart: Vec::new(),
    };
    let finished = |env: &Env| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                .fetch_one(&pool)
                .await
                .expect("count") as usize
        }
    };

    // The chaos: kills at random moments, one of each outage in between.
    let mut rng = rand::thread_rng();
    let kills = 3 * scale;
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        daemon.kill();
        f.kills += 1;
        daemon = env.start(HOST, &pairs);
        let restarted = Instant::now();
        let before = finished(&env).await;
        // Time to the first completed request after the restart.
        while finished(&env).await == before && restarted.elapsed() < Duration::from_secs(30) {
            if finished(&env).await >= requests.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if finished(&env).await > before {
            f.first_completion_after_restart.push(restarted.elapsed());
        }
        let real = std::env::var("VOLUMED_CHAOS_REAL_RESTARTS").is_ok_and(|v| v == "1");
        match k % 3 {
            0 if real => {
                common::rabbitmqctl(&["stop_app"]);
                tokio::time::sleep(Duration::from_secs(2)).await;
                common::rabbitmqctl(&["start_app"]);
                f.broker_drops += 1;
            }
            0 => {
                common::rabbitmqctl(&[
                    "close_all_connections",
                    "--vhost",
                    &env.vhost,
                    "chaos: broker restart",
                ]);
                f.broker_drops += 1;
            }
            1 if real => {
                let version = std::fs::read_dir("/etc/postgresql")
                    .expect("a PostgreSQL cluster")
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .max()
                    .expect("a PostgreSQL version");
                let ok = std::process::Command::new("pg_ctlcluster")
                    .args(["--skip-systemctl-redirect", &version, "main", "restart"])
                    .status()
                    .expect("pg_ctlcluster");
                assert!(ok.success(), "PostgreSQL restart failed");
                f.database_cuts += 1;
            }
            1 => {
                proxy.cut();
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxy.restore();
                f.database_cuts += 1;
            }
            _ => {
                let pidfile = env.data_dir(HOST).join("nbdkit.pid");
                if let Ok(pid) = std::fs::read_to_string(&pidfile) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        f.nbd_kills += 1;
                    }
                }
            }
        }
    }

    // Everything ends.
    let deadline = Instant::now() + Duration::from_secs(180);
    let terminal = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM operations WHERE request_id = ANY($1) AND state <> 'running'",
        )
        .bind(&requests)
        .fetch_one(&env.pool)
        .await
        .expect("count") as usize
    };
    while terminal().await < requests.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
        .await;
    daemon.sigterm();
    assert!(
        daemon.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        daemon.log().join("\n")
    );

    // 1. Every request exactly one terminal event (by event id).
    let by_request = common::event_ids_by_request(&env.drain_queue("test.events").await);
    for r in &requests {
        match by_request.get(r).map(HashSet::len) {
            None => f.lost += 1,
            Some(1) => {}
            Some(_) => f.duplicate_events += 1,
        }
    }
    // 2. No side effect done twice: per volume, the backend saw attach and
    //    detach strictly alternating.
    let mut calls: HashMap<String, Vec<String>> = HashMap::new();
    for line in env.call_log(HOST) {
        let mut parts = line.split(' ');
        let (op, vol) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        calls.entry(vol.to_owned()).or_default().push(op.to_owned());
    }
    for ops in calls.values() {
        f.duplicate_effects += ops.windows(2).filter(|w| w[0] == w[1]).count();
    }
    // 3. Records, configuration, live server, devices and backend agree.
    let daemon = env.start(HOST, &pairs);
    let config = {
        let mut vars: HashMap<String, String> = env.daemon_env(HOST).into_iter().collect();
        for (k, v) in &daemon_env {
            vars.insert(k.to_string(), v.clone());
        }
        volumed::config::Config::load_with(None, &|k| vars.get(k).cloned()).expect("config")
    };
    let reconciler = volumed::reconcile::Reconciler {
        host: HOST.into(),
        appliance_vm: env.appliance,
        device_dir: config.device_dir.clone(),
        pool: env.pool.clone(),
        backend: volumed::backend::build(&config, env.appliance).expect("backend"),
        engine: volumed::nbd::engine_for(&config.nbd),
        nbd: config.nbd.clone(),
        stuck_after: Duration::from_secs(3600),
    };
    // The restarted daemon's export manager first brings its server up.
    let mut report = reconciler.run(false).await.expect("reconcile");
    let settle = Instant::now();
    while !report.drifts.is_empty() && settle.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        report = reconciler.run(false).await.expect("reconcile");
    }
    f.drift = report.drifts.len();
    // 4. No export serves another volume's data.
    let attached: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT volume_id, export_name FROM nbd_exports WHERE host = $1")
            .bind(HOST)
            .fetch_all(&env.pool)
            .await
            .expect("exports");
    for (vol, name) in &attached {
        let tag = vol.as_bytes().to_vec();
        let s = proto::Session::connect("127.0.0.1", env.nbd_port(HOST))
            .await
            .expect("connect");
        let (open, t) = s.go(name).await.expect("go");
        assert!(matches!(open, Open::Served { .. }), "{name}: {open:?}");
        let mut t = t.expect("served");
        t.write(0, &tag).await.expect("write");
        t.disconnect().await;
        let image = volumed::backend::local::LocalBackend::image_path(&env.data_dir(HOST), *vol);
        let head = std::fs::read(&image).expect("image")[..16].to_vec();
        if head != tag {
            f.foreign_data += 1;
        }
    }
    drop(daemon);

    let restart_times = &f.first_completion_after_restart;
    let max_restart = restart_times.iter().max().copied().unwrap_or_default();
    let avg_restart = if restart_times.is_empty() {
        Duration::ZERO
    } else {
        restart_times.iter().sum::<Duration>() / restart_times.len() as u32
    };
    eprintln!(
        "\nchaos summary (scale {scale})\n\
         | figure                                  | value |\n\
         |-----------------------------------------|-------|\n\
         | requests                                | {} |\n\
         | daemon kills (SIGKILL) survived         | {} |\n\
         | broker connection drops survived        | {} |\n\
         | database outages survived               | {} |\n\
         | NBD server kills survived               | {} |\n\
         | requests lost                           | {} |\n\
         | requests with more than one event       | {} |\n\
         | side effects done twice                 | {} |\n\
         | drift left after recovery               | {} |\n\
         | exports serving another volume's data   | {} |\n\
         | restart to first completion (avg / max) | {:?} / {:?} |\n",
        f.requests,
        f.kills,
        f.broker_drops,
        f.database_cuts,
        f.nbd_kills,
        f.lost,
        f.duplicate_events,
        f.duplicate_effects,
        f.drift,
        f.foreign_data,
        avg_restart,
        max_restart
    );
    assert_eq!(f.lost, 0, "requests lost");
    assert_eq!(f.duplicate_events, 0, "requests with two events");
    assert_eq!(f.duplicate_effects, 0, "side effects repeated");
    assert_eq!(f.drift, 0, "drift after recovery: {}", report.render());
    assert_eq!(f.foreign_data, 0, "an export served another volume");
    assert!(f.kills >= 3 && f.broker_drops >= 1 && f.database_cuts >= 1 && f.nbd_kills >= 1);
}
