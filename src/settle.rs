//! Stage 8, settle + record: price the usage the provider reported, then in ONE Redis
//! Lua call charge it, release the rest of the hold and append the usage event to the
//! user's bucket stream. The event's id (the request id) and `created_at` are fixed
//! here, in the gateway, so every later write of it lands on the same
//! `usage_history (id, created_at)` key.

use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use crate::ledger::Settled;
use crate::state::AppState;
pub use crate::usage::{
    cost, Orphan, Orphans, Priced, ProviderCosts, Rates, Usage, UsageEvent, OPERATIONS,
};

/// A prompt's tokens as the gateway knows them before the provider reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptTokens {
    /// A guess from its size (a token per four bytes of text, images at their bound).
    pub estimate: i64,
    /// The upper bound the hold was sized with.
    pub bound: i64,
}

/// What the provider has sent since it answered 2xx.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Bytes of the answer read so far.
    pub bytes: usize,
    /// Output tokens guessed from what was read (events of a stream, a token per four
    /// bytes of a JSON answer, none for embeddings).
    pub completion_estimate: i64,
    /// The usage the provider reported, once seen.
    pub usage: Option<Usage>,
}

/// The money side of one admitted request: it ends in exactly one settle (once the
/// provider answered 2xx — exactly, or from an estimate capped at the hold) or one
/// release (before that). A ticket dropped without either — a panic, an aborted task, a
/// runtime shut down — hands its debt to [`Orphans`].
#[derive(Debug)]
pub struct Ticket {
    pub user: Uuid,
    pub rid: Uuid,
    pub model_id: String,
    /// The model's rates per token kind when the request was admitted.
    pub rates: Rates,
    /// The provider's prices, for the row's `provider_cost_cents`.
    pub provider_costs: ProviderCosts,
    pub hold: i64,
    pub started: std::time::Instant,
    pub stream: bool,
    /// `usage_history.operation` (`chat` becomes `function_call` when the answer calls a
    /// tool).
    pub operation: &'static str,
    /// The prompt's tokens, for an answer without usage.
    pub prompt: PromptTokens,
    received: Option<Received>,
    /// An event whose settle failed: a dropped ticket hands this one on (same id and
    /// `created_at`, so it is recorded once whichever write lands).
    unsettled: Option<UsageEvent>,
    finished: bool,
    orphans: Orphans,
}

impl Ticket {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        user: Uuid,
        rid: Uuid,
        model_id: String,
        rates: Rates,
        provider_costs: ProviderCosts,
        hold: i64,
        started: std::time::Instant,
        stream: bool,
        operation: &'static str,
        prompt: PromptTokens,
        orphans: Orphans,
    ) -> Ticket {
        Ticket {
            user,
            rid,
            model_id,
            rates,
            provider_costs,
            hold,
            started,
            stream,
            operation,
            prompt,
            received: None,
            unsettled: None,
            finished: false,
            orphans,
        }
    }

    /// The provider answered 2xx: from now on the request is charged.
    pub fn answered(&mut self) {
        self.received.get_or_insert_with(Received::default);
    }

    /// What has been received so far (after [`Ticket::answered`]).
    pub fn progress(&mut self, r: Received) {
        if self.received.is_some() {
            self.received = Some(r);
        }
    }

    pub fn received(&self) -> Option<Received> {
        self.received
    }

    /// Settled or released: nothing is left to do.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// A settle of `event` failed: if the ticket is dropped, `event` is handed on.
    pub fn unsettled(&mut self, event: UsageEvent) {
        self.unsettled = Some(event);
    }

    /// Usage when the provider reported none, marked as estimated: the prompt's
    /// estimate plus `completion` output tokens. Its charge is capped at the hold
    /// ([`Ticket::event`]).
    pub fn estimate(&self, completion: i64) -> Usage {
        self.estimate_with(self.prompt.estimate, completion)
    }

    /// [`Ticket::estimate`] with the prompt at its bound: for an answer the client chose
    /// to leave before its usage came, so that a prompt denser in tokens than the
    /// estimate assumes is not billed below its cost.
    pub fn estimate_at_bound(&self, completion: i64) -> Usage {
        self.estimate_with(self.prompt.bound, completion)
    }

    fn estimate_with(&self, prompt: i64, completion: i64) -> Usage {
        let prompt = prompt.max(0);
        let completion = completion.max(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cached_tokens: 0,
            estimated: true,
        }
    }

    /// The usage event of this request, charged at the model's rates per token kind
    /// ([`Rates::charge`]: one ceiling per request). An estimate never charges more
    /// than was held.
    /// A provider's own report is charged exactly, even above the hold — which an honest
    /// provider's never is (the hold bounds the prompt by its bytes and the output by the
    /// limit sent): such a charge is marked `usage_over_hold`, counted and logged, so a
    /// misbehaving provider shows. A report too large to price is charged the hold,
    /// marked `usage_overflow`.
    pub fn event(&self, usage: Usage, extra: Option<serde_json::Value>) -> UsageEvent {
        let mut meta = serde_json::json!({"stream": self.stream});
        let credits = match self.rates.charge(&usage) {
            None => {
                meta["usage_overflow"] = serde_json::Value::Bool(true);
                self.hold.max(0)
            }
            Some(c) if usage.estimated => c.min(self.hold.max(0)),
            Some(c) => {
                if c > self.hold {
                    meta["usage_over_hold"] = serde_json::Value::Bool(true);
                    metrics::counter!("tollgate_usage_over_hold_total", "model" => self.model_id.clone())
                        .increment(1);
                    tracing::warn!(request_id = %self.rid, charged = c, held = self.hold,
                                   "the provider reported more usage than the hold covers");
                }
                c
            }
        };
        if usage.estimated {
            meta["usage_estimated"] = serde_json::Value::Bool(true);
        }
        if let (Some(serde_json::Value::Object(extra)), Some(m)) = (extra, meta.as_object_mut()) {
            m.extend(extra);
        }
        UsageEvent {
            id: self.rid,
            created_at: Utc::now(),
            user_id: self.user,
            model_id: self.model_id.clone(),
            operation: self.operation,
            credits_used: credits,
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            duration_ms: i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX),
            priced: Some(Priced {
                cached_input_tokens: usage.kinds().1,
                rates: self.rates,
                provider_cost_micro_cents: self.provider_costs.micro_cents(&usage),
            }),
            metadata: Some(meta),
        }
    }

    /// What a dropped, unfinished ticket leaves to do.
    fn orphan(&mut self) -> Orphan {
        if let Some(e) = self.unsettled.take() {
            return Orphan::Settle(e);
        }
        let Some(r) = self.received else {
            return Orphan::Release {
                user: self.user,
                rid: self.rid,
            };
        };
        let usage = r
            .usage
            .unwrap_or_else(|| self.estimate(r.completion_estimate));
        Orphan::Settle(self.event(usage, Some(serde_json::json!({"aborted": true}))))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let orphan = self.orphan();
        tracing::warn!(request_id = %self.rid, settle = matches!(orphan, Orphan::Settle(_)),
                       "a request ended without its settle or release; handing it on");
        // Closed only once the gateway has stopped: the hold then expires on its own
        // (metering.hold_ttl_ms) and is returned to the balance.
        let _ = self.orphans.send(orphan);
    }
}

/// Settles or releases what dropped tickets left (the gateway runs this in a task).
pub async fn handle_orphan(state: &AppState, orphan: Orphan) {
    match orphan {
        Orphan::Release { user, rid } => {
            let r = state.ledger.release(&user, &rid).await;
            metrics::counter!("tollgate_orphaned_requests_total", "outcome" => "released")
                .increment(1);
            if let Err(e) = r {
                tracing::warn!(request_id = %rid, error = %e, "releasing an orphaned hold failed; it expires on its own");
            }
        }
        Orphan::Settle(event) => {
            let r = charge(state, &event).await;
            metrics::counter!("tollgate_orphaned_requests_total", "outcome" => "settled")
                .increment(1);
            if let Err(e) = r {
                tracing::error!(request_id = %event.id, error = %e, "an orphaned request could not be settled");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("settle failed: {0}")]
pub struct SettleError(pub String);

/// Settles a completed request. A failed call is retried, but only after checking that
/// it did not in fact run (a lost reply): the charge is applied once. If Redis stays
/// unreachable, the usage row is written straight to PostgreSQL so it is never lost,
/// and a background task keeps applying the charge to the live balance until Redis
/// takes it (the row's replay through the stream then inserts nothing).
///
/// Returns the user's spendable balance right after the charge when it is known (the
/// settle script's answer; read again after a retry), `None` when it is not (Redis
/// unreachable, or the balance not loaded).
pub async fn charge(state: &AppState, event: &UsageEvent) -> Result<Option<i64>, SettleError> {
    let encoded = event.encode();
    let attempts = state.cfg.metering.settle_retries.max(1);
    let mut last = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(20 << attempt.min(6))).await;
            if already_recorded(state, event).await {
                return Ok(live_balance(state, event).await);
            }
        }
        match state
            .hot_ledger()
            .settle_balance(&event.user_id, &event.id, event.credits_used, &encoded)
            .await
        {
            Ok(Settled::Charged { balance }) => return Ok(balance),
            // Settled by an earlier attempt whose answer was lost.
            Ok(Settled::Already) => return Ok(live_balance(state, event).await),
            Err(e) => {
                last = e.to_string();
                tracing::warn!(request_id = %event.id, attempt, error = %e, "settle failed");
            }
        }
    }
    if already_recorded(state, event).await {
        return Ok(live_balance(state, event).await);
    }
    match crate::flush::write_batch(&state.db, std::slice::from_ref(event)).await {
        Ok(_) => {
            tracing::warn!(request_id = %event.id, "redis unavailable: usage written directly to PostgreSQL");
            let (state2, event, encoded) = (state.clone(), event.clone(), encoded);
            state.tasks.spawn(async move {
                let deadline = tokio::time::Instant::now() + state2.cfg.metering.hold_ttl;
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let r = state2.ledger.settle(&event.user_id, &event.id, event.credits_used, &encoded).await;
                    if r.is_ok() {
                        tracing::info!(request_id = %event.id, "charge applied to the live balance after redis returned");
                        return;
                    }
                }
                tracing::error!(request_id = %event.id, "charge recorded in PostgreSQL never reached the live balance");
            });
            Ok(None)
        }
        Err(e) => Err(SettleError(format!("redis: {last}; postgres: {e}"))),
    }
}

/// The user's spendable balance as the ledger holds it now (`None`: not loaded, or
/// Redis unreachable).
async fn live_balance(state: &AppState, event: &UsageEvent) -> Option<i64> {
    state
        .hot_ledger()
        .balance(&event.user_id)
        .await
        .ok()
        .flatten()
}

/// Whether this event is already recorded: pending in Redis, or in PostgreSQL.
async fn already_recorded(state: &AppState, event: &UsageEvent) -> bool {
    // The worker's own connection: commands on it run in order, so a settle still queued
    // there is seen.
    if let Ok(true) = state
        .hot_ledger()
        .is_pending(&event.user_id, &event.id)
        .await
    {
        return true;
    }
    let Ok(c) = state.db.get().await else {
        return false;
    };
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM usage_history WHERE id = $1 AND created_at = $2)",
        &[&event.id, &event.created_at],
    )
    .await
    .map(|r| r.get::<_, bool>(0))
    .unwrap_or(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn cost_rounds_up_per_request() {
        assert_eq!(cost(0, 2), Some(0));
        assert_eq!(cost(1, 2), Some(1));
        assert_eq!(cost(500, 2), Some(1));
        assert_eq!(cost(501, 2), Some(2));
        assert_eq!(cost(1000, 2), Some(2));
        assert_eq!(cost(1001, 1), Some(2));
        assert_eq!(cost(-1, 1), None);
        assert_eq!(cost(i64::MAX, 2), None);
    }

    proptest! {
        #[test]
        fn cost_is_the_exact_ceiling(t in 0i64..1_000_000_000, p in 0i64..10_000) {
            let c = cost(t, p).unwrap();
            let exact = i128::from(t) * i128::from(p);
            prop_assert!(i128::from(c) * 1000 >= exact);
            prop_assert!(i128::from(c) * 1000 < exact + 1000);
        }
    }

    fn ticket(hold: i64) -> (Ticket, tokio::sync::mpsc::UnboundedReceiver<Orphan>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let t = Ticket::new(
            Uuid::new_v4(),
            Uuid::now_v7(),
            "gpt-5".into(),
            Rates::flat(2),
            ProviderCosts::default(),
            hold,
            std::time::Instant::now(),
            true,
            "chat",
            PromptTokens {
                estimate: 100,
                bound: 400,
            },
            tx,
        );
        (t, rx)
    }

    #[test]
    fn a_ticket_dropped_before_any_answer_releases_its_hold() {
        let (t, mut rx) = ticket(10);
        let (user, rid) = (t.user, t.rid);
        drop(t);
        assert_eq!(rx.try_recv().unwrap(), Orphan::Release { user, rid });
        assert!(rx.try_recv().is_err(), "exactly one");
    }

    #[test]
    fn a_ticket_dropped_after_a_2xx_settles_what_was_received_capped_at_the_hold() {
        let (mut t, mut rx) = ticket(3);
        t.progress(Received {
            bytes: 10,
            completion_estimate: 7,
            usage: None,
        });
        assert_eq!(t.received(), None, "no progress before the 2xx");
        t.answered();
        t.progress(Received {
            bytes: 400,
            completion_estimate: 9_000,
            usage: None,
        });
        let rid = t.rid;
        drop(t);
        let Orphan::Settle(e) = rx.try_recv().unwrap() else {
            panic!("a settle")
        };
        assert_eq!(e.id, rid);
        assert_eq!((e.input_tokens, e.output_tokens), (100, 9_000));
        assert_eq!(e.credits_used, 3, "an estimate is capped at the hold");
        let meta = e.metadata.unwrap();
        assert_eq!(meta["aborted"], true);
        assert_eq!(meta["usage_estimated"], true);
        // The provider's own usage, once seen, is charged exactly.
        let (mut t, mut rx) = ticket(1_000);
        t.answered();
        t.progress(Received {
            bytes: 10,
            completion_estimate: 1,
            usage: Some(Usage {
                prompt_tokens: 1_000,
                completion_tokens: 500,
                total_tokens: 1_500,
                cached_tokens: 0,
                estimated: false,
            }),
        });
        drop(t);
        let Orphan::Settle(e) = rx.try_recv().unwrap() else {
            panic!("a settle")
        };
        assert_eq!(e.credits_used, 3);
        assert!(e.metadata.unwrap().get("usage_estimated").is_none());
    }

    #[test]
    fn a_report_is_charged_exactly_and_marked_above_the_hold_an_estimate_is_capped() {
        let (mut t, _rx) = ticket(3);
        let over = Usage {
            prompt_tokens: 9_000,
            completion_tokens: 1_000,
            cached_tokens: 0,
            total_tokens: 10_000,
            estimated: false,
        };
        let e = t.event(over, None);
        assert_eq!(e.credits_used, 20, "the provider's report, exactly");
        assert_eq!(e.metadata.as_ref().unwrap()["usage_over_hold"], true);
        let e = t.event(t.estimate(9_000), None);
        assert_eq!(e.credits_used, 3, "an estimate is capped at the hold");
        assert!(e.metadata.unwrap().get("usage_over_hold").is_none());
        let under = Usage {
            prompt_tokens: 900,
            completion_tokens: 100,
            total_tokens: 1_000,
            ..over
        };
        let e = t.event(under, None);
        assert_eq!(e.credits_used, 2);
        assert!(e.metadata.unwrap().get("usage_over_hold").is_none());
        t.finish();
    }

    #[test]
    fn an_unpriceable_report_charges_the_hold_and_a_client_left_estimate_the_bound() {
        let (mut t, _rx) = ticket(7);
        let absurd = Usage {
            prompt_tokens: i64::MAX,
            completion_tokens: 0,
            cached_tokens: 0,
            total_tokens: i64::MAX,
            estimated: false,
        };
        let e = t.event(absurd, None);
        assert_eq!(e.credits_used, 7);
        assert_eq!(e.metadata.unwrap()["usage_overflow"], true);
        assert_eq!(t.estimate(10).prompt_tokens, 100);
        assert_eq!(t.estimate_at_bound(10).prompt_tokens, 400);
        assert!(t.estimate_at_bound(10).estimated);
        t.finish();
    }

    #[test]
    fn a_finished_ticket_leaves_nothing_and_a_failed_settle_hands_on_its_event() {
        let (mut t, mut rx) = ticket(10);
        t.answered();
        t.finish();
        drop(t);
        assert!(rx.try_recv().is_err());
        let (mut t, mut rx) = ticket(10);
        t.answered();
        let e = t.event(t.estimate(4), None);
        t.unsettled(e.clone());
        drop(t);
        assert_eq!(
            rx.try_recv().unwrap(),
            Orphan::Settle(e),
            "the same id and created_at"
        );
    }

    /// A panic, an aborted task and a runtime shut down with the task pending all drop
    /// the ticket: each leaves exactly one orphan.
    #[test]
    fn panics_aborts_and_runtime_shutdown_hand_the_ticket_on() {
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (mut t, mut rx) = ticket(10);
        t.answered();
        let r = rt().block_on(async move {
            tokio::spawn(async move {
                let _t = t;
                panic!("a bug on the request path");
            })
            .await
        });
        assert!(r.unwrap_err().is_panic());
        assert!(matches!(rx.try_recv().unwrap(), Orphan::Settle(_)));

        let (t, mut rx) = ticket(10);
        rt().block_on(async move {
            let h = tokio::spawn(async move {
                let _t = t;
                std::future::pending::<()>().await;
            });
            tokio::task::yield_now().await;
            h.abort();
            assert!(h.await.unwrap_err().is_cancelled());
        });
        assert!(matches!(rx.try_recv().unwrap(), Orphan::Release { .. }));

        let (t, mut rx) = ticket(10);
        let runtime = rt();
        runtime.block_on(async move {
            tokio::spawn(async move {
                let _t = t;
                std::future::pending::<()>().await;
            });
            tokio::task::yield_now().await;
        });
        assert!(rx.try_recv().is_err(), "still running");
        drop(runtime);
        assert!(matches!(rx.try_recv().unwrap(), Orphan::Release { .. }));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn usage_is_read_from_openai_bodies() {
        let u = Usage::from_openai_json(
            br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (3, 4, 7)
        );
        let u = Usage::from_openai_json(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#)
            .unwrap();
        assert_eq!(u.total_tokens, 7);
        assert!(Usage::from_openai_json(br#"{"usage":null}"#).is_none());
        assert!(Usage::from_openai_json(b"garbage").is_none());
    }

    #[test]
    fn event_round_trips_through_its_encoding() {
        let e = UsageEvent {
            id: Uuid::now_v7(),
            created_at: Utc
                .timestamp_micros(1_764_000_000_123_456)
                .single()
                .unwrap(),
            user_id: Uuid::new_v4(),
            model_id: "gpt-5".into(),
            operation: "chat",
            credits_used: 2,
            input_tokens: 10,
            output_tokens: 20,
            total_tokens: 30,
            duration_ms: 5,
            priced: Some(Priced {
                cached_input_tokens: 4,
                rates: Rates {
                    input: 3,
                    output: 12,
                    cached_input: 1,
                },
                provider_cost_micro_cents: Some(12_345_678),
            }),
            metadata: Some(serde_json::json!({"stream": true})),
        };
        assert_eq!(UsageEvent::decode(&e.encode()).unwrap(), e);
        let bare = UsageEvent {
            metadata: None,
            model_id: "a|b c".into(),
            ..e
        };
        assert_eq!(UsageEvent::decode(&bare.encode()).unwrap(), bare);
        assert!(UsageEvent::decode("garbage").is_none());
        assert!(UsageEvent::decode("").is_none());
        // The price rides in the metadata: a reader of eleven fields with JSON last (a
        // gateway before prices per token kind) still reads the entry whole.
        let text = e.encode();
        let old: Vec<&str> = text.splitn(11, '\x1f').collect();
        assert_eq!(old.len(), 11);
        let meta: serde_json::Value = serde_json::from_str(old[10]).unwrap();
        assert_eq!(meta["stream"], true);
        assert_eq!(meta["priced"], serde_json::json!([4, 3, 12, 1, 12_345_678]));
        // An entry such a gateway wrote (no price) decodes, unpriced.
        let legacy = UsageEvent { priced: None, ..e };
        let text = legacy.encode();
        assert!(!text.contains("priced"));
        assert_eq!(UsageEvent::decode(&text).unwrap(), legacy);
    }

    fn sample_event(operation: &'static str) -> UsageEvent {
        UsageEvent {
            id: Uuid::now_v7(),
            created_at: Utc
                .timestamp_micros(1_764_000_000_123_456)
                .single()
                .unwrap(),
            user_id: Uuid::new_v4(),
            model_id: "claude-sonnet-4".into(),
            operation,
            credits_used: 9,
            input_tokens: 70,
            output_tokens: 30,
            total_tokens: 100,
            duration_ms: 1_234,
            priced: Some(Priced {
                cached_input_tokens: 20,
                rates: Rates::flat(2),
                provider_cost_micro_cents: None,
            }),
            metadata: Some(serde_json::json!({"upstream_cut": true, "attempts": 2})),
        }
    }

    #[test]
    fn every_operation_round_trips_through_the_stream_entry() {
        for op in OPERATIONS {
            let e = sample_event(op);
            assert_eq!(UsageEvent::decode(&e.encode()).as_ref(), Some(&e), "{op}");
        }
        // Extremes of the numbers and of the time survive too.
        let e = UsageEvent {
            credits_used: i64::MIN,
            input_tokens: -1,
            output_tokens: i64::MAX,
            total_tokens: 0,
            duration_ms: 0,
            created_at: Utc.timestamp_micros(0).single().unwrap(),
            metadata: Some(serde_json::json!({"text": "a\u{1f}b", "n": [1, 2]})),
            ..sample_event("chat")
        };
        assert_eq!(UsageEvent::decode(&e.encode()).as_ref(), Some(&e));
        // The separator cannot be part of a model id: it is dropped.
        let e = UsageEvent {
            model_id: "a\u{1f}b".into(),
            ..sample_event("chat")
        };
        let back = UsageEvent::decode(&e.encode()).unwrap();
        assert_eq!(back.model_id, "ab");
        assert_eq!(
            back,
            UsageEvent {
                model_id: "ab".into(),
                ..e
            }
        );
    }

    #[test]
    fn a_malformed_stream_entry_decodes_to_nothing() {
        let good = sample_event("chat").encode();
        let fields: Vec<&str> = good.split('\x1f').collect();
        assert_eq!(fields.len(), 11);
        // One field spoiled at a time.
        for (i, bad) in [
            (0, "not-a-uuid"),
            (1, "1.5"),
            (1, "9223372036854775807"),
            (2, ""),
            (4, "CHAT"),
            (4, "image"),
            (5, "12x"),
            (6, ""),
            (7, "1e3"),
            (8, "99999999999999999999"),
            (9, " 1"),
            (10, "{\"a\":"),
            (10, "{} trailing"),
            // A price that is not five whole numbers (the last may be null).
            (10, "{\"priced\":[1,2,3,4]}"),
            (10, "{\"priced\":[1,2,3,4,5,6]}"),
            (10, "{\"priced\":[1,2,3,\"4\",5]}"),
            (10, "{\"priced\":[1,2,3,4,5.5]}"),
            (10, "{\"priced\":null}"),
        ] {
            let mut f = fields.clone();
            f[i] = bad;
            let s = f.join("\x1f");
            assert!(
                UsageEvent::decode(&s).is_none(),
                "field {i} = {bad:?} was accepted"
            );
        }
        // Too few fields (the metadata's separator missing too), or one more.
        assert!(UsageEvent::decode(&fields[..10].join("\x1f")).is_none());
        assert!(UsageEvent::decode(&fields[..5].join("\x1f")).is_none());
        assert!(UsageEvent::decode(&format!("{good}\x1fmore")).is_none());
        // What is accepted as it stands: any JSON value as metadata, and an empty
        // model id (the flusher's insert then drops the row: no such model).
        let mut f = fields.clone();
        f[10] = "{\"priced\":[0,1,2,3,null]}";
        let e = UsageEvent::decode(&f.join("\x1f")).unwrap();
        assert_eq!(
            (e.priced.unwrap().rates.cached_input, e.metadata),
            (3, None)
        );
        let mut f = fields.clone();
        f[10] = "5";
        assert_eq!(
            UsageEvent::decode(&f.join("\x1f")).unwrap().metadata,
            Some(serde_json::json!(5))
        );
        let mut f = fields.clone();
        f[3] = "";
        assert_eq!(UsageEvent::decode(&f.join("\x1f")).unwrap().model_id, "");
    }
}
