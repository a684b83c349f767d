//! Per-user rate limits by subscription tier, black-box: what a request over each
//! limit gets, that it charges nothing and reaches no provider, and that the headers
//! tell the client where it stands.

use crate::harness::*;
use serde_json::json;
use uuid::Uuid;

async fn mock_requests(env: &TestEnv, mock: &Proc) -> i64 {
    env.mock_stats(mock).await["requests"].as_i64().unwrap()
}

#[tokio::test]
async fn requests_over_the_tier_limit_get_429_with_retry_after_and_cost_nothing() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[("TOLLGATE__RATE_LIMITS__FREE__REQUESTS_PER_MINUTE", "3")],
        )
        .await;
    let (user, token) = env.user(1000).await;
    let (_, other) = env.user(1000).await;
    for left in [2, 1, 0] {
        let (s, h, _) = env.chat(&gw, &token, hello(20)).await;
        assert_eq!(s, 200);
        assert_eq!(h["x-ratelimit-limit-requests"], "3");
        assert_eq!(h["x-ratelimit-remaining-requests"], left.to_string());
        assert!(h.contains_key("x-ratelimit-reset-requests"));
        assert!(
            !h.contains_key("x-ratelimit-limit-tokens"),
            "no token limit configured"
        );
    }
    let balance = env.redis_balance(&user).await.unwrap();
    let upstream = mock_requests(&env, &mock).await;
    let (s, h, b) = env.chat(&gw, &token, hello(20)).await;
    assert_eq!(s, 429);
    let e = openai_error(&b);
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert_eq!(e["type"], "requests");
    let retry: u64 = h["retry-after"].parse().unwrap();
    assert!(
        (1..=20).contains(&retry),
        "one request comes back every 20 s: {retry}"
    );
    assert!(h.contains_key("x-request-id"));
    assert_eq!(
        env.redis_balance(&user).await.unwrap(),
        balance,
        "refused before any hold"
    );
    assert_eq!(
        mock_requests(&env, &mock).await,
        upstream,
        "refused before the provider"
    );
    // Limits are per user.
    let (s, _, _) = env.chat(&gw, &other, hello(20)).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn token_limits_count_the_prompt_and_the_most_a_request_may_generate() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[("TOLLGATE__RATE_LIMITS__FREE__TOKENS_PER_MINUTE", "1000")],
        )
        .await;
    let (_, token) = env.user(1000).await;
    // Larger than the whole per-minute budget: it can never pass.
    let (s, h, b) = env.chat(&gw, &token, hello(5000)).await;
    assert_eq!(s, 429);
    let e = openai_error(&b);
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(
        e["message"].as_str().unwrap().contains("Request too large"),
        "{e}"
    );
    assert_eq!(h["x-should-retry"], "false");
    assert!(!h.contains_key("retry-after"));
    // Within it: admitted, and the headers show what is left.
    let (s, h, _) = env.chat(&gw, &token, hello(300)).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    let left: u32 = h["x-ratelimit-remaining-tokens"].parse().unwrap();
    assert!(
        left <= 700,
        "at least the 300 output tokens are counted: {left}"
    );
    // The next one no longer fits this minute.
    let (s, h, _) = env.chat(&gw, &token, hello(800)).await;
    assert_eq!(s, 429);
    assert!(h["retry-after"].parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn a_subscribers_tier_sets_the_limit() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__RATE_LIMITS__FREE__REQUESTS_PER_MINUTE", "1"),
                ("TOLLGATE__RATE_LIMITS__PRO__REQUESTS_PER_MINUTE", "4"),
            ],
        )
        .await;
    let email = format!(
        "pro{}@example.com",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    env.cli(&["user", "create", "--email", &email, "--tier", "pro"])
        .await;
    let token = env.cli(&["token", "issue", "--email", &email]).await;
    let mut ok = 0;
    for _ in 0..6 {
        let (s, h, _) = env.chat(&gw, &token, hello(20)).await;
        if s == 200 {
            assert_eq!(h["x-ratelimit-limit-requests"], "4");
            ok += 1;
        } else {
            assert_eq!(s, 429);
        }
    }
    assert_eq!(ok, 4, "the pro tier's 4 per minute, not free's 1");
    let (_, free) = env.user(1000).await;
    assert_eq!(env.chat(&gw, &free, hello(20)).await.0, 200);
    assert_eq!(env.chat(&gw, &free, hello(20)).await.0, 429);
}

#[tokio::test]
async fn a_request_without_max_tokens_waits_for_a_full_token_bucket_instead_of_being_refused() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[("TOLLGATE__RATE_LIMITS__FREE__TOKENS_PER_MINUTE", "1000")],
        )
        .await;
    let (_, token) = env.user(1000).await;
    // gpt-5 may write far more than 1000 tokens; without a limit the request takes
    // the whole minute's budget rather than being refused as too large.
    let body = json!({"model": "gpt-5", "messages": [{"role": "user", "content": "Hello"}]});
    let (s, h, _) = env.chat(&gw, &token, body.clone()).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-ratelimit-remaining-tokens"], "0");
    let (s, h, b) = env.chat(&gw, &token, body).await;
    assert_eq!(s, 429);
    assert_eq!(openai_error(&b)["code"], "rate_limit_exceeded");
    assert!(h["retry-after"].parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn tier_limits_come_from_the_tiers_section_and_the_old_keys_alike() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                // The new place for pro, the old one for free.
                ("TOLLGATE__TIERS__PRO__REQUESTS_PER_MINUTE", "2"),
                ("TOLLGATE__RATE_LIMITS__FREE__REQUESTS_PER_MINUTE", "1"),
            ],
        )
        .await;
    let email = format!(
        "pro{}@example.com",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    env.cli(&["user", "create", "--email", &email, "--tier", "pro"])
        .await;
    let pro = env.cli(&["token", "issue", "--email", &email]).await;
    for _ in 0..2 {
        let (s, h, _) = env.chat(&gw, &pro, hello(20)).await;
        assert_eq!(s, 200);
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
    }
    assert_eq!(env.chat(&gw, &pro, hello(20)).await.0, 429);
    let (_, free) = env.user(1000).await;
    let (s, h, _) = env.chat(&gw, &free, hello(20)).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-ratelimit-limit-requests"], "1");
    assert_eq!(env.chat(&gw, &free, hello(20)).await.0, 429);
}
