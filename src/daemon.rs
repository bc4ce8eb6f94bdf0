//! `volumed run`: build the parts, run the consumer and the relay, and stop
//! in order when asked: stop consuming, let in-flight operations finish,
//! flush the outbox, close. A reload re-reads the configuration and applies
//! what can change while running ([`RELOADABLE`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::Backend;
use crate::config::Config;
use crate::consumer::{Consumer, Stopped};
use crate::db;
use crate::dispatcher::Dispatcher;
use crate::gate::Gate;
use crate::health::Health;
use crate::nbd::manager::Exports;
use crate::reconcile::{Reconciler, Schedule};
use crate::relay::Relay;
use crate::worker::{Journal, RetryPolicy, Steps, VmLocks, Worker};

/// The settings a reload applies to the running daemon. Every other
/// setting takes effect at the next start; a reload that changes one says
/// so in its log line.
pub const RELOADABLE: &[&str] = &[
    "VOLUMED_LOG",
    "VOLUMED_RECONCILE_INTERVAL_SECS",
    "VOLUMED_RECONCILE_APPLY",
];

/// How the running daemon is asked to re-read its configuration: each
/// message on `requests` is one reload (the binary sends one per SIGHUP),
/// and `load` reads the configuration again, file and environment.
pub struct Reloads {
    pub requests: mpsc::UnboundedReceiver<()>,
    pub load: Box<dyn Fn() -> Result<Config> + Send>,
}

/// How many grouped journal statements of each kind (starts, finishes) may
/// run at once. Two: one is written while the next group forms; four
/// measured no different with `volumed bench` (docs/performance.md).
const JOURNAL_LANES: usize = 2;

/// The main pool's connections: `VOLUMED_WORKERS + 4`, at most this many.
/// A worker takes a connection only for a retry's record or a cloud job's
/// id, and its finish goes through the grouped statements, so a pool the
/// size of the slots would hold connections PostgreSQL's default limit of
/// 100 cannot spare (two daemons, a reconciler and psql).
const MAX_MAIN_CONNECTIONS: u32 = 36;

/// Runs the daemon until `shutdown` resolves or a part fails for good.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    mut reloads: Reloads,
) -> Result<()> {
    let config = Arc::new(config);
    let appliance_vm = config.require_appliance_vm()?;
    let backend: Arc<dyn Backend> = crate::backend::build(&config, appliance_vm)?;

    // Workers, the relay and its listener each hold a connection at times.
    let pool = db::connect(&config.database_url, main_connections(config.workers)).await?;
    // Journal starts, steps and the relay's marks: short statements that
    // need not wait for the disk (see `db::connect_relaxed`), on a few
    // connections of their own: one per lane of grouped starts, one for the
    // steps, one for the relay.
    let relaxed = db::connect_relaxed(&config.database_url, JOURNAL_LANES as u32 + 2).await?;
    if config.database_migrate {
        db::migrate(&pool).await?;
    } else {
        db::check_migrated(&pool).await?;
    }

    let health = Arc::new(Health::default());
    let gate = Arc::new(Gate::default());
    let stop_http = CancellationToken::new();
    let http_task = {
        let serve = crate::http::serve(
            config.http_listen,
            crate::http::HttpState {
                host: config.host_id.clone(),
                health: Arc::clone(&health),
                gate: Arc::clone(&gate),
                pool: pool.clone(),
            },
            stop_http.clone(),
        );
        // Not fatal: the daemon's work does not depend on the endpoint,
        // but the operator must hear of it at once.
        tokio::spawn(async move {
            let r = serve.await;
            if let Err(e) = &r {
                error!(cause = %format!("{e:#}"), "health endpoint not available");
            }
            r
        })
    };
    tokio::spawn(crate::health::probe_database(
        Arc::clone(&health),
        pool.clone(),
        stop_http.clone(),
    ));
    let stop_exports = CancellationToken::new();
    let (exports, exports_task) = Exports::start(
        &config.nbd,
        &config.host_id,
        pool.clone(),
        Arc::clone(&health),
        stop_exports.clone(),
    );
    let stop_reconcile = CancellationToken::new();
    let (schedule, schedule_rx) = watch::channel(Schedule {
        apply: config.reconcile_apply,
        interval: config.reconcile_interval,
    });
    tokio::spawn(crate::reconcile::periodic(
        Reconciler::from_config(&config, appliance_vm, pool.clone(), Arc::clone(&backend)),
        schedule_rx,
        stop_reconcile.clone(),
    ));
    let worker = Arc::new(Worker {
        host: config.host_id.clone(),
        appliance_vm,
        backend,
        pool: pool.clone(),
        device_dir: config.device_dir.clone(),
        device_timeout: config.device_timeout,
        exports,
        gate: Arc::clone(&gate),
        vm_locks: VmLocks::default(),
        steps: Steps::start(relaxed.clone()),
        journal: Journal::start(
            &config.host_id,
            pool.clone(),
            relaxed.clone(),
            JOURNAL_LANES,
        ),
        retry: RetryPolicy {
            attempts: config.retry_attempts,
            delays: config.retry_delays.clone(),
        },
    });
    let dispatcher = Arc::new(Dispatcher::new(config.workers));
    let consumer = Arc::new(Consumer {
        config: Arc::clone(&config),
        worker,
        dispatcher: Arc::clone(&dispatcher),
    });
    let relay = Arc::new(Relay {
        config: Arc::clone(&config),
        pool: pool.clone(),
        relaxed: relaxed.clone(),
    });

    let stop_consuming = CancellationToken::new();
    let stop_relay = CancellationToken::new();
    let mut consumer_task = tokio::spawn(consumer.run(stop_consuming.clone()));
    let mut relay_task = tokio::spawn(relay.run(stop_relay.clone()));
    let stop_ingest = CancellationToken::new();
    let ingest_task = tokio::spawn(crate::dlq::ingest(
        Arc::clone(&config),
        pool.clone(),
        stop_ingest.clone(),
    ));
    info!(host = %config.host_id, backend = ?config.backend, workers = config.workers, "volumed started");

    // Ready for systemd once requests are consumed, not before: a unit
    // ordered after volumed can rely on requests being taken. Only the first
    // time; a consumer that reconnects later was ready before.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ready_task = {
        let mut consuming = gate.watch_consuming();
        let ready = Arc::clone(&ready);
        tokio::spawn(async move {
            if consuming.wait_for(|c| *c).await.is_ok() {
                ready.store(true, std::sync::atomic::Ordering::SeqCst);
                crate::systemd::notify(crate::systemd::READY);
            }
        })
    };

    let mut failure = None;
    let mut consumer_result = None;
    let mut relay_finished = false;
    let mut current = (*config).clone();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutdown requested");
                break;
            }
            Some(()) = reloads.requests.recv() => {
                crate::systemd::reloading();
                match (reloads.load)() {
                    Ok(new) => {
                        apply_reload(&current, &new, &schedule);
                        current = new;
                    }
                    Err(e) => error!(cause = %format!("{e:#}"),
                                     "configuration rejected; the running one is kept"),
                }
                // Not ready before the first consumption: the ready task
                // says so when it comes.
                if ready.load(std::sync::atomic::Ordering::SeqCst) {
                    crate::systemd::notify(crate::systemd::READY);
                }
            }
            r = &mut consumer_task => {
                consumer_result = Some(r);
                break;
            }
            r = &mut relay_task => {
                relay_finished = true;
                let e = match r {
                    Ok(Ok(())) => anyhow::anyhow!("the outbox relay stopped unexpectedly"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("the outbox relay panicked: {e}"),
                };
                error!(cause = %format!("{e:#}"), "outbox relay failed");
                failure = Some(e);
                break;
            }
        }
    }
    crate::systemd::notify(crate::systemd::STOPPING);
    ready_task.abort();

    // One deadline for the whole stop, so it never takes longer than
    // VOLUMED_SHUTDOWN_TIMEOUT_SECS plus the final closes.
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;

    stop_reconcile.cancel();

    // 1. Stop taking requests. The consumer hands back its connection so
    //    that operations still running can acknowledge on it.
    stop_consuming.cancel();
    let consumer_result = match consumer_result {
        Some(r) => r,
        None => consumer_task.await,
    };
    let consumer_conn = match consumer_result {
        Ok(Ok(Stopped::Shutdown(conn))) => conn,
        Ok(Err(e)) => {
            error!(cause = %format!("{e:#}"), "request consumer failed");
            failure.get_or_insert(e);
            None
        }
        Err(e) => {
            failure.get_or_insert(anyhow::anyhow!("the request consumer panicked: {e}"));
            None
        }
    };

    // The dead-letter ingester stops with the consumer: what it has not
    // taken stays in its queue for the next start.
    stop_ingest.cancel();
    match tokio::time::timeout(Duration::from_secs(5), ingest_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(cause = %format!("{e:#}"), "dead-letter ingester failed"),
        Ok(Err(e)) => warn!(cause = %e, "dead-letter ingester panicked"),
        Err(_) => warn!("dead-letter ingester did not stop in time"),
    }

    // 2. Let in-flight operations finish, within the shutdown timeout.
    //    Operations cut off here were not acknowledged: the broker
    //    redelivers them and the journal resumes them.
    let busy = dispatcher.busy_lanes();
    if busy > 0 {
        info!(busy, "waiting for in-flight operations");
    }
    if tokio::time::timeout_at(deadline, dispatcher.drain())
        .await
        .is_err()
    {
        warn!(timeout = ?config.shutdown_timeout,
              "in-flight operations did not finish in time; they will be redelivered");
    }
    if let Some(conn) = consumer_conn {
        let _ = conn.close(200, "volumed stopping").await;
    }

    // 3. Flush the outbox: events committed above are published now rather
    //    than at the next start.
    stop_relay.cancel();
    let flushed = if relay_finished {
        Ok(Ok(Ok(())))
    } else {
        // The flush gets what is left, and at least a moment.
        let flush_by = deadline.max(tokio::time::Instant::now() + Duration::from_secs(2));
        tokio::time::timeout_at(flush_by, &mut relay_task).await
    };
    match flushed {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(cause = %format!("{e:#}"), "outbox flush failed"),
        Ok(Err(_)) => {}
        Err(_) => {
            relay_task.abort();
            warn!("outbox flush timed out; remaining events are published at the next start");
        }
    }
    // 4. The export manager last: operations above may still have needed
    //    it. A managed NBD server stops with it.
    stop_exports.cancel();
    // Bounded: a batch in progress finishes within its check timeout, and
    // stopping a server takes at most a few seconds.
    let mut exports_task = exports_task;
    match tokio::time::timeout(
        config.nbd.check_timeout + Duration::from_secs(10),
        &mut exports_task,
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(cause = %e, "export manager ended abnormally"),
        Err(_) => {
            exports_task.abort();
            warn!("export manager did not stop in time");
        }
    }
    match db::outbox_backlog(&pool, &config.host_id).await {
        Ok((0, _)) => {}
        Ok((n, oldest)) => warn!(pending = n, ?oldest, "events left in the outbox"),
        Err(e) => warn!(cause = %e, "cannot read the outbox backlog"),
    }
    stop_http.cancel();
    match tokio::time::timeout(Duration::from_secs(2), http_task).await {
        Ok(Ok(Err(e))) => warn!(cause = %format!("{e:#}"), "health endpoint failed"),
        Ok(_) => {}
        Err(_) => warn!("health endpoint did not stop in time"),
    }
    pool.close().await;
    relaxed.close().await;
    match failure {
        Some(e) => Err(e),
        None => {
            info!("volumed stopped");
            Ok(())
        }
    }
}

/// Applies a reloaded configuration: the [`RELOADABLE`] settings take
/// effect now; any other changed setting is named in the log as waiting
/// for a restart.
fn apply_reload(old: &Config, new: &Config, schedule: &watch::Sender<Schedule>) {
    let changed = old.changed_settings(new);
    let (applied, pending): (Vec<&str>, Vec<&str>) =
        changed.iter().partition(|name| RELOADABLE.contains(name));
    if old.log_filter != new.log_filter {
        if let Err(e) = crate::telemetry::set_filter(new.log_filter.as_deref()) {
            warn!(cause = %format!("{e:#}"), "the log filter was not replaced");
        }
    }
    schedule.send_if_modified(|s| {
        let next = Schedule {
            apply: new.reconcile_apply,
            interval: new.reconcile_interval,
        };
        let modified = *s != next;
        *s = next;
        modified
    });
    if !pending.is_empty() {
        warn!(not_applied = ?pending,
              "changed settings need a restart to take effect; they were not applied");
    }
    info!(applied = ?applied, "configuration reloaded");
}

/// See [`MAX_MAIN_CONNECTIONS`].
fn main_connections(workers: usize) -> u32 {
    u32::try_from(workers)
        .unwrap_or(u32::MAX)
        .saturating_add(4)
        .min(MAX_MAIN_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_pool_follows_the_workers_up_to_its_cap() {
        assert_eq!(main_connections(1), 5);
        assert_eq!(main_connections(32), MAX_MAIN_CONNECTIONS);
        assert_eq!(
            main_connections(crate::config::DEFAULT_WORKERS),
            MAX_MAIN_CONNECTIONS,
            "the default slots must not ask PostgreSQL for one connection each"
        );
        assert_eq!(main_connections(256), MAX_MAIN_CONNECTIONS);
    }
}
