//! Prometheus metrics, served at `/metrics` in the text exposition format.
//!
//! Counters and histograms live in one process-wide registry, because the
//! places that move them (consumer, worker, relay, export manager) are far
//! apart and a daemon is one host. Figures that are state rather than
//! events (outbox backlog and age, live exports) are read from the database
//! at scrape time, so they are true even for work another process did.
//!
//! Names and labels are part of the operator interface (dashboards and
//! alerts use them): see `docs/operations.md#metrics`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use uuid::Uuid;

/// Buckets for operation and step durations: from a local attach (a few
/// milliseconds) to a slow cloud job (minutes).
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    /// Requests by `op` (attach, detach, unknown) and `outcome`
    /// (succeeded, failed, refused, retried, dead_lettered, requeued).
    pub requests: IntCounterVec,
    /// Whole operations, journal start to commit, by `op` and `outcome`.
    pub operation_duration: HistogramVec,
    /// Time from one step to the next, by `op` and the `step` reached.
    pub step_duration: HistogramVec,
    /// Retries scheduled, by `op` and error `code`.
    pub retries: IntCounterVec,
    /// Messages sent to the dead-letter exchange, by `reason`.
    pub dead_letters: IntCounterVec,
    /// NBD server reloads (nbd-server SIGHUPs) and restarts, by `engine`.
    pub nbd_reloads: IntCounterVec,
    pub nbd_restarts: IntCounterVec,
    /// Operations a worker is running now.
    pub in_flight: IntGauge,
    /// Events the relay published (confirmed by the broker).
    pub events_published: IntCounter,
    /// The daemon's own reconciliations, by `outcome` (clean, drift,
    /// failed).
    pub reconciliations: IntCounterVec,
    /// Scrape-time gauges, set just before encoding.
    outbox_backlog: IntGauge,
    outbox_oldest_age: prometheus::Gauge,
    live_exports: IntGaugeVec,
    /// Per running operation: its op, and when its last step was reached.
    clocks: Mutex<HashMap<Uuid, (&'static str, Instant)>>,
}

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // The names and labels are constants of this file; a bad one is a bug
    // the first scrape in any test would show.
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric names are unique");
    h
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    registry
        .register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        Metrics {
            requests: counter(
                &r,
                "volumed_requests_total",
                "Requests handled, by operation and outcome.",
                &["op", "outcome"],
            ),
            operation_duration: histogram(
                &r,
                "volumed_operation_duration_seconds",
                "Duration of operations from journal start to commit.",
                &["op", "outcome"],
            ),
            step_duration: histogram(
                &r,
                "volumed_operation_step_duration_seconds",
                "Time taken to reach each step of an operation from the previous one.",
                &["op", "step"],
            ),
            retries: counter(
                &r,
                "volumed_retries_total",
                "Retries scheduled after a transient failure, by operation and error code.",
                &["op", "code"],
            ),
            dead_letters: counter(
                &r,
                "volumed_dead_letters_total",
                "Requests sent to the dead-letter exchange, by reason.",
                &["reason"],
            ),
            nbd_reloads: counter(
                &r,
                "volumed_nbd_reloads_total",
                "NBD server configuration reloads (SIGHUP), by engine.",
                &["engine"],
            ),
            nbd_restarts: counter(
                &r,
                "volumed_nbd_restarts_total",
                "NBD server restarts by volumed, by engine.",
                &["engine"],
            ),
            in_flight: register(
                &r,
                IntGauge::new(
                    "volumed_operations_in_flight",
                    "Operations a worker is running now.",
                )
                .expect("valid metric definition"),
            ),
            events_published: register(
                &r,
                IntCounter::new(
                    "volumed_events_published_total",
                    "Completion events published and confirmed by the broker.",
                )
                .expect("valid metric definition"),
            ),
            reconciliations: counter(
                &r,
                "volumed_reconciliations_total",
                "Reconciliations run by the daemon, by outcome (clean, drift, failed).",
                &["outcome"],
            ),
            outbox_backlog: register(
                &r,
                IntGauge::new(
                    "volumed_outbox_backlog",
                    "Events of this host written but not yet published.",
                )
                .expect("valid metric definition"),
            ),
            outbox_oldest_age: register(
                &r,
                prometheus::Gauge::new(
                    "volumed_outbox_oldest_age_seconds",
                    "Age of the oldest unpublished event of this host (0 when none).",
                )
                .expect("valid metric definition"),
            ),
            live_exports: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "volumed_exports_live",
                        "NBD exports recorded for this host.",
                    ),
                    &["engine"],
                )
                .expect("valid metric definition"),
            ),
            clocks: Mutex::new(HashMap::new()),
            registry: r,
        }
    }

    /// Counts a request's outcome.
    pub fn request(&self, op: &str, outcome: &str) {
        self.requests.with_label_values(&[op, outcome]).inc();
    }

    /// An operation starts: its step clock starts too.
    pub fn begin(&self, id: Uuid, op: &'static str) {
        self.in_flight.inc();
        self.lock_clocks().insert(id, (op, Instant::now()));
    }

    /// An operation reached `step`: observes the time since its last step.
    pub fn step(&self, id: Uuid, step: &'static str) {
        let now = Instant::now();
        let mut clocks = self.lock_clocks();
        if let Some((op, last)) = clocks.get_mut(&id) {
            self.step_duration
                .with_label_values(&[op, step])
                .observe(now.duration_since(*last).as_secs_f64());
            *last = now;
        }
    }

    /// An operation ended (committed, retried, requeued or refused).
    pub fn end(&self, id: Uuid, started: Instant, op: &str, outcome: &str) {
        self.in_flight.dec();
        self.lock_clocks().remove(&id);
        self.operation_duration
            .with_label_values(&[op, outcome])
            .observe(started.elapsed().as_secs_f64());
        self.request(op, outcome);
    }

    fn lock_clocks(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (&'static str, Instant)>> {
        // Held for a map operation only; a panic elsewhere cannot leave the
        // map inconsistent, so a poisoned lock is still usable.
        self.clocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the scrape-time gauges from what the database says.
    pub fn set_state(&self, backlog: i64, oldest_age_secs: f64, exports: &[(String, i64)]) {
        self.outbox_backlog.set(backlog);
        self.outbox_oldest_age.set(oldest_age_secs);
        self.live_exports.reset();
        for (engine, n) in exports {
            self.live_exports.with_label_values(&[engine]).set(*n);
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only for metric families that break the
        // format's rules, which the definitions above do not.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(cause = %e, "cannot encode the metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_timed_from_the_previous_one() {
        let m = Metrics::new();
        let id = Uuid::new_v4();
        let t0 = Instant::now();
        m.begin(id, "attach");
        m.step(id, "cloud_attached");
        m.step(id, "device_found");
        m.end(id, t0, "attach", "succeeded");
        m.step(id, "late");
        let text = m.encode();
        assert!(text.contains(
            "volumed_operation_step_duration_seconds_count{op=\"attach\",step=\"device_found\"} 1"
        ));
        assert!(!text.contains("step=\"late\""), "{text}");
        assert!(text.contains("volumed_requests_total{op=\"attach\",outcome=\"succeeded\"} 1"));
        assert!(text.contains("volumed_operations_in_flight 0"));
    }
}
