//! The message contract, version 1: requests in, completion events out.
//!
//! Decoding is deliberately manual (a `serde_json::Value` walked field by
//! field) rather than `#[derive(Deserialize)]`: every way a body can be wrong
//! must map to a specific error code and a message that names the field, and
//! the request id must be recoverable from a body that is otherwise broken so
//! that the sender still receives a `*.failed` event.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::trace::TraceParent;

/// The operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Attach,
    Detach,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Attach => "attach",
            Op::Detach => "detach",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        match s {
            "attach" => Some(Op::Attach),
            "detach" => Some(Op::Detach),
            _ => None,
        }
    }

    pub fn event_type(self, succeeded: bool) -> EventType {
        match (self, succeeded) {
            (Op::Attach, true) => EventType::AttachSucceeded,
            (Op::Attach, false) => EventType::AttachFailed,
            (Op::Detach, true) => EventType::DetachSucceeded,
            (Op::Detach, false) => EventType::DetachFailed,
        }
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub request_id: Uuid,
    pub op: Op,
    pub volume_id: Uuid,
    /// Required for attach; optional for detach (a guard: fail when the
    /// volume is attached to a different VM).
    pub vm_id: Option<Uuid>,
    /// Attach only: export the device over NBD (default true).
    pub export: bool,
    pub job_id: Option<String>,
    pub metadata: Value,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// Optional: past this instant the request fails with
    /// `deadline_exceeded` instead of being processed or retried.
    pub deadline: Option<DateTime<Utc>>,
    /// How many times volumed already retried this request (the
    /// `x-volumed-retries` header; 0 on first delivery and after a replay).
    pub retries: u32,
    /// The request's `traceparent` header when it carries a valid one; the
    /// consumer starts a new trace otherwise (see [`crate::trace`]).
    pub trace: Option<TraceParent>,
}

/// AMQP properties the decoder looks at.
#[derive(Debug, Clone, Default)]
pub struct Envelope<'a> {
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub retries: u32,
    /// The `traceparent` header, as text.
    pub traceparent: Option<&'a str>,
}

/// Error codes carried in failure events and dead-letter headers. The set is
/// small on purpose and documented in `docs/messages.md`; integrators branch
/// on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not UTF-8 JSON, or not a JSON object.
    MalformedBody,
    /// The body is larger than `VOLUMED_MAX_MESSAGE_BYTES`.
    MessageTooLarge,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type or an invalid value (e.g. a malformed UUID).
    InvalidField,
    /// `op` is neither `attach` nor `detach`.
    UnknownOp,
    /// The request id was already used for another operation or volume.
    DuplicateRequestId,
    /// The volume does not exist in the backend.
    VolumeNotFound,
    /// The volume is attached to another VM than the one named.
    VolumeAttachedElsewhere,
    /// The backend attached the volume but its block device did not appear
    /// in time.
    DeviceTimeout,
    /// The NBD export could not be made, verified or withdrawn.
    ExportFailed,
    /// Clients are still connected to the export being withdrawn; the
    /// export refuses new connections and the volume stays attached.
    ExportBusy,
    /// The device path or export name failed validation.
    InvalidExport,
    /// The backend failed in a way that may pass (I/O error, timeout).
    BackendUnavailable,
    /// The backend refused the operation for good.
    BackendRejected,
    /// The request's `deadline` passed before it could be completed.
    DeadlineExceeded,
    /// The operation stayed unfinished with no message left to finish it
    /// (found by the reconciler).
    Abandoned,
    /// A bug or an unexpected state in volumed itself.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedBody => "malformed_body",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::DuplicateRequestId => "duplicate_request_id",
            ErrorCode::VolumeNotFound => "volume_not_found",
            ErrorCode::VolumeAttachedElsewhere => "volume_attached_elsewhere",
            ErrorCode::DeviceTimeout => "device_timeout",
            ErrorCode::ExportFailed => "export_failed",
            ErrorCode::ExportBusy => "export_busy",
            ErrorCode::InvalidExport => "invalid_export",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::BackendRejected => "backend_rejected",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Abandoned => "abandoned",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether sending the same request again later may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::DeviceTimeout
                | ErrorCode::Abandoned
                | ErrorCode::BackendUnavailable
                | ErrorCode::ExportFailed
                | ErrorCode::ExportBusy
                | ErrorCode::Internal
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message was refused by the decoder, with whatever could be
/// recovered from it so that a `*.failed` event can still be addressed.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    pub request_id: Option<Uuid>,
    pub op: Option<Op>,
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<Uuid>,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            request_id: None,
            op: None,
            volume_id: None,
            vm_id: None,
        }
    }
}

/// Parses a hyphenated UUID (either case). The looser forms `uuid` also
/// accepts (braced, URN, no hyphens) are refused; ids leave volumed in the
/// canonical lower-case form, so consumers can compare them as strings.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

fn uuid_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<Uuid>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_uuid(s)
            .map(Some)
            .ok_or_else(|| format!("field `{name}` is not a UUID: {:?}", truncate(s, 80))),
        Some(other) => Err(format!(
            "field `{name}` must be a UUID string, got {}",
            json_kind(other)
        )),
    }
}

/// The location of the first string (or key) holding U+0000, if any.
fn find_nul(v: &Value, at: String) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(if at.is_empty() {
            "the body".into()
        } else {
            format!("field `{at}`")
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| find_nul(x, format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, x)| {
            let here = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            if k.contains('\0') {
                Some(format!("a key in `{here}`"))
            } else {
                find_nul(x, here)
            }
        }),
        _ => None,
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Decodes and validates one request body with its AMQP properties.
pub fn decode(body: &[u8], env: &Envelope<'_>, max_bytes: usize) -> Result<Request, Rejection> {
    // The message id is the first thing recovered: even a body that is not
    // JSON can then be answered by a failed event.
    let id_from_props = env.message_id.and_then(parse_uuid);
    let with_id = |mut r: Rejection| {
        r.request_id = r.request_id.or(id_from_props);
        r
    };
    if body.len() > max_bytes {
        return Err(with_id(Rejection::new(
            ErrorCode::MessageTooLarge,
            format!("body is {} bytes, the limit is {max_bytes}", body.len()),
        )));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        with_id(Rejection::new(
            ErrorCode::MalformedBody,
            format!("body is not valid JSON: {e}"),
        ))
    })?;
    if let Some(path) = find_nul(&value, String::new()) {
        // PostgreSQL cannot store U+0000 in text or jsonb: refuse it here
        // rather than fail at the journal and loop.
        return Err(with_id(Rejection::new(
            ErrorCode::InvalidField,
            format!("{path} contains the character U+0000"),
        )));
    }
    let Value::Object(obj) = value else {
        return Err(with_id(Rejection::new(
            ErrorCode::MalformedBody,
            format!("body must be a JSON object, got {}", json_kind(&value)),
        )));
    };

    // Recover what can be recovered before judging the rest, so a rejection
    // still names the request, volume and VM when they were readable.
    let body_id = uuid_field(&obj, "request_id");
    let op = obj.get("op").and_then(Value::as_str).and_then(Op::parse);
    let volume = uuid_field(&obj, "volume_id");
    let vm = uuid_field(&obj, "vm_id");
    let (seen_id, seen_volume, seen_vm) = (
        body_id.clone().ok().flatten().or(id_from_props),
        volume.clone().ok().flatten(),
        vm.clone().ok().flatten(),
    );
    let recovered = |mut r: Rejection| {
        r.request_id = seen_id;
        r.op = op;
        r.volume_id = seen_volume;
        r.vm_id = seen_vm;
        r
    };
    let fail = |code, msg: String| Err(recovered(Rejection::new(code, msg)));

    for (name, v) in [
        ("correlation_id", env.correlation_id),
        ("reply_to", env.reply_to),
    ] {
        if v.is_some_and(|v| v.contains('\0')) {
            return fail(
                ErrorCode::InvalidField,
                format!("the {name} property contains the character U+0000"),
            );
        }
    }
    if let Some(raw) = env.message_id {
        if id_from_props.is_none() {
            return fail(
                ErrorCode::InvalidField,
                format!("message_id property is not a UUID: {:?}", truncate(raw, 80)),
            );
        }
    }
    let request_id = match (body_id.clone(), id_from_props) {
        (Err(e), _) => return fail(ErrorCode::InvalidField, e),
        (Ok(Some(b)), Some(p)) if b != p => {
            return fail(
                ErrorCode::InvalidField,
                format!("request_id {b} differs from the message_id property {p}"),
            )
        }
        (Ok(Some(b)), _) => b,
        (Ok(None), Some(p)) => p,
        (Ok(None), None) => {
            return fail(
                ErrorCode::MissingField,
                "neither `request_id` nor the message_id property is present".into(),
            )
        }
    };

    let op = match obj.get("op") {
        None | Some(Value::Null) => {
            return fail(ErrorCode::MissingField, "field `op` is missing".into())
        }
        Some(Value::String(s)) => match Op::parse(s) {
            Some(op) => op,
            None => {
                return fail(
                    ErrorCode::UnknownOp,
                    format!(
                        "unknown op {:?}: expected \"attach\" or \"detach\"",
                        truncate(s, 40)
                    ),
                )
            }
        },
        Some(other) => {
            return fail(
                ErrorCode::InvalidField,
                format!("field `op` must be a string, got {}", json_kind(other)),
            )
        }
    };
    let volume_id = match volume {
        Err(e) => return fail(ErrorCode::InvalidField, e),
        Ok(None) => {
            return fail(
                ErrorCode::MissingField,
                "field `volume_id` is missing".into(),
            )
        }
        Ok(Some(v)) => v,
    };
    let vm_id = match vm {
        Err(e) => return fail(ErrorCode::InvalidField, e),
        Ok(None) if op == Op::Attach => {
            return fail(
                ErrorCode::MissingField,
                "field `vm_id` is required for attach".into(),
            )
        }
        Ok(v) => v,
    };
    let export = match obj.get("export") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return fail(
                ErrorCode::InvalidField,
                format!("field `export` must be a boolean, got {}", json_kind(other)),
            )
        }
    };
    let job_id = match obj.get("job_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 256 => Some(s.clone()),
        Some(Value::String(_)) => {
            return fail(
                ErrorCode::InvalidField,
                "field `job_id` is longer than 256 bytes".into(),
            )
        }
        Some(other) => {
            return fail(
                ErrorCode::InvalidField,
                format!("field `job_id` must be a string, got {}", json_kind(other)),
            )
        }
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(m @ Value::Object(_)) => m.clone(),
        Some(other) => {
            return fail(
                ErrorCode::InvalidField,
                format!(
                    "field `metadata` must be an object, got {}",
                    json_kind(other)
                ),
            )
        }
    };
    let deadline = match obj.get("deadline") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
            Ok(d) => Some(d.with_timezone(&Utc)),
            Err(e) => {
                return fail(
                    ErrorCode::InvalidField,
                    format!("field `deadline` is not an RFC 3339 time: {e}"),
                )
            }
        },
        Some(other) => {
            return fail(
                ErrorCode::InvalidField,
                format!(
                    "field `deadline` must be an RFC 3339 string, got {}",
                    json_kind(other)
                ),
            )
        }
    };
    Ok(Request {
        request_id,
        op,
        volume_id,
        vm_id,
        export,
        job_id,
        metadata,
        correlation_id: env.correlation_id.map(str::to_owned),
        reply_to: env.reply_to.filter(|s| !s.is_empty()).map(str::to_owned),
        deadline,
        retries: env.retries,
        trace: env.traceparent.and_then(TraceParent::parse),
    })
}

/// The completion event types; the routing key on `volumed.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "volume.attach.succeeded")]
    AttachSucceeded,
    #[serde(rename = "volume.attach.failed")]
    AttachFailed,
    #[serde(rename = "volume.detach.succeeded")]
    DetachSucceeded,
    #[serde(rename = "volume.detach.failed")]
    DetachFailed,
    /// The reconciler repaired a drift between volumed's records and the
    /// world (not the outcome of a request).
    #[serde(rename = "volume.reconciled")]
    Reconciled,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::AttachSucceeded => "volume.attach.succeeded",
            EventType::AttachFailed => "volume.attach.failed",
            EventType::DetachSucceeded => "volume.detach.succeeded",
            EventType::DetachFailed => "volume.detach.failed",
            EventType::Reconciled => "volume.reconciled",
        }
    }

    pub fn succeeded(self) -> bool {
        matches!(
            self,
            EventType::AttachSucceeded | EventType::DetachSucceeded
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The kernel's name for the device at the time of the attach
    /// (`/dev/vdc`); it can be recycled after a detach.
    pub path: String,
    /// The by-id link, which names this volume and nothing else.
    pub stable_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

/// A completion event as published on `volumed.events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub request_id: Uuid,
    pub host: String,
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<Uuid>,
    pub occurred_at: DateTime<Utc>,
    pub device: Option<DeviceInfo>,
    pub export: Option<ExportInfo>,
    pub error: Option<EventError>,
    pub attempts: i32,
    /// The device id the cloud assigned to the volume on its VM (a
    /// failover attach reports where the volume landed).
    #[serde(default)]
    pub cloud_device_id: Option<i64>,
    /// On `volume.reconciled` events: what was found and what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepairInfo {
    /// The kind of drift (see docs/reliability.md).
    pub kind: String,
    /// What the reconciler did about it.
    pub action: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2a43-5d7e-4b8a-9c0d-1e2f3a4b5c6d";
    const VOL: &str = "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3";

    fn env(id: Option<&str>) -> Envelope<'_> {
        Envelope {
            message_id: id,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_a_full_attach() {
        let body = format!(
            r#"{{"op":"attach","request_id":"{ID}","volume_id":"{VOL}","vm_id":"{VOL}","export":false,"job_id":"j-1","metadata":{{"k":1}},"extra":42}}"#
        );
        let r = decode(body.as_bytes(), &env(Some(ID)), 1024).expect("valid request");
        assert_eq!(r.op, Op::Attach);
        assert_eq!(r.request_id.to_string(), ID);
        assert!(!r.export);
        assert_eq!(r.job_id.as_deref(), Some("j-1"));
        assert_eq!(r.metadata["k"], 1);
    }

    #[test]
    fn request_id_may_come_from_message_id_alone() {
        let body = format!(r#"{{"op":"detach","volume_id":"{VOL}"}}"#);
        let r = decode(body.as_bytes(), &env(Some(ID)), 1024).expect("valid request");
        assert_eq!(r.request_id.to_string(), ID);
        assert_eq!(r.vm_id, None);
        assert!(r.export);
    }

    #[test]
    fn each_bad_input_has_its_code() {
        let cases: Vec<(String, Option<&str>, ErrorCode)> = vec![
            ("not json".into(), Some(ID), ErrorCode::MalformedBody),
            ("[1,2]".into(), Some(ID), ErrorCode::MalformedBody),
            (
                format!(r#"{{"op":"attach","volume_id":"{VOL}"}}"#),
                None,
                ErrorCode::MissingField,
            ),
            (
                format!(r#"{{"op":"attach","volume_id":"{VOL}"}}"#),
                Some(ID),
                ErrorCode::MissingField,
            ),
            (
                format!(r#"{{"op":"attach","volume_id":"nope","vm_id":"{VOL}"}}"#),
                Some(ID),
                ErrorCode::InvalidField,
            ),
            (
                format!(r#"{{"op":"resize","volume_id":"{VOL}"}}"#),
                Some(ID),
                ErrorCode::UnknownOp,
            ),
            (
                format!(r#"{{"op":7,"volume_id":"{VOL}"}}"#),
                Some(ID),
                ErrorCode::InvalidField,
            ),
            (
                format!(r#"{{"op":"detach","volume_id":"{VOL}","request_id":"{VOL}"}}"#),
                Some(ID),
                ErrorCode::InvalidField,
            ),
            (
                format!(r#"{{"op":"detach","volume_id":"{VOL}","metadata":{{"a":["x\u0000"]}}}}"#),
                Some(ID),
                ErrorCode::InvalidField,
            ),
            (
                format!(r#"{{"op":"detach","volume_id":"{VOL}","deadline":"tomorrow"}}"#),
                Some(ID),
                ErrorCode::InvalidField,
            ),
            (
                format!(r#"{{"op":"detach","volume_id":"{VOL}","export":"yes"}}"#),
                Some(ID),
                ErrorCode::InvalidField,
            ),
            (
                format!(r#"{{"op":"detach","volume_id":"{{{VOL}}}"}}"#),
                Some(ID),
                ErrorCode::InvalidField,
            ),
        ];
        for (body, id, code) in cases {
            let err = decode(body.as_bytes(), &env(id), 4096).expect_err(&body);
            assert_eq!(err.code, code, "{body}: {}", err.message);
        }
    }

    #[test]
    fn nul_in_a_property_is_refused() {
        let body = format!(r#"{{"op":"detach","volume_id":"{VOL}"}}"#);
        let env = Envelope {
            message_id: Some(ID),
            correlation_id: Some("a\0b"),
            reply_to: None,
            retries: 0,
            traceparent: None,
        };
        let err = decode(body.as_bytes(), &env, 4096).expect_err("NUL refused");
        assert_eq!(err.code, ErrorCode::InvalidField);
    }

    #[test]
    fn rejection_recovers_ids() {
        let body = format!(r#"{{"op":"attach","request_id":"{ID}","volume_id":"{VOL}"}}"#);
        let err = decode(body.as_bytes(), &env(None), 4096).expect_err("vm_id missing");
        assert_eq!(err.code, ErrorCode::MissingField);
        assert_eq!(err.request_id.map(|u| u.to_string()).as_deref(), Some(ID));
        assert_eq!(err.op, Some(Op::Attach));
        assert_eq!(err.volume_id.map(|u| u.to_string()).as_deref(), Some(VOL));
    }

    #[test]
    fn oversize_body_is_refused_before_parsing() {
        let body = vec![b' '; 2000];
        let err = decode(&body, &env(Some(ID)), 1000).expect_err("too large");
        assert_eq!(err.code, ErrorCode::MessageTooLarge);
        assert_eq!(err.request_id.map(|u| u.to_string()).as_deref(), Some(ID));
    }

    #[test]
    fn event_serialises_with_contract_names() {
        let ev = Event {
            event_id: Uuid::nil(),
            event_type: EventType::DetachFailed,
            request_id: Uuid::nil(),
            host: "oma-1".into(),
            volume_id: None,
            vm_id: None,
            occurred_at: Utc::now(),
            device: None,
            export: None,
            error: Some(EventError {
                code: ErrorCode::VolumeAttachedElsewhere,
                message: "m".into(),
                retryable: false,
            }),
            attempts: 1,
            cloud_device_id: None,
            repair: None,
        };
        let v = serde_json::to_value(&ev).expect("serialisable");
        assert_eq!(v["type"], "volume.detach.failed");
        assert_eq!(v["error"]["code"], "volume_attached_elsewhere");
        let back: Event = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, ev);
    }
}
