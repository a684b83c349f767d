//! The HTTP routes and the order of the request path. Every chat completion goes
//! through these stages, each a module of its own:
//!
//! 1. [`accept`](crate::server) — hyper, HTTP/1.1 keep-alive, TCP_NODELAY; each
//!    connection is served by one [worker thread](crate::worker) from then on; a request
//!    id (UUIDv7) is assigned and returned as `x-request-id` on every response.
//! 2. [`authenticate`](crate::authenticate) — verify the bearer JWT locally (every route
//!    except [`UNAUTHENTICATED_ROUTES`]); then the [`scope`](crate::scope) the route's
//!    group requires (403 `insufficient_scope`), before the body is read.
//!    Then [`rate_limit`](crate::rate_limit) — per-user requests and tokens per minute by
//!    tier, in memory (checked once the request is parsed, before anything is held).
//! 3. [`parse`](crate::parse) — read `model`, `stream`, token limits and a prompt bound;
//!    the user's [`preferences`](crate::preferences) fill in what the request leaves out.
//! 4. [`route`](crate::route) — model → provider and price, from memory.
//! 5. [`reserve`](crate::ledger::Ledger::reserve) — one Lua call holds an upper bound of
//!    the cost, or answers 429 `insufficient_quota` (when the user's last known balance
//!    is far above the hold, stage 6 starts meanwhile: see [`admit_and_run`]).
//! 6. [`forward`](crate::forward) — pooled keep-alive connection to one of the provider's
//!    [deployments](crate::deploy), with failover and retries before any byte is sent.
//! 7. [`stream_back`](crate::stream_back) — bytes to the client as they arrive; usage tapped.
//! 8. [`settle`](crate::settle) — one Lua call charges, releases the rest of the hold and
//!    appends the usage event, before the client sees the end of the answer.
//! 9. [`flush`](crate::flush) — off the request path: usage events → PostgreSQL in batches.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use http::{header, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Frame;
use uuid::Uuid;

use crate::authenticate::Principal;
pub use crate::authenticate::UNAUTHENTICATED_ROUTES;
use crate::deploy::Sent;
use crate::error::ApiError;
use crate::ledger::{HoldRequest, Reserve};
use crate::parse::{missing_model, parse_chat_lenient, upstream_body, ChatRequest, Edits};
use crate::route::Model;
use crate::scope::Scope;
use crate::settle::{cost, settle, PromptTokens, Received, Ticket, Usage};
use crate::state::AppState;
use crate::stream_back::{Stop, StreamEnd, Tap};
use crate::translate::{self, ChatId, Endpoint, Kind};

/// The request id: the key of the hold, the settle and the `usage_history` row.
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub Uuid);

pub fn router(state: AppState) -> Router {
    // Each group of routes requires one OAuth scope, checked before its handler runs.
    let need = |s: Scope| axum::middleware::from_fn_with_state(s, crate::scope::require);
    let inference = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(crate::endpoints::completions))
        .route("/v1/embeddings", post(crate::endpoints::embeddings))
        .route_layer(need(Scope::LlmInference));
    let models = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(need(Scope::ModelsRead));
    let credits = Router::new()
        .route("/v1/credits", get(crate::account::credits))
        .route("/v1/usage", get(crate::account::usage))
        .route_layer(need(Scope::CreditsRead));
    let user = Router::new()
        .route("/v1/users/me", get(crate::account::me))
        .route(
            "/v1/users/me/preferences",
            get(crate::account::get_preferences).put(crate::account::put_preferences),
        )
        .route_layer(need(Scope::UserInfo));
    // Ops and OAuth routes need no scope.
    Router::new()
        .merge(inference)
        .merge(models)
        .merge(credits)
        .merge(user)
        .route("/health", get(crate::ops::health))
        .route("/livez", get(crate::ops::livez))
        .route("/metrics", get(crate::telemetry::render))
        .route("/readyz", get(crate::ops::readyz))
        .merge(crate::oauth::routes())
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::middleware::from_fn(crate::telemetry::track))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = Uuid::now_v7();
    req.extensions_mut().insert(RequestId(id));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if UNAUTHENTICATED_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match state
        .auth
        .verify_header_async(req.headers().get(header::AUTHORIZATION))
        .await
    {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .models
        .listed()
        .iter()
        .map(|m| m.to_openai())
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

async fn get_model(
    State(state): State<AppState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // A path that is not UTF-8 gets an OpenAI-shaped error too.
    let Path(id) = id.map_err(|e| ApiError::InvalidRequest {
        message: format!("invalid model id in the URL ({})", e.body_text()),
        param: Some("model"),
    })?;
    Ok(Json(state.models.route(&id)?.to_openai()))
}

/// Stage 4 for a parsed request: its model and provider's format, with the prompt's
/// bound sized for them.
pub(crate) fn route_sized(
    state: &AppState,
    chat: &mut ChatRequest,
) -> Result<(std::sync::Arc<Model>, Kind), ApiError> {
    let model = state.models.route(&chat.model)?;
    let kind = state.upstream.provider(&model.provider)?.kind;
    if chat.tools {
        // The tool-use prompt a provider adds (Anthropic's), not in the body.
        chat.prompt.bytes = chat.prompt.bytes.saturating_add(kind.tool_prompt_tokens());
    }
    chat.size_for(&model, i64::from(state.cfg.metering.image_tokens));
    Ok((model, kind))
}

/// Bodies larger than this are checked and parsed on the blocking pool: a large body
/// costs its own CPU without holding up the other requests of this worker thread.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// Runs `parse` on `body`, on the blocking pool when the body is large.
pub(crate) async fn parse_off_thread<T: Send + 'static>(
    body: &Bytes,
    parse: impl FnOnce(&[u8]) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if body.len() <= INLINE_PARSE_BYTES {
        return parse(body);
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || parse(&body))
        .await
        .map_err(ApiError::internal)?
}

/// Reads the body, refusing more than `limit` bytes with 413.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(e) => Err(ApiError::invalid(format!(
            "could not read the request body ({e})"
        ))),
    }
}

/// What one admitted request carries from reserve to settle.
pub(crate) struct Admitted {
    pub(crate) state: AppState,
    pub(crate) model: std::sync::Arc<Model>,
    pub(crate) stream: bool,
    /// The wire format of the model's provider (anything but OpenAI is translated).
    pub(crate) kind: Kind,
    /// Which provider endpoint the request goes to.
    pub(crate) endpoint: Endpoint,
    /// The money: settled or released exactly once, even if this is dropped.
    pub(crate) ticket: Ticket,
    /// Keeps the hold alive while the request runs.
    pub(crate) keeper: HoldKeeper,
}

/// How a request asks to be admitted (besides its model and parse).
pub(crate) struct Admission {
    pub(crate) rid: Uuid,
    pub(crate) started: Instant,
    pub(crate) kind: Kind,
    pub(crate) endpoint: Endpoint,
    pub(crate) operation: &'static str,
    /// Whether the output limit came from the client (or a preference), not the cap.
    pub(crate) output_explicit: bool,
}

/// Stages 2b, 5 and 6 for every model endpoint: the rate-limit check, the hold for up
/// to `want` output tokens a choice, then the upstream call in a task of its own (a
/// client that disconnects cannot cancel the settle of what the provider produced).
/// `body_for(m)` makes the upstream body for `m` output tokens a choice: first for
/// `want` (before anything is checked or held, so a body that cannot be built is a
/// plain error), again for fewer if the balance lowered the limit.
///
/// Speculation: when this gateway last saw the user's balance at
/// [`SPECULATION_MARGIN`](crate::ledger::SPECULATION_MARGIN) times the hold or more
/// (`metering.speculative_send`), the body goes upstream while the hold is being taken,
/// so the two round trips overlap. Nothing the provider answers reaches the client
/// before the hold is in place; a refused hold, or one that lowered the limit, cancels
/// that call (a lowered one is sent again with the lowered limit).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn admit_and_run(
    state: &AppState,
    principal: &Principal,
    model: &std::sync::Arc<Model>,
    chat: &ChatRequest,
    want: i64,
    a: Admission,
    body_for: &mut (dyn FnMut(i64) -> Result<Bytes, ApiError> + Send),
    include_usage: bool,
) -> Result<Response, ApiError> {
    let body = body_for(want)?;
    let allowance = state
        .rate_limits
        .check(
            &state.db,
            &principal.user_id,
            chat.prompt_tokens_bound,
            want.saturating_mul(chat.choices.max(1)),
            a.output_explicit,
        )
        .await?;
    let estimate = hold_estimate(model, chat, want);
    let early = (state.cfg.metering.speculative_send
        && estimate.is_some_and(|h| state.ledger.may_speculate(&principal.user_id, h)))
    .then(|| {
        let (go, wait) = tokio::sync::oneshot::channel();
        let early = EarlySend {
            state: state.clone(),
            model: model.clone(),
            endpoint: a.endpoint,
            stream: chat.stream,
            body: body.clone(),
        };
        (go, state.tasks.spawn(forward(Start::Early(early, wait))))
    });
    // On a refusal or an error the `go` sender is dropped: the early call is cancelled.
    let (hold, max_tokens) = reserve(state, &principal.user_id, &a.rid, model, chat, want).await?;
    let mut adm = Admitted {
        state: state.clone(),
        model: model.clone(),
        stream: chat.stream,
        kind: a.kind,
        endpoint: a.endpoint,
        ticket: Ticket::new(
            principal.user_id,
            a.rid,
            model.id.clone(),
            model.credits_per_1k_tokens,
            hold,
            a.started,
            chat.stream,
            a.operation,
            PromptTokens {
                estimate: chat.prompt_estimate(),
                bound: chat.prompt_tokens_bound,
            },
            state.orphans.clone(),
        ),
        keeper: HoldKeeper::new(state, principal.user_id, a.rid),
    };
    // The balance lowered the limit: the body sent (or to send) must carry the lower one.
    let lowered = if max_tokens == want {
        None
    } else {
        match body_for(max_tokens) {
            Ok(b) => Some(b),
            Err(e) => {
                adm.release().await;
                return Err(e);
            }
        }
    };
    let handle = match early {
        Some((go, handle)) => {
            let outcome = if lowered.is_some() { "resent" } else { "used" };
            metrics::counter!("tollgate_speculative_sends_total", "outcome" => outcome)
                .increment(1);
            if let Err(Go { mut adm, .. }) = go.send(Go {
                adm,
                resend: lowered,
                include_usage,
            }) {
                // The task is gone (it cannot be before this send): give the hold back.
                adm.release().await;
                return Err(ApiError::internal("the forwarding task stopped early"));
            }
            handle
        }
        None => {
            let go = Box::new(Go {
                adm,
                resend: None,
                include_usage,
            });
            state
                .tasks
                .spawn(forward(Start::Now(go, lowered.unwrap_or(body))))
        }
    };
    let mut resp = handle.await.map_err(ApiError::internal)??;
    allowance.write_headers(resp.headers_mut());
    Ok(resp)
}

/// `ceil((prompt bound + want × choices) × price / 1000)`: what the reserve will ask to
/// hold (before any lowering), for the speculation check.
fn hold_estimate(model: &Model, chat: &ChatRequest, want: i64) -> Option<i64> {
    let tokens = chat
        .prompt_tokens_bound
        .checked_add(want.checked_mul(chat.choices.max(1))?)?;
    cost(tokens, model.credits_per_1k_tokens)
}

/// An upstream call started before its hold was taken.
struct EarlySend {
    state: AppState,
    model: std::sync::Arc<Model>,
    endpoint: Endpoint,
    stream: bool,
    body: Bytes,
}

/// The admitted request handed to its forwarding task. `resend` is for an early call
/// whose hold lowered the limit: the body to send instead of using its answer.
struct Go {
    adm: Admitted,
    resend: Option<Bytes>,
    include_usage: bool,
}

enum Start {
    /// Admitted: send this body now.
    Now(Box<Go>, Bytes),
    /// Send at once, and answer only once the hold is taken (or stop if it is refused).
    Early(EarlySend, tokio::sync::oneshot::Receiver<Go>),
}

/// The forwarding task of one request: stages 6 to 8.
async fn forward(start: Start) -> Result<Response, ApiError> {
    let (go, sent) = match start {
        Start::Now(go, body) => {
            let go = *go;
            let a = &go.adm;
            // Boxed here (and below) so the nested wrappers move a pointer, not the
            // whole future (the moves of large futures showed in profiles as memmove).
            let call = Box::pin(send_upstream(
                &a.state, &a.model, a.endpoint, a.stream, body,
            ));
            let sent = holding(&a.state, &a.keeper, unless_cut(&a.state, call))
                .await
                .unwrap_or_else(|| Err(shutting_down()));
            (go, sent)
        }
        Start::Early(e, mut wait) => {
            let mut call = Some(Box::pin(send_upstream(
                &e.state, &e.model, e.endpoint, e.stream, e.body,
            )));
            let mut answer = None;
            let go = loop {
                tokio::select! {
                    go = &mut wait => break go,
                    a = async { match call.as_mut() { Some(c) => c.await, None => std::future::pending().await } },
                        if answer.is_none() => answer = Some(a),
                }
            };
            let Ok(go) = go else {
                // Refused (or the client left before its hold): the call is dropped here.
                metrics::counter!("tollgate_speculative_sends_total", "outcome" => "cancelled")
                    .increment(1);
                return Err(ApiError::internal("not admitted"));
            };
            let sent = match (&go.resend, answer, call.take()) {
                (None, Some(a), _) => a,
                (None, None, Some(c)) => {
                    let st = &go.adm.state;
                    holding(st, &go.adm.keeper, unless_cut(st, c))
                        .await
                        .unwrap_or_else(|| Err(shutting_down()))
                }
                (None, None, None) => Err(ApiError::internal("no upstream call")),
                // Sent with a limit the hold does not cover: drop that call (and its
                // answer, if it came: a stream would stay open upstream) and send again.
                (Some(b), a, c) => {
                    drop(a);
                    drop(c);
                    let g = &go.adm;
                    let call = Box::pin(send_upstream(
                        &g.state,
                        &g.model,
                        g.endpoint,
                        g.stream,
                        b.clone(),
                    ));
                    holding(&g.state, &g.keeper, unless_cut(&g.state, call))
                        .await
                        .unwrap_or_else(|| Err(shutting_down()))
                }
            };
            (go, sent)
        }
    };
    let Go {
        mut adm,
        include_usage,
        ..
    } = go;
    let sent = match sent {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(request_id = %adm.ticket.rid, error = e.label(), "upstream failed");
            adm.release().await;
            return Err(e);
        }
    };
    // The provider answered 2xx: from here on the request is charged.
    adm.ticket.answered();
    let (state, keeper) = (adm.state.clone(), adm.keeper.clone());
    if adm.stream {
        holding(
            &state,
            &keeper,
            Box::pin(forward_stream(adm, sent, include_usage)),
        )
        .await
    } else {
        holding(&state, &keeper, Box::pin(forward_json(adm, sent))).await
    }
}

/// Runs `f` unless the shutdown cut (the end of the grace period) comes first.
async fn unless_cut<F: std::future::Future>(state: &AppState, f: F) -> Option<F::Output> {
    Cut::new(state).or(f).await
}

/// The shutdown cut as one future for a whole loop of reads: it registers its waiter
/// once, not once per read.
struct Cut(std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>);

impl Cut {
    fn new(state: &AppState) -> Cut {
        Cut(Box::pin(state.cut.clone().cancelled_owned()))
    }

    /// Runs `f` unless the cut comes first.
    async fn or<F: std::future::Future>(&mut self, f: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            r = f => Some(r),
            _ = self.0.as_mut() => None,
        }
    }
}

/// The schedule on which a running request's hold has its expiry moved on: every
/// half `metering.hold_ttl_ms` from the reserve, by a whole TTL. Holds expire only so
/// that a crashed gateway's come back; without this, a request running longer than
/// the TTL (retries, a long stream) would have its hold returned to the balance
/// mid-way, and the balance could be spent twice. One schedule is shared by every
/// phase of the request (send, first chunk, pump), so there is no gap between them.
#[derive(Clone)]
pub(crate) struct HoldKeeper {
    user: Uuid,
    rid: Uuid,
    origin: tokio::time::Instant,
    /// When the next move is due, in ms since `origin`.
    next_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HoldKeeper {
    fn new(state: &AppState, user: Uuid, rid: Uuid) -> HoldKeeper {
        let half = u64::try_from(state.cfg.metering.hold_ttl.as_millis() / 2).unwrap_or(u64::MAX);
        HoldKeeper {
            user,
            rid,
            origin: tokio::time::Instant::now(),
            next_ms: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(half.max(1))),
        }
    }
}

/// Runs `f` while keeping the request's hold alive on `keeper`'s schedule. The move
/// itself runs in a task of its own, so a slow Redis never stalls the answer.
async fn holding<F: std::future::Future>(state: &AppState, keeper: &HoldKeeper, f: F) -> F::Output {
    use std::sync::atomic::Ordering;
    let ttl = state.cfg.metering.hold_ttl;
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let half = (ttl_ms / 2).max(1);
    tokio::pin!(f);
    loop {
        let due = keeper.origin
            + std::time::Duration::from_millis(keeper.next_ms.load(Ordering::Acquire));
        tokio::select! {
            biased;
            r = &mut f => return r,
            _ = tokio::time::sleep_until(due) => {
                keeper.next_ms.fetch_add(half, Ordering::AcqRel);
                let (st, user, rid) = (state.clone(), keeper.user, keeper.rid);
                tokio::spawn(async move {
                    match st.hot_ledger().extend(&user, &rid, ttl_ms).await {
                        Ok(true) => {}
                        // Settled or released meanwhile.
                        Ok(false) => tracing::debug!(request_id = %rid, "no hold left to extend"),
                        Err(e) => tracing::warn!(request_id = %rid, error = %e, "extending a hold failed"),
                    }
                });
            }
        }
    }
}

/// [`holding`] for a spawned task (which must own what it uses).
async fn holding_owned<F: std::future::Future>(
    state: AppState,
    keeper: HoldKeeper,
    f: F,
) -> F::Output {
    holding(&state, &keeper, f).await
}

fn shutting_down() -> ApiError {
    ApiError::Unavailable {
        message: "the gateway is shutting down; retry".into(),
    }
}

impl Admitted {
    /// The provider's idle timeout (longest wait between two chunks).
    fn idle_timeout(&self) -> std::time::Duration {
        self.state
            .upstream
            .provider(&self.model.provider)
            .map(|p| p.idle_timeout)
            .unwrap_or_default()
    }

    /// Gives the hold back (no 2xx came).
    pub(crate) async fn release(&mut self) {
        let (user, rid) = (self.ticket.user, self.ticket.rid);
        let r = self.state.hot_ledger().release(&user, &rid).await;
        // Only now: a release cancelled mid-way leaves the ticket to hand it on.
        self.ticket.finish();
        if let Err(e) = r {
            // The hold expires on its own (metering.hold_ttl_ms) and is returned then.
            tracing::warn!(request_id = %rid, error = %e, "releasing a hold failed");
        }
    }

    /// Charges `usage` and records the request (stage 8).
    async fn settle(
        &mut self,
        usage: Usage,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), ApiError> {
        let extra = (!extra.is_empty()).then_some(serde_json::Value::Object(extra));
        let event = self.ticket.event(usage, extra);
        // From here, a ticket dropped mid-way (or after a failed settle) hands on this
        // very event: the same id and `created_at`, so it is recorded once.
        self.ticket.unsettled(event.clone());
        if let Err(e) = settle(&self.state, &event).await {
            tracing::error!(request_id = %event.id, error = %e, "usage could not be recorded");
            return Err(ApiError::UsageNotRecorded);
        }
        self.ticket.finish();
        let model = self.model.id.clone();
        metrics::counter!("tollgate_requests_settled_total", "model" => model.clone(), "operation" => event.operation)
            .increment(1);
        metrics::counter!("tollgate_credits_charged_total", "model" => model.clone())
            .increment(u64::try_from(event.credits_used).unwrap_or(0));
        metrics::counter!("tollgate_tokens_total", "model" => model.clone(), "kind" => "input")
            .increment(u64::try_from(event.input_tokens).unwrap_or(0));
        metrics::counter!("tollgate_tokens_total", "model" => model, "kind" => "output")
            .increment(u64::try_from(event.output_tokens).unwrap_or(0));
        Ok(())
    }

    /// After a 2xx, something on our side (or the provider's cut) ended the answer:
    /// charge an estimate of what was received, capped at the hold and marked with
    /// `reason`, and answer the client `error`.
    async fn charge_failure(
        &mut self,
        reason: &'static str,
        mut extra: serde_json::Map<String, serde_json::Value>,
        error: ApiError,
    ) -> ApiError {
        let r = self.ticket.received().unwrap_or_default();
        let usage = r
            .usage
            .unwrap_or_else(|| self.ticket.estimate(r.completion_estimate));
        extra.insert(reason.into(), serde_json::Value::Bool(true));
        tracing::warn!(request_id = %self.ticket.rid, reason, "answer ended on a failure after the provider's 2xx; charged an estimate");
        match self.settle(usage, extra).await {
            Ok(()) => error,
            Err(e) => e,
        }
    }
}

/// Reserve, loading the balance from PostgreSQL on first use. Holds room for
/// `want` tokens in each of the `n` choices; returns (hold, tokens per choice).
pub(crate) async fn reserve(
    state: &AppState,
    user: &Uuid,
    rid: &Uuid,
    model: &Model,
    chat: &ChatRequest,
    want: i64,
) -> Result<(i64, i64), ApiError> {
    let m = &state.cfg.metering;
    let hold = HoldRequest {
        price_per_1k: model.credits_per_1k_tokens,
        prompt_tokens: chat.prompt_tokens_bound,
        max_tokens: want.saturating_mul(chat.choices),
        min_tokens: i64::from(m.min_output_tokens).saturating_mul(chat.choices),
        ttl_ms: u64::try_from(m.hold_ttl.as_millis()).unwrap_or(u64::MAX),
    };
    for _ in 0..3 {
        let r = match state.hot_ledger().reserve(user, rid, &hold).await {
            Ok(r) => r,
            Err(e) => {
                // The script may have run with only its answer lost: give back a hold
                // that may exist (release is idempotent) rather than leave it to
                // metering.hold_ttl_ms.
                let (st, u, id) = (state.clone(), *user, *rid);
                state.tasks.spawn(async move {
                    for delay_ms in [0u64, 500, 2_000] {
                        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                        if st.hot_ledger().release(&u, &id).await.is_ok() {
                            return;
                        }
                    }
                });
                return Err(ApiError::unavailable("redis", e));
            }
        };
        match r {
            Reserve::Admitted {
                hold, max_tokens, ..
            } => return Ok((hold, max_tokens / chat.choices.max(1))),
            Reserve::Insufficient { .. } => return Err(ApiError::InsufficientQuota),
            Reserve::NeedsLoad => {
                state.ledger.load(&state.db, user).await?;
            }
        }
    }
    Err(ApiError::unavailable(
        "credit ledger",
        "balance did not load",
    ))
}

async fn chat_completions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(RequestId(rid)): Extension<RequestId>,
    req: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = read_body(req.into_body(), state.cfg.max_body_bytes).await?;
    let mut chat = parse_off_thread(&body, parse_chat_lenient).await?;
    // The user's preferences fill in what the request leaves out (from memory).
    let prefs = if chat.model.is_empty() || chat.max_tokens.is_none() || !chat.has_temperature {
        state.preferences.get(&state, principal.user_id).await
    } else {
        None
    };
    if chat.model.is_empty() {
        chat.model = prefs
            .as_ref()
            .and_then(|p| p.default_model.clone())
            .ok_or_else(missing_model)?;
    }
    let pref_max_tokens = prefs
        .as_ref()
        .and_then(|p| p.max_tokens)
        .filter(|m| *m > 0 && chat.max_tokens.is_none());
    let temperature = prefs.as_ref().and_then(|p| p.temperature);
    let (model, kind) = route_sized(&state, &mut chat)?;
    // Translation runs before anything is held: what the provider cannot honour is a 400.
    let translated = if kind.passes_through() {
        None
    } else {
        let m = model.clone();
        Some(parse_off_thread(&body, move |b| translate::request(kind, b, &m)).await?)
    };
    let want = chat
        .max_tokens
        .or(pref_max_tokens)
        .map_or(model.output_cap(), |m| m.min(model.output_cap()));
    let admission = Admission {
        rid,
        started,
        kind,
        endpoint: Endpoint::Chat,
        operation: "chat",
        output_explicit: chat.max_tokens.is_some() || pref_max_tokens.is_some(),
    };
    // The upstream body for `m` output tokens. The provider's limit is always what was
    // held for: whenever a limit field of the body is not exactly that (absent, above
    // the model's cap, or lowered to the balance), the body carries the held limit, so
    // the provider can never produce more than the hold covers.
    let mut translated = translated;
    let mut build = |m: i64| -> Result<Bytes, ApiError> {
        match translated.as_mut() {
            Some(t) => {
                t.set_max_tokens(m);
                if let Some(temp) = temperature {
                    t.default_temperature(temp);
                }
                t.to_bytes()
            }
            None => {
                let edits = Edits {
                    limit: Some(m),
                    temperature,
                };
                Ok(upstream_body(&body, &chat, &model.name, edits)?
                    .map_or_else(|| body.clone(), Bytes::from))
            }
        }
    };
    admit_and_run(
        &state,
        &principal,
        &model,
        &chat,
        want,
        admission,
        &mut build,
        chat.include_usage,
    )
    .await
}

/// Sends a request upstream (retries and failover inside).
async fn send_upstream(
    state: &AppState,
    model: &Model,
    endpoint: Endpoint,
    stream: bool,
    body: Bytes,
) -> Result<Sent, ApiError> {
    let provider = state.upstream.provider(&model.provider)?;
    provider.send(endpoint, &model.name, body, stream).await
}

/// Metadata of a request that needed more than one upstream attempt.
fn attempts_meta(sent: &Sent) -> serde_json::Map<String, serde_json::Value> {
    let mut extra = serde_json::Map::new();
    if sent.attempts > 1 {
        extra.insert("attempts".into(), sent.attempts.into());
        extra.insert("deployment".into(), sent.deployment.into());
    }
    if sent.timed_out > 0 {
        // Sent earlier and not answered in time: the provider may have run those too.
        extra.insert("timed_out_attempts".into(), sent.timed_out.into());
    }
    extra
}

/// Reads a 2xx JSON answer (bounded in size, each frame within the idle timeout),
/// then charges what the provider reported. Once the provider answered 2xx it did the
/// work: an answer that fails to arrive whole (cut, silent, too large, unreadable, or
/// cut by shutdown) is charged an estimate of what was received, capped at the hold and
/// marked, and the client gets an error.
async fn forward_json(mut adm: Admitted, sent: Sent) -> Result<Response, ApiError> {
    let extra = attempts_meta(&sent);
    let max = adm.state.cfg.max_response_bytes;
    let idle = adm.idle_timeout();
    let embeddings = matches!(adm.endpoint, Endpoint::Embeddings { .. });
    let Sent {
        status,
        content_type,
        body: mut upstream,
        ..
    } = sent;
    let mut buf = bytes::BytesMut::new();
    let mut grace_end = Cut::new(&adm.state);
    let failure = loop {
        let next = tokio::time::timeout(idle, upstream.frame());
        let Some(frame) = grace_end.or(next).await else {
            break Some(("shutdown_cut", shutting_down()));
        };
        match frame {
            Ok(None) => break None,
            Ok(Some(Ok(f))) => {
                let Ok(data) = f.into_data() else { continue };
                let total = buf.len().saturating_add(data.len());
                adm.ticket.progress(Received {
                    bytes: total,
                    completion_estimate: if embeddings {
                        0
                    } else {
                        i64::try_from(total.div_ceil(4)).unwrap_or(i64::MAX)
                    },
                    usage: None,
                });
                if total > max {
                    break Some((
                        "answer_too_large",
                        ApiError::BadGateway {
                            message:
                                "the upstream provider's answer is larger than the gateway accepts"
                                    .into(),
                        },
                    ));
                }
                buf.extend_from_slice(&data);
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(request_id = %adm.ticket.rid, error = %e, "upstream answer cut");
                break Some((
                    "upstream_cut",
                    ApiError::BadGateway {
                        message: "the upstream provider's answer was cut off".into(),
                    },
                ));
            }
            Err(_) => {
                break Some((
                    "upstream_timeout",
                    ApiError::UpstreamTimeout {
                        message: "the upstream provider went silent in the middle of its answer"
                            .into(),
                    },
                ))
            }
        }
    };
    if let Some((reason, error)) = failure {
        return Err(adm.charge_failure(reason, extra, error).await);
    }
    let bytes = buf.freeze();
    let id = ChatId(adm.ticket.rid);
    let answer = adm.kind.answer(adm.endpoint, bytes, &id, &adm.model.id);
    let (bytes, usage, tool_call) = match answer {
        Ok(a) => (a.body, a.usage, a.tool_call),
        Err(e) => {
            tracing::warn!(request_id = %adm.ticket.rid, error = %e, "upstream answer not understood");
            let error = ApiError::BadGateway {
                message: "the upstream provider's answer could not be read".into(),
            };
            return Err(adm.charge_failure("unreadable_answer", extra, error).await);
        }
    };
    if tool_call && adm.ticket.operation == "chat" {
        adm.ticket.operation = "function_call";
    }
    let usage = usage.unwrap_or_else(|| {
        let r = adm.ticket.received().unwrap_or_default();
        adm.ticket.estimate(r.completion_estimate)
    });
    adm.settle(usage, extra).await?;
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    Ok(out)
}

/// Who the stream pump reads the provider's answer for.
enum Reader<'a> {
    /// The client, still reading.
    Client,
    /// Nobody: the client left, and the answer is read on until `until` so the user is
    /// billed what was generated, holding one of the `server.disconnect_drains` permits.
    Drain {
        until: tokio::time::Instant,
        _permit: tokio::sync::SemaphorePermit<'a>,
    },
}

impl Reader<'_> {
    /// The end of a stream that stopped as `stop` says, for this reader.
    fn stopped(&self, stop: Stop) -> StreamEnd {
        match self {
            Reader::Client => StreamEnd::Stopped(stop),
            Reader::Drain { .. } => StreamEnd::ClientGone(stop),
        }
    }

    /// The drain time is over.
    fn drain_over(&self) -> bool {
        matches!(self, Reader::Drain { until, .. } if tokio::time::Instant::now() >= *until)
    }
}

/// Streams a 2xx answer back through the tap. Its first chunk is awaited here (within
/// the first-byte timeout), so an answer that fails before any byte still gets a proper
/// error status; it is charged an estimate all the same.
async fn forward_stream(
    mut adm: Admitted,
    sent: Sent,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let mut extra = attempts_meta(&sent);
    let Sent {
        status,
        body: mut upstream,
        first_byte_due,
        ..
    } = sent;
    let mut grace_end = Cut::new(&adm.state);
    let first = loop {
        let next = tokio::time::timeout_at(first_byte_due, upstream.frame());
        let Some(frame) = grace_end.or(next).await else {
            return Err(adm
                .charge_failure("shutdown_cut", extra, shutting_down())
                .await);
        };
        match frame {
            Ok(Some(Ok(f))) => match f.into_data() {
                Ok(data) if !data.is_empty() => break data,
                _ => continue,
            },
            Ok(None) | Ok(Some(Err(_))) => {
                let error = ApiError::BadGateway {
                    message: "the upstream provider's answer was cut off".into(),
                };
                return Err(adm.charge_failure("upstream_cut", extra, error).await);
            }
            Err(_) => {
                let error = ApiError::UpstreamTimeout {
                    message: format!("the upstream provider `{}` timed out", adm.model.provider),
                };
                return Err(adm.charge_failure("upstream_timeout", extra, error).await);
            }
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let state = adm.state.clone();
    let keeper = adm.keeper.clone();
    let pump_state = state.clone();
    state.tasks.spawn(holding_owned(pump_state, keeper, async move {
        let mut adm = adm;
        let st = adm.state.clone();
        let mut first = Some(first);
        let mut tap = Tap::new(adm.kind, include_usage, adm.ticket.rid, &adm.model.id);
        let drain = adm.state.cfg.disconnect_drain;
        let idle = adm.idle_timeout();
        let max_bytes = adm.state.cfg.max_response_bytes;
        let mut reader = Reader::Client;
        let end = loop {
            // A silent provider is cut after its idle timeout; once the client has left,
            // reading stops at the drain deadline too.
            let mut deadline = tokio::time::Instant::now() + idle;
            if let Reader::Drain { until, .. } = &reader {
                deadline = deadline.min(*until);
            }
            let next = match first.take() {
                // The first chunk was read before the answer was committed to.
                Some(data) => Some(Ok(Frame::data(data))),
                None => {
                    let read = tokio::time::timeout_at(deadline, upstream.frame());
                    match grace_end.or(read).await {
                        None => break reader.stopped(Stop::ShutdownCut),
                        Some(Ok(f)) => f,
                        Some(Err(_)) if reader.drain_over() => break StreamEnd::DrainTimedOut,
                        Some(Err(_)) => {
                            tracing::warn!(request_id = %adm.ticket.rid, "upstream went silent");
                            break reader.stopped(Stop::Silent);
                        }
                    }
                }
            };
            let Some(frame) = next else {
                // A translated stream that ended without the provider's end of the
                // answer was cut.
                break reader.stopped(if tap.failed() {
                    Stop::UpstreamCut
                } else {
                    Stop::Finished
                });
            };
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(e) => {
                    tracing::warn!(request_id = %adm.ticket.rid, error = %e, "upstream stream cut");
                    break reader.stopped(Stop::UpstreamCut);
                }
            };
            let out = tap.feed(data);
            adm.ticket.progress(Received {
                bytes: tap.bytes_seen(),
                completion_estimate: i64::try_from(tap.events_seen()).unwrap_or(i64::MAX),
                usage: tap.usage(),
            });
            // A provider that never ends its answer is cut (and charged at most the
            // hold) rather than streamed for ever.
            if tap.bytes_seen() > max_bytes {
                break reader.stopped(Stop::TooLarge);
            }
            // Once the client is gone, reading goes on (bounded) so the user is billed
            // what was generated.
            let (Some(out), Reader::Client) = (out, &reader) else {
                continue;
            };
            // A client that is gone, or has stopped reading for the whole drain time, is
            // treated as gone.
            match grace_end.or(tx.send_timeout(out, drain)).await {
                Some(Ok(())) => {}
                None => break reader.stopped(Stop::ShutdownCut),
                Some(Err(_)) => {
                    let until = tokio::time::Instant::now() + drain;
                    // Reads on after a disconnect are bounded in number too.
                    match st.drains.try_acquire() {
                        Ok(permit) => {
                            reader = Reader::Drain {
                                until,
                                _permit: permit,
                            }
                        }
                        Err(_) => {
                            break StreamEnd::DrainSkipped {
                                unfinished: tap.failed(),
                            }
                        }
                    }
                }
            }
        };
        if tap.tool_call() && adm.ticket.operation == "chat" {
            adm.ticket.operation = "function_call";
        }
        let events = i64::try_from(tap.events_seen()).unwrap_or(i64::MAX);
        let usage = tap.usage().unwrap_or_else(|| {
            if end.client_gone() {
                // The client left before the usage came: its prompt is billed at the
                // bound the hold covers, not at a guess it could make low.
                adm.ticket.estimate_at_bound(events)
            } else {
                adm.ticket.estimate(events)
            }
        });
        // The drain permit goes back before the settle.
        drop(reader);
        for mark in end.marks() {
            extra.insert(mark.into(), serde_json::Value::Bool(true));
        }
        if adm.settle(usage, extra).await.is_ok() && end.client_reads_the_end() {
            let tail = tap.finish();
            if !tail.is_empty() {
                let _ = tx.send(tail).await;
            }
        }
    }));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut out = Response::new(Body::new(http_body_util::StreamBody::new(stream)));
    *out.status_mut() = status;
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(out)
}
