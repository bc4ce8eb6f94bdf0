//! The reconciler: drift between records and the world is found, reported
//! by kind, and repaired when safe, with an event for each repair.

mod common;

use std::time::Duration;

use common::{Env, WAIT};
use serde_json::Value;
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::contract::{ErrorCode, EventType};

const HOST: &str = "oma-x";

fn reconcile(env: &Env, apply: bool) -> Value {
    let mut args = vec!["reconcile", "--json"];
    if apply {
        args.push("--apply");
    }
    let out = env.cli(HOST, &args);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn kinds(report: &Value) -> Vec<(String, String)> {
    report["drifts"]
        .as_array()
        .expect("drifts")
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or("").to_owned(),
                d["repair"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_reported_by_kind_and_repaired_when_safe() {
    let env = Env::new("reconcile").await;
    // The daemon's own periodic runs are off: this test drives them.
    let d = env.start(
        HOST,
        &[
            ("VOLUMED_RECONCILE_INTERVAL_SECS", "0"),
            ("VOLUMED_RECONCILE_APPLY", "false"),
        ],
    );
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let good = env.create_volume(HOST);
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, good, env.appliance, true), WAIT)
        .await
        .expect("attach");
    assert_eq!(ev.event_type, EventType::AttachSucceeded);
    // No drift after normal work.
    assert!(
        kinds(&reconcile(&env, false)).is_empty(),
        "clean after an attach"
    );

    // 1. An export file nobody recorded.
    let stray = Uuid::new_v4();
    let exports = env.data_dir(HOST).join("exports");
    std::os::unix::fs::symlink(
        env.device_dir(HOST)
            .join(volumed::backend::by_id_name(stray)),
        exports.join(format!("vol-{stray}")),
    )
    .expect("stray export");
    // 2. An attachment recorded for a volume the backend does not have on
    //    the appliance.
    let ghost = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO volume_attachments (volume_id, vm_id, host, request_id) VALUES ($1, $2, $3, $4)",
    )
    .bind(ghost)
    .bind(env.appliance)
    .bind(HOST)
    .bind(Uuid::new_v4())
    .execute(&env.pool)
    .await
    .expect("ghost row");
    // 3. A volume the backend has on the appliance with nothing recorded.
    let unrecorded = env.create_volume(HOST);
    let backend = volumed::backend::local::LocalBackend::new(
        &env.data_dir(HOST),
        &env.device_dir(HOST),
        env.appliance,
        Duration::ZERO,
    );
    use volumed::backend::Backend;
    backend
        .start_attach(unrecorded, env.appliance)
        .await
        .expect("attach behind volumed's back");
    // 4. An operation stuck for two hours.
    let stuck = Uuid::new_v4();
    let stuck_vol = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO operations (request_id, host, op, volume_id, vm_id, state, updated_at)
         VALUES ($1, $2, 'detach', $3, NULL, 'running', now() - interval '2 hours')",
    )
    .bind(stuck)
    .bind(HOST)
    .bind(stuck_vol)
    .execute(&env.pool)
    .await
    .expect("stuck op");

    let report = reconcile(&env, false);
    let found = kinds(&report);
    for kind in [
        "unrecorded_export",
        "recorded_not_attached",
        "attached_not_recorded",
        "stuck_operation",
    ] {
        assert!(
            found
                .iter()
                .any(|(k, r)| k == kind && r.starts_with("would repair")),
            "{kind}: {found:?}"
        );
    }
    // The dry run changed nothing.
    assert!(common::exists(&exports.join(format!("vol-{stray}"))));

    let report = reconcile(&env, true);
    let found = kinds(&report);
    for kind in [
        "unrecorded_export",
        "recorded_not_attached",
        "attached_not_recorded",
        "stuck_operation",
    ] {
        assert!(
            found
                .iter()
                .any(|(k, r)| k == kind && r.starts_with("repaired")),
            "{kind}: {found:?}"
        );
    }
    assert!(
        !common::exists(&exports.join(format!("vol-{stray}"))),
        "stray export withdrawn"
    );
    let rows: Vec<Uuid> =
        sqlx::query_scalar("SELECT volume_id FROM volume_attachments ORDER BY volume_id")
            .fetch_all(&env.pool)
            .await
            .expect("rows");
    assert!(
        rows.contains(&unrecorded) && rows.contains(&good) && !rows.contains(&ghost),
        "{rows:?}"
    );

    // Each repair is announced; the stuck operation ends in its failed event.
    let mut repairs = 0;
    let mut abandoned = false;
    let deadline = std::time::Instant::now() + WAIT;
    while (repairs < 3 || !abandoned) && std::time::Instant::now() < deadline {
        let Some(e) = sub.next(Duration::from_secs(5)).await.expect("events") else {
            continue;
        };
        match e.event_type {
            EventType::Reconciled => {
                assert!(e.repair.is_some());
                repairs += 1;
            }
            EventType::DetachFailed if e.request_id == stuck => {
                assert_eq!(e.error.expect("error").code, ErrorCode::Abandoned);
                abandoned = true;
            }
            _ => {}
        }
    }
    assert!(
        repairs >= 3 && abandoned,
        "repairs {repairs}, abandoned {abandoned}"
    );

    // Nothing is left but what needs a person; the good export still works.
    let left = kinds(&reconcile(&env, false));
    assert!(
        left.iter().all(|(_, r)| r.starts_with("left for")),
        "{left:?}"
    );
    let p = volumed::nbd::proto::probe(
        "127.0.0.1",
        env.nbd_port(HOST),
        &format!("vol-{good}"),
        Duration::from_secs(5),
    )
    .await
    .expect("probe");
    assert!(p.listed);
    drop(d);
    client.close().await;
}

/// A reconciler for `host` built from the daemon's configuration, run
/// in-process; `nbd_port` is the NBD server it asks for the live listing.
fn reconciler(env: &Env, host: &str, nbd_port: u16) -> volumed::reconcile::Reconciler {
    let vars: std::collections::HashMap<String, String> =
        env.daemon_env(host).into_iter().collect();
    let mut config =
        volumed::config::Config::load_with(None, &|k| vars.get(k).cloned()).expect("config");
    config.nbd.port = nbd_port;
    let backend = volumed::backend::build(&config, env.appliance).expect("backend");
    volumed::reconcile::Reconciler::from_config(&config, env.appliance, env.pool.clone(), backend)
}

fn drifts_of<'a>(
    report: &'a volumed::reconcile::Report,
    kind: &str,
) -> Vec<&'a volumed::reconcile::Drift> {
    report.drifts.iter().filter(|d| d.kind == kind).collect()
}

async fn export_recorded(env: &Env, vol: Uuid) -> bool {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM nbd_exports WHERE volume_id = $1")
        .bind(vol)
        .fetch_one(&env.pool)
        .await
        .expect("count");
    n > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_configuration_fails_the_run_and_deletes_no_record() {
    let env = Env::new("reconcile_unreadable").await;
    let mut d = env.start(
        HOST,
        &[
            ("VOLUMED_RECONCILE_INTERVAL_SECS", "0"),
            ("VOLUMED_RECONCILE_APPLY", "false"),
        ],
    );
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, true), WAIT)
        .await
        .expect("attach");
    assert_eq!(ev.event_type, EventType::AttachSucceeded);
    client.close().await;
    // Stopped, with its managed server: nothing rewrites the directories.
    d.sigterm();
    assert!(d.wait_exit(WAIT).success());

    let exports = env.data_dir(HOST).join("exports");
    let aside = env.data_dir(HOST).join("exports.aside");
    let refused = |what: &str| {
        let out = env.cli(HOST, &["reconcile", "--apply", "--json"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        stderr
    };
    // Not a directory: unreadable.
    std::fs::rename(&exports, &aside).expect("move aside");
    std::fs::write(&exports, b"not a directory").expect("file in its place");
    let why = refused("unreadable configuration");
    assert!(why.contains("VOLUMED_NBD_CONFIG"), "{why}");
    assert!(export_recorded(&env, vol).await, "record kept");
    // Missing while an export is recorded: a wrong path, not "no exports".
    std::fs::remove_file(&exports).expect("remove the file");
    let why = refused("missing configuration");
    assert!(why.contains("does not exist"), "{why}");
    assert!(export_recorded(&env, vol).await, "record kept");
    std::fs::rename(&aside, &exports).expect("put back");

    // An unreadable device directory fails the run too.
    let devices = env.device_dir(HOST);
    let devices_aside = env.dir.path().join("by-id.aside");
    std::fs::rename(&devices, &devices_aside).expect("move aside");
    std::fs::write(&devices, b"not a directory").expect("file in its place");
    let why = refused("unreadable device directory");
    assert!(why.contains("VOLUMED_DEVICE_DIR"), "{why}");
    std::fs::remove_file(&devices).expect("remove the file");
    std::fs::rename(&devices_aside, &devices).expect("put back");

    // The server is down: reported, not silently passed over; nothing else.
    assert!(
        volumed::nbd::proto::list("127.0.0.1", env.nbd_port(HOST), Duration::from_secs(2))
            .await
            .is_err(),
        "precondition: the server stopped with the daemon"
    );
    let found = kinds(&reconcile(&env, true));
    assert_eq!(
        found.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["live_listing_unavailable"],
        "{found:?}"
    );
    assert!(found[0].1.starts_with("left for an operator"), "{found:?}");
    assert!(export_recorded(&env, vol).await, "record kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_drift_kind_is_reported_and_only_the_safe_ones_repaired() {
    let env = Env::new("reconcile_kinds").await;
    let daemon = env.start(
        HOST,
        &[
            ("VOLUMED_RECONCILE_INTERVAL_SECS", "0"),
            ("VOLUMED_RECONCILE_APPLY", "false"),
        ],
    );
    let client = env.client().await;
    let mut sub = client
        .subscribe("volume.reconciled")
        .await
        .expect("subscribe");
    let [good, missing, wrong, nodev, busy] = [(); 5].map(|_| env.create_volume(HOST));
    for v in [good, missing, wrong, nodev, busy] {
        let ev = client
            .request_and_wait(Outgoing::attach(HOST, v, env.appliance, true), WAIT)
            .await
            .expect("attach");
        assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    }
    let exports = env.data_dir(HOST).join("exports");
    let devices = env.device_dir(HOST);
    let link = |v: Uuid| devices.join(volumed::backend::by_id_name(v));
    // recorded_export_missing: the export file is gone.
    std::fs::remove_file(exports.join(format!("vol-{missing}"))).expect("remove export");
    // wrong_export_target: the export of `wrong` serves `good`'s device.
    let wrong_export = exports.join(format!("vol-{wrong}"));
    std::fs::remove_file(&wrong_export).expect("remove export");
    std::os::unix::fs::symlink(link(good), &wrong_export).expect("misdirected export");
    // attachment_without_device: the hypervisor lost the device.
    std::fs::remove_file(link(nodev)).expect("remove device link");
    // device_without_attachment: a device nobody attached.
    let stranger = Uuid::new_v4();
    std::os::unix::fs::symlink("/dev/null", link(stranger)).expect("stranger device");
    // The busy volume: its export and its device are gone too, and an
    // operation runs (a detach half-way).
    std::fs::remove_file(exports.join(format!("vol-{busy}"))).expect("remove export");
    std::fs::remove_file(link(busy)).expect("remove device link");
    let busy_op = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO operations (request_id, host, op, volume_id, vm_id, state)
         VALUES ($1, $2, 'detach', $3, NULL, 'running')",
    )
    .bind(busy_op)
    .bind(HOST)
    .bind(busy)
    .execute(&env.pool)
    .await
    .expect("running op");

    // The daemon's own server lists every configured export.
    let own = reconciler(&env, HOST, env.nbd_port(HOST));
    let report = own.run(false).await.expect("reconcile");
    let kinds_found: Vec<&str> = report.drifts.iter().map(|d| d.kind).collect();
    let one = |kind: &str| {
        let d = drifts_of(&report, kind);
        assert_eq!(d.len(), 1, "{kind}: {}", report.render());
        d[0].clone()
    };
    assert_eq!(one("recorded_export_missing").volume, Some(missing));
    let w = one("wrong_export_target");
    assert_eq!(w.volume, Some(wrong));
    assert!(w.repair.starts_with("would repair: withdrew"), "{w:?}");
    assert_eq!(one("attachment_without_device").volume, Some(nodev));
    let s = one("device_without_attachment");
    assert!(
        s.detail.contains(&volumed::backend::by_id_name(stranger)),
        "{s:?}"
    );
    assert!(s.repair.starts_with("left for an operator"), "{s:?}");
    assert!(
        !report.drifts.iter().any(|d| d.volume == Some(busy)),
        "a busy volume is in flux, not adrift: {kinds_found:?}"
    );

    let report = own.run(true).await.expect("reconcile --apply");
    for (kind, vol) in [
        ("recorded_export_missing", missing),
        ("wrong_export_target", wrong),
    ] {
        let d = drifts_of(&report, kind);
        assert!(
            d.len() == 1 && d[0].repair.starts_with("repaired") && d[0].volume == Some(vol),
            "{kind}: {}",
            report.render()
        );
    }
    for kind in ["attachment_without_device", "device_without_attachment"] {
        assert!(
            drifts_of(&report, kind)[0]
                .repair
                .starts_with("left for an operator"),
            "{}",
            report.render()
        );
    }
    // The misdirected export is gone, never pointed elsewhere; the volume
    // stays attached and `good` is untouched.
    assert!(!common::exists(&wrong_export), "withdrawn");
    assert!(!export_recorded(&env, wrong).await && !export_recorded(&env, missing).await);
    assert!(export_recorded(&env, good).await && export_recorded(&env, busy).await);
    let attached: Vec<Uuid> = sqlx::query_scalar("SELECT volume_id FROM volume_attachments")
        .fetch_all(&env.pool)
        .await
        .expect("rows");
    assert!(
        attached.contains(&wrong) && attached.contains(&nodev),
        "{attached:?}"
    );
    let mut announced = std::collections::HashSet::new();
    while announced.len() < 2 {
        let e = sub
            .next(WAIT)
            .await
            .expect("events")
            .expect("a reconciled event per repair");
        let repair = e.repair.expect("repair info");
        announced.insert((repair.kind, e.volume_id));
    }
    assert!(
        announced.contains(&("wrong_export_target".to_owned(), Some(wrong)))
            && announced.contains(&("recorded_export_missing".to_owned(), Some(missing))),
        "{announced:?}"
    );

    // Once the operation is over, the busy volume's drift is repaired too.
    sqlx::query(
        "UPDATE operations SET state = 'succeeded', finished_at = now(),
                updated_at = now() - interval '1 minute'
          WHERE request_id = $1",
    )
    .bind(busy_op)
    .execute(&env.pool)
    .await
    .expect("finish op");
    let report = own.run(true).await.expect("reconcile --apply");
    let d = drifts_of(&report, "recorded_export_missing");
    assert!(
        d.len() == 1 && d[0].volume == Some(busy) && d[0].repair.starts_with("repaired"),
        "{}",
        report.render()
    );

    // Against a server that serves something else: what is configured is
    // not live, and what it lists unconfigured is stale.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let stale = format!("vol-{}", Uuid::new_v4());
    std::fs::write(other_dir.path().join(&stale), vec![0u8; 4096]).expect("stale export");
    let (mut other, port) = common::nbdkit_serving(other_dir.path()).await;
    let report = reconciler(&env, HOST, port)
        .run(true)
        .await
        .expect("reconcile");
    let _ = other.kill();
    let _ = other.wait();
    let not_live = drifts_of(&report, "export_not_live");
    assert!(
        not_live.iter().any(|d| d.volume == Some(good))
            && not_live
                .iter()
                .all(|d| d.repair.starts_with("left for an operator")),
        "{}",
        report.render()
    );
    let st = drifts_of(&report, "stale_server_export");
    assert!(
        st.len() == 1
            && st[0].export.as_deref() == Some(stale.as_str())
            && st[0].repair.starts_with("left for the export manager"),
        "{}",
        report.render()
    );
    assert!(export_recorded(&env, good).await, "reports only");
    drop(daemon);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_repairs_at_start_up_and_periodically_and_abandons_a_purged_operation() {
    let env = Env::new("reconcile_periodic").await;
    // An operation that starts and never ends: the backend takes a minute,
    // the daemon is killed, and its message purged from the queue.
    let mut d = env.start(
        HOST,
        &[
            ("VOLUMED_RECONCILE_INTERVAL_SECS", "0"),
            ("VOLUMED_RECONCILE_APPLY", "false"),
            ("VOLUMED_LOCAL_LATENCY_MS", "60000"),
        ],
    );
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, true);
    let stuck = req.request_id;
    client.publish(&req).await.expect("publish");
    env.wait_count(
        &format!(
            "SELECT count(*) FROM operations WHERE request_id = '{stuck}' AND state = 'running'"
        ),
        1,
    )
    .await;
    d.kill();
    let queue = format!("volumed.requests.{HOST}");
    let deadline = std::time::Instant::now() + WAIT;
    while env.queue_depth(&queue).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the message never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::rabbitmqctl(&["purge_queue", "-p", &env.vhost, &queue]);
    assert_eq!(env.queue_depth(&queue).await, 0, "purged");
    // VOLUMED_STUCK_AFTER_SECS is at least 60; rather than wait that long,
    // the row is made two hours old.
    sqlx::query(
        "UPDATE operations SET updated_at = now() - interval '2 hours' WHERE request_id = $1",
    )
    .bind(stuck)
    .execute(&env.pool)
    .await
    .expect("age the row");
    let ghost = |pool: sqlx::PgPool| async move {
        let v = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO volume_attachments (volume_id, vm_id, host, request_id)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(v)
        .bind(env.appliance)
        .bind(HOST)
        .bind(Uuid::new_v4())
        .execute(&pool)
        .await
        .expect("ghost row");
        v
    };
    let first = ghost(env.pool.clone()).await;

    let spawned = std::time::Instant::now();
    let d = env.start(
        HOST,
        &[
            ("VOLUMED_RECONCILE_INTERVAL_SECS", "2"),
            ("VOLUMED_RECONCILE_APPLY", "true"),
        ],
    );
    let (mut abandoned, mut repaired_first) = (false, false);
    while !(abandoned && repaired_first) {
        let e = sub
            .next(WAIT)
            .await
            .expect("events")
            .expect("start-up repairs");
        match e.event_type {
            EventType::AttachFailed if e.request_id == stuck => {
                assert_eq!(e.error.expect("error").code, ErrorCode::Abandoned);
                abandoned = true;
            }
            EventType::Reconciled if e.volume_id == Some(first) => {
                assert_eq!(e.repair.expect("repair").kind, "recorded_not_attached");
                repaired_first = true;
            }
            _ => {}
        }
    }
    // The start-up run waits 5 s for the export manager.
    assert!(
        spawned.elapsed() >= Duration::from_secs(5),
        "{:?}",
        spawned.elapsed()
    );
    // Drift made after the start-up run is repaired by a periodic one.
    let second = ghost(env.pool.clone()).await;
    let made = std::time::Instant::now();
    loop {
        let e = sub
            .next(WAIT)
            .await
            .expect("events")
            .expect("a periodic repair");
        if e.event_type == EventType::Reconciled && e.volume_id == Some(second) {
            break;
        }
    }
    assert!(
        made.elapsed() < Duration::from_secs(10),
        "{:?}",
        made.elapsed()
    );
    // Both runs that found drift are counted for the operator.
    let m = common::scrape(env.http_port(HOST)).await;
    let drift = m
        .get("volumed_reconciliations_total{outcome=drift}")
        .copied()
        .unwrap_or(0.0);
    assert!(drift >= 2.0, "{m:?}");
    let state: String = sqlx::query_scalar("SELECT state FROM operations WHERE request_id = $1")
        .bind(stuck)
        .fetch_one(&env.pool)
        .await
        .expect("row");
    assert_eq!(state, "failed");
    assert_eq!(env.call_log(HOST).len(), 0, "the purged attach never ran");
    drop(d);
    client.close().await;
}
