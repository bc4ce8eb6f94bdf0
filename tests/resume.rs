//! Resuming at each step of an attach: the daemon is stopped at a hook
//! right after a step was journaled, killed there with SIGKILL, and the next
//! daemon finishes the redelivered request from the world as it finds it.

mod common;

use std::time::Duration;

use common::{Env, WAIT};
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::contract::EventType;
use volumed::nbd::proto::{self, Open};

const HOST: &str = "oma-r";

/// The hooks after the device, export-written and export-live steps, with
/// the step each one follows.
const HOOKS: [(&str, &str); 3] = [
    ("after_device_found", "device_found"),
    ("after_export_written", "export_written"),
    ("after_export_live", "export_live"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_killed_after_each_step_resumes_with_one_call_and_one_event() {
    let env = Env::new("resume").await;
    let quiet = [
        ("VOLUMED_RECONCILE_INTERVAL_SECS", "0"),
        ("VOLUMED_RECONCILE_APPLY", "false"),
    ];
    for (hook, step) in HOOKS {
        // Parked at the hook (a sleep, so the batched step write lands
        // first and can be checked), then killed there.
        let failpoint = format!("{hook}=sleep:60000");
        let mut args = quiet.to_vec();
        args.push(("VOLUMED_FAILPOINTS", &failpoint));
        let mut d = env.start(HOST, &args);
        let client = env.client().await;
        let mut sub = client.subscribe("#").await.expect("subscribe");
        let vol = env.create_volume(HOST);
        let req = Outgoing::attach(HOST, vol, env.appliance, true);
        let id = req.request_id;
        client.publish(&req).await.expect("publish");
        env.wait_count(
            &format!(
                "SELECT count(*) FROM operations
                  WHERE request_id = '{id}' AND state = 'running' AND step = '{step}'"
            ),
            1,
        )
        .await;
        d.kill();
        assert_eq!(
            count(
                &env,
                &format!("SELECT count(*) FROM outbox WHERE request_id = '{id}'")
            )
            .await,
            0,
            "{hook}: nothing committed before the kill"
        );

        let d = env.start(HOST, &quiet);
        let ev = sub.wait_for(id, WAIT).await.expect("event");
        assert_eq!(ev.event_type, EventType::AttachSucceeded, "{hook}: {ev:?}");
        assert_eq!(ev.attempts, 2, "{hook}: the second attempt finished it");
        // Exactly one terminal event, one backend call, nothing refused.
        env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
            .await;
        assert_eq!(
            count(
                &env,
                &format!("SELECT count(*) FROM outbox WHERE request_id = '{id}'")
            )
            .await,
            1,
            "{hook}: one event"
        );
        let extra = sub.next(Duration::from_millis(300)).await.expect("stream");
        assert!(
            extra.as_ref().is_none_or(|e| e.request_id != id),
            "{hook}: a second event {extra:?}"
        );
        let calls = calls_for(&env, vol);
        assert_eq!(
            calls,
            [format!("attach {vol} {}", env.appliance)],
            "{hook}: one backend call"
        );
        assert!(
            env.refused_calls(HOST).is_empty(),
            "{hook}: no repeated call"
        );
        // The journal went on from the step to the commit.
        let (state, step_now): (String, String) =
            sqlx::query_as("SELECT state, step FROM operations WHERE request_id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .expect("row");
        assert_eq!(
            (state.as_str(), step_now.as_str()),
            ("succeeded", "committed")
        );
        // The export is live and recorded.
        let name = format!("vol-{vol}");
        assert_eq!(ev.export.map(|e| e.name), Some(name.clone()), "{hook}");
        let p = proto::probe(
            "127.0.0.1",
            env.nbd_port(HOST),
            &name,
            Duration::from_secs(5),
        )
        .await
        .expect("probe");
        assert!(
            p.listed && matches!(p.open, Open::Served { .. }),
            "{hook}: {p:?}"
        );
        assert_eq!(
            count(
                &env,
                &format!("SELECT count(*) FROM nbd_exports WHERE volume_id = '{vol}'")
            )
            .await,
            1,
            "{hook}: export recorded"
        );
        drop(d);
        client.close().await;
    }
}

async fn count(env: &Env, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&env.pool)
        .await
        .expect(sql)
}

fn calls_for(env: &Env, vol: Uuid) -> Vec<String> {
    env.call_log(HOST)
        .into_iter()
        .filter(|l| l.split(' ').nth(1) == Some(vol.to_string().as_str()))
        .collect()
}
