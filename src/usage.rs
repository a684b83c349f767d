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
    /// Every input token, cached ones included.
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// The part of `prompt_tokens` read from the provider's prompt cache (OpenAI
    /// `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`,
    /// Gemini `cachedContentTokenCount`), charged at the cached-input rate.
    pub cached_tokens: i64,
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
    #[serde(default)]
    prompt_tokens_details: Option<RawPromptDetails>,
}

#[derive(serde::Deserialize)]
struct RawPromptDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
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
        let cached = u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .clamp(0, p);
        Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: t,
            cached_tokens: cached,
            estimated: false,
        })
    }

    /// The counts as they are charged: none negative, cached input within the prompt,
    /// and the total never below prompt + completion — so no provider's numbers make a
    /// charge lower than the tokens it reports. Returns (uncached input, cached input,
    /// output, tokens of the total in no kind).
    pub fn kinds(&self) -> (i64, i64, i64, i64) {
        let p = self.prompt_tokens.max(0);
        let c = self.completion_tokens.max(0);
        let cached = self.cached_tokens.clamp(0, p);
        let rest = self
            .total_tokens
            .max(0)
            .saturating_sub(p.saturating_add(c))
            .max(0);
        (p - cached, cached, c, rest)
    }
}

/// Cost in credits of `total_tokens` all at one rate: `ceil(total_tokens ×
/// credits_per_1k_tokens / 1000)`, checked. What a hold asks for (every token at the
/// model's highest rate); a request's charge is [`Rates::charge`].
pub fn cost(total_tokens: i64, credits_per_1k: i64) -> Option<i64> {
    if total_tokens < 0 || credits_per_1k < 0 {
        return None;
    }
    let x = total_tokens.checked_mul(credits_per_1k)?;
    Some(x / 1000 + i64::from(x % 1000 != 0))
}

/// A model's prices in credits per 1,000 tokens of each kind (the effective ones: a
/// NULL column of `models` is the model's `credits_per_1k_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    pub input: i64,
    pub output: i64,
    pub cached_input: i64,
}

impl Rates {
    /// Every kind at one rate (today's pricing, and what NULL columns give).
    pub fn flat(credits_per_1k: i64) -> Rates {
        Rates {
            input: credits_per_1k,
            output: credits_per_1k,
            cached_input: credits_per_1k,
        }
    }

    /// The highest of the three: what a hold prices every token at, so that it covers
    /// whatever mix of kinds the answer turns out to be.
    pub fn max(&self) -> i64 {
        self.input.max(self.output).max(self.cached_input)
    }

    /// The charge of `usage`: `ceil((uncached input × input + cached input ×
    /// cached_input + output × output) / 1000)` in checked arithmetic, one ceiling per
    /// request. Tokens of the total in no kind (a provider whose total exceeds prompt +
    /// completion) are charged at the highest rate. `None`: a negative rate, or a
    /// product beyond `i64`.
    pub fn charge(&self, usage: &Usage) -> Option<i64> {
        if self.input < 0 || self.output < 0 || self.cached_input < 0 {
            return None;
        }
        let (uncached, cached, out, rest) = usage.kinds();
        let x = uncached
            .checked_mul(self.input)?
            .checked_add(cached.checked_mul(self.cached_input)?)?
            .checked_add(out.checked_mul(self.output)?)?
            .checked_add(rest.checked_mul(self.max())?)?;
        Some(x / 1000 + i64::from(x % 1000 != 0))
    }
}

/// What the provider charges the operator, from the seed's
/// `models.input_cost_per_million_tokens` / `output_cost_per_million_tokens` (US cents
/// per million tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProviderCosts {
    pub input_cents_per_million: i64,
    pub output_cents_per_million: i64,
}

impl ProviderCosts {
    /// The provider's cost of `usage` in millionths of a cent (exact: the row stores it
    /// divided by 10^6 as `numeric`). Cached input is priced as input (the seed has no
    /// cached-input cost; every provider's cached price is below its input price, so
    /// this never understates the cost); tokens of the total in no kind as output.
    /// `None` beyond `i64`.
    pub fn micro_cents(&self, usage: &Usage) -> Option<i64> {
        let (uncached, cached, out, rest) = usage.kinds();
        let x = i128::from(uncached.checked_add(cached)?)
            * i128::from(self.input_cents_per_million)
            + i128::from(out.checked_add(rest)?) * i128::from(self.output_cents_per_million);
        i64::try_from(x).ok().filter(|v| *v >= 0)
    }
}

/// What a usage row records of its price: the cached share of its input, the rates it
/// was charged at, and the provider's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Priced {
    pub cached_input_tokens: i64,
    pub rates: Rates,
    /// The provider's cost in millionths of a cent (`usage_history.provider_cost_cents`
    /// × 10^6); `None` when it does not fit an `i64`.
    pub provider_cost_micro_cents: Option<i64>,
}

/// What a settled request was charged, for the client: the usage charged (the
/// provider's, or the gateway's estimate), the credits, and the spendable balance right
/// after the charge (`None` when the ledger could not tell). Sent as the headers
/// `x-credits-charged` / `x-credits-remaining` of a JSON answer, and as the fields
/// `x_credits_charged` / `x_credits_remaining` of a stream's usage chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Billed {
    pub usage: Usage,
    pub credits: i64,
    pub remaining: Option<i64>,
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
    /// What it was charged at (`None`: an event of a gateway before prices per token
    /// kind; its row has NULL there).
    pub priced: Option<Priced>,
    pub metadata: Option<serde_json::Value>,
}

pub const OPERATIONS: [&str; 4] = ["completion", "chat", "embedding", "function_call"];

/// The key of the encoded metadata that carries the price (see [`UsageEvent::encode`]).
const PRICED_KEY: &str = "priced";

impl UsageEvent {
    /// The stream entry's one field: the values joined by U+001F (unit separator),
    /// the JSON metadata last. One field keeps the settle script's XADD cheap.
    ///
    /// The price travels inside the metadata object, as `"priced": [cached input
    /// tokens, input rate, output rate, cached-input rate, provider cost in millionths
    /// of a cent or null]`, which [`UsageEvent::decode`] takes out again: the entry keeps
    /// the eleven fields a gateway before prices per token kind reads, so during a
    /// rolling upgrade an older flusher still writes the row (its metadata then shows
    /// the price, its price columns NULL) instead of dropping an entry it cannot read.
    pub fn encode(&self) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(224);
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
        let price = self.priced.map(|p| {
            let cost = p
                .provider_cost_micro_cents
                .map_or_else(|| "null".to_owned(), |c| c.to_string());
            format!(
                "\"{PRICED_KEY}\":[{},{},{},{},{cost}]",
                p.cached_input_tokens, p.rates.input, p.rates.output, p.rates.cached_input
            )
        });
        match (&self.metadata, price) {
            (Some(serde_json::Value::Object(m)), Some(price)) => {
                s.push_str(&serde_json::to_string(m).unwrap_or_else(|_| "{}".into()));
                s.pop(); // the closing brace
                if !m.is_empty() {
                    s.push(',');
                }
                s.push_str(&price);
                s.push('}');
            }
            (None, Some(price)) => {
                let _ = write!(s, "{{{price}}}");
            }
            // Metadata that is not an object (the gateway never makes one) has no room
            // for the price.
            (Some(m), _) => {
                let _ = write!(s, "{m}");
            }
            (None, None) => {}
        }
        s
    }

    /// Parses what [`UsageEvent::encode`] wrote (this version's or one without the
    /// price); `None` for anything else.
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
        let mut metadata: Option<serde_json::Value> = if meta.is_empty() {
            None
        } else {
            Some(serde_json::from_str(meta).ok()?)
        };
        let mut priced = None;
        if let Some(serde_json::Value::Object(m)) = &mut metadata {
            if let Some(p) = m.remove(PRICED_KEY) {
                priced = Some(priced_from(&p)?);
                if m.is_empty() {
                    metadata = None;
                }
            }
        }
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
            priced,
            metadata,
        })
    }
}

/// The `"priced"` array of an encoded event's metadata.
fn priced_from(v: &serde_json::Value) -> Option<Priced> {
    let [cached, input, output, cached_input, cost] = v.as_array()?.as_slice() else {
        return None;
    };
    Some(Priced {
        cached_input_tokens: cached.as_i64()?,
        rates: Rates {
            input: input.as_i64()?,
            output: output.as_i64()?,
            cached_input: cached_input.as_i64()?,
        },
        provider_cost_micro_cents: match cost {
            serde_json::Value::Null => None,
            c => Some(c.as_i64()?),
        },
    })
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usage(prompt: i64, cached: i64, completion: i64, total: i64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            cached_tokens: cached,
            estimated: false,
        }
    }

    #[test]
    fn each_kind_at_its_rate_with_one_ceiling() {
        let r = Rates {
            input: 3,
            output: 15,
            cached_input: 1,
        };
        // 700 uncached × 3 + 300 cached × 1 + 200 × 15 = 2100 + 300 + 3000 = 5400 → 6.
        assert_eq!(r.charge(&usage(1000, 300, 200, 1200)), Some(6));
        // One ceiling for the request, not one per kind: 1 × 3 + 1 × 1 + 1 × 15 = 19 → 1.
        assert_eq!(r.charge(&usage(2, 1, 1, 3)), Some(1));
        assert_eq!(r.charge(&usage(0, 0, 0, 0)), Some(0));
        assert_eq!(r.max(), 15);
        assert_eq!(Rates::flat(2).charge(&usage(600, 0, 400, 1000)), Some(2));
    }

    #[test]
    fn a_providers_numbers_never_lower_the_charge_below_what_they_say() {
        let r = Rates {
            input: 10,
            output: 10,
            cached_input: 0,
        };
        // More cached than prompt: the cached share is the whole prompt, no more.
        assert_eq!(
            r.charge(&usage(100, 500, 100, 200)),
            r.charge(&usage(100, 100, 100, 200))
        );
        // Negative counts are zero.
        assert_eq!(r.charge(&usage(100, -50, -3, 100)), Some(1));
        assert_eq!(usage(100, -50, -3, 100).kinds(), (100, 0, 0, 0));
        // A total above prompt + completion: the rest at the highest rate.
        let r = Rates {
            input: 1,
            output: 30,
            cached_input: 0,
        };
        assert_eq!(usage(100, 0, 100, 1200).kinds(), (100, 0, 100, 1000));
        assert_eq!(r.charge(&usage(100, 0, 100, 1200)), Some(34)); // 100 + 3000 + 30000
                                                                   // A negative rate or an overflow has no price.
        assert_eq!(Rates::flat(-1).charge(&usage(1, 0, 0, 1)), None);
        assert_eq!(
            Rates::flat(2).charge(&usage(i64::MAX, 0, 0, i64::MAX)),
            None
        );
    }

    #[test]
    fn the_provider_cost_is_exact_in_millionths_of_a_cent() {
        let c = ProviderCosts {
            input_cents_per_million: 125,
            output_cents_per_million: 1000,
        };
        // Cached input at the input cost: (1000 × 125) + (200 × 1000) = 325,000 µ¢ = 0.325 ¢.
        assert_eq!(c.micro_cents(&usage(1000, 400, 200, 1200)), Some(325_000));
        assert_eq!(c.micro_cents(&usage(i64::MAX, 0, i64::MAX, i64::MAX)), None);
    }

    #[test]
    fn cached_tokens_are_read_from_openai_usage_and_clamped() {
        let u = Usage::from_openai_json(
            br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"total_tokens":105,
                 "prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0}}}"#,
        )
        .unwrap();
        assert_eq!((u.prompt_tokens, u.cached_tokens), (100, 64));
        let u = Usage::from_openai_json(
            br#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":64}}}"#,
        )
        .unwrap();
        assert_eq!(u.cached_tokens, 10, "never more than the prompt");
        let u = Usage::from_openai_json(
            br#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":-4}}}"#,
        )
        .unwrap();
        assert_eq!(u.cached_tokens, 0);
        let u = Usage::from_openai_json(
            br#"{"usage":{"prompt_tokens":10,"prompt_tokens_details":null}}"#,
        )
        .unwrap();
        assert_eq!(u.cached_tokens, 0);
    }

    proptest! {
        /// The charge is the exact ceiling of Σ tokens_k × rate_k / 1000 (computed in
        /// i128), and with every rate equal it is today's `cost(total, rate)`.
        #[test]
        fn the_charge_is_the_exact_ceiling(
            prompt in 0i64..2_000_000_000,
            cached_share in 0i64..=1000,
            completion in 0i64..2_000_000_000,
            extra in 0i64..1_000_000,
            input in 0i64..100_000,
            output in 0i64..100_000,
            cached_input in 0i64..100_000,
        ) {
            let cached = prompt / 1000 * cached_share;
            let total = prompt + completion + extra;
            let u = usage(prompt, cached, completion, total);
            let r = Rates { input, output, cached_input };
            let c = r.charge(&u).unwrap();
            let exact = i128::from(prompt - cached) * i128::from(input)
                + i128::from(cached) * i128::from(cached_input)
                + i128::from(completion) * i128::from(output)
                + i128::from(extra) * i128::from(input.max(output).max(cached_input));
            let ceil = (exact + 999) / 1000;
            prop_assert_eq!(i128::from(c), ceil);
            prop_assert_eq!(Rates::flat(input).charge(&u), cost(total, input));
            // The hold prices every token at the highest rate: it covers the charge.
            prop_assert!(cost(total, r.max()).unwrap() >= c);
        }
    }
}
