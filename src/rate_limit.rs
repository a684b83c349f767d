//! Stage 5, first: the rate limit — requests and tokens per minute, per user, with the
//! limits of the user's subscription tier (`tiers.<free|pro|enterprise>.requests_per_minute`
//! and `.tokens_per_minute`, or their old place `rate_limits.<tier>`, resolved by
//! `config`; users without an active subscription get `free`'s). GCRA buckets in
//! memory (governor), so the check is local to each gateway: with N replicas behind a
//! load balancer a user gets up to N times the limit in the worst case. Credits, not
//! these limits, are what bound spend.
//!
//! The tier comes from PostgreSQL once per user per `rate_limits.tier_cache_ms`; if
//! PostgreSQL is unreachable the last known tier (or `free`) applies, so the hot path
//! never fails on it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DashMapStateStore;
use governor::Quota;
use http::{HeaderMap, HeaderValue};
use uuid::Uuid;

use crate::config::RateLimitConfig;
use crate::db::Db;
use crate::error::ApiError;

type Keyed =
    governor::RateLimiter<Uuid, DashMapStateStore<Uuid>, DefaultClock, StateInformationMiddleware>;

pub use crate::config::TIERS;

struct Bucket {
    limit: u32,
    limiter: Keyed,
}

impl Bucket {
    fn new(per_minute: u32) -> Option<Bucket> {
        let n = NonZeroU32::new(per_minute)?;
        Some(Bucket {
            limit: per_minute,
            limiter: governor::RateLimiter::dashmap(Quota::per_minute(n))
                .with_middleware::<StateInformationMiddleware>(),
        })
    }

    /// Takes `n` from the user's bucket. Err: (seconds until it could succeed — `None`
    /// if it never can, being larger than the whole limit — and the limit).
    fn take(&self, user: &Uuid, n: u32) -> Result<Left, Option<u64>> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(Left::full(self.limit));
        };
        match self.limiter.check_key_n(user, n) {
            Ok(Ok(s)) => Ok(Left::of(&s, self.limit)),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(Some(wait.as_millis().div_ceil(1000).max(1) as u64))
            }
            Err(_) => Err(None),
        }
    }
}

/// What is left of one bucket after a check, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct Left {
    pub limit: u32,
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl Left {
    fn full(limit: u32) -> Left {
        Left {
            limit,
            remaining: limit,
            reset: Duration::ZERO,
        }
    }

    fn of(s: &StateSnapshot, limit: u32) -> Left {
        let remaining = s.remaining_burst_capacity().min(limit);
        let per_cell = Duration::from_secs(60) / limit.max(1);
        Left {
            limit,
            remaining,
            reset: per_cell * (limit - remaining),
        }
    }
}

/// The outcome of an admitted request: what is left of each limited bucket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allowance {
    pub requests: Option<Left>,
    pub tokens: Option<Left>,
}

fn reset_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

impl Allowance {
    /// Adds OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
    pub fn write_headers(&self, h: &mut HeaderMap) {
        for (kind, left) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(l) = left else { continue };
            for (name, value) in [
                ("limit", l.limit.to_string()),
                ("remaining", l.remaining.to_string()),
                ("reset", reset_text(l.reset)),
            ] {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(format!("x-ratelimit-{name}-{kind}").as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    h.insert(n, v);
                }
            }
        }
    }
}

struct TierLimits {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

pub struct RateLimits {
    tiers: HashMap<&'static str, TierLimits>,
    /// False when no tier has a limit: the check is skipped entirely.
    active: bool,
    tier_ttl: Duration,
    tier_cache: Mutex<HashMap<Uuid, (&'static str, Instant)>>,
}

impl RateLimits {
    pub fn new(cfg: &RateLimitConfig) -> RateLimits {
        let mut tiers = HashMap::new();
        let mut active = false;
        for (tier, l) in &cfg.tiers {
            let Some(name) = TIERS.iter().find(|t| **t == tier.as_str()) else {
                continue;
            };
            let t = TierLimits {
                requests: Bucket::new(l.requests_per_minute),
                tokens: Bucket::new(l.tokens_per_minute),
            };
            active |= t.requests.is_some() || t.tokens.is_some();
            tiers.insert(*name, t);
        }
        RateLimits {
            tiers,
            active,
            tier_ttl: cfg.tier_cache,
            tier_cache: Mutex::new(HashMap::new()),
        }
    }

    async fn tier(&self, db: &Db, user: &Uuid) -> &'static str {
        let cached = self
            .tier_cache
            .lock()
            .ok()
            .and_then(|c| c.get(user).copied());
        if let Some((tier, at)) = cached {
            if at.elapsed() < self.tier_ttl {
                return tier;
            }
        }
        let fetched = async {
            let c = db.get().await.ok()?;
            let row = c
                .query_opt(
                    "SELECT tier::text FROM subscriptions
                      WHERE user_id = $1 AND status = 'active' AND current_period_end > now()
                      ORDER BY CASE tier WHEN 'enterprise' THEN 0 WHEN 'pro' THEN 1 ELSE 2 END
                      LIMIT 1",
                    &[user],
                )
                .await
                .ok()?;
            let tier: String = row.map_or_else(|| "free".to_owned(), |r| r.get(0));
            TIERS.iter().copied().find(|t| *t == tier)
        }
        .await;
        let tier = match (fetched, cached) {
            (Some(t), _) => t,
            // PostgreSQL unreachable: the last known tier, else the most restrictive.
            (None, Some((t, _))) => t,
            (None, None) => "free",
        };
        if let Ok(mut c) = self.tier_cache.lock() {
            c.insert(*user, (tier, Instant::now()));
        }
        tier
    }

    /// Admits one request of up to `prompt` + `output` tokens (prompt bound + the most
    /// it may generate), or refuses it with 429 `rate_limit_exceeded` and `retry-after`.
    /// When the client set no output limit (`output` is the model's cap), the count is
    /// capped at the whole per-minute budget, so such a request waits for a full bucket
    /// instead of being refused for ever; an explicit limit above the budget is refused
    /// as too large.
    pub async fn check(
        &self,
        db: &Db,
        user: &Uuid,
        prompt: i64,
        output: i64,
        output_explicit: bool,
    ) -> Result<Allowance, ApiError> {
        if !self.active {
            return Ok(Allowance::default());
        }
        let tier = self.tier(db, user).await;
        let Some(limits) = self.tiers.get(tier) else {
            return Ok(Allowance::default());
        };
        let mut allowance = Allowance::default();
        if let Some(b) = &limits.requests {
            allowance.requests = Some(b.take(user, 1).map_err(|retry| ApiError::RateLimited {
                message: format!(
                    "Rate limit reached: {} requests per minute for the {tier} tier. Retry after the time in `retry-after`.",
                    b.limit
                ),
                retry_after: retry,
            })?);
        }
        if let Some(b) = &limits.tokens {
            let mut tokens = prompt.saturating_add(output).max(1);
            if !output_explicit && prompt <= i64::from(b.limit) {
                tokens = tokens.min(i64::from(b.limit));
            }
            let n = u32::try_from(tokens).unwrap_or(u32::MAX);
            allowance.tokens = Some(b.take(user, n).map_err(|retry| ApiError::RateLimited {
                message: match retry {
                    Some(_) => format!(
                        "Rate limit reached: {} tokens per minute for the {tier} tier. Retry after the time in `retry-after`.",
                        b.limit
                    ),
                    None => format!(
                        "Request too large: it may use up to {n} tokens, above the {} tokens per minute of the {tier} tier; lower max_tokens or the prompt.",
                        b.limit
                    ),
                },
                retry_after: retry,
            })?);
        }
        Ok(allowance)
    }

    /// Forgets buckets that are full again and tiers not seen for a while (memory
    /// stays proportional to the users active in the last minute or so).
    pub fn housekeeping(&self) {
        for t in self.tiers.values() {
            for b in [&t.requests, &t.tokens].into_iter().flatten() {
                b.limiter.retain_recent();
                b.limiter.shrink_to_fit();
            }
        }
        if let Ok(mut c) = self.tier_cache.lock() {
            let ttl = self.tier_ttl;
            c.retain(|_, (_, at)| at.elapsed() < ttl.saturating_mul(2));
        }
    }
}
