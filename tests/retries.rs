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

/// `volumed dlq show ID --json`, parsed.
fn show_json(env: &Env, id: i64) -> serde_json::Value {
    let out = env.cli(HOST, &["dlq", "show", &id.to_string(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("dlq show --json prints JSON")
}

/// The error history `dlq show --json` reports for a dead letter.
fn error_history(env: &Env, id: i64) -> Vec<serde_json::Value> {
    show_json(env, id)["error_history"]
        .as_array()
        .expect("error_history is an array")
        .clone()
}

/// Declares `volumed.requests` (as the daemon does) and a queue `name`
/// bound to it with each of `keys`: it receives a copy of every request
/// published to those hosts, replays included.
async fn tap_requests(env: &Env, name: &str, keys: &[&str]) {
    env.durable_queue(
        name,
        topology::REQUESTS_EXCHANGE,
        lapin::ExchangeKind::Direct,
        keys,
    )
    .await;
}

/// A header of a message as an integer, if it is one.
fn int_header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<i64> {
    use lapin::types::AMQPValue;
    match m
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Stores a dead letter as the ingester would, first seen `age_secs` ago.
#[allow(clippy::too_many_arguments)]
async fn seed_dead_letter(
    env: &Env,
    host: &str,
    reason: &str,
    code: Option<&str>,
    request: Uuid,
    volume: Option<Uuid>,
    age_secs: i64,
) -> i64 {
    let body = serde_json::json!({
        "op": "attach", "request_id": request, "volume_id": volume,
        "vm_id": env.appliance, "export": false,
    });
    sqlx::query_scalar(
        "INSERT INTO dead_letters (host, message_id, request_id, volume_id, reason, error_code,
                                   error_message, original_exchange, original_routing_key,
                                   properties, body, first_seen, last_seen)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'volumed.requests', $1,
                 jsonb_build_object('message_id', $2::text, 'content_type', 'application/json'),
                 $8, now() - make_interval(secs => $9), now() - make_interval(secs => $9))
         RETURNING id",
    )
    .bind(host)
    .bind(request.to_string())
    .bind(request)
    .bind(volume)
    .bind(reason)
    .bind(code)
    .bind(code.map(|c| format!("seeded {c}")))
    .bind(serde_json::to_vec(&body).expect("body"))
    .bind(age_secs as f64)
    .fetch_one(&env.pool)
    .await
    .expect("dead letter seeded")
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

    // `dlq show` tells every attempt's error, not only the last one.
    let history = error_history(&env, id);
    assert_eq!(
        history
            .iter()
            .map(|e| (e["generation"].as_i64(), e["attempt"].as_i64()))
            .collect::<Vec<_>>(),
        [(Some(0), Some(1)), (Some(0), Some(2))],
        "one entry per attempt: {history:?}"
    );
    for e in &history {
        assert_eq!(e["code"], "backend_unavailable", "{e}");
        assert_eq!(e["retryable"], true, "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["at"].is_string(), "{e}");
    }
    let show = env.cli(HOST, &["dlq", "show", &id.to_string()]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("error history: 2 error(s)"), "{text}");
    assert!(
        text.contains("generation 0 attempt 1: backend_unavailable (retryable)")
            && text.contains("generation 0 attempt 2: backend_unavailable (retryable)"),
        "{text}"
    );

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
async fn a_replay_resets_the_retry_budget_keeps_the_message_id_and_adds_a_replay_header() {
    let env = Env::new("replay_budget").await;
    // Three failures against a budget of two attempts: the first life
    // spends its budget on two of them; the replay only succeeds if it gets
    // a fresh budget (one failure, then success on its second attempt).
    let _d = env.start(
        HOST,
        &[
            ("VOLUMED_FAILPOINTS", "local_backend_unavailable=fail:3"),
            ("VOLUMED_RETRY_DELAYS", "100ms,200ms"),
            ("VOLUMED_RETRY_ATTEMPTS", "2"),
        ],
    );
    tap_requests(&env, "test.requests", &[HOST]).await;
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, false);
    client.publish(&req).await.expect("publish");
    let failed = sub.wait_for(req.request_id, WAIT).await.expect("failed");
    assert_eq!(failed.event_type, EventType::AttachFailed, "{failed:?}");
    assert_eq!(failed.attempts, 2);
    let (id, _) = wait_dead_letter(&env, "retries_exhausted").await;

    let out = env.cli(
        HOST,
        &["dlq", "replay", &id.to_string(), "--yes", "--by", "tester"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = sub.wait_for(req.request_id, WAIT).await.expect("success");
    assert_eq!(ok.event_type, EventType::AttachSucceeded, "{ok:?}");
    // Attempts count every generation: two before the replay, two after.
    assert_eq!(ok.attempts, 4, "{ok:?}");
    assert_eq!(env.call_log(HOST).len(), 1, "attached once");

    // The replayed copy: same message id, a replay header, and no retry
    // count from the earlier life.
    let msgs = env.drain_queue("test.requests").await;
    let replayed: Vec<_> = msgs
        .iter()
        .filter(|m| int_header(m, volumed::dlq::REPLAY_HEADER).is_some())
        .collect();
    let first = replayed
        .iter()
        .find(|m| int_header(m, "x-volumed-retries").is_none())
        .unwrap_or_else(|| panic!("no replayed copy without a retry count: {msgs:?}"));
    assert_eq!(
        first
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned()),
        Some(req.request_id.to_string())
    );
    assert_eq!(int_header(first, volumed::dlq::REPLAY_HEADER), Some(1));
    // Its own retry went through the delay queue as retry 1 of the new life.
    assert!(
        replayed
            .iter()
            .any(|m| int_header(m, "x-volumed-retries") == Some(1)),
        "the replay's retry is its first: {msgs:?}"
    );

    // The error history spans both lives.
    let history: Vec<_> = error_history(&env, id)
        .iter()
        .map(|e| (e["generation"].as_i64(), e["attempt"].as_i64()))
        .collect();
    assert_eq!(
        history,
        [(Some(0), Some(1)), (Some(0), Some(2)), (Some(1), Some(3))]
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_dead_letter_whose_request_has_since_succeeded_changes_nothing() {
    let env = Env::new("replay_done").await;
    tap_requests(&env, "test.requests", &[HOST]).await;
    // The request succeeded (its journal row is terminal), yet a copy of it
    // sits in the dead letters, as after a redelivery that hit the
    // delivery limit.
    let (request, volume) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO operations (request_id, host, op, volume_id, vm_id, state, step, finished_at)
         VALUES ($1, $2, 'attach', $3, $4, 'succeeded', 'committed', now())",
    )
    .bind(request)
    .bind(HOST)
    .bind(volume)
    .bind(env.appliance)
    .execute(&env.pool)
    .await
    .expect("journal row");
    let id = seed_dead_letter(&env, HOST, "delivery_limit", None, request, Some(volume), 0).await;

    let out = env.cli(HOST, &["dlq", "replay", &id.to_string(), "--yes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "{id}: not replayed: request {request} has already succeeded; replaying would do nothing"
        )),
        "{text}"
    );
    assert!(
        env.drain_queue("test.requests").await.is_empty(),
        "nothing published"
    );
    let (status, replayed_at): (String, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT status, replayed_at FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("row");
    assert_eq!((status.as_str(), replayed_at), ("dead", None));
    env.wait_count("SELECT count(*) FROM dead_letter_replays", 0)
        .await;
    let (state, generation): (String, i32) =
        sqlx::query_as("SELECT state, generation FROM operations WHERE request_id = $1")
            .bind(request)
            .fetch_one(&env.pool)
            .await
            .expect("journal");
    assert_eq!(
        (state.as_str(), generation),
        ("succeeded", 0),
        "journal untouched"
    );
}

/// The ids `dlq list --json` prints with `args`.
fn listed(env: &Env, args: &[&str]) -> Vec<i64> {
    let mut all = vec!["dlq", "list", "--json"];
    all.extend_from_slice(args);
    let out = env.cli(HOST, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["id"].as_i64().expect("id")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_filters_select_and_replay_all_honours_dry_run_and_rate() {
    let env = Env::new("dlq_cli").await;
    tap_requests(&env, "test.requests", &["oma-a", "oma-b"]).await;
    let (v1, v2) = (Uuid::new_v4(), Uuid::new_v4());
    let code = Some("backend_unavailable");
    let a = seed_dead_letter(
        &env,
        "oma-a",
        "retries_exhausted",
        code,
        Uuid::new_v4(),
        Some(v1),
        0,
    )
    .await;
    let b = seed_dead_letter(
        &env,
        "oma-a",
        "delivery_limit",
        None,
        Uuid::new_v4(),
        Some(v2),
        3 * 3600,
    )
    .await;
    let c = seed_dead_letter(
        &env,
        "oma-b",
        "retries_exhausted",
        code,
        Uuid::new_v4(),
        Some(v2),
        0,
    )
    .await;
    let d = seed_dead_letter(
        &env,
        "oma-a",
        "malformed_body",
        Some("malformed_body"),
        Uuid::new_v4(),
        None,
        600,
    )
    .await;

    assert_eq!(listed(&env, &[]), [a, b, c, d]);
    assert_eq!(listed(&env, &["--host", "oma-a"]), [a, b, d]);
    assert_eq!(listed(&env, &["--code", "backend_unavailable"]), [a, c]);
    assert_eq!(listed(&env, &["--volume", &v2.to_string()]), [b, c]);
    assert_eq!(listed(&env, &["--older-than", "1h"]), [b]);
    assert_eq!(listed(&env, &["--older-than", "5m"]), [b, d]);
    assert_eq!(listed(&env, &["--newer-than", "5m"]), [a, c]);
    assert_eq!(listed(&env, &["--reason", "delivery_limit"]), [b]);
    assert_eq!(
        listed(&env, &["--host", "oma-a", "--code", "backend_unavailable"]),
        [a]
    );

    // A dry run of --all prints the plan and changes nothing.
    let out = env.cli(HOST, &["dlq", "replay", "--all", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("plan: replay 4 dead letter(s)"), "{text}");
    assert!(text.contains("dry run: nothing replayed"), "{text}");
    assert!(
        env.drain_queue("test.requests").await.is_empty(),
        "nothing published"
    );
    env.wait_count(
        "SELECT count(*) FROM dead_letters WHERE status = 'dead' AND replayed_at IS NULL",
        4,
    )
    .await;
    env.wait_count("SELECT count(*) FROM dead_letter_replays", 0)
        .await;

    // --rate 4: four replays need at least three pauses of 250 ms.
    let started = Instant::now();
    let out = env.cli(
        HOST,
        &[
            "dlq", "replay", "--all", "--rate", "4", "--yes", "--by", "tester",
        ],
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_millis(750),
        "four replays at 4/s took {took:?}"
    );
    let msgs = env.drain_queue("test.requests").await;
    assert_eq!(msgs.len(), 4, "every dead letter republished once");
    let mut keys: Vec<String> = msgs
        .iter()
        .map(|m| m.delivery.routing_key.as_str().to_owned())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["oma-a", "oma-a", "oma-a", "oma-b"],
        "to its original routing key"
    );
    env.wait_count(
        "SELECT count(*) FROM dead_letters WHERE status = 'replayed'",
        4,
    )
    .await;
    env.wait_count(
        "SELECT count(*) FROM dead_letter_replays WHERE replayed_by = 'tester'",
        4,
    )
    .await;
    assert!(listed(&env, &[]).is_empty(), "none left dead");
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
