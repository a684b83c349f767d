//! Stage 8, settle + record: price the usage the provider reported, then in ONE Redis
//! Lua call charge it, release the rest of the hold and append the usage event to the
//! user's bucket stream. The event's id (the request id) and `created_at` are fixed
//! here, in the gateway, so every later write of it lands on the same
//! `usage_history (id, created_at)` key.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::state::AppState;

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// No usage came from the provider; the counts are the gateway's estimate.
    pub estimated: bool,
}

#[derive(serde::Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<i64>,
    #[serde(default)]
    completion_tokens: Option<i64>,
    #[serde(default)]
    total_tokens: Option<i64>,
}

#[derive(serde::Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<RawUsage>,
}

impl Usage {
    /// Reads OpenAI's `usage` object from a response or chunk JSON, if present.
    pub fn from_openai_json(json: &[u8]) -> Option<Usage> {
        let w: WithUsage = serde_json::from_slice(json).ok()?;
        let u = w.usage?;
        let p = u.prompt_tokens.unwrap_or(0).max(0);
        let c = u.completion_tokens.unwrap_or(0).max(0);
        let t = u
            .total_tokens
            .unwrap_or(p.saturating_add(c))
            .max(p.saturating_add(c));
        Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: t,
            estimated: false,
        })
    }
}

/// Cost in credits: `ceil(total_tokens × credits_per_1k_tokens / 1000)`, checked.
pub fn cost(total_tokens: i64, credits_per_1k: i64) -> Option<i64> {
    if total_tokens < 0 || credits_per_1k < 0 {
        return None;
    }
    let x = total_tokens.checked_mul(credits_per_1k)?;
    Some(x / 1000 + i64::from(x % 1000 != 0))
}

/// One usage record, as it travels Redis stream → PostgreSQL.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub user_id: Uuid,
    pub model_id: String,
    pub operation: &'static str,
    pub credits_used: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub duration_ms: i64,
    pub metadata: Option<serde_json::Value>,
}

pub const OPERATIONS: [&str; 4] = ["completion", "chat", "embedding", "function_call"];

impl UsageEvent {
    /// The stream entry's one field: the values joined by U+001F (unit separator),
    /// the JSON metadata last. One field keeps the settle script's XADD cheap.
    pub fn encode(&self) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(192);
        let _ = write!(
            s,
            "{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f{}\x1f",
            self.id,
            self.created_at.timestamp_micros(),
            self.user_id,
            self.model_id.replace('\x1f', ""),
            self.operation,
            self.credits_used,
            self.input_tokens,
            self.output_tokens,
            self.total_tokens,
            self.duration_ms,
        );
        if let Some(m) = &self.metadata {
            let _ = write!(s, "{m}");
        }
        s
    }

    /// Parses what [`UsageEvent::encode`] wrote; `None` for anything else.
    pub fn decode(s: &str) -> Option<UsageEvent> {
        let mut it = s.splitn(11, '\x1f');
        let mut next = || it.next();
        let id = Uuid::parse_str(next()?).ok()?;
        let ts: i64 = next()?.parse().ok()?;
        let user_id = Uuid::parse_str(next()?).ok()?;
        let model_id = next()?.to_owned();
        let op = next()?;
        let operation = OPERATIONS.into_iter().find(|o| *o == op)?;
        let mut num = || next().and_then(|v| v.parse::<i64>().ok());
        let (credits_used, input_tokens, output_tokens, total_tokens, duration_ms) =
            (num()?, num()?, num()?, num()?, num()?);
        let meta = it.next()?;
        Some(UsageEvent {
            id,
            created_at: Utc.timestamp_micros(ts).single()?,
            user_id,
            model_id,
            operation,
            credits_used,
            input_tokens,
            output_tokens,
            total_tokens,
            duration_ms,
            metadata: if meta.is_empty() {
                None
            } else {
                Some(serde_json::from_str(meta).ok()?)
            },
        })
    }
}

#[derive(Debug)]
pub struct SettleError(pub String);

impl std::fmt::Display for SettleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "settle failed: {}", self.0)
    }
}

/// Settles a completed request. A failed call is retried, but only after checking that
/// it did not in fact run (a lost reply): the charge is applied once. If Redis stays
/// unreachable, the usage row is written straight to PostgreSQL so it is never lost,
/// and a background task keeps applying the charge to the live balance until Redis
/// takes it (the row's replay through the stream then inserts nothing).
pub async fn settle(state: &AppState, event: &UsageEvent) -> Result<(), SettleError> {
    let encoded = event.encode();
    let attempts = state.cfg.metering.settle_retries.max(1);
    let mut last = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(20 << attempt.min(6))).await;
            if already_recorded(state, event).await {
                return Ok(());
            }
        }
        match state
            .hot_ledger()
            .settle(&event.user_id, &event.id, event.credits_used, &encoded)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => {
                last = e.to_string();
                tracing::warn!(request_id = %event.id, attempt, error = %e, "settle failed");
            }
        }
    }
    if already_recorded(state, event).await {
        return Ok(());
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
            Ok(())
        }
        Err(e) => Err(SettleError(format!("redis: {last}; postgres: {e}"))),
    }
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
    }
}
