//! The usage of one request and its price: the token counts ([`Usage`]), the cost
//! arithmetic, the [`UsageEvent`] as it travels Redis stream → PostgreSQL, and the
//! [`Orphan`] a dropped ticket hands on. Settle (stage 8) makes them and re-exports
//! them; they live here, below the modules that only read or carry them (translate,
//! stream back, the ledger, the flusher, the shared state).

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

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

/// What an admitted request leaves the gateway to do when its ticket is dropped
/// without being settled or released.
#[derive(Debug, Clone, PartialEq)]
pub enum Orphan {
    /// No 2xx yet: give the hold back.
    Release { user: Uuid, rid: Uuid },
    /// The provider answered 2xx: charge this (an estimate of what was received, capped
    /// at the hold, marked `aborted`), or an event whose settle failed.
    Settle(UsageEvent),
}

/// Where dropped tickets send their [`Orphan`]s (a task of the gateway's settles or
/// releases them).
pub type Orphans = tokio::sync::mpsc::UnboundedSender<Orphan>;
