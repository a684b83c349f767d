//! The metered request path, black-box: the real binary, real PostgreSQL and Redis,
//! the bundled mock provider.

use std::time::{Duration, Instant};

use crate::harness::*;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

#[tokio::test]
async fn completion_is_forwarded_and_billed_exactly() {
    let env = TestEnv::new().await;
    // 1000 + 501 = 1501 tokens at 2 credits/1k = ceil(3.002) = 4 credits.
    let mock = env
        .mock(&["--prompt-tokens", "1000", "--completion-tokens", "501"])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(1000).await;

    let (status, headers, body) = env
        .chat(&gw, &token, json!({"model": "gpt-5", "max_tokens": 600, "messages": [{"role": "user", "content": "x".repeat(1200)}]}))
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["total_tokens"], 1501);
    let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();

    // The provider got our key, never the user's token.
    let stats = env.mock_stats(&mock).await;
    assert_eq!(stats["authorization"], format!("Bearer {PROVIDER_KEY}"));

    let n = env
        .wait_for_count(
            &format!("SELECT count(*) FROM usage_history WHERE id = '{rid}'"),
            1,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, 1, "the usage row must be flushed");
    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT user_id, model_id, operation::text, credits_used, input_tokens, output_tokens, total_tokens, credit_id
               FROM usage_history WHERE id = $1",
            &[&rid],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), user);
    assert_eq!(row.get::<_, String>(1), "gpt-5");
    assert_eq!(row.get::<_, String>(2), "chat");
    assert_eq!(row.get::<_, i32>(3), 4);
    assert_eq!(
        (
            row.get::<_, i32>(4),
            row.get::<_, i32>(5),
            row.get::<_, i32>(6)
        ),
        (1000, 501, 1501)
    );
    assert!(
        row.get::<_, Option<Uuid>>(7).is_some(),
        "the row names the credits row it was charged to"
    );
    let used: i32 = db
        .query_one(
            "SELECT sum(used_credits)::int FROM credits WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(used, 4);
    assert_eq!(env.redis_balance(&user).await, Some(996));
}

/// Reads a streamed response frame by frame, timestamping each.
async fn read_stream(
    env: &TestEnv,
    gw: &Proc,
    token: &str,
    body: serde_json::Value,
) -> (u16, String, Vec<(Instant, String)>) {
    let req = chat_request(&gw.url("/v1/chat/completions"), token, &body);
    let resp = env.http.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let rid = resp
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            frames.push((Instant::now(), String::from_utf8(d.to_vec()).unwrap()));
        }
    }
    (status, rid, frames)
}

#[tokio::test]
async fn stream_is_passed_through_chunk_by_chunk_and_billed() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&[
            "--chunks",
            "5",
            "--chunk-interval-ms",
            "60",
            "--prompt-tokens",
            "20",
            "--completion-tokens",
            "480",
        ])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(100).await;

    // The client does not ask for usage: the gateway asks upstream and strips the chunk.
    let (status, rid, frames) = read_stream(
        &env,
        &gw,
        &token,
        json!({"model": "gpt-5", "stream": true, "max_tokens": 500, "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(status, 200);
    let all: String = frames.iter().map(|f| f.1.as_str()).collect();
    let events: Vec<&str> = all.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    assert!(
        !all.contains("\"choices\":[]"),
        "usage chunk must be removed: {all}"
    );
    let content: Vec<&str> = events
        .iter()
        .filter(|e| e.contains("\"content\":\"tok"))
        .copied()
        .collect();
    assert_eq!(content.len(), 5);
    // Chunk by chunk: the first content arrived while the provider was still producing.
    let first = frames
        .iter()
        .find(|f| f.1.contains("\"content\":\"tok"))
        .unwrap()
        .0;
    let done = frames.iter().find(|f| f.1.contains("[DONE]")).unwrap().0;
    assert!(
        frames.len() >= 6,
        "events must not be coalesced into one write: {} frames",
        frames.len()
    );
    assert!(
        done.duration_since(first) >= Duration::from_millis(120),
        "stream was buffered"
    );

    // The client asks for usage: it gets the usage chunk.
    let (_, rid2, frames2) = read_stream(
        &env,
        &gw,
        &token,
        json!({"model": "gpt-5", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 500,
               "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    let all2: String = frames2.iter().map(|f| f.1.as_str()).collect();
    assert!(all2.contains("\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":480,\"total_tokens\":500}"), "{all2}");

    let n = env
        .wait_for_count(
            &format!("SELECT count(*) FROM usage_history WHERE id IN ('{rid}', '{rid2}') AND credits_used = 1 AND total_tokens = 500"),
            2,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, 2);
    assert_eq!(env.redis_balance(&user).await, Some(98));
}

#[tokio::test]
async fn out_of_credits_is_refused_before_upstream() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(0).await;
    let (status, headers, body) = env
        .chat(
            &gw,
            &token,
            json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 429);
    assert_eq!(
        headers.get("x-should-retry").map(String::as_str),
        Some("false")
    );
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(openai_error(&body)["code"], "insufficient_quota");
    assert_eq!(
        env.mock_stats(&mock).await["requests"],
        0,
        "upstream must not be called"
    );
    assert_eq!(env.redis_balance(&user).await, Some(0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.usage_rows().await, 0);
    // Not merely waiting for the flusher: no charge is pending in Redis either.
    assert_eq!(env.redis_unflushed(&user).await, 0);

    // A grant reaches a balance that is already in Redis at once.
    let email: String = env
        .db()
        .await
        .query_one("SELECT email FROM users WHERE id = $1", &[&user])
        .await
        .unwrap()
        .get(0);
    env.cli(&["credits", "grant", "--email", &email, "--amount", "50"])
        .await;
    assert_eq!(env.redis_balance(&user).await, Some(50));
    let (status, _, body) = env
        .chat(&gw, &token, json!({"model": "gpt-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn upstream_failure_charges_nothing() {
    let env = TestEnv::new().await;
    let mock = env.mock(&["--fail-status", "500"]).await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(100).await;
    for stream in [false, true] {
        let (status, headers, body) = env
            .chat(&gw, &token, json!({"model": "gpt-5", "stream": stream, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}))
            .await;
        assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
        assert!(headers.contains_key("x-request-id"));
        openai_error(&body);
    }
    assert_eq!(env.mock_stats(&mock).await["requests"], 2);
    assert_eq!(
        env.redis_balance(&user).await,
        Some(100),
        "holds must be released"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.usage_rows().await, 0);
    // Not merely waiting for the flusher: no charge is pending in Redis either.
    assert_eq!(env.redis_unflushed(&user).await, 0);
    assert_eq!(env.used_credits_total().await, 0);

    // An unreachable provider is a 502 too, and charges nothing.
    let dead = env.mock(&[]).await;
    let dead_url = dead.url("");
    drop(dead);
    let gw2 = env
        .gateway_with(
            &mock,
            &[(
                "TOLLGATE__PROVIDERS__OPENAI__BASE_URL",
                &format!("{dead_url}/v1"),
            )],
        )
        .await;
    let (status, _, body) = env
        .chat(&gw2, &token, json!({"model": "gpt-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(status, 502);
    openai_error(&body);
    assert_eq!(env.redis_balance(&user).await, Some(100));
}

#[tokio::test]
async fn concurrent_requests_never_overspend() {
    let env = TestEnv::new().await;
    // Each request costs ceil((100 + 400) × 2 / 1000) = 1 credit; the balance covers 10.
    let mock = env
        .mock(&[
            "--prompt-tokens",
            "100",
            "--completion-tokens",
            "400",
            "--latency-ms",
            "50",
        ])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(10).await;
    let body = json!({"model": "gpt-5", "max_tokens": 400, "messages": [{"role": "user", "content": "y".repeat(120)}]});
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (env_http, url, token, body) = (
            env.http.clone(),
            gw.url("/v1/chat/completions"),
            token.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let req = chat_request(&url, &token, &body);
            let resp = env_http.request(req).await.unwrap();
            let status = resp.status().as_u16();
            let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
            let _ = resp.into_body().collect().await;
            (status, rid)
        }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        let (status, rid) = t.await.unwrap();
        match status {
            200 => ok.push(rid),
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(!ok.is_empty() && ok.len() <= 10, "{} successes", ok.len());
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM usage_history",
            ok.len() as i64,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, ok.len() as i64);
    let db = env.db().await;
    for rid in &ok {
        let c: i64 = db
            .query_one(
                "SELECT count(*) FROM usage_history WHERE id = $1",
                &[&Uuid::parse_str(rid).unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(c, 1, "every success has exactly one row");
    }
    let charged: i64 = db
        .query_one(
            "SELECT coalesce(sum(credits_used), 0)::bigint FROM usage_history",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(charged <= 10, "charged {charged} > balance 10");
    let used: i64 = db
        .query_one("SELECT sum(used_credits)::bigint FROM credits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(used, charged);
    assert_eq!(env.redis_balance(&user).await, Some(10 - charged));
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_charges_nothing() {
    let mut env = TestEnv::new().await;
    env.env("TOLLGATE__SERVER__MAX_BODY_BYTES", "4096");
    // A model of a provider the gateway has no configuration for.
    env.db()
        .await
        .batch_execute(
            "INSERT INTO models (id, name, display_name, provider, context_length,
                                 input_cost_per_million_tokens, output_cost_per_million_tokens, credits_per_1k_tokens)
             VALUES ('mistral-large', 'mistral-large', 'Mistral Large', 'mistral', 1000, 1, 1, 1)",
        )
        .await
        .unwrap();
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(100).await;
    let url = gw.url("/v1/chat/completions");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // (what, token, body, expected status, expected error code or "")
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no token", None, b"{}".to_vec(), 401, "missing_api_key"),
        ("garbage token", Some("abc.def.ghi"), b"{}".to_vec(), 401, "invalid_api_key"),
        ("malformed JSON", Some(&token), b"{\"model\":".to_vec(), 400, ""),
        ("unknown model", Some(&token), serde_json::to_vec(&json!({"model": "gpt-9", "messages": msgs})).unwrap(), 404, "model_not_found"),
        ("provider not wired", Some(&token), serde_json::to_vec(&json!({"model": "mistral-large", "messages": msgs})).unwrap(), 501, "provider_not_implemented"),
        ("parameter the provider lacks", Some(&token), serde_json::to_vec(&json!({"model": "claude-3.5-sonnet", "seed": 7, "messages": msgs})).unwrap(), 400, ""),
        ("body too large", Some(&token), serde_json::to_vec(&json!({"model": "gpt-5", "messages": [{"role": "user", "content": "z".repeat(5000)}]})).unwrap(), 413, "request_too_large"),
        ("negative max_tokens", Some(&token), serde_json::to_vec(&json!({"model": "gpt-5", "max_tokens": -5, "messages": msgs})).unwrap(), 400, ""),
    ];
    for (what, tok, body, want, code) in cases {
        let (status, headers, resp) = env.request("POST", &url, tok, Some(body)).await;
        assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&resp));
        assert!(
            headers.contains_key("x-request-id"),
            "{what}: no x-request-id"
        );
        let e = openai_error(&resp);
        if !code.is_empty() {
            assert_eq!(e["code"], code, "{what}");
        }
        if status == 401 {
            assert!(headers["www-authenticate"].starts_with("Bearer"), "{what}");
        }
        if what == "parameter the provider lacks" {
            assert_eq!(e["param"], "seed", "{what}");
        }
    }
    let (status, headers, body) = env
        .request("GET", &gw.url("/v1/nowhere"), Some(&token), None)
        .await;
    assert_eq!(status, 404);
    assert!(headers.contains_key("x-request-id"));
    openai_error(&body);
    // An expired token is refused (no leeway configured for this gateway).
    let email: String = env
        .db()
        .await
        .query_one("SELECT email FROM users WHERE id = $1", &[&user])
        .await
        .unwrap()
        .get(0);
    let expired = env
        .cli(&["token", "issue", "--email", &email, "--ttl", "0"])
        .await;
    let strict = env
        .gateway_with(&mock, &[("TOLLGATE__AUTH__LEEWAY_SECS", "0")])
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, headers, body) = env
        .request("GET", &strict.url("/v1/models"), Some(&expired), None)
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert!(openai_error(&body)["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    assert_eq!(env.mock_stats(&mock).await["requests"], 0);
    // Refused before the ledger: the balance was never even loaded into Redis.
    assert_eq!(env.redis_balance(&user).await, None);
    assert_eq!(env.usage_rows().await, 0);
}

#[tokio::test]
async fn models_are_listed_from_the_table() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, token) = env.user(0).await;
    let (status, _, body) = env
        .request("GET", &gw.url("/v1/models"), Some(&token), None)
        .await;
    assert_eq!(status, 200);
    let v = json(&body);
    let mut ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["claude-3.5-sonnet", "gemini-2.0-pro", "gpt-5"]);
    let (status, _, body) = env
        .request("GET", &gw.url("/v1/models/gpt-5"), Some(&token), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["owned_by"], "openai");
    let (status, _, body) = env
        .request("GET", &gw.url("/v1/models/nope"), Some(&token), None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(openai_error(&body)["code"], "model_not_found");
    // An id that is not UTF-8: a 400 in OpenAI's shape, not the framework's text.
    let (status, headers, body) = env
        .request("GET", &gw.url("/v1/models/%C3%28"), Some(&token), None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(openai_error(&body)["param"], "model");
}

#[tokio::test]
async fn every_choice_is_held_for() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    // 1 credit at 2 credits/1k affords 500 tokens; 128 choices of at least
    // metering.min_output_tokens (16) each cannot fit, one choice can.
    let (_, token) = env.user(1).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let (status, _, body) = env
        .chat(
            &gw,
            &token,
            json!({"model": "gpt-5", "n": 128, "max_tokens": 100, "messages": msgs}),
        )
        .await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert_eq!(openai_error(&body)["code"], "insufficient_quota");
    assert_eq!(env.mock_stats(&mock).await["requests"], 0);
    let (status, _, body) = env
        .chat(
            &gw,
            &token,
            json!({"model": "gpt-5", "n": 1, "max_tokens": 100, "messages": msgs}),
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn provider_refusals_are_not_passed_off_as_the_callers() {
    let env = TestEnv::new().await;
    let (user, token) = env.user(100).await;
    let body = json!({"model": "gpt-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    // The provider rejects the gateway's key: a 502, never the caller's 401, and the
    // provider's message (which may quote the key) is not passed on.
    let mock = env.mock(&["--fail-status", "401"]).await;
    let gw = env.gateway(&mock).await;
    let (status, headers, resp) = env.chat(&gw, &token, body.clone()).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&resp));
    assert!(!headers.contains_key("www-authenticate"));
    assert_eq!(openai_error(&resp)["code"], "bad_gateway");
    // The provider rate-limits the gateway: 503 with retry-after, not insufficient_quota.
    let mock = env.mock(&["--fail-status", "429"]).await;
    let gw = env.gateway(&mock).await;
    let (status, headers, resp) = env.chat(&gw, &token, body.clone()).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&resp));
    assert!(headers.contains_key("retry-after"));
    assert_eq!(openai_error(&resp)["code"], "upstream_rate_limited");
    // A provider 400 (about the request itself) is passed on as it is.
    let mock = env.mock(&["--fail-status", "400"]).await;
    let gw = env.gateway(&mock).await;
    let (status, _, resp) = env.chat(&gw, &token, body).await;
    assert_eq!(status, 400);
    openai_error(&resp);
    assert_eq!(env.redis_balance(&user).await, Some(100), "nothing charged");
}

#[tokio::test]
async fn a_silent_provider_is_cut_off_and_charges_nothing() {
    let env = TestEnv::new().await;
    let mock = env.mock(&["--latency-ms", "3000"]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[("TOLLGATE__PROVIDERS__OPENAI__IDLE_TIMEOUT_MS", "300")],
        )
        .await;
    let (user, token) = env.user(100).await;
    let (status, _, resp) = env
        .chat(&gw, &token, json!({"model": "gpt-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    // Sent and not answered: a 504, not retried, and nothing charged (no 2xx came).
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&resp));
    let e = openai_error(&resp);
    assert_eq!(e["code"], "upstream_timeout");
    assert!(e["message"].as_str().unwrap().contains("timed out"));
    assert_eq!(env.mock_stats(&mock).await["requests"], 1);
    assert_eq!(env.redis_balance(&user).await, Some(100));
}

#[tokio::test]
async fn a_grant_that_missed_redis_is_applied_once_by_sync() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(0).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let (status, _, _) = env
        .chat(
            &gw,
            &token,
            json!({"model": "gpt-5", "max_tokens": 50, "messages": msgs}),
        )
        .await;
    assert_eq!(status, 429, "balance 0 is now loaded in Redis");
    let email: String = env
        .db()
        .await
        .query_one("SELECT email FROM users WHERE id = $1", &[&user])
        .await
        .unwrap()
        .get(0);
    let (ok, _, err) = env
        .cli_raw(
            &["credits", "grant", "--email", &email, "--amount", "50"],
            &[("REDIS_URL", "redis://127.0.0.1:1")],
        )
        .await;
    assert!(!ok);
    assert!(err.contains("credits sync"), "{err}");
    assert_eq!(env.redis_balance(&user).await, Some(0));
    env.cli(&["credits", "sync", "--email", &email]).await;
    assert_eq!(env.redis_balance(&user).await, Some(50));
    env.cli(&["credits", "sync", "--email", &email]).await;
    assert_eq!(
        env.redis_balance(&user).await,
        Some(50),
        "sync applies a row once"
    );
    let (status, _, _) = env
        .chat(
            &gw,
            &token,
            json!({"model": "gpt-5", "max_tokens": 50, "messages": msgs}),
        )
        .await;
    assert_eq!(status, 200);
}

/// The value of the Prometheus sample `name{labels}` (labels in the exporter's order).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_errors_and_charges_without_naming_users() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(1000).await;
    let mut charged = 0.0;
    for _ in 0..2 {
        let (s, _, b) = env
            .chat(
                &gw,
                &token,
                json!({"model": "gpt-5", "messages": [{"role": "user", "content": "Hi"}]}),
            )
            .await;
        assert_eq!(s, 200);
        let total = json(&b)["usage"]["total_tokens"].as_i64().unwrap();
        charged += ((total * 2 + 999) / 1000) as f64;
    }
    let (s, _, _) = env
        .chat(
            &gw,
            &token,
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _, _) = env.request("GET", &gw.url("/v1/models"), None, None).await;
    assert_eq!(s, 401);

    let (s, h, body) = env.request("GET", &gw.url("/metrics"), None, None).await;
    assert_eq!(s, 200, "/metrics needs no token");
    assert!(h["content-type"].starts_with("text/plain"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(
        sample(
            &text,
            r#"tollgate_http_requests_total{route="/v1/chat/completions",method="POST",status="200"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"tollgate_http_requests_total{route="/v1/chat/completions",method="POST",status="404"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"tollgate_errors_total{error="model_not_found"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"tollgate_errors_total{error="unauthenticated"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"tollgate_credits_charged_total{model="gpt-5"}"#),
        Some(charged)
    );
    assert_eq!(
        sample(
            &text,
            r#"tollgate_requests_settled_total{model="gpt-5",operation="chat"}"#
        ),
        Some(2.0)
    );
    assert!(sample(&text, "tollgate_usage_backlog_entries").is_some());
    assert!(text.contains("tollgate_http_request_duration_seconds_bucket"));
    assert!(!text.contains(&user.to_string()), "no user id in metrics");
    assert!(!text.contains(&token[..20]), "no token in metrics");
}

#[tokio::test]
async fn a_client_limit_above_the_models_cap_is_capped_upstream_and_never_overspends() {
    let env = TestEnv::new().await;
    env.db()
        .await
        .execute(
            "UPDATE models SET max_output_tokens = 100 WHERE id = 'gpt-5'",
            &[],
        )
        .await
        .unwrap();
    // The mock would produce 5000 tokens if allowed; it honours the limit it is sent.
    let mock = env
        .mock(&["--prompt-tokens", "10", "--completion-tokens", "5000"])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(5).await;
    for body in [
        json!({"model": "gpt-5", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}),
    ] {
        let (status, _, b) = env.chat(&gw, &token, body.clone()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
        let sent = env.mock_last(&mock).await["body"].clone();
        let limit = sent["max_completion_tokens"]
            .as_i64()
            .or(sent["max_tokens"].as_i64())
            .unwrap_or_else(|| panic!("no output limit sent upstream for {body}: {sent}"));
        assert!(limit <= 100, "upstream got a limit of {limit}: {sent}");
    }
    let bal = env.redis_balance(&user).await.unwrap();
    assert_eq!(bal, 3, "a balance of 5 less two requests at 1 credit each");
}

#[tokio::test]
async fn a_client_chosen_http_method_mints_no_metric_label() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    for i in 0..5 {
        let _ = env
            .request(&format!("ZZ{i}"), &gw.url("/livez"), None, None)
            .await;
    }
    let (s, _, b) = env.request("GET", &gw.url("/metrics"), None, None).await;
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&b);
    assert!(
        !text.contains("method=\"ZZ"),
        "client methods became labels"
    );
    assert!(text.contains("method=\"other\""), "{text}");
}

#[tokio::test]
async fn speculative_sends_never_let_a_stale_balance_overspend() {
    // Speculation: a gateway that last saw a user's balance well above a request's hold
    // sends the request upstream while the hold is taken. Here another replica spends
    // the balance in between, so gateway A's figure is stale: a hold that must be
    // lowered resends with the lowered limit, a refused hold is a 429 and charges
    // nothing; the answer of the early call is never used.
    let env = TestEnv::new().await;
    // 1 credit a token. A request with max_tokens 400 holds its prompt bound `pb` (8 +
    // body bytes + 4 for its one message) + 400; answered with 10 + 400 tokens it
    // costs 410.
    env.db()
        .await
        .execute(
            "UPDATE models SET credits_per_1k_tokens = 1000 WHERE id = 'gpt-5'",
            &[],
        )
        .await
        .unwrap();
    let body = json!({"model": "gpt-5", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]});
    let pb = 8 + serde_json::to_vec(&body).unwrap().len() as i64 + 4;
    let tokens = ["--prompt-tokens", "10", "--completion-tokens", "400"];
    let slow = env
        .mock(&[&tokens[..], &["--latency-ms", "150"]].concat())
        .await;
    let fast = env.mock(&tokens).await;
    let a = env
        .gateway_with(&slow, &[("TOLLGATE__METERING__SPECULATIVE_SEND", "true")])
        .await;
    let b = env.gateway(&fast).await;
    let used = "tollgate_speculative_sends_total{outcome=\"used\"}";
    let resent = "tollgate_speculative_sends_total{outcome=\"resent\"}";
    let cancelled = "tollgate_speculative_sends_total{outcome=\"cancelled\"}";

    // A learns each user's balance (the first request loads it: no speculation) and
    // speculates on the second; then B spends all but `left` (each of B's requests
    // still fits in full: left + 410 ≥ pb + 400).
    let lowered_left = pb + 200;
    let refused_left = pb;
    let (lowered_user, lowered_token) = env.user((2 * 410 + 5 * 410 + lowered_left) as i32).await;
    let (refused_user, refused_token) = env.user((2 * 410 + 5 * 410 + refused_left) as i32).await;
    for (user, token, left) in [
        (&lowered_user, &lowered_token, lowered_left),
        (&refused_user, &refused_token, refused_left),
    ] {
        for _ in 0..2 {
            let (s, _, out) = env.chat(&a, token, body.clone()).await;
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&out));
        }
        for _ in 0..5 {
            let (s, _, out) = env.chat(&b, token, body.clone()).await;
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&out));
        }
        assert_eq!(env.redis_balance(user).await, Some(left));
    }
    let m = env.metrics(&a).await;
    assert_eq!(
        counter(&m, used),
        2,
        "A speculated on each user's second request\n{m}"
    );

    // pb + 200 credits cannot hold pb + 400: A's early call (max_tokens 400) is dropped
    // and the request goes again with the 200 tokens the balance affords.
    let (s, _, out) = env.chat(&a, &lowered_token, body.clone()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&out));
    // The mock answers as many tokens as it is allowed: the answer is the lowered call's.
    assert_eq!(json(&out)["usage"]["completion_tokens"], 200);
    assert_eq!(
        env.redis_balance(&lowered_user).await,
        Some(lowered_left - 210)
    );
    assert_eq!(counter(&env.metrics(&a).await, resent), 1);

    // pb credits afford no output at all: refused, and the early call is dropped.
    let (s, headers, out) = env.chat(&a, &refused_token, body.clone()).await;
    assert_eq!(s, 429, "{}", String::from_utf8_lossy(&out));
    assert_eq!(openai_error(&out)["code"], "insufficient_quota");
    let refused_rid = headers["x-request-id"].clone();
    // The early task counts its cancellation once it sees the refusal, which may be
    // just after the 429 went out.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter(&env.metrics(&a).await, cancelled) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counter(&env.metrics(&a).await, cancelled), 1);
    assert_eq!(env.redis_balance(&refused_user).await, Some(refused_left));
    assert_eq!(
        env.redis_held(&refused_user).await,
        0,
        "no hold is left behind"
    );

    // B, with speculation off, never speculates: not even on the second request of a
    // user whose balance is hundreds of holds deep (A did on such a second request).
    let (_, rich_token) = env.user(100_000).await;
    for _ in 0..2 {
        let (s, _, out) = env.chat(&b, &rich_token, body.clone()).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&out));
    }
    assert!(!env
        .metrics(&b)
        .await
        .contains("tollgate_speculative_sends_total"));

    // Every success has its row, the refused request none, and PostgreSQL agrees.
    let rows = env
        .wait_for_count("SELECT count(*) FROM usage_history", 8 + 7 + 2, FLUSH_WAIT)
        .await;
    assert_eq!(rows, 17);
    let db = env.db().await;
    let none: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM usage_history WHERE id = '{refused_rid}'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(none, 0);
    for (user, want) in [(lowered_user, 7 * 410 + 210i64), (refused_user, 7 * 410)] {
        let used: i64 = db
            .query_one(
                "SELECT sum(used_credits)::bigint FROM credits WHERE user_id = $1",
                &[&user],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(used, want, "credits used by {user}");
    }
}

#[tokio::test]
async fn requests_are_served_by_the_configured_worker_threads() {
    let env = TestEnv::new().await;
    let mock = env.mock(&["--latency-ms", "100"]).await;
    let gw = env
        .gateway_with(&mock, &[("TOLLGATE__SERVER__WORKER_THREADS", "3")])
        .await;
    let (user, token) = env.user(1000).await;
    let threads = || {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .filter(|n| n.starts_with("tollgate-w"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(threads(), ["tollgate-w1", "tollgate-w2", "tollgate-w3"]);
    // Six requests at once on six connections: each goes to the least busy worker, so
    // every worker gets two; all succeed and are billed.
    let body = json!({"model": "gpt-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    let calls = (0..6).map(|_| env.chat(&gw, &token, body.clone()));
    for (s, _, out) in futures_util::future::join_all(calls).await {
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&out));
    }
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM usage_history", 6, FLUSH_WAIT)
            .await,
        6
    );
    assert_eq!(env.redis_held(&user).await, 0);
    let (_, _, m) = env.request("GET", &gw.url("/metrics"), None, None).await;
    let m = String::from_utf8_lossy(&m);
    for w in 1..=3 {
        let series = format!("tollgate_worker_connections_total{{worker=\"{w}\"}}");
        assert!(
            counter(&m, &series) >= 2,
            "worker {w} served too few connections\n{m}"
        );
    }
}

// --- Hostile bodies: the provider must read what the gateway held for -------------

async fn post_raw(
    env: &TestEnv,
    gw: &Proc,
    path: &str,
    token: &str,
    body: &[u8],
) -> (u16, std::collections::HashMap<String, String>, bytes::Bytes) {
    env.request("POST", &gw.url(path), Some(token), Some(body.to_vec()))
        .await
}

/// Waits until every settled charge of `user` is in PostgreSQL.
async fn flushed(env: &TestEnv, user: &Uuid) {
    let deadline = Instant::now() + FLUSH_WAIT;
    while env.redis_unflushed(user).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(env.redis_unflushed(user).await, 0, "not flushed in time");
}

/// The measured attack: 10 credits, ONE request whose body spells
/// `max_completion_tokens` with an escape and `null`. The gateway used to read it as
/// absent and prepend its lowered limit, while the provider (last key wins) read `null`:
/// no limit, and the balance ended at −191. Now the provider reads the held limit.
#[tokio::test]
async fn an_escaped_null_limit_cannot_lift_the_hold() {
    let env = TestEnv::new().await;
    let mock = env.mock(&["--completion-tokens", "100000"]).await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(10).await;
    let body = br#"{"model":"gpt-5","max_completion_\u0074okens":null,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, headers, resp) = post_raw(&env, &gw, "/v1/chat/completions", &token, body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    // 10 credits at 2 per 1k tokens: 5,000 tokens for the prompt bound and the answer.
    let sent = env.mock_last(&mock).await["body"].clone();
    let limit = sent["max_completion_tokens"]
        .as_i64()
        .expect("a limit reached the provider");
    assert!(limit > 0 && limit < 5_000, "{sent}");
    let answered = json(&resp)["usage"]["completion_tokens"].as_i64().unwrap();
    assert_eq!(
        answered, limit,
        "the provider generated what the limit allowed"
    );
    flushed(&env, &user).await;
    let bal = env.redis_balance(&user).await.unwrap();
    assert!(bal >= 0, "balance {bal}: the hold was lifted");
    let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
    let credits: i32 = env
        .db()
        .await
        .query_one(
            "SELECT credits_used FROM usage_history WHERE id = $1",
            &[&rid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(i64::from(credits), 10 - bal);
    assert!(credits <= 10);
}

/// The same trick on `stream_options` used to remove the usage chunk, so a stream was
/// billed from an estimate. Now the provider is asked for usage whatever the spelling.
#[tokio::test]
async fn an_escaped_null_stream_options_still_gets_the_providers_usage() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&["--prompt-tokens", "300", "--completion-tokens", "40"])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(100).await;
    for body in [
        &br#"{"model":"gpt-5","stream":true,"stream_\u006fptions":null,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#[..],
        br#"{"model":"gpt-5","stream":true,"stream_options":{"include_\u0075sage":false},"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#,
    ] {
        let (status, headers, resp) = post_raw(&env, &gw, "/v1/chat/completions", &token, body).await;
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&resp);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(!text.contains("\"usage\":{"), "the client did not ask for the usage chunk: {text}");
        assert_eq!(env.mock_last(&mock).await["body"]["stream_options"]["include_usage"], true);
        flushed(&env, &user).await;
        let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
        let row = env
            .db()
            .await
            .query_one(
                "SELECT total_tokens, request_metadata FROM usage_history WHERE id = $1",
                &[&rid],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 340, "the provider's own count");
        let meta: serde_json::Value = row.get(1);
        assert!(meta.get("usage_estimated").is_none(), "{meta}");
    }
}

/// A body the gateway and the provider could read differently, or a parameter that
/// changes the provider's price in a way the hold does not bound, is refused with a 400
/// naming it — before anything is held, so nothing reaches the provider.
#[tokio::test]
async fn ambiguous_bodies_and_unpriced_parameters_are_refused_before_anything_is_held() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway_all_providers(&mock).await;
    let (user, token) = env.user(100).await;
    let m = r#""messages":[{"role":"user","content":"hi"}]"#;
    // (endpoint, body, param named or null)
    let cases: Vec<(&str, String, serde_json::Value)> = vec![
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","max_tokens":5,"max_tokens":null,{m}}}"#), json!("max_tokens")),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","max_tokens":5,"max_\u0074okens":9000,{m}}}"#), json!("max_tokens")),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","model":"gpt-4o",{m}}}"#), json!("model")),
        ("/v1/chat/completions", format!(r#"{{"model":"claude-3.5-sonnet","stream":true,"str\u0065am":false,{m}}}"#), json!("stream")),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","n":1,"n":64,{m}}}"#), json!("n")),
        ("/v1/chat/completions", r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"text","text":"x","type":"input_audio"}]}]}"#.into(), json!("messages")),
        ("/v1/chat/completions", format!("\u{feff}{{\"model\":\"gpt-5\",{m}}}"), json!(null)),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","MAX_TOKENS":99999,{m}}}"#), json!(null)),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","service_tier":"priority",{m}}}"#), json!("service_tier")),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","web_search_options":{{}},{m}}}"#), json!("web_search_options")),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","audio":{{"voice":"alloy","format":"mp3"}},"modalities":["text","audio"],{m}}}"#), json!("audio")),
        ("/v1/chat/completions", format!(r#"{{"model":"gpt-5","prediction":{{"type":"content","content":"x"}},{m}}}"#), json!("prediction")),
        ("/v1/chat/completions", r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}}]}]}"#.into(), json!("messages")),
        ("/v1/chat/completions", r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-6F2ksmvXxt4VdoqmHRw6kL"}}]}]}"#.into(), json!("messages")),
        ("/v1/completions", r#"{"model":"gpt-5","prompt":"x","best_of":2,"best_\u006ff":128}"#.into(), json!("best_of")),
        ("/v1/completions", r#"{"model":"gpt-5","prompt":[1,"x"]}"#.into(), json!("prompt")),
        ("/v1/embeddings", r#"{"model":"gpt-5","input":"a","input":["b","c"]}"#.into(), json!("input")),
        ("/v1/embeddings", r#"{"model":"gpt-5","input":{"text":"a"}}"#.into(), json!("input")),
    ];
    for (path, body, param) in &cases {
        let (status, headers, resp) = post_raw(&env, &gw, path, &token, body.as_bytes()).await;
        assert_eq!(status, 400, "{body}: {}", String::from_utf8_lossy(&resp));
        assert!(headers.contains_key("x-request-id"));
        let e = openai_error(&resp);
        assert_eq!(e["param"], *param, "{body}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    let stats = env.mock_stats(&mock).await;
    assert_eq!(stats["requests"], 0, "{stats}");
    assert_eq!(
        env.redis_balance(&user).await,
        None,
        "refused before the ledger"
    );
    assert_eq!(env.usage_rows().await, 0);
}

/// A text completion runs every prompt of an array max(n, best_of) times: the hold
/// covers all of them, so the limit sent upstream is the balance's share per output.
#[tokio::test]
async fn a_prompt_array_is_held_for_every_prompt_and_choice() {
    let env = TestEnv::new().await;
    let mock = env.mock(&["--completion-tokens", "1000"]).await;
    let gw = env.gateway(&mock).await;
    // 2 credits at 2 per 1k tokens: 1,000 tokens in all.
    let (user, token) = env.user(2).await;
    let body = br#"{"model":"gpt-5","prompt":["a","b","c","d"],"n":2,"max_tokens":500}"#;
    let (status, _, resp) = post_raw(&env, &gw, "/v1/completions", &token, body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let per_output = mock_last_completion_limit(&env, &mock).await;
    let prompt_bound = 8 + body.len() as i64;
    assert!(
        prompt_bound + 8 * per_output <= 1_000,
        "8 outputs of {per_output} tokens each do not fit the balance"
    );
    let usage = &json(&resp)["usage"];
    assert_eq!(usage["completion_tokens"].as_i64().unwrap(), 8 * per_output);
    flushed(&env, &user).await;
    let bal = env.redis_balance(&user).await.unwrap();
    assert!(bal >= 0, "balance {bal}");
}

async fn mock_last_completion_limit(env: &TestEnv, mock: &Proc) -> i64 {
    // The mock keeps the last request of any format.
    env.mock_last(mock).await["body"]["max_tokens"]
        .as_i64()
        .expect("max_tokens sent upstream")
}

/// An image costs at most what its model's catalogue row says; with no bound known
/// (Gemini's row), at most the context length — and a file (PDF) too, for any model.
/// The operator's bound applies without a restart.
#[tokio::test]
async fn images_and_files_are_held_at_the_models_bound() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                (
                    "TOLLGATE__PROVIDERS__GOOGLE__BASE_URL",
                    &format!("http://{}", mock.addr),
                ),
                ("GEMINI_API_KEY", PROVIDER_KEY),
                ("TOLLGATE__MODELS__REFRESH_MS", "200"),
            ],
        )
        .await;
    let (user, token) = env.user(100).await;
    let image = json!([{"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]);
    let post = |model: &'static str, content: serde_json::Value| {
        let body = serde_json::to_vec(&json!({"model": model, "max_tokens": 20,
            "messages": [{"role": "user", "content": content}]}))
        .unwrap();
        let (env, gw, token) = (&env, &gw, &token);
        async move { post_raw(env, gw, "/v1/chat/completions", token, &body).await }
    };
    // gpt-5: 1,500 tokens an image — 100 credits cover it.
    let (status, _, resp) = post("gpt-5", image.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    // Gemini: no bound known, an image is held as the 2M-token context: refused.
    let (status, headers, resp) = post("gemini-2.0-pro", image.clone()).await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(openai_error(&resp)["code"], "insufficient_quota");
    assert_eq!(headers["x-should-retry"], "false");
    // A PDF: its pages can cost up to the context length (400k tokens = 800 credits).
    let pdf = json!([{"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}}]);
    let (status, _, _) = post("gpt-5", pdf).await;
    assert_eq!(status, 429);
    // The operator sets Gemini's bound (16 tiles of 258 tokens): applied within the refresh.
    env.db()
        .await
        .execute(
            "UPDATE models SET image_tokens = 4128 WHERE id = 'gemini-2.0-pro'",
            &[],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, resp) = post("gemini-2.0-pro", image.clone()).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{}", String::from_utf8_lossy(&resp));
        assert!(Instant::now() < deadline, "the new bound was never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    flushed(&env, &user).await;
    assert!(env.redis_balance(&user).await.unwrap() >= 0);
}

/// A provider's report is charged exactly (DESIGN: the request is charged exactly), even
/// when it is more than the hold covers — which an honest provider's never is (the prompt
/// is bounded by its bytes, the output by the limit sent). Such a charge is marked in the
/// row and counted, so an operator sees a misbehaving provider.
#[tokio::test]
async fn a_provider_reporting_more_than_the_hold_is_charged_as_reported_and_flagged() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&["--prompt-tokens", "200000", "--completion-tokens", "50"])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(1_000).await;
    let (status, headers, resp) = env
        .chat(&gw, &token, json!({"model": "gpt-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    flushed(&env, &user).await;
    let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
    let row = env
        .db()
        .await
        .query_one(
            "SELECT credits_used, request_metadata FROM usage_history WHERE id = $1",
            &[&rid],
        )
        .await
        .unwrap();
    let (credits, meta): (i32, serde_json::Value) = (row.get(0), row.get(1));
    // 200,050 tokens at 2 per 1k, while the hold was 1 credit.
    assert_eq!(credits, 401, "{meta}");
    assert_eq!(meta["usage_over_hold"], true);
    assert_eq!(env.redis_balance(&user).await, Some(1_000 - 401));
    let m = env.metrics(&gw).await;
    assert_eq!(
        counter(&m, "tollgate_usage_over_hold_total{model=\"gpt-5\"}"),
        1,
        "{m}"
    );
}

/// Holds expire only so that a crashed gateway's come back. A stream that runs longer
/// than `metering.hold_ttl_ms` keeps its hold alive: otherwise the next reserve would
/// return it to the balance mid-stream, and the balance could be spent twice.
#[tokio::test]
async fn a_stream_longer_than_the_hold_ttl_keeps_its_hold() {
    let env = TestEnv::new().await;
    // 20 chunks 250 ms apart: a 5 s stream, with holds living 2 s.
    let mock = env
        .mock(&[
            "--chunks",
            "20",
            "--chunk-interval-ms",
            "250",
            "--completion-tokens",
            "400",
        ])
        .await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__METERING__HOLD_TTL_MS", "2000"),
                ("TOLLGATE__PROVIDERS__OPENAI__FIRST_BYTE_TIMEOUT_MS", "900"),
                ("TOLLGATE__PROVIDERS__OPENAI__IDLE_TIMEOUT_MS", "900"),
            ],
        )
        .await;
    // 2 credits: one hold of (prompt bound + 500) tokens at 2 per 1k takes them all.
    let (user, token) = env.user(2).await;
    let body = json!({"model": "gpt-5", "stream": true, "max_tokens": 500,
                      "messages": [{"role": "user", "content": "a long story"}]});
    let stream = {
        let resp = env
            .http
            .request(chat_request(&gw.url("/v1/chat/completions"), &token, &body))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        tokio::spawn(async move { resp.into_body().collect().await.unwrap().to_bytes() })
    };
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(
        env.redis_held(&user).await,
        2,
        "the running stream's hold is there"
    );
    let (status, _, resp) = env
        .chat(&gw, &token, json!({"model": "gpt-5", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(
        status,
        429,
        "the balance is still held: {}",
        String::from_utf8_lossy(&resp)
    );
    let text = stream.await.unwrap();
    assert!(String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"));
    flushed(&env, &user).await;
    assert_eq!(env.redis_held(&user).await, 0);
    assert_eq!(
        env.redis_balance(&user).await,
        Some(1),
        "charged exactly 1 credit"
    );
}

/// The email of a user made by `TestEnv::user`.
async fn email_of(env: &TestEnv, user: &Uuid) -> String {
    env.db()
        .await
        .query_one("SELECT email FROM users WHERE id = $1", &[user])
        .await
        .unwrap()
        .get(0)
}

/// `tollgate token issue --scope`.
async fn token_with_scope(env: &TestEnv, email: &str, scope: &str) -> String {
    env.cli(&["token", "issue", "--email", email, "--scope", scope])
        .await
}

/// The claims of a JWT (unverified).
fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine;
    json(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
}

/// Asserts a 403 `insufficient_scope` naming `scope` (RFC 6750 §3.1).
fn assert_insufficient_scope(
    status: u16,
    headers: &std::collections::HashMap<String, String>,
    body: &[u8],
    scope: &str,
    what: &str,
) {
    assert_eq!(status, 403, "{what}: {}", String::from_utf8_lossy(body));
    assert_eq!(
        headers.get("www-authenticate").map(String::as_str),
        Some(format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\"").as_str()),
        "{what}"
    );
    let e = openai_error(body);
    assert_eq!(e["code"], "insufficient_scope", "{what}");
    assert_eq!(e["type"], "invalid_request_error", "{what}");
    assert!(headers.contains_key("x-request-id"), "{what}");
}

#[tokio::test]
async fn a_token_without_llm_inference_is_refused_before_anything_is_read_or_held() {
    let mut env = TestEnv::new().await;
    env.env("TOLLGATE__SERVER__MAX_BODY_BYTES", "4096");
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, full) = env.user(1000).await;
    let email = email_of(&env, &user).await;
    let openid = token_with_scope(&env, &email, "openid").await;
    assert_eq!(claims_of(&openid)["scope"], "openid");
    let hello = json!({"model": "gpt-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});

    // Refused before the balance is even loaded: nothing reaches Redis or the provider.
    let (s, h, b) = env.chat(&gw, &openid, hello.clone()).await;
    assert_insufficient_scope(s, &h, &b, "llm.inference", "openid-only chat");
    assert_eq!(env.mock_stats(&mock).await["requests"], 0);
    assert_eq!(env.redis_balance(&user).await, None, "nothing was loaded");

    // Once the balance is live, a refused request moves nothing.
    let (s, _, b) = env.chat(&gw, &full, hello.clone()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let balance = env.redis_balance(&user).await;
    assert!(balance.is_some_and(|b| b < 1000), "{balance:?}");
    let calls = env.mock_stats(&mock).await["requests"].clone();
    for (what, body) in [
        ("a valid body", serde_json::to_vec(&hello).unwrap()),
        ("a streamed one", serde_json::to_vec(&json!({"model": "gpt-5", "stream": true, "messages": [{"role": "user", "content": "hi"}]})).unwrap()),
        // The body is never read: neither its size nor its syntax is what refuses it.
        ("an unparsable body", b"{not json".to_vec()),
        ("a body over max_body_bytes", vec![b'x'; 8192]),
    ] {
        let (s, h, b) = env
            .request("POST", &gw.url("/v1/chat/completions"), Some(&openid), Some(body))
            .await;
        assert_insufficient_scope(s, &h, &b, "llm.inference", what);
    }
    // A value that merely starts with the scope's name grants nothing.
    let near = token_with_scope(&env, &email, "openid llm.inferencex llm").await;
    let (s, h, b) = env.chat(&gw, &near, hello.clone()).await;
    assert_insufficient_scope(s, &h, &b, "llm.inference", "llm.inferencex");
    assert_eq!(env.mock_stats(&mock).await["requests"], calls);
    assert_eq!(env.redis_balance(&user).await, balance);
    assert_eq!(env.redis_held(&user).await, 0);
    let rows = env
        .wait_for_count("SELECT count(*) FROM usage_history", 1, FLUSH_WAIT)
        .await;
    assert_eq!(rows, 1, "only the admitted request is recorded");
}

#[tokio::test]
async fn each_route_needs_its_scope_and_that_scope_alone_suffices() {
    let env = TestEnv::new().await;
    env.db()
        .await
        .batch_execute(
            "INSERT INTO models (id, name, display_name, provider, capabilities, context_length,
                                 input_cost_per_million_tokens, output_cost_per_million_tokens, credits_per_1k_tokens)
             VALUES ('text-embedding-3-small', 'text-embedding-3-small', 'Embedding 3 small', 'openai', '{text}', 8192, 2, 0, 1)",
        )
        .await
        .unwrap();
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, default) = env.user(1000).await;
    let email = email_of(&env, &user).await;
    // The CLI's default is the desktop client's registration: every route is open to it.
    assert_eq!(
        claims_of(&default)["scope"],
        "openid email profile llm.inference models.read user.info credits.read"
    );
    let openid = token_with_scope(&env, &email, "openid").await;
    let chat = json!({"model": "gpt-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let routes: Vec<(&str, &str, Option<serde_json::Value>, &str)> = vec![
        ("POST", "/v1/chat/completions", Some(chat), "llm.inference"),
        (
            "POST",
            "/v1/completions",
            Some(json!({"model": "gpt-5", "prompt": "x", "max_tokens": 20})),
            "llm.inference",
        ),
        (
            "POST",
            "/v1/embeddings",
            Some(json!({"model": "text-embedding-3-small", "input": "x"})),
            "llm.inference",
        ),
        ("GET", "/v1/models", None, "models.read"),
        ("GET", "/v1/models/gpt-5", None, "models.read"),
        ("GET", "/v1/credits", None, "credits.read"),
        ("GET", "/v1/usage", None, "credits.read"),
        ("GET", "/v1/users/me", None, "user.info"),
        ("GET", "/v1/users/me/preferences", None, "user.info"),
        (
            "PUT",
            "/v1/users/me/preferences",
            Some(json!({"temperature": 0.5})),
            "user.info",
        ),
    ];
    let mut single = std::collections::HashMap::new();
    for scope in ["llm.inference", "models.read", "credits.read", "user.info"] {
        let t = token_with_scope(&env, &email, scope).await;
        assert_eq!(claims_of(&t)["scope"], scope);
        single.insert(scope, t);
    }
    for (method, path, body, scope) in &routes {
        let body = || body.as_ref().map(|b| serde_json::to_vec(b).unwrap());
        let what = format!("{method} {path}");
        let (s, h, b) = env
            .request(method, &gw.url(path), Some(&openid), body())
            .await;
        assert_insufficient_scope(s, &h, &b, scope, &format!("{what} with openid"));
        // Another route's scope does not open this one.
        for (other, t) in &single {
            if other != scope {
                let (s, h, b) = env.request(method, &gw.url(path), Some(t), body()).await;
                assert_insufficient_scope(s, &h, &b, scope, &format!("{what} with {other}"));
            }
        }
        let (s, _, b) = env
            .request(method, &gw.url(path), Some(&single[scope]), body())
            .await;
        assert_eq!(
            s,
            200,
            "{what} with {scope}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    // Ops and OAuth metadata need no token, hence no scope.
    for path in [
        "/livez",
        "/.well-known/oauth-authorization-server",
        "/.well-known/jwks.json",
    ] {
        let (s, _, _) = env.request("GET", &gw.url(path), None, None).await;
        assert_eq!(s, 200, "{path}");
    }
    // `--scope` must name something valid.
    for bad in ["", "   ", "a\"b"] {
        let (ok, _, err) = env
            .cli_raw(&["token", "issue", "--email", &email, "--scope", bad], &[])
            .await;
        assert!(!ok, "--scope {bad:?} accepted");
        assert!(err.contains("--scope"), "{err}");
    }
}

/// A local provider that answers a stream's headers after 900 ms and its first chunk 900 ms
/// later, then streams for 3 s; a JSON request is answered at once. Every answer
/// reports 990 tokens (within a 2-credit hold at 2 credits/1k).
async fn slow_start_provider() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                let (head_end, len) = loop {
                    let n = s.read(&mut tmp).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = s.read(&mut tmp).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
                let usage = r#"{"prompt_tokens":10,"completion_tokens":980,"total_tokens":990}"#;
                if body.contains("\"stream\":true") {
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n").await.unwrap();
                    s.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    let chunk = |d: String| format!("{:x}\r\n{}\r\n", d.len(), d);
                    let ev = |c: &str| {
                        format!("data: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{c}\"}},\"finish_reason\":null}}]}}\n\n")
                    };
                    for _ in 0..13 {
                        if s.write_all(chunk(ev("tok")).as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    let fin = format!("data: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\ndata: {{\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5\",\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n");
                    let _ = s.write_all(chunk(fin).as_bytes()).await;
                    let _ = s.write_all(b"0\r\n\r\n").await;
                } else {
                    let b = format!(
                        r#"{{"id":"x","object":"chat.completion","created":1,"model":"gpt-5","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
                    );
                    let _ = s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}", b.len()).as_bytes()).await;
                }
                let _ = s.flush().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// One keep-alive schedule runs from the reserve to the settle: a stream whose headers
/// and first chunk each take just under half the hold's TTL (two phases, each under the
/// period) still has its hold when another request of the same user comes, past the
/// TTL. (The keep-alive used to restart in each phase, and the hold expired.)
#[tokio::test]
async fn a_hold_is_kept_alive_across_the_phases_of_a_request() {
    let env = TestEnv::new().await;
    let unused = env.mock(&[]).await;
    let upstream = slow_start_provider().await;
    let gw = env
        .gateway_with(
            &unused,
            &[
                ("TOLLGATE__PROVIDERS__OPENAI__BASE_URL", upstream.as_str()),
                ("TOLLGATE__METERING__HOLD_TTL_MS", "2000"),
                ("TOLLGATE__METERING__SPECULATIVE_SEND", "false"),
                ("TOLLGATE__PROVIDERS__OPENAI__FIRST_BYTE_TIMEOUT_MS", "5000"),
                ("TOLLGATE__PROVIDERS__OPENAI__IDLE_TIMEOUT_MS", "5000"),
            ],
        )
        .await;
    let (user, token) = env.user(2).await;
    let body = json!({"model": "gpt-5", "stream": true, "max_tokens": 500,
                      "messages": [{"role": "user", "content": "a long story"}]});
    let stream = {
        let req = chat_request(&gw.url("/v1/chat/completions"), &token, &body);
        let http = env.http.clone();
        tokio::spawn(async move {
            let resp = http.request(req).await.unwrap();
            let st = resp.status().as_u16();
            (st, resp.into_body().collect().await.unwrap().to_bytes())
        })
    };
    tokio::time::sleep(Duration::from_millis(2_400)).await;
    let held = env.redis_held(&user).await;
    let (status, _, resp) = env
        .chat(&gw, &token, json!({"model": "gpt-5", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    let (st, text) = stream.await.unwrap();
    assert_eq!(held, 2, "the running stream's hold is there at 2.4 s");
    assert_eq!(
        status,
        429,
        "the hold was spent by another request: {}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"));
    flushed(&env, &user).await;
    // 990 tokens at 2 per 1k.
    assert_eq!(env.redis_balance(&user).await, Some(0));
}

/// Speculation is off by default: a replica whose figure of the balance is stale (another
/// replica holds it all) never sends upstream a request its hold then refuses — which
/// would be provider work nobody pays for, on demand.
#[tokio::test]
async fn by_default_a_stale_replica_sends_nothing_its_hold_refuses() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&[
            "--chunks",
            "10",
            "--chunk-interval-ms",
            "300",
            "--completion-tokens",
            "4000",
        ])
        .await;
    let gw1 = env.gateway(&mock).await;
    let gw2 = env.gateway(&mock).await;
    let (user, token) = env.user(200).await;
    let small = json!({"model": "gpt-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    // About 48 credits of hold: under a quarter of the 199 replica 2 last saw.
    let big = json!({"model": "gpt-5", "max_tokens": 4000, "messages": [{"role": "user", "content": "x".repeat(19_000)}]});
    let (s, _, b) = env.chat(&gw2, &token, small).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    // Replica 1 holds all of it (no max_tokens: lowered to what the balance affords).
    let long = {
        let req = chat_request(
            &gw1.url("/v1/chat/completions"),
            &token,
            &json!({"model": "gpt-5", "stream": true, "messages": [{"role": "user", "content": "long"}]}),
        );
        let http = env.http.clone();
        tokio::spawn(async move {
            let resp = http.request(req).await.unwrap();
            let _ = resp.into_body().collect().await;
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.redis_balance(&user).await,
        Some(0),
        "all held by replica 1"
    );
    let before = env.mock_stats(&mock).await["requests"].as_u64().unwrap();
    let (s, _, b) = env.chat(&gw2, &token, big).await;
    assert_eq!(s, 429, "{}", String::from_utf8_lossy(&b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        env.mock_stats(&mock).await["requests"].as_u64().unwrap(),
        before,
        "nothing went upstream"
    );
    long.await.unwrap();
    assert_eq!(
        counter(
            &env.metrics(&gw2).await,
            "tollgate_speculative_sends_total{outcome=\"cancelled\"}"
        ),
        0
    );
}

/// What the route table answers outside its routes, pinned so the split into public and
/// authenticated routers keeps it: every path but the public ones asks for a token
/// first (so unknown paths say nothing without one), and both 404 and 405 come in
/// OpenAI's shape.
#[tokio::test]
async fn paths_outside_the_routes_get_openai_shaped_errors_after_authentication() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, token) = env.user(0).await;
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        // Unknown paths and wrong methods on authenticated routes: 401 without a token.
        ("GET", "/nope", None, 401, "missing_api_key"),
        ("GET", "/v1/chat/completions", None, 401, "missing_api_key"),
        ("DELETE", "/v1/credits", None, 401, "missing_api_key"),
        // With one: 404 and 405.
        ("GET", "/nope", Some(&token), 404, "unknown_url"),
        (
            "GET",
            "/v1/chat/completions",
            Some(&token),
            405,
            "method_not_allowed",
        ),
        (
            "DELETE",
            "/v1/credits",
            Some(&token),
            405,
            "method_not_allowed",
        ),
        // Public routes need no token, for their methods or any other.
        ("POST", "/health", None, 405, "method_not_allowed"),
        ("GET", "/oauth/token", None, 405, "method_not_allowed"),
        ("GET", "/livez", None, 200, ""),
    ];
    for (method, path, tok, want, code) in cases {
        let (status, _, body) = env.request(method, &gw.url(path), *tok, None).await;
        assert_eq!(status, *want, "{method} {path} (token: {})", tok.is_some());
        if !code.is_empty() {
            assert_eq!(openai_error(&body)["code"], *code, "{method} {path}");
        }
    }
}
