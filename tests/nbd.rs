//! NBD exports end to end, for both engines: real nbdkit and nbd-server
//! processes on a free port per test, real RabbitMQ and PostgreSQL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Env, WAIT};
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::contract::{ErrorCode, Event, EventType};
use volumed::nbd::proto::{self, Open};

const HOST: &str = "oma-n";

fn engine_env(engine: &str) -> Vec<(&'static str, String)> {
    vec![
        ("VOLUMED_NBD_ENGINE", engine.to_string()),
        ("VOLUMED_NBD_DRAIN_TIMEOUT_SECS", "1".to_string()),
        ("VOLUMED_NBD_BATCH_WINDOW_MS", "50".to_string()),
        // Quick retries: a server killed on purpose fails a few checks.
        ("VOLUMED_RETRY_DELAYS", "200ms,500ms,1s".to_string()),
    ]
}

fn start(env: &Env, engine: &str, extra: &[(&str, &str)]) -> common::Daemon {
    let owned = engine_env(engine);
    let mut all: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    env.start(HOST, &all)
}

async fn attach(env: &Env, vol: Uuid) -> Event {
    let client = env.client().await;
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, true), WAIT)
        .await
        .expect("attach event");
    client.close().await;
    ev
}

async fn detach(env: &Env, vol: Uuid) -> Event {
    let client = env.client().await;
    let ev = client
        .request_and_wait(Outgoing::detach(HOST, vol, None), WAIT)
        .await
        .expect("detach event");
    client.close().await;
    ev
}

fn image(env: &Env, vol: Uuid) -> PathBuf {
    volumed::backend::local::LocalBackend::image_path(&env.data_dir(HOST), vol)
}

fn uri(env: &Env, name: &str) -> String {
    format!("nbd://127.0.0.1:{}/{name}", env.nbd_port(HOST))
}

/// Writes a 1 MiB pattern through the export with qemu-io.
fn qemu_write(env: &Env, name: &str, byte: u8) -> std::process::Output {
    Command::new("qemu-io")
        .args(["-f", "raw", &uri(env, name), "-c"])
        .arg(format!("write -P {byte:#x} 0 1M"))
        .output()
        .expect("qemu-io runs (scripts/ensure-services.sh installs qemu-utils)")
}

fn first_mib(p: &Path) -> Vec<u8> {
    let data = std::fs::read(p).expect("volume file");
    data[..1 << 20].to_vec()
}

/// The server's answer about `name`. With nbd-server an idle restart
/// (which drops the sections of withdrawn exports) may be under way at any
/// moment after a detach: a refused connection is a moment of it, not an
/// answer, so it is waited out.
async fn probe(env: &Env, name: &str) -> proto::Probe {
    let start = std::time::Instant::now();
    loop {
        match proto::probe(
            "127.0.0.1",
            env.nbd_port(HOST),
            name,
            Duration::from_secs(5),
        )
        .await
        {
            Ok(p) => return p,
            Err(e) => assert!(start.elapsed() < WAIT, "the server never answered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_served(p: &proto::Probe) -> bool {
    p.listed && matches!(p.open, Open::Served { .. })
}

/// What the engine's configuration holds for an export.
fn config_mentions(env: &Env, engine: &str, name: &str) -> bool {
    let data = env.data_dir(HOST);
    match engine {
        "nbdkit" => common::exists(&data.join("exports").join(name)),
        _ => data
            .join("nbd-server")
            .join("conf.d")
            .join(format!("{name}.conf"))
            .exists(),
    }
}

async fn attach_serves_the_volume_and_data_round_trips(engine: &str) {
    let env = Env::new(&format!("nbd_rt_{}", engine.replace('-', "_"))).await;
    let _d = start(&env, engine, &[]);
    let vol = env.create_volume(HOST);
    let job_id = format!("replication-{}", Uuid::new_v4().simple());
    let mut request = Outgoing::attach(HOST, vol, env.appliance, true);
    request.body["job_id"] = serde_json::json!(job_id);
    let client = env.client().await;
    let ev = client
        .request_and_wait(request, WAIT)
        .await
        .expect("attach event");
    client.close().await;
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    let export = ev.export.expect("export in the event");
    assert_eq!(export.name, format!("vol-{vol}"));
    assert_eq!(export.port, env.nbd_port(HOST));

    let out = Command::new("nbdinfo")
        .args(["--list", &format!("nbd://127.0.0.1:{}", export.port)])
        .output()
        .expect("nbdinfo runs");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains(&format!("export=\"{}\"", export.name)),
        "{listing}"
    );

    let out = qemu_write(&env, &export.name, 0x5a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        first_mib(&image(&env, vol)).iter().all(|b| *b == 0x5a),
        "data reached the volume"
    );

    let (engine_col, recorded_job): (String, Option<String>) =
        sqlx::query_as("SELECT engine, metadata->>'job_id' FROM nbd_exports WHERE volume_id = $1")
            .bind(vol)
            .fetch_one(&env.pool)
            .await
            .expect("export row");
    assert_eq!(engine_col, engine);
    assert_eq!(
        recorded_job.as_deref(),
        Some(job_id.as_str()),
        "the request's job id is kept"
    );
    let out = env.cli(HOST, &["exports"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&export.name) && text.contains("live"),
        "{text}"
    );
}

async fn detach_withdraws_the_export(engine: &str) {
    let env = Env::new(&format!("nbd_wd_{}", engine.replace('-', "_"))).await;
    // One attempt: export_busy is retryable, and this test looks at the
    // failure itself rather than at its retries.
    let _d = start(&env, engine, &[("VOLUMED_RETRY_ATTEMPTS", "1")]);
    let vol = env.create_volume(HOST);
    let name = attach(&env, vol).await.export.expect("export").name;

    // A client connected before the detach: the export is withdrawn (new
    // connections refused) but the detach fails with export_busy rather than
    // pull the device from under the client, and the volume stays attached.
    let session = proto::Session::connect("127.0.0.1", env.nbd_port(HOST))
        .await
        .expect("connect");
    let (open, held) = session.go(&name).await.expect("go");
    assert!(matches!(open, Open::Served { .. }));
    let mut held = held.expect("transmission");
    let ev = detach(&env, vol).await;
    assert_eq!(ev.event_type, EventType::DetachFailed, "{ev:?}");
    assert_eq!(
        ev.error.as_ref().expect("error").code,
        ErrorCode::ExportBusy
    );
    assert!(
        !is_served(&probe(&env, &name).await),
        "new connections refused"
    );
    assert!(!config_mentions(&env, engine, &name));
    assert_eq!(
        held.read(0, 512)
            .await
            .expect("old connection still works")
            .len(),
        512
    );
    held.disconnect().await;

    let ev = detach(&env, vol).await;
    assert_eq!(ev.event_type, EventType::DetachSucceeded, "{ev:?}");
    let p = probe(&env, &name).await;
    assert!(matches!(p.open, Open::Refused { .. }), "{p:?}");
    assert!(!config_mentions(&env, engine, &name));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM nbd_exports")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(rows, 0);
    if engine == "nbd-server" {
        // The section nbd-server still held is dropped by an idle restart,
        // and with it the emptied authfile.
        let auth = env
            .data_dir(HOST)
            .join("nbd-server/volumed-auth")
            .join(format!("{name}.allow"));
        let start = std::time::Instant::now();
        // The server restarts meanwhile: a refused connection is a
        // moment of the restart, not an answer.
        let listed = |env: &Env, name: String| {
            let port = env.nbd_port(HOST);
            async move {
                proto::probe("127.0.0.1", port, &name, Duration::from_secs(5))
                    .await
                    .map(|p| p.listed)
                    .unwrap_or(true)
            }
        };
        // Each look is itself a client for a moment (nbd-server forks per
        // connection), so look rarely: the restart waits for a quiet tick.
        while auth.exists() || listed(&env, name.clone()).await {
            assert!(start.elapsed() < WAIT, "stale section never dropped");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn forty_concurrent_attaches_are_all_live(engine: &str) {
    let env = Env::new(&format!("nbd_40_{}", engine.replace('-', "_"))).await;
    let d = start(&env, engine, &[("VOLUMED_WORKERS", "8")]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    // A client stays connected to one export during the burst, as a
    // replication agent would: nbd-server must then reload, not restart.
    let holder = env.create_volume(HOST);
    let holder_name = attach(&env, holder).await.export.expect("export").name;
    let (_, held) = proto::Session::connect("127.0.0.1", env.nbd_port(HOST))
        .await
        .expect("connect")
        .go(&holder_name)
        .await
        .expect("go");
    let held = held.expect("served");
    let vols: Vec<Uuid> = (0..40).map(|_| env.create_volume(HOST)).collect();
    for &v in &vols {
        client
            .publish(&Outgoing::attach(HOST, v, env.appliance, true))
            .await
            .expect("publish");
    }
    // Kill the server in the middle of the burst: the daemon must notice,
    // restart it and still serve every export.
    let mut events = Vec::new();
    while events.len() < 10 {
        events.push(sub.next(WAIT).await.expect("events").expect("event"));
    }
    let pidfile = env.data_dir(HOST).join(format!("{engine}.pid"));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    while events.len() < 40 {
        events.push(sub.next(WAIT).await.expect("events").expect("event"));
    }
    let failed: Vec<&Event> = events
        .iter()
        .filter(|e| !e.event_type.succeeded())
        .collect();
    // A request caught by the kill fails retryably; send it again, as a
    // client would.
    for e in &failed {
        assert!(e.error.as_ref().expect("error").retryable, "{e:?}");
        let ev = attach(&env, e.volume_id.expect("volume")).await;
        assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    }
    drop(held);
    for &v in vols.iter().chain([&holder]) {
        let p = probe(&env, &format!("vol-{v}")).await;
        assert!(is_served(&p), "vol-{v}: {p:?}");
    }
    let (crashes, restarts): (i64, i64) =
        sqlx::query_as("SELECT crashes, restarts FROM nbd_stats WHERE host = $1")
            .bind(HOST)
            .fetch_one(&env.pool)
            .await
            .expect("stats");
    assert!(crashes >= 1, "the kill was noticed");
    assert!(restarts >= 2, "started, then restarted");
    // Every reload is logged (`nbd-server reloaded`, or `adopted nbd-server
    // reloaded ...` for an adopted server) and counted twice: in nbd_stats
    // and in the metric. The metric moves at once and nbd_stats when the
    // batch is done, so look until they agree.
    let metric_key = format!("volumed_nbd_reloads_total{{engine={engine}}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (reloads, logged, exposed) = loop {
        let reloads: i64 =
            sqlx::query_scalar("SELECT reloads FROM nbd_stats WHERE host = $1 AND engine = $2")
                .bind(HOST)
                .bind(engine)
                .fetch_one(&env.pool)
                .await
                .expect("stats");
        let logged = d
            .log()
            .iter()
            .filter(|l| l.contains("nbd-server reloaded"))
            .count() as i64;
        let metrics = common::scrape(env.http_port(HOST)).await;
        let exposed = metrics.get(&metric_key).copied().unwrap_or(0.0) as i64;
        if (logged == reloads && exposed == reloads) || std::time::Instant::now() >= deadline {
            break (reloads, logged, exposed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("{engine}: {reloads} reloads ({logged} logged, {exposed} exposed) for 40 exports, {crashes} crashes");
    assert_eq!(logged, reloads, "every reload is logged");
    assert_eq!(exposed, reloads, "every reload is exposed as {metric_key}");
    if engine == "nbd-server" {
        assert!(reloads < 40, "reloads are batched: {reloads}");
        assert!(reloads >= 1, "a connected client forces reloads");
    } else {
        assert_eq!(reloads, 0, "nbdkit needs no reload");
    }
    client.close().await;
}

async fn two_daemons_sharing_one_config_never_corrupt_it(engine: &str) {
    let env = Env::new(&format!("nbd_two_{}", engine.replace('-', "_"))).await;
    let shared = env.dir.path().join("shared");
    let config = match engine {
        "nbdkit" => shared.join("exports"),
        _ => shared.join("config"),
    };
    let port = env.nbd_port(HOST).to_string();
    let common_env = |manage: &str| {
        let mut v = engine_env(engine);
        v.push(("VOLUMED_NBD_CONFIG", config.display().to_string()));
        v.push((
            "VOLUMED_NBD_PIDFILE",
            shared.join("server.pid").display().to_string(),
        ));
        v.push(("VOLUMED_NBD_PORT", port.clone()));
        v.push(("VOLUMED_NBD_MANAGE", manage.to_string()));
        v
    };
    let a_env = common_env("true");
    let b_env = common_env("false");
    let a_pairs: Vec<(&str, &str)> = a_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let b_pairs: Vec<(&str, &str)> = b_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _a = env.start("oma-a", &a_pairs);
    let _b = env.start("oma-b", &b_pairs);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let host_of = |i: usize| {
        if i.is_multiple_of(2) {
            "oma-a"
        } else {
            "oma-b"
        }
    };
    let mut attached = Vec::new();
    for i in 0..20 {
        let v = env.create_volume(host_of(i));
        attached.push((host_of(i), v));
        client
            .publish(&Outgoing::attach(host_of(i), v, env.appliance, true))
            .await
            .expect("publish");
    }
    let events = common::collect_events(&mut sub, 20, Duration::from_millis(200)).await;
    for evs in events.values() {
        assert_eq!(
            evs[0].event_type,
            EventType::AttachSucceeded,
            "{:?}",
            evs[0]
        );
    }
    // Then withdrawals and additions interleaved, on both daemons at once.
    let detached: Vec<(&str, Uuid)> = attached.drain(..10).collect();
    for (i, &(host, v)) in detached.iter().enumerate() {
        client
            .publish(&Outgoing::detach(host, v, None))
            .await
            .expect("publish");
        let n = env.create_volume(host_of(i));
        attached.push((host_of(i), n));
        client
            .publish(&Outgoing::attach(host_of(i), n, env.appliance, true))
            .await
            .expect("publish");
    }
    let events = common::collect_events(&mut sub, 20, Duration::from_millis(200)).await;
    for evs in events.values() {
        assert!(evs[0].event_type.succeeded(), "{:?}", evs[0]);
    }
    let mut names: Vec<String> = attached.iter().map(|(_, v)| format!("vol-{v}")).collect();
    // The configuration parses and holds every export exactly once.
    match engine {
        "nbdkit" => {
            let mut found: Vec<String> = std::fs::read_dir(&config)
                .expect("export dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            found.sort();
            names.sort();
            assert_eq!(found, names, "no temporary or torn entries");
        }
        _ => {
            let base = volumed::nbd::nbd_server::Ini::parse(
                &std::fs::read_to_string(&config).expect("base config"),
            );
            assert_eq!(base.get("generic", "allowlist").as_deref(), Some("true"));
            assert_eq!(base.get("generic", "port").as_deref(), Some(port.as_str()));
            let mut found = Vec::new();
            for e in std::fs::read_dir(shared.join("conf.d")).expect("conf.d") {
                let e = e.expect("entry");
                let text = std::fs::read_to_string(e.path()).expect("section");
                let ini = volumed::nbd::nbd_server::Ini::parse(&text);
                assert_eq!(ini.sections.len(), 1, "{text}");
                let name = ini.sections[0].0.clone();
                assert!(ini.get(&name, "exportname").is_some(), "{text}");
                assert!(ini.get(&name, "authfile").is_some(), "{text}");
                found.push(name);
            }
            found.sort();
            names.sort();
            assert_eq!(found, names);
        }
    }
    for n in &names {
        let p = probe(&env, n).await;
        assert!(is_served(&p), "{n}: {p:?}");
    }
    for (_, v) in &detached {
        let p = probe(&env, &format!("vol-{v}")).await;
        assert!(matches!(p.open, Open::Refused { .. }), "vol-{v}: {p:?}");
    }
    client.close().await;
}

/// The engine's lock file: `<VOLUMED_NBD_CONFIG>.lock`.
fn lock_file(env: &Env, engine: &str) -> PathBuf {
    let data = env.data_dir(HOST);
    match engine {
        "nbdkit" => data.join("exports.lock"),
        _ => data.join("nbd-server").join("config.lock"),
    }
}

async fn a_change_waits_for_the_host_lock(engine: &str) {
    use nix::fcntl::{Flock, FlockArg};
    let env = Env::new(&format!("nbd_lock_{}", engine.replace('-', "_"))).await;
    let _d = start(&env, engine, &[]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    // What an operator script would do: `flock <config>.lock <command>`.
    // Blocking is fine here: the daemon holds the lock only for a batch
    // (or its start-up recovery).
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_file(&env, engine))
        .expect("lock file");
    let held = Flock::lock(file, FlockArg::LockExclusive).expect("flock");

    let vol = env.create_volume(HOST);
    let name = format!("vol-{vol}");
    client
        .publish(&Outgoing::attach(HOST, vol, env.appliance, true))
        .await
        .expect("publish");
    // While the lock is held nothing of the export appears and no event
    // arrives. The wait is bounded: an attach takes well under 2 s here.
    let auth = env
        .data_dir(HOST)
        .join("nbd-server/volumed-auth")
        .join(format!("{name}.allow"));
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert!(
            !config_mentions(&env, engine, &name) && !auth.exists(),
            "{name} written while another process held the lock"
        );
        if let Some(ev) = sub
            .next(Duration::from_millis(100))
            .await
            .expect("event stream")
        {
            panic!("an event arrived while the lock was held: {ev:?}");
        }
    }
    drop(held);
    let ev = sub.next(WAIT).await.expect("event stream").expect("event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    assert_eq!(ev.volume_id, Some(vol));
    assert!(config_mentions(&env, engine, &name));
    let p = probe(&env, &name).await;
    assert!(is_served(&p), "{p:?}");
    client.close().await;
}

async fn a_name_never_serves_another_volume(engine: &str) {
    let env = Env::new(&format!("nbd_reuse_{}", engine.replace('-', "_"))).await;
    let _d = start(&env, engine, &[]);
    let a = env.create_volume(HOST);
    let name_a = attach(&env, a).await.export.expect("export").name;
    assert!(qemu_write(&env, &name_a, 0xaa).status.success());
    assert_eq!(detach(&env, a).await.event_type, EventType::DetachSucceeded);

    let b = env.create_volume(HOST);
    let name_b = attach(&env, b).await.export.expect("export").name;
    assert_ne!(name_a, name_b);
    assert!(qemu_write(&env, &name_b, 0xbb).status.success());
    let p = probe(&env, &name_a).await;
    assert!(
        matches!(p.open, Open::Refused { .. }),
        "old name refused: {p:?}"
    );
    assert!(
        first_mib(&image(&env, a)).iter().all(|x| *x == 0xaa),
        "a untouched"
    );
    assert!(first_mib(&image(&env, b)).iter().all(|x| *x == 0xbb));
    let out = qemu_write(&env, &name_a, 0xcc);
    assert!(!out.status.success(), "writing through the old name fails");
    assert!(
        first_mib(&image(&env, b)).iter().all(|x| *x == 0xbb),
        "b untouched"
    );
}

async fn a_server_killed_while_idle_comes_back_with_its_exports(engine: &str) {
    let env = Env::new(&format!("nbd_kill_{}", engine.replace('-', "_"))).await;
    // The reconciler only reports here: it would otherwise drop the record
    // of the export removed below before the crash brings it back.
    let _d = start(&env, engine, &[("VOLUMED_RECONCILE_APPLY", "false")]);
    let vols: Vec<Uuid> = (0..3).map(|_| env.create_volume(HOST)).collect();
    for &v in &vols {
        assert_eq!(attach(&env, v).await.event_type, EventType::AttachSucceeded);
    }
    // One recorded export lost from the configuration behind volumed's back
    // (an operator's mistake): the recovery must write it again.
    let lost = format!("vol-{}", vols[0]);
    let data = env.data_dir(HOST);
    match engine {
        "nbdkit" => std::fs::remove_file(data.join("exports").join(&lost)),
        _ => std::fs::remove_file(data.join("nbd-server/conf.d").join(format!("{lost}.conf"))),
    }
    .expect("remove the export from the configuration");
    let pidfile = data.join(format!("{engine}.pid"));
    let old: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    // New work right away: it proceeds only once the restarted server
    // serves every recorded export, so when its event arrives they are all
    // there, without waiting for anything else.
    let v = env.create_volume(HOST);
    assert_eq!(attach(&env, v).await.event_type, EventType::AttachSucceeded);
    let now: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    assert_ne!(now, old, "the server was restarted");
    assert!(config_mentions(&env, engine, &lost), "{lost} written again");
    for &v in vols.iter().chain([&v]) {
        let p = probe(&env, &format!("vol-{v}")).await;
        assert!(is_served(&p), "vol-{v}: {p:?}");
    }
    // Counted once the manager writes its counters, after the batch.
    env.wait_count(
        &format!("SELECT least(crashes, 1) FROM nbd_stats WHERE host = '{HOST}'"),
        1,
    )
    .await;
}

/// A configuration for an export manager run inside the test, with its
/// own directory and port: (directory, engine config path, config).
fn engine_config(
    env: &Env,
    engine: &str,
    extra: &[(&str, &str)],
) -> (PathBuf, PathBuf, volumed::config::Config) {
    let dir = env.dir.path().join(engine);
    let config = match engine {
        "nbdkit" => dir.join("exports"),
        _ => dir.join("config"),
    };
    let mut vars: std::collections::HashMap<String, String> =
        env.daemon_env(HOST).into_iter().collect();
    vars.insert("VOLUMED_NBD_ENGINE".into(), engine.into());
    vars.insert("VOLUMED_NBD_CONFIG".into(), config.display().to_string());
    vars.insert("VOLUMED_NBD_PORT".into(), common::free_port().to_string());
    vars.insert(
        "VOLUMED_NBD_PIDFILE".into(),
        dir.join("pid").display().to_string(),
    );
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let cfg = volumed::config::Config::load_with(None, &|k| vars.get(k).cloned()).expect("config");
    (dir, config, cfg)
}

macro_rules! both_engines {
    ($($scenario:ident),* $(,)?) => {
        mod nbdkit {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario("nbdkit").await
                }
            )*
        }
        mod nbd_server {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario("nbd-server").await
                }
            )*
        }
    };
}

both_engines!(
    attach_serves_the_volume_and_data_round_trips,
    detach_withdraws_the_export,
    forty_concurrent_attaches_are_all_live,
    two_daemons_sharing_one_config_never_corrupt_it,
    a_name_never_serves_another_volume,
    a_change_waits_for_the_host_lock,
    a_server_killed_while_idle_comes_back_with_its_exports,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_paths_are_refused_before_anything_is_written() {
    use volumed::nbd::manager::{ExportError, Exports};
    use volumed::nbd::{ExportName, ExportSpec};
    let env = Env::new("nbd_bad").await;
    for engine in ["nbdkit", "nbd-server"] {
        let (dir, config, cfg) = engine_config(&env, engine, &[]);
        let stop = tokio_util::sync::CancellationToken::new();
        let (exports, task) = Exports::start(
            &cfg.nbd,
            HOST,
            env.pool.clone(),
            std::sync::Arc::default(),
            stop.clone(),
        );

        let vol = Uuid::new_v4();
        let good = cfg.device_dir.join(volumed::backend::by_id_name(vol));
        // (path, device directory). In the first ones the by-id link is
        // the volume's own inside a directory whose name holds one bad
        // character, so only the character rule can refuse them.
        let link = volumed::backend::by_id_name(vol);
        let mut bad_paths: Vec<(PathBuf, PathBuf)> = ["a\n[generic]", "a[b", "a]b", "a=x", "é"]
            .iter()
            .map(|bad| {
                let dir = cfg.device_dir.join(bad);
                (dir.join(&link), dir)
            })
            .collect();
        for p in [
            PathBuf::from("/dev/vdc"),
            PathBuf::from(format!("{}\n[generic]", good.display())),
            cfg.device_dir.join("..").join(&link),
            cfg.device_dir
                .join(volumed::backend::by_id_name(Uuid::new_v4())),
        ] {
            bad_paths.push((p, cfg.device_dir.clone()));
        }
        for (p, device_dir) in bad_paths {
            assert!(ExportSpec::new(vol, &p, &device_dir).is_err(), "{p:?}");
            let spec = ExportSpec {
                name: ExportName::for_volume(vol),
                volume: vol,
                path: p.clone(),
            };
            let r = exports.add(spec).await;
            assert!(matches!(r, Err(ExportError::Invalid(_))), "{p:?}: {r:?}");
        }
        // A name that belongs to another volume.
        let spec = ExportSpec {
            name: ExportName::for_volume(Uuid::new_v4()),
            volume: vol,
            path: good,
        };
        assert!(matches!(
            exports.add(spec).await,
            Err(ExportError::Invalid(_))
        ));
        for bad in ["a\nb", "[x]", "a=b", "a/b", "..", "völ"] {
            assert!(ExportName::parse(bad).is_err(), "{bad:?}");
        }
        // Nothing of them was written, even once the manager has prepared
        // its files and the server answers.
        let started = std::time::Instant::now();
        while proto::list("127.0.0.1", cfg.nbd.port, Duration::from_secs(1))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < WAIT,
                "{engine}: the server never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let written: Vec<String> = match engine {
            "nbdkit" => std::fs::read_dir(&config)
                .map(|d| {
                    d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            _ => std::fs::read_dir(dir.join("conf.d"))
                .map(|d| {
                    d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
        };
        assert!(written.is_empty(), "{engine}: {written:?}");
        if engine == "nbd-server" {
            let auth: Vec<String> = std::fs::read_dir(dir.join("volumed-auth"))
                .expect("the authfile directory exists once the server runs")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(auth, ["volumed-placeholder.allow"], "no authfile written");
        }
        stop.cancel();
        task.await.expect("manager stops");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_with_a_pre_shared_key_requires_tls() {
    let env = Env::new("nbd_tls").await;
    let psk = env.dir.path().join("psk");
    std::fs::write(&psk, format!("alice:{}\n", Uuid::new_v4().simple())).expect("psk");
    let psk_s = psk.display().to_string();
    let _d = start(&env, "nbdkit", &[("VOLUMED_NBD_TLS_PSK", psk_s.as_str())]);
    let vol = env.create_volume(HOST);
    let ev = attach(&env, vol).await;
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    let name = ev.export.expect("export").name;

    // Without TLS, nothing is served.
    let plain = proto::probe(
        "127.0.0.1",
        env.nbd_port(HOST),
        &name,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(plain, Err(proto::NbdError::TlsRequired)),
        "{plain:?}"
    );
    // With the key, the export is there.
    let uri = format!(
        "nbds://alice@127.0.0.1:{}/{name}?tls-psk-file={psk_s}",
        env.nbd_port(HOST)
    );
    let ok = Command::new("nbdinfo").arg(&uri).output().expect("nbdinfo");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    assert_eq!(
        detach(&env, vol).await.event_type,
        EventType::DetachSucceeded
    );
    let gone = Command::new("nbdinfo").arg(&uri).output().expect("nbdinfo");
    assert!(!gone.status.success(), "withdrawn under TLS too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_live_check_fails_the_change_and_removes_what_was_written() {
    use volumed::nbd::manager::{ExportError, Exports};
    use volumed::nbd::ExportSpec;
    let env = Env::new("nbd_undo").await;
    for engine in ["nbdkit", "nbd-server"] {
        let (dir, config, cfg) =
            engine_config(&env, engine, &[("VOLUMED_NBD_CHECK_TIMEOUT_SECS", "2")]);
        let stop = tokio_util::sync::CancellationToken::new();
        let (exports, task) = Exports::start(
            &cfg.nbd,
            HOST,
            env.pool.clone(),
            std::sync::Arc::default(),
            stop.clone(),
        );

        // A well-formed export whose device does not exist: the server
        // cannot open it, so the live check fails.
        let vol = Uuid::new_v4();
        let path = cfg.device_dir.join(volumed::backend::by_id_name(vol));
        let spec = ExportSpec::new(vol, &path, &cfg.device_dir).expect("valid spec");
        let r = exports.add(spec).await;
        assert!(matches!(r, Err(ExportError::Failed(_))), "{engine}: {r:?}");
        let left: Vec<String> = match engine {
            "nbdkit" => std::fs::read_dir(&config)
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect(),
            _ => std::fs::read_dir(dir.join("conf.d"))
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect(),
        };
        assert!(left.is_empty(), "{engine}: undone, found {left:?}");

        // Stopping the manager stops the server it started. With
        // nbd-server the undo leaves a stale section, which an idle restart
        // drops: the pidfile is missing for that moment.
        let started = std::time::Instant::now();
        let pid: i32 = loop {
            match std::fs::read_to_string(dir.join("pid")) {
                Ok(text) => break text.trim().parse().expect("pid"),
                Err(e) => assert!(started.elapsed() < WAIT, "{engine}: no pidfile: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        stop.cancel();
        task.await.expect("manager stops");
        // The manager counts the server stopped once its process has let
        // go of its memory (its command line reads empty); the kernel may
        // take a moment more to finish the exit.
        let gone = || {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z ") || s.contains(") X "))
                    .unwrap_or(true)
        };
        let stopped = std::time::Instant::now();
        while !gone() {
            assert!(
                stopped.elapsed() < Duration::from_secs(5),
                "{engine}: server stopped with volumed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The batch live check of nbdkit: one connection lists the exports, then
/// asks about each name of the batch with `NBD_OPT_INFO`. The answers must
/// be the server's own, name by name, in order: a served export with its
/// size, an unknown one refused, and a name whose file cannot be opened
/// refused too (nbdkit opens the file to answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_lists_and_asks_about_every_export_of_a_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = format!("vol-{}", Uuid::new_v4());
    let dangling = format!("vol-{}", Uuid::new_v4());
    let absent = format!("vol-{}", Uuid::new_v4());
    std::fs::write(dir.path().join(&served), vec![0u8; 8192]).expect("served export");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join(&dangling))
        .expect("dangling export");
    let (mut nbdkit, port) = common::nbdkit_serving(dir.path()).await;
    let names = [
        served.as_str(),
        absent.as_str(),
        dangling.as_str(),
        served.as_str(),
    ];
    let survey = proto::survey("127.0.0.1", port, true, &names, Duration::from_secs(10)).await;
    // Without the listing (a batch of withdrawals): the same answers.
    let unlisted = proto::survey("127.0.0.1", port, false, &names, Duration::from_secs(10)).await;
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    let survey = survey.expect("survey");
    let unlisted = unlisted.expect("survey without the listing");
    assert!(unlisted.listed.is_empty(), "{unlisted:?}");
    assert_eq!(unlisted.answers, survey.answers);
    assert!(survey.listed.contains(&served), "{survey:?}");
    assert!(!survey.listed.contains(&absent), "{survey:?}");
    assert_eq!(survey.answers.len(), names.len(), "{survey:?}");
    assert_eq!(survey.answers[0], Open::Served { size: 8192 });
    assert!(
        matches!(survey.answers[1], Open::Refused { .. }),
        "{survey:?}"
    );
    assert!(
        matches!(survey.answers[2], Open::Refused { .. }),
        "{survey:?}"
    );
    assert_eq!(
        survey.answers[3],
        Open::Served { size: 8192 },
        "a refusal leaves the connection usable for the next name"
    );
}
