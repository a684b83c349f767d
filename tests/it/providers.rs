//! Anthropic and Gemini behind the OpenAI API, and the completions and embeddings
//! endpoints, black-box: the real binary against the bundled mock speaking each
//! provider's wire format, real PostgreSQL and Redis.

use std::time::Duration;

use crate::harness::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// (model id, credits per 1k tokens) of the seeded non-OpenAI models.
const CLAUDE: (&str, i64) = ("claude-3.5-sonnet", 2);
const GEMINI: (&str, i64) = ("gemini-2.0-pro", 1);

pub(crate) struct Setup {
    pub(crate) env: TestEnv,
    pub(crate) mock: Proc,
    pub(crate) gw: Proc,
    pub(crate) user: Uuid,
    pub(crate) token: String,
}

/// The embedding models the tests add to the seeded table.
pub(crate) const EMBEDDING_MODELS: &str = "INSERT INTO models (id, name, display_name, provider, capabilities, context_length,
                                 input_cost_per_million_tokens, output_cost_per_million_tokens, credits_per_1k_tokens)
             VALUES ('text-embedding-3-small', 'text-embedding-3-small', 'Embedding 3 small', 'openai', '{text}', 8192, 2, 0, 1),
                    ('gemini-embedding', 'gemini-embedding-001', 'Gemini embedding', 'google', '{text}', 2048, 15, 0, 1)";

/// A mock with `args`, embedding models added to the table, and a gateway whose three
/// providers all point at the mock.
async fn setup(args: &[&str], credits: i32) -> Setup {
    setup_with(EMBEDDING_MODELS, args, credits).await
}

/// [`setup`], with `sql` run on the fresh database first (models to add or change).
pub(crate) async fn setup_with(sql: &str, args: &[&str], credits: i32) -> Setup {
    let env = TestEnv::new().await;
    env.db().await.batch_execute(sql).await.unwrap();
    let mock = env.mock(args).await;
    let gw = env.gateway_all_providers(&mock).await;
    let (user, token) = env.user(credits).await;
    Setup {
        env,
        mock,
        gw,
        user,
        token,
    }
}

impl Setup {
    pub(crate) async fn post(
        &self,
        path: &str,
        body: Value,
    ) -> (u16, std::collections::HashMap<String, String>, Value) {
        self.env.post_json(&self.gw, &self.token, path, body).await
    }

    /// The flushed usage row of request `rid`.
    async fn row(&self, rid: &str) -> Row {
        self.env.flushed(rid, FLUSH_WAIT).await;
        let r = self
            .env
            .db()
            .await
            .query_one(
                "SELECT model_id, operation::text, credits_used, input_tokens, output_tokens, total_tokens, request_metadata
                   FROM usage_history WHERE id = $1",
                &[&Uuid::parse_str(rid).unwrap()],
            )
            .await
            .unwrap();
        Row {
            model: r.get(0),
            operation: r.get(1),
            credits: i64::from(r.get::<_, i32>(2)),
            input: i64::from(r.get::<_, i32>(3)),
            output: i64::from(r.get::<_, i32>(4)),
            total: i64::from(r.get::<_, i32>(5)),
            meta: r.get(6),
        }
    }
}

#[derive(Debug)]
struct Row {
    model: String,
    operation: String,
    credits: i64,
    input: i64,
    output: i64,
    total: i64,
    meta: Value,
}

fn price(total: i64, per_1k: i64) -> i64 {
    ((total * per_1k) as u64).div_ceil(1000) as i64
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

#[tokio::test]
async fn chat_is_translated_and_billed_as_the_provider_reports() {
    let s = setup(
        &[
            "--prompt-tokens",
            "1000",
            "--completion-tokens",
            "501",
            "--cache-read-tokens",
            "100",
        ],
        1000,
    )
    .await;
    // Anthropic: input 1000 + cache read 100 + output 501; Gemini: 1000 + 501.
    for ((model, per_1k), prompt) in [(CLAUDE, 1100), (GEMINI, 1000)] {
        let (status, headers, v) = s
            .post(
                "/v1/chat/completions",
                json!({"model": model, "max_tokens": 600, "temperature": 0.5, "stop": ["\n\n"],
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}),
            )
            .await;
        assert_eq!(status, 200, "{model}: {v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], model);
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(v["created"].as_i64().unwrap() > 1_700_000_000);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "tok ".repeat(501));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let total = prompt + 501;
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": prompt, "completion_tokens": 501, "total_tokens": total,
                   "prompt_tokens_details": {"cached_tokens": 100}})
        );
        let row = s.row(&headers["x-request-id"]).await;
        assert_eq!(row.model, model);
        assert_eq!(row.operation, "chat");
        assert_eq!((row.input, row.output, row.total), (prompt, 501, total));
        assert_eq!(row.credits, price(total, per_1k));
        // The provider got the gateway's key in its own header, never the caller's token.
        let auth = s.env.mock_stats(&s.mock).await["authorization"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            auth.ends_with(PROVIDER_KEY) && !auth.contains(&s.token),
            "{auth}"
        );
        assert!(auth.starts_with(if model == CLAUDE.0 {
            "x-api-key "
        } else {
            "x-goog-api-key "
        }));
    }
    // 1000 - ceil(1601 × 2 / 1000) - ceil(1501 × 1 / 1000)
    assert_eq!(s.env.redis_balance(&s.user).await, Some(1000 - 4 - 2));
    // A model whose answer is cut by its limit ends with `length`.
    let (status, _, v) = s
        .post("/v1/chat/completions", json!({"model": CLAUDE.0, "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 20);
}

#[tokio::test]
async fn streams_are_translated_to_chunks_with_the_usage_chunk_on_request() {
    let s = setup(
        &[
            "--prompt-tokens",
            "40",
            "--completion-tokens",
            "30",
            "--chunks",
            "3",
        ],
        1000,
    )
    .await;
    for (model, per_1k) in [CLAUDE, GEMINI] {
        for include_usage in [false, true] {
            let mut body = json!({"model": model, "stream": true, "max_tokens": 100,
                "messages": [{"role": "user", "content": "Hello"}]});
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let (status, headers, v) = s.post("/v1/chat/completions", body).await;
            assert_eq!(status, 200, "{model}: {v}");
            assert!(headers["content-type"].starts_with("text/event-stream"));
            let events = sse(&v);
            assert_eq!(events.last().unwrap(), "[DONE]", "{model}: {events:?}");
            let chunks = &events[..events.len() - 1];
            let id = chunks[0]["id"].as_str().unwrap();
            for c in chunks {
                assert_eq!(c["object"], "chat.completion.chunk");
                assert_eq!(c["id"], id);
                assert_eq!(c["model"], model);
            }
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, "tok ".repeat(30));
            let finishes: Vec<&Value> = chunks
                .iter()
                .map(|c| &c["choices"][0]["finish_reason"])
                .filter(|f| !f.is_null())
                .collect();
            assert_eq!(finishes, [&json!("stop")]);
            let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
            if include_usage {
                assert_eq!(usage.len(), 1);
                assert_eq!(usage[0]["choices"], json!([]));
                assert_eq!(
                    usage[0]["usage"],
                    json!({"prompt_tokens": 40, "completion_tokens": 30, "total_tokens": 70,
                           "prompt_tokens_details": {"cached_tokens": 0}})
                );
            } else {
                assert!(usage.is_empty(), "no usage chunk unless asked: {chunks:?}");
            }
            let row = s.row(&headers["x-request-id"]).await;
            assert_eq!((row.input, row.output, row.total), (40, 30, 70));
            assert_eq!(row.credits, price(70, per_1k));
            assert_eq!(row.operation, "chat");
            assert_eq!(row.meta["stream"], true);
            assert!(row.meta.get("usage_estimated").is_none());
        }
    }
}

#[tokio::test]
async fn a_tool_call_round_trip_is_recorded_as_function_call_then_chat() {
    let s = setup(
        &["--prompt-tokens", "50", "--completion-tokens", "10"],
        1000,
    )
    .await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    for model in ["gpt-5", CLAUDE.0, GEMINI.0] {
        for stream in [false, true] {
            let mut messages = vec![json!({"role": "user", "content": "Weather in Paris?"})];
            let (status, headers, v) = s
                .post("/v1/chat/completions", json!({"model": model, "stream": stream, "tools": tools, "tool_choice": "auto", "messages": messages}))
                .await;
            assert_eq!(status, 200, "{model}: {v}");
            let (id, name, args, finish) = if stream {
                let chunks = sse(&v);
                let mut id = String::new();
                let mut name = String::new();
                let mut args = String::new();
                let mut finish = Value::Null;
                for c in &chunks {
                    for tc in c["choices"][0]["delta"]["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        assert_eq!(tc["index"], 0);
                        id.push_str(tc["id"].as_str().unwrap_or_default());
                        name.push_str(tc["function"]["name"].as_str().unwrap_or_default());
                        args.push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
                    }
                    if !c["choices"][0]["finish_reason"].is_null() {
                        finish = c["choices"][0]["finish_reason"].clone();
                    }
                }
                (id, name, args, finish)
            } else {
                let tc = &v["choices"][0]["message"]["tool_calls"][0];
                (
                    tc["id"].as_str().unwrap().to_owned(),
                    tc["function"]["name"].as_str().unwrap().to_owned(),
                    tc["function"]["arguments"].as_str().unwrap().to_owned(),
                    v["choices"][0]["finish_reason"].clone(),
                )
            };
            assert_eq!(finish, "tool_calls", "{model} stream={stream}: {v}");
            assert_eq!(name, "get_weather");
            assert!(!id.is_empty());
            assert_eq!(
                serde_json::from_str::<Value>(&args).unwrap(),
                json!({"city": "mock"})
            );
            assert_eq!(
                s.row(&headers["x-request-id"]).await.operation,
                "function_call"
            );

            messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": id, "type": "function", "function": {"name": name, "arguments": args}}]}));
            messages.push(
                json!({"role": "tool", "tool_call_id": id, "content": "{\"temperature\": 18}"}),
            );
            let (status, headers, v) = s
                .post(
                    "/v1/chat/completions",
                    json!({"model": model, "tools": tools, "messages": messages}),
                )
                .await;
            assert_eq!(status, 200, "{model}: {v}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            assert_eq!(v["choices"][0]["message"]["content"], "tok ".repeat(10));
            assert_eq!(s.row(&headers["x-request-id"]).await.operation, "chat");
        }
    }
}

#[tokio::test]
async fn provider_errors_become_openai_errors_with_the_right_status() {
    // (mock status, gateway status, retry-after expected)
    let cases = [
        ("429", 503, Some("7")),
        ("529", 503, None),
        ("500", 502, None),
        ("400", 400, None),
        ("404", 404, None),
    ];
    for (fail, want, retry_after) in cases {
        let s = setup(&["--fail-status", fail, "--retry-after", "7"], 100).await;
        for model in [CLAUDE.0, GEMINI.0] {
            if fail == "529" && model == GEMINI.0 {
                continue;
            }
            for stream in [false, true] {
                let (status, headers, v) = s
                    .post("/v1/chat/completions", json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
                    .await;
                assert_eq!(status, want, "{model} {fail}: {v}");
                let e = openai_error(v.to_string().as_bytes());
                if let Some(r) = retry_after {
                    assert_eq!(headers.get("retry-after").map(String::as_str), Some(r));
                }
                if want == 400 || want == 404 {
                    // The provider's own message, in OpenAI's shape.
                    assert!(
                        e["message"]
                            .as_str()
                            .unwrap()
                            .contains("Mock failure injected"),
                        "{e}"
                    );
                }
            }
        }
        assert_eq!(
            s.env.redis_balance(&s.user).await,
            Some(100),
            "holds are released"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.env.usage_rows().await, 0);
        // Not merely waiting for the flusher: no charge is pending in Redis either.
        assert_eq!(s.env.redis_unflushed(&s.user).await, 0);
    }
}

#[tokio::test]
async fn the_providers_refusing_the_gateways_key_is_not_the_callers_fault() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let base = format!("http://{}", mock.addr);
    // No ANTHROPIC_API_KEY / GEMINI_API_KEY: the mock refuses (401 / 403).
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__PROVIDERS__ANTHROPIC__BASE_URL", &base),
                ("TOLLGATE__PROVIDERS__GOOGLE__BASE_URL", &base),
            ],
        )
        .await;
    let (user, token) = env.user(100).await;
    for model in [CLAUDE.0, GEMINI.0] {
        let (status, _, body) = env
            .chat(
                &gw,
                &token,
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
        let e = openai_error(&body);
        assert!(
            e["message"].as_str().unwrap().contains("credentials"),
            "{e}"
        );
    }
    assert_eq!(env.redis_balance(&user).await, Some(100));
}

#[tokio::test]
async fn unsupported_parameters_are_400_naming_them_and_hold_nothing() {
    let s = setup(&[], 100).await;
    let cases = [
        (
            CLAUDE.0,
            json!({"logit_bias": {"50256": -100}}),
            "logit_bias",
        ),
        (
            CLAUDE.0,
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (CLAUDE.0, json!({"temperature": 1.7}), "temperature"),
        (GEMINI.0, json!({"n": 2}), "n"),
        (GEMINI.0, json!({"logprobs": true}), "logprobs"),
        (
            GEMINI.0,
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
            "messages",
        ),
    ];
    for (model, extra, param) in cases {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, _, v) = s.post("/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{model} {param}: {v}");
        let e = openai_error(v.to_string().as_bytes());
        assert_eq!(e["param"], param, "{e}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    assert_eq!(
        s.env.mock_stats(&s.mock).await["requests"],
        0,
        "nothing reached the provider"
    );
    // JSON mode where the provider has it: Gemini.
    let (status, _, v) = s
        .post("/v1/chat/completions", json!({"model": GEMINI.0, "response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn embeddings_and_completions_where_the_provider_offers_them() {
    let s = setup(
        &["--prompt-tokens", "1200", "--completion-tokens", "7"],
        1000,
    )
    .await;
    for model in ["text-embedding-3-small", "gemini-embedding"] {
        for format in ["float", "base64"] {
            let (status, headers, v) = s
                .post(
                    "/v1/embeddings",
                    json!({"model": model, "input": ["one", "two"], "encoding_format": format}),
                )
                .await;
            assert_eq!(status, 200, "{model}: {v}");
            assert_eq!(v["object"], "list");
            assert_eq!(v["data"].as_array().unwrap().len(), 2);
            assert_eq!(v["data"][1]["index"], 1);
            if format == "float" {
                assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
            } else {
                assert!(v["data"][0]["embedding"].is_string());
            }
            assert_eq!(
                v["usage"],
                json!({"prompt_tokens": 1200, "total_tokens": 1200})
            );
            let row = s.row(&headers["x-request-id"]).await;
            assert_eq!(row.operation, "embedding");
            assert_eq!(row.model, model);
            assert_eq!(
                (row.input, row.output, row.total, row.credits),
                (1200, 0, 1200, 2)
            );
        }
    }
    let (status, _, v) = s
        .post("/v1/embeddings", json!({"model": CLAUDE.0, "input": "x"}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(openai_error(v.to_string().as_bytes())["param"], "model");

    let (status, headers, v) = s
        .post(
            "/v1/completions",
            json!({"model": "gpt-5", "prompt": "Say this is a test", "max_tokens": 50}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "tok ".repeat(7));
    let row = s.row(&headers["x-request-id"]).await;
    assert_eq!(
        (row.operation.as_str(), row.total, row.credits),
        ("completion", 1207, 3)
    );
    let (status, headers, v) = s
        .post(
            "/v1/completions",
            json!({"model": "gpt-5", "prompt": "x", "stream": true}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let events = sse(&v);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(
        events.iter().all(|e| !e["usage"].is_object()),
        "usage chunk withheld: {events:?}"
    );
    let row = s.row(&headers["x-request-id"]).await;
    assert_eq!((row.operation.as_str(), row.total), ("completion", 1207));
    for model in [CLAUDE.0, GEMINI.0] {
        let (status, _, v) = s
            .post("/v1/completions", json!({"model": model, "prompt": "x"}))
            .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(openai_error(v.to_string().as_bytes())["param"], "model");
    }
}

#[tokio::test]
async fn a_stream_cut_by_the_provider_is_recorded_as_cut_and_estimated() {
    let s = setup(
        &[
            "--cut-after",
            "4",
            "--chunks",
            "8",
            "--completion-tokens",
            "64",
        ],
        1000,
    )
    .await;
    for model in [CLAUDE.0, GEMINI.0] {
        let (status, headers, v) = s
            .post(
                "/v1/chat/completions",
                json!({"model": model, "stream": true, "max_tokens": 100,
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(status, 200);
        let events = sse(&v);
        assert!(
            !events.iter().any(|e| e == "[DONE]"),
            "a cut stream has no [DONE]: {events:?}"
        );
        let row = s.row(&headers["x-request-id"]).await;
        assert_eq!(row.meta["upstream_cut"], true, "{row:?}");
        assert_eq!(row.meta["usage_estimated"], true, "{row:?}");
        assert!(row.total > 0);
    }
}

/// A venv with the official `openai` SDK from PyPI, cached under `target/` (created
/// once; later runs reuse it). Fails, never skips, when Python cannot provide it.
pub(crate) fn sdk_python() -> std::path::PathBuf {
    // Tests run in parallel threads: one builds the venv, the others wait for it (a
    // second `venv --clear` would pull it from under the first one's pip).
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/openai-sdk-venv");
    let py = venv.join("bin/python");
    let ready = |py: &std::path::Path| {
        std::process::Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&py) {
        return py;
    }
    let st = std::process::Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()
        .expect("python3 is required (scripts/test.sh installs python3-venv)");
    assert!(
        st.success(),
        "python3 -m venv failed (install python3-venv)"
    );
    let st = std::process::Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai>=1.40,<3",
        ])
        .status()
        .unwrap();
    assert!(st.success(), "pip install openai failed");
    assert!(ready(&py), "the openai SDK does not import");
    py
}

#[tokio::test]
async fn the_openai_python_sdk_works_against_every_provider() {
    let py = tokio::task::spawn_blocking(sdk_python).await.unwrap();
    let s = setup(
        &["--prompt-tokens", "300", "--completion-tokens", "12"],
        10_000,
    )
    .await;
    let (_, broke) = s.env.user(0).await;
    let busy_mock = s.env.mock(&["--fail-status", "429"]).await;
    let busy_base = format!("http://{}", busy_mock.addr);
    let busy = s
        .env
        .gateway_with(
            &busy_mock,
            &[
                ("TOLLGATE__PROVIDERS__ANTHROPIC__BASE_URL", &busy_base),
                ("TOLLGATE__PROVIDERS__GOOGLE__BASE_URL", &busy_base),
                ("ANTHROPIC_API_KEY", PROVIDER_KEY),
                ("GEMINI_API_KEY", PROVIDER_KEY),
            ],
        )
        .await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_client.py");
    let out = tokio::process::Command::new(&py)
        .arg(script)
        .arg(s.gw.url(""))
        .arg(&s.token)
        .arg(&broke)
        .arg(busy.url(""))
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
    // Per provider: chat, streamed chat, tool call, tool result; two embeddings; one completion.
    assert_eq!(seen.len(), 3 * 4 + 2 + 1, "{seen:?}");
    let price_of = |m: &str| match m {
        "gpt-5" | "claude-3.5-sonnet" => 2,
        _ => 1,
    };
    let mut billed = 0;
    for r in &seen {
        let model = r["model"].as_str().unwrap();
        let row = s.row(r["request_id"].as_str().unwrap()).await;
        assert_eq!(row.model, model);
        assert_eq!(row.operation, r["kind"].as_str().unwrap(), "{r}");
        assert_eq!(row.total, r["total_tokens"].as_i64().unwrap(), "{r}");
        assert_eq!(row.input, r["prompt_tokens"].as_i64().unwrap(), "{r}");
        assert_eq!(row.credits, price(row.total, price_of(model)), "{r}");
        billed += row.credits;
    }
    // Per provider also a stream without the usage chunk; per embedding model also a
    // float request: 20 rows in all, and the live balance is charged exactly their sum.
    let rows = s
        .env
        .wait_for_count("SELECT count(*) FROM usage_history", 20, FLUSH_WAIT)
        .await;
    assert_eq!(rows, 20);
    let all: i64 = s
        .env
        .db()
        .await
        .query_one(
            "SELECT coalesce(sum(credits_used), 0)::bigint FROM usage_history",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(all >= billed);
    assert_eq!(s.env.redis_balance(&s.user).await, Some(10_000 - all));
}

#[tokio::test]
async fn gemini_embeddings_without_reported_usage_are_billed_from_the_prompt_only() {
    let s = setup(&["--embed-without-usage"], 1000).await;
    let input = "x".repeat(4000);
    let (status, headers, v) = s
        .post(
            "/v1/embeddings",
            json!({"model": "gemini-embedding", "input": [input]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let row = s.row(&headers["x-request-id"]).await;
    assert_eq!(row.meta["usage_estimated"], true, "{:?}", row.meta);
    assert_eq!(row.output, 0, "vectors are not output tokens");
    // The prompt estimate: about a token per four bytes of the request body.
    assert!((1000..1100).contains(&row.input), "{}", row.input);
    assert_eq!(row.credits, price(row.total, 1));
}

/// Anthropic adds a tool-use system prompt (a few hundred tokens, not in the body) to a
/// request with tools: the hold covers it, so an honest report never exceeds the hold.
/// With 1 credit, the same small request is admitted without tools and refused with one.
#[tokio::test]
async fn an_anthropic_request_with_tools_is_held_for_its_hidden_tool_prompt() {
    let s = setup(&[], 1).await;
    let body = |tools: bool| {
        let mut b = json!({"model": CLAUDE.0, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "weather?"}]});
        if tools {
            b["tools"] = json!([{"type": "function", "function": {"name": "w",
                "parameters": {"type": "object", "properties": {}}}}]);
        }
        b
    };
    // (8 + 4 + ~120 bytes + 400 hidden + 16 output) at 2 per 1k = 2 credits > 1.
    let (status, _, v) = s.post("/v1/chat/completions", body(true)).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    // (8 + 4 + ~90 bytes + 16) at 2 per 1k = 1 credit.
    let (status, _, v) = s.post("/v1/chat/completions", body(false)).await;
    assert_eq!(status, 200, "{v}");
}
