//! One operation, start to finish: journal it, do the backend work, find the
//! device, and commit the outcome with its event. The worker never touches
//! the broker; it returns a [`Settle`] decision that the consumer carries out
//! after the commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tracing::{debug, error, info, instrument, warn, Span};
use uuid::Uuid;

use crate::backend::{Backend, BackendError, Started, VolumeState};
use crate::contract::{DeviceInfo, ErrorCode, Event, EventError, ExportInfo, Op, Request};
use crate::db::{self, AttachmentChange, ExportChange, Finish, NewExport, Outgoing, Start};
use crate::device;
use crate::failpoint;
use crate::gate::Gate;
use crate::group::Group;
use crate::nbd::manager::{ExportError, Exports};
use crate::nbd::{ExportName, ExportSpec};

/// What to do with the message once the worker is done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The outcome is committed (or was already): acknowledge.
    Ack,
    /// Nothing was committed and the cause may pass: give the message back.
    /// The broker counts the redelivery, so a message that never commits is
    /// dead-lettered at the delivery limit instead of looping.
    Requeue,
    /// The message can never be processed, or its retry budget is spent:
    /// dead-letter it with the reason (never requeue: it would fail the
    /// same way forever).
    DeadLetter {
        reason: String,
        code: ErrorCode,
        message: String,
    },
    /// A transient failure within the retry budget: park the message in the
    /// retry queue of `step` for `delay`, then it comes back. The worker is
    /// free meanwhile.
    Retry {
        step: Duration,
        delay: Duration,
        code: ErrorCode,
        message: String,
    },
}

/// How transient failures are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub attempts: u32,
    /// Delay steps, shortest first.
    pub delays: Vec<Duration>,
}

impl RetryPolicy {
    /// The step and the delay before retry number `retries + 1`: the step
    /// grows exponentially (by configuration) and the delay is the step
    /// shortened by up to 20 % at random, so retries of a burst spread out
    /// while no message waits longer than its step.
    pub fn delay(&self, retries: u32) -> (Duration, Duration) {
        let i = (retries as usize).min(self.delays.len().saturating_sub(1));
        let step = self
            .delays
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(1));
        let factor = 0.8 + 0.2 * rand::random::<f64>();
        (step, step.mul_f64(factor))
    }
}

/// The result of the backend part of an operation.
struct Outcome {
    result: Result<Option<DeviceInfo>, (ErrorCode, String)>,
    change: AttachmentChange,
    /// The VM the event names (for a detach: where it was attached).
    vm_id: Option<Uuid>,
    /// The export the event names.
    export: Option<ExportInfo>,
    /// The device id the cloud assigned.
    cloud_device_id: Option<i64>,
    /// Set when the backend refused volumed's configuration: nothing is
    /// committed, consumption stops and the message goes back.
    halt: Option<String>,
}

impl Outcome {
    fn failed(code: ErrorCode, msg: impl Into<String>, vm_id: Option<Uuid>) -> Self {
        Outcome {
            result: Err((code, msg.into())),
            change: AttachmentChange::None,
            vm_id,
            export: None,
            cloud_device_id: None,
            halt: None,
        }
    }

    fn backend(e: BackendError, vm_id: Option<Uuid>) -> Self {
        let mut o = Outcome::failed(e.code(), e.to_string(), vm_id);
        if let BackendError::Config(msg) = e {
            o.halt = Some(msg);
        }
        o
    }

    fn done(change: AttachmentChange, vm_id: Option<Uuid>) -> Self {
        Outcome {
            result: Ok(None),
            change,
            vm_id,
            export: None,
            cloud_device_id: None,
            halt: None,
        }
    }
}

pub struct Worker {
    pub host: String,
    pub appliance_vm: Uuid,
    pub backend: Arc<dyn Backend>,
    pub pool: PgPool,
    /// Journals starts and finishes, grouped across workers.
    pub journal: Journal,
    pub device_dir: PathBuf,
    pub device_timeout: Duration,
    pub exports: Arc<Exports>,
    pub gate: Arc<Gate>,
    pub vm_locks: VmLocks,
    pub retry: RetryPolicy,
    pub steps: Steps,
}

/// The two statements every operation runs, its journal start and its
/// finish, grouped across the workers ([`Group`]): under a burst, one
/// statement starts (or finishes) every operation that is waiting for it,
/// so the round trips and the commits do not grow with the number of
/// operations in flight. A group's statement is all or nothing; when it
/// fails, its operations are run one by one, so each learns its own
/// outcome and one bad row cannot fail the others.
pub struct Journal {
    starts: Group<Request, Result<Start, sqlx::Error>>,
    finishes: Group<Finish, Result<bool, sqlx::Error>>,
    /// For a call whose group is gone (the runtime is stopping).
    host: String,
    pool: PgPool,
    relaxed: PgPool,
}

/// The most operations one grouped statement carries.
const GROUP_MAX: usize = 64;

impl Journal {
    /// Starts are written through `relaxed`: a start lost in a crash of
    /// PostgreSQL costs nothing, since its message is not acknowledged and
    /// comes back (see `db::connect_relaxed`). Finishes go through `pool`
    /// and wait for the disk. `lanes` statements of each kind may run at
    /// once.
    pub fn start(host: &str, pool: PgPool, relaxed: PgPool, lanes: usize) -> Journal {
        let starts = {
            let (pool, host) = (relaxed.clone(), host.to_string());
            Group::start(lanes, GROUP_MAX, move |reqs: Vec<Request>| {
                let (pool, host) = (pool.clone(), host.clone());
                async move {
                    all_or_each(
                        &reqs,
                        "start",
                        |r| r.request_id,
                        db::start_operations(&pool, &host, &reqs),
                        |r| db::start_operation(&pool, &host, r),
                    )
                    .await
                }
            })
        };
        let finishes = {
            let pool = pool.clone();
            Group::start(lanes, GROUP_MAX, move |fs: Vec<Finish>| {
                let pool = pool.clone();
                async move {
                    all_or_each(
                        &fs,
                        "finish",
                        |f| f.request_id,
                        db::finish_operations(&pool, &fs),
                        |f| db::finish_operation(&pool, f),
                    )
                    .await
                }
            })
        };
        Journal {
            starts,
            finishes,
            host: host.to_string(),
            pool,
            relaxed,
        }
    }

    /// [`db::start_operation`], grouped.
    pub async fn begin(&self, req: &Request) -> Result<Start, sqlx::Error> {
        match self.starts.call(req.clone()).await {
            Some(r) => r,
            None => db::start_operation(&self.relaxed, &self.host, req).await,
        }
    }

    /// [`db::finish_operation`], grouped.
    pub async fn finish(&self, f: &Finish) -> Result<bool, sqlx::Error> {
        match self.finishes.call(f.clone()).await {
            Some(r) => r,
            None => db::finish_operation(&self.pool, f).await,
        }
    }
}

/// The answers of a group: `all` (one statement for the whole group), or,
/// when that fails for a group of several, `each` run for every call, so
/// that each caller learns its own outcome.
async fn all_or_each<'a, T, O, Each, EachFut>(
    items: &'a [T],
    kind: &str,
    request_id: impl Fn(&T) -> Uuid,
    all: impl std::future::Future<Output = Result<Vec<O>, sqlx::Error>>,
    each: Each,
) -> Vec<Result<O, sqlx::Error>>
where
    Each: Fn(&'a T) -> EachFut,
    EachFut: std::future::Future<Output = Result<O, sqlx::Error>>,
{
    match all.await {
        Ok(outs) => outs.into_iter().map(Ok).collect(),
        Err(e) if items.len() == 1 => vec![Err(e)],
        Err(e) => {
            let ids: Vec<String> = items.iter().map(|t| request_id(t).to_string()).collect();
            warn!(statement = kind, request.ids = ?ids, cause = %e,
                  "a grouped journal statement failed; running its operations one by one");
            futures_util::future::join_all(items.iter().map(each)).await
        }
    }
}

/// The step each operation reached, written in batches: one statement for
/// every step recorded in a 100 ms window, instead of a commit per step;
/// an operation that finishes within the window has its steps dropped
/// (its journal row says `committed` by then). The
/// steps are for operators and post-mortems; a redelivered request
/// re-verifies the world rather than trusting them, so the last few may be
/// lost in a crash. A step arriving after its operation finished is
/// ignored.
pub struct Steps {
    tx: tokio::sync::mpsc::UnboundedSender<(Uuid, &'static str)>,
}

/// See [`Steps`]: long enough that a quick operation costs no step write,
/// short enough that an operator watching a slow one sees it move.
const STEP_WINDOW: Duration = Duration::from_millis(100);

impl Steps {
    pub fn start(pool: PgPool) -> Steps {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Uuid, &'static str)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                tokio::time::sleep(STEP_WINDOW).await;
                let mut latest: std::collections::HashMap<Uuid, &'static str> =
                    std::collections::HashMap::new();
                latest.insert(first.0, first.1);
                while let Ok((id, step)) = rx.try_recv() {
                    latest.insert(id, step);
                }
                let (ids, steps): (Vec<Uuid>, Vec<&str>) = latest.into_iter().unzip();
                match db::record_steps(&pool, &ids, &steps).await {
                    Ok(()) => {}
                    // The daemon is stopping: its operations are finished
                    // or come back, so these steps tell nobody anything.
                    Err(sqlx::Error::PoolClosed) => {
                        debug!(count = ids.len(), "steps left unrecorded at shutdown")
                    }
                    Err(e) => {
                        warn!(count = ids.len(), cause = %e, "cannot record the steps reached")
                    }
                }
            }
        });
        Steps { tx }
    }

    pub fn record(&self, request_id: Uuid, step: &'static str) {
        // The writer lives as long as the daemon; a send after it stopped
        // has nothing left to inform.
        let _ = self.tx.send((request_id, step));
    }
}

/// One async lock per VM. CloudStack numbers a VM's disks itself, and two
/// attaches to one VM at once collide on the device id, so attach and detach
/// jobs of one VM run one at a time (different VMs in parallel). The lock is
/// held across the cloud call and the job wait: that is its purpose. One
/// entry per VM ever seen is kept; a wave touches tens to hundreds of VMs.
#[derive(Default)]
pub struct VmLocks {
    map: std::sync::Mutex<std::collections::HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl VmLocks {
    pub async fn lock(&self, vm: Uuid) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            // Held only to clone the entry; nothing is awaited under it.
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(vm).or_default())
        };
        m.lock_owned().await
    }
}

impl Worker {
    /// Runs one request and commits its outcome.
    #[instrument(name = "operation", skip_all, fields(
        request.id = %req.request_id, volume.id = %req.volume_id, host = %self.host,
        op = req.op.as_str(), vm.id = ?req.vm_id, attempt = tracing::field::Empty,
    ))]
    pub async fn handle(&self, req: &Request) -> Settle {
        let metrics = crate::metrics::get();
        let started = std::time::Instant::now();
        let op = req.op.as_str();
        metrics.begin(req.request_id, op);
        let (settle, outcome) = self.run(req).await;
        metrics.end(req.request_id, started, op, outcome);
        if let Settle::Retry { code, .. } = &settle {
            metrics
                .retries
                .with_label_values(&[op, code.as_str()])
                .inc();
        }
        settle
    }

    /// [`Worker::handle`] without the metrics: the settle, and the outcome
    /// label it counts under.
    async fn run(&self, req: &Request) -> (Settle, &'static str) {
        let start = db_retry("journal start", || self.journal.begin(req)).await;
        let (attempts, resumed) = match start {
            Ok(Start::Run {
                attempts,
                cloud_job,
            }) => (attempts, cloud_job),
            Ok(Start::Done { state }) => {
                info!(
                    state,
                    "request already finished; acknowledging the redelivery"
                );
                return (Settle::Ack, "duplicate");
            }
            Ok(Start::Conflict { existing }) => {
                let message = format!(
                    "request id {} was already used for {existing}; a request id names one request",
                    req.request_id
                );
                warn!(error.code = %ErrorCode::DuplicateRequestId, error.message = %message,
                      "refused a request");
                return (
                    Settle::DeadLetter {
                        reason: ErrorCode::DuplicateRequestId.as_str().into(),
                        code: ErrorCode::DuplicateRequestId,
                        message,
                    },
                    "refused",
                );
            }
            Err(e) => {
                error!(cause = %e, "cannot journal the request; giving it back to the broker");
                return (Settle::Requeue, "requeued");
            }
        };
        Span::current().record("attempt", attempts);

        let outcome = match req.deadline {
            Some(d) if Utc::now() > d => Outcome::failed(
                ErrorCode::DeadlineExceeded,
                format!(
                    "the request's deadline {} passed before it was processed",
                    d.to_rfc3339()
                ),
                req.vm_id,
            ),
            _ => match req.op {
                Op::Attach => self.attach(req, resumed).await,
                Op::Detach => self.detach(req, resumed).await,
            },
        };
        if let Some(reason) = &outcome.halt {
            error!(cause = %reason,
                   "the backend refuses volumed's configuration; stopping consumption until it accepts it");
            self.gate.close(reason.clone()).await;
            return (Settle::Requeue, "requeued");
        }
        let mut outcome = outcome;
        let mut exhausted = None;
        if let Err((code, message)) = &outcome.result {
            if code.retryable() {
                let (step, delay) = self.retry.delay(req.retries);
                let attempt = req.retries + 1;
                let late = req.deadline.is_some_and(|d| {
                    Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default() > d
                });
                if late {
                    outcome.result = Err((
                        ErrorCode::DeadlineExceeded,
                        format!(
                            "the request's deadline leaves no time to retry; last error: {message}"
                        ),
                    ));
                } else if attempt < self.retry.attempts {
                    info!(attempt, retry_in = ?delay, error.code = %code, error.message = %message,
                          "transient failure; the request will be retried");
                    if let Err(e) = db_retry("journal retry", || {
                        db::record_retry(&self.pool, req.request_id, *code, message)
                    })
                    .await
                    {
                        warn!(cause = %e, "cannot journal the retry");
                    }
                    return (
                        Settle::Retry {
                            step,
                            delay,
                            code: *code,
                            message: message.clone(),
                        },
                        "retried",
                    );
                } else {
                    exhausted = Some((*code, message.clone()));
                }
            }
        }
        failpoint::hit("before_commit").await;
        let (settle, label) = self.commit(req, attempts, outcome).await;
        failpoint::hit("after_commit").await;
        match (settle, exhausted) {
            (Settle::Ack, Some((code, message))) => {
                warn!(
                    attempts = self.retry.attempts,
                    "retry budget spent; dead-lettering the request"
                );
                (
                    Settle::DeadLetter {
                        reason: "retries_exhausted".into(),
                        code,
                        message,
                    },
                    label,
                )
            }
            (settle, _) => (settle, label),
        }
    }

    async fn attach(&self, req: &Request, resumed: Option<String>) -> Outcome {
        // The decoder guarantees a VM for attach; keep the worker total.
        let Some(vm) = req.vm_id else {
            return Outcome::failed(ErrorCode::MissingField, "attach needs vm_id", None);
        };
        let vol = req.volume_id;
        let is_done = |s: &VolumeState| s.attached_to == Some(vm);
        let state = if let Some(job) = resumed {
            // An earlier attempt started a job and died: wait for that job
            // rather than start a second attach.
            info!(job, "resuming the backend job of an earlier attempt");
            match self
                .change(req.request_id, vol, vm, Some(job), is_done, || async {
                    Ok(Started::Done)
                })
                .await
            {
                Ok(s) => s,
                Err(e) => return Outcome::backend(e, Some(vm)),
            }
        } else {
            let state = match self.backend.volume(vol).await {
                Ok(s) => s,
                Err(e) => return Outcome::backend(e, Some(vm)),
            };
            match state.attached_to {
                Some(current) if current == vm => {
                    info!("volume already attached to this VM; no backend call");
                    state
                }
                Some(other) => {
                    return Outcome::failed(
                        ErrorCode::VolumeAttachedElsewhere,
                        format!("volume {vol} is attached to VM {other}"),
                        Some(vm),
                    );
                }
                None => {
                    let started = self
                        .change(req.request_id, vol, vm, None, is_done, || {
                            self.backend.start_attach(vol, vm)
                        })
                        .await;
                    match started {
                        Ok(s) => {
                            self.step(req.request_id, "backend_attached").await;
                            s
                        }
                        Err(e) => return Outcome::backend(e, Some(vm)),
                    }
                }
            }
        };
        let cloud_device_id = state.device_id;
        let attached =
            |device: Option<&DeviceInfo>, export: ExportChange| AttachmentChange::Upsert {
                volume_id: vol,
                vm_id: vm,
                device_path: device.map(|d| d.path.clone()),
                stable_path: device.map(|d| d.stable_path.clone()),
                export,
            };
        if vm != self.appliance_vm {
            // Failover: the device appears in another VM, not here.
            let mut o = Outcome::done(attached(None, ExportChange::Keep), Some(vm));
            o.cloud_device_id = cloud_device_id;
            return o;
        }
        let link = device::link_for(&self.device_dir, vol);
        let Some(dev) = device::wait_for_device(&link, self.device_timeout).await else {
            return Outcome {
                result: Err((
                    ErrorCode::DeviceTimeout,
                    format!(
                        "the backend attached the volume but {} did not appear within {:?}",
                        link.display(),
                        self.device_timeout
                    ),
                )),
                // The backend did attach it: record that, without a device,
                // so the database keeps agreeing with the backend.
                change: attached(None, ExportChange::Keep),
                vm_id: Some(vm),
                export: None,
                cloud_device_id: None,
                halt: None,
            };
        };
        self.step(req.request_id, "device_found").await;
        failpoint::hit("after_device_found").await;
        if !req.export {
            return Outcome {
                change: attached(Some(&dev), ExportChange::Keep),
                result: Ok(Some(dev)),
                vm_id: Some(vm),
                export: None,
                cloud_device_id,
                halt: None,
            };
        }
        // From here a failure leaves the volume attached with its device
        // recorded, and no export (the manager undid what it wrote).
        let failed = |code: ErrorCode, msg: String, dev: &DeviceInfo| Outcome {
            result: Err((code, msg)),
            change: attached(Some(dev), ExportChange::Remove),
            vm_id: Some(vm),
            export: None,
            cloud_device_id,
            halt: None,
        };
        let spec = match ExportSpec::new(vol, Path::new(&dev.stable_path), &self.device_dir) {
            Ok(spec) => spec,
            Err(e) => return failed(ErrorCode::InvalidExport, e.to_string(), &dev),
        };
        let name = spec.name.to_string();
        let (written_tx, written_rx) = tokio::sync::oneshot::channel();
        let noted = async {
            // Sent once the export is in the configuration, before the
            // reload and the live check.
            if written_rx.await.is_ok() {
                self.step(req.request_id, "export_written").await;
                failpoint::hit("after_export_written").await;
            }
        };
        let (added, ()) = tokio::join!(self.exports.add_noting_write(spec, written_tx), noted);
        if let Err(e) = added {
            let code = match e {
                ExportError::Invalid(_) => ErrorCode::InvalidExport,
                _ => ErrorCode::ExportFailed,
            };
            return failed(code, e.to_string(), &dev);
        }
        self.step(req.request_id, "export_live").await;
        failpoint::hit("after_export_live").await;
        let export = NewExport {
            name: name.clone(),
            engine: self.exports.kind.as_str(),
            port: self.exports.port,
            metadata: serde_json::json!({"job_id": req.job_id, "request": req.metadata}),
        };
        Outcome {
            change: attached(Some(&dev), ExportChange::Set(export)),
            result: Ok(Some(dev)),
            vm_id: Some(vm),
            export: Some(ExportInfo {
                name,
                port: self.exports.port,
            }),
            cloud_device_id,
            halt: None,
        }
    }

    async fn detach(&self, req: &Request, resumed: Option<String>) -> Outcome {
        let vol = req.volume_id;
        if let Some(job) = resumed {
            return self.resume_detach(req, job).await;
        }
        let state = match self.backend.volume(vol).await {
            Ok(s) => s,
            Err(e) => return Outcome::backend(e, req.vm_id),
        };
        let Some(current) = state.attached_to else {
            info!("volume is not attached; nothing to detach");
            return Outcome {
                result: Ok(None),
                change: AttachmentChange::Remove { volume_id: vol },
                vm_id: req.vm_id,
                export: None,
                cloud_device_id: None,
                halt: None,
            };
        };
        if let Some(wanted) = req.vm_id {
            if wanted != current {
                return Outcome::failed(
                    ErrorCode::VolumeAttachedElsewhere,
                    format!("volume {vol} is attached to VM {current}, not to VM {wanted}"),
                    Some(wanted),
                );
            }
        }
        if current == self.appliance_vm {
            // The export goes first: new connections are refused before
            // the device disappears, and clients still connected are given
            // time to leave.
            let link = device::link_for(&self.device_dir, vol);
            let device = std::fs::canonicalize(&link).ok();
            if let Err(e) = self.exports.withdraw(ExportName::for_volume(vol)).await {
                return Outcome::failed(ErrorCode::ExportFailed, e.to_string(), Some(current));
            }
            self.step(req.request_id, "export_withdrawn").await;
            if let Some(device) = device {
                if let Err(e) = self.exports.wait_released(&device).await {
                    // The export is gone from the server; the database says
                    // so too, while the attachment stays.
                    return Outcome {
                        result: Err((ErrorCode::ExportBusy, e.to_string())),
                        change: AttachmentChange::RemoveExport { volume_id: vol },
                        vm_id: Some(current),
                        export: None,
                        cloud_device_id: None,
                        halt: None,
                    };
                }
            }
        }
        let detached = self
            .change(
                req.request_id,
                vol,
                current,
                None,
                |s| s.attached_to.is_none(),
                || self.backend.start_detach(vol, current),
            )
            .await;
        if let Err(e) = detached {
            return Outcome::backend(e, Some(current));
        }
        self.detached(req, current).await
    }

    /// Waits for the detach job an earlier attempt started.
    async fn resume_detach(&self, req: &Request, job: String) -> Outcome {
        let vol = req.volume_id;
        info!(job, "resuming the backend job of an earlier attempt");
        // The job was started after the export was withdrawn. The VM it
        // detaches from is the one the volume is still on while the job
        // runs; once it is done, the request's VM (or the appliance) only
        // names the event.
        let vm = match self.backend.volume(vol).await {
            Ok(state) => state.attached_to.or(req.vm_id).unwrap_or(self.appliance_vm),
            Err(e) => return Outcome::backend(e, req.vm_id),
        };
        let r = self
            .change(
                req.request_id,
                vol,
                vm,
                Some(job),
                |s| s.attached_to.is_none(),
                || async { Ok(Started::Done) },
            )
            .await;
        if let Err(e) = r {
            return Outcome::backend(e, Some(vm));
        }
        self.detached(req, vm).await
    }

    /// After the backend detached the volume from `current`.
    async fn detached(&self, req: &Request, current: Uuid) -> Outcome {
        let vol = req.volume_id;
        self.step(req.request_id, "backend_detached").await;
        if current == self.appliance_vm {
            let link = device::link_for(&self.device_dir, vol);
            if !device::wait_gone(&link, self.device_timeout).await {
                // The backend did detach it: the attachment row goes, so
                // the database keeps agreeing with the backend.
                return Outcome {
                    result: Err((
                        ErrorCode::DeviceTimeout,
                        format!(
                            "the backend detached the volume but {} is still present after {:?}",
                            link.display(),
                            self.device_timeout
                        ),
                    )),
                    change: AttachmentChange::Remove { volume_id: vol },
                    vm_id: Some(current),
                    export: None,
                    cloud_device_id: None,
                    halt: None,
                };
            }
        }
        Outcome {
            result: Ok(None),
            change: AttachmentChange::Remove { volume_id: vol },
            vm_id: Some(current),
            export: None,
            cloud_device_id: None,
            halt: None,
        }
    }

    /// Makes one backend change under the VM's lock: starts it (or resumes
    /// the job an earlier attempt started), journals its job id before
    /// waiting, waits, and returns the volume's state afterwards. A job
    /// that failed or timed out is judged by re-reading the volume: CloudStack
    /// can report failure for a change that happened anyway.
    async fn change<F, Fut>(
        &self,
        request_id: Uuid,
        vol: Uuid,
        vm: Uuid,
        resumed: Option<String>,
        is_done: impl Fn(&VolumeState) -> bool,
        start: F,
    ) -> Result<VolumeState, BackendError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Started, BackendError>>,
    {
        let _vm = self.vm_locks.lock(vm).await;
        let job = match resumed {
            Some(job) => Some(job),
            None => {
                failpoint::hit("before_backend").await;
                let started = match start().await {
                    Ok(s) => s,
                    Err(e @ BackendError::Transient(_)) => {
                        // The call may have been applied before the error
                        // (a timeout, a 530 after the fact): look.
                        let state = self.backend.volume(vol).await?;
                        if is_done(&state) {
                            warn!(cause = %e, "the backend call failed, but it took effect");
                            return Ok(state);
                        }
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                };
                match started {
                    Started::Done => None,
                    Started::Job(job) => {
                        if let Err(e) = db_retry("journal job", || {
                            db::record_cloud_job(&self.pool, request_id, &job)
                        })
                        .await
                        {
                            warn!(job, cause = %e, "cannot journal the backend job id");
                        }
                        failpoint::hit("after_job_recorded").await;
                        Some(job)
                    }
                }
            }
        };
        if let Some(job) = job {
            if let Err(e) = self.backend.wait_job(&job).await {
                if matches!(e, BackendError::Config(_)) {
                    return Err(e);
                }
                let state = self.backend.volume(vol).await?;
                if is_done(&state) {
                    warn!(job, cause = %e, "the backend reported the job failed, but it took effect");
                    return Ok(state);
                }
                return Err(e);
            }
        }
        let state = self.backend.volume(vol).await?;
        if !is_done(&state) {
            return Err(BackendError::Transient(format!(
                "the backend finished the change but volume {vol} is not in the expected state"
            )));
        }
        Ok(state)
    }

    /// Records a step; failing to record it is logged, not fatal: the step
    /// column is for operators and for resuming, and the next write of the
    /// row corrects it.
    async fn step(&self, request_id: Uuid, step: &'static str) {
        crate::metrics::get().step(request_id, step);
        self.steps.record(request_id, step);
    }

    /// Commits the outcome; the label says what was committed (`succeeded`,
    /// `failed`, or `requeued` when nothing could be).
    async fn commit(
        &self,
        req: &Request,
        attempts: i32,
        outcome: Outcome,
    ) -> (Settle, &'static str) {
        let label = if outcome.result.is_ok() {
            "succeeded"
        } else {
            "failed"
        };
        let event_type = req.op.event_type(outcome.result.is_ok());
        let (device, error) = match &outcome.result {
            Ok(dev) => (dev.clone(), None),
            Err((code, msg)) => {
                warn!(error.code = %code, error.message = %msg, "operation failed");
                (
                    None,
                    Some(EventError {
                        code: *code,
                        message: msg.clone(),
                        retryable: code.retryable(),
                    }),
                )
            }
        };
        let event = Event {
            event_id: Uuid::new_v4(),
            event_type,
            request_id: req.request_id,
            host: self.host.clone(),
            volume_id: Some(req.volume_id),
            vm_id: outcome.vm_id,
            occurred_at: Utc::now(),
            device,
            export: outcome.export.clone(),
            error: error.clone(),
            attempts,
            cloud_device_id: outcome.cloud_device_id,
            repair: None,
        };
        let finish = Finish {
            host: self.host.clone(),
            request_id: req.request_id,
            op: Some(req.op),
            volume_id: Some(req.volume_id),
            vm_id: outcome.vm_id,
            error: error.map(|e| (e.code, e.message)),
            change: outcome.change,
            outgoing: Outgoing {
                event,
                correlation_id: req.correlation_id.clone(),
                reply_to: req.reply_to.clone(),
                traceparent: req.trace.map(|t| t.child().to_string()),
            },
        };
        match db_retry("journal finish", || self.journal.finish(&finish)).await {
            Ok(true) => {
                info!(event.type = event_type.as_str(), "operation committed");
                (Settle::Ack, label)
            }
            Ok(false) => {
                info!("another delivery of this request committed first");
                (Settle::Ack, "duplicate")
            }
            Err(e) => {
                // A statement that fails for a reason other than the
                // connection (a constraint, say) will fail the same way
                // again: record the failure without the state change, so
                // the request still ends in exactly one event.
                error!(cause = %e, "cannot commit the outcome; recording it as failed");
                let mut failed = finish.clone();
                let msg = format!("volumed could not record the outcome: {e}");
                failed.error = Some((ErrorCode::Internal, msg.clone()));
                failed.change = AttachmentChange::None;
                failed.outgoing.event.event_type = req.op.event_type(false);
                failed.outgoing.event.device = None;
                failed.outgoing.event.error = Some(EventError {
                    code: ErrorCode::Internal,
                    message: msg,
                    retryable: true,
                });
                match db_retry("journal finish", || self.journal.finish(&failed)).await {
                    Ok(_) => (Settle::Ack, "failed"),
                    Err(e) => {
                        error!(cause = %e, "cannot record the failure either; requeueing");
                        (Settle::Requeue, "requeued")
                    }
                }
            }
        }
    }
}

/// Retries a statement while the database is unreachable, with capped
/// backoff, and returns any other error at once. Waiting here (instead of
/// requeueing) is what pauses consumption during a database outage: the
/// message stays unacknowledged and the prefetch limit stops new deliveries.
pub async fn db_retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut delay = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match f().await {
            Ok(v) => {
                if logged {
                    info!(what, "database reachable again");
                }
                return Ok(v);
            }
            Err(e) if db::is_connection_error(&e) => {
                if !logged {
                    warn!(what, cause = %e, "database unreachable; waiting for it");
                    logged = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}
