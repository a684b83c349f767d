//! The signed-in user's own account endpoints, against the real binary: profile,
//! preferences (and what each bad preference gets), the live credit balance, and
//! the paginated usage history.

use std::time::Duration;

use crate::harness::*;
use serde_json::json;

#[tokio::test]
async fn every_account_endpoint_requires_a_token() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    for (method, path) in [
        ("GET", "/v1/users/me"),
        ("GET", "/v1/users/me/preferences"),
        ("PUT", "/v1/users/me/preferences"),
        ("GET", "/v1/credits"),
        ("GET", "/v1/usage"),
    ] {
        let (status, headers, body) = env
            .request(method, &gw.url(path), None, Some(b"{}".to_vec()))
            .await;
        assert_eq!(status, 401, "{method} {path}");
        assert!(headers.contains_key("www-authenticate"));
        openai_error(&body);
    }
}

#[tokio::test]
async fn the_profile_names_the_signed_in_user() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (id, token) = env.user(10).await;
    let (status, _, body) = env
        .request("GET", &gw.url("/v1/users/me"), Some(&token), None)
        .await;
    assert_eq!(status, 200);
    let me = json(&body);
    assert_eq!(me["object"], "user");
    assert_eq!(me["id"], id.to_string());
    assert!(me["email"].as_str().unwrap().ends_with("@example.com"));
    assert!(
        me.get("password_hash").is_none(),
        "no secret in the profile: {me}"
    );
    assert!(!body.windows(6).any(|w| w == b"argon2"));
}

#[tokio::test]
async fn preferences_default_update_partially_and_refuse_bad_values() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (id, token) = env.user(10).await;
    let url = gw.url("/v1/users/me/preferences");
    let (status, _, body) = env.request("GET", &url, Some(&token), None).await;
    assert_eq!(status, 200);
    let p = json(&body);
    assert_eq!(p["default_model_id"], serde_json::Value::Null);
    assert_eq!(p["max_tokens"], 4096);
    assert_eq!(p["temperature"], 0.7);
    assert_eq!(p["enable_streaming"], true);

    let put = |b: serde_json::Value| {
        let (env, url, token) = (&env, url.clone(), token.clone());
        async move {
            env.request(
                "PUT",
                &url,
                Some(&token),
                Some(serde_json::to_vec(&b).unwrap()),
            )
            .await
        }
    };
    let (status, _, body) = put(
        json!({"default_model_id": "gpt-5", "temperature": 0.25, "metadata": {"theme": "dark"}}),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let p = json(&body);
    assert_eq!(p["default_model_id"], "gpt-5");
    assert_eq!(p["temperature"], 0.25);
    assert_eq!(p["max_tokens"], 4096, "fields left out keep their value");
    assert_eq!(p["metadata"]["theme"], "dark");
    // A second, partial update keeps what the first set.
    let (status, _, body) = put(json!({"max_tokens": 512, "enable_streaming": false})).await;
    assert_eq!(status, 200);
    let p = json(&body);
    assert_eq!(
        (p["max_tokens"].as_i64(), p["temperature"].as_f64()),
        (Some(512), Some(0.25))
    );
    assert_eq!(p["default_model_id"], "gpt-5");
    assert_eq!(p["enable_streaming"], false);
    let row = env
        .db()
        .await
        .query_one(
            "SELECT default_model_id, max_tokens, temperature::text, enable_streaming FROM user_preferences WHERE user_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("gpt-5"));
    assert_eq!(row.get::<_, i32>(1), 512);
    assert_eq!(row.get::<_, String>(2), "0.25");
    assert!(!row.get::<_, bool>(3));

    // Each bad value: 400, the field named, nothing stored.
    for (bad, param) in [
        (json!({"temperature": 2.5}), Some("temperature")),
        (json!({"temperature": "hot"}), Some("temperature")),
        (json!({"max_tokens": 0}), Some("max_tokens")),
        (json!({"max_tokens": 1.5}), Some("max_tokens")),
        (
            json!({"default_model_id": "no-such-model"}),
            Some("default_model_id"),
        ),
        (json!({"default_model_id": 7}), Some("default_model_id")),
        (json!({"enable_streaming": "yes"}), Some("enable_streaming")),
        (json!({"metadata": [1, 2]}), Some("metadata")),
        (json!({"colour": "blue"}), None),
        (json!([1]), None),
    ] {
        let (status, _, body) = put(bad.clone()).await;
        assert_eq!(status, 400, "{bad}");
        let e = openai_error(&body);
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"].as_str(), param, "{bad}: {e}");
    }
    let (status, _, body) = env
        .request("PUT", &url, Some(&token), Some(b"{not json".to_vec()))
        .await;
    assert_eq!(status, 400);
    openai_error(&body);
    // Clearing the default model with null.
    let (_, _, body) = put(json!({"default_model_id": null})).await;
    let p = json(&body);
    assert_eq!(p["default_model_id"], serde_json::Value::Null);
    assert_eq!(p["max_tokens"], 512, "the refused updates stored nothing");
}

#[tokio::test]
async fn credits_show_the_live_balance_to_the_last_request() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    // The flusher waits ten minutes: what the page shows can only come from Redis.
    let gw = env
        .gateway_with(&mock, &[("TOLLGATE__FLUSH__INTERVAL_MS", "600000")])
        .await;
    let (user, token) = env.user(1000).await;
    let url = gw.url("/v1/credits");
    let (status, _, body) = env.request("GET", &url, Some(&token), None).await;
    assert_eq!(status, 200);
    let c = json(&body);
    assert_eq!(
        (c["total_credits"].as_i64(), c["available_credits"].as_i64()),
        (Some(1000), Some(1000))
    );
    assert_eq!(
        (c["used_credits"].as_i64(), c["held_credits"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(c["periods"].as_array().unwrap().len(), 1);

    let mut charged = 0;
    for _ in 0..3 {
        let (status, _, body) = env.chat(&gw, &token, hello(50)).await;
        assert_eq!(status, 200);
        let total = json(&body)["usage"]["total_tokens"].as_i64().unwrap();
        charged += (total * 2 + 999) / 1000; // gpt-5: 2 credits per 1k tokens
    }
    assert!(charged > 0);
    // Exact at once, before any flush to PostgreSQL.
    let (_, _, body) = env.request("GET", &url, Some(&token), None).await;
    let c = json(&body);
    assert_eq!(c["used_credits"].as_i64(), Some(charged), "{c}");
    assert_eq!(c["available_credits"].as_i64(), Some(1000 - charged));
    assert_eq!(c["total_credits"].as_i64(), Some(1000));
    assert_eq!(c["held_credits"].as_i64(), Some(0));
    let in_postgres: i32 = env
        .db()
        .await
        .query_one(
            "SELECT used_credits FROM credits WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_postgres, 0, "nothing was flushed yet");
}

#[tokio::test]
async fn usage_pages_newest_first_filters_and_refuses_bad_queries() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, token) = env.user(1000).await;
    let (_, other_token) = env.user(1000).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (status, headers, _) = env.chat(&gw, &token, hello(50)).await;
        assert_eq!(status, 200);
        ids.push(headers["x-request-id"].clone());
    }
    let (status, headers, _) = env.chat(&gw, &other_token, hello(50)).await;
    assert_eq!(status, 200);
    let others = headers["x-request-id"].clone();
    assert_eq!(
        env.wait_for_count(
            "SELECT count(*) FROM usage_history",
            6,
            Duration::from_secs(10)
        )
        .await,
        6
    );

    // Pages of two, newest first, following `starting_after`.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = gw.url("/v1/usage?limit=2");
        if let Some(c) = &cursor {
            url.push_str(&format!("&starting_after={c}"));
        }
        let (status, _, body) = env.request("GET", &url, Some(&token), None).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let page = json(&body);
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        for r in data {
            assert_eq!(r["model"], "gpt-5");
            assert_eq!(r["operation"], "chat");
            assert!(r["credits_used"].as_i64().unwrap() > 0);
            seen.push(r["id"].as_str().unwrap().to_owned());
        }
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        cursor = Some(page["last_id"].as_str().unwrap().to_owned());
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(
        seen, newest_first,
        "every own record once, newest first; never another user's"
    );

    let (_, _, body) = env
        .request(
            "GET",
            &gw.url("/v1/usage?model=gemini-2.0-pro"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(json(&body)["data"].as_array().unwrap().len(), 0);
    let (_, _, body) = env
        .request(
            "GET",
            &gw.url("/v1/usage?operation=chat&limit=100"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(json(&body)["data"].as_array().unwrap().len(), 5);
    let (_, _, body) = env
        .request(
            "GET",
            &gw.url("/v1/usage?from=2999-01-01T00:00:00Z"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(json(&body)["data"].as_array().unwrap().len(), 0);

    for (query, param) in [
        ("limit=0", Some("limit")),
        ("limit=101", Some("limit")),
        ("limit=ten", Some("limit")),
        ("operation=dance", Some("operation")),
        ("from=yesterday", Some("from")),
        ("starting_after=not-a-uuid", Some("starting_after")),
        (&*format!("starting_after={others}"), Some("starting_after")),
        ("colour=blue", None),
    ] {
        let (status, _, body) = env
            .request(
                "GET",
                &gw.url(&format!("/v1/usage?{query}")),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, 400, "{query}");
        let e = openai_error(&body);
        assert_eq!(e["param"].as_str(), param, "{query}: {e}");
    }
}

#[tokio::test]
async fn saved_preferences_apply_to_the_next_request_at_once() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, token) = env.user(1000).await;
    let bare = json!({"messages": [{"role": "user", "content": "Hello"}]});
    // No model in the request and none preferred: 400 naming `model`.
    let (status, _, body) = env.chat(&gw, &token, bare.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(openai_error(&body)["param"], "model");
    let prefs = json!({"default_model_id": "gpt-5", "max_tokens": 64, "temperature": 0.4});
    let (status, _, _) = env
        .request(
            "PUT",
            &gw.url("/v1/users/me/preferences"),
            Some(&token),
            Some(serde_json::to_vec(&prefs).unwrap()),
        )
        .await;
    assert_eq!(status, 200);
    // The cached "no preferences" is dropped on save: no wait for the cache's TTL.
    let (status, _, body) = env.chat(&gw, &token, bare).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let sent = env.mock_last(&mock).await["body"].clone();
    assert_eq!(sent["model"], "gpt-5");
    assert_eq!(sent["max_completion_tokens"], 64);
    assert_eq!(sent["temperature"], 0.4);
}

#[tokio::test]
async fn preferences_apply_to_translated_providers_within_their_ranges() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway_all_providers(&mock).await;
    let (_, token) = env.user(1000).await;
    let bare = json!({"messages": [{"role": "user", "content": "Hello"}]});
    let put = |prefs: serde_json::Value| {
        let (env, url, token) = (&env, gw.url("/v1/users/me/preferences"), token.clone());
        async move {
            let (status, _, _) = env
                .request(
                    "PUT",
                    &url,
                    Some(&token),
                    Some(serde_json::to_vec(&prefs).unwrap()),
                )
                .await;
            assert_eq!(status, 200);
        }
    };
    put(json!({"default_model_id": "claude-3.5-sonnet", "max_tokens": 90, "temperature": 1.5}))
        .await;
    let (status, _, body) = env.chat(&gw, &token, bare.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let sent = env.mock_last(&mock).await["body"].clone();
    assert_eq!(sent["max_tokens"], 90, "{sent}");
    assert_eq!(
        sent["temperature"], 1.0,
        "Anthropic's range ends at 1: {sent}"
    );
    // A temperature in the request wins over the preference.
    let mut own = bare.clone();
    own["temperature"] = json!(0.2);
    assert_eq!(env.chat(&gw, &token, own).await.0, 200);
    assert_eq!(env.mock_last(&mock).await["body"]["temperature"], 0.2);

    put(json!({"default_model_id": "gemini-2.0-pro"})).await;
    let (status, _, _) = env.chat(&gw, &token, bare).await;
    assert_eq!(status, 200);
    let cfg = env.mock_last(&mock).await["body"]["generationConfig"].clone();
    assert_eq!(cfg["temperature"], 1.5, "{cfg}");
    assert_eq!(cfg["maxOutputTokens"], 90);
}

#[tokio::test]
async fn an_oversized_preferences_body_gets_an_openai_shaped_413() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (_, token) = env.user(0).await;
    let big = format!(
        "{{\"metadata\":{{\"x\":\"{}\"}}}}",
        "a".repeat(3 * 1024 * 1024)
    );
    let (status, _, body) = env
        .request(
            "PUT",
            &gw.url("/v1/users/me/preferences"),
            Some(&token),
            Some(big.into_bytes()),
        )
        .await;
    assert_eq!(status, 413);
    assert_eq!(openai_error(&body)["code"], "request_too_large");
}
