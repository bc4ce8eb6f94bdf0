//! Operability and integration: metrics, the read-only JSON views, trace
//! propagation and the client library, against a real daemon, RabbitMQ and
//! PostgreSQL.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{scrape, Env, WAIT};
use uuid::Uuid;
use volumed::client::{ClientError, EventFilter, Outgoing};
use volumed::contract::{Event, EventType};
use volumed::trace::TraceParent;

const HOST: &str = "oma-o";

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_operations() {
    let env = Env::new("metrics").await;
    let _d = env.start(HOST, &[]);
    let port = env.http_port(HOST);
    let before = scrape(port).await;
    let ok = "volumed_requests_total{op=attach,outcome=succeeded}";
    assert_eq!(get(&before, ok), 0.0);

    let client = env.client().await;
    let vol = env.create_volume(HOST);
    attach_ok(&env, &client, vol, "attach event").await;
    // A request the decoder refuses: counted, and dead-lettered.
    let bad = Uuid::new_v4();
    let body = serde_json::json!({"op": "resize", "request_id": bad, "volume_id": vol});
    client
        .publish_raw(HOST, body.to_string().as_bytes(), Some(bad), None)
        .await
        .expect("published");

    let start = Instant::now();
    let after = loop {
        let m = scrape(port).await;
        if get(&m, "volumed_dead_letters_total{reason=unknown_op}") >= 1.0
            && get(&m, "volumed_events_published_total{}") >= 1.0
        {
            break m;
        }
        assert!(start.elapsed() < WAIT, "counters never moved: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(get(&after, ok), 1.0);
    assert_eq!(
        get(&after, "volumed_requests_total{op=unknown,outcome=refused}"),
        1.0
    );
    assert_eq!(
        get(
            &after,
            "volumed_operation_duration_seconds{op=attach,outcome=succeeded}"
        ),
        1.0,
        "one attach observed"
    );
    assert!(
        get(
            &after,
            "volumed_operation_step_duration_seconds{op=attach,step=export_live}"
        ) >= 1.0,
        "{after:?}"
    );
    assert_eq!(get(&after, "volumed_operations_in_flight{}"), 0.0);
    assert_eq!(get(&after, "volumed_exports_live{engine=nbdkit}"), 1.0);
    assert_eq!(get(&after, "volumed_outbox_backlog{}"), 0.0);
    assert!(after.contains_key("volumed_outbox_oldest_age_seconds{}"));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_views_show_operations_exports_and_volumes_and_change_nothing() {
    let env = Env::new("views").await;
    let _d = env.start(HOST, &[]);
    let port = env.http_port(HOST);
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, true);
    let id = req.request_id;
    let ev = client.request_and_wait(req, WAIT).await.expect("event");
    assert_eq!(ev.event_type, EventType::AttachSucceeded);

    let (status, body) = common::http_get(port, &format!("/api/v1/operations/{id}")).await;
    assert_eq!(status, 200, "{body}");
    let op: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(op["state"], "succeeded");
    assert_eq!(op["op"], "attach");
    assert_eq!(op["volume_id"], vol.to_string());
    assert_eq!(op["event"]["type"], "volume.attach.succeeded");
    assert_eq!(op["event"]["event_id"], ev.event_id.to_string());

    let (status, body) = common::http_get(port, "/api/v1/exports").await;
    assert_eq!(status, 200, "{body}");
    let exports: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let list = exports["exports"].as_array().expect("a list");
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(list[0]["volume_id"], vol.to_string());

    let (status, body) = common::http_get(port, &format!("/api/v1/volumes/{vol}")).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["attached"], true);
    assert_eq!(v["attachment"]["vm_id"], env.appliance.to_string());
    assert!(v["export"]["export_name"].is_string(), "{body}");
    assert_eq!(v["operations"][0]["request_id"], id.to_string());

    let unknown = Uuid::new_v4();
    assert_eq!(
        common::http_get(port, &format!("/api/v1/operations/{unknown}"))
            .await
            .0,
        404
    );
    assert_eq!(
        common::http_get(port, &format!("/api/v1/volumes/{unknown}"))
            .await
            .0,
        404
    );
    let (status, body) = common::http_get(port, "/api/v1/volumes/not-a-uuid").await;
    assert_eq!(status, 400);
    assert!(body.contains("must be a UUID"), "{body}");

    // Nothing on the endpoint changes state: other methods are refused.
    let http = reqwest::Client::new();
    for path in ["/api/v1/exports", &format!("/api/v1/volumes/{vol}")] {
        let r = http
            .delete(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), 405, "{path}");
    }
    let (status, body) = common::http_get(port, &format!("/api/v1/volumes/{vol}")).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"attached\":true"), "{body}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_traceparent_comes_back_on_its_event() {
    let env = Env::new("trace").await;
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let mut events = client
        .subscribe_filtered(EventFilter::types("volume.#").host(HOST))
        .await
        .expect("subscribed");

    let parent =
        TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("ok");
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, false).with_trace(&parent);
    let id = req.request_id;
    let got = client
        .request_and_receive(req, WAIT)
        .await
        .expect("event on the reply queue");
    let trace = got.trace.expect("the event carries a traceparent");
    assert_eq!(trace.trace_id, parent.trace_id, "same trace");
    assert_ne!(
        trace.parent_id, parent.parent_id,
        "the operation is its own span"
    );
    // The copy on the event exchange carries it too.
    let published = events.wait_received(id, WAIT).await.expect("event");
    assert_eq!(published.trace.map(|t| t.trace_id), Some(parent.trace_id));

    // The daemon's log lines about the operation carry the trace id.
    let needle = parent.trace_id_hex();
    assert!(
        _d.log()
            .iter()
            .any(|l| l.contains(&needle) && l.contains(&vol.to_string())),
        "no log line with trace id {needle}"
    );

    // Without one (or with garbage), the request starts its own trace.
    let mut req = Outgoing::detach(HOST, vol, None);
    req.traceparent = Some("00-not-a-trace".into());
    let got = client.request_and_receive(req, WAIT).await.expect("event");
    assert_eq!(got.event.event_type, EventType::DetachSucceeded);
    let fresh = got.trace.expect("a new trace");
    assert_ne!(fresh.trace_id, parent.trace_id);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_attaches_and_waits_and_filters_events() {
    let env = Env::new("client").await;
    let _d = env.start(HOST, &[]);
    let client = env.client().await;
    let (a, b) = (env.create_volume(HOST), env.create_volume(HOST));
    let mut only_b = client
        .subscribe_filtered(EventFilter::default().volume(b))
        .await
        .expect("subscribed");

    let ev = client
        .attach_and_wait(HOST, a, env.appliance, false, WAIT)
        .await
        .expect("attach a");
    assert_eq!(ev.event_type, EventType::AttachSucceeded);
    assert_eq!(ev.volume_id, Some(a));
    let ev = client
        .attach_and_wait(HOST, b, env.appliance, false, WAIT)
        .await
        .expect("attach b");
    let seen = only_b
        .next(WAIT)
        .await
        .expect("subscription")
        .expect("an event");
    assert_eq!(
        seen.request_id, ev.request_id,
        "the event of a was filtered out"
    );
    let ev = client
        .detach_and_wait(HOST, a, Some(env.appliance), WAIT)
        .await
        .expect("detach a");
    assert_eq!(ev.event_type, EventType::DetachSucceeded);
    assert!(
        only_b
            .next(Duration::from_millis(500))
            .await
            .expect("subscription")
            .is_none(),
        "no event about b"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_times_out_cleanly_when_no_daemon_runs() {
    let env = Env::new("client_none").await;
    // The host's queue exists (a daemon ran once) but no daemon runs now.
    let mut d = env.start(HOST, &[]);
    d.sigterm();
    assert!(d.wait_exit(WAIT).success());
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let req = Outgoing::attach(HOST, vol, env.appliance, false);
    let id = req.request_id;
    let started = Instant::now();
    match client.request_and_wait(req, Duration::from_secs(2)).await {
        Err(ClientError::Timeout { request_id, waited }) => {
            assert_eq!(request_id, id);
            assert_eq!(waited, Duration::from_secs(2));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // The request waits in the queue for the next daemon.
    assert_eq!(
        env.queue_depth(&format!("volumed.requests.{HOST}")).await,
        1
    );

    // A host no daemon was ever set up for: refused at once, by name.
    match client
        .attach_and_wait("nobody", vol, env.appliance, false, WAIT)
        .await
    {
        Err(ClientError::NoQueue { host }) => assert_eq!(host, "nobody"),
        other => panic!("expected NoQueue, got {other:?}"),
    }
    // The same when the request goes out in a batch.
    let batch = [Outgoing::attach("nobody", vol, env.appliance, false)];
    match client.publish_many(&batch, |_| {}).await {
        Err(ClientError::NoQueue { host }) => assert_eq!(host, "nobody"),
        other => panic!("expected NoQueue from a batch, got {other:?}"),
    }
    // The client still works after both.
    client
        .subscribe("#")
        .await
        .expect("the connection survived");
    client.close().await;
}

/// The next datagram on a fake systemd notification socket.
async fn next_notification(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// How many consumers the broker has on the daemon's request queue.
async fn request_consumers(env: &Env) -> u32 {
    env.queue(&volumed::topology::request_queue(HOST))
        .await
        .consumer_count()
}

/// Attaches `vol` to the appliance, exported, and checks that it succeeded.
async fn attach_ok(env: &Env, client: &volumed::client::Client, vol: Uuid, what: &str) -> Event {
    let ev = client
        .attach_and_wait(HOST, vol, env.appliance, true, WAIT)
        .await
        .expect(what);
    assert_eq!(ev.event_type, EventType::AttachSucceeded, "{what}");
    ev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_when_consuming_reloading_and_stopping() {
    let env = Env::new("notify").await;
    let path = env.dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&path).expect("bind the notification socket");
    let mut d = env.spawn(HOST, &[("NOTIFY_SOCKET", path.to_str().expect("utf-8"))]);

    assert_eq!(next_notification(&sock).await, "READY=1");
    assert!(
        request_consumers(&env).await >= 1,
        "READY=1 before the request consumer was registered"
    );

    d.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = next_notification(&sock).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next_notification(&sock).await, "READY=1");
    // Still serving after the reload.
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    attach_ok(&env, &client, vol, "attach event after a reload").await;
    client.close().await;

    d.sigterm();
    assert_eq!(next_notification(&sock).await, "STOPPING=1");
    assert!(d.wait_exit(WAIT).success(), "{}", d.log().join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_log_filter_and_survives_a_bad_configuration() {
    let env = Env::new("reload").await;
    let file = env.dir.path().join("volumed.toml");
    std::fs::write(&file, "log = \"info,lapin=warn,sqlx=warn\"\n").expect("write config");
    // The environment overrides the file, so the filter must come from the
    // file alone for a reload to change it.
    let d = env.start(
        HOST,
        &[
            ("VOLUMED_CONFIG", file.to_str().expect("utf-8")),
            ("VOLUMED_LOG", ""),
        ],
    );
    let client = env.client().await;
    attach_ok(&env, &client, env.create_volume(HOST), "attach event").await;
    assert!(
        !d.log().iter().any(|l| l.contains("DEBUG")),
        "debug lines with an info filter"
    );

    // A reloadable change and one that needs a restart.
    std::fs::write(
        &file,
        "log = \"info,volumed=debug\"\nprefetch_per_worker = 3\n",
    )
    .expect("write config");
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_log("configuration reloaded", WAIT);
    let log = d.log().join("\n");
    assert!(
        log.contains("not applied") && log.contains("VOLUMED_PREFETCH_PER_WORKER"),
        "{log}"
    );
    attach_ok(&env, &client, env.create_volume(HOST), "attach event").await;
    d.wait_log("DEBUG", WAIT);

    // An invalid filter: refused as a whole, the daemon keeps serving.
    std::fs::write(&file, "log = \"volumed=loud\"\n").expect("write config");
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_log("configuration rejected", WAIT);
    attach_ok(
        &env,
        &client,
        env.create_volume(HOST),
        "attach event after a rejected reload",
    )
    .await;
    client.close().await;
}

/// The `operation` span of a JSON log line, if the line was logged inside
/// one (tracing-subscriber lists the enclosing spans under `spans`).
fn operation_span(line: &serde_json::Value) -> Option<&serde_json::Value> {
    line.get("spans")?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(serde_json::Value::as_str) == Some("operation"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_operation_fields_and_text_is_the_default() {
    let env = Env::new("jsonlog").await;
    let d = env.start(HOST, &[("VOLUMED_LOG_FORMAT", "json")]);
    let client = env.client().await;
    let vol = env.create_volume(HOST);
    let ev = attach_ok(&env, &client, vol, "attach event").await;
    let id = ev.request_id.to_string();
    let vol_id = vol.to_string();

    // The event is published from the outbox after the operation's last
    // line; wait for that line rather than assume it was read already.
    d.wait_log(&format!("\"request.id\":\"{id}\""), WAIT);
    let log = d.log();
    let mut in_operation = 0;
    for line in &log {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nlog:\n{}", log.join("\n")));
        assert!(v.is_object(), "not a JSON object: {line}");
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        let Some(span) = operation_span(&v) else {
            continue;
        };
        if span.get("request.id").and_then(serde_json::Value::as_str) != Some(id.as_str()) {
            continue;
        }
        in_operation += 1;
        assert_eq!(
            span.get("volume.id").and_then(serde_json::Value::as_str),
            Some(vol_id.as_str()),
            "{line}"
        );
        assert_eq!(
            span.get("host").and_then(serde_json::Value::as_str),
            Some(HOST),
            "{line}"
        );
    }
    assert!(
        in_operation >= 1,
        "no line inside the attach's operation span:\n{}",
        log.join("\n")
    );
    client.close().await;
    drop(d);

    // Without the setting the same daemon logs text.
    let d = env.start(HOST, &[]);
    let log = d.log();
    assert!(!log.is_empty());
    for line in &log {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_err(),
            "a JSON line by default: {line}"
        );
    }
    assert!(
        log.iter().any(|l| l.contains("consuming requests")),
        "{}",
        log.join("\n")
    );
}
