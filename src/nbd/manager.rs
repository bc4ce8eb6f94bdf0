//! The export manager: the only code that changes a host's exports.
//!
//! One task owns the engine, so changes inside this process are serialised
//! by construction; an `flock` on the engine's lock file serialises them
//! with other processes (a second daemon, an operator script). Changes that
//! arrive together are applied as one batch: one lock hold, one restart or
//! reload (a reload that does not take is repeated, see
//! [`Manager::make_visible`]), then a live check of each change through the
//! NBD protocol, and each waiting operation gets its own outcome.
//!
//! The task also watches the server: a managed server that died is
//! restarted, every recorded export is written again if it went missing and
//! checked through the protocol, all before the next batch; with nbd-server,
//! sections the server still holds after a removal are dropped by a
//! restart, done only while no client is connected.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::unistd::Pid;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::process::{self, ServerProcess};
use super::proto::{self, NbdError, Open};
use super::{Engine, ExportName, ExportSpec, InvalidExport};
use crate::config::{NbdConfig, NbdEngineKind};
use crate::db::{self, NbdStats};
use crate::health::Health;

/// How often the manager looks at the server between batches.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// How long an idle server (no client connected) gets to exit on SIGTERM
/// before SIGKILL. nbd-server acts on SIGTERM only when its accept loop
/// wakes, which an idle server's does not; with nobody connected, the kill
/// costs nothing.
const IDLE_STOP: Duration = Duration::from_millis(300);
/// Most changes applied in one batch.
const MAX_BATCH: usize = 512;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Invalid(#[from] InvalidExport),
    /// The change could not be made or verified; trying again may work.
    #[error("{0}")]
    Failed(String),
    /// Clients are still connected to a withdrawn export.
    #[error("{0}")]
    Busy(String),
    #[error("the export manager is stopping")]
    Stopped,
}

enum Change {
    Add(ExportSpec),
    Withdraw(ExportName),
}

impl Change {
    /// The export the change is about.
    fn name(&self) -> &str {
        match self {
            Change::Add(spec) => spec.name.as_str(),
            Change::Withdraw(name) => name.as_str(),
        }
    }
}

/// Why the manager makes sure the server runs; it decides what is done for
/// the recorded exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// volumed starts. A recorded export missing from the configuration
    /// may be one whose withdrawal was under way when volumed stopped: it
    /// is reported, not written back.
    Startup,
    /// volumed stopped an idle server on purpose (to add exports or drop
    /// stale sections); the configuration it restarts on is the one just
    /// changed under the lock, so one listing reports on it.
    Planned,
    /// The server was found dead. Every export the database records is
    /// made served again before the next change: written back if missing
    /// (unless this manager withdrew it) and checked one by one.
    Crash,
}

struct Request {
    change: Change,
    reply: oneshot::Sender<Result<(), ExportError>>,
    /// Told when an add is written and synced, before the reload and the
    /// live check (the worker records the step `export_written`).
    written: Option<oneshot::Sender<()>>,
}

/// The handle workers use.
pub struct Exports {
    tx: mpsc::Sender<Request>,
    pub kind: NbdEngineKind,
    pub listen: String,
    pub port: u16,
    server: ServerProcess,
    drain_timeout: Duration,
}

impl Exports {
    /// Starts the manager task. It stops (and stops a managed server) when
    /// `stop` is cancelled; the returned handle completes then.
    pub fn start(
        cfg: &NbdConfig,
        host: &str,
        pool: PgPool,
        health: Arc<Health>,
        stop: CancellationToken,
    ) -> (Arc<Exports>, tokio::task::JoinHandle<()>) {
        let engine = super::engine_for(cfg);
        let server = ServerProcess {
            pidfile: cfg.pidfile.clone(),
            program: engine.program(),
        };
        let (tx, rx) = mpsc::channel(1024);
        let handle = Arc::new(Exports {
            tx,
            kind: cfg.engine,
            listen: cfg.listen.clone(),
            port: cfg.port,
            server: server.clone(),
            drain_timeout: cfg.drain_timeout,
        });
        let prober = Arc::new(Prober {
            cfg: cfg.clone(),
            server: server.clone(),
            few: tokio::sync::Semaphore::new(match cfg.engine {
                NbdEngineKind::NbdServer => 4,
                NbdEngineKind::Nbdkit => 32,
            }),
        });
        let manager = Manager {
            engine,
            server,
            prober,
            cfg: cfg.clone(),
            host: host.to_owned(),
            pool,
            pending: NbdStats::default(),
            health,
            withdrawn: HashSet::new(),
        };
        let task = tokio::spawn(manager.run(rx, stop));
        (handle, task)
    }

    async fn ask(
        &self,
        change: Change,
        written: Option<oneshot::Sender<()>>,
    ) -> Result<(), ExportError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                change,
                reply,
                written,
            })
            .await
            .map_err(|_| ExportError::Stopped)?;
        rx.await.map_err(|_| ExportError::Stopped)?
    }

    /// Serves `spec` and confirms through the protocol that it is live.
    pub async fn add(&self, spec: ExportSpec) -> Result<(), ExportError> {
        spec.validate()?;
        self.ask(Change::Add(spec), None).await
    }

    /// [`Exports::add`], telling `written` once the export is written to
    /// the configuration and synced, before it is made visible and checked.
    /// `written` is dropped unsent when the write fails.
    pub async fn add_noting_write(
        &self,
        spec: ExportSpec,
        written: oneshot::Sender<()>,
    ) -> Result<(), ExportError> {
        spec.validate()?;
        self.ask(Change::Add(spec), Some(written)).await
    }

    /// Stops new connections to `name` and confirms they are refused.
    pub async fn withdraw(&self, name: ExportName) -> Result<(), ExportError> {
        self.ask(Change::Withdraw(name), None).await
    }

    /// Waits until no client of the server holds `device` open, up to the
    /// drain timeout. A withdrawn export refuses new connections, but a
    /// client connected before keeps its connection: detaching the volume
    /// under it would fail its writes.
    pub async fn wait_released(&self, device: &Path) -> Result<(), ExportError> {
        let deadline = Instant::now() + self.drain_timeout;
        loop {
            // nbd-server forks a process per client; nbdkit serves its
            // clients on threads, which share the server's descriptors, so
            // its children need no search (a walk over every process).
            let forks = self.kind == NbdEngineKind::NbdServer;
            let held = self
                .server
                .pid()
                .map(|pid| process::holds_open(pid, device, forks))
                .unwrap_or(false);
            if !held {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ExportError::Busy(format!(
                    "a client is still connected to {} after {:?}; the export is withdrawn \
                     (new connections are refused) and the volume stays attached",
                    device.display(),
                    self.drain_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Manager {
    engine: Arc<dyn Engine>,
    server: ServerProcess,
    prober: Arc<Prober>,
    cfg: NbdConfig,
    host: String,
    pool: PgPool,
    /// Counters not yet written to the database.
    pending: NbdStats,
    health: Arc<Health>,
    /// Recorded exports this manager took out of the configuration on
    /// purpose (withdrawn, an add undone, or found missing at start-up):
    /// a detach keeps its row until the backend has detached, and a
    /// recovery after a crash must not serve such an export again.
    withdrawn: HashSet<String>,
}

impl Manager {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, stop: CancellationToken) {
        // Nothing is changed before the server runs and the recorded exports
        // are in place.
        loop {
            match self.recover(Recovery::Startup).await {
                Ok(()) => {
                    self.health.set_nbd(true);
                    break;
                }
                Err(e) => {
                    error!(host = %self.host, engine = self.cfg.engine.as_str(),
                           cause = %format!("{e:#}"), "NBD server not usable; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return self.shutdown(rx).await,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        }
        let mut watch = tokio::time::interval(WATCH_EVERY);
        let mut flushed = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                first = rx.recv() => match first {
                    // One batch at a time: while its checks run, the next
                    // changes queue up and form the next batch, which then
                    // costs one lock, one sync, one listing and at most one
                    // reload for all of them. (Checking a batch while the
                    // next is written was measured slower: smaller batches,
                    // a listing each.)
                    Some(first) => {
                        let batch = self.gather(first, &mut rx).await;
                        if let Some(written) = self.write_batch(batch).await {
                            let checked = written.check().await;
                            self.finish_batch(checked).await;
                        }
                    }
                    None => break,
                },
                _ = watch.tick() => self.watch().await,
            }
            // The counters are for reports: written when the manager is
            // idle, and at least every second of a long burst, rather
            // than a commit per batch.
            if rx.is_empty() || flushed.elapsed() >= Duration::from_secs(1) {
                self.flush_stats().await;
                flushed = Instant::now();
            }
        }
        self.shutdown(rx).await;
    }

    async fn shutdown(mut self, mut rx: mpsc::Receiver<Request>) {
        rx.close();
        while let Some(r) = rx.recv().await {
            let _ = r.reply.send(Err(ExportError::Stopped));
        }
        if self.cfg.manage {
            info!(host = %self.host, engine = self.cfg.engine.as_str(), "stopping the NBD server");
            self.server.stop(Duration::from_secs(5)).await;
        }
        self.flush_stats().await;
    }

    /// Collects the changes that arrived together. With nbd-server every
    /// batch may cost a reload, so it waits the batch window for more.
    async fn gather(&self, first: Request, rx: &mut mpsc::Receiver<Request>) -> Vec<Request> {
        let mut batch = vec![first];
        let window = match self.cfg.engine {
            NbdEngineKind::NbdServer => self.cfg.batch_window,
            NbdEngineKind::Nbdkit => Duration::ZERO,
        };
        let deadline = Instant::now() + window;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) if window.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => batch.push(r),
                    Ok(None) | Err(_) => break,
                },
            }
        }
        batch
    }

    async fn lock(&self) -> Result<Flock<std::fs::File>> {
        let path = self.engine.lock_path();
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open the lock file {}", path.display()))?;
            // Blocks while another process changes the exports; they hold
            // it only for a batch.
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow!("cannot lock {}: {e}", path.display()))
        })
        .await
        .context("lock task failed")?
    }

    /// Makes sure the server runs and holds every recorded export; what is
    /// done for the recorded exports depends on `why` (see [`Recovery`]).
    async fn recover(&mut self, why: Recovery) -> Result<()> {
        let _lock = self.lock().await?;
        self.recover_locked(why).await
    }

    /// [`Manager::recover`] with the lock already held.
    async fn recover_locked(&mut self, why: Recovery) -> Result<()> {
        self.engine.prepare()?;
        let rows = db::exports(&self.pool, Some(&self.host)).await?;
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.engine == self.cfg.engine.as_str())
            .collect();
        let recorded: HashSet<&str> = rows.iter().map(|r| r.export_name.as_str()).collect();
        // A name whose row is gone needs no more remembering.
        self.withdrawn.retain(|n| recorded.contains(n.as_str()));
        let mut configured: HashSet<String> = self
            .engine
            .configured()?
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        let missing = rows.iter().filter(|r| !configured.contains(&r.export_name));
        match why {
            Recovery::Startup => {
                for row in missing {
                    warn!(export = %row.export_name, volume.id = %row.volume_id,
                          "recorded export is missing from the NBD configuration");
                    self.withdrawn.insert(row.export_name.clone());
                }
            }
            Recovery::Crash => {
                // Written before the server starts, so it reads them.
                let lost: Vec<_> = missing
                    .filter(|r| !self.withdrawn.contains(&r.export_name))
                    .collect();
                for row in &lost {
                    match self.rewrite(row) {
                        Ok(()) => {
                            warn!(export = %row.export_name, volume.id = %row.volume_id,
                                  "recorded export was missing from the NBD configuration; \
                                   written again");
                            configured.insert(row.export_name.clone());
                        }
                        Err(e) => {
                            error!(export = %row.export_name, volume.id = %row.volume_id,
                                   cause = %e, "cannot write a recorded export again")
                        }
                    }
                }
                if !lost.is_empty() {
                    self.engine.sync()?;
                }
            }
            Recovery::Planned => {}
        }
        let pid = match (self.server.pid(), self.cfg.manage) {
            (Some(pid), _) => {
                info!(host = %self.host, pid = pid.as_raw(), engine = self.cfg.engine.as_str(),
                      "NBD server running; adopting it");
                self.catch_up(pid, &configured).await?
            }
            (None, true) => self.start_server().await?,
            (None, false) => {
                return Err(anyhow!(
                    "no NBD server runs according to {} and VOLUMED_NBD_MANAGE=false",
                    self.cfg.pidfile.display()
                ))
            }
        };
        let serving = self.list_until_up().await?;
        self.engine.started(&serving);
        debug!(
            pid = pid.as_raw(),
            exports = serving.len(),
            "NBD server serving"
        );
        if why == Recovery::Crash {
            // Each export checked (listed and opened), a few at a time,
            // before the batch that waits for this recovery proceeds. An
            // export that still fails is reported and left to the
            // reconciler: holding every change back for one broken device
            // would stop the host.
            let expected: Vec<&str> = rows
                .iter()
                .map(|r| r.export_name.as_str())
                .filter(|n| configured.contains(*n))
                .collect();
            let failed = self.prober.check_names(&expected).await;
            for (name, why) in &failed {
                error!(export = %name, cause = %why,
                       "recorded export is not served after the NBD server restart");
            }
            info!(host = %self.host, exports = expected.len(), failed = failed.len(),
                  "recorded exports checked after the NBD server restart");
            return Ok(());
        }
        // Otherwise one listing for all recorded exports: at start-up this
        // is a report (a withdrawal may have been under way), and after a
        // planned restart of a server on the configuration just written, a
        // probe per export would hold up every change behind it on a server
        // with many exports. With TLS required the built-in client gets no
        // listing; each export's own check happens when it is next changed.
        for row in rows.iter().filter(|r| !serving.contains(&r.export_name)) {
            if self.cfg.tls_psk.is_none() {
                warn!(export = %row.export_name, volume.id = %row.volume_id,
                      "recorded export is not listed by the NBD server");
            }
        }
        Ok(())
    }

    /// Writes a recorded export back into the configuration, validated as
    /// any new one is.
    fn rewrite(&self, row: &db::ExportRow) -> Result<()> {
        let spec = ExportSpec {
            name: ExportName::parse(&row.export_name)?,
            volume: row.volume_id,
            path: row.stable_path.clone().into(),
        };
        spec.validate()?;
        self.engine.write_unsynced(&spec)?;
        Ok(())
    }

    /// Checks that each of `names` is served, a few at a time; returns the
    /// ones that are not, with why.
    /// An adopted server may lack exports written while nobody watched it
    /// (volumed died between writing and reloading). Then a managed idle
    /// server is restarted; otherwise it is reloaded once.
    async fn catch_up(&mut self, pid: Pid, configured: &HashSet<String>) -> Result<Pid> {
        // nbdkit serves its directory as it is at each connection: there is
        // nothing to catch up on, and under TLS the built-in client cannot
        // list it, so an empty listing would restart a server whose clients
        // (threads, not child processes) look like none.
        if self.cfg.engine == NbdEngineKind::Nbdkit && self.cfg.tls_psk.is_some() {
            return Ok(pid);
        }
        let listed = self.list_until_up().await.unwrap_or_default();
        if configured.iter().all(|n| listed.contains(n)) {
            return Ok(pid);
        }
        if self.cfg.manage && process::children(pid).is_empty() {
            info!(host = %self.host, "adopted NBD server lacks configured exports; restarting it");
            self.server.stop(IDLE_STOP).await;
            return self.start_server().await;
        }
        match self.engine.reload(pid) {
            Some(Ok(())) => {
                self.pending.reloads += 1;
                crate::metrics::get()
                    .nbd_reloads
                    .with_label_values(&[self.cfg.engine.as_str()])
                    .inc();
                info!(host = %self.host, "adopted nbd-server reloaded to read configured exports");
            }
            Some(Err(e)) => warn!(cause = %e, "cannot signal the NBD server"),
            None => {}
        }
        Ok(pid)
    }

    async fn start_server(&mut self) -> Result<Pid> {
        let cmd = self.engine.server_command(&self.cfg.pidfile);
        let pid = self
            .server
            .start(cmd, Duration::from_secs(10))
            .await
            .with_context(|| format!("starting {}", self.engine.program()))?;
        self.pending.restarts += 1;
        crate::metrics::get()
            .nbd_restarts
            .with_label_values(&[self.cfg.engine.as_str()])
            .inc();
        info!(host = %self.host, pid = pid.as_raw(), engine = self.cfg.engine.as_str(),
              port = self.cfg.port, "NBD server started");
        Ok(pid)
    }

    /// Lists exports, waiting for a just-started server to accept
    /// connections.
    async fn list_until_up(&self) -> Result<Vec<String>> {
        let deadline = Instant::now() + self.cfg.check_timeout;
        loop {
            match proto::list(&self.cfg.listen, self.cfg.port, self.cfg.check_timeout).await {
                Ok(names) => return Ok(names),
                // The server answers; what it serves is checked per export.
                Err(NbdError::TlsRequired) => return Ok(Vec::new()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(anyhow!(e)).context("the NBD server does not answer")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Between batches: restart a managed server that died; drop stale
    /// nbd-server sections when no client is connected.
    async fn watch(&mut self) {
        self.health.set_nbd(self.server.pid().is_some());
        if self.server.pid().is_none() {
            if self.cfg.manage {
                error!(host = %self.host, engine = self.cfg.engine.as_str(),
                       "NBD server is gone; restarting it");
                self.pending.crashes += 1;
                if let Err(e) = self.recover(Recovery::Crash).await {
                    error!(cause = %format!("{e:#}"), "NBD server restart failed; will retry");
                }
            }
            return;
        }
        let stale = self.engine.stale();
        if stale.is_empty() || !self.cfg.manage {
            return;
        }
        let Some(pid) = self.server.pid() else { return };
        let clients = process::children(pid).len();
        if clients > 0 {
            debug!(
                clients,
                stale = stale.len(),
                "stale sections kept while clients are connected"
            );
            return;
        }
        info!(stale = ?stale, "restarting the idle NBD server to drop removed exports");
        self.server.stop(IDLE_STOP).await;
        if let Err(e) = self.recover(Recovery::Planned).await {
            error!(cause = %format!("{e:#}"), "NBD server restart failed; will retry");
        }
    }

    /// Writes every change of a batch under the lock, with one directory
    /// sync and at most one restart or reload for all of them. `None` when
    /// nothing could be written (every requester has its answer already).
    async fn write_batch(&mut self, batch: Vec<Request>) -> Option<Written> {
        let began = Instant::now();
        let lock = match self.lock().await {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("{e:#}");
                for r in batch {
                    let _ = r.reply.send(Err(ExportError::Failed(msg.clone())));
                }
                return None;
            }
        };
        if self.server.pid().is_none() && self.cfg.manage {
            self.pending.crashes += 1;
            if let Err(e) = self.recover_locked(Recovery::Crash).await {
                let msg = format!("the NBD server is down and cannot be restarted: {e:#}");
                for r in batch {
                    let _ = r.reply.send(Err(ExportError::Failed(msg.clone())));
                }
                return None;
            }
        }

        // 1. Write every change.
        let mut outcomes: Vec<Option<Result<(), ExportError>>> = Vec::with_capacity(batch.len());
        let mut reload = false;
        for r in &batch {
            let result = match &r.change {
                Change::Add(spec) => {
                    self.withdrawn.remove(spec.name.as_str());
                    self.engine
                        .write_unsynced(spec)
                        .map(|needs| reload |= needs)
                }
                Change::Withdraw(name) => {
                    // Even a withdrawal that fails half-way was asked for:
                    // never served again by a recovery.
                    self.withdrawn.insert(name.to_string());
                    self.engine.withdraw_unsynced(name)
                }
            };
            outcomes.push(
                result
                    .err()
                    .map(|e| Err(ExportError::Failed(e.to_string()))),
            );
        }
        // One directory sync for the batch. Without it a change is not
        // known to survive a power cut, so none is reported done; an add
        // reported failed must not stay served (the server already sees
        // it), so it is taken back. That is best effort: the sync may fail
        // again, and the reconciler reports what is left.
        if let Err(e) = self.engine.sync() {
            let msg = format!("cannot sync the export directory: {e}");
            for (r, o) in batch.iter().zip(outcomes.iter_mut()) {
                if o.is_some() {
                    continue;
                }
                if let Change::Add(spec) = &r.change {
                    self.withdrawn.insert(spec.name.to_string());
                    if let Err(e) = self.engine.withdraw(&spec.name) {
                        error!(export = %spec.name, cause = %e, "cannot undo an unsynced export");
                    }
                }
                *o = Some(Err(ExportError::Failed(msg.clone())));
            }
        }
        self.pending.changes += batch.len() as i64;
        let mut batch = batch;
        for (r, o) in batch.iter_mut().zip(&outcomes) {
            if let (Some(written), None) = (r.written.take(), o) {
                // The worker may have gone; then nobody needs to know.
                let _ = written.send(());
            }
        }

        // 2. One restart or reload for the whole batch (repeated only when
        //    a reload does not take).
        if reload {
            let added: Vec<String> = batch
                .iter()
                .zip(&outcomes)
                .filter_map(|(r, o)| match (&r.change, o) {
                    (Change::Add(spec), None) => Some(spec.name.to_string()),
                    _ => None,
                })
                .collect();
            self.make_visible(&added, batch.len()).await;
        }

        // The checks run without the lock: they only read, and another
        // process may need the lock meanwhile (to restart a server that
        // died, say).
        drop(lock);
        Some(Written {
            prober: Arc::clone(&self.prober),
            batch,
            outcomes,
            write: began.elapsed(),
        })
    }

    /// Recovers a server the batch's changes crashed and checks again,
    /// undoes adds that are not live, and answers every requester.
    async fn finish_batch(&mut self, checked: Checked) {
        let Checked {
            batch,
            outcomes,
            mut results,
        } = checked;
        let dead = self.server.pid().is_none();
        if dead && self.cfg.manage && results.iter().any(|r| matches!(r, Some(Err(_)))) {
            // The change crashed the server: restart it (which reads every
            // section) and check again what failed.
            warn!(host = %self.host, "NBD server died during the change; recovering");
            self.pending.crashes += 1;
            match self.recover(Recovery::Crash).await {
                Ok(()) => {
                    let retry: Vec<Option<Result<(), ExportError>>> = results
                        .iter()
                        .map(|r| match r {
                            Some(Err(_)) => None,
                            _ => Some(Ok(())),
                        })
                        .collect();
                    let again = self.prober.check_all(&batch, &retry).await;
                    for (r, a) in results.iter_mut().zip(again) {
                        if a.is_some() {
                            *r = a;
                        }
                    }
                }
                Err(e) => error!(cause = %format!("{e:#}"), "NBD server restart failed"),
            }
        }

        // 4. Undo adds that are not live, under the lock again.
        let undo: Vec<&ExportName> = batch
            .iter()
            .zip(&results)
            .filter_map(|(r, res)| match (&r.change, res) {
                (Change::Add(spec), Some(Err(_))) => Some(&spec.name),
                _ => None,
            })
            .collect();
        if !undo.is_empty() {
            match self.lock().await {
                Ok(_lock) => {
                    for name in undo {
                        self.withdrawn.insert(name.to_string());
                        if let Err(e) = self.engine.withdraw(name) {
                            error!(export = %name, cause = %e, "cannot undo a failed export");
                        }
                    }
                }
                Err(e) => error!(cause = %format!("{e:#}"), "cannot undo failed exports"),
            }
        }
        for ((r, outcome), checked) in batch.into_iter().zip(outcomes).zip(results) {
            let result = outcome
                .or(checked)
                .unwrap_or_else(|| Err(ExportError::Failed("not applied".into())));
            let _ = r.reply.send(result);
        }
    }

    /// Makes a running nbd-server serve the exports just added.
    ///
    /// While no client is connected, a restart does it: it reads every
    /// section, drops stale ones, costs nobody a connection, and cannot hit
    /// the reload crash of nbd-server 3.24. With clients connected, a SIGHUP
    /// does it (a restart would cut them off); when the reload does not take
    /// (the server ignored it, or crashed), it is repeated or the server
    /// recovered.
    async fn make_visible(&mut self, added: &[String], changes: usize) {
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let Some(pid) = self.server.pid() else {
                if self.cfg.manage {
                    self.pending.crashes += 1;
                    if let Err(e) = self.recover_locked(Recovery::Crash).await {
                        error!(cause = %format!("{e:#}"), "NBD server restart failed");
                    }
                }
                return;
            };
            if self.cfg.manage && process::children(pid).is_empty() {
                info!(host = %self.host, changes, "no client connected: restarting nbd-server to add exports");
                self.server.stop(IDLE_STOP).await;
                if let Err(e) = self.recover_locked(Recovery::Planned).await {
                    error!(cause = %format!("{e:#}"), "NBD server restart failed");
                }
                return;
            }
            match self.engine.reload(pid) {
                Some(Ok(())) => {
                    self.pending.reloads += 1;
                    crate::metrics::get()
                        .nbd_reloads
                        .with_label_values(&[self.cfg.engine.as_str()])
                        .inc();
                    info!(host = %self.host, changes, attempt, "nbd-server reloaded");
                }
                Some(Err(e)) => warn!(cause = %e, "cannot signal nbd-server"),
                None => return,
            }
            // nbd-server acts on SIGHUP between two connections: give it a
            // moment, then look.
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                let listed = proto::list(&self.cfg.listen, self.cfg.port, self.cfg.check_timeout)
                    .await
                    .unwrap_or_default();
                if added.iter().all(|a| listed.contains(a)) {
                    return;
                }
                if self.server.pid().is_none() || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            warn!(attempt, "nbd-server did not take the reload");
        }
    }

    async fn flush_stats(&mut self) {
        if self.pending == NbdStats::default() {
            return;
        }
        match db::bump_nbd_stats(
            &self.pool,
            &self.host,
            self.cfg.engine.as_str(),
            &self.pending,
        )
        .await
        {
            Ok(()) => self.pending = NbdStats::default(),
            Err(e) => debug!(cause = %e, "cannot record NBD counters yet"),
        }
    }
}

/// A batch written, its checks not yet run.
struct Written {
    prober: Arc<Prober>,
    batch: Vec<Request>,
    outcomes: Vec<Option<Result<(), ExportError>>>,
    /// How long the writing took, lock and reload included.
    write: Duration,
}

/// A batch with the outcome of its checks.
struct Checked {
    batch: Vec<Request>,
    outcomes: Vec<Option<Result<(), ExportError>>>,
    results: Vec<Option<Result<(), ExportError>>>,
}

impl Written {
    /// Runs the live checks of every change that has no outcome yet.
    async fn check(self) -> Checked {
        let started = Instant::now();
        let results = self.prober.check_all(&self.batch, &self.outcomes).await;
        debug!(
            changes = self.batch.len(),
            write_ms = self.write.as_millis() as u64,
            check_ms = started.elapsed().as_millis() as u64,
            "export batch applied and checked"
        );
        Checked {
            batch: self.batch,
            outcomes: self.outcomes,
            results,
        }
    }
}

/// What the server answered to an open.
type Opened = Result<Open, NbdError>;

/// What a batch's check learned of one change: whether the batch's listing
/// showed it, and the answer to its open (none for an add the listing
/// missed).
type Answer = (bool, Option<Opened>);

/// The live checks. They only read: they connect to the server like any
/// client, and own what they need, so a batch's checks hold no borrow of
/// the manager.
struct Prober {
    cfg: NbdConfig,
    server: ServerProcess,
    /// How many live checks run at once. nbd-server negotiates each
    /// connection before it forks, so dozens of simultaneous probes queue
    /// up behind each other and time out: four at a time. nbdkit serves
    /// each connection on a thread of its own, and a wave's checks are
    /// most of an attach's time: 32.
    few: tokio::sync::Semaphore,
}

impl Prober {
    /// Checks every change of a batch that has no outcome yet, a few at a
    /// time.
    async fn check_all(
        &self,
        batch: &[Request],
        outcomes: &[Option<Result<(), ExportError>>],
    ) -> Vec<Option<Result<(), ExportError>>> {
        // One listing for the whole batch, then each change opened on its
        // own: a listing costs the server a walk over every export (nbdkit
        // reads its whole export directory), so one per export would make
        // a wave's checks grow with the square of its size. An add missing
        // from that listing (a reload not taken yet) gets the full check,
        // with its retries.
        let pending: Vec<&Change> = batch
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| o.is_none())
            .map(|(r, _)| &r.change)
            .collect();
        let adds = pending.iter().any(|c| matches!(c, Change::Add(_)));
        let answers = match self.survey(&pending, adds).await {
            Some(answers) => answers,
            None => self.ask_each(&pending, adds).await,
        };
        let mut answers = answers.into_iter();
        let checks = batch.iter().zip(outcomes).map(|(r, o)| {
            let answer = if o.is_none() { answers.next() } else { None };
            async move {
                let (listed, open) = answer?;
                Some(self.judge(&r.change, listed, open).await)
            }
        });
        futures_util::future::join_all(checks).await
    }

    /// With nbdkit and no TLS: lists the exports (when the batch adds any)
    /// and asks about every change with `NBD_OPT_INFO`, all on one
    /// connection (nbdkit opens an export to answer it). `None` when the
    /// engine is nbd-server, TLS is required, or the connection failed:
    /// then [`Prober::ask_each`] asks.
    async fn survey(&self, changes: &[&Change], adds: bool) -> Option<Vec<Answer>> {
        if self.cfg.engine != NbdEngineKind::Nbdkit || self.cfg.tls_psk.is_some() {
            return None;
        }
        if changes.is_empty() {
            return Some(Vec::new());
        }
        let names: Vec<&str> = changes.iter().map(|c| c.name()).collect();
        let survey = proto::survey(
            &self.cfg.listen,
            self.cfg.port,
            adds,
            &names,
            self.cfg.check_timeout,
        )
        .await
        .map_err(|e| debug!(cause = %e, "batch live check failed; checking each change alone"))
        .ok()?;
        let listed: HashSet<&str> = survey.listed.iter().map(String::as_str).collect();
        Some(
            names
                .iter()
                .zip(survey.answers)
                .map(|(n, open)| (listed.contains(n), Some(Ok(open))))
                .collect(),
        )
    }

    /// One listing for the batch when it adds exports (none with TLS: the
    /// built-in client gets no listing), then each change opened on a
    /// connection of its own, a few at a time; an add the listing missed
    /// is not opened (it gets the full check).
    async fn ask_each(&self, changes: &[&Change], adds: bool) -> Vec<Answer> {
        let listed: HashSet<String> = match (&self.cfg.tls_psk, adds) {
            (None, true) => proto::list(&self.cfg.listen, self.cfg.port, self.cfg.check_timeout)
                .await
                .map(|names| names.into_iter().collect())
                .unwrap_or_default(),
            _ => HashSet::new(),
        };
        let listed = &listed;
        let asks = changes.iter().map(|c| async move {
            let shown = listed.contains(c.name());
            if matches!(c, Change::Add(_)) && !shown {
                return (false, None);
            }
            let _turn = self.few.acquire().await.ok();
            (shown, Some(self.open(c.name()).await))
        });
        futures_util::future::join_all(asks).await
    }

    /// The outcome of one change from what the server answered. An add
    /// must be listed and open; one that was not gets the full check, with
    /// its retries. A withdrawn export must refuse the open; a server that
    /// does not answer at all serves nothing.
    async fn judge(
        &self,
        change: &Change,
        listed: bool,
        open: Option<Opened>,
    ) -> Result<(), ExportError> {
        match change {
            Change::Add(spec) => {
                if listed && matches!(open, Some(Ok(Open::Served { .. }))) {
                    return Ok(());
                }
                let _turn = self.few.acquire().await.ok();
                self.check_served(spec.name.as_str()).await.map_err(|why| {
                    ExportError::Failed(format!("export {} is not live: {why}", spec.name))
                })
            }
            Change::Withdraw(name) => match open {
                Some(Ok(Open::Refused { .. })) | Some(Err(NbdError::Io(_))) => Ok(()),
                Some(Ok(Open::Served { .. })) => Err(ExportError::Failed(format!(
                    "export {name} still accepts connections after withdrawal"
                ))),
                Some(Err(e)) => Err(ExportError::Failed(format!(
                    "cannot confirm export {name} is withdrawn: {e}"
                ))),
                None => Err(ExportError::Failed(format!(
                    "cannot confirm export {name} is withdrawn: it was not asked about"
                ))),
            },
        }
    }

    async fn check_names(&self, names: &[&str]) -> Vec<(String, String)> {
        let few = &self.few;
        let checks = names.iter().map(|name| async move {
            let _turn = few.acquire().await.ok();
            self.check_served(name)
                .await
                .err()
                .map(|why| (name.to_string(), why))
        });
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Listed and opened within the check timeout.
    async fn check_served(&self, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + self.cfg.check_timeout;
        let mut last;
        loop {
            match self.probe(name).await {
                Ok(p) if p.listed && matches!(p.open, Open::Served { .. }) => return Ok(()),
                Ok(p) => last = format!("{p:?}"),
                Err(e) => {
                    last = e.to_string();
                    // A managed server that is gone is recovered by the
                    // caller; an external one may be restarting: keep
                    // trying until the deadline.
                    if self.cfg.manage && self.server.pid().is_none() {
                        return Err(last);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens `name` without listing (the refusal is what a withdrawal is
    /// checked for); through `nbdinfo` when TLS is required.
    async fn open(&self, name: &str) -> Result<Open, NbdError> {
        if self.cfg.tls_psk.is_some() {
            return self.probe(name).await.map(|p| p.open);
        }
        let (listen, port, timeout) = (&self.cfg.listen, self.cfg.port, self.cfg.check_timeout);
        match self.cfg.engine {
            // nbdkit opens the export's file to answer NBD_OPT_INFO, and a
            // transmission would cost it a set of worker threads per check.
            NbdEngineKind::Nbdkit => proto::info(listen, port, name, timeout).await,
            NbdEngineKind::NbdServer => proto::open(listen, port, name, timeout).await,
        }
    }

    /// Lists and opens `name`: with the built-in client, or, when TLS is
    /// required, with `nbdinfo` and the pre-shared key (the built-in client
    /// speaks no TLS).
    async fn probe(&self, name: &str) -> Result<proto::Probe, NbdError> {
        let Some(psk) = &self.cfg.tls_psk else {
            return proto::probe(
                &self.cfg.listen,
                self.cfg.port,
                name,
                self.cfg.check_timeout,
            )
            .await;
        };
        let user = std::fs::read_to_string(psk)?
            .lines()
            .next()
            .and_then(|l| l.split_once(':'))
            .map(|(u, _)| u.to_owned())
            .ok_or_else(|| {
                NbdError::Protocol(format!("{} has no `user:key` line", psk.display()))
            })?;
        let host = match self.cfg.listen.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(a)) => format!("[{a}]"),
            _ => self.cfg.listen.clone(),
        };
        let base = format!("nbds://{user}@{host}:{}", self.cfg.port);
        let query = format!("tls-psk-file={}", psk.display());
        let listing = self
            .nbdinfo(&["--list".into(), format!("{base}/?{query}")])
            .await?;
        if !listing.status.success() {
            // Nothing answered the TLS handshake: the server is down.
            return Err(NbdError::Io(std::io::Error::other(
                String::from_utf8_lossy(&listing.stderr).trim().to_owned(),
            )));
        }
        let listed =
            String::from_utf8_lossy(&listing.stdout).contains(&format!("export=\"{name}\""));
        let open = self.nbdinfo(&[format!("{base}/{name}?{query}")]).await?;
        let open = if open.status.success() {
            // nbdinfo reports the size in text; the check needs only the
            // fact that the export opened.
            Open::Served { size: 0 }
        } else {
            Open::Refused {
                code: 0,
                message: String::from_utf8_lossy(&open.stderr).trim().to_owned(),
            }
        };
        Ok(proto::Probe { listed, open })
    }

    async fn nbdinfo(&self, args: &[String]) -> Result<std::process::Output, NbdError> {
        let out = tokio::process::Command::new("nbdinfo")
            .args(args)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(self.cfg.check_timeout, out)
            .await
            .map_err(|_| NbdError::Timeout(self.cfg.check_timeout))?
            .map_err(NbdError::Io)
    }
}
