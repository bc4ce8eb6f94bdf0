//! The published contracts (`docs/schemas/*.json`, referenced by
//! `docs/asyncapi.yaml`) against the code: the examples validate, the
//! decoder and the schemas agree on what a request is, the events a real
//! daemon publishes validate, and a schema-invalid request is dead-lettered.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Env, WAIT};
use serde_json::{json, Value};
use uuid::Uuid;
use volumed::client::Outgoing;
use volumed::contract::{self, Envelope, Event, EventType};

const HOST: &str = "oma-c";

fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas")
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Resolves `https://volumed.invalid/schemas/<name>` to `docs/schemas/<name>`,
/// so the schemas are checked exactly as published, offline.
struct LocalSchemas;

impl jsonschema::Retrieve for LocalSchemas {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let s = uri.as_str();
        let name = s
            .strip_prefix("https://volumed.invalid/schemas/")
            .ok_or_else(|| format!("unexpected reference {s}"))?;
        Ok(read_json(&schema_dir().join(name)))
    }
}

/// Every schema in the folder, compiled, by file stem.
fn validators() -> HashMap<String, jsonschema::Validator> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(schema_dir()).expect("docs/schemas") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let schema = read_json(&path);
        let v = jsonschema::options()
            .with_retriever(LocalSchemas)
            .should_validate_formats(true)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{}: not a valid schema: {e}", path.display()));
        let stem = path.file_stem().and_then(|s| s.to_str()).expect("name");
        out.insert(stem.to_owned(), v);
    }
    for needed in ["request", "attach-request", "detach-request", "event"] {
        assert!(
            out.contains_key(needed),
            "docs/schemas/{needed}.json missing"
        );
    }
    out
}

fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Decodes a request body as the consumer would, with the request id also
/// in `message_id` (as a well-behaved publisher sends it).
fn decode(body: &Value) -> Result<contract::Request, contract::Rejection> {
    let id = body
        .get("request_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let env = Envelope {
        message_id: id.as_deref(),
        ..Default::default()
    };
    contract::decode(body.to_string().as_bytes(), &env, 64 * 1024)
}

/// `<schema>.<case>.json` files of a folder, with the schema name.
fn examples(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .expect("examples folder")
        .filter_map(|e| {
            let p = e.ok()?.path();
            let name = p.file_name()?.to_str()?.to_owned();
            if !name.ends_with(".json") {
                return None;
            }
            Some((name.split('.').next()?.to_owned(), p))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn published_examples_validate_and_invalid_ones_are_refused_by_schema_and_decoder() {
    let v = validators();
    let valid = examples(&schema_dir().join("examples"));
    assert!(valid.len() >= 10, "too few examples: {valid:?}");
    for (schema, path) in &valid {
        let instance = read_json(path);
        let validator = v
            .get(schema)
            .unwrap_or_else(|| panic!("no schema {schema}"));
        let errs = errors(validator, &instance);
        assert!(errs.is_empty(), "{}: {errs:?}", path.display());
        if schema.ends_with("request") {
            // Also valid under the umbrella schema, and accepted by the code.
            assert!(v["request"].is_valid(&instance), "{}", path.display());
            if let Err(r) = decode(&instance) {
                panic!("{}: the decoder refuses it: {r:?}", path.display());
            }
        } else if schema == "event" {
            serde_json::from_value::<Event>(instance)
                .unwrap_or_else(|e| panic!("{}: not an Event: {e}", path.display()));
        }
    }
    let invalid = examples(&schema_dir().join("examples/invalid"));
    assert!(invalid.len() >= 5, "too few invalid examples");
    for (schema, path) in &invalid {
        let instance = read_json(path);
        assert!(
            !v[schema.as_str()].is_valid(&instance),
            "{}: the schema accepts it",
            path.display()
        );
        if schema.ends_with("request") {
            assert!(
                !v["request"].is_valid(&instance),
                "{}: request.json accepts it",
                path.display()
            );
            assert!(
                decode(&instance).is_err(),
                "{}: the decoder accepts it",
                path.display()
            );
        } else if schema == "event" {
            assert!(
                serde_json::from_value::<Event>(instance).is_err(),
                "{}: the Event type reads it",
                path.display()
            );
        }
    }
}

/// Variations of valid requests: each field removed, and each field set to
/// values of every JSON type and a few near-misses. The decoder and
/// `request.json` must agree on every one.
#[test]
fn the_decoder_and_the_request_schema_agree() {
    let v = validators();
    let request = &v["request"];
    let base_attach = json!({
        "op": "attach",
        "request_id": "6f1c2a43-5d7e-4b8a-9c0d-1e2f3a4b5c6d",
        "volume_id": "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3",
        "vm_id": "00000000-0000-4000-8000-0000000000a1",
        "export": false,
        "job_id": "job-1",
        "metadata": {"k": "v"},
        "deadline": "2030-01-01T00:00:00Z"
    });
    let mut base_detach = base_attach.clone();
    base_detach["op"] = json!("detach");
    let long = "x".repeat(300);
    let candidates = [
        json!(null),
        json!(true),
        json!(0),
        json!(1.5),
        json!(""),
        json!("x"),
        json!(long),
        json!([]),
        json!({}),
        json!("attach"),
        json!("detach"),
        json!("5c0e2d94-7a31-4f08-b6e2-93d1c4a7f015"),
        json!("5C0E2D94-7A31-4F08-B6E2-93D1C4A7F015"),
        json!("5c0e2d947a314f08b6e293d1c4a7f015"),
        json!("2030-01-01T00:00:00+02:00"),
        json!("2030-01-01 00:00:00"),
        json!({"nested": {"deep": [1, 2, 3]}}),
    ];
    let mut checked = 0;
    let mut disagreements = Vec::new();
    for base in [&base_attach, &base_detach] {
        let fields: Vec<String> = base.as_object().expect("object").keys().cloned().collect();
        let mut variants = vec![base.clone()];
        for f in &fields {
            let mut without = base.clone();
            without.as_object_mut().expect("object").remove(f);
            variants.push(without);
            for c in &candidates {
                let mut changed = base.clone();
                changed[f.as_str()] = c.clone();
                variants.push(changed);
            }
        }
        for body in variants {
            // The request id also travels as message_id; keep them equal so
            // only the body is under test.
            if body.get("request_id").and_then(Value::as_str).is_none() {
                continue;
            }
            let by_schema = request.is_valid(&body);
            let by_decoder = decode(&body).is_ok();
            checked += 1;
            if by_schema != by_decoder {
                disagreements.push(format!("schema {by_schema}, decoder {by_decoder}: {body}"));
            }
        }
    }
    assert!(checked > 200, "{checked}");
    assert!(
        disagreements.is_empty(),
        "{} of {checked} disagree:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_real_daemon_publishes_validate_and_schema_invalid_requests_are_dead_lettered() {
    let v = validators();
    let env = Env::new("contracts").await;
    let _d = env.start(HOST, &[]);
    env.durable_event_queue("contract-events").await;
    let client = env.client().await;

    // Succeeded and failed events of both operations.
    let vol = env.create_volume(HOST);
    let mut ids = Vec::new();
    for req in [
        Outgoing::attach(HOST, vol, env.appliance, true),
        Outgoing::detach(HOST, vol, None),
        Outgoing::attach(HOST, Uuid::new_v4(), env.appliance, false),
        Outgoing::detach(HOST, vol, Some(Uuid::new_v4())),
    ] {
        ids.push(req.request_id);
        client.request_and_wait(req, WAIT).await.expect("event");
    }

    // Every invalid request example is published as it is; each must be
    // refused and dead-lettered, with a failed event when it names its
    // request.
    let invalid: Vec<(String, PathBuf)> = examples(&schema_dir().join("examples/invalid"))
        .into_iter()
        .filter(|(s, _)| s.ends_with("request"))
        .collect();
    for (_, path) in &invalid {
        // Each message gets its own request id (the examples share one),
        // so each is a dead letter of its own.
        let id = Uuid::new_v4();
        let body = std::fs::read_to_string(path)
            .expect("example")
            .replace("6f1c2a43-5d7e-4b8a-9c0d-1e2f3a4b5c6d", &id.to_string());
        client
            .publish_raw(HOST, body.as_bytes(), Some(id), None)
            .await
            .expect("published");
    }
    env.wait_count("SELECT count(*) FROM dead_letters", invalid.len() as i64)
        .await;
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM dead_letters")
        .fetch_all(&env.pool)
        .await
        .expect("dead letters");
    for r in &reasons {
        assert!(
            [
                "malformed_body",
                "missing_field",
                "invalid_field",
                "unknown_op",
                "message_too_large"
            ]
            .contains(&r.as_str()),
            "{r}"
        );
    }
    env.wait_count("SELECT count(*) FROM outbox WHERE sent_at IS NULL", 0)
        .await;

    let msgs = env.drain_queue("contract-events").await;
    let mut types = std::collections::HashSet::new();
    for m in &msgs {
        let body: Value = serde_json::from_slice(&m.delivery.data).expect("JSON event");
        let errs = errors(&v["event"], &body);
        assert!(errs.is_empty(), "{body}: {errs:?}");
        types.insert(body["type"].as_str().expect("type").to_owned());
    }
    for t in [
        EventType::AttachSucceeded,
        EventType::AttachFailed,
        EventType::DetachSucceeded,
        EventType::DetachFailed,
    ] {
        assert!(
            types.contains(t.as_str()),
            "no {} event among {types:?}",
            t.as_str()
        );
    }
    assert!(msgs.len() >= ids.len(), "{} events", msgs.len());
    tokio::time::sleep(Duration::from_millis(10)).await;
    client.close().await;
}
