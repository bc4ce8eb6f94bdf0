//! End-to-end tests of the foundation: the real binary against a real
//! RabbitMQ and PostgreSQL, on the local backend.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{collect_events, exists, Env, WAIT};
use serde_json::json;
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::contract::{ErrorCode, EventType};
use volumed::topology;

const HOST: &str = "oma-t";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_then_detach_reports_devices_and_removes_the_link() {
    let env = Env::new("attach").await;
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let vol = env.create_volume(HOST);

    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, true), WAIT)
        .await
        .expect("attach event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    assert_eq!(ev.host, HOST);
    assert_eq!(ev.attempts, 1);
    let dev = ev.device.expect("device paths in the event");
    let link = env.device_dir(HOST).join(volumed::backend::by_id_name(vol));
    assert_eq!(dev.stable_path, link.display().to_string());
    let image = volumed::backend::local::LocalBackend::image_path(&env.data_dir(HOST), vol);
    assert_eq!(
        dev.path,
        std::fs::canonicalize(image)
            .expect("image")
            .display()
            .to_string()
    );
    let attachment = || async {
        sqlx::query_as::<_, (Uuid, Option<String>, Option<String>)>(
            "SELECT vm_id, device_path, stable_path FROM volume_attachments WHERE volume_id = $1",
        )
        .bind(vol)
        .fetch_one(&env.pool)
        .await
        .expect("attachment row")
    };
    let (vm, device, stable) = attachment().await;
    assert_eq!(vm, env.appliance);
    assert_eq!(device.as_deref(), Some(dev.path.as_str()));
    // The stable path recorded is the by-id link, not the resolved device.
    assert_eq!(stable, Some(link.display().to_string()));

    // Repeating the attach succeeds without a second backend call.
    let again = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, true), WAIT)
        .await
        .expect("second attach");
    assert_eq!(again.event_type, EventType::AttachSucceeded);

    // Attaching it to another VM while attached here fails specifically.
    let other = client
        .request_and_wait(Outgoing::attach(HOST, vol, Uuid::new_v4(), true), WAIT)
        .await
        .expect("conflicting attach");
    assert_eq!(other.event_type, EventType::AttachFailed);
    let err = other.error.expect("error");
    assert_eq!(err.code, ErrorCode::VolumeAttachedElsewhere);
    assert!(!err.retryable);

    let ev = client
        .request_and_wait(Outgoing::detach(HOST, vol, None), WAIT)
        .await
        .expect("detach event");
    assert_eq!(ev.event_type, EventType::DetachSucceeded, "{ev:?}");
    assert!(!exists(&link), "by-id link removed");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM volume_attachments")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(rows, 0);

    // Detaching again is a success without effect; attaching to another VM
    // records the attachment and makes no local device.
    let ev = client
        .request_and_wait(Outgoing::detach(HOST, vol, None), WAIT)
        .await
        .expect("second detach");
    assert_eq!(ev.event_type, EventType::DetachSucceeded);
    let failover = Uuid::new_v4();
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, failover, true), WAIT)
        .await
        .expect("failover attach");
    assert_eq!(ev.event_type, EventType::AttachSucceeded);
    assert_eq!(ev.device, None);
    assert!(!exists(&link));
    assert_eq!(
        attachment().await,
        (failover, None, None),
        "a failover attachment records the VM and no device"
    );
    let ev = client
        .request_and_wait(Outgoing::detach(HOST, vol, Some(env.appliance)), WAIT)
        .await
        .expect("guarded detach");
    assert_eq!(ev.event_type, EventType::DetachFailed);
    assert_eq!(
        ev.error.expect("error").code,
        ErrorCode::VolumeAttachedElsewhere
    );

    assert_eq!(
        env.call_log(HOST),
        vec![
            format!("attach {vol} {}", env.appliance),
            format!("detach {vol} {}", env.appliance),
            format!("attach {vol} {failover}"),
        ]
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_requests_over_ten_volumes_keep_order_and_get_one_event_each() {
    let env = Env::new("burst").await;
    let _d = env.start(HOST, &[("VOLUMED_WORKERS", "4")]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vols: Vec<Uuid> = (0..10).map(|_| env.create_volume(HOST)).collect();

    // Per volume: attach, detach, attach, detach, attach, published by one
    // task per volume, all tasks at once.
    let mut tasks = Vec::new();
    for &vol in &vols {
        let url = env.amqp_url.clone();
        let vm = env.appliance;
        tasks.push(tokio::spawn(async move {
            let c = volumed::client::Client::connect(&url)
                .await
                .expect("connect");
            let reqs: Vec<Outgoing> = (0..5)
                .map(|i| {
                    if i % 2 == 0 {
                        Outgoing::attach(HOST, vol, vm, true)
                    } else {
                        Outgoing::detach(HOST, vol, None)
                    }
                })
                .collect();
            // All five in flight at once: confirmations awaited together
            // must keep the order of the sends.
            let mut ids = Vec::new();
            c.publish_many(&reqs, |r| ids.push(r.request_id))
                .await
                .expect("publish");
            c.close().await;
            (vol, ids)
        }));
    }
    let mut order: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for t in tasks {
        let (vol, ids) = t.await.expect("publisher");
        order.insert(vol, ids);
    }

    let events = collect_events(&mut sub, 50, Duration::from_secs(1)).await;
    assert_eq!(events.len(), 50);
    for (id, evs) in &events {
        assert_eq!(evs.len(), 1, "request {id} got {} events", evs.len());
        assert!(evs[0].event_type.succeeded(), "{:?}", evs[0]);
    }
    // Commit order per volume equals publish order.
    for (vol, ids) in &order {
        let committed: Vec<Uuid> = sqlx::query_scalar(
            "SELECT o.request_id FROM outbox o JOIN operations p USING (request_id)
              WHERE p.volume_id = $1 ORDER BY o.id",
        )
        .bind(vol)
        .fetch_all(&env.pool)
        .await
        .expect("outbox order");
        assert_eq!(&committed, ids, "volume {vol}");
    }
    // The backend saw exactly the alternating sequence for every volume.
    let log = env.call_log(HOST);
    for vol in &vols {
        let ops: Vec<&str> = log
            .iter()
            .filter(|l| l.contains(&vol.to_string()))
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(
            ops,
            ["attach", "detach", "attach", "detach", "attach"],
            "volume {vol}"
        );
    }
    client.close().await;
}

/// Stops a daemon gracefully (which flushes its outbox) and checks it
/// exited 0.
fn stop(d: &mut common::Daemon) {
    d.sigterm();
    let status = d.wait_exit(WAIT);
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log().join("\n")
    );
}

/// Waits for the event of a request on the same volume published after
/// `request`: lanes keep per-volume order and the relay publishes in commit
/// order, so any duplicate event of `request` would have arrived before it.
async fn sentinel(env: &Env, sub: &mut volumed::client::Subscription, vol: Uuid) -> Vec<Uuid> {
    let client = env.client().await;
    let probe = Outgoing::detach(HOST, vol, Some(Uuid::new_v4()));
    client.publish(&probe).await.expect("publish sentinel");
    let mut seen = Vec::new();
    loop {
        let e = sub
            .next(WAIT)
            .await
            .expect("events")
            .expect("sentinel event arrives");
        if e.request_id == probe.request_id {
            break;
        }
        seen.push(e.request_id);
    }
    client.close().await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_twice_has_one_effect_and_one_event() {
    let env = Env::new("dup").await;
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, true);
    client.publish(&req).await.expect("first");
    client.publish(&req).await.expect("second, same message id");

    let mut seen = sentinel(&env, &mut sub, vol).await;
    seen.retain(|id| *id == req.request_id);
    assert_eq!(seen.len(), 1, "exactly one event for the request");
    assert_eq!(
        env.call_log(HOST).len(),
        1,
        "one backend call: {:?}",
        env.call_log(HOST)
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE request_id = $1")
        .bind(req.request_id)
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(events, 1);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_ack_neither_repeats_nor_loses_anything() {
    let env = Env::new("crash").await;
    let client = env.client().await;
    // The durable queue keeps events published by the first daemon before
    // it died, so the test sees every event ever published.
    env.durable_event_queue("test.events").await;
    let vol = env.create_volume(HOST);

    let mut d = env.start(HOST, &[("VOLUMED_FAILPOINTS", "after_commit=abort")]);
    let req = Outgoing::attach(HOST, vol, env.appliance, true);
    client.publish(&req).await.expect("publish");
    let status = d.wait_exit(WAIT);
    assert!(!status.success(), "the failpoint aborted the daemon");
    // Committed, but the message was never acknowledged.
    let state: String = sqlx::query_scalar("SELECT state FROM operations WHERE request_id = $1")
        .bind(req.request_id)
        .fetch_one(&env.pool)
        .await
        .expect("journal row");
    assert_eq!(state, "succeeded");
    assert_eq!(
        env.queue_depth(&topology::request_queue(HOST)).await,
        1,
        "still queued"
    );

    let mut d2 = env.start(HOST, &[]);
    d2.wait_log("request already finished", WAIT);
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
        .await;
    stop(&mut d2);
    assert_eq!(
        env.queue_depth(&topology::request_queue(HOST)).await,
        0,
        "acknowledged"
    );

    // The first daemon's relay may have published the event just before
    // the abort, and the second publishes it again: at least once, always
    // the same event (same event id).
    let by_request = common::event_ids_by_request(&env.drain_queue("test.events").await);
    assert_eq!(by_request.len(), 1, "{by_request:?}");
    assert_eq!(by_request[&req.request_id].len(), 1, "one event, not two");
    assert_eq!(
        env.call_log(HOST).len(),
        1,
        "one attach: {:?}",
        env.call_log(HOST)
    );
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM operations WHERE request_id = $1")
        .bind(req.request_id)
        .fetch_one(&env.pool)
        .await
        .expect("attempts");
    assert_eq!(
        attempts, 1,
        "the redelivery did not run the operation again"
    );
    client.close().await;
}

/// A refused message and what it must lead to.
struct BadCase {
    body: Vec<u8>,
    /// The `message_id` property as published (not always a UUID).
    message_id: Option<String>,
    /// The reason expected in the dead letter.
    reason: ErrorCode,
    /// The failed event expected, when the request can be named.
    event: Option<(Uuid, EventType)>,
}

/// Publishes a request with any `message_id` property, as a foreign client
/// could (volumed's client only sends UUIDs), and waits for the confirm.
async fn publish_with_message_id(env: &Env, body: &[u8], message_id: Option<&str>) {
    let conn = volumed::amqp::connect(&env.amqp_url, "test")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    let confirm = ch
        .basic_publish(
            topology::REQUESTS_EXCHANGE,
            HOST,
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "routed"
    );
    let _ = conn.close(200, "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_its_reason_and_the_worker_keeps_serving() {
    let env = Env::new("badinput").await;
    let d = env.start(HOST, &[("VOLUMED_MAX_MESSAGE_BYTES", "4096")]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vol = Uuid::new_v4();
    let vm = Uuid::new_v4();

    let json = |v: serde_json::Value| v.to_string().into_bytes();
    let case = |body, id: Option<Uuid>, reason, event: Option<EventType>| BadCase {
        body,
        message_id: id.map(|u| u.to_string()),
        reason,
        event: event.map(|t| (id.expect("an event needs a request id"), t)),
    };
    let id = Uuid::new_v4;
    let (bad_rid, named_by_body) = (id(), id());
    let mut cases: Vec<BadCase> = vec![
        case(
            b"{not json".to_vec(),
            Some(id()),
            ErrorCode::MalformedBody,
            None,
        ),
        case(
            json(json!({"op": "attach", "volume_id": vol})),
            Some(id()),
            ErrorCode::MissingField,
            Some(EventType::AttachFailed),
        ),
        case(
            json(json!({"op": "detach", "volume_id": "not-a-uuid"})),
            Some(id()),
            ErrorCode::InvalidField,
            Some(EventType::DetachFailed),
        ),
        case(
            json(json!({"op": "format", "volume_id": vol})),
            Some(id()),
            ErrorCode::UnknownOp,
            None,
        ),
        case(
            json(json!({"op": "detach", "volume_id": vol, "pad": "x".repeat(5000)})),
            Some(id()),
            ErrorCode::MessageTooLarge,
            None,
        ),
        case(
            json(json!({"op": "detach", "volume_id": vol})),
            None,
            ErrorCode::MissingField,
            None,
        ),
        // A request id in the body that is not a UUID: the message id
        // still names the request.
        case(
            json(json!({"op": "attach", "request_id": "12345", "volume_id": vol, "vm_id": vm})),
            Some(bad_rid),
            ErrorCode::InvalidField,
            Some(EventType::AttachFailed),
        ),
    ];
    // A message id that is not a UUID: refused even though the body is
    // valid, and answered under the body's request id.
    cases.push(BadCase {
        body: json(json!({"op": "detach", "request_id": named_by_body, "volume_id": vol})),
        message_id: Some("order-17".into()),
        reason: ErrorCode::InvalidField,
        event: Some((named_by_body, EventType::DetachFailed)),
    });
    for c in &cases {
        publish_with_message_id(&env, &c.body, c.message_id.as_deref()).await;
    }

    // Every case is dead-lettered with its reason.
    // The daemon stores what reaches its dead-letter queue.
    env.wait_count("SELECT count(*) FROM dead_letters", cases.len() as i64)
        .await;
    let dead: Vec<(Vec<u8>, Option<String>, String, serde_json::Value)> =
        sqlx::query_as("SELECT body, message_id, reason, headers FROM dead_letters")
            .fetch_all(&env.pool)
            .await
            .expect("dead letters");
    for (i, c) in cases.iter().enumerate() {
        let (_, _, reason, headers) = dead
            .iter()
            .find(|(b, m, _, _)| *b == c.body && *m == c.message_id)
            .unwrap_or_else(|| panic!("case {i} not dead-lettered"));
        assert_eq!(reason, c.reason.as_str(), "case {i}");
        assert!(
            headers.get(volumed::consumer::ERROR_HEADER).is_some(),
            "case {i}"
        );
    }

    // Where the request could be named, a failed event with the code.
    let with_events = cases.iter().filter(|c| c.event.is_some()).count();
    let events = collect_events(&mut sub, with_events, Duration::from_millis(300)).await;
    assert_eq!(events.len(), with_events, "no event for an unnamed request");
    for c in &cases {
        let Some((rid, typ)) = c.event else { continue };
        let evs = &events[&rid];
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].event_type, typ);
        assert_eq!(evs[0].error.as_ref().expect("error").code, c.reason);
    }
    // The refusals were logged once each, with the message id.
    let log = d.log();
    for mid in cases.iter().filter_map(|c| c.message_id.as_deref()) {
        let n = log
            .iter()
            .filter(|l| l.contains("refused a request") && l.contains(mid))
            .count();
        assert_eq!(n, 1, "logged once: {mid}");
    }

    // And the daemon still serves.
    let vol = env.create_volume(HOST);
    let ev = client
        .request_and_wait(Outgoing::attach(HOST, vol, env.appliance, false), WAIT)
        .await
        .expect("still serving");
    assert_eq!(ev.event_type, EventType::AttachSucceeded);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_keeps_events_while_the_broker_is_away() {
    let env = Env::new("outage").await;
    env.durable_event_queue("test.events").await;
    // The daemon connects as a user of its own with a password found
    // nowhere else, so the log can be searched for it; the outage takes
    // that user's permissions away.
    let user = common::BrokerUser(format!("{}_daemon", env.name));
    let password = format!("pw-{}", Uuid::new_v4().simple());
    common::rabbitmqctl(&["add_user", &user.0, &password]);
    let grant = || {
        common::rabbitmqctl(&[
            "set_permissions",
            "-p",
            &env.vhost,
            &user.0,
            ".*",
            ".*",
            ".*",
        ]);
    };
    grant();
    let url = format!("amqp://{}:{password}@127.0.0.1:5672/{}", user.0, env.vhost);
    // A slow backend keeps the operations in flight while the broker goes.
    let mut d = env.start(
        HOST,
        &[
            ("VOLUMED_LOCAL_LATENCY_MS", "3000"),
            ("VOLUMED_WORKERS", "8"),
            ("VOLUMED_AMQP_URL", &url),
        ],
    );
    let client = env.client().await;
    let vols: Vec<Uuid> = (0..5).map(|_| env.create_volume(HOST)).collect();
    let mut ids = Vec::new();
    for &v in &vols {
        let r = Outgoing::attach(HOST, v, env.appliance, true);
        client.publish(&r).await.expect("publish");
        ids.push(r.request_id);
    }
    client.close().await;
    env.wait_count("SELECT count(*) FROM operations WHERE state = 'running'", 5)
        .await;

    // The broker goes away for this vhost: connections closed, and new ones
    // refused until permissions return.
    common::rabbitmqctl(&["clear_permissions", "-p", &env.vhost, &user.0]);
    common::rabbitmqctl(&[
        "close_all_connections",
        "--vhost",
        &env.vhost,
        "test outage",
    ]);

    // The operations still finish, and their events wait in the outbox.
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 5)
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a few relay polls
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(pending, 5, "nothing marked sent while the broker is away");

    grant();
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
        .await;
    // Requests whose ack was lost with the connection come back and are
    // recognised as done. A request on the same volume published now is
    // processed after any such redelivery (per-volume order).
    let client = env.client().await;
    let mut sentinels = Vec::new();
    for &v in &vols {
        let probe = Outgoing::detach(HOST, v, Some(Uuid::new_v4()));
        client.publish(&probe).await.expect("publish sentinel");
        sentinels.push(probe.request_id);
    }
    let start = std::time::Instant::now();
    for id in &sentinels {
        while sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM outbox WHERE request_id = $1 AND sent_at IS NOT NULL",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .expect("count")
            == 0
        {
            assert!(
                start.elapsed() < WAIT,
                "sentinels not processed; log:\n{}",
                d.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    client.close().await;
    stop(&mut d);
    assert_eq!(env.queue_depth(&topology::request_queue(HOST)).await, 0);
    let got = env.drain_queue("test.events").await;
    let mut seen: Vec<Uuid> = got
        .iter()
        .map(|m| {
            serde_json::from_slice::<volumed::contract::Event>(&m.delivery.data)
                .expect("event")
                .request_id
        })
        .filter(|id| !sentinels.contains(id))
        .collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "each request exactly one event");
    assert_eq!(env.call_log(HOST).len(), 5, "no attach repeated");

    // The reconnection failures name the broker, with the password masked,
    // and the password itself never reaches the log.
    let log = d.log();
    let masked = format!("amqp://{}:****@127.0.0.1:5672/{}", user.0, env.vhost);
    assert!(
        log.iter().any(|l| l.contains(&masked)),
        "no log line names the broker as {masked}; log:\n{}",
        log.join("\n")
    );
    let leaks: Vec<&String> = log.iter().filter(|l| l.contains(&password)).collect();
    assert!(
        leaks.is_empty(),
        "the broker password was logged: {leaks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_zero_and_loses_nothing() {
    let env = Env::new("sigterm").await;
    env.durable_event_queue("test.events").await;
    let mut d = env.start(HOST, &[("VOLUMED_LOCAL_LATENCY_MS", "100")]);
    let client = env.client().await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        let r = Outgoing::attach(HOST, env.create_volume(HOST), env.appliance, true);
        client.publish(&r).await.expect("publish");
        ids.push(r.request_id);
    }
    env.wait_count("SELECT count(*) FROM LEAST(5, (SELECT count(*) FROM operations WHERE state <> 'running')) AS n(n) WHERE n = 5", 1).await;
    d.sigterm();
    let status = d.wait_exit(WAIT);
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log().join("\n")
    );
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(unsent, 0, "the outbox was flushed before exit");
    // Work was in flight at the signal, and all of it finished: no journal
    // row is left `running` (the only non-terminal state), so nothing the
    // daemon had started was cut off.
    let log = d.log();
    assert!(
        log.iter()
            .any(|l| l.contains("waiting for in-flight operations")),
        "operations were in flight at SIGTERM; log:\n{}",
        log.join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("did not finish in time")),
        "in-flight operations were cut off; log:\n{}",
        log.join("\n")
    );
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operations WHERE state NOT IN ('succeeded', 'failed')",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(running, 0, "an operation was left unfinished");

    // What was not taken is still queued; a new daemon finishes it.
    let mut d2 = env.start(HOST, &[]);
    env.wait_count(
        "SELECT count(*) FROM operations WHERE state <> 'running'",
        40,
    )
    .await;
    stop(&mut d2);
    assert_eq!(env.queue_depth(&topology::request_queue(HOST)).await, 0);
    let got = env.drain_queue("test.events").await;
    let mut seen: Vec<Uuid> = got
        .iter()
        .map(|m| {
            serde_json::from_slice::<volumed::contract::Event>(&m.delivery.data)
                .expect("event")
                .request_id
        })
        .collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every request exactly one event");
    assert_eq!(env.call_log(HOST).len(), 40);
    client.close().await;
}

/// A backend change that outlasts the shutdown timeout: SIGINT still stops
/// the daemon promptly and with status 0, the unfinished request stays
/// unacknowledged, and the next daemon finishes it with exactly one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_a_slow_operation_exits_in_time_and_the_restart_finishes_it() {
    let env = Env::new("sigint").await;
    env.durable_event_queue("test.events").await;
    let mut d = env.start(
        HOST,
        &[
            ("VOLUMED_LOCAL_LATENCY_MS", "60000"),
            ("VOLUMED_SHUTDOWN_TIMEOUT_SECS", "1"),
        ],
    );
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, true);
    client.publish(&req).await.expect("publish");
    client.close().await;
    let running = format!(
        "SELECT count(*) FROM operations WHERE request_id = '{}' AND state = 'running'",
        req.request_id
    );
    env.wait_count(&running, 1).await;

    let signalled = std::time::Instant::now();
    d.sigint();
    let status = d.wait_exit(Duration::from_secs(30));
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log().join("\n")
    );
    // 1 s for the operations, at least 2 s for the outbox flush, then the
    // export manager and the closes: far below the 60 s the change takes.
    assert!(
        took < Duration::from_secs(10),
        "stopping took {took:?}; log:\n{}",
        d.log().join("\n")
    );
    d.wait_log("did not finish in time", Duration::from_secs(1));
    env.wait_count(&running, 1).await;
    assert_eq!(
        env.queue_depth(&topology::request_queue(HOST)).await,
        1,
        "the cut-off request was not acknowledged"
    );

    let mut d2 = env.start(HOST, &[]);
    env.wait_count(
        &format!(
            "SELECT count(*) FROM outbox WHERE request_id = '{}' AND sent_at IS NOT NULL",
            req.request_id
        ),
        1,
    )
    .await;
    stop(&mut d2);
    let got = env.drain_queue("test.events").await;
    assert_eq!(got.len(), 1, "exactly one event");
    let ev: volumed::contract::Event =
        serde_json::from_slice(&got[0].delivery.data).expect("event");
    assert_eq!(ev.request_id, req.request_id);
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{ev:?}");
    assert_eq!(env.call_log(HOST).len(), 1, "{:?}", env.call_log(HOST));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_serve_only_their_own_host() {
    let env = Env::new("twohosts").await;
    let _a = env.start("oma-a", &[]);
    let _b = env.start("oma-b", &[]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let mut expected = HashMap::new();
    for host in ["oma-a", "oma-b"] {
        for _ in 0..5 {
            let r = Outgoing::attach(host, env.create_volume(host), env.appliance, true);
            client.publish(&r).await.expect("publish");
            expected.insert(r.request_id, host);
        }
    }
    let events = collect_events(&mut sub, 10, Duration::from_millis(500)).await;
    for (id, evs) in &events {
        assert_eq!(evs.len(), 1);
        let host = expected[id];
        assert_eq!(evs[0].host, host, "published by the host that did the work");
        assert_eq!(
            evs[0].event_type,
            EventType::AttachSucceeded,
            "{:?}",
            evs[0]
        );
        let journal_host: String =
            sqlx::query_scalar("SELECT host FROM operations WHERE request_id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .expect("journal");
        assert_eq!(journal_host, host);
    }
    // Each backend saw only its own host's volumes.
    assert_eq!(env.call_log("oma-a").len(), 5);
    assert_eq!(env.call_log("oma-b").len(), 5);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_file_imports_and_a_conflicting_queue_stops_the_daemon() {
    let env = Env::new("topology").await;
    // The shipped definitions, pointed at this test's vhost, import cleanly,
    // and the daemon then finds exactly what it declares.
    let delays =
        volumed::config::parse_delays(volumed::config::DEFAULT_RETRY_DELAYS).expect("delays");
    let doc = volumed::topology::Topology::for_host(HOST, 10, &delays).definitions(&env.vhost);
    let file = env.dir.path().join("defs.json");
    std::fs::write(&file, doc.to_string()).expect("write");
    common::rabbitmqctl(&["import_definitions", file.to_str().expect("utf-8 path")]);
    let mut d = env.start(HOST, &[]);
    d.sigterm();
    assert!(d.wait_exit(WAIT).success());

    // A different delivery limit conflicts with the existing queue: the
    // daemon refuses to start and says why.
    let mut d = env.spawn(HOST, &[("VOLUMED_DELIVERY_LIMIT", "3")]);
    let status = d.wait_exit(WAIT);
    assert!(!status.success());
    d.wait_log("PRECONDITION_FAILED", Duration::from_secs(5));
    d.wait_log("VOLUMED_DELIVERY_LIMIT", Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_attach_and_events_print_what_they_promise_and_config_check_masks_secrets() {
    let env = Env::new("cli").await;
    let _d = env.start(HOST, &[]);
    let out = env.cli(HOST, &["volume", "create", "--size", "1MiB"]);
    assert!(out.status.success());
    let vol = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    let vm = env.appliance.to_string();
    let out = env.cli(
        HOST,
        &[
            "attach",
            "--volume",
            &vol,
            "--vm",
            &vm,
            "--wait",
            "--timeout",
            "60",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: serde_json::Value = serde_json::from_slice(&out.stdout).expect("event JSON");
    assert_eq!(ev["type"], "volume.attach.succeeded");
    // A failed operation exits 1.
    let out = env.cli(
        HOST,
        &[
            "attach",
            "--volume",
            &vol,
            "--vm",
            &Uuid::new_v4().to_string(),
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let out = env.cli(HOST, &["detach", "--volume", &vol, "--wait"]);
    assert!(out.status.success());
    let out = env.cli(HOST, &["volume", "delete", &vol]);
    assert!(out.status.success());

    // `volumed events --json` follows the events, one JSON object a line;
    // `volumed attach` without --wait prints only the request id.
    let mut tail = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_volumed"))
            .args(["events", "--json"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.daemon_env(HOST))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("volumed events starts"),
    );
    let stdout = lines_of(tail.0.stdout.take().expect("stdout"));
    let stderr = lines_of(tail.0.stderr.take().expect("stderr"));
    let said = stderr
        .recv_timeout(WAIT)
        .expect("events says it subscribed");
    assert!(said.starts_with("subscribed to volumed.events"), "{said}");

    let vol = env.create_volume(HOST);
    let out = env.cli(HOST, &["attach", "--volume", &vol.to_string(), "--vm", &vm]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {printed:?}");
    let request_id = Uuid::parse_str(lines[0]).expect("the line is a UUID");
    assert_eq!(lines[0], request_id.hyphenated().to_string());
    env.wait_count(
        &format!(
            "SELECT count(*) FROM operations WHERE request_id = '{request_id}' AND state = 'succeeded'"
        ),
        1,
    )
    .await;

    let line = stdout.recv_timeout(WAIT).expect("an event line");
    let ev: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
    assert_eq!(ev["request_id"], request_id.to_string(), "{line}");
    assert_eq!(ev["type"], "volume.attach.succeeded", "{line}");
    assert_eq!(ev["volume_id"], vol.to_string(), "{line}");
    drop(tail);

    let out = Command::new(env!("CARGO_BIN_EXE_volumed"))
        .args(["config", "check"])
        .env("VOLUMED_HOST_ID", "x")
        .env("VOLUMED_AMQP_URL", "amqp://u:topsecret@h/%2f")
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("VOLUMED_AMQP_URL = amqp://u:****@h/%2f"),
        "{text}"
    );
    assert!(!text.contains("topsecret"));
}

use std::process::Command;

/// A child process killed when the test ends, even after a failure.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines of a pipe, as they come, so a test can wait for one with a
/// deadline.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// An event of this host that no worker of the daemon wrote.
fn outside_event() -> volumed::contract::Event {
    volumed::contract::Event {
        event_id: Uuid::new_v4(),
        event_type: EventType::DetachSucceeded,
        request_id: Uuid::new_v4(),
        host: HOST.into(),
        volume_id: Some(Uuid::new_v4()),
        vm_id: None,
        occurred_at: chrono::Utc::now(),
        device: None,
        export: None,
        error: None,
        attempts: 1,
        cloud_device_id: None,
        repair: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_notification_was_missed_is_published_by_the_poll() {
    let env = Env::new("poll").await;
    let _d = env.start(HOST, &[("VOLUMED_OUTBOX_POLL_MS", "300")]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    // A row committed without NOTIFY, as if the notification were lost.
    let event = outside_event();
    sqlx::query(
        "INSERT INTO outbox (event_id, request_id, host, routing_key, body)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event.event_id)
    .bind(event.request_id)
    .bind(HOST)
    .bind(event.event_type.as_str())
    .bind(serde_json::to_value(&event).expect("json"))
    .execute(&env.pool)
    .await
    .expect("insert");
    let got = sub
        .wait_for(event.request_id, WAIT)
        .await
        .expect("published by the poll");
    assert_eq!(got, event);
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
        .await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_is_woken_by_the_commits_of_its_own_workers() {
    let env = Env::new("bell").await;
    // A poll once a day (the maximum): an event published within seconds
    // can only have been woken by the commit that wrote it.
    let d = env.start(HOST, &[("VOLUMED_OUTBOX_POLL_MS", "86400000")]);
    // The relay's first look at the outbox happens when it connects; wait
    // for it so the events below are committed after it.
    d.wait_log("outbox relay connected", WAIT);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let vol = env.create_volume(HOST);
    // Two in a row: the relay goes back to waiting after each one.
    for req in [
        Outgoing::attach(HOST, vol, env.appliance, false),
        Outgoing::detach(HOST, vol, None),
    ] {
        client.publish(&req).await.expect("publish");
        let ev = sub
            .wait_for(req.request_id, Duration::from_secs(5))
            .await
            .expect("event published on the notification");
        assert!(ev.event_type.succeeded(), "{ev:?}");
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_is_woken_by_the_outbox_notification() {
    let env = Env::new("notify").await;
    // A poll once a day, and an event written by another process (here the
    // test, as the CLI's repairs would): only LISTEN/NOTIFY can wake the
    // daemon's relay for it within seconds.
    let d = env.start(HOST, &[("VOLUMED_OUTBOX_POLL_MS", "86400000")]);
    d.wait_log("outbox relay connected", WAIT);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let event = outside_event();
    let mut tx = env.pool.begin().await.expect("begin");
    volumed::db::insert_event(&mut tx, &event)
        .await
        .expect("insert the event");
    tx.commit().await.expect("commit");
    let got = sub
        .wait_for(event.request_id, Duration::from_secs(5))
        .await
        .expect("event published on the notification");
    assert_eq!(got, event);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_claims_one_batch_even_with_a_plan_made_on_an_empty_outbox() {
    use sqlx::{Acquire, Executor};
    let env = Env::new("claim_plan").await;
    // The daemon's relay looks at the outbox every poll, so the plan its
    // connection keeps for the claim is often made while the table is
    // empty and its statistics say so (here from a VACUUM, as after a
    // clean-up). A generic plan made then (PostgreSQL switches to one
    // after five runs) must still claim at most one batch once the table
    // fills.
    env.pool
        .execute("VACUUM (ANALYZE) outbox")
        .await
        .expect("vacuum");
    let mut conn = env.pool.acquire().await.expect("connection");
    conn.execute("SET plan_cache_mode = force_generic_plan")
        .await
        .expect("generic plans");
    {
        let mut tx = conn.begin().await.expect("begin");
        let none = volumed::db::claim_pending(&mut tx, HOST, 10)
            .await
            .expect("claim on the empty outbox");
        assert!(none.is_empty());
        tx.commit().await.expect("commit");
    }
    sqlx::query(
        "INSERT INTO outbox (event_id, request_id, routing_key, body, host)
         SELECT gen_random_uuid(), gen_random_uuid(), 'volume.attach.succeeded', '{}', $1
           FROM generate_series(1, 500)",
    )
    .bind(HOST)
    .execute(&env.pool)
    .await
    .expect("pending events");
    let mut tx = conn.begin().await.expect("begin");
    let claimed = volumed::db::claim_pending(&mut tx, HOST, 10)
        .await
        .expect("claim");
    tx.rollback().await.expect("rollback");
    assert_eq!(claimed.len(), 10, "one batch, oldest first");
    assert!(claimed.windows(2).all(|w| w[0].id < w[1].id));
}

/// The SQLSTATE of a failed statement (23505 is unique_violation) and the
/// constraint it names.
fn violation(r: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> (String, String) {
    match r {
        Ok(_) => ("no error".into(), String::new()),
        Err(e) => match e.as_database_error() {
            Some(d) => (
                d.code().map(|c| c.into_owned()).unwrap_or_default(),
                d.constraint().unwrap_or_default().to_owned(),
            ),
            None => (format!("not a database error: {e}"), String::new()),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumed_migrate_applies_the_schema_once_and_its_constraints_hold() {
    let env = Env::new_unmigrated("migrate").await;
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count() as i64;
    let exists = || async {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass('operations') IS NOT NULL")
            .fetch_one(&env.pool)
            .await
            .expect("catalog")
    };
    assert!(!exists().await, "the database starts empty");
    // On an empty database, then again on the migrated one: both succeed,
    // and the second applies nothing.
    for run in 1..=2 {
        let out = env.cli(HOST, &["migrate"]);
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&env.pool)
                .await
                .expect("migration history");
        assert_eq!(applied, shipped, "run {run}");
    }

    let attach = |volume: Uuid, vm: Uuid, device: Option<&'static str>| {
        sqlx::query(
            "INSERT INTO volume_attachments (volume_id, vm_id, host, device_path, stable_path, request_id)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(volume)
        .bind(vm)
        .bind(HOST)
        .bind(device)
        .bind(device.map(|d| format!("{d}-stable-{volume}")))
        .bind(Uuid::new_v4())
        .execute(&env.pool)
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    attach(a, env.appliance, Some("/dev/vdb"))
        .await
        .expect("first attachment");
    // One attachment per volume, whichever VM the second names.
    assert_eq!(
        violation(attach(a, Uuid::new_v4(), None).await),
        ("23505".into(), "volume_attachments_pkey".into())
    );
    // One volume per device path on a host.
    assert_eq!(
        violation(attach(b, env.appliance, Some("/dev/vdb")).await),
        ("23505".into(), "volume_attachments_device".into())
    );
    // Volumes without a local device (failover attachments) do not collide.
    attach(b, Uuid::new_v4(), None)
        .await
        .expect("failover attachment");
    attach(Uuid::new_v4(), Uuid::new_v4(), None)
        .await
        .expect("second failover attachment");
}

/// A database already migrated by a later release (rolled back to this
/// one): the later migration only added to the schema, so this build must
/// start on it, and leave that migration in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_a_later_release_still_runs_this_one() {
    let env = Env::new("later_release").await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000001, 'a later release', true, '\\x00'::bytea, 0)",
    )
    .execute(&env.pool)
    .await
    .expect("a later migration");
    let out = env.cli(HOST, &["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let ev = client
        .attach_and_wait(HOST, vol, env.appliance, false, WAIT)
        .await
        .expect("attach");
    assert!(ev.event_type.succeeded(), "{ev:?}");
    client.close().await;
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version = 29991231000001")
            .fetch_one(&env.pool)
            .await
            .expect("history");
    assert_eq!(kept, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_for_another_volume_is_dead_lettered() {
    let env = Env::new("reuse").await;
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let (a, b) = (env.create_volume(HOST), env.create_volume(HOST));
    let first = Outgoing::attach(HOST, a, env.appliance, false);
    client.publish(&first).await.expect("publish");
    sub.wait_for(first.request_id, WAIT)
        .await
        .expect("first event");

    let mut reused = Outgoing::attach(HOST, b, env.appliance, false);
    reused.request_id = first.request_id;
    reused.body["request_id"] = json!(first.request_id);
    client.publish(&reused).await.expect("publish");

    env.wait_count(
        "SELECT count(*) FROM dead_letters WHERE reason = 'duplicate_request_id'",
        1,
    )
    .await;
    assert_eq!(env.call_log(HOST).len(), 1, "volume b untouched");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE request_id = $1")
        .bind(first.request_id)
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(events, 1, "no second event for the id");
    client.close().await;
}

/// The daemon's connections ask for small frames: the client keeps 32
/// frames of buffer each way per connection, which at the broker's
/// default frame size was most of the daemon's memory at rest. A frame
/// size named in the URL is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_ask_for_small_frames_unless_the_url_names_a_size() {
    let env = Env::new("frames").await;
    let conn = volumed::amqp::connect(&env.amqp_url, "test")
        .await
        .expect("connect");
    assert_eq!(conn.configuration().frame_max(), volumed::amqp::FRAME_MAX);
    let _ = conn.close(200, "done").await;
    let named =
        volumed::config::SecretUrl::new(format!("{}?frame_max=65536", env.amqp_url.expose()));
    let conn = volumed::amqp::connect(&named, "test")
        .await
        .expect("connect");
    assert_eq!(conn.configuration().frame_max(), 65536);
    let _ = conn.close(200, "done").await;
    // A large request still travels (in several frames) and is served.
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let mut attach = Outgoing::attach(HOST, vol, env.appliance, false);
    attach.body["metadata"] = serde_json::json!({ "note": "x".repeat(60 * 1024) });
    let ev = client.request_and_wait(attach, WAIT).await.expect("event");
    assert!(ev.event_type.succeeded(), "{ev:?}");
    client.close().await;
}

/// Only the records whose loss costs nothing skip the wait for the disk:
/// the relaxed pool's sessions, and no other, run with
/// `synchronous_commit = off`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_relaxed_pool_commits_without_waiting_for_the_disk() {
    let env = Env::new("relaxed").await;
    let relaxed = volumed::db::connect_relaxed(&env.db_url, 1)
        .await
        .expect("relaxed pool");
    let show = "SELECT current_setting('synchronous_commit')";
    let setting: String = sqlx::query_scalar(show)
        .fetch_one(&relaxed)
        .await
        .expect("setting");
    assert_eq!(setting, "off");
    let setting: String = sqlx::query_scalar(show)
        .fetch_one(&env.pool)
        .await
        .expect("setting");
    assert_eq!(setting, "on", "outcomes are committed with the default");
    relaxed.close().await;
}

fn journal_request(op: volumed::contract::Op, volume: Uuid) -> volumed::contract::Request {
    volumed::contract::Request {
        request_id: Uuid::new_v4(),
        op,
        volume_id: volume,
        vm_id: Some(Uuid::new_v4()),
        export: false,
        job_id: None,
        metadata: json!({"wave": 1}),
        correlation_id: None,
        reply_to: None,
        deadline: None,
        retries: 0,
        trace: None,
    }
}

/// How a request of `journal_request` ends: attached to its VM without a
/// device, or failed with `code`.
fn journal_finish(
    req: &volumed::contract::Request,
    code: Option<ErrorCode>,
) -> volumed::db::Finish {
    use volumed::db::{AttachmentChange, ExportChange, Finish, Outgoing};
    let vm = req.vm_id.expect("vm");
    Finish {
        host: HOST.into(),
        request_id: req.request_id,
        op: Some(req.op),
        volume_id: Some(req.volume_id),
        vm_id: req.vm_id,
        error: code.map(|c| (c, format!("{c} in a test"))),
        change: match code {
            None => AttachmentChange::Upsert {
                volume_id: req.volume_id,
                vm_id: vm,
                device_path: None,
                stable_path: None,
                export: ExportChange::Keep,
            },
            Some(_) => AttachmentChange::None,
        },
        outgoing: Outgoing {
            event: volumed::contract::Event {
                request_id: req.request_id,
                event_type: req.op.event_type(code.is_none()),
                volume_id: Some(req.volume_id),
                vm_id: req.vm_id,
                error: code.map(|c| volumed::contract::EventError {
                    code: c,
                    message: format!("{c} in a test"),
                    retryable: c.retryable(),
                }),
                ..outside_event()
            },
            correlation_id: Some(format!("corr-{}", req.request_id)),
            reply_to: None,
            traceparent: None,
        },
    }
}

/// Locks the journal row of `request` in a transaction of the test, then
/// runs `call` (a grouped statement on that row) until it waits for the
/// lock: the group's only lane is then busy, and what is called next
/// queues up. Rolling back the returned transaction lets `call` finish.
async fn hold_the_lane<F>(
    env: &Env,
    request: Uuid,
    call: F,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<Result<(), String>>,
)
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut holder = env.pool.begin().await.expect("tx");
    sqlx::query("SELECT 1 FROM operations WHERE request_id = $1 FOR UPDATE")
        .bind(request)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let blocker = tokio::spawn(call);
    env.wait_count(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'",
        1,
    )
    .await;
    (holder, blocker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_finishes_is_one_transaction_with_each_answer_in_its_place() {
    use volumed::contract::Op;
    use volumed::db::{self, Start};
    let env = Env::new("group_finish").await;
    let reqs: Vec<_> = (0..5)
        .map(|_| journal_request(Op::Attach, Uuid::new_v4()))
        .collect();
    let started = db::start_operations(&env.pool, HOST, &reqs)
        .await
        .expect("grouped start");
    assert!(
        started
            .iter()
            .all(|s| matches!(s, Start::Run { attempts: 1, .. })),
        "{started:?}"
    );
    // The third is finished alone first: in the group it must answer
    // false and write nothing more.
    let early = journal_finish(&reqs[2], None);
    assert!(db::finish_operation(&env.pool, &early)
        .await
        .expect("finish"));
    let finishes: Vec<_> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| journal_finish(r, (i == 4).then_some(ErrorCode::BackendUnavailable)))
        .collect();
    let answers = db::finish_operations(&env.pool, &finishes)
        .await
        .expect("grouped finish");
    assert_eq!(answers, vec![true, true, false, true, true]);

    let ids: Vec<Uuid> = reqs.iter().map(|r| r.request_id).collect();
    let states: HashMap<Uuid, String> =
        sqlx::query_as("SELECT request_id, state FROM operations WHERE request_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&env.pool)
            .await
            .expect("states")
            .into_iter()
            .collect();
    for (i, id) in ids.iter().enumerate() {
        let want = if i == 4 { "failed" } else { "succeeded" };
        assert_eq!(states[id], want, "request {i}");
    }
    let events: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT request_id, correlation_id FROM outbox WHERE request_id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(&env.pool)
    .await
    .expect("events");
    assert_eq!(events.len(), 5, "one event per request: {events:?}");
    for (id, corr) in &events {
        assert_eq!(corr.as_deref(), Some(format!("corr-{id}").as_str()));
    }
    let attached: i64 =
        sqlx::query_scalar("SELECT count(*) FROM volume_attachments WHERE request_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&env.pool)
            .await
            .expect("attachments");
    assert_eq!(attached, 4, "the failed request changes no attachment");
    let errors: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT request_id, code FROM operation_errors WHERE request_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&env.pool)
            .await
            .expect("errors");
    assert_eq!(errors, vec![(ids[4], "backend_unavailable".to_string())]);
    // The four rows the group wrote share one transaction.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM outbox WHERE request_id = ANY($1)",
    )
    .bind(&ids[..2])
    .fetch_one(&env.pool)
    .await
    .expect("xmin");
    assert_eq!(transactions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_one_bad_finish_writes_nothing_and_the_journal_finishes_the_rest() {
    use volumed::contract::Op;
    use volumed::db;
    let env = Env::new("group_bad").await;
    let reqs: Vec<_> = (0..4)
        .map(|_| journal_request(Op::Attach, Uuid::new_v4()))
        .collect();
    db::start_operations(&env.pool, HOST, &reqs)
        .await
        .expect("start");
    let mut finishes: Vec<_> = reqs.iter().map(|r| journal_finish(r, None)).collect();
    // An event id the outbox already holds: its insert violates a unique
    // constraint, whatever the other rows are.
    let taken = outside_event();
    let mut tx = env.pool.begin().await.expect("tx");
    db::insert_event(&mut tx, &taken).await.expect("insert");
    tx.commit().await.expect("commit");
    finishes[1].outgoing.event.event_id = taken.event_id;
    let grouped = db::finish_operations(&env.pool, &finishes).await;
    assert!(grouped.is_err(), "{grouped:?}");
    let ids: Vec<Uuid> = reqs.iter().map(|r| r.request_id).collect();
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE request_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(written, 0, "a failed group writes nothing");

    // Through the journal, all four queued at once behind a finish that
    // holds the only lane: they form one group, which fails, then each is
    // finished alone and learns its own outcome.
    let journal = std::sync::Arc::new(volumed::worker::Journal::start(
        HOST,
        env.pool.clone(),
        env.pool.clone(),
        1,
    ));
    let first = journal_request(Op::Attach, Uuid::new_v4());
    db::start_operations(&env.pool, HOST, std::slice::from_ref(&first))
        .await
        .expect("start");
    let (holder, blocker) = hold_the_lane(&env, first.request_id, {
        let (j, f) = (
            std::sync::Arc::clone(&journal),
            journal_finish(&first, None),
        );
        async move { j.finish(&f).await.map(|_| ()).map_err(|e| e.to_string()) }
    })
    .await;
    let mut all = Box::pin(futures_util::future::join_all(
        finishes.iter().map(|f| journal.finish(f)),
    ));
    assert!(
        futures_util::poll!(&mut all).is_pending(),
        "queued behind the lane"
    );
    holder.rollback().await.expect("release");
    assert_eq!(blocker.await.expect("task"), Ok(()));
    let answers: Vec<Result<bool, String>> = all
        .await
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect();
    assert!(answers[1].is_err(), "{answers:?}");
    for i in [0, 2, 3] {
        assert_eq!(answers[i], Ok(true), "{answers:?}");
    }
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE request_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(written, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_starts_tells_each_request_what_it_is() {
    use volumed::contract::Op;
    use volumed::db::{self, Start};
    let env = Env::new("group_start").await;
    let volume = Uuid::new_v4();
    let running = journal_request(Op::Attach, volume);
    let done = journal_request(Op::Attach, Uuid::new_v4());
    let first = db::start_operations(&env.pool, HOST, &[running.clone(), done.clone()])
        .await
        .expect("start");
    assert!(first
        .iter()
        .all(|s| matches!(s, Start::Run { attempts: 1, .. })));
    assert!(
        db::finish_operation(&env.pool, &journal_finish(&done, None))
            .await
            .expect("finish")
    );
    let fresh = journal_request(Op::Detach, Uuid::new_v4());
    // The id of `running`, for another volume: a conflict.
    let mut reused = journal_request(Op::Attach, Uuid::new_v4());
    reused.request_id = running.request_id;
    let group = [running.clone(), done.clone(), fresh.clone()];
    let answers = db::start_operations(&env.pool, HOST, &group)
        .await
        .expect("start");
    assert_eq!(
        answers,
        vec![
            Start::Run {
                attempts: 2,
                cloud_job: None
            },
            Start::Done {
                state: "succeeded".into()
            },
            Start::Run {
                attempts: 1,
                cloud_job: None
            },
        ]
    );
    let alone = db::start_operations(&env.pool, HOST, std::slice::from_ref(&reused))
        .await
        .expect("start");
    assert!(matches!(alone[0], Start::Conflict { .. }), "{alone:?}");
    // The same id twice in one group: the statement refuses it, and the
    // journal starts them one by one.
    let twice = db::start_operations(&env.pool, HOST, &[fresh.clone(), fresh.clone()]).await;
    assert!(twice.is_err(), "{twice:?}");
    let journal = std::sync::Arc::new(volumed::worker::Journal::start(
        HOST,
        env.pool.clone(),
        env.pool.clone(),
        1,
    ));
    let (holder, blocker) = hold_the_lane(&env, running.request_id, {
        let (j, r) = (std::sync::Arc::clone(&journal), running.clone());
        async move { j.begin(&r).await.map(|_| ()).map_err(|e| e.to_string()) }
    })
    .await;
    let mut both = Box::pin(futures_util::future::join_all(
        (0..2).map(|_| journal.begin(&fresh)),
    ));
    assert!(
        futures_util::poll!(&mut both).is_pending(),
        "queued behind the lane"
    );
    holder.rollback().await.expect("release");
    assert_eq!(blocker.await.expect("task"), Ok(()));
    let mut attempts = Vec::new();
    for answer in both.await {
        match answer {
            Ok(Start::Run { attempts: a, .. }) => attempts.push(a),
            other => panic!("{other:?}"),
        }
    }
    attempts.sort();
    assert_eq!(attempts, vec![2, 3], "each call counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_skip_an_operation_whose_row_is_locked_instead_of_waiting() {
    use volumed::contract::Op;
    use volumed::db;
    let env = Env::new("steps_locked").await;
    let reqs: Vec<_> = (0..2)
        .map(|_| journal_request(Op::Attach, Uuid::new_v4()))
        .collect();
    db::start_operations(&env.pool, HOST, &reqs)
        .await
        .expect("start");
    // Another transaction holds the first row, as a finishing group does.
    let mut holder = env.pool.begin().await.expect("tx");
    sqlx::query("SELECT 1 FROM operations WHERE request_id = $1 FOR UPDATE")
        .bind(reqs[0].request_id)
        .execute(&mut *holder)
        .await
        .expect("lock");
    let ids = [reqs[0].request_id, reqs[1].request_id];
    let recorded = tokio::time::timeout(
        Duration::from_secs(5),
        db::record_steps(&env.pool, &ids, &["device_found", "device_found"]),
    )
    .await;
    holder.rollback().await.expect("rollback");
    recorded.expect("the steps did not wait").expect("steps");
    let steps: HashMap<Uuid, String> =
        sqlx::query_as("SELECT request_id, step FROM operations WHERE request_id = ANY($1)")
            .bind(&ids[..])
            .fetch_all(&env.pool)
            .await
            .expect("steps")
            .into_iter()
            .collect();
    assert_eq!(steps[&ids[1]], "device_found");
    assert_ne!(steps[&ids[0]], "device_found", "the locked row is skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_refused_events_pending_and_marks_unroutable_ones() {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let env = Env::new("relay_marks").await;
    let d = env.start(HOST, &[("VOLUMED_OUTBOX_POLL_MS", "100")]);
    d.wait_log("outbox relay connected", WAIT);
    // A queue that takes nothing, bound to attach events: the broker
    // refuses (nacks) every attach event routed to it.
    let conn = volumed::amqp::connect(&env.amqp_url, "test")
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare("full", QueueDeclareOptions::default(), args)
        .await
        .expect("declare");
    ch.queue_bind(
        "full",
        topology::EVENTS_EXCHANGE,
        "volume.attach.*",
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let attach = Outgoing::attach(HOST, vol, env.appliance, false);
    client.publish(&attach).await.expect("publish");
    let row = format!(
        "SELECT count(*) FROM outbox WHERE request_id = '{}' AND sent_at IS NULL
            AND NOT unroutable AND publish_attempts >= 2",
        attach.request_id
    );
    // Refused at least twice, and still pending.
    env.wait_count(&row, 1).await;

    // Without that queue nothing is bound for attach events: the event is
    // marked sent and unroutable, and kept.
    ch.queue_delete("full", QueueDeleteOptions::default())
        .await
        .expect("delete");
    env.wait_count(
        &format!(
            "SELECT count(*) FROM outbox WHERE request_id = '{}'
                AND sent_at IS NOT NULL AND unroutable",
            attach.request_id
        ),
        1,
    )
    .await;

    // An event with a subscriber is sent and routable.
    let mut sub = client.subscribe("#").await.expect("subscribe");
    let detach = Outgoing::detach(HOST, vol, None);
    client.publish(&detach).await.expect("publish");
    let ev = sub.wait_for(detach.request_id, WAIT).await.expect("event");
    assert!(ev.event_type.succeeded(), "{ev:?}");
    env.wait_count(
        &format!(
            "SELECT count(*) FROM outbox WHERE request_id = '{}'
                AND sent_at IS NOT NULL AND NOT unroutable AND publish_attempts = 1",
            detach.request_id
        ),
        1,
    )
    .await;
    let _ = conn.close(200, "done").await;
    client.close().await;
}

/// A TCP proxy to the broker that, once a connection has sent its first
/// `basic.publish`, holds back everything the broker says on that
/// connection until it has sent `publishes` of them. Returns its port.
async fn proxy_holding_replies(publishes: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("proxy listens");
    let port = listener.local_addr().expect("proxy address").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let broker = tokio::net::TcpStream::connect("127.0.0.1:5672")
                .await
                .expect("proxy reaches the broker");
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_broker, mut to_broker) = broker.into_split();
            let (count, mut counted) = tokio::sync::watch::channel(0usize);
            // Client to broker: passed on as it comes, with the publishes
            // counted (frames after the 8-byte protocol header: type,
            // channel, size, payload, end; a method frame's payload starts
            // with its class and method, 60 and 40 for basic.publish).
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending: Vec<u8> = Vec::new();
                let mut header = 8usize;
                loop {
                    let n = match from_client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if to_broker.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    let skip = header.min(pending.len());
                    pending.drain(..skip);
                    header -= skip;
                    while pending.len() >= 7 {
                        let size =
                            u32::from_be_bytes([pending[3], pending[4], pending[5], pending[6]])
                                as usize;
                        if pending.len() < 8 + size {
                            break;
                        }
                        if pending[0] == 1 && size >= 4 && pending[7..11] == [0, 60, 0, 40] {
                            count.send_modify(|c| *c += 1);
                        }
                        pending.drain(..8 + size);
                    }
                }
            });
            // Broker to client: held while some but not all publishes
            // have been sent.
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from_broker.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let sent = *counted.borrow();
                    if sent > 0
                        && sent < publishes
                        && counted.wait_for(|c| *c >= publishes).await.is_err()
                    {
                        return;
                    }
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Outbox publishing does not cost a round trip per event: the relay sends
/// every event of a batch before it waits for a confirmation. Through a
/// proxy that lets no broker reply through until all of a batch's events
/// have been sent, a relay that waited for each event's confirmation before
/// sending the next would never see one, and the batch would never end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sends_a_whole_batch_before_it_awaits_a_confirmation() {
    use lapin::options::ConfirmSelectOptions;
    const EVENTS: usize = 20;
    let env = Env::new("relay_pipelined").await;
    let host = "oma-pipe";
    env.durable_queue(
        "all",
        topology::EVENTS_EXCHANGE,
        lapin::ExchangeKind::Topic,
        &["#"],
    )
    .await;

    // A batch of pending events, in the order they were committed.
    let mut ids = Vec::new();
    for _ in 0..EVENTS {
        let event_id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO outbox (event_id, request_id, host, routing_key, body)
             VALUES ($1, $2, $3, 'volume.attach.succeeded', '{}'::jsonb)",
        )
        .bind(event_id)
        .bind(Uuid::new_v4())
        .bind(host)
        .execute(&env.pool)
        .await
        .expect("insert event");
        ids.push(event_id.to_string());
    }

    let port = proxy_holding_replies(EVENTS).await;
    let through = volumed::config::SecretUrl::new(
        env.amqp_url
            .expose()
            .replace("127.0.0.1:5672", &format!("127.0.0.1:{port}")),
    );
    let conn = volumed::amqp::connect(&through, "relay-test")
        .await
        .expect("connect through the proxy");
    let relay_ch = conn.create_channel().await.expect("channel");
    relay_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let config = volumed::config::Config::load_with(None, &|k| match k {
        "VOLUMED_HOST_ID" => Some(host.to_string()),
        "VOLUMED_AMQP_URL" => Some(through.expose().to_string()),
        "VOLUMED_DATABASE_URL" => Some(env.db_url.expose().to_string()),
        _ => None,
    })
    .expect("config");
    let relaxed = volumed::db::connect_relaxed(&env.db_url, 2)
        .await
        .expect("relaxed pool");
    let relay = volumed::relay::Relay {
        config: std::sync::Arc::new(config),
        pool: env.pool.clone(),
        relaxed: relaxed.clone(),
    };
    let published = tokio::time::timeout(Duration::from_secs(20), relay.publish_pending(&relay_ch))
        .await
        .expect(
            "no confirmation came back: the relay waited for one before sending the whole batch",
        )
        .expect("publish");
    assert_eq!(published, EVENTS);
    let unsent: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE host = $1 AND sent_at IS NULL")
            .bind(host)
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(unsent, 0, "every event of the batch is marked sent");

    // All delivered, in the order they were committed.
    let seen: Vec<String> = env
        .drain_queue("all")
        .await
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(seen, ids);
    relaxed.close().await;
    let _ = conn.close(200, "done").await;
}

/// A grouped finish makes every kind of attachment change, as one
/// transaction: an attach whose device path was recorded for another
/// volume (the kernel recycled the name) takes it over, a detach removes
/// the attachment and its export, a withdrawal removes the export only, and
/// an attach whose export was undone keeps the attachment without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_finishes_makes_every_kind_of_attachment_change() {
    use volumed::contract::Op;
    use volumed::db::{self, AttachmentChange, ExportChange, NewExport};
    let env = Env::new("group_changes").await;
    let vm = Uuid::new_v4();
    let dev = |v: Uuid| format!("/dev/disk/by-id/virtio-{}", &v.simple().to_string()[..20]);
    let exported = |v: Uuid, path: &str| AttachmentChange::Upsert {
        volume_id: v,
        vm_id: vm,
        device_path: Some(path.to_string()),
        stable_path: Some(dev(v)),
        export: ExportChange::Set(NewExport {
            name: format!("vol-{v}"),
            engine: "nbdkit",
            port: 10809,
            metadata: json!({}),
        }),
    };
    let finish_with = |req: &volumed::contract::Request, change: AttachmentChange| {
        let mut f = journal_finish(req, None);
        f.change = change;
        f
    };
    // Four volumes attached and exported, one at a time.
    let (b, c, d, e) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    for (v, path) in [
        (b, "/dev/vdb"),
        (c, "/dev/vdc"),
        (d, "/dev/vdd"),
        (e, "/dev/vde"),
    ] {
        let req = journal_request(Op::Attach, v);
        db::start_operations(&env.pool, HOST, std::slice::from_ref(&req))
            .await
            .expect("start");
        assert!(
            db::finish_operation(&env.pool, &finish_with(&req, exported(v, path)))
                .await
                .expect("finish")
        );
    }

    // One group: a new volume on /dev/vdb (recorded for b), c detached, d's
    // export withdrawn, e's export undone.
    let a = Uuid::new_v4();
    let reqs = [
        journal_request(Op::Attach, a),
        journal_request(Op::Detach, c),
        journal_request(Op::Detach, d),
        journal_request(Op::Attach, e),
    ];
    db::start_operations(&env.pool, HOST, &reqs)
        .await
        .expect("grouped start");
    let changes = [
        exported(a, "/dev/vdb"),
        AttachmentChange::Remove { volume_id: c },
        AttachmentChange::RemoveExport { volume_id: d },
        AttachmentChange::Upsert {
            volume_id: e,
            vm_id: vm,
            device_path: Some("/dev/vde".into()),
            stable_path: Some(dev(e)),
            export: ExportChange::Remove,
        },
    ];
    let finishes: Vec<_> = reqs
        .iter()
        .zip(changes)
        .map(|(r, ch)| finish_with(r, ch))
        .collect();
    let answers = db::finish_operations(&env.pool, &finishes)
        .await
        .expect("grouped finish");
    assert_eq!(answers, vec![true; 4]);

    let attachments: HashMap<Uuid, Option<String>> =
        sqlx::query_as("SELECT volume_id, device_path FROM volume_attachments")
            .fetch_all(&env.pool)
            .await
            .expect("attachments")
            .into_iter()
            .collect();
    assert_eq!(attachments.get(&a), Some(&Some("/dev/vdb".to_string())));
    assert_eq!(
        attachments.get(&b),
        Some(&None),
        "the recycled device name is no longer b's"
    );
    assert!(!attachments.contains_key(&c), "c is detached");
    assert_eq!(attachments.get(&d), Some(&Some("/dev/vdd".to_string())));
    assert_eq!(attachments.get(&e), Some(&Some("/dev/vde".to_string())));
    let mut exports: Vec<Uuid> = sqlx::query_scalar("SELECT volume_id FROM nbd_exports")
        .fetch_all(&env.pool)
        .await
        .expect("exports");
    exports.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(exports, want, "only a and b are exported");
    let ids: Vec<Uuid> = reqs.iter().map(|r| r.request_id).collect();
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM outbox WHERE request_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&env.pool)
    .await
    .expect("xmin");
    assert_eq!(transactions, 1, "the group is one transaction");
}
