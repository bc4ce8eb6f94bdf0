//! An emulator of the few CloudStack API commands volumed uses, for tests and
//! local trials: no real CloudStack can run where volumed is developed.
//!
//! It answers `GET` and form `POST` on `/client/api` the way CloudStack does
//! for `listVolumes`, `listVirtualMachines`, `attachVolume`, `detachVolume`
//! and `queryAsyncJobResult`: the same signature check (see [`super::sign`]),
//! the same JSON shapes, the same HTTP status = CloudStack error code, and
//! attach/detach as asynchronous jobs that finish after a configurable
//! latency. It also plays the hypervisor and udev of the appliance VM: when
//! a volume is attached to that VM its `virtio-<serial>` link appears in the
//! device directory, pointing at a sparse backing file, and disappears on
//! detach.
//!
//! Faults can be injected at any time (failed, late-succeeding and stuck
//! jobs, bursts of HTTP 530 or 431, device-id collisions of concurrent
//! attaches), and every accepted attach/detach is recorded so that tests can
//! check what a client did, including how many jobs it ran at once per VM.
//!
//! Limits, stated plainly: the state lives in memory only; answers are
//! always JSON (the `response` parameter is not consulted); there are no
//! accounts, zones, root disks or per-VM volume limits; a volume can be
//! created only through the admin API, never deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::OpenOptions;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use uuid::Uuid;

use super::sign;

/// CloudStack's error codes, which are also the HTTP status of the answer.
const UNAUTHORIZED: u16 = 401;
const PARAM_ERROR: u16 = 431;
const UNSUPPORTED_ACTION: u16 = 432;
const INTERNAL_ERROR: u16 = 530;
/// The `cserrorcode` CloudStack puts in API error answers (its generic
/// server API exception).
const CS_ERROR_CODE: u32 = 4350;
/// CloudStack keeps device id 3 for the CD-ROM, so data disks never get it.
const CDROM_DEVICE_ID: u64 = 3;
const ATTACH_CMD: &str = "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd";
const DETACH_CMD: &str = "org.apache.cloudstack.api.command.user.volume.DetachVolumeCmd";
const BAD_CREDENTIALS: &str = "unable to verify user credentials and/or request signature";

/// What the emulator needs to know at start.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The only API key accepted.
    pub api_key: String,
    /// The secret that requests must be signed with; never logged.
    pub secret_key: String,
    /// The VM volumed runs in: attaching to it makes a device link appear.
    /// It exists from the start.
    pub appliance_vm: Uuid,
    /// Where `virtio-<serial>` links appear (plays `/dev/disk/by-id`).
    pub device_dir: PathBuf,
    /// Where each volume's sparse backing file `<id>.img` is created.
    pub data_dir: PathBuf,
    /// How long an attach or detach job runs before it finishes.
    pub job_latency: Duration,
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("api_key", &self.api_key)
            .field("secret_key", &"<redacted>")
            .field("appliance_vm", &self.appliance_vm)
            .field("device_dir", &self.device_dir)
            .field("data_dir", &self.data_dir)
            .field("job_latency", &self.job_latency)
            .finish()
    }
}

/// Injected faults. In [`Emulator::set_faults`] and `PUT /admin/faults`
/// only the fields that are set change; the counters are consumed one per
/// use. [`Emulator::faults`] reports every field.
#[derive(Default, Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Latency of the jobs accepted from now on.
    pub job_latency_ms: Option<u64>,
    /// The next N jobs fail (status 2, error 530) without any effect.
    pub fail_jobs: Option<u32>,
    /// The next N jobs report failure (status 2, error 530) although their
    /// effect took place: the late detach that succeeds after its job failed.
    pub late_success_jobs: Option<u32>,
    /// The next N jobs stay pending (status 0) forever, and keep counting as
    /// in flight on their VM.
    pub stuck_jobs: Option<u32>,
    /// The next N API calls, any command, answer HTTP 530 right after the
    /// signature check.
    pub http_530_calls: Option<u32>,
    /// The next N attach/detach calls answer HTTP 431 right away.
    pub param_error_calls: Option<u32>,
    /// While true, an attach job accepted while another attach/detach job on
    /// the same VM is in flight fails with a device-id collision.
    pub collide_concurrent_attaches: Option<bool>,
}

/// One accepted `attachVolume`/`detachVolume` call (one that got a job id).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Call {
    /// `attachVolume` or `detachVolume`.
    pub command: String,
    pub volume_id: Uuid,
    /// For an attach the target VM; for a detach the VM the volume was
    /// attached to when the call was accepted.
    pub vm_id: Uuid,
    pub job_id: Uuid,
    pub at: DateTime<Utc>,
}

/// The API URL of an emulator listening on `addr`.
pub fn api_url(addr: SocketAddr) -> String {
    format!("http://{addr}/client/api")
}

/// The virtio serial the hypervisor gives a volume on KVM: its UUID without
/// hyphens, cut to the 20 characters a virtio serial can hold.
pub fn virtio_serial(volume: Uuid) -> String {
    let mut serial = volume.simple().to_string();
    serial.truncate(20);
    serial
}

/// A cheap, cloneable handle on one emulated cloud.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: EmulatorConfig,
    /// Everything mutable. A std mutex: it is only ever held for short,
    /// await-free sections (never across I/O to a client).
    cloud: Mutex<Cloud>,
    /// Where the server listens, once it does.
    addr: OnceLock<SocketAddr>,
}

struct Volume {
    id: Uuid,
    name: String,
    size: u64,
    /// Creation order, which listings follow.
    seq: u64,
    attachment: Option<Attachment>,
}

#[derive(Clone, Copy)]
struct Attachment {
    vm: Uuid,
    device_id: u64,
}

struct Vm {
    name: String,
    seq: u64,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum JobKind {
    Attach,
    Detach,
}

impl JobKind {
    fn command(self) -> &'static str {
        match self {
            JobKind::Attach => "attachVolume",
            JobKind::Detach => "detachVolume",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            JobKind::Attach => "attach",
            JobKind::Detach => "detach",
        }
    }

    fn cmd_class(self) -> &'static str {
        match self {
            JobKind::Attach => ATTACH_CMD,
            JobKind::Detach => DETACH_CMD,
        }
    }
}

/// How a job will end, decided when it is accepted so that a fault set
/// before a call applies to exactly that call.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Plan {
    Normal,
    Fail,
    LateSuccess,
    Stuck,
    Collide,
}

enum JobStatus {
    Pending,
    Succeeded {
        volume: Value,
        completed: DateTime<Utc>,
    },
    Failed {
        text: String,
        completed: DateTime<Utc>,
    },
}

/// What a job is to do, fixed when it is accepted.
#[derive(Clone, Copy)]
struct JobSpec {
    kind: JobKind,
    volume: Uuid,
    vm: Uuid,
    /// The device id asked for in `attachVolume`, if any.
    device_id: Option<u64>,
    plan: Plan,
}

struct Job {
    spec: JobSpec,
    created: DateTime<Utc>,
    status: JobStatus,
}

/// The faults in force, with their defaults filled in.
struct ActiveFaults {
    job_latency: Duration,
    fail_jobs: u32,
    late_success_jobs: u32,
    stuck_jobs: u32,
    http_530_calls: u32,
    param_error_calls: u32,
    collide_concurrent_attaches: bool,
}

impl ActiveFaults {
    fn apply(&mut self, f: &Faults) {
        if let Some(ms) = f.job_latency_ms {
            self.job_latency = Duration::from_millis(ms);
        }
        let counters = [
            (f.fail_jobs, &mut self.fail_jobs),
            (f.late_success_jobs, &mut self.late_success_jobs),
            (f.stuck_jobs, &mut self.stuck_jobs),
            (f.http_530_calls, &mut self.http_530_calls),
            (f.param_error_calls, &mut self.param_error_calls),
        ];
        for (new, slot) in counters {
            if let Some(n) = new {
                *slot = n;
            }
        }
        if let Some(on) = f.collide_concurrent_attaches {
            self.collide_concurrent_attaches = on;
        }
    }

    fn snapshot(&self) -> Faults {
        Faults {
            job_latency_ms: Some(u64::try_from(self.job_latency.as_millis()).unwrap_or(u64::MAX)),
            fail_jobs: Some(self.fail_jobs),
            late_success_jobs: Some(self.late_success_jobs),
            stuck_jobs: Some(self.stuck_jobs),
            http_530_calls: Some(self.http_530_calls),
            param_error_calls: Some(self.param_error_calls),
            collide_concurrent_attaches: Some(self.collide_concurrent_attaches),
        }
    }

    /// Consumes one job fault, checked in the order stuck, fail, late
    /// success; a job takes at most one.
    fn take_job_plan(&mut self) -> Plan {
        for (counter, plan) in [
            (&mut self.stuck_jobs, Plan::Stuck),
            (&mut self.fail_jobs, Plan::Fail),
            (&mut self.late_success_jobs, Plan::LateSuccess),
        ] {
            if *counter > 0 {
                *counter -= 1;
                return plan;
            }
        }
        Plan::Normal
    }
}

/// Takes one from a fault counter; true when it was non-zero.
fn consume(counter: &mut u32) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

/// The in-memory cloud.
struct Cloud {
    volumes: HashMap<Uuid, Volume>,
    vms: HashMap<Uuid, Vm>,
    jobs: HashMap<Uuid, Job>,
    next_seq: u64,
    faults: ActiveFaults,
    calls: Vec<Call>,
    in_flight: HashMap<Uuid, u32>,
    max_in_flight: u32,
    /// The most attach/detach jobs ever in flight at once over all VMs:
    /// above one proves that different VMs proceed in parallel.
    max_in_flight_total: u32,
    calls_by_command: BTreeMap<String, u64>,
    rejected_signatures: u64,
}

/// A change to make in the device directory, done outside the lock.
enum LinkChange {
    Create { volume: Uuid },
    Remove { volume: Uuid },
}

/// An API error: the CloudStack error code (also the HTTP status) and text.
struct ApiError {
    code: u16,
    text: String,
}

impl ApiError {
    fn param(text: impl Into<String>) -> ApiError {
        ApiError {
            code: PARAM_ERROR,
            text: text.into(),
        }
    }

    /// CloudStack's answer when a UUID parameter names no entity.
    fn invalid_uuid(command: &str, name: &str, value: &str) -> ApiError {
        ApiError::param(format!(
            "Unable to execute API command {} due to invalid value. Invalid parameter {name} \
             value={value} due to incorrect long value format, or entity does not exist or due \
             to incorrect parameter annotation for the field in api cmd class.",
            command.to_lowercase()
        ))
    }

    fn missing(command: &str, name: &str) -> ApiError {
        ApiError::param(format!(
            "Unable to execute API command {} due to missing parameter {name}",
            command.to_lowercase()
        ))
    }
}

type ApiResult = Result<Value, ApiError>;

fn status(code: u16) -> StatusCode {
    // Every code used here (401, 431, 432, 530) is a valid three-digit
    // status; the fallback is never taken.
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn error_response(command: &str, err: &ApiError) -> Response {
    let key = if command.is_empty() {
        "errorresponse".to_string()
    } else {
        format!("{}response", command.to_lowercase())
    };
    let body = json!({ key: {
        "uuidList": [],
        "errorcode": err.code,
        "cserrorcode": CS_ERROR_CODE,
        "errortext": err.text,
    }});
    (status(err.code), Json(body)).into_response()
}

fn unauthorized() -> Response {
    let body = json!({"errorresponse": {"errorcode": UNAUTHORIZED, "errortext": BAD_CREDENTIALS}});
    (status(UNAUTHORIZED), Json(body)).into_response()
}

/// CloudStack's timestamp format, which is also RFC 3339.
fn cs_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

/// Parses `expires`: CloudStack's `yyyy-MM-dd'T'HH:mm:ssZ` (for example
/// `2026-12-03T19:00:00+0000`), or RFC 3339.
fn parse_expires(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%z")
        .or_else(|_| DateTime::parse_from_rfc3339(value))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The lowest device id from 1 up that is neither in use nor the CD-ROM's.
fn lowest_free_device_id(used: &BTreeSet<u64>) -> u64 {
    let mut id = 1;
    while id == CDROM_DEVICE_ID || used.contains(&id) {
        id += 1;
    }
    id
}

/// The first value of a parameter, as CloudStack reads it.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A list answer: CloudStack leaves out `count` and the list when empty.
fn list_answer(key: &str, item: &str, list: Vec<Value>) -> Value {
    if list.is_empty() {
        json!({ key: {} })
    } else {
        json!({ key: { "count": list.len(), item: list } })
    }
}

impl Cloud {
    fn volume_view(&self, v: &Volume) -> Value {
        let mut view = Map::new();
        view.insert("id".into(), json!(v.id));
        view.insert("name".into(), json!(v.name));
        view.insert("size".into(), json!(v.size));
        view.insert("state".into(), json!("Ready"));
        view.insert("type".into(), json!("DATADISK"));
        if let Some(a) = v.attachment {
            view.insert("virtualmachineid".into(), json!(a.vm));
            if let Some(vm) = self.vms.get(&a.vm) {
                view.insert("vmname".into(), json!(vm.name));
            }
            view.insert("deviceid".into(), json!(a.device_id));
        }
        Value::Object(view)
    }

    fn sorted_volumes(&self) -> Vec<&Volume> {
        let mut list: Vec<&Volume> = self.volumes.values().collect();
        list.sort_by_key(|v| v.seq);
        list
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn in_flight(&self, vm: Uuid) -> u32 {
        self.in_flight.get(&vm).copied().unwrap_or(0)
    }

    /// Records an accepted job and returns its id and latency.
    fn accept_job(
        &mut self,
        kind: JobKind,
        volume: Uuid,
        vm: Uuid,
        device_id: Option<u64>,
    ) -> (Uuid, Plan, Duration) {
        let collides = kind == JobKind::Attach
            && self.faults.collide_concurrent_attaches
            && self.in_flight(vm) > 0;
        let plan = if collides {
            Plan::Collide
        } else {
            self.faults.take_job_plan()
        };
        let id = Uuid::new_v4();
        let now = Utc::now();
        self.jobs.insert(
            id,
            Job {
                spec: JobSpec {
                    kind,
                    volume,
                    vm,
                    device_id,
                    plan,
                },
                created: now,
                status: JobStatus::Pending,
            },
        );
        let count = self.in_flight.entry(vm).or_default();
        *count += 1;
        self.max_in_flight = self.max_in_flight.max(*count);
        let total = self.in_flight.values().sum::<u32>();
        self.max_in_flight_total = self.max_in_flight_total.max(total);
        self.calls.push(Call {
            command: kind.command().to_string(),
            volume_id: volume,
            vm_id: vm,
            job_id: id,
            at: now,
        });
        (id, plan, self.faults.job_latency)
    }

    /// Carries out what a finished job does to the cloud. `Ok` holds the
    /// device-directory change to make, if the VM is the appliance.
    fn take_effect(
        &mut self,
        job: &JobSpec,
        appliance: Uuid,
    ) -> Result<Option<LinkChange>, String> {
        let used: BTreeSet<u64> = self
            .volumes
            .values()
            .filter_map(|v| v.attachment.filter(|a| a.vm == job.vm).map(|a| a.device_id))
            .collect();
        let Some(volume) = self.volumes.get_mut(&job.volume) else {
            return Err(format!("volume {} does not exist", job.volume));
        };
        match job.kind {
            JobKind::Attach => {
                if let Some(a) = volume.attachment {
                    return Err(format!(
                        "Failed to attach volume {}: it is already attached to VM {}",
                        job.volume, a.vm
                    ));
                }
                let device_id = match job.device_id {
                    Some(wanted) if used.contains(&wanted) => {
                        return Err(format!(
                            "Failed to attach volume {}: device id {wanted} is in use on VM {}",
                            job.volume, job.vm
                        ))
                    }
                    Some(wanted) => wanted,
                    None => lowest_free_device_id(&used),
                };
                volume.attachment = Some(Attachment {
                    vm: job.vm,
                    device_id,
                });
                Ok((job.vm == appliance).then_some(LinkChange::Create { volume: job.volume }))
            }
            JobKind::Detach => {
                match volume.attachment {
                    Some(a) if a.vm == job.vm => volume.attachment = None,
                    _ => {
                        return Err(format!(
                            "Failed to detach volume {}: it is not attached to VM {}",
                            job.volume, job.vm
                        ))
                    }
                }
                Ok((job.vm == appliance).then_some(LinkChange::Remove { volume: job.volume }))
            }
        }
    }
}

impl Emulator {
    /// A new emulated cloud with no volumes and one VM, the appliance.
    pub fn new(cfg: EmulatorConfig) -> Emulator {
        let faults = ActiveFaults {
            job_latency: cfg.job_latency,
            fail_jobs: 0,
            late_success_jobs: 0,
            stuck_jobs: 0,
            http_530_calls: 0,
            param_error_calls: 0,
            collide_concurrent_attaches: false,
        };
        let mut cloud = Cloud {
            volumes: HashMap::new(),
            vms: HashMap::new(),
            jobs: HashMap::new(),
            next_seq: 0,
            faults,
            calls: Vec::new(),
            in_flight: HashMap::new(),
            max_in_flight: 0,
            max_in_flight_total: 0,
            calls_by_command: BTreeMap::new(),
            rejected_signatures: 0,
        };
        let seq = cloud.seq();
        cloud.vms.insert(
            cfg.appliance_vm,
            Vm {
                name: "volumed-appliance".to_string(),
                seq,
            },
        );
        Emulator {
            shared: Arc::new(Shared {
                cfg,
                cloud: Mutex::new(cloud),
                addr: OnceLock::new(),
            }),
        }
    }

    /// Binds 127.0.0.1 on a free port and serves the API and admin routes
    /// in the background until the returned task is aborted.
    pub async fn spawn(
        cfg: EmulatorConfig,
    ) -> io::Result<(Emulator, SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let emulator = Emulator::new(cfg);
        // Recorded here, not only in `serve`, so that `url` is right as soon
        // as this returns, before the server task has run.
        let _ = emulator.shared.addr.set(addr);
        let server = emulator.clone();
        let task = tokio::spawn(async move {
            if let Err(err) = server.serve(listener, std::future::pending()).await {
                tracing::error!(cause = %err, "CloudStack emulator stopped");
            }
        });
        Ok((emulator, addr, task))
    }

    /// Serves on `listener` until `shutdown` completes, then lets the
    /// requests in progress finish. Jobs still running are dropped with the
    /// runtime: their effects live only in memory, which goes with them.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let addr = listener.local_addr()?;
        // One emulator serves one listener; a second serve keeps the first
        // address for `url`.
        let _ = self.shared.addr.set(addr);
        tracing::info!(%addr, "CloudStack emulator listening");
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// `http://127.0.0.1:PORT/client/api` once the emulator serves (through
    /// [`Emulator::spawn`] or [`Emulator::serve`]). Before, the port is
    /// unknown and the URL names port 0, where no connection can succeed.
    pub fn url(&self) -> String {
        let addr = self
            .shared
            .addr
            .get()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        api_url(addr)
    }

    /// The API (`/client/api`) and the unsigned admin routes (`/admin/..`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/client/api", get(api).post(api))
            .route(
                "/admin/volumes",
                get(admin_volumes).post(admin_create_volume),
            )
            .route("/admin/vms", axum::routing::post(admin_create_vm))
            .route("/admin/faults", get(admin_faults).put(admin_set_faults))
            .route("/admin/calls", get(admin_calls))
            .route("/admin/stats", get(admin_stats))
            .with_state(self.clone())
    }

    fn cloud(&self) -> MutexGuard<'_, Cloud> {
        // A panic while the lock was held can only come from a bug in this
        // module; the emulator keeps serving with the state as it was left
        // rather than turning every later request into a panic.
        self.shared
            .cloud
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a volume of `size` bytes with a fresh id.
    pub fn create_volume(&self, size: u64) -> io::Result<Uuid> {
        self.create_volume_with(None, None, size)
    }

    /// Creates a volume, with the given id and name if any, and its sparse
    /// backing file `<data_dir>/<id>.img`. An id already in use is
    /// `AlreadyExists`.
    pub fn create_volume_with(
        &self,
        id: Option<Uuid>,
        name: Option<&str>,
        size: u64,
    ) -> io::Result<Uuid> {
        let id = id.unwrap_or_else(Uuid::new_v4);
        // The lock is held across the (await-free) file creation so that two
        // creations of one id cannot both write its backing file.
        let mut cloud = self.cloud();
        if cloud.volumes.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("volume {id} already exists"),
            ));
        }
        std::fs::create_dir_all(&self.shared.cfg.data_dir)?;
        // A file left by an earlier run under the same id is emptied: a new
        // volume reads as zeros.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.backing_file(id))?;
        file.set_len(size)?;
        let seq = cloud.seq();
        let name = match name {
            Some(n) => n.to_string(),
            None => format!("vol-{}", &id.simple().to_string()[..8]),
        };
        cloud.volumes.insert(
            id,
            Volume {
                id,
                name,
                size,
                seq,
                attachment: None,
            },
        );
        tracing::info!(volume.id = %id, size, "volume created");
        Ok(id)
    }

    /// Creates a VM, or renames it if it exists.
    pub fn create_vm(&self, id: Uuid, name: &str) {
        let mut cloud = self.cloud();
        let seq = cloud.seq();
        cloud
            .vms
            .entry(id)
            .and_modify(|vm| vm.name = name.to_string())
            .or_insert(Vm {
                name: name.to_string(),
                seq,
            });
    }

    /// Changes the faults whose field is `Some`.
    pub fn set_faults(&self, f: Faults) {
        tracing::info!(faults = ?f, "faults changed");
        self.cloud().faults.apply(&f);
    }

    /// The faults in force, every field set.
    pub fn faults(&self) -> Faults {
        self.cloud().faults.snapshot()
    }

    /// Every accepted attach/detach call, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.cloud().calls.clone()
    }

    /// The most attach/detach jobs ever in flight at once on one VM.
    pub fn max_in_flight_per_vm(&self) -> u32 {
        self.cloud().max_in_flight
    }

    /// The most attach/detach jobs ever in flight at once, all VMs together.
    pub fn max_in_flight_total(&self) -> u32 {
        self.cloud().max_in_flight_total
    }

    /// How many API requests failed the credential/signature check.
    pub fn rejected_signatures(&self) -> u64 {
        self.cloud().rejected_signatures
    }

    /// API calls that passed the signature check, by command name.
    pub fn calls_by_command(&self) -> BTreeMap<String, u64> {
        self.cloud().calls_by_command.clone()
    }

    /// The VM a volume is attached to, if any.
    pub fn attached_to(&self, volume: Uuid) -> Option<Uuid> {
        self.cloud()
            .volumes
            .get(&volume)
            .and_then(|v| v.attachment)
            .map(|a| a.vm)
    }

    /// The sparse file that backs a volume.
    pub fn backing_file(&self, volume: Uuid) -> PathBuf {
        self.shared.cfg.data_dir.join(format!("{volume}.img"))
    }

    /// Where the volume's device link appears while it is attached to the
    /// appliance VM.
    pub fn device_link(&self, volume: Uuid) -> PathBuf {
        self.shared
            .cfg
            .device_dir
            .join(format!("virtio-{}", virtio_serial(volume)))
    }

    fn volumes_view(&self) -> Vec<Value> {
        let cloud = self.cloud();
        cloud
            .sorted_volumes()
            .into_iter()
            .map(|v| cloud.volume_view(v))
            .collect()
    }

    /// Answers one API request, given its parameters (query and form, first
    /// value of each name).
    fn handle(&self, params: &[(String, String)]) -> Response {
        if let Err(reason) = self.authenticate(params) {
            self.cloud().rejected_signatures += 1;
            tracing::warn!(reason, "API request rejected");
            return unauthorized();
        }
        let command = param(params, "command").unwrap_or_default().to_string();
        {
            let mut cloud = self.cloud();
            *cloud.calls_by_command.entry(command.clone()).or_default() += 1;
            if consume(&mut cloud.faults.http_530_calls) {
                let err = ApiError {
                    code: INTERNAL_ERROR,
                    text: "Internal error executing command, please contact your system \
                           administrator (injected fault)"
                        .into(),
                };
                return error_response(&command, &err);
            }
        }
        let answer = match command.as_str() {
            "listVolumes" => self.list_volumes(params),
            "listVirtualMachines" => self.list_vms(params),
            "attachVolume" => self.attach(params),
            "detachVolume" => self.detach(params),
            "queryAsyncJobResult" => self.query_job(params),
            "" => Err(ApiError {
                code: UNSUPPORTED_ACTION,
                text: "no command given".into(),
            }),
            other => Err(ApiError {
                code: UNSUPPORTED_ACTION,
                text: format!(
                    "The given command:{other} does not exist or it is not available for user"
                ),
            }),
        };
        match answer {
            Ok(body) => Json(body).into_response(),
            Err(err) => {
                tracing::info!(command, code = err.code, text = err.text, "API error");
                error_response(&command, &err)
            }
        }
    }

    /// CloudStack's credential check: a known API key, a signature, for
    /// `signatureversion=3` an `expires` still in the future, and a
    /// signature over all the other parameters made with the secret key.
    fn authenticate(&self, params: &[(String, String)]) -> Result<(), &'static str> {
        let cfg = &self.shared.cfg;
        let api_key = param(params, "apiKey").ok_or("missing apiKey")?;
        let provided = param(params, "signature").ok_or("missing signature")?;
        if param(params, "signatureversion") == Some("3") {
            let expires = param(params, "expires").ok_or("missing expires")?;
            let expires = parse_expires(expires).ok_or("unreadable expires")?;
            if expires <= Utc::now() {
                return Err("expired");
            }
        }
        if api_key != cfg.api_key {
            return Err("unknown apiKey");
        }
        if !sign::verify(params, &cfg.secret_key, provided) {
            return Err("signature mismatch");
        }
        Ok(())
    }

    fn list_volumes(&self, params: &[(String, String)]) -> ApiResult {
        let cloud = self.cloud();
        let filter = match param(params, "id") {
            None => None,
            Some(raw) => match Uuid::parse_str(raw) {
                Ok(id) if cloud.volumes.contains_key(&id) => Some(id),
                _ => return Err(ApiError::invalid_uuid("listVolumes", "id", raw)),
            },
        };
        let list = cloud
            .sorted_volumes()
            .into_iter()
            .filter(|v| filter.is_none() || filter == Some(v.id))
            .map(|v| cloud.volume_view(v))
            .collect();
        Ok(list_answer("listvolumesresponse", "volume", list))
    }

    fn list_vms(&self, params: &[(String, String)]) -> ApiResult {
        let cloud = self.cloud();
        let filter = match param(params, "id") {
            None => None,
            Some(raw) => match Uuid::parse_str(raw) {
                Ok(id) if cloud.vms.contains_key(&id) => Some(id),
                _ => return Err(ApiError::invalid_uuid("listVirtualMachines", "id", raw)),
            },
        };
        let mut vms: Vec<(&Uuid, &Vm)> = cloud
            .vms
            .iter()
            .filter(|(id, _)| filter.is_none() || filter == Some(**id))
            .collect();
        vms.sort_by_key(|(_, vm)| vm.seq);
        let list = vms
            .into_iter()
            .map(|(id, vm)| json!({"id": id, "name": vm.name, "state": "Running"}))
            .collect();
        Ok(list_answer(
            "listvirtualmachinesresponse",
            "virtualmachine",
            list,
        ))
    }

    /// Reads a required UUID parameter naming an entity.
    fn uuid_param(
        params: &[(String, String)],
        command: &str,
        name: &str,
    ) -> Result<Uuid, ApiError> {
        let raw = param(params, name).ok_or_else(|| ApiError::missing(command, name))?;
        Uuid::parse_str(raw).map_err(|_| ApiError::invalid_uuid(command, name, raw))
    }

    fn attach(&self, params: &[(String, String)]) -> ApiResult {
        const COMMAND: &str = "attachVolume";
        let (job, plan, latency) = {
            let mut cloud = self.cloud();
            if consume(&mut cloud.faults.param_error_calls) {
                return Err(ApiError::param(
                    "Unable to execute API command attachvolume due to invalid value \
                     (injected fault)",
                ));
            }
            let volume = Self::uuid_param(params, COMMAND, "id")?;
            let vm = Self::uuid_param(params, COMMAND, "virtualmachineid")?;
            let device_id = match param(params, "deviceid") {
                None => None,
                Some(raw) => match raw.parse::<u64>() {
                    Ok(d) if d != 0 && d != CDROM_DEVICE_ID => Some(d),
                    _ => {
                        return Err(ApiError::param(format!(
                            "deviceid {raw} is not allowed: 0 is the root disk, 3 the CD-ROM"
                        )))
                    }
                },
            };
            let Some(vol) = cloud.volumes.get(&volume) else {
                return Err(ApiError::invalid_uuid(COMMAND, "id", &volume.to_string()));
            };
            if !cloud.vms.contains_key(&vm) {
                return Err(ApiError::invalid_uuid(
                    COMMAND,
                    "virtualmachineid",
                    &vm.to_string(),
                ));
            }
            if let Some(a) = vol.attachment {
                return Err(ApiError::param(format!(
                    "Please specify a volume that is not attached to any VM (volume {volume} is \
                     attached to VM {})",
                    a.vm
                )));
            }
            cloud.accept_job(JobKind::Attach, volume, vm, device_id)
        };
        self.run_job(job, plan, latency);
        Ok(json!({"attachvolumeresponse": {"jobid": job}}))
    }

    fn detach(&self, params: &[(String, String)]) -> ApiResult {
        const COMMAND: &str = "detachVolume";
        let (job, plan, latency) = {
            let mut cloud = self.cloud();
            if consume(&mut cloud.faults.param_error_calls) {
                return Err(ApiError::param(
                    "Unable to execute API command detachvolume due to invalid value \
                     (injected fault)",
                ));
            }
            let volume = Self::uuid_param(params, COMMAND, "id")?;
            let Some(vol) = cloud.volumes.get(&volume) else {
                return Err(ApiError::invalid_uuid(COMMAND, "id", &volume.to_string()));
            };
            let Some(a) = vol.attachment else {
                return Err(ApiError::param(format!(
                    "Please specify a VM that is either running or stopped (volume {volume} is \
                     not attached to any VM)"
                )));
            };
            cloud.accept_job(JobKind::Detach, volume, a.vm, None)
        };
        self.run_job(job, plan, latency);
        Ok(json!({"detachvolumeresponse": {"jobid": job}}))
    }

    /// Runs a job in the background. A stuck job is never run: it stays
    /// pending, and in flight on its VM, for the emulator's lifetime.
    ///
    /// The task is detached: it touches only this emulator's memory and its
    /// device directory, and dies with the runtime.
    fn run_job(&self, job: Uuid, plan: Plan, latency: Duration) {
        tracing::info!(job.id = %job, ?plan, latency_ms = latency.as_millis(), "job accepted");
        if plan == Plan::Stuck {
            return;
        }
        let emulator = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            emulator.finish_job(job);
        });
    }

    /// Ends a job: makes its effect (unless its plan says it has none),
    /// changes the device directory, and only then publishes the job's
    /// status, as the hot-plugged device appears before CloudStack reports
    /// the attach done.
    fn finish_job(&self, id: Uuid) {
        let appliance = self.shared.cfg.appliance_vm;
        let (job, effect) = {
            let mut cloud = self.cloud();
            let Some(job) = cloud.jobs.get(&id).map(|j| j.spec) else {
                return;
            };
            let effect = match job.plan {
                Plan::Normal | Plan::LateSuccess => cloud.take_effect(&job, appliance),
                Plan::Fail => Err(format!(
                    "Failed to {} volume {} (injected failure)",
                    job.kind.verb(),
                    job.volume
                )),
                Plan::Collide => Err(format!(
                    "Failed to attach volume {} to VM {}: device id collision with another job \
                     on that VM",
                    job.volume, job.vm
                )),
                Plan::Stuck => return,
            };
            (job, effect)
        };
        if let Ok(Some(change)) = &effect {
            self.change_link(change, id);
        }
        let completed = Utc::now();
        let mut cloud = self.cloud();
        let status = match (&effect, job.plan) {
            (Ok(_), Plan::LateSuccess) => JobStatus::Failed {
                text: format!(
                    "Failed to {} volume {}: timed out waiting for the hypervisor",
                    job.kind.verb(),
                    job.volume
                ),
                completed,
            },
            (Ok(_), _) => {
                let view = cloud
                    .volumes
                    .get(&job.volume)
                    .map(|v| cloud.volume_view(v))
                    .unwrap_or(Value::Null);
                JobStatus::Succeeded {
                    volume: view,
                    completed,
                }
            }
            (Err(text), _) => JobStatus::Failed {
                text: text.clone(),
                completed,
            },
        };
        match &status {
            JobStatus::Failed { text, .. } => {
                tracing::info!(
                    job.id = %id, volume.id = %job.volume, vm.id = %job.vm,
                    effect = effect.is_ok(), text, "job failed"
                )
            }
            _ => tracing::info!(
                job.id = %id, volume.id = %job.volume, vm.id = %job.vm, "job succeeded"
            ),
        }
        if let Some(job) = cloud.jobs.get_mut(&id) {
            job.status = status;
        }
        if let Some(count) = cloud.in_flight.get_mut(&job.vm) {
            *count = count.saturating_sub(1);
        }
    }

    /// Plays udev: the link is made under a temporary name and renamed into
    /// place, so a reader never sees a half-made link. A failure is logged;
    /// the job still counts as done, as the hypervisor did its part.
    fn change_link(&self, change: &LinkChange, job: Uuid) {
        let result = match change {
            LinkChange::Create { volume } => self.create_link(*volume, job),
            LinkChange::Remove { volume } => {
                match std::fs::remove_file(self.device_link(*volume)) {
                    Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            }
        };
        if let Err(err) = result {
            tracing::error!(job.id = %job, cause = %err, "device link change failed");
        }
    }

    fn create_link(&self, volume: Uuid, job: Uuid) -> io::Result<()> {
        let dir: &Path = &self.shared.cfg.device_dir;
        std::fs::create_dir_all(dir)?;
        let link = self.device_link(volume);
        let temp = dir.join(format!(
            ".virtio-{}.{}.tmp",
            virtio_serial(volume),
            job.simple()
        ));
        std::os::unix::fs::symlink(self.backing_file(volume), &temp)?;
        std::fs::rename(&temp, &link).inspect_err(|_| {
            let _ = std::fs::remove_file(&temp);
        })
    }

    fn query_job(&self, params: &[(String, String)]) -> ApiResult {
        const COMMAND: &str = "queryAsyncJobResult";
        let raw = param(params, "jobid").ok_or_else(|| ApiError::missing(COMMAND, "jobid"))?;
        let cloud = self.cloud();
        let job = Uuid::parse_str(raw)
            .ok()
            .and_then(|id| cloud.jobs.get(&id).map(|job| (id, job)));
        let Some((id, job)) = job else {
            return Err(ApiError::invalid_uuid(COMMAND, "jobid", raw));
        };
        let mut answer = Map::new();
        answer.insert("jobid".into(), json!(id));
        answer.insert("cmd".into(), json!(job.spec.kind.cmd_class()));
        answer.insert("jobprocstatus".into(), json!(0));
        answer.insert("jobresulttype".into(), json!("object"));
        answer.insert("jobinstancetype".into(), json!("Volume"));
        answer.insert("jobinstanceid".into(), json!(job.spec.volume));
        answer.insert("created".into(), json!(cs_time(job.created)));
        let (status, code) = match &job.status {
            JobStatus::Pending => (0, 0),
            JobStatus::Succeeded { volume, completed } => {
                answer.insert("jobresult".into(), json!({ "volume": volume }));
                answer.insert("completed".into(), json!(cs_time(*completed)));
                (1, 0)
            }
            JobStatus::Failed { text, completed } => {
                answer.insert(
                    "jobresult".into(),
                    json!({"errorcode": INTERNAL_ERROR, "errortext": text}),
                );
                answer.insert("completed".into(), json!(cs_time(*completed)));
                (2, INTERNAL_ERROR)
            }
        };
        answer.insert("jobstatus".into(), json!(status));
        answer.insert("jobresultcode".into(), json!(code));
        Ok(json!({"queryasyncjobresultresponse": answer}))
    }
}

/// Splits `a=1&b=2` (form encoding, `+` is a space) into pairs.
fn parse_pairs(raw: &[u8], into: &mut Vec<(String, String)>) {
    into.extend(url::form_urlencoded::parse(raw).map(|(n, v)| (n.into_owned(), v.into_owned())));
}

/// `/client/api`: parameters come from the query string and, for a form
/// POST, the body (as a servlet merges them); CloudStack uses the first
/// value of a repeated name, so later repeats are dropped.
async fn api(
    State(emulator): State<Emulator>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut all = Vec::new();
    parse_pairs(query.as_deref().unwrap_or_default().as_bytes(), &mut all);
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        parse_pairs(&body, &mut all);
    }
    let mut params: Vec<(String, String)> = Vec::with_capacity(all.len());
    for (name, value) in all {
        if !params.iter().any(|(n, _)| *n == name) {
            params.push((name, value));
        }
    }
    emulator.handle(&params)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVolume {
    id: Option<Uuid>,
    name: Option<String>,
    size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVm {
    id: Uuid,
    name: Option<String>,
}

async fn admin_create_volume(
    State(emulator): State<Emulator>,
    Json(req): Json<NewVolume>,
) -> Response {
    match emulator.create_volume_with(req.id, req.name.as_deref(), req.size) {
        Ok(id) => (StatusCode::CREATED, Json(json!({"id": id}))).into_response(),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => (
            StatusCode::CONFLICT,
            Json(json!({"error": err.to_string()})),
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": err.to_string()})),
        )
            .into_response(),
    }
}

async fn admin_create_vm(State(emulator): State<Emulator>, Json(req): Json<NewVm>) -> Response {
    let name = req
        .name
        .unwrap_or_else(|| format!("vm-{}", &req.id.simple().to_string()[..8]));
    emulator.create_vm(req.id, &name);
    (
        StatusCode::CREATED,
        Json(json!({"id": req.id, "name": name})),
    )
        .into_response()
}

async fn admin_volumes(State(emulator): State<Emulator>) -> Json<Vec<Value>> {
    Json(emulator.volumes_view())
}

async fn admin_faults(State(emulator): State<Emulator>) -> Json<Faults> {
    Json(emulator.faults())
}

async fn admin_set_faults(
    State(emulator): State<Emulator>,
    Json(faults): Json<Faults>,
) -> Json<Faults> {
    emulator.set_faults(faults);
    Json(emulator.faults())
}

async fn admin_calls(State(emulator): State<Emulator>) -> Json<Vec<Call>> {
    Json(emulator.calls())
}

async fn admin_stats(State(emulator): State<Emulator>) -> Json<Value> {
    let cloud = emulator.cloud();
    Json(json!({
        "max_in_flight_per_vm": cloud.max_in_flight,
        "max_in_flight_total": cloud.max_in_flight_total,
        "calls_by_command": cloud.calls_by_command,
        "rejected_signatures": cloud.rejected_signatures,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_start_at_one_and_skip_the_cdrom() {
        let used = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<u64>>();
        assert_eq!(lowest_free_device_id(&used(&[])), 1);
        assert_eq!(lowest_free_device_id(&used(&[1])), 2);
        assert_eq!(lowest_free_device_id(&used(&[1, 2])), 4);
        assert_eq!(lowest_free_device_id(&used(&[2, 4])), 1);
        assert_eq!(lowest_free_device_id(&used(&[1, 2, 4, 5])), 6);
    }

    #[test]
    fn expires_accepts_cloudstack_format_and_rfc3339() {
        let want = DateTime::parse_from_rfc3339("2026-12-03T19:00:00Z")
            .expect("valid RFC 3339")
            .with_timezone(&Utc);
        assert_eq!(parse_expires("2026-12-03T19:00:00+0000"), Some(want));
        assert_eq!(parse_expires("2026-12-03T20:00:00+0100"), Some(want));
        assert_eq!(parse_expires("2026-12-03T19:00:00Z"), Some(want));
        assert_eq!(parse_expires("2026-12-03T19:00:00+00:00"), Some(want));
        // An unencoded '+' in a query string arrives as a space.
        assert_eq!(parse_expires("2026-12-03T19:00:00 0000"), None);
        assert_eq!(parse_expires(""), None);
    }

    #[test]
    fn serial_is_hyphenless_uuid_cut_to_20() {
        let id = Uuid::parse_str("9f0b2c4e-1d3a-4b5c-8e7f-0a1b2c3d4e5f").expect("valid UUID");
        assert_eq!(virtio_serial(id), "9f0b2c4e1d3a4b5c8e7f");
    }

    #[test]
    fn job_faults_are_consumed_one_at_a_time_in_order() {
        let mut f = ActiveFaults {
            job_latency: Duration::from_millis(5),
            fail_jobs: 0,
            late_success_jobs: 0,
            stuck_jobs: 0,
            http_530_calls: 0,
            param_error_calls: 0,
            collide_concurrent_attaches: false,
        };
        f.apply(&Faults {
            fail_jobs: Some(1),
            late_success_jobs: Some(1),
            stuck_jobs: Some(1),
            ..Faults::default()
        });
        assert_eq!(f.take_job_plan(), Plan::Stuck);
        assert_eq!(f.take_job_plan(), Plan::Fail);
        assert_eq!(f.take_job_plan(), Plan::LateSuccess);
        assert_eq!(f.take_job_plan(), Plan::Normal);
        f.apply(&Faults {
            job_latency_ms: Some(7),
            ..Faults::default()
        });
        let snap = f.snapshot();
        assert_eq!(snap.job_latency_ms, Some(7));
        assert_eq!(snap.collide_concurrent_attaches, Some(false));
    }

    #[test]
    fn config_debug_hides_the_secret() {
        let cfg = EmulatorConfig {
            api_key: "key".into(),
            secret_key: "hush-hush".into(),
            appliance_vm: Uuid::nil(),
            device_dir: PathBuf::from("/d"),
            data_dir: PathBuf::from("/v"),
            job_latency: Duration::from_millis(1),
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hush-hush"));
        assert!(shown.contains("<redacted>"));
    }
}
