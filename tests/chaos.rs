//! The chaos suite: a burst of attach/detach requests while the daemon is
//! killed with SIGKILL at random moments, the broker drops every connection,
//! the database goes away and comes back, and the NBD server is killed;
//! then the design's invariants are checked.
//!
//! The short form runs with the tests. The long form runs on demand:
//! `VOLUMED_CHAOS_SCALE=5 cargo test --test chaos -- --nocapture`
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
    /// Requests not yet terminal at each SIGKILL.
    unfinished_at_kill: Vec<usize>,
    lost: usize,
    duplicate_events: usize,
    not_succeeded: usize,
    /// Refused repeats plus breaks of the expected per-volume sequence.
    duplicate_effects: usize,
    drift: usize,
    probed: usize,
    foreign_data: usize,
    /// From just before the new daemon is spawned.
    spawn_to_completion: Vec<Duration>,
    /// From its `consuming requests` log line.
    consuming_to_completion: Vec<Duration>,
}

fn avg_max(times: &[Duration]) -> (Duration, Duration) {
    let max = times.iter().max().copied().unwrap_or_default();
    let avg = if times.is_empty() {
        Duration::ZERO
    } else {
        times.iter().sum::<Duration>() / times.len() as u32
    };
    (avg, max)
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
        // Changes to one VM are serialised, so the burst takes about
        // requests x 250 ms: it outlasts the chaos (every kill finds
        // requests unfinished) and the short form stays near 20 s.
        ("VOLUMED_LOCAL_LATENCY_MS", "250".into()),
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
        unfinished_at_kill: Vec::new(),
        lost: 0,
        duplicate_events: 0,
        not_succeeded: 0,
        duplicate_effects: 0,
        drift: 0,
        probed: 0,
        foreign_data: 0,
        spawn_to_completion: Vec::new(),
        consuming_to_completion: Vec::new(),
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

    let terminal = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM operations WHERE request_id = ANY($1) AND state <> 'running'",
        )
        .bind(&requests)
        .fetch_one(&env.pool)
        .await
        .expect("count") as usize
    };

    // The chaos: kills at random moments, one of each outage in between.
    let mut rng = rand::thread_rng();
    let kills = 3 * scale;
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        f.unfinished_at_kill
            .push(requests.len().saturating_sub(terminal().await));
        daemon.kill();
        f.kills += 1;
        let before = finished(&env).await;
        let spawned = Instant::now();
        daemon = env.start(HOST, &pairs);
        let consuming = Instant::now();
        // Time to the first completed request after the restart.
        while finished(&env).await == before && spawned.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if finished(&env).await > before {
            f.spawn_to_completion.push(spawned.elapsed());
            f.consuming_to_completion.push(consuming.elapsed());
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

    // 1. Every request exactly one terminal event (by event id), and a
    //    success: the sequence of each volume is always possible.
    let events = env.drain_queue("test.events").await;
    let by_request = common::event_ids_by_request(&events);
    let mut types: HashMap<Uuid, HashSet<String>> = HashMap::new();
    for m in &events {
        let e: volumed::contract::Event = serde_json::from_slice(&m.delivery.data).expect("event");
        types
            .entry(e.request_id)
            .or_default()
            .insert(e.event_type.as_str().to_owned());
    }
    for r in &requests {
        match by_request.get(r).map(HashSet::len) {
            None => f.lost += 1,
            Some(1) => {}
            Some(_) => f.duplicate_events += 1,
        }
        let ok = types
            .get(r)
            .is_some_and(|t| t.iter().all(|t| t.ends_with(".succeeded")));
        if by_request.contains_key(r) && !ok {
            f.not_succeeded += 1;
        }
    }
    // 2. No side effect done twice: every call the backend refused as a
    //    repeat counts, and per volume the changes are exactly attach,
    //    detach, ..., attach, one per request.
    let refused = env.refused_calls(HOST);
    f.duplicate_effects += refused.len();
    let mut calls: HashMap<Uuid, Vec<String>> = HashMap::new();
    for line in env.call_log(HOST) {
        let mut parts = line.split(' ');
        let (op, vol) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let vol = Uuid::parse_str(vol).expect("a volume id in the call history");
        calls.entry(vol).or_default().push(op.to_owned());
    }
    let expected: Vec<String> = (0..per_volume)
        .map(|i| if i % 2 == 0 { "attach" } else { "detach" }.to_owned())
        .collect();
    let mut sequence_breaks = Vec::new();
    for v in &volumes {
        let ops = calls.remove(v).unwrap_or_default();
        if ops != expected {
            f.duplicate_effects += 1;
            sequence_breaks.push(format!("{v}: {ops:?}"));
        }
    }
    f.duplicate_effects += calls.len();
    // 3. Records, configuration, live server, devices and backend agree.
    let daemon = env.start(HOST, &pairs);
    let config = {
        let mut vars: HashMap<String, String> = env.daemon_env(HOST).into_iter().collect();
        for (k, v) in &daemon_env {
            vars.insert(k.to_string(), v.clone());
        }
        volumed::config::Config::load_with(None, &|k| vars.get(k).cloned()).expect("config")
    };
    let backend = volumed::backend::build(&config, env.appliance).expect("backend");
    let reconciler = volumed::reconcile::Reconciler::from_config(
        &config,
        env.appliance,
        env.pool.clone(),
        backend,
    );
    // The restarted daemon's export manager first brings its server up.
    let mut report = reconciler.run(false).await.expect("reconcile");
    let settle = Instant::now();
    while !report.drifts.is_empty() && settle.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        report = reconciler.run(false).await.expect("reconcile");
    }
    f.drift = report.drifts.len();
    // 4. No export serves another volume's data; every volume ends
    //    attached and exported.
    let attached: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT volume_id, export_name FROM nbd_exports WHERE host = $1")
            .bind(HOST)
            .fetch_all(&env.pool)
            .await
            .expect("exports");
    let exported: HashSet<Uuid> = attached.iter().map(|(v, _)| *v).collect();
    assert!(
        volumes.iter().all(|v| exported.contains(v)) && attached.len() == volumes.len(),
        "every volume ends with its one export: {attached:?}"
    );
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
        f.probed += 1;
        let image = volumed::backend::local::LocalBackend::image_path(&env.data_dir(HOST), *vol);
        let head = std::fs::read(&image).expect("image")[..16].to_vec();
        if head != tag {
            f.foreign_data += 1;
        }
    }
    drop(daemon);

    let (spawn_avg, spawn_max) = avg_max(&f.spawn_to_completion);
    let (consuming_avg, consuming_max) = avg_max(&f.consuming_to_completion);
    let unfinished_min = f.unfinished_at_kill.iter().min().copied().unwrap_or(0);
    eprintln!(
        "\nchaos summary (scale {scale})\n\
         | figure                                            | value |\n\
         |---------------------------------------------------|-------|\n\
         | requests                                          | {} |\n\
         | daemon kills (SIGKILL) survived                   | {} |\n\
         | requests unfinished at each kill                  | {:?} |\n\
         | broker connection drops survived                  | {} |\n\
         | database outages survived                         | {} |\n\
         | NBD server kills survived                         | {} |\n\
         | requests lost                                     | {} |\n\
         | requests with more than one event                 | {} |\n\
         | requests not ending in success                    | {} |\n\
         | side effects done twice                           | {} |\n\
         | drift left after recovery                         | {} |\n\
         | exports probed                                    | {} |\n\
         | exports serving another volume's data             | {} |\n\
         | spawn to first completion (avg / max)             | {:?} / {:?} |\n\
         | `consuming requests` to first completion (avg / max) | {:?} / {:?} |\n",
        f.requests,
        f.kills,
        f.unfinished_at_kill,
        f.broker_drops,
        f.database_cuts,
        f.nbd_kills,
        f.lost,
        f.duplicate_events,
        f.not_succeeded,
        f.duplicate_effects,
        f.drift,
        f.probed,
        f.foreign_data,
        spawn_avg,
        spawn_max,
        consuming_avg,
        consuming_max,
    );
    assert_eq!(f.lost, 0, "requests lost");
    assert_eq!(f.duplicate_events, 0, "requests with two events");
    assert_eq!(f.not_succeeded, 0, "requests that did not succeed");
    assert_eq!(
        f.duplicate_effects, 0,
        "side effects repeated: refused {refused:?}; sequences {sequence_breaks:?}"
    );
    assert_eq!(f.drift, 0, "drift after recovery: {}", report.render());
    assert_eq!(f.probed, volumes.len(), "every volume's export probed");
    assert_eq!(f.foreign_data, 0, "an export served another volume");
    assert!(
        unfinished_min > 0,
        "every kill must find work unfinished: {:?}",
        f.unfinished_at_kill
    );
    assert_eq!(
        f.spawn_to_completion.len(),
        f.kills,
        "a completion after every restart"
    );
    assert!(f.kills >= 3 && f.broker_drops >= 1 && f.database_cuts >= 1 && f.nbd_kills >= 1);
}
