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
