//! The admitted request and its hold, from the reserve (stage 5) to its one end.
//!
//! A request that the ledger admitted is an [`Admitted`] value: it owns the hold. It
//! ends in exactly one of two ways, each a method that consumes it:
//!
//! - [`Admitted::release`] — no 2xx came (the provider failed, the request was refused
//!   after the hold): the hold goes back to the balance before the client hears.
//!   [`Admitted::or_release`] is the form a stage uses on a `Result`.
//! - [`Admitted::answered`] — the provider answered 2xx: the value becomes [`Answering`],
//!   which ends in [`Answering::settle`] (what the provider reported, or an estimate) or
//!   [`Answering::charge_failure`] (an estimate capped at the hold, marked with why).
//!
//! Both types carry the [`Ticket`]: if a value is dropped without either end (a panic,
//! an aborted task, the shutdown cut), the ticket hands its hold or its charge to the
//! gateway's orphan task. That is a backstop; every path written here ends by a method.
//!
//! The [`HoldKeeper`] moves the hold's expiry on while the request runs ([`holding`]).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::ApiError;
use crate::route::Model;
use crate::settle::{charge, Ticket, Usage};
use crate::state::AppState;
use crate::translate::{Endpoint, Kind};
use crate::usage::Billed;

/// What an admitted request carries from reserve to settle, whichever its state.
pub struct Context {
    pub state: AppState,
    pub model: Arc<Model>,
    /// The wire format of the model's provider (anything but OpenAI is translated).
    pub kind: Kind,
    /// Which provider endpoint the request goes to.
    pub endpoint: Endpoint,
    /// The money: settled or released exactly once, even if this is dropped.
    pub ticket: Ticket,
    /// Keeps the hold alive while the request runs.
    pub keeper: HoldKeeper,
}

impl Context {
    /// The provider's idle timeout (longest wait between two chunks).
    pub fn idle_timeout(&self) -> std::time::Duration {
        self.state
            .upstream
            .provider(&self.model.provider)
            .map(|p| p.idle_timeout)
            .unwrap_or_default()
    }
}

/// A request whose hold is taken and whose provider has not answered 2xx.
#[must_use = "an admitted request ends in release() or answered()"]
pub struct Admitted(Context);

/// A request whose provider answered 2xx: it is charged, whatever happens next.
#[must_use = "an answered request ends in settle() or charge_failure()"]
pub struct Answering(Context);

impl Deref for Admitted {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.0
    }
}

impl Deref for Answering {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.0
    }
}

impl DerefMut for Answering {
    fn deref_mut(&mut self) -> &mut Context {
        &mut self.0
    }
}

impl Admitted {
    /// The hold the reserve took, for the request `context` describes.
    pub fn new(context: Context) -> Admitted {
        Admitted(context)
    }

    /// Gives the hold back (no 2xx came). Awaited, so the balance is whole again
    /// before the client hears of the failure.
    pub async fn release(self) {
        let Context {
            state, mut ticket, ..
        } = self.0;
        let (user, rid) = (ticket.user, ticket.rid);
        let r = state.hot_ledger().release(&user, &rid).await;
        // Only now: a release cancelled mid-way leaves the ticket to hand it on.
        ticket.finish();
        if let Err(e) = r {
            // The hold expires on its own (metering.hold_ttl_ms) and is returned then.
            tracing::warn!(request_id = %rid, error = %e, "releasing a hold failed");
        }
    }

    /// Gives the hold back and returns `error`: how a stage before the provider's 2xx
    /// ends on a failure.
    pub async fn fail(self, error: ApiError) -> ApiError {
        self.release().await;
        error
    }

    /// The request with `r`'s value, or — when `r` is an error — [`Admitted::fail`].
    pub async fn or_release<T>(self, r: Result<T, ApiError>) -> Result<(Admitted, T), ApiError> {
        match r {
            Ok(v) => Ok((self, v)),
            Err(e) => Err(self.fail(e).await),
        }
    }

    /// The provider answered 2xx: from here on the request is charged.
    pub fn answered(self) -> Answering {
        let mut r = self.0;
        r.ticket.answered();
        Answering(r)
    }
}

impl Answering {
    /// Charges `usage` and records the request (stage 8); returns what was charged and
    /// the balance left.
    pub async fn settle(
        self,
        usage: Usage,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Billed, ApiError> {
        let Context {
            state,
            model,
            mut ticket,
            ..
        } = self.0;
        let extra = (!extra.is_empty()).then_some(serde_json::Value::Object(extra));
        let event = ticket.event(usage, extra);
        // From here, a ticket dropped mid-way (or after a failed charge) hands on this
        // very event: the same id and `created_at`, so it is recorded once.
        ticket.unsettled(event.clone());
        let remaining = match charge(&state, &event).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(request_id = %event.id, error = %e, "usage could not be recorded");
                return Err(ApiError::UsageNotRecorded);
            }
        };
        ticket.finish();
        let model = model.id.clone();
        metrics::counter!("tollgate_requests_settled_total", "model" => model.clone(), "operation" => event.operation)
            .increment(1);
        metrics::counter!("tollgate_credits_charged_total", "model" => model.clone())
            .increment(u64::try_from(event.credits_used).unwrap_or(0));
        metrics::counter!("tollgate_tokens_total", "model" => model.clone(), "kind" => "input")
            .increment(u64::try_from(event.input_tokens).unwrap_or(0));
        metrics::counter!("tollgate_tokens_total", "model" => model.clone(), "kind" => "output")
            .increment(u64::try_from(event.output_tokens).unwrap_or(0));
        let cached = event.priced.map_or(0, |p| p.cached_input_tokens);
        metrics::counter!("tollgate_tokens_total", "model" => model, "kind" => "cached_input")
            .increment(u64::try_from(cached).unwrap_or(0));
        Ok(Billed {
            usage,
            credits: event.credits_used,
            remaining,
        })
    }

    /// After a 2xx, something on our side (or the provider's cut) ended the answer:
    /// charges an estimate of what was received, capped at the hold and marked with
    /// `reason`, and returns the error to answer the client (`error`, or the failure to
    /// record).
    pub async fn charge_failure(
        self,
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
            Ok(_) => error,
            Err(e) => e,
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
pub struct HoldKeeper {
    user: Uuid,
    rid: Uuid,
    origin: tokio::time::Instant,
    /// When the next move is due, in ms since `origin`.
    next_ms: Arc<AtomicU64>,
}

impl HoldKeeper {
    pub fn new(state: &AppState, user: Uuid, rid: Uuid) -> HoldKeeper {
        let half = u64::try_from(state.cfg.metering.hold_ttl.as_millis() / 2).unwrap_or(u64::MAX);
        HoldKeeper {
            user,
            rid,
            origin: tokio::time::Instant::now(),
            next_ms: Arc::new(AtomicU64::new(half.max(1))),
        }
    }
}

/// Runs `f` while keeping the request's hold alive on `keeper`'s schedule. The move
/// itself runs in a task of its own, so a slow Redis never stalls the answer.
pub async fn holding<F: std::future::Future>(
    state: &AppState,
    keeper: &HoldKeeper,
    f: F,
) -> F::Output {
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
pub async fn holding_owned<F: std::future::Future>(
    state: AppState,
    keeper: HoldKeeper,
    f: F,
) -> F::Output {
    holding(&state, &keeper, f).await
}
