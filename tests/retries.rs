//! Retries, dead letters, operator replay, and surviving broker and
//! database outages: real RabbitMQ and PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::{Env, Proxy, WAIT};
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::contract::{ErrorCode, EventType};
use volumed::topology;

const HOST: &str = "oma-r";

async fn dead_letter_rows(env: &Env, reason: &str) -> Vec<(i64, Option<Uuid>)> {
    sqlx::query_as("SELECT id, request_id FROM dead_letters WHERE reason = $1 ORDER BY id")
        .bind(reason)
        .fetch_all(&env.pool)
        .await
        .expect("dead letters")
}

async fn wait_dead_letter(env: &Env, reason: &str) -> (i64, Option<Uuid>) {
    let start = Instant::now();
    loop {
        if let Some(r) = dead_letter_rows(env, reason).await.first() {
            return *r;
        }
        assert!(
            start.elapsed() < WAIT,
            "no dead letter with reason {reason}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_twice_then_success_is_one_success_after_three_attempts() {
    let env = Env::new("retry_ok").await;
    let _d = env.start(
        HOST,
        &[
            ("VOLUMED_FAILPOINTS", "local_backend_unavailable=fail:2"),
            ("VOLUMED_RETRY_DELAYS", "100ms,200ms,400ms"),
        ],
    );
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, false);
    client.publish(&req).await.expect("publish");
    let events = common::collect_events(&mut sub, 1, Duration::from_millis(500)).await;
    let evs = &events[&req.request_id];
    assert_eq!(evs.len(), 1, "one event: {evs:?}");
    assert_eq!(
        evs[0].event_type,
        EventType::AttachSucceeded,
        "{:?}",
        evs[0]
    );
    assert_eq!(evs[0].attempts, 3);
    assert_eq!(env.call_log(HOST).len(), 1);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_fails_and_dead_letters_and_a_replay_succeeds() {
    let env = Env::new("retry_spent").await;
    let _d = env.start(
        HOST,
        &[
            ("VOLUMED_FAILPOINTS", "local_backend_unavailable=fail:2"),
            ("VOLUMED_RETRY_DELAYS", "100ms,200ms"),
            ("VOLUMED_RETRY_ATTEMPTS", "2"),
        ],
    );
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, false);
    client.publish(&req).await.expect("publish");
    let failed = sub
        .wait_for(req.request_id, WAIT)
        .await
        .expect("failed event");
    assert_eq!(failed.event_type, EventType::AttachFailed);
    let err = failed.error.expect("error");
    assert_eq!(err.code, ErrorCode::BackendUnavailable);
    assert!(err.retryable);
    let (id, request) = wait_dead_letter(&env, "retries_exhausted").await;
    assert_eq!(request, Some(req.request_id));
    let code: Option<String> =
        sqlx::query_scalar("SELECT error_code FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert_eq!(code.as_deref(), Some("backend_unavailable"));

    // The dry run changes nothing.
    let out = env.cli(HOST, &["dlq", "replay", &id.to_string(), "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: String = sqlx::query_scalar("SELECT status FROM dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("row");
    assert_eq!(status, "dead");
    assert_eq!(env.call_log(HOST).len(), 0);

    // The fault is gone (its two failures are spent): the replay succeeds.
    let out = env.cli(
        HOST,
        &["dlq", "replay", &id.to_string(), "--yes", "--by", "tester"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = sub
        .wait_for(req.request_id, WAIT)
        .await
        .expect("success after replay");
    assert_eq!(ok.event_type, EventType::AttachSucceeded, "{ok:?}");
    let (status, by): (String, String) = sqlx::query_as(
        "SELECT d.status, r.replayed_by FROM dead_letters d
           JOIN dead_letter_replays r ON r.dead_letter_id = d.id WHERE d.id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .expect("replay recorded");
    assert_eq!((status.as_str(), by.as_str()), ("replayed", "tester"));
    let show = env.cli(HOST, &["dlq", "show", &id.to_string()]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("by tester"));

    // Replaying again is refused: the request has since succeeded.
    let out = env.cli(HOST, &["dlq", "replay", &id.to_string(), "--yes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("already"), "{text}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_the_worker_is_dead_lettered_at_the_delivery_limit() {
    let env = Env::new("poison").await;
    let poison = env.create_volume(HOST);
    let spec = format!("handle=panic@{poison}");
    let _d = env.start(
        HOST,
        &[
            ("VOLUMED_FAILPOINTS", spec.as_str()),
            ("VOLUMED_DELIVERY_LIMIT", "3"),
        ],
    );
    let client = env.client().await;
    let bad = Outgoing::attach(HOST, poison, env.appliance, false);
    client.publish(&bad).await.expect("publish");
    let (_, request) = wait_dead_letter(&env, "delivery_limit").await;
    assert_eq!(request, Some(bad.request_id));

    // The daemon is healthy: other requests are served.
    let vol = env.create_volume(HOST);
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, false), WAIT)
        .await
        .expect("still serving");
    assert_eq!(ev.event_type, EventType::AttachSucceeded);

    // Purging asks first; without a terminal and without --yes, nothing goes.
    let out = env.cli(HOST, &["dlq", "purge"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(dead_letter_rows(&env, "delivery_limit").await.len(), 1);
    let out = env.cli(HOST, &["dlq", "purge", "--dry-run"]);
    assert!(out.status.success());
    assert_eq!(dead_letter_rows(&env, "delivery_limit").await.len(), 1);
    let out = env.cli(
        HOST,
        &["dlq", "purge", "--reason", "delivery_limit", "--yes"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dead_letter_rows(&env, "delivery_limit").await.is_empty());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_closing_connections_during_a_burst_loses_and_repeats_nothing() {
    let env = Env::new("brokercut").await;
    env.durable_event_queue("test.events").await;
    let mut d = env.start(HOST, &[("VOLUMED_WORKERS", "8")]);
    let client = env.client().await;
    let mut ids = Vec::new();
    for _ in 0..200 {
        let r = Outgoing::attach(HOST, env.create_volume(HOST), env.appliance, false);
        client.publish(&r).await.expect("publish");
        ids.push(r.request_id);
    }
    client.close().await;
    // Twice during the burst, the broker closes every connection of the
    // vhost: consumer, relay, dead-letter ingester.
    for at in [20, 100] {
        env.wait_count(
            &format!("SELECT count(*) FROM LEAST({at}, (SELECT count(*) FROM outbox)) AS n(n) WHERE n = {at}"),
            1,
        )
        .await;
        common::rabbitmqctl(&[
            "close_all_connections",
            "--vhost",
            &env.vhost,
            "test: broker restart",
        ]);
    }
    env.wait_count(
        "SELECT count(*) FROM operations WHERE state = 'succeeded'",
        200,
    )
    .await;
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
        .await;
    d.sigterm();
    assert!(d.wait_exit(WAIT).success(), "{}", d.log().join("\n"));
    assert_eq!(env.queue_depth(&topology::request_queue(HOST)).await, 0);
    let by_request = common::event_ids_by_request(&env.drain_queue("test.events").await);
    assert_eq!(by_request.len(), 200, "every request has its event");
    assert!(
        by_request.values().all(|e| e.len() == 1),
        "never two events for one request"
    );
    assert_eq!(env.call_log(HOST).len(), 200, "no attach repeated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_during_a_burst_pauses_without_acknowledging() {
    let env = Env::new("dbcut").await;
    env.durable_event_queue("test.events").await;
    let proxy = Proxy::start(5432).await;
    let db_url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, env.name);
    let mut d = env.start(
        HOST,
        &[
            ("VOLUMED_DATABASE_URL", db_url.as_str()),
            ("VOLUMED_WORKERS", "4"),
            ("VOLUMED_LOCAL_LATENCY_MS", "20"),
        ],
    );
    let client = env.client().await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        let r = Outgoing::attach(HOST, env.create_volume(HOST), env.appliance, false);
        client.publish(&r).await.expect("publish");
        ids.push(r.request_id);
    }
    client.close().await;
    env.wait_count(
        "SELECT count(*) FROM LEAST(10, (SELECT count(*) FROM outbox)) AS n(n) WHERE n = 10",
        1,
    )
    .await;
    proxy.cut();
    // While the database is away nothing is acknowledged: the prefetch
    // fills and then no further message leaves the queue.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = env.queue_depth(&topology::request_queue(HOST)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = env.queue_depth(&topology::request_queue(HOST)).await;
    assert_eq!(before, after, "no message taken while the database is down");
    assert!(
        before > 0,
        "the burst was not over when the database went away"
    );
    proxy.restore();

    env.wait_count(
        "SELECT count(*) FROM operations WHERE state = 'succeeded'",
        60,
    )
    .await;
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
        .await;
    d.sigterm();
    assert!(d.wait_exit(WAIT).success(), "{}", d.log().join("\n"));
    assert_eq!(env.queue_depth(&topology::request_queue(HOST)).await, 0);
    let by_request = common::event_ids_by_request(&env.drain_queue("test.events").await);
    assert_eq!(by_request.len(), 60);
    assert!(by_request.values().all(|e| e.len() == 1));
    assert_eq!(env.call_log(HOST).len(), 60, "no attach repeated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_fails_with_deadline_exceeded() {
    let env = Env::new("deadline").await;
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let mut req = Outgoing::attach(HOST, vol, env.appliance, false);
    req.body["deadline"] = serde_json::json!("2020-01-01T00:00:00Z");
    let ev = client.request_and_wait(req, WAIT).await.expect("event");
    assert_eq!(ev.event_type, EventType::AttachFailed);
    assert_eq!(ev.error.expect("error").code, ErrorCode::DeadlineExceeded);
    assert!(env.call_log(HOST).is_empty(), "nothing done");
    client.close().await;
}

/// Polls `/readyz` until it answers `status`.
async fn wait_ready(port: u16, status: u16) -> String {
    let start = Instant::now();
    loop {
        let (got, body) = common::http_get(port, "/readyz").await;
        if got == status {
            return body;
        }
        assert!(start.elapsed() < WAIT, "readyz stayed {got}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_and_the_database() {
    let env = Env::new("ready").await;
    let proxy = Proxy::start(5432).await;
    let db_url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, env.name);
    let _d = env.start(HOST, &[("VOLUMED_DATABASE_URL", db_url.as_str())]);
    let port = env.http_port(HOST);
    assert_eq!(common::http_get(port, "/healthz").await.0, 200);
    wait_ready(port, 200).await;

    // The broker goes away for this vhost.
    common::rabbitmqctl(&["clear_permissions", "-p", &env.vhost, "guest"]);
    common::rabbitmqctl(&[
        "close_all_connections",
        "--vhost",
        &env.vhost,
        "test: broker down",
    ]);
    let body = wait_ready(port, 503).await;
    assert!(body.contains("not consuming"), "{body}");
    common::rabbitmqctl(&[
        "set_permissions",
        "-p",
        &env.vhost,
        "guest",
        ".*",
        ".*",
        ".*",
    ]);
    wait_ready(port, 200).await;

    // The database goes away.
    proxy.cut();
    let body = wait_ready(port, 503).await;
    assert!(body.contains("database unreachable"), "{body}");
    assert_eq!(
        common::http_get(port, "/healthz").await.0,
        200,
        "alive all along"
    );
    proxy.restore();
    wait_ready(port, 200).await;
}
