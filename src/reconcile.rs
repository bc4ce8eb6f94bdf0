//! The reconciler: compares what volumed recorded (attachment and export
//! rows) with the world (the backend's attachments to the appliance VM, the
//! by-id device links, the export configuration, the exports the live NBD
//! server lists) and reports each drift by kind. With `apply`, it repairs
//! what is safe to repair, with a `volume.reconciled` event for each.
//!
//! Two rules keep it from fighting the workers: a volume with an operation
//! running (or finished while the reconciler was looking) is left alone,
//! and export repairs are made under the per-host export lock after
//! checking that again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::backend::{by_id_name, Backend};
use crate::config::NbdConfig;
use crate::contract::{ErrorCode, Event, EventType, RepairInfo};
use crate::db::AttachmentChange;
use crate::nbd::{nbd_server::PLACEHOLDER, proto, Engine, ExportName};

/// The repair of `wrong_export_target`. The export is never pointed at
/// another path by the reconciler: the configured path is wrong, so nothing
/// it could read is trusted, and with nbd-server a section whose path
/// changes keeps serving the old path until a restart. Withdrawing refuses
/// new connections at once on both engines; the volume stays attached, and
/// detaching and attaching it again makes a checked export.
const WRONG_TARGET_ACTION: &str =
    "withdrew the export and removed its record (the volume stays attached, unexported)";

/// Everything the reconciler looks at.
pub struct Reconciler {
    pub host: String,
    pub appliance_vm: Uuid,
    pub device_dir: PathBuf,
    pub pool: PgPool,
    pub backend: Arc<dyn Backend>,
    pub engine: Arc<dyn Engine>,
    pub nbd: NbdConfig,
    /// Operations running longer than this with nothing left to finish
    /// them are abandoned.
    pub stuck_after: Duration,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Drift {
    pub kind: &'static str,
    pub volume: Option<Uuid>,
    pub export: Option<String>,
    pub detail: String,
    /// `repaired: …`, `would repair: …` (dry run), `left for an operator:
    /// …`, `skipped: …` or `repair failed: …`.
    pub repair: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub host: String,
    pub checked_at: DateTime<Utc>,
    pub applied: bool,
    pub drifts: Vec<Drift>,
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = format!(
            "reconcile {} at {}{}: {} drift(s)\n",
            self.host,
            self.checked_at.to_rfc3339(),
            if self.applied {
                " (applied)"
            } else {
                " (dry run)"
            },
            self.drifts.len()
        );
        for d in &self.drifts {
            out.push_str(&format!(
                "- {:<32} volume={} export={}\n    {}\n    {}\n",
                d.kind,
                d.volume
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                d.export.as_deref().unwrap_or("-"),
                d.detail,
                d.repair
            ));
        }
        out
    }
}

/// request id, op, volume, VM, attempts, step.
type StuckRow = (Uuid, String, Option<Uuid>, Option<Uuid>, i32, String);

/// A change to the records that repairs a drift.
enum DbRepair {
    /// Record the attachment to the appliance the backend reports.
    RecordOnAppliance {
        device: Option<String>,
        stable: Option<String>,
    },
    /// Record that the volume is on another VM (its export record goes).
    MoveTo(Uuid),
    /// Forget the attachment and its export.
    Forget,
    /// Forget the export record only.
    ForgetExport,
}

struct Snapshot {
    /// volume → (vm, stable path) from volume_attachments.
    attachments: HashMap<Uuid, (Uuid, Option<String>)>,
    /// export name → volume, from nbd_exports.
    exports: BTreeMap<String, Uuid>,
    /// Export names recorded for any host (daemons may share a server).
    recorded_anywhere: BTreeSet<String>,
    /// export name → path, from the engine's configuration.
    configured: BTreeMap<String, PathBuf>,
    /// What the live server lists, or why it could not be asked.
    listed: Result<BTreeSet<String>, String>,
    /// Volumes the backend has on the appliance VM.
    backend: BTreeSet<Uuid>,
    /// by-id link names present.
    links: BTreeSet<String>,
}

impl Reconciler {
    /// The reconciler of `config`'s host, looking through `backend`.
    pub fn from_config(
        config: &crate::config::Config,
        appliance_vm: Uuid,
        pool: PgPool,
        backend: Arc<dyn Backend>,
    ) -> Reconciler {
        Reconciler {
            host: config.host_id.clone(),
            appliance_vm,
            device_dir: config.device_dir.clone(),
            pool,
            backend,
            engine: crate::nbd::engine_for(&config.nbd),
            nbd: config.nbd.clone(),
            stuck_after: config.stuck_after,
        }
    }

    /// Looks, reports, and with `apply` repairs.
    pub async fn run(&self, apply: bool) -> Result<Report> {
        let started = Utc::now();
        let snap = self.snapshot().await?;
        let busy = self.busy(started).await?;
        let mut drifts = Vec::new();
        self.check_attachments(&snap, &busy, apply, &mut drifts)
            .await?;
        self.check_exports(&snap, &busy, apply, &mut drifts).await?;
        self.check_devices(&snap, &busy, &mut drifts);
        self.check_stuck(apply, &mut drifts).await?;
        // A volume with an operation in progress is in flux, not adrift.
        drifts.retain(|d| !d.repair.starts_with("skipped: an operation"));
        Ok(Report {
            host: self.host.clone(),
            checked_at: started,
            applied: apply,
            drifts,
        })
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let rows: Vec<(Uuid, Uuid, Option<String>)> = sqlx::query_as(
            "SELECT volume_id, vm_id, stable_path FROM volume_attachments WHERE host = $1",
        )
        .bind(&self.host)
        .fetch_all(&self.pool)
        .await?;
        let attachments = rows.into_iter().map(|(v, vm, p)| (v, (vm, p))).collect();
        let exports: BTreeMap<String, Uuid> = crate::db::exports(&self.pool, Some(&self.host))
            .await?
            .into_iter()
            .map(|r| (r.export_name, r.volume_id))
            .collect();
        let recorded_anywhere = crate::db::exports(&self.pool, None)
            .await?
            .into_iter()
            .map(|r| r.export_name)
            .collect();
        let configured = self.configured(exports.len())?;
        let listed =
            match proto::list(&self.nbd.listen, self.nbd.port, Duration::from_secs(5)).await {
                Ok(names) => Ok(names.into_iter().filter(|n| n != PLACEHOLDER).collect()),
                Err(e) => Err(e.to_string()),
            };
        let backend = self
            .backend
            .volumes_on(self.appliance_vm)
            .await
            .map_err(|e| anyhow::anyhow!("reading the backend: {e}"))?
            .into_iter()
            .map(|v| v.id)
            .collect();
        let links = match std::fs::read_dir(&self.device_dir) {
            Ok(entries) => {
                let mut links = BTreeSet::new();
                for entry in entries {
                    let entry = entry.with_context(|| {
                        format!("reading the device directory {}", self.device_dir.display())
                    })?;
                    if let Some(name) = entry.file_name().to_str() {
                        if name.starts_with("virtio-") {
                            links.insert(name.to_owned());
                        }
                    }
                }
                links
            }
            // udev makes the directory with the first disk that has a
            // serial: absent, there is no device link at all. Nothing is
            // ever repaired from the device links (their drifts are left
            // for a person), so counting it as empty cannot undo anything.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "reading the device directory {} (VOLUMED_DEVICE_DIR); nothing was \
                         checked or repaired",
                        self.device_dir.display()
                    )
                })
            }
        };
        Ok(Snapshot {
            attachments,
            exports,
            recorded_anywhere,
            configured,
            listed,
            backend,
            links,
        })
    }

    /// The exports in the engine's configuration. A configuration that
    /// cannot be read fails the run: taken as empty, it would make every
    /// recorded export look unserved, and a repairing run would then delete
    /// every export record. A missing configuration counts as empty only
    /// while nothing is recorded for this host (before the first export);
    /// with records, it more likely means a wrong `VOLUMED_NBD_CONFIG` or a
    /// file system that is not mounted.
    fn configured(&self, recorded: usize) -> Result<BTreeMap<String, PathBuf>> {
        match self.engine.configured() {
            Ok(list) => Ok(list.into_iter().map(|(n, p)| (n.to_string(), p)).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && recorded == 0 => {
                Ok(BTreeMap::new())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "the {} configuration under {} (VOLUMED_NBD_CONFIG) does not exist, yet {recorded} \
                 export(s) are recorded for this host: refusing to take it as empty; nothing \
                 was checked or repaired",
                self.nbd.engine.as_str(),
                self.nbd.config.display()
            ),
            Err(e) => anyhow::bail!(
                "cannot read the {} configuration under {} (VOLUMED_NBD_CONFIG): {e}; nothing \
                 was checked or repaired",
                self.nbd.engine.as_str(),
                self.nbd.config.display()
            ),
        }
    }

    /// Volumes with an operation running, or finished since `since`, on
    /// any host (volume ids are global, and daemons may share a server).
    async fn busy(&self, since: DateTime<Utc>) -> Result<BTreeSet<Uuid>> {
        let v: Vec<Uuid> = sqlx::query_scalar(
            "SELECT volume_id FROM operations
              WHERE volume_id IS NOT NULL AND (state = 'running' OR updated_at >= $1)",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(v.into_iter().collect())
    }

    async fn check_attachments(
        &self,
        snap: &Snapshot,
        busy: &BTreeSet<Uuid>,
        apply: bool,
        out: &mut Vec<Drift>,
    ) -> Result<()> {
        for vol in &snap.backend {
            let recorded = snap.attachments.get(vol);
            if recorded.map(|(vm, _)| *vm) == Some(self.appliance_vm) {
                continue;
            }
            let link = self.device_dir.join(by_id_name(*vol));
            let device = std::fs::canonicalize(&link).ok();
            let action = format!(
                "recorded the attachment to the appliance{}",
                if device.is_some() {
                    " with its device"
                } else {
                    ""
                }
            );
            let change = DbRepair::RecordOnAppliance {
                device: device.as_ref().map(|d| d.display().to_string()),
                stable: device.as_ref().map(|_| link.display().to_string()),
            };
            let repair = self
                .repair(apply, *vol, busy, "attached_not_recorded", &action, change)
                .await?;
            out.push(Drift {
                kind: "attached_not_recorded",
                volume: Some(*vol),
                export: None,
                detail: match recorded {
                    Some((vm, _)) => {
                        format!("the backend has it on the appliance; recorded on VM {vm}")
                    }
                    None => "the backend has it on the appliance; no attachment recorded".into(),
                },
                repair,
            });
        }
        for (vol, (vm, _)) in &snap.attachments {
            if *vm != self.appliance_vm || snap.backend.contains(vol) {
                continue;
            }
            // Recorded on the appliance, not there per the backend: the
            // backend is the truth.
            let actual = self
                .backend
                .volume(*vol)
                .await
                .ok()
                .and_then(|s| s.attached_to);
            let action = match actual {
                Some(other) => format!("recorded the attachment to VM {other}"),
                None => "removed the attachment (and its export) record".to_owned(),
            };
            let change = match actual {
                Some(other) => DbRepair::MoveTo(other),
                None => DbRepair::Forget,
            };
            let repair = self
                .repair(apply, *vol, busy, "recorded_not_attached", &action, change)
                .await?;
            out.push(Drift {
                kind: "recorded_not_attached",
                volume: Some(*vol),
                export: None,
                detail: format!(
                    "recorded on the appliance; the backend has it {}",
                    actual
                        .map(|v| format!("on VM {v}"))
                        .unwrap_or_else(|| "detached".into())
                ),
                repair,
            });
        }
        Ok(())
    }

    async fn check_exports(
        &self,
        snap: &Snapshot,
        busy: &BTreeSet<Uuid>,
        apply: bool,
        out: &mut Vec<Drift>,
    ) -> Result<()> {
        for (name, vol) in &snap.exports {
            if let Some(path) = snap.configured.get(name) {
                let expected = self.device_dir.join(by_id_name(*vol));
                if *path != expected {
                    let repair = match () {
                        _ if busy.contains(vol) => {
                            "skipped: an operation on the volume is in progress".to_owned()
                        }
                        _ if !apply => format!("would repair: {WRONG_TARGET_ACTION}"),
                        _ => self.withdraw_wrong_target(name, *vol, &expected).await,
                    };
                    out.push(Drift {
                        kind: "wrong_export_target",
                        volume: Some(*vol),
                        export: Some(name.clone()),
                        detail: format!(
                            "configured to serve {}, not the volume's by-id link {}",
                            path.display(),
                            expected.display()
                        ),
                        repair,
                    });
                    continue;
                }
                if let Ok(listed) = &snap.listed {
                    if !listed.contains(name) {
                        out.push(Drift {
                            kind: "export_not_live",
                            volume: Some(*vol),
                            export: Some(name.clone()),
                            detail: "configured and recorded, but the NBD server does not list it"
                                .into(),
                            repair: "left for an operator: the export manager reloads or restarts \
                                     the server; check `volumed exports`"
                                .into(),
                        });
                    }
                }
                continue;
            }
            let repair = self
                .repair(
                    apply,
                    *vol,
                    busy,
                    "recorded_export_missing",
                    "removed the export record",
                    DbRepair::ForgetExport,
                )
                .await?;
            out.push(Drift {
                kind: "recorded_export_missing",
                volume: Some(*vol),
                export: Some(name.clone()),
                detail: "recorded, but not in the NBD configuration (not served)".into(),
                repair,
            });
        }
        for (name, path) in &snap.configured {
            // Another daemon may share this configuration: its records count.
            if snap.exports.contains_key(name) || snap.recorded_anywhere.contains(name) {
                continue;
            }
            // Only exports named like volumed's (`vol-<uuid>`) are its
            // business; an operator's own sections are left alone.
            let Some(vol) = ExportName::parse(name).ok().and_then(|n| n.volume()) else {
                continue;
            };
            let vol = Some(vol);
            let repair = match vol {
                Some(v) if busy.contains(&v) => {
                    "skipped: an operation on the volume is in progress".into()
                }
                _ if !apply => "would repair: withdraw it".into(),
                _ => self.withdraw_orphan(name, vol).await,
            };
            out.push(Drift {
                kind: "unrecorded_export",
                volume: vol,
                export: Some(name.clone()),
                detail: format!("configured (serving {}) but not recorded", path.display()),
                repair,
            });
        }
        match &snap.listed {
            Ok(listed) => {
                for name in listed {
                    if !snap.configured.contains_key(name) {
                        out.push(Drift {
                            kind: "stale_server_export",
                            volume: ExportName::parse(name).ok().and_then(|n| n.volume()),
                            export: Some(name.clone()),
                            detail: "the NBD server still lists it; it is not configured (new \
                                     connections are refused)"
                                .into(),
                            repair: "left for the export manager: dropped at its next idle \
                                     restart"
                                .into(),
                        });
                    }
                }
            }
            // Not a reason to fail the run (the other checks stand), but
            // never a silent pass either: the live checks were not made.
            Err(why) => out.push(Drift {
                kind: "live_listing_unavailable",
                volume: None,
                export: None,
                detail: format!(
                    "the NBD server at {}:{} did not list its exports ({why}); \
                     `export_not_live` and `stale_server_export` were not checked",
                    self.nbd.listen, self.nbd.port
                ),
                repair: "left for an operator: check that the NBD server runs \
                         (`volumed exports`, /health); a managed server that died is \
                         restarted by the export manager"
                    .into(),
            }),
        }
        Ok(())
    }

    /// Devices are looked at after the snapshot was taken: a volume whose
    /// operation runs or ended meanwhile may have gained or lost its link
    /// in between, so a busy volume is left out, as everywhere else.
    fn check_devices(&self, snap: &Snapshot, busy: &BTreeSet<Uuid>, out: &mut Vec<Drift>) {
        let known: BTreeMap<String, Uuid> = snap
            .backend
            .iter()
            .chain(snap.attachments.keys())
            .map(|v| (by_id_name(*v), *v))
            .collect();
        for link in &snap.links {
            let vol = known.get(link).copied();
            if vol.is_some_and(|v| snap.backend.contains(&v) || busy.contains(&v)) {
                continue;
            }
            out.push(Drift {
                kind: "device_without_attachment",
                volume: vol,
                export: None,
                detail: format!(
                    "{} exists but the backend has no such volume on the appliance",
                    self.device_dir.join(link).display()
                ),
                repair: "left for an operator: the device belongs to the hypervisor".into(),
            });
        }
        for (vol, (vm, stable)) in &snap.attachments {
            let Some(stable) = stable else { continue };
            if *vm == self.appliance_vm
                && snap.backend.contains(vol)
                && !busy.contains(vol)
                && !Path::new(stable).exists()
            {
                out.push(Drift {
                    kind: "attachment_without_device",
                    volume: Some(*vol),
                    export: None,
                    detail: format!("attached to the appliance but {stable} is missing"),
                    repair: "left for an operator: detach and attach the volume again".into(),
                });
            }
        }
    }

    /// Operations running for longer than `stuck_after`: their message is
    /// gone (purged, or lost with a deleted queue), or they would have
    /// finished. With `apply` they fail with `abandoned` and an event.
    async fn check_stuck(&self, apply: bool, out: &mut Vec<Drift>) -> Result<()> {
        let cutoff = Utc::now() - chrono::Duration::from_std(self.stuck_after)?;
        let rows: Vec<StuckRow> = sqlx::query_as(
            "SELECT request_id, op, volume_id, vm_id, attempts, step FROM operations
              WHERE host = $1 AND state = 'running' AND updated_at < $2",
        )
        .bind(&self.host)
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        for (request_id, op, volume, vm, attempts, step) in rows {
            let repair = if apply {
                match self.abandon(request_id, &op, volume, vm, attempts).await {
                    Ok(true) => "repaired: failed it with `abandoned` and its event".into(),
                    Ok(false) => "skipped: it finished meanwhile".into(),
                    Err(e) => format!("repair failed: {e:#}"),
                }
            } else {
                "would repair: fail it with `abandoned`".into()
            };
            out.push(Drift {
                kind: "stuck_operation",
                volume,
                export: None,
                detail: format!(
                    "{op} {request_id} has been running since before {} (step {step})",
                    cutoff.to_rfc3339()
                ),
                repair,
            });
        }
        Ok(())
    }

    async fn abandon(
        &self,
        request_id: Uuid,
        op: &str,
        volume: Option<Uuid>,
        vm: Option<Uuid>,
        attempts: i32,
    ) -> Result<bool> {
        let op = crate::contract::Op::parse(op).context("unknown op in the journal")?;
        let message = format!(
            "the operation did not finish within {:?} and nothing is left to finish it",
            self.stuck_after
        );
        let event = Event {
            event_id: Uuid::new_v4(),
            event_type: op.event_type(false),
            request_id,
            host: self.host.clone(),
            volume_id: volume,
            vm_id: vm,
            occurred_at: Utc::now(),
            device: None,
            export: None,
            error: Some(crate::contract::EventError {
                code: ErrorCode::Abandoned,
                message: message.clone(),
                retryable: true,
            }),
            attempts,
            cloud_device_id: None,
            repair: None,
        };
        let finish = crate::db::Finish {
            host: self.host.clone(),
            request_id,
            op: Some(op),
            volume_id: volume,
            vm_id: vm,
            error: Some((ErrorCode::Abandoned, message)),
            change: crate::db::AttachmentChange::None,
            outgoing: crate::db::Outgoing {
                event,
                correlation_id: None,
                reply_to: None,
                traceparent: None,
            },
        };
        Ok(crate::db::finish_operation(&self.pool, &finish).await?)
    }

    /// Applies one database repair with its `volume.reconciled` event in
    /// one transaction, unless the volume is busy.
    async fn repair(
        &self,
        apply: bool,
        volume: Uuid,
        busy: &BTreeSet<Uuid>,
        kind: &str,
        action: &str,
        change: DbRepair,
    ) -> Result<String> {
        if busy.contains(&volume) {
            return Ok("skipped: an operation on the volume is in progress".into());
        }
        if !apply {
            return Ok(format!("would repair: {action}"));
        }
        let mut tx = self.pool.begin().await?;
        // Checked again inside the transaction: an operation may have
        // started since the snapshot.
        if crate::db::volume_busy(&mut *tx, volume).await? {
            return Ok("skipped: an operation on the volume started meanwhile".into());
        }
        // And the drift itself: an operation that finished between the
        // snapshot's reads (its journal time is its transaction's start,
        // which can be earlier than this run) may have recorded it already.
        if let DbRepair::RecordOnAppliance { .. } = change {
            let recorded: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM volume_attachments
                                 WHERE volume_id = $1 AND vm_id = $2)",
            )
            .bind(volume)
            .bind(self.appliance_vm)
            .fetch_one(&mut *tx)
            .await?;
            if recorded {
                return Ok("skipped: recorded meanwhile".into());
            }
        }
        self.apply_db(&mut tx, volume, &change).await?;
        self.reconciled_event(&mut tx, volume, kind, action).await?;
        tx.commit().await?;
        Ok(format!("repaired: {action}"))
    }

    async fn apply_db(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        vol: Uuid,
        change: &DbRepair,
    ) -> Result<(), sqlx::Error> {
        match change {
            DbRepair::RecordOnAppliance { device, stable } => {
                sqlx::query(
                    "INSERT INTO volume_attachments
                        (volume_id, vm_id, host, device_path, stable_path, request_id)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (volume_id) DO UPDATE
                        SET vm_id = EXCLUDED.vm_id, host = EXCLUDED.host,
                            device_path = EXCLUDED.device_path,
                            stable_path = EXCLUDED.stable_path",
                )
                .bind(vol)
                .bind(self.appliance_vm)
                .bind(&self.host)
                .bind(device)
                .bind(stable)
                .bind(Uuid::nil())
                .execute(&mut **tx)
                .await?;
            }
            DbRepair::MoveTo(vm) => {
                sqlx::query("DELETE FROM nbd_exports WHERE volume_id = $1")
                    .bind(vol)
                    .execute(&mut **tx)
                    .await?;
                sqlx::query(
                    "UPDATE volume_attachments SET vm_id = $2, device_path = NULL,
                            stable_path = NULL WHERE volume_id = $1",
                )
                .bind(vol)
                .bind(vm)
                .execute(&mut **tx)
                .await?;
            }
            DbRepair::Forget => {
                let change = AttachmentChange::Remove { volume_id: vol };
                crate::db::apply_change(tx, &self.host, Uuid::nil(), &change).await?;
            }
            DbRepair::ForgetExport => {
                let change = AttachmentChange::RemoveExport { volume_id: vol };
                crate::db::apply_change(tx, &self.host, Uuid::nil(), &change).await?;
            }
        }
        Ok(())
    }

    async fn reconciled_event(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        volume: Uuid,
        kind: &str,
        action: &str,
    ) -> Result<(), sqlx::Error> {
        let event = Event {
            event_id: Uuid::new_v4(),
            event_type: EventType::Reconciled,
            request_id: Uuid::new_v4(),
            host: self.host.clone(),
            volume_id: Some(volume),
            vm_id: None,
            occurred_at: Utc::now(),
            device: None,
            export: None,
            error: None,
            attempts: 0,
            cloud_device_id: None,
            repair: Some(RepairInfo {
                kind: kind.to_owned(),
                action: action.to_owned(),
            }),
        };
        crate::db::insert_event(tx, &event).await
    }

    /// Takes the per-host export lock, the one the export manager takes.
    async fn lock_exports(&self) -> Result<nix::fcntl::Flock<std::fs::File>> {
        let lock = self.engine.lock_path();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock)?;
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", lock.display()))
        })
        .await?
    }

    /// Withdraws a recorded export whose configured path is not its
    /// volume's by-id link and removes its record, under the export lock,
    /// after checking again that no operation is on the volume and that the
    /// path is still wrong.
    async fn withdraw_wrong_target(&self, name: &str, vol: Uuid, expected: &Path) -> String {
        let Ok(export) = ExportName::parse(name) else {
            return "left for an operator: not a name volumed makes".into();
        };
        let _guard = match self.lock_exports().await {
            Ok(g) => g,
            Err(e) => return format!("repair failed: {e:#}"),
        };
        if crate::db::volume_busy(&self.pool, vol)
            .await
            .unwrap_or(true)
        {
            return "skipped: an operation on the volume started meanwhile".into();
        }
        let now = match self.engine.configured() {
            Ok(list) => list.into_iter().find(|(n, _)| n.as_str() == name),
            Err(e) => return format!("repair failed: cannot read the configuration again: {e}"),
        };
        match now {
            Some((_, path)) if path != expected => {}
            _ => return "skipped: corrected or withdrawn meanwhile".into(),
        }
        if let Err(e) = self.engine.withdraw(&export) {
            return format!("repair failed: {e}");
        }
        let recorded = async {
            let mut tx = self.pool.begin().await?;
            self.apply_db(&mut tx, vol, &DbRepair::ForgetExport).await?;
            self.reconciled_event(&mut tx, vol, "wrong_export_target", WRONG_TARGET_ACTION)
                .await?;
            tx.commit().await
        };
        match recorded.await {
            Ok(()) => format!("repaired: {WRONG_TARGET_ACTION}"),
            Err(e) => format!(
                "repair failed: withdrawn, but the record and its event could not be \
                 written: {e}"
            ),
        }
    }

    /// Withdraws an export nobody recorded, under the export lock, after
    /// checking once more that no operation is on its volume.
    async fn withdraw_orphan(&self, name: &str, vol: Option<Uuid>) -> String {
        let Ok(name) = ExportName::parse(name) else {
            return "left for an operator: not a name volumed makes".into();
        };
        let _guard = match self.lock_exports().await {
            Ok(g) => g,
            Err(e) => return format!("repair failed: {e:#}"),
        };
        if let Some(v) = vol {
            if crate::db::volume_busy(&self.pool, v).await.unwrap_or(true) {
                return "skipped: an operation on the volume started meanwhile".into();
            }
            // Or finished meanwhile, recording the export after all.
            let recorded: Result<i64, _> =
                sqlx::query_scalar("SELECT count(*) FROM nbd_exports WHERE export_name = $1")
                    .bind(name.as_str())
                    .fetch_one(&self.pool)
                    .await;
            if recorded.map(|n| n > 0).unwrap_or(true) {
                return "skipped: recorded meanwhile".into();
            }
        }
        if let Err(e) = self.engine.withdraw(&name) {
            return format!("repair failed: {e}");
        }
        if let Some(v) = vol {
            let mut tx = match self.pool.begin().await {
                Ok(tx) => tx,
                Err(e) => return format!("withdrawn; the event could not be recorded: {e}"),
            };
            let r = self
                .reconciled_event(&mut tx, v, "unrecorded_export", "withdrew the export")
                .await;
            if let Err(e) = r.and(tx.commit().await) {
                return format!("withdrawn; the event could not be recorded: {e}");
            }
        }
        "repaired: withdrew the export".into()
    }
}

/// When the daemon reconciles and whether it repairs: the settings
/// `VOLUMED_RECONCILE_INTERVAL_SECS` and `VOLUMED_RECONCILE_APPLY`, which a
/// configuration reload may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub apply: bool,
    /// `None`: at start-up only.
    pub interval: Option<Duration>,
}

/// The daemon's reconciliations: once at start-up (after a short delay, so
/// the export manager has its server up), then every `interval`. A new
/// schedule takes effect at once: the next run is one new interval after
/// the change (none when the new interval is `None`), since the time
/// already waited was measured against the old one.
pub async fn periodic(
    r: Reconciler,
    mut schedule: tokio::sync::watch::Receiver<Schedule>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut wait = Some(Duration::from_secs(5));
    let mut started = false;
    let mut watching = true;
    loop {
        let sleep = async {
            match wait {
                Some(w) => tokio::time::sleep(w).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sleep => {}
            changed = schedule.changed(), if watching => {
                // The sender is gone when the daemon stops: keep the last
                // schedule instead of waking up in a loop.
                watching = changed.is_ok();
                if started {
                    wait = schedule.borrow().interval;
                }
                continue;
            }
        }
        started = true;
        let apply = schedule.borrow().apply;
        let outcome = r.run(apply).await;
        let counted = match &outcome {
            Ok(report) if report.drifts.is_empty() => "clean",
            Ok(_) => "drift",
            Err(_) => "failed",
        };
        crate::metrics::get()
            .reconciliations
            .with_label_values(&[counted])
            .inc();
        match outcome {
            Ok(report) if report.drifts.is_empty() => {
                tracing::debug!(host = %r.host, "reconciled: no drift")
            }
            Ok(report) => {
                for d in &report.drifts {
                    tracing::warn!(host = %r.host, drift = d.kind, volume.id = ?d.volume,
                                   export = ?d.export, detail = %d.detail, repair = %d.repair,
                                   "drift found");
                }
            }
            Err(e) => {
                tracing::warn!(host = %r.host, cause = %format!("{e:#}"), "reconciliation failed")
            }
        }
        wait = schedule.borrow().interval;
    }
}
