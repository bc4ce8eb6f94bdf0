//! Liveness and readiness state, served by [`crate::http`] (`/healthz`,
//! `/readyz`).
//!
//! Ready means: the request consumer runs (connected to the broker and not
//! paused by the gate), the database answers, and the NBD server runs. Each
//! part reports its own state here; a small probe task checks the database.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;

#[derive(Default)]
pub struct Health {
    database: AtomicBool,
    nbd: AtomicBool,
}

impl Health {
    pub fn set_database(&self, ok: bool) {
        self.database.store(ok, Ordering::SeqCst);
    }

    pub fn set_nbd(&self, ok: bool) {
        self.nbd.store(ok, Ordering::SeqCst);
    }

    /// Why the daemon is not ready, empty when it is.
    pub fn problems(&self, gate: &Gate) -> Vec<String> {
        let mut p = Vec::new();
        if !self.database.load(Ordering::SeqCst) {
            p.push("database unreachable".to_owned());
        }
        if let Some(reason) = gate.reason() {
            p.push(format!("consumer paused: {reason}"));
        } else if !gate.is_consuming() {
            p.push("not consuming requests (broker unreachable or starting)".to_owned());
        }
        if !self.nbd.load(Ordering::SeqCst) {
            p.push("NBD server not running".to_owned());
        }
        p
    }
}

/// Checks the database every 2 s (each check bounded by 2 s).
pub async fn probe_database(health: Arc<Health>, pool: PgPool, stop: CancellationToken) {
    loop {
        let ok = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pool),
        )
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
        health.set_database(ok);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
