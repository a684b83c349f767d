//! `/metrics` in the Prometheus text format. Counters and histograms are recorded
//! where things happen (this module's middleware for HTTP, `ApiError` for errors, the
//! settle and the flusher for usage, `oauth` for password hashes and sign-in locks);
//! gauges (usage backlog, pools, requests in flight) are read when scraped. Labels are
//! low-cardinality: route templates, status codes, error labels, model ids, purposes —
//! never users, emails, IPs or request ids.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::state::AppState;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histogram samples are folded in when nobody scrapes.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs the process-wide recorder (once; later calls reuse it). Without it every
/// metric call is a no-op, which is what library users such as the benches get.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder is already installed");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "tollgate_http_requests_total",
        "HTTP requests answered, by route template, method and status"
    );
    describe_histogram!(
        "tollgate_http_request_duration_seconds",
        Unit::Seconds,
        "Time to the response head, by route template"
    );
    describe_counter!("tollgate_errors_total", "Error responses, by error label");
    describe_counter!(
        "tollgate_speculative_sends_total",
        "Requests sent upstream while their hold was taken: used, resent (the hold lowered max_tokens) or cancelled (refused, or the client left)"
    );
    describe_counter!(
        "tollgate_worker_connections_total",
        "Client connections handed to each worker thread"
    );
    describe_counter!(
        "tollgate_requests_settled_total",
        "Requests charged and recorded, by model and operation"
    );
    describe_counter!(
        "tollgate_credits_charged_total",
        "Credits charged, by model"
    );
    describe_counter!(
        "tollgate_tokens_total",
        "Tokens billed, by model and kind (input, output)"
    );
    describe_counter!(
        "tollgate_usage_rows_flushed_total",
        "Usage rows inserted into PostgreSQL"
    );
    describe_counter!(
        "tollgate_flush_failures_total",
        "Usage batches that failed and will be retried"
    );
    describe_counter!(
        "tollgate_partition_upkeep_failures_total",
        "usage_history partition upkeep runs that failed (retried at the next models refresh)"
    );
    describe_gauge!(
        "tollgate_partition_months_ahead",
        "Months beyond this one whose usage_history partition exists, counted up to the first missing (-1: this month's is missing)"
    );
    describe_counter!(
        "tollgate_upstream_timeouts_total",
        "Requests sent upstream and not answered within the first-byte timeout (the provider may still run them), by provider and whether they were retried"
    );
    describe_counter!(
        "tollgate_orphaned_requests_total",
        "Admitted requests that ended without their settle or release (panic, aborted task, shutdown) and were settled or released afterwards, by outcome"
    );
    describe_counter!(
        "tollgate_usage_over_hold_total",
        "Charges of provider-reported usage above the request's hold (an honest provider never reports more), by model"
    );
    describe_counter!(
        "tollgate_password_hashes_total",
        "Argon2 jobs run (a password verified, with its rehash if any, or a client secret), by purpose"
    );
    describe_counter!(
        "tollgate_password_queue_full_total",
        "Password checks refused (503) because every hasher was busy and passwords.max_queued waited, by purpose"
    );
    describe_counter!(
        "tollgate_signin_locked_total",
        "Sign-ins refused (429) without checking the password while the account or the IP was locked, by subject"
    );
    describe_gauge!(
        "tollgate_usage_backlog_entries",
        "Usage events waiting in the Redis streams"
    );
    describe_gauge!(
        "tollgate_db_pool_connections",
        "PostgreSQL pool connections, by state"
    );
    describe_gauge!(
        "tollgate_requests_in_flight",
        "Request tails (streams, settles) still running"
    );
    describe_gauge!("tollgate_draining", "1 while shutting down");
}

/// Middleware: counts every answered request and times it to the response head.
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    // A fixed set: a client-chosen method must not mint label values.
    let method = match *req.method() {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        _ => "other",
    };
    let resp = next.run(req).await;
    metrics::counter!(
        "tollgate_http_requests_total",
        "route" => route.clone(),
        "method" => method,
        "status" => resp.status().as_str().to_owned()
    )
    .increment(1);
    metrics::histogram!("tollgate_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> Response {
    let Some(handle) = install() else {
        return crate::error::ApiError::NotFound.into_response();
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.ledger.backlog()).await {
        Ok(Ok(n)) => metrics::gauge!("tollgate_usage_backlog_entries").set(n as f64),
        Ok(Err(e)) => tracing::warn!(error = %e, "usage backlog not readable"),
        Err(_) => tracing::warn!("usage backlog read timed out"),
    }
    let stats = state.db.stats();
    let in_use = state.db.in_use();
    metrics::gauge!("tollgate_db_pool_connections", "state" => "idle").set(f64::from(stats.idle));
    metrics::gauge!("tollgate_db_pool_connections", "state" => "in_use").set(f64::from(in_use));
    metrics::gauge!("tollgate_requests_in_flight").set(state.tasks.len() as f64);
    metrics::gauge!("tollgate_draining").set(
        if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    handle.run_upkeep();
    let mut resp = handle.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
