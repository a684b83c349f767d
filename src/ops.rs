//! Ops endpoints: `/health` (the seed's shape plus Redis), `/livez`, `/readyz`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;

use crate::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn check_pg(state: &AppState) -> Result<Duration, String> {
    let t = Instant::now();
    let conn = state
        .db
        .get_within(CHECK_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(CHECK_TIMEOUT, conn.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => Ok(t.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn check_redis(state: &AppState) -> Result<Duration, String> {
    let t = Instant::now();
    match tokio::time::timeout(CHECK_TIMEOUT, state.ledger.ping()).await {
        Ok(Ok(())) => Ok(t.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// `{ status, responseTime, pool: { total, idle, waiting, utilization }, redis: { status, responseTime } }`
pub async fn health(State(state): State<AppState>) -> Response {
    let started = Instant::now();
    let (pg, redis) = tokio::join!(check_pg(&state), check_redis(&state));
    let stats = state.db.stats();
    let in_use = state.db.in_use();
    let utilization = if stats.total == 0 {
        0
    } else {
        u64::from(in_use) * 100 / u64::from(stats.total)
    };
    let healthy = pg.is_ok() && redis.is_ok();
    let side = |r: &Result<Duration, String>| match r {
        Ok(d) => serde_json::json!({"status": "healthy", "responseTime": ms(*d)}),
        Err(_) => serde_json::json!({"status": "unhealthy", "error": "unreachable"}),
    };
    let body = serde_json::json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "responseTime": ms(pg.as_ref().copied().unwrap_or_else(|_| started.elapsed())),
        "pool": {
            "total": stats.total,
            "idle": stats.idle,
            "waiting": stats.waiting,
            "utilization": format!("{utilization}%"),
        },
        "database": side(&pg),
        "redis": side(&redis),
        "draining": state.draining.load(Ordering::Relaxed),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

pub async fn livez() -> Response {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let draining = state.draining.load(Ordering::Relaxed);
    let (pg, redis) = tokio::join!(check_pg(&state), check_redis(&state));
    let ready = !draining && pg.is_ok() && redis.is_ok() && !state.models.is_empty();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": pg.is_ok(),
        "redis": redis.is_ok(),
        "draining": draining,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
