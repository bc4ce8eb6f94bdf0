//! The daemon's HTTP endpoint (`VOLUMED_HTTP_LISTEN`): liveness and
//! readiness, Prometheus metrics, and read-only JSON views of the journal.
//! Every route is a GET and nothing here changes state, so the endpoint can
//! be opened to monitoring without opening control over volumes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db;
use crate::gate::Gate;
use crate::health::Health;

/// A database read behind a view is bounded, so a scrape or a dashboard
/// never hangs on an unreachable database; it gets a 503 instead.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// What the routes read.
#[derive(Clone)]
pub struct HttpState {
    pub host: String,
    pub health: Arc<Health>,
    pub gate: Arc<Gate>,
    pub pool: PgPool,
}

/// The routes, without a listener (tests drive them directly too).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/operations/:request_id", get(operation))
        .route("/api/v1/exports", get(exports))
        .route("/api/v1/volumes/:volume_id", get(volume))
        .with_state(state)
}

/// Serves the endpoint until `stop`.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on VOLUMED_HTTP_LISTEN={addr}: {e}"))?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    Ok(())
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, Json<Value>) {
    let problems = s.health.problems(&s.gate);
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({"ready": true})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": problems})),
        )
    }
}

/// An error answer as JSON: `{"error": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn db_error(e: impl std::fmt::Display) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the database did not answer: {e}"),
    )
}

/// Runs a read with [`QUERY_TIMEOUT`].
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Response> {
    match tokio::time::timeout(QUERY_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(db_error(e)),
        Err(_) => Err(db_error(format!("no answer within {QUERY_TIMEOUT:?}"))),
    }
}

/// The id in a path, or the 400 answer's message.
fn parse_id(what: &str, s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s).map_err(|_| format!("{what} must be a UUID, got {s:?}"))
}

/// The counters, plus the state gauges read now. When the database does not
/// answer, the state gauges keep their last values and the counters are
/// still served: a scrape must not fail because one source is down.
async fn metrics(State(s): State<HttpState>) -> Response {
    let m = crate::metrics::get();
    let state = bounded(async {
        let (backlog, oldest) = db::outbox_backlog(&s.pool, &s.host).await?;
        let exports = db::export_counts(&s.pool, &s.host).await?;
        Ok((backlog, oldest, exports))
    })
    .await;
    match state {
        Ok((backlog, oldest, exports)) => {
            let age = oldest
                .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            m.set_state(backlog, age, &exports);
        }
        Err(_) => tracing::debug!("metrics: database state not refreshed"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

async fn operation(State(s): State<HttpState>, Path(id): Path<String>) -> Response {
    let id = match parse_id("request_id", &id) {
        Ok(id) => id,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match bounded(db::operation_view(&s.pool, id)).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no operation {id}")),
        Err(r) => r,
    }
}

async fn exports(State(s): State<HttpState>) -> Response {
    match bounded(db::exports(&s.pool, Some(&s.host))).await {
        Ok(rows) => Json(json!({"host": s.host, "exports": rows})).into_response(),
        Err(r) => r,
    }
}

async fn volume(State(s): State<HttpState>, Path(id): Path<String>) -> Response {
    let id = match parse_id("volume id", &id) {
        Ok(id) => id,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match bounded(db::volume_view(&s.pool, id)).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("volumed has no record of volume {id}"),
        ),
        Err(r) => r,
    }
}
