//! Prices per token kind and the cost the app can see (issue 13, items 5 and 6),
//! black-box: models with input, output and cached-input rates, cached tokens from each
//! provider, the hold at the highest rate, `x-credits-charged` / `x-credits-remaining`
//! and the usage chunk's figures, the provider's cost on the row, margin per model,
//! and `/v1/credits` row by row.

use std::collections::HashMap;

use crate::harness::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// A model of the OpenAI format with three different rates (credits per 1k tokens) and
/// the provider's costs (cents per million tokens).
const PRICED: &str = "priced-model";
const RATES: (i64, i64, i64) = (4, 10, 1); // input, output, cached input

use crate::providers::Setup;

/// The row of `models` for [`PRICED`], and per-kind rates for the seeded Anthropic and
/// Gemini models (the seeded `gpt-5` keeps NULL rates); then the mock with `args` and a
/// gateway with its three providers on it.
async fn setup(args: &[&str], credits: i32) -> Setup {
    let (i, o, c) = RATES;
    crate::providers::setup_with(&format!(
            "INSERT INTO models (id, name, display_name, provider, capabilities, context_length,
                                 input_cost_per_million_tokens, output_cost_per_million_tokens,
                                 credits_per_1k_tokens, input_credits_per_1k_tokens,
                                 output_credits_per_1k_tokens, cached_input_credits_per_1k_tokens)
             VALUES ('{PRICED}', '{PRICED}', 'Priced', 'openai', '{{text}}', 100000, 125, 1000, 2, {i}, {o}, {c}),
                    ('text-embedding-3-small', 'text-embedding-3-small', 'Embedding 3 small', 'openai',
                     '{{text}}', 8192, 2, 0, 1, NULL, NULL, NULL),
                    ('gemini-embedding', 'gemini-embedding-001', 'Gemini embedding', 'google',
                     '{{text}}', 2048, 15, 0, 1, NULL, NULL, NULL);
             UPDATE models SET input_credits_per_1k_tokens = {i}, output_credits_per_1k_tokens = {o},
                               cached_input_credits_per_1k_tokens = {c}
              WHERE id IN ('claude-3.5-sonnet', 'gemini-2.0-pro');"
        ), args, credits).await
}

type Headers = HashMap<String, String>;

impl Setup {
    /// The flushed usage row of request `rid`, with its price columns.
    async fn priced_row(&self, rid: &str) -> Row {
        self.env.flushed(rid, FLUSH_WAIT).await;
        let r = self
            .env
            .db()
            .await
            .query_one(
                "SELECT credits_used, input_tokens, output_tokens, cached_input_tokens, input_rate,
                        output_rate, cached_input_rate, provider_cost_cents::text, request_metadata
                   FROM usage_history WHERE id = $1",
                &[&Uuid::parse_str(rid).unwrap()],
            )
            .await
            .unwrap();
        let int = |i: usize| r.get::<_, Option<i32>>(i).map(i64::from);
        Row {
            credits: int(0).unwrap(),
            input: int(1).unwrap(),
            output: int(2).unwrap(),
            cached: int(3),
            rates: (int(4), int(5), int(6)),
            provider_cost_cents: r.get(7),
            meta: r.get(8),
        }
    }

    /// `GET /v1/credits` as the user.
    async fn credits(&self) -> Value {
        let (status, _, b) = self
            .env
            .request("GET", &self.gw.url("/v1/credits"), Some(&self.token), None)
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
        json(&b)
    }

    /// `credits.used_credits` summed, once every settled charge is flushed.
    async fn used_after_flush(&self) -> i64 {
        let t = std::time::Instant::now();
        while self.env.redis_unflushed(&self.user).await > 0 {
            assert!(t.elapsed() < FLUSH_WAIT, "the usage never flushed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.env.used_credits_total().await
    }
}

#[derive(Debug)]
struct Row {
    credits: i64,
    input: i64,
    output: i64,
    cached: Option<i64>,
    rates: (Option<i64>, Option<i64>, Option<i64>),
    provider_cost_cents: Option<String>,
    meta: Value,
}

/// ceil((uncached × input + cached × cached input + output × output) / 1000).
fn formula(prompt: i64, cached: i64, output: i64, (ri, ro, rc): (i64, i64, i64)) -> i64 {
    ((prompt - cached) * ri + cached * rc + output * ro + 999) / 1000
}

/// The parsed `data:` payloads of an SSE body (`[DONE]` as a string).
fn sse(body: &Value) -> Vec<Value> {
    let text = body.as_str().expect("an SSE body");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let d = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"));
            serde_json::from_str(d).unwrap_or(Value::String(d.to_owned()))
        })
        .collect()
}

fn header(h: &Headers, name: &str) -> i64 {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} in {h:?}"))
        .parse()
        .unwrap()
}

/// The margin query of ARCHITECTURE.md ("Prices per token kind"), as written there.
fn margin_query() -> String {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"),
    )
    .unwrap();
    let start = doc
        .find("```sql\n-- margin per model")
        .expect("the margin query in ARCHITECTURE.md");
    let rest = &doc[start + "```sql\n".len()..];
    rest[..rest.find("```").unwrap()].to_owned()
}

#[tokio::test]
async fn three_rates_charge_exactly_the_formula_and_the_row_records_them() {
    let s = setup(
        &[
            "--prompt-tokens",
            "1000",
            "--completion-tokens",
            "200",
            "--cache-read-tokens",
            "400",
        ],
        1000,
    )
    .await;
    let (status, h, v) = s
        .post(
            "/v1/chat/completions",
            json!({"model": PRICED, "max_tokens": 300, "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 400);
    // 600 × 4 + 400 × 1 + 200 × 10 = 4800 → 5 credits (today's formula: 1200 × 2 → 3).
    let charged = formula(1000, 400, 200, RATES);
    assert_eq!(charged, 5);
    assert_eq!(header(&h, "x-credits-charged"), charged);
    assert_eq!(header(&h, "x-credits-remaining"), 1000 - charged);
    let row = s.priced_row(&h["x-request-id"]).await;
    assert_eq!(row.credits, charged, "{row:?}");
    assert_eq!((row.input, row.output, row.cached), (1000, 200, Some(400)));
    assert_eq!(row.rates, (Some(4), Some(10), Some(1)));
    // (1000 × 125 + 200 × 1000) / 10^6 cents, exactly; cached input at the input cost.
    assert_eq!(row.provider_cost_cents.as_deref(), Some("0.325000"));
    // The headers agree with PostgreSQL once flushed.
    assert_eq!(s.used_after_flush().await, charged);
    let db = s.env.db().await;
    let left: i64 = db
        .query_one(
            "SELECT sum(total_credits - used_credits)::bigint FROM credits WHERE user_id = $1",
            &[&s.user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, header(&h, "x-credits-remaining"));

    // Margin per model: ARCHITECTURE.md's one query, with a credit worth 1.5 cents
    // (its `$1`), its numbers read as text.
    let q = format!(
        "SELECT model_id, requests, credits_charged, provider_cost_cents::text AS provider_cost_cents,
                margin_cents::text AS margin_cents
           FROM ({}) m",
        margin_query().replace("$1", "1.5")
    );
    let rows = db.query(&q, &[]).await.unwrap();
    let mine: Vec<_> = rows
        .iter()
        .filter(|r| r.get::<_, String>("model_id") == PRICED)
        .collect();
    assert_eq!(mine.len(), 1);
    let r = mine[0];
    assert_eq!(r.get::<_, i64>("requests"), 1);
    assert_eq!(r.get::<_, i64>("credits_charged"), charged);
    assert_eq!(r.get::<_, String>("provider_cost_cents"), "0.325000");
    // 5 credits × 1.5 cents − 0.325 cents.
    assert_eq!(r.get::<_, String>("margin_cents"), "7.175000");
}

#[tokio::test]
async fn null_rates_charge_what_they_did_before() {
    let s = setup(
        &[
            "--prompt-tokens",
            "1000",
            "--completion-tokens",
            "201",
            "--cache-read-tokens",
            "400",
        ],
        1000,
    )
    .await;
    // gpt-5: credits_per_1k_tokens 2, every per-kind rate NULL.
    let (status, h, v) = s.post("/v1/chat/completions", hello(300)).await;
    assert_eq!(status, 200, "{v}");
    // ceil(1201 × 2 / 1000): cached tokens change nothing at one rate.
    assert_eq!(header(&h, "x-credits-charged"), 3);
    let row = s.priced_row(&h["x-request-id"]).await;
    assert_eq!(row.credits, 3);
    assert_eq!(row.cached, Some(400));
    assert_eq!(row.rates, (Some(2), Some(2), Some(2)));
    // gpt-5's seeded costs: 125 and 1000 cents per million.
    assert_eq!(row.provider_cost_cents.as_deref(), Some("0.326000"));
    assert_eq!(s.used_after_flush().await, 3);
}

#[tokio::test]
async fn cached_tokens_of_each_provider_are_charged_at_the_cached_rate_json_and_sse() {
    let s = setup(
        &[
            "--prompt-tokens",
            "1000",
            "--completion-tokens",
            "100",
            "--cache-read-tokens",
            "300",
            "--cache-creation-tokens",
            "50",
        ],
        10_000,
    )
    .await;
    // (model, prompt tokens as OpenAI counts them, cached): Anthropic's input_tokens
    // excludes cache reads and writes (1000 + 50 written + 300 read); OpenAI's and
    // Gemini's prompt includes its cached part.
    let cases = [
        (PRICED, 1000, 300),
        ("claude-3.5-sonnet", 1350, 300),
        ("gemini-2.0-pro", 1000, 300),
    ];
    let mut total = 0;
    for (model, prompt, cached) in cases {
        let expected = formula(prompt, cached, 100, RATES);
        let body = json!({"model": model, "max_tokens": 200,
            "messages": [{"role": "user", "content": "Hello"}]});
        let (status, h, v) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 200, "{model}: {v}");
        assert_eq!(v["usage"]["prompt_tokens"], prompt, "{model}: {v}");
        assert_eq!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"], cached,
            "{model}: {v}"
        );
        assert_eq!(header(&h, "x-credits-charged"), expected, "{model}");
        let row = s.priced_row(&h["x-request-id"]).await;
        assert_eq!(
            (row.credits, row.input, row.cached),
            (expected, prompt, Some(cached)),
            "{model}"
        );
        total += expected;

        let mut stream = body;
        stream["stream"] = json!(true);
        stream["stream_options"] = json!({"include_usage": true});
        let (status, h, v) = s.post("/v1/chat/completions", stream).await;
        assert_eq!(status, 200, "{model}: {v}");
        assert!(
            !h.contains_key("x-credits-charged"),
            "a stream's head goes before its charge"
        );
        let events = sse(&v);
        assert_eq!(events.last().unwrap(), "[DONE]", "{model}: {events:?}");
        let usage: Vec<&Value> = events.iter().filter(|e| e["usage"].is_object()).collect();
        assert_eq!(usage.len(), 1, "{model}: {events:?}");
        let u = usage[0];
        assert_eq!(u["choices"], json!([]));
        assert_eq!(
            u["usage"]["prompt_tokens_details"]["cached_tokens"], cached,
            "{model}: {u}"
        );
        assert_eq!(u["x_credits_charged"], expected, "{model}: {u}");
        total += expected;
        assert_eq!(u["x_credits_remaining"], 10_000 - total, "{model}: {u}");
        let row = s.priced_row(&h["x-request-id"]).await;
        assert_eq!(
            (row.credits, row.cached),
            (expected, Some(cached)),
            "{model}"
        );
        assert_eq!(row.meta["stream"], true);
    }
    assert_eq!(s.used_after_flush().await, total);
    assert_eq!(s.env.redis_balance(&s.user).await, Some(10_000 - total));
}

/// A model whose output is dear: the hold prices every token at the highest rate, so
/// a balance that covers the formula's charge but not that hold has its limit lowered
/// (as today); one whose input is dear refuses a balance that cannot hold the prompt.
#[tokio::test]
async fn the_hold_prices_every_token_at_the_highest_rate() {
    let s = setup(&["--prompt-tokens", "10", "--completion-tokens", "5"], 0).await;
    s.env
        .db()
        .await
        .batch_execute(
            "INSERT INTO models (id, name, display_name, provider, capabilities, context_length,
                                 input_cost_per_million_tokens, output_cost_per_million_tokens,
                                 credits_per_1k_tokens, input_credits_per_1k_tokens,
                                 output_credits_per_1k_tokens, cached_input_credits_per_1k_tokens)
             VALUES ('dear-output', 'dear-output', 'Dear output', 'openai', '{text}', 100000, 1, 1, 1, 1, 100, 1),
                    ('dear-input', 'dear-input', 'Dear input', 'openai', '{text}', 100000, 1, 1, 1, 100, 1, 1)",
        )
        .await
        .unwrap();
    // The models are read at start: a gateway that knows the two.
    let gw = s.env.gateway(&s.mock).await;
    let (_, token) = s.env.user(50).await;
    // dear-output: 10 × 1 + 5 × 100 = 510 → 1 credit, but a hold for 1000 output tokens
    // at 100 per 1k is 100 credits and more: the limit is lowered to what 50 credits
    // hold (at one rate of 1 per 1k, they would hold it all).
    let (status, h, v) = s
        .env
        .chat(
            &gw,
            &token,
            json!({"model": "dear-output", "max_tokens": 1000,
                   "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&v));
    let sent = s.env.mock_last(&s.mock).await["body"].clone();
    let limit = sent["max_tokens"]
        .as_i64()
        .unwrap_or_else(|| panic!("{sent}"));
    assert!(
        (16..500).contains(&limit),
        "50 credits at 100 per 1k hold under 500 tokens: {sent}"
    );
    assert_eq!(h["x-credits-charged"], "1");
    assert_eq!(h["x-credits-remaining"], "49");

    // dear-input: 10 × 100 + 5 × 1 = 1005 → 2 credits, within 2; but the prompt's bound
    // (a token per byte, 37 and more) and 16 output tokens at 100 per 1k are more than
    // 5 credits, and 2 credits cannot hold the prompt alone: refused.
    let (_, token) = s.env.user(2).await;
    let (status, h, v) = s
        .env
        .chat(
            &gw,
            &token,
            json!({"model": "dear-input", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "Hello there, how are you doing today?"}]}),
        )
        .await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&v));
    assert_eq!(openai_error(&v)["code"], "insufficient_quota");
    assert_eq!(h["x-should-retry"], "false");
}

#[tokio::test]
async fn embeddings_completions_and_estimated_charges_carry_the_figures() {
    let s = setup(&["--embed-without-usage"], 1000).await;
    let mut left = 1000;
    for (path, body) in [
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "hello"}),
        ),
        // Gemini embeddings without usageMetadata: billed from an estimate.
        (
            "/v1/embeddings",
            json!({"model": "gemini-embedding", "input": ["x".repeat(4000)]}),
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-5", "prompt": "Say this is a test", "max_tokens": 50}),
        ),
    ] {
        let (status, h, v) = s.post(path, body).await;
        assert_eq!(status, 200, "{path}: {v}");
        let row = s.priced_row(&h["x-request-id"]).await;
        assert_eq!(header(&h, "x-credits-charged"), row.credits, "{path}");
        left -= row.credits;
        assert_eq!(header(&h, "x-credits-remaining"), left, "{path}");
    }
    assert_eq!(s.used_after_flush().await, 1000 - left);
    // A completions stream with include_usage: its usage chunk carries the figures too.
    let (status, h, v) = s
        .post(
            "/v1/completions",
            json!({"model": "gpt-5", "prompt": "x", "stream": true,
                   "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let events = sse(&v);
    let u = events
        .iter()
        .find(|e| e["usage"].is_object())
        .unwrap_or_else(|| panic!("{events:?}"));
    let row = s.priced_row(&h["x-request-id"]).await;
    assert_eq!(u["x_credits_charged"], row.credits);
    assert_eq!(u["x_credits_remaining"], left - row.credits);
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn credits_lists_each_row_in_spend_order_with_used_remaining_and_expiry() {
    let s = setup(
        &["--prompt-tokens", "1000", "--completion-tokens", "500"],
        100,
    )
    .await;
    let email: String = s
        .env
        .db()
        .await
        .query_one("SELECT email FROM users WHERE id = $1", &[&s.user])
        .await
        .unwrap()
        .get(0);
    // A second grant that expires sooner than the first: it is spent first.
    s.env
        .cli(&[
            "credits",
            "grant",
            "--email",
            &email,
            "--amount",
            "2",
            "--expires-days",
            "3",
        ])
        .await;
    // gpt-5: 1500 tokens × 2 per 1k = 3 credits: 2 from the early grant, 1 from the other.
    let (status, h, v) = s.post("/v1/chat/completions", hello(600)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(header(&h, "x-credits-charged"), 3);
    assert_eq!(header(&h, "x-credits-remaining"), 99);
    let c = s.credits().await;
    // Today's fields are all still there.
    assert_eq!(c["object"], "credits");
    assert_eq!(
        (
            c["total_credits"].as_i64(),
            c["used_credits"].as_i64(),
            c["held_credits"].as_i64(),
            c["available_credits"].as_i64()
        ),
        (Some(102), Some(3), Some(0), Some(99)),
        "{c}"
    );
    let rows = c["periods"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{c}");
    let ends: Vec<&str> = rows
        .iter()
        .map(|r| r["expires_at"].as_str().unwrap())
        .collect();
    assert!(ends[0] < ends[1], "soonest expiry first: {c}");
    for r in rows {
        assert_eq!(r["kind"], "grant");
        assert_eq!(r["expires_at"], r["billing_period_end"]);
        for k in [
            "id",
            "subscription_id",
            "billing_period_start",
            "recorded_used_credits",
        ] {
            assert!(r.get(k).is_some(), "{k}: {r}");
        }
        assert_eq!(
            r["remaining_credits"].as_i64().unwrap(),
            r["total_credits"].as_i64().unwrap() - r["used_credits"].as_i64().unwrap()
        );
    }
    assert_eq!(
        (
            rows[0]["total_credits"].as_i64(),
            rows[0]["used_credits"].as_i64()
        ),
        (Some(2), Some(2)),
        "{c}"
    );
    assert_eq!(
        (
            rows[1]["total_credits"].as_i64(),
            rows[1]["used_credits"].as_i64()
        ),
        (Some(100), Some(1)),
        "{c}"
    );
    // Once flushed, PostgreSQL's own figures are the same.
    s.used_after_flush().await;
    let c = s.credits().await;
    let rows = c["periods"].as_array().unwrap();
    let used: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["used_credits"].as_i64().unwrap(),
                r["recorded_used_credits"].as_i64().unwrap(),
            )
        })
        .collect();
    let _ = &s.mock;
    assert_eq!(used.iter().map(|u| u.0).sum::<i64>(), 3, "{c}");
    assert_eq!(used.iter().map(|u| u.1).sum::<i64>(), 3, "{c}");
}

#[tokio::test]
async fn the_openai_python_sdk_reads_the_figures_of_a_stream_and_a_json_answer() {
    let py = tokio::task::spawn_blocking(crate::providers::sdk_python)
        .await
        .unwrap();
    let s = setup(
        &[
            "--prompt-tokens",
            "1000",
            "--completion-tokens",
            "200",
            "--cache-read-tokens",
            "400",
        ],
        1000,
    )
    .await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/credits_client.py");
    let out = tokio::process::Command::new(&py)
        .arg(script)
        .arg(s.gw.url(""))
        .arg(&s.token)
        .arg(PRICED)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the SDK script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let charged = formula(1000, 400, 200, RATES);
    let mut left = 1000;
    for r in &seen {
        let row = s.priced_row(r["request_id"].as_str().unwrap()).await;
        assert_eq!(row.credits, charged, "{r}");
        assert_eq!(r["charged"], charged, "{r}");
        left -= charged;
        assert_eq!(r["remaining"], left, "{r}");
        assert_eq!(r["cached_tokens"], 400, "{r}");
    }
}
