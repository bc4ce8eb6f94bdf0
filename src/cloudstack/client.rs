//! The CloudStack API client: signed requests (signature version 3 with an
//! expiry), response decoding, and asynchronous job polling with backoff up
//! to a deadline. Errors are classified for the worker: permanent, transient
//! or a configuration problem (credentials).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::debug;
use uuid::Uuid;

use super::sign;
use crate::config::CloudStackConfig;

/// How long a signed request stays valid (`expires`).
const SIGNATURE_LIFETIME: chrono::Duration = chrono::Duration::minutes(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum CsError {
    /// 401: the key pair is wrong or the signature does not verify.
    #[error("CloudStack refused volumed's credentials (401): {0}")]
    Auth(String),
    #[error("CloudStack error {code}: {text}")]
    Api { code: u16, text: String },
    #[error("cannot reach CloudStack: {0}")]
    Transport(String),
    #[error("unexpected answer from CloudStack: {0}")]
    Decode(String),
    #[error("job {job} failed with {code}: {text}")]
    JobFailed {
        job: String,
        code: u16,
        text: String,
    },
    #[error("job {job} did not finish within {waited:?}")]
    JobTimeout { job: String, waited: Duration },
}

/// What the worker does about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The same request will fail again: give up.
    Permanent,
    /// May pass: try again later.
    Transient,
    /// volumed is misconfigured: stop consuming.
    Config,
}

impl CsError {
    pub fn class(&self) -> ErrorClass {
        match self {
            CsError::Auth(_) => ErrorClass::Config,
            CsError::Api { code, text } | CsError::JobFailed { code, text, .. } => {
                classify(*code, text)
            }
            CsError::Transport(_) | CsError::JobTimeout { .. } => ErrorClass::Transient,
            CsError::Decode(_) => ErrorClass::Transient,
        }
    }
}

/// CloudStack's error codes. Permanent: 431 parameter error, 432
/// unsupported action, 531 account error, 532 account resource limit, 537
/// network rule conflict, and validation messages reported under any code.
/// Transient: 436 API rate limit, 530 internal error, 533 insufficient
/// capacity, 534 resource unavailable, 535 resource allocation, 536 resource
/// in use, and anything unknown.
fn classify(code: u16, text: &str) -> ErrorClass {
    let t = text.to_ascii_lowercase();
    let validation = [
        "invalid parameter",
        "unable to find",
        "does not exist",
        "please specify",
    ];
    match code {
        401 => ErrorClass::Config,
        431 | 432 | 531 | 532 | 537 => ErrorClass::Permanent,
        _ if validation.iter().any(|v| t.contains(v)) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// A volume as `listVolumes` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsVolume {
    pub id: Uuid,
    pub vm: Option<Uuid>,
    pub device_id: Option<i64>,
    pub state: String,
}

/// An asynchronous job's state.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Pending,
    Succeeded(Value),
    Failed { code: u16, text: String },
}

pub struct Client {
    http: reqwest::Client,
    cfg: CloudStackConfig,
    /// How long jobs have typically taken, in ms (0 until one finished).
    typical_job_ms: AtomicU64,
}

impl Client {
    pub fn new(cfg: &CloudStackConfig) -> Result<Client, CsError> {
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .danger_accept_invalid_certs(!cfg.tls_verify);
        if let Some(pem) = &cfg.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                CsError::Transport(format!(
                    "VOLUMED_CLOUDSTACK_CA_FILE: not PEM certificates: {e}"
                ))
            })?;
            if certs.is_empty() {
                return Err(CsError::Transport(
                    "VOLUMED_CLOUDSTACK_CA_FILE holds no certificate".into(),
                ));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| CsError::Transport(e.to_string()))?;
        Ok(Client {
            http,
            cfg: cfg.clone(),
            typical_job_ms: AtomicU64::new(0),
        })
    }

    /// Sends a read-only command, retrying transient failures (4 tries,
    /// 100 ms doubling): a read can be repeated without effect, and a short
    /// burst of 530s should not fail an operation.
    async fn read(&self, command: &str, args: &[(&str, String)]) -> Result<Value, CsError> {
        let mut delay = Duration::from_millis(100);
        let mut tries = 1;
        loop {
            match self.call(command, args).await {
                Err(e) if e.class() == ErrorClass::Transient && tries < 4 => {
                    debug!(command, cause = %e, tries, "transient CloudStack error; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Sends one signed API command and returns its response object (the
    /// value under `<command>response`).
    pub async fn call(&self, command: &str, args: &[(&str, String)]) -> Result<Value, CsError> {
        let expires = (chrono::Utc::now() + SIGNATURE_LIFETIME)
            .format("%Y-%m-%dT%H:%M:%S+0000")
            .to_string();
        let mut params: Vec<(String, String)> = vec![
            ("command".into(), command.into()),
            ("apiKey".into(), self.cfg.api_key.clone()),
            ("response".into(), "json".into()),
            ("signatureversion".into(), "3".into()),
            ("expires".into(), expires),
        ];
        params.extend(args.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let query = sign::signed_query(&params, self.cfg.secret_key.expose());
        let url = format!("{}?{query}", self.cfg.url);
        debug!(command, "CloudStack call");
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            // reqwest's error may carry the URL, which carries the
            // signature (not the secret); keep only the cause.
            .map_err(|e| CsError::Transport(without_url(&e)))?;
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| CsError::Decode(format!("{command}: {}", without_url(&e))))?;
        let key = format!("{}response", command.to_ascii_lowercase());
        let inner = body
            .get(&key)
            .or_else(|| body.get("errorresponse"))
            .cloned()
            .unwrap_or(Value::Null);
        let code = inner
            .get("errorcode")
            .and_then(Value::as_u64)
            .map(|c| c as u16)
            .or((status != 200).then_some(status));
        if let Some(code) = code {
            let text = inner
                .get("errortext")
                .and_then(Value::as_str)
                .unwrap_or("(no error text)")
                .to_owned();
            return Err(if code == 401 {
                CsError::Auth(text)
            } else {
                CsError::Api { code, text }
            });
        }
        if inner.is_null() {
            return Err(CsError::Decode(format!(
                "{command}: no `{key}` in the answer"
            )));
        }
        Ok(inner)
    }

    pub async fn volume(&self, id: Uuid) -> Result<Option<CsVolume>, CsError> {
        let r = self
            .read(
                "listVolumes",
                &[("id", id.to_string()), ("listall", "true".into())],
            )
            .await;
        let r = match r {
            Ok(r) => r,
            // CloudStack answers an unknown id with a parameter error.
            Err(CsError::Api { code: 431, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(list) = r.get("volume").and_then(Value::as_array) else {
            return Ok(None);
        };
        list.iter()
            .find(|v| v.get("id").and_then(Value::as_str) == Some(id.to_string().as_str()))
            .map(parse_volume)
            .transpose()
    }

    /// The volumes attached to a VM.
    pub async fn volumes_on(&self, vm: Uuid) -> Result<Vec<CsVolume>, CsError> {
        let r = self
            .read(
                "listVolumes",
                &[
                    ("virtualmachineid", vm.to_string()),
                    ("listall", "true".into()),
                ],
            )
            .await?;
        let Some(list) = r.get("volume").and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        // The VM's root disk is the VM's own, never one volumed attached.
        list.iter()
            .filter(|v| v.get("type").and_then(Value::as_str) != Some("ROOT"))
            .map(parse_volume)
            .filter(|v| v.as_ref().map(|v| v.vm == Some(vm)).unwrap_or(true))
            .collect()
    }

    pub async fn vm_exists(&self, id: Uuid) -> Result<bool, CsError> {
        let r = match self
            .read(
                "listVirtualMachines",
                &[("id", id.to_string()), ("listall", "true".into())],
            )
            .await
        {
            Ok(r) => r,
            // CloudStack answers an unknown id with a parameter error.
            Err(CsError::Api { code: 431, .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(r.get("virtualmachine")
            .and_then(Value::as_array)
            .is_some_and(|l| !l.is_empty()))
    }

    pub async fn attach(&self, volume: Uuid, vm: Uuid) -> Result<String, CsError> {
        let r = self
            .call(
                "attachVolume",
                &[
                    ("id", volume.to_string()),
                    ("virtualmachineid", vm.to_string()),
                ],
            )
            .await?;
        job_id(&r)
    }

    pub async fn detach(&self, volume: Uuid) -> Result<String, CsError> {
        let r = self
            .call("detachVolume", &[("id", volume.to_string())])
            .await?;
        job_id(&r)
    }

    pub async fn job(&self, job: &str) -> Result<Job, CsError> {
        let r = self
            .read("queryAsyncJobResult", &[("jobid", job.to_owned())])
            .await?;
        match r.get("jobstatus").and_then(Value::as_i64) {
            Some(0) => Ok(Job::Pending),
            Some(1) => Ok(Job::Succeeded(
                r.get("jobresult").cloned().unwrap_or(Value::Null),
            )),
            Some(2) => {
                let res = r.get("jobresult").cloned().unwrap_or(Value::Null);
                Ok(Job::Failed {
                    code: res
                        .get("errorcode")
                        .and_then(Value::as_u64)
                        .or_else(|| r.get("jobresultcode").and_then(Value::as_u64))
                        .unwrap_or(530) as u16,
                    text: res
                        .get("errortext")
                        .and_then(Value::as_str)
                        .unwrap_or("job failed")
                        .to_owned(),
                })
            }
            other => Err(CsError::Decode(format!("job {job}: jobstatus {other:?}"))),
        }
    }

    /// Polls a job until it finishes or the job timeout passes; a
    /// transient error while polling is retried until the deadline (the job
    /// keeps running either way).
    pub async fn wait(&self, job: &str) -> Result<Value, CsError> {
        let started = Instant::now();
        let deadline = started + self.cfg.job_timeout;
        // The first look comes shortly before jobs have typically taken,
        // then looks come 50 ms apart until a quarter past the typical
        // time, then growing by half each time up to 5 s: a job that takes
        // its usual time is noticed within 50 ms (on one VM, jobs run one
        // after another, so each delay adds to the whole wave) without
        // polling CloudStack all the time.
        let typical = Duration::from_millis(self.typical_job_ms.load(Ordering::Relaxed));
        let close = typical.mul_f64(1.25);
        let mut delay = typical.mul_f64(0.95).max(Duration::from_millis(250));
        loop {
            let now = Instant::now();
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(now))).await;
            match self.job(job).await {
                Ok(Job::Succeeded(v)) => {
                    self.learn(started.elapsed());
                    return Ok(v);
                }
                Ok(Job::Failed { code, text }) => {
                    return Err(CsError::JobFailed {
                        job: job.to_owned(),
                        code,
                        text,
                    })
                }
                Ok(Job::Pending) => {}
                Err(e) if e.class() == ErrorClass::Transient => {
                    debug!(job, cause = %e, "polling the job failed; will poll again");
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(CsError::JobTimeout {
                    job: job.to_owned(),
                    waited: self.cfg.job_timeout,
                });
            }
            delay = if started.elapsed() < close {
                Duration::from_millis(50)
            } else {
                delay
                    .mul_f64(1.5)
                    .clamp(Duration::from_millis(100), Duration::from_secs(5))
            };
        }
    }

    /// Folds a finished job's duration into the typical one (a moving
    /// average weighted 1/8 to the newest).
    fn learn(&self, took: Duration) {
        let took = took.as_millis().min(u128::from(u32::MAX)) as u64;
        let _ = self
            .typical_job_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { took } else { (old * 7 + took) / 8 })
            });
    }
}

/// The error with its causes, without the request URL (which carries the
/// signature and the API key).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.without_url_ref().to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let mut e = self.to_string();
        if let Some(i) = e.find(" for url (") {
            e.truncate(i);
        }
        e
    }
}

fn job_id(r: &Value) -> Result<String, CsError> {
    r.get("jobid")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| CsError::Decode(format!("no job id in {r}")))
}

fn parse_volume(v: &Value) -> Result<CsVolume, CsError> {
    let uuid = |k: &str| -> Result<Option<Uuid>, CsError> {
        match v.get(k).and_then(Value::as_str) {
            None => Ok(None),
            Some(s) => Uuid::try_parse(s)
                .map(Some)
                .map_err(|_| CsError::Decode(format!("volume field {k} is not a UUID: {s:?}"))),
        }
    };
    Ok(CsVolume {
        id: uuid("id")?.ok_or_else(|| CsError::Decode("volume without id".into()))?,
        vm: uuid("virtualmachineid")?,
        device_id: v.get("deviceid").and_then(Value::as_i64),
        state: v
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes() {
        assert_eq!(classify(431, "bad"), ErrorClass::Permanent);
        assert_eq!(classify(432, "no such api"), ErrorClass::Permanent);
        assert_eq!(classify(530, "internal error"), ErrorClass::Transient);
        assert_eq!(
            classify(533, "insufficient capacity"),
            ErrorClass::Transient
        );
        assert_eq!(classify(534, "resource unavailable"), ErrorClass::Transient);
        assert_eq!(classify(536, "resource in use"), ErrorClass::Transient);
        for code in [531, 532, 537] {
            assert_eq!(classify(code, "refused"), ErrorClass::Permanent, "{code}");
        }
        assert_eq!(
            classify(530, "Unable to find volume"),
            ErrorClass::Permanent
        );
        assert_eq!(CsError::Auth("x".into()).class(), ErrorClass::Config);
        assert_eq!(
            CsError::Transport("x".into()).class(),
            ErrorClass::Transient
        );
    }
}
