//! Crash and shutdown behaviour under load: SIGTERM drains and records every success;
//! kill -9 then a restart loses nothing and records nothing twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;
use http_body_util::BodyExt;
use uuid::Uuid;

/// Runs `workers` clients in a loop against `url` until `stop`; each success (200 with
/// a complete body; for streams the final `[DONE]`) is recorded by request id.
fn start_load(
    env: &TestEnv,
    url: String,
    token: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Uuid>>>, Vec<tokio::task::JoinHandle<()>>) {
    let ok = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (http, url, token, stop, ok) = (
            env.http.clone(),
            url.clone(),
            token.clone(),
            stop.clone(),
            ok.clone(),
        );
        handles.push(tokio::spawn(async move {
            let stream = w % 2 == 1;
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && sent < 2000 {
                sent += 1;
                let body = serde_json::json!({"model": "gpt-5", "stream": stream, "max_tokens": 50,
                                              "messages": [{"role": "user", "content": "load"}]});
                let req = chat_request(&url, &token, &body);
                let Ok(resp) = http.request(req).await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let status = resp.status().as_u16();
                let rid = resp
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let Ok(body) = resp.into_body().collect().await.map(|c| c.to_bytes()) else {
                    continue;
                };
                let complete = if stream {
                    body.ends_with(b"data: [DONE]\n\n")
                } else {
                    !body.is_empty()
                };
                if status == 200 && complete {
                    ok.lock()
                        .unwrap()
                        .push(Uuid::parse_str(&rid.unwrap()).unwrap());
                }
            }
        }));
    }
    (ok, handles)
}

async fn rows_per_id(env: &TestEnv) -> std::collections::HashMap<Uuid, i64> {
    env.db()
        .await
        .query("SELECT id, count(*) FROM usage_history GROUP BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn sigterm_during_load_exits_cleanly_with_every_success_recorded() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&[
            "--latency-ms",
            "5",
            "--chunks",
            "3",
            "--chunk-interval-ms",
            "5",
        ])
        .await;
    // A slow flush interval, so the final drain on shutdown has work to do.
    let mut gw = env
        .gateway_with(&mock, &[("TOLLGATE__FLUSH__INTERVAL_MS", "400")])
        .await;
    let (_, token) = env.user(1_000_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, handles) = start_load(&env, gw.url("/v1/chat/completions"), token, 6, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    gw.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), gw.child.wait())
        .await
        .expect("exits")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        gw.log_text()
    );
    let ok = ok.lock().unwrap().clone();
    assert!(ok.len() > 10, "load produced only {} successes", ok.len());
    // The gateway has exited: whatever it recorded is already in PostgreSQL.
    let rows = rows_per_id(&env).await;
    for id in &ok {
        assert_eq!(
            rows.get(id),
            Some(&1),
            "success {id} must have exactly one row"
        );
    }
    assert_eq!(rows.len(), ok.len(), "no row without a success");
}

#[tokio::test]
async fn kill_9_during_load_then_restart_loses_and_duplicates_nothing() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&[
            "--latency-ms",
            "5",
            "--chunks",
            "3",
            "--chunk-interval-ms",
            "5",
        ])
        .await;
    let mut gw = env
        .gateway_with(&mock, &[("TOLLGATE__FLUSH__INTERVAL_MS", "300")])
        .await;
    let (user, token) = env.user(1_000_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 6;
    let (ok, handles) = start_load(
        &env,
        gw.url("/v1/chat/completions"),
        token,
        workers,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    gw.signal("KILL");
    let _ = gw.child.wait().await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    let ok = ok.lock().unwrap().clone();
    assert!(ok.len() > 10, "load produced only {} successes", ok.len());
    let before = rows_per_id(&env).await.len();

    // A new gateway claims what the dead one left pending and reads what it never read.
    let _gw2 = env.gateway(&mock).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = rows_per_id(&env).await;
        if ok.iter().all(|id| rows.contains_key(id)) || std::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for id in &ok {
        assert_eq!(
            rows.get(id),
            Some(&1),
            "success {id} must have exactly one row"
        );
    }
    // In-flight requests at the kill may have been settled without the client seeing
    // the answer: at most one per worker.
    assert!(
        rows.len() <= ok.len() + workers,
        "{} rows for {} successes",
        rows.len(),
        ok.len()
    );
    assert!(rows.len() >= before);
    // The ledger and PostgreSQL agree once everything is flushed: every charge settled
    // in Redis (including those of requests killed after their settle) is a row, and
    // the balance plus the holds of requests killed before their settle is what the
    // user had less what PostgreSQL recorded.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while env.redis_unflushed(&user).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "settled charges never flushed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let charged: i64 = env
        .db()
        .await
        .query_one("SELECT sum(credits_used)::bigint FROM usage_history", &[])
        .await
        .unwrap()
        .get(0);
    let bal = env.redis_balance(&user).await.unwrap();
    let held = env.redis_held(&user).await;
    assert_eq!(
        bal + held,
        1_000_000 - charged,
        "balance {bal} + held {held} vs charged {charged}"
    );
    assert_eq!(env.used_credits_total().await, charged);
}

#[tokio::test]
async fn sigterm_fails_readiness_first_then_exits() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let mut gw = env
        .gateway_with(&mock, &[("TOLLGATE__SERVER__SHUTDOWN_DELAY_MS", "1500")])
        .await;
    let (s, _, _) = env.request("GET", &gw.url("/readyz"), None, None).await;
    assert_eq!(s, 200);
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _, body) = env.request("GET", &gw.url("/readyz"), None, None).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["draining"], true);
    let (s, _, _) = env.request("GET", &gw.url("/livez"), None, None).await;
    assert_eq!(s, 200, "still alive while draining");
    let status = tokio::time::timeout(Duration::from_secs(20), gw.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn client_disconnect_mid_stream_is_still_billed() {
    let env = TestEnv::new().await;
    let mock = env
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
    let gw = env.gateway(&mock).await;
    let gw_short = env
        .gateway_with(&mock, &[("TOLLGATE__SERVER__DISCONNECT_DRAIN_MS", "150")])
        .await;
    let (user, token) = env.user(100).await;

    // The gateway keeps reading after the client left and bills what the provider reports.
    let rid = read_first_then_disconnect(&gw, &token).await;
    let n = env
        .wait_for_count(
            &format!("SELECT count(*) FROM usage_history WHERE id = '{rid}'"),
            1,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, 1);
    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT credits_used, total_tokens, request_metadata FROM usage_history WHERE id = $1",
            &[&rid],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 500));
    let meta: serde_json::Value = row.get(2);
    assert_eq!(meta["client_disconnected"], true);
    assert!(meta.get("usage_estimated").is_none());

    // With a short drain bound the read stops early: billed from an estimate, marked so.
    let rid = read_first_then_disconnect(&gw_short, &token).await;
    let n = env
        .wait_for_count(
            &format!("SELECT count(*) FROM usage_history WHERE id = '{rid}'"),
            1,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, 1);
    let meta: serde_json::Value = db
        .query_one(
            "SELECT request_metadata FROM usage_history WHERE id = $1",
            &[&rid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(meta["drain_timed_out"], true);
    assert_eq!(meta["usage_estimated"], true);
    assert!(env.redis_balance(&user).await.unwrap() < 99);
}

async fn ok_chat(env: &TestEnv, gw: &Proc, token: &str) -> Uuid {
    let body = serde_json::json!({"model": "gpt-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, resp) = env.chat(gw, token, body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    Uuid::parse_str(&headers["x-request-id"]).unwrap()
}

#[tokio::test]
async fn usage_waits_in_redis_while_postgres_refuses_and_drains_after() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&["--prompt-tokens", "500", "--completion-tokens", "500"])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(100).await;
    ok_chat(&env, &gw, &token).await; // balance loaded while PostgreSQL is up
                                      // PostgreSQL refuses this database: no new connections, existing ones cut.
    env.allow_connections(false).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(ok_chat(&env, &gw, &token).await);
    }
    // Charged live, recorded nowhere in PostgreSQL yet: the flusher's writes fail.
    assert_eq!(env.redis_balance(&user).await, Some(100 - 2 * 6));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counter(&env.metrics(&gw).await, "tollgate_flush_failures_total") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher never saw PostgreSQL refuse"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.allow_connections(true).await;
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM usage_history",
            6,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        n, 6,
        "every settled request reaches PostgreSQL once it is back"
    );
    let rows = rows_per_id(&env).await;
    assert!(ids.iter().all(|id| rows.get(id) == Some(&1)));
    assert_eq!(env.used_credits_total().await, 12);
}

#[tokio::test]
async fn after_redis_loses_its_data_balances_are_rebuilt_from_postgres() {
    let env = TestEnv::new().await;
    let mock = env
        .mock(&["--prompt-tokens", "500", "--completion-tokens", "500"])
        .await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(100).await;
    for _ in 0..3 {
        ok_chat(&env, &gw, &token).await;
    }
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM usage_history", 3, FLUSH_WAIT)
            .await,
        3
    );
    // Redis loses everything of this gateway (a restart without persistence).
    let mut r = env.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", env.prefix))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut r)
        .await
        .unwrap();
    // The next request rebuilds the balance from PostgreSQL: 100 − 3 × 2.
    let id = ok_chat(&env, &gw, &token).await;
    assert_eq!(env.redis_balance(&user).await, Some(100 - 4 * 2));
    // The flusher recreates its consumer groups and records the new request.
    let n = env
        .wait_for_count(
            &format!("SELECT count(*) FROM usage_history WHERE id = '{id}'"),
            1,
            FLUSH_WAIT,
        )
        .await;
    assert_eq!(n, 1);
}

/// A stream still running when SIGTERM's grace period ended used to be dropped: the
/// client had part of the answer and nothing was ever charged. Now every request still
/// in flight is cut at the end of the grace: a stream is settled from what it received
/// (an estimate capped at its hold, marked `shutdown_cut`), a request with no 2xx yet
/// gives its hold back — and the usage is in PostgreSQL before the process exits.
#[tokio::test]
async fn requests_outliving_the_grace_period_are_settled_and_flushed_before_exit() {
    let mut env = TestEnv::new().await;
    env.env("ANTHROPIC_API_KEY", PROVIDER_KEY);
    // A 10 s stream (40 chunks, 250 ms apart), and a provider that answers after 20 s.
    let streaming = env
        .mock(&[
            "--chunks",
            "40",
            "--chunk-interval-ms",
            "250",
            "--completion-tokens",
            "400",
        ])
        .await;
    let slow = env.mock(&["--latency-ms", "20000"]).await;
    let mut gw = env
        .gateway_with(
            &streaming,
            &[
                ("TOLLGATE__SERVER__SHUTDOWN_GRACE_MS", "1000"),
                ("TOLLGATE__PROVIDERS__ANTHROPIC__BASE_URL", &slow.url("")),
            ],
        )
        .await;
    let (user, token) = env.user(100).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let body = serde_json::json!({"model": "gpt-5", "stream": true, "max_tokens": 500,
                                  "messages": [{"role": "user", "content": "tell me a long story"}]});
    let resp = client
        .request(chat_request(&gw.url("/v1/chat/completions"), &token, &body))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = Uuid::parse_str(resp.headers()["x-request-id"].to_str().unwrap()).unwrap();
    let reader = tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                text.extend_from_slice(&d);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let json_req = chat_request(
        &gw.url("/v1/chat/completions"),
        &token,
        &serde_json::json!({"model": "claude-3.5-sonnet", "max_tokens": 50,
                            "messages": [{"role": "user", "content": "hi"}]}),
    );
    let waiting = tokio::spawn(client.request(json_req));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        env.redis_held(&user).await > 0,
        "both requests hold credits"
    );
    gw.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), gw.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success());
    let text = reader.await.unwrap();
    assert!(
        text.contains("data: {"),
        "part of the answer reached the client"
    );
    assert!(
        !text.contains("[DONE]"),
        "a cut stream does not end as complete: {text}"
    );
    let events = text.matches("data: {").count() as i32;
    match waiting.await.unwrap() {
        Ok(r) => assert_eq!(r.status(), 503, "no 2xx yet: the client is told to retry"),
        Err(e) => panic!("the waiting request got no answer: {e}"),
    }
    // Already in PostgreSQL: no waiting for a flush.
    let db = env.db().await;
    let rows = db
        .query(
            "SELECT id, credits_used, output_tokens, request_metadata FROM usage_history",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the stream's row only");
    let (id, credits, output, meta): (Uuid, i32, i32, serde_json::Value) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
    );
    assert_eq!(id, rid);
    assert_eq!(meta["shutdown_cut"], true, "{meta}");
    assert_eq!(meta["usage_estimated"], true, "{meta}");
    assert!(
        output >= events && events > 0,
        "{output} tokens for {events} events"
    );
    assert!(credits > 0 && credits <= 2, "capped at the hold: {credits}");
    assert_eq!(env.used_credits_total().await, i64::from(credits));
    assert_eq!(
        env.redis_balance(&user).await,
        Some(100 - i64::from(credits))
    );
    assert_eq!(
        env.redis_held(&user).await,
        0,
        "the waiting request's hold was given back"
    );
    assert_eq!(env.redis_unflushed(&user).await, 0);
    assert!(gw.log_text().contains("cutting them"), "{}", gw.log_text());
}
