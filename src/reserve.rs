//! Stage 5, reserve: the rate-limit check, then one Lua call that holds an upper bound
//! of the request's cost against the user's balance (or answers 429
//! `insufficient_quota`), then the forwarding task (stage 6) started with the
//! [`Admitted`] request, which owns the hold from here on.
//!
//! The speculative send lives here too: when the user's last known balance is far
//! above the hold, the body goes upstream while the hold is being taken ([`admit`]).

use std::sync::Arc;
use std::time::Instant;

use axum::response::Response;
use bytes::Bytes;
use uuid::Uuid;

use crate::authenticate::Principal;
use crate::error::ApiError;
use crate::forward::{self, EarlySend, Go, Start};
use crate::hold::{Admitted, Context, HoldKeeper};
use crate::ledger::{HoldRequest, Reserve};
use crate::parse::ChatRequest;
use crate::route::Model;
use crate::settle::{cost, PromptTokens, Ticket};
use crate::state::AppState;
use crate::translate::{Endpoint, Kind};

/// How a request asks to be admitted (besides its model and parse).
pub struct Admission {
    pub rid: Uuid,
    pub started: Instant,
    pub kind: Kind,
    pub endpoint: Endpoint,
    pub operation: &'static str,
    /// Whether the output limit came from the client (or a preference), not the cap.
    pub output_explicit: bool,
}

/// Stages 5 and 6 for every model endpoint: the rate-limit check, the hold for up
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
pub async fn admit(
    state: &AppState,
    principal: &Principal,
    model: &Arc<Model>,
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
        (
            go,
            state.tasks.spawn(forward::run(Start::Early(early, wait))),
        )
    });
    // On a refusal or an error the `go` sender is dropped: the early call is cancelled.
    let (hold, max_tokens) = reserve(state, &principal.user_id, &a.rid, model, chat, want).await?;
    let adm = Admitted::new(Context {
        state: state.clone(),
        model: model.clone(),
        kind: a.kind,
        endpoint: a.endpoint,
        ticket: Ticket::new(
            principal.user_id,
            a.rid,
            model.id.clone(),
            model.rates,
            model.provider_costs,
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
    });
    // The balance lowered the limit: the body sent (or to send) must carry the lower one.
    let lowered = (max_tokens != want)
        .then(|| body_for(max_tokens))
        .transpose();
    let (adm, lowered) = adm.or_release(lowered).await?;
    let handle = match early {
        Some((go, handle)) => {
            let outcome = if lowered.is_some() { "resent" } else { "used" };
            metrics::counter!("tollgate_speculative_sends_total", "outcome" => outcome)
                .increment(1);
            let go = go.send(Go {
                adm,
                resend: lowered,
                include_usage,
            });
            if let Err(back) = go {
                // The task is gone (it cannot be before this send): give the hold back.
                let e = ApiError::internal("the forwarding task stopped early");
                return Err(back.adm.fail(e).await);
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
                .spawn(forward::run(Start::Now(go, lowered.unwrap_or(body))))
        }
    };
    let mut resp = handle.await.map_err(ApiError::internal)??;
    allowance.write_headers(resp.headers_mut());
    Ok(resp)
}

/// `ceil((prompt bound + want × choices) × highest rate / 1000)`: what the reserve will
/// ask to hold (before any lowering), for the speculation check.
fn hold_estimate(model: &Model, chat: &ChatRequest, want: i64) -> Option<i64> {
    let tokens = chat
        .prompt_tokens_bound
        .checked_add(want.checked_mul(chat.choices.max(1))?)?;
    cost(tokens, model.rates.max())
}

/// Reserve, loading the balance from PostgreSQL on first use. Holds room for
/// `want` tokens in each of the `n` choices; returns (hold, tokens per choice).
pub async fn reserve(
    state: &AppState,
    user: &Uuid,
    rid: &Uuid,
    model: &Model,
    chat: &ChatRequest,
    want: i64,
) -> Result<(i64, i64), ApiError> {
    let m = &state.cfg.metering;
    // Every token at the model's highest rate: the hold covers any mix of kinds.
    let hold = HoldRequest {
        price_per_1k: model.rates.max(),
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
            Reserve::Inactive => return Err(ApiError::SubscriptionInactive),
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
