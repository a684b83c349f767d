//! Routing and resilience, black-box: several deployments per provider, failover,
//! retries, circuit breakers, timeouts, disconnects and cut streams, and the user's
//! preferences — the real binary against real PostgreSQL and Redis and bundled mock
//! providers.

use std::time::{Duration, Instant};

use crate::harness::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use uuid::Uuid;

/// `providers.openai.deployments` as an environment value: (base URL, key variable, weight).
fn deployments(list: &[(&str, &str, u32)]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|(url, key, w)| {
            format!("{{base_url=\"{url}/v1\", api_key_env=\"{key}\", weight={w}}}")
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// A gateway whose OpenAI provider has the given deployments, plus `extra` env.
async fn gateway(env: &TestEnv, list: &[(&str, &str, u32)], extra: &[(&str, &str)]) -> Proc {
    let deps = deployments(list);
    let mut vars = vec![("TOLLGATE__PROVIDERS__OPENAI__DEPLOYMENTS", deps.as_str())];
    vars.extend_from_slice(extra);
    // The single-deployment base URL is overridden by the list; any mock will do.
    let any = env.mock(&[]).await;
    let gw = env.gateway_with(&any, &vars).await;
    drop(any);
    gw
}

fn small(stream: bool) -> Value {
    json!({"model": "gpt-5", "stream": stream, "max_tokens": 600,
           "messages": [{"role": "user", "content": "hello"}]})
}

/// Reads a whole streamed answer; returns (status, request id, text).
async fn stream_all(env: &TestEnv, gw: &Proc, token: &str, body: &Value) -> (u16, Uuid, String) {
    let req = chat_request(&gw.url("/v1/chat/completions"), token, body);
    let resp = env.http.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let rid = Uuid::parse_str(resp.headers()["x-request-id"].to_str().unwrap()).unwrap();
    let mut b = resp.into_body();
    let mut text = Vec::new();
    while let Some(Ok(f)) = b.frame().await {
        if let Ok(d) = f.into_data() {
            text.extend_from_slice(&d);
        }
    }
    (status, rid, String::from_utf8(text).unwrap())
}

/// The usage row of `rid` once flushed: (credits, input, output, total, metadata).
async fn row(env: &TestEnv, rid: &Uuid) -> (i32, i32, i32, i32, Value) {
    let n = env
        .wait_for_count(
            &format!("SELECT count(*) FROM usage_history WHERE id = '{rid}'"),
            1,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, 1, "exactly one usage row for {rid}");
    let r = env
        .db()
        .await
        .query_one(
            "SELECT credits_used, input_tokens, output_tokens, total_tokens, request_metadata
               FROM usage_history WHERE id = $1",
            &[&rid],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// A free port nobody listens on.
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[tokio::test]
async fn a_failing_deployment_falls_over_to_the_next_and_is_billed_once() {
    let env = TestEnv::new().await;
    let broken = env.mock(&["--fail-status", "500"]).await;
    // 1000 + 501 tokens at 2 credits/1k = 4 credits.
    let good = env
        .mock(&["--prompt-tokens", "1000", "--completion-tokens", "501"])
        .await;
    // The broken one has all the weight; the good one is the backup.
    let gw = gateway(
        &env,
        &[
            (&broken.url(""), "OPENAI_API_KEY", 1),
            (&good.url(""), "OPENAI_API_KEY", 0),
        ],
        &[],
    )
    .await;
    let (user, token) = env.user(100).await;

    let (status, headers, body) = env.chat(&gw, &token, small(false)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["usage"]["total_tokens"], 1501);
    let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
    let (status, rid2, text) = stream_all(&env, &gw, &token, &small(true)).await;
    assert_eq!(status, 200);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    assert_eq!(env.mock_stats(&broken).await["requests"], 2);
    assert_eq!(env.mock_stats(&good).await["served"], 2);
    for id in [rid, rid2] {
        let (credits, input, output, total, meta) = row(&env, &id).await;
        assert_eq!((credits, input, output, total), (4, 1000, 501, 1501));
        assert_eq!(meta["attempts"], 2);
        assert_eq!(meta["deployment"], 1);
    }
    assert_eq!(env.redis_balance(&user).await, Some(100 - 8));
    assert_eq!(env.used_credits_total().await, 8);
}

#[tokio::test]
async fn a_provider_400_is_never_retried() {
    let env = TestEnv::new().await;
    let refusing = env.mock(&["--fail-status", "400"]).await;
    let good = env.mock(&[]).await;
    let gw = gateway(
        &env,
        &[
            (&refusing.url(""), "OPENAI_API_KEY", 1),
            (&good.url(""), "OPENAI_API_KEY", 0),
        ],
        &[("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "3")],
    )
    .await;
    let (user, token) = env.user(100).await;
    for stream in [false, true] {
        let (status, _, body) = env.chat(&gw, &token, small(stream)).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        openai_error(&body);
    }
    assert_eq!(
        env.mock_stats(&refusing).await["requests"],
        2,
        "one request each"
    );
    assert_eq!(env.mock_stats(&good).await["requests"], 0);
    assert_eq!(env.redis_balance(&user).await, Some(100));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.usage_rows().await, 0);
    // Not merely waiting for the flusher: no charge is pending in Redis either.
    assert_eq!(env.redis_unflushed(&user).await, 0);
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_and_a_long_one_is_not_waited_for() {
    let env = TestEnv::new().await;
    let busy_once = env
        .mock(&[
            "--fail-status",
            "429",
            "--fail-first",
            "1",
            "--retry-after",
            "1",
        ])
        .await;
    let gw = env
        .gateway_with(
            &busy_once,
            &[("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "2")],
        )
        .await;
    let (user, token) = env.user(100).await;
    let started = Instant::now();
    let (status, headers, body) = env.chat(&gw, &token, small(false)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the retry waited for retry-after"
    );
    let s = env.mock_stats(&busy_once).await;
    assert_eq!(
        (s["requests"].as_i64(), s["served"].as_i64()),
        (Some(2), Some(1))
    );
    let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
    let (credits, _, _, _, meta) = row(&env, &rid).await;
    assert_eq!(meta["attempts"], 2);
    assert_eq!(
        env.redis_balance(&user).await,
        Some(100 - i64::from(credits))
    );

    // A retry-after beyond the bound ends that deployment's attempts: 503 at once,
    // with the provider's retry-after passed on, and nothing charged.
    let busy = env
        .mock(&["--fail-status", "429", "--retry-after", "30"])
        .await;
    let gw = env
        .gateway_with(
            &busy,
            &[
                ("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "3"),
                ("TOLLGATE__PROVIDERS__OPENAI__RETRY_AFTER_MAX_MS", "2000"),
            ],
        )
        .await;
    let before = env.redis_balance(&user).await;
    let (status, headers, body) = env.chat(&gw, &token, small(false)).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["retry-after"], "30");
    assert_eq!(openai_error(&body)["code"], "upstream_rate_limited");
    assert_eq!(env.mock_stats(&busy).await["requests"], 1);
    assert_eq!(env.redis_balance(&user).await, before);
}

#[tokio::test]
async fn retries_of_one_deployment_back_off_and_the_last_failure_charges_nothing() {
    let env = TestEnv::new().await;
    let broken = env.mock(&["--fail-status", "503"]).await;
    let gw = env
        .gateway_with(
            &broken,
            &[
                ("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "3"),
                ("TOLLGATE__PROVIDERS__OPENAI__BACKOFF_BASE_MS", "100"),
            ],
        )
        .await;
    let (user, token) = env.user(100).await;
    let started = std::time::Instant::now();
    let (status, _, body) = env.chat(&gw, &token, small(true)).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    // Two waits, each at least half its step (100 ms, then 200 ms): a lower bound that
    // only a missing back-off can break.
    assert!(
        started.elapsed() >= Duration::from_millis(50 + 100),
        "three attempts in {:?}: no back-off between them",
        started.elapsed()
    );
    openai_error(&body);
    assert_eq!(env.mock_stats(&broken).await["requests"], 3);
    assert_eq!(env.redis_balance(&user).await, Some(100));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.usage_rows().await, 0);
    // Not merely waiting for the flusher: no charge is pending in Redis either.
    assert_eq!(env.redis_unflushed(&user).await, 0);
}

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
    let env = TestEnv::new().await;
    // Fails its first 3 requests, then answers.
    let flaky = env
        .mock(&["--fail-status", "500", "--fail-first", "3"])
        .await;
    let good = env.mock(&[]).await;
    let gw = gateway(
        &env,
        &[
            (&flaky.url(""), "OPENAI_API_KEY", 1),
            (&good.url(""), "OPENAI_API_KEY", 0),
        ],
        &[
            ("TOLLGATE__PROVIDERS__OPENAI__BREAKER_FAILURES", "2"),
            ("TOLLGATE__PROVIDERS__OPENAI__BREAKER_OPEN_MS", "2000"),
        ],
    )
    .await;
    let (_, token) = env.user(1000).await;
    let ok = |(s, _, b): (u16, _, Bytes)| assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let flaky_requests = || async { env.mock_stats(&flaky).await["requests"].as_i64().unwrap() };

    // Two failures open the circuit: the flaky deployment gets no more requests.
    for _ in 0..5 {
        ok(env.chat(&gw, &token, small(false)).await);
    }
    assert_eq!(flaky_requests().await, 2);
    // After the open interval one probe goes; it fails: open again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    ok(env.chat(&gw, &token, small(false)).await);
    ok(env.chat(&gw, &token, small(false)).await);
    assert_eq!(flaky_requests().await, 3);
    // The next probe succeeds: closed, and the flaky deployment serves again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    ok(env.chat(&gw, &token, small(false)).await);
    ok(env.chat(&gw, &token, small(false)).await);
    let s = env.mock_stats(&flaky).await;
    assert_eq!(
        (s["requests"].as_i64(), s["served"].as_i64()),
        (Some(5), Some(2))
    );
    assert_eq!(env.mock_stats(&good).await["served"], 7);
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM usage_history", 9, FLUSH_WAIT)
            .await,
        9,
        "every request recorded once"
    );
}

#[tokio::test]
async fn an_unreachable_deployment_falls_over() {
    let env = TestEnv::new().await;
    let dead = dead_url().await;
    let good = env.mock(&[]).await;
    let gw = gateway(
        &env,
        &[
            (&dead, "OPENAI_API_KEY", 1),
            (&good.url(""), "OPENAI_API_KEY", 0),
        ],
        &[],
    )
    .await;
    let (_, token) = env.user(100).await;
    let (status, _, body) = env.chat(&gw, &token, small(false)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, rid, text) = stream_all(&env, &gw, &token, &small(true)).await;
    assert_eq!(status, 200);
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(env.mock_stats(&good).await["served"], 2);
    assert_eq!(row(&env, &rid).await.4["attempts"], 2);
}

/// A request sent and not answered within the first-byte timeout may still be running
/// at the provider: it is not retried (a retry could be billed twice), the client gets a
/// 504 that charges nothing (no 2xx came), and the metric shows it. With
/// `retry_timeouts` it falls over, and the row says an earlier attempt timed out.
#[tokio::test]
async fn a_request_not_answered_in_time_is_not_retried_unless_configured() {
    let env = TestEnv::new().await;
    let slow = env.mock(&["--latency-ms", "5000"]).await;
    let good = env.mock(&[]).await;
    let timeout = ("TOLLGATE__PROVIDERS__OPENAI__FIRST_BYTE_TIMEOUT_MS", "300");
    let list = [
        (slow.url("").to_string(), "OPENAI_API_KEY", 1),
        (good.url("").to_string(), "OPENAI_API_KEY", 0),
    ];
    let list: Vec<(&str, &str, u32)> = list.iter().map(|(u, k, w)| (u.as_str(), *k, *w)).collect();
    let (user, token) = env.user(100).await;
    let before = env.redis_balance(&user).await;

    let gw = gateway(&env, &list, &[timeout]).await;
    for stream in [false, true] {
        let (status, _, body) = env.chat(&gw, &token, small(stream)).await;
        assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
        assert_eq!(openai_error(&body)["code"], "upstream_timeout");
    }
    assert_eq!(
        env.mock_stats(&slow).await["requests"],
        2,
        "one attempt each"
    );
    assert_eq!(
        env.mock_stats(&good).await["requests"],
        0,
        "never retried elsewhere"
    );
    let m = env.metrics(&gw).await;
    assert_eq!(
        counter(
            &m,
            "tollgate_upstream_timeouts_total{provider=\"openai\",retried=\"false\"}"
        ),
        2,
        "{m}"
    );
    // No 2xx: nothing charged, nothing held.
    let balance = env.redis_balance(&user).await;
    assert!(
        balance == before || (before.is_none() && balance == Some(100)),
        "{balance:?}"
    );
    assert_eq!(env.redis_held(&user).await, 0);

    let gw = gateway(
        &env,
        &list,
        &[
            timeout,
            ("TOLLGATE__PROVIDERS__OPENAI__RETRY_TIMEOUTS", "true"),
        ],
    )
    .await;
    for stream in [false, true] {
        let (status, headers, body) = env.chat(&gw, &token, small(stream)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
        let (_, _, _, _, meta) = row(&env, &rid).await;
        assert_eq!(meta["timed_out_attempts"], 1, "{meta}");
        assert_eq!(meta["attempts"], 2, "{meta}");
    }
    assert_eq!(env.mock_stats(&good).await["served"], 2);
    assert_eq!(env.mock_stats(&slow).await["requests"], 4);
    let m = env.metrics(&gw).await;
    assert_eq!(
        counter(
            &m,
            "tollgate_upstream_timeouts_total{provider=\"openai\",retried=\"true\"}"
        ),
        2,
        "{m}"
    );
}

/// Once the provider answered 2xx it did the work: an answer that then fails — cut
/// before its end, larger than the gateway accepts, cut before a stream's first chunk —
/// is not retried and is charged an estimate of what was received (capped at the
/// hold), marked. Repeating it is never free.
#[tokio::test]
async fn provider_work_after_a_2xx_is_charged_even_when_the_answer_fails() {
    let env = TestEnv::new().await;
    let (user, token) = env.user(1_000).await;
    let three = ("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "3");
    // (mock options, gateway options, stream, marker, status)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, bool, &'a str, u16);
    let cases: Vec<Case> = vec![
        (
            vec!["--cut-after", "40"],
            vec![three],
            false,
            "upstream_cut",
            502,
        ),
        (
            vec!["--cut-after", "0"],
            vec![three],
            true,
            "upstream_cut",
            502,
        ),
        (
            vec![],
            vec![three, ("TOLLGATE__SERVER__MAX_RESPONSE_BYTES", "64")],
            false,
            "answer_too_large",
            502,
        ),
    ];
    for (mock_opts, gw_opts, stream, marker, want) in cases {
        let mock = env.mock(&mock_opts).await;
        let gw = env.gateway_with(&mock, &gw_opts).await;
        let mut charged = 0;
        for _ in 0..3 {
            let before = env.redis_balance(&user).await.unwrap_or(1_000);
            let (status, headers, body) = env.chat(&gw, &token, small(stream)).await;
            assert_eq!(status, want, "{marker}: {}", String::from_utf8_lossy(&body));
            openai_error(&body);
            let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
            let (credits, input, _, total, meta) = row(&env, &rid).await;
            assert_eq!(meta[marker], true, "{marker}: {meta}");
            assert_eq!(meta["usage_estimated"], true, "{marker}: {meta}");
            assert!(
                input > 0 && credits > 0,
                "{marker}: the prompt was processed: {meta}"
            );
            // Capped at the hold: the prompt bound and 600 output tokens at 2 per 1k.
            assert!(credits <= 3, "{marker}: {credits}");
            assert_eq!(i64::from(credits), (i64::from(total) * 2 + 999) / 1000);
            assert_eq!(
                env.redis_balance(&user).await,
                Some(before - i64::from(credits))
            );
            charged += credits;
        }
        assert!(charged >= 3, "{marker}: repeating it is never free");
        assert_eq!(
            env.mock_stats(&mock).await["requests"],
            3,
            "{marker}: never retried after a 2xx"
        );
        assert_eq!(env.redis_held(&user).await, 0);
    }
}

#[tokio::test]
async fn client_credentials_are_never_forwarded_and_each_deployment_gets_its_key() {
    let mut env = TestEnv::new().await;
    env.env("TG_KEY_A", "sk-deployment-a");
    env.env("TG_KEY_B", "sk-deployment-b");
    let a = env.mock(&["--fail-status", "500"]).await;
    let b = env.mock(&[]).await;
    let gw = gateway(
        &env,
        &[(&a.url(""), "TG_KEY_A", 1), (&b.url(""), "TG_KEY_B", 0)],
        &[],
    )
    .await;
    let (_, token) = env.user(100).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {token}"))
        .header("cookie", "session=client-secret-cookie")
        .header("x-api-key", "client-api-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&small(false)).unwrap(),
        )))
        .unwrap();
    let resp = env.http.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    for (mock, key) in [(&a, "sk-deployment-a"), (&b, "sk-deployment-b")] {
        let seen = env.mock_last(mock).await;
        let headers = seen["headers"].as_object().unwrap();
        assert_eq!(headers["authorization"], format!("Bearer {key}"));
        assert!(!headers.contains_key("cookie"), "{headers:?}");
        assert!(!headers.contains_key("x-api-key"), "{headers:?}");
        let all = serde_json::to_string(&seen).unwrap();
        assert!(!all.contains(&token), "the client's token went upstream");
        assert!(!all.contains("client-secret-cookie"));
    }
    assert_eq!(env.mock_stats(&b).await["served"], 1);
}

#[tokio::test]
async fn an_upstream_cut_mid_stream_is_billed_from_an_estimate_and_marked() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&[
            "--chunks",
            "8",
            "--cut-after",
            "4",
            "--prompt-tokens",
            "30",
            "--completion-tokens",
            "400",
        ])
        .await;
    let gw = env
        .gateway_with(&mock, &[("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "3")])
        .await;
    let (user, token) = env.user(100).await;
    let (status, rid, text) = stream_all(&env, &gw, &token, &small(true)).await;
    assert_eq!(status, 200);
    assert_eq!(text.matches("data: ").count(), 4, "{text}");
    assert!(
        !text.contains("[DONE]"),
        "a cut stream does not end as complete"
    );
    // Bytes had reached the client: no retry.
    assert_eq!(env.mock_stats(&mock).await["requests"], 1);
    let (credits, input, output, total, meta) = row(&env, &rid).await;
    assert_eq!(meta["upstream_cut"], true);
    assert_eq!(meta["usage_estimated"], true);
    assert_eq!(output, 4, "one token per event received");
    assert!(input > 0);
    assert_eq!(total, input + output);
    assert_eq!(i64::from(credits), (i64::from(total) * 2 + 999) / 1000);
    assert_eq!(
        env.redis_balance(&user).await,
        Some(100 - i64::from(credits))
    );

    // Cut before its first chunk (after the provider's 2xx): nothing reached the client,
    // which gets a 502 — but the provider took the request, so it is not retried and the
    // prompt is charged (see provider_work_after_a_2xx_is_charged_even_when_the_answer_fails).
    let before = env.redis_balance(&user).await.unwrap();
    let mock0 = env.mock(&["--cut-after", "0"]).await;
    let gw0 = env
        .gateway_with(
            &mock0,
            &[("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "2")],
        )
        .await;
    let (status, headers, body) = env.chat(&gw0, &token, small(true)).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(env.mock_stats(&mock0).await["requests"], 1);
    let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
    let (credits, _, output, _, meta) = row(&env, &rid).await;
    assert_eq!((meta["upstream_cut"].clone(), output), (json!(true), 0));
    assert_eq!(
        env.redis_balance(&user).await,
        Some(before - i64::from(credits))
    );
}

#[tokio::test]
async fn a_disconnect_after_failover_is_billed_as_reported_and_drains_are_bounded() {
    let env = TestEnv::new().await;
    let broken = env.mock(&["--fail-status", "502"]).await;
    let slow = env
        .mock(&[
            "--chunks",
            "10",
            "--chunk-interval-ms",
            "80",
            "--prompt-tokens",
            "30",
            "--completion-tokens",
            "470",
        ])
        .await;
    let list = [
        (broken.url(""), "OPENAI_API_KEY", 1),
        (slow.url(""), "OPENAI_API_KEY", 0),
    ];
    let list: Vec<(&str, &str, u32)> = list.iter().map(|(u, k, w)| (u.as_str(), *k, *w)).collect();
    let gw = gateway(&env, &list, &[]).await;
    let (_, token) = env.user(100).await;
    let rid = read_first_then_disconnect(&gw, &token).await;
    let (credits, input, output, total, meta) = row(&env, &rid).await;
    assert_eq!((credits, input, output, total), (1, 30, 470, 500));
    assert_eq!(meta["client_disconnected"], true);
    assert_eq!(meta["attempts"], 2);
    assert!(meta.get("usage_estimated").is_none());

    // With no drains allowed, a disconnected stream stops at once: an estimate, marked.
    let gw = gateway(&env, &list, &[("TOLLGATE__SERVER__DISCONNECT_DRAINS", "0")]).await;
    let rid = read_first_then_disconnect(&gw, &token).await;
    let (_, _, _, _, meta) = row(&env, &rid).await;
    assert_eq!(meta["client_disconnected"], true);
    assert_eq!(meta["drain_skipped"], true);
    assert_eq!(meta["usage_estimated"], true);
}

#[tokio::test]
async fn preferences_fill_in_the_model_max_tokens_and_temperature() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(&mock, &[("TOLLGATE__PREFERENCES__CACHE_TTL_MS", "300")])
        .await;
    let (user, token) = env.user(1000).await;
    let (_, other) = env.user(1000).await;
    let db = env.db().await;
    db.execute(
        "INSERT INTO user_preferences (user_id, default_model_id, max_tokens, temperature)
         VALUES ($1, 'gpt-5', 77, 0.25)",
        &[&user],
    )
    .await
    .unwrap();
    let bare = json!({"messages": [{"role": "user", "content": "hi"}]});

    let (status, headers, body) = env.chat(&gw, &token, bare.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let sent = env.mock_last(&mock).await["body"].clone();
    assert_eq!(sent["model"], "gpt-5");
    assert_eq!(sent["max_completion_tokens"], 77);
    assert_eq!(sent["temperature"], 0.25);
    let rid = Uuid::parse_str(&headers["x-request-id"]).unwrap();
    let n = env
        .wait_for_count(
            &format!(
                "SELECT count(*) FROM usage_history WHERE id = '{rid}' AND model_id = 'gpt-5'"
            ),
            1,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, 1, "recorded under the default model");

    // What the request sets wins.
    let (status, _, _) = env
        .chat(
            &gw,
            &token,
            json!({"model": "gpt-5", "max_tokens": 5, "temperature": 1,
                                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200);
    let sent = env.mock_last(&mock).await["body"].clone();
    assert_eq!(sent["max_tokens"], 5);
    assert_eq!(sent["temperature"], 1);
    assert!(sent.get("max_completion_tokens").is_none(), "{sent}");

    // No preferences, no model: the request is refused as before.
    let (status, _, body) = env.chat(&gw, &other, bare.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(openai_error(&body)["param"], "model");

    // A change shows once the cache's TTL has passed (it is reloaded in the background).
    db.execute(
        "UPDATE user_preferences SET max_tokens = 55 WHERE user_id = $1",
        &[&user],
    )
    .await
    .unwrap();
    let mut seen = Value::Null;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, _, _) = env.chat(&gw, &token, bare.clone()).await;
        assert_eq!(status, 200);
        seen = env.mock_last(&mock).await["body"]["max_completion_tokens"].clone();
        if seen == 55 {
            break;
        }
    }
    assert_eq!(seen, 55);
}

#[tokio::test]
async fn with_every_circuit_open_requests_fail_fast_and_charge_nothing() {
    let env = TestEnv::new().await;
    let broken = env.mock(&["--fail-status", "500"]).await;
    let gw = env
        .gateway_with(
            &broken,
            &[
                ("TOLLGATE__PROVIDERS__OPENAI__BREAKER_FAILURES", "1"),
                ("TOLLGATE__PROVIDERS__OPENAI__BREAKER_OPEN_MS", "60000"),
            ],
        )
        .await;
    let (user, token) = env.user(100).await;
    let (status, _, body) = env.chat(&gw, &token, small(false)).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = env.chat(&gw, &token, small(true)).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(openai_error(&body)["code"], "service_unavailable");
    assert_eq!(
        env.mock_stats(&broken).await["requests"],
        1,
        "the open circuit sent nothing"
    );
    assert_eq!(env.redis_balance(&user).await, Some(100));
}

#[tokio::test]
async fn a_deployment_whose_key_is_refused_fails_over_and_is_not_tried_again() {
    let env = TestEnv::new().await;
    let refusing = env.mock(&["--fail-status", "401"]).await;
    let good = env.mock(&[]).await;
    let gw = gateway(
        &env,
        &[
            (&refusing.url(""), "OPENAI_API_KEY", 1),
            (&good.url(""), "OPENAI_API_KEY", 0),
        ],
        // Attempts to spare: the refusing deployment must still not get a second one.
        &[("TOLLGATE__PROVIDERS__OPENAI__MAX_ATTEMPTS", "4")],
    )
    .await;
    let (_, token) = env.user(100).await;
    let (status, _, body) = env.chat(&gw, &token, small(false)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(env.mock_stats(&refusing).await["requests"], 1);
    assert_eq!(env.mock_stats(&good).await["served"], 1);
}

/// A provider that never ends its stream is cut once the answer passes
/// `server.max_response_bytes` (instead of being streamed for ever), and charged what it
/// sent, capped at the hold.
#[tokio::test]
async fn a_stream_that_never_ends_is_cut_at_the_response_limit_and_charged_at_most_the_hold() {
    let env = TestEnv::new().await;
    // 2,000 chunks of ~170 bytes each, against a 4 KiB limit.
    let mock = env
        .mock(&["--chunks", "2000", "--completion-tokens", "2000"])
        .await;
    let gw = env
        .gateway_with(&mock, &[("TOLLGATE__SERVER__MAX_RESPONSE_BYTES", "4096")])
        .await;
    let (user, token) = env.user(100).await;
    let (status, rid, text) = stream_all(&env, &gw, &token, &small(true)).await;
    assert_eq!(status, 200);
    assert!(
        !text.contains("[DONE]"),
        "a cut stream does not end as complete"
    );
    assert!(
        text.len() <= 4096 + 1024,
        "stopped near the limit: {} bytes",
        text.len()
    );
    let (credits, _, output, _, meta) = row(&env, &rid).await;
    assert_eq!(meta["answer_too_large"], true, "{meta}");
    assert_eq!(meta["usage_estimated"], true, "{meta}");
    assert!(output > 0);
    // The hold: the prompt bound and 600 output tokens at 2 per 1k = 2 credits.
    assert!(credits > 0 && credits <= 2, "{credits}");
    assert_eq!(
        env.redis_balance(&user).await,
        Some(100 - i64::from(credits))
    );
    assert_eq!(env.redis_held(&user).await, 0);
}
