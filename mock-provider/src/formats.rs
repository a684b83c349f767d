//! The mock provider's other wire formats (a child module of the crate root):
//! Anthropic `POST /v1/messages`, Gemini `POST /v1beta/models/{m}:generateContent`,
//! `:streamGenerateContent?alt=sse` and `:batchEmbedContents`, and OpenAI
//! `POST /v1/completions`, `POST /v1/embeddings` and tool calls in chat.
//!
//! Every route honours the mock's options and `x-mock-fail`, `x-mock-latency-ms`,
//! `x-mock-completion-tokens`, plus (each also a command-line option):
//! - `x-mock-retry-after: S` (`--retry-after`) — the `retry-after` of an injected 429;
//! - `x-mock-cut-after: N` (`--cut-after`) — a stream stops after N events, without
//!   its end event;
//! - `x-mock-cache-read-tokens: N` (`--cache-read-tokens`) — Anthropic reports N
//!   cache-read input tokens (besides `input_tokens`), Gemini N of the prompt as
//!   `cachedContentTokenCount` (at most the prompt);
//! - `x-mock-cache-creation-tokens: N` (`--cache-creation-tokens`) — Anthropic
//!   reports N cache-write input tokens (besides `input_tokens`).
//!
//! A request that offers tools is answered with a call of the first tool, unless its
//! last message already carries a tool result (then with text): a tool round trip.
//! Anthropic answers 401 without `x-api-key` (400 without `anthropic-version`);
//! Gemini answers 403 without `x-goog-api-key`. Errors use each provider's shape.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    insert_request_id, unix_now, ChannelBody, MockProvider, Overrides, RespBody, MAX_BODY_BYTES,
    WORD,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Anthropic,
    Gemini,
    OpenAi,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Messages,
    Generate { stream: bool },
    GeminiEmbed,
    Completions,
    Embeddings,
}

/// Whether a POST to `path` is served here.
pub(super) fn serves(path: &str) -> bool {
    route(path).is_some()
}

fn route(path: &str) -> Option<(Format, Route, String)> {
    match path {
        "/v1/messages" => return Some((Format::Anthropic, Route::Messages, String::new())),
        "/v1/completions" => return Some((Format::OpenAi, Route::Completions, String::new())),
        "/v1/embeddings" => return Some((Format::OpenAi, Route::Embeddings, String::new())),
        _ => {}
    }
    let rest = path.strip_prefix("/v1beta/models/")?;
    let (model, method) = rest.split_once(':')?;
    let r = match method {
        "generateContent" => Route::Generate { stream: false },
        "streamGenerateContent" => Route::Generate { stream: true },
        "batchEmbedContents" => Route::GeminiEmbed,
        _ => return None,
    };
    Some((Format::Gemini, r, model.to_owned()))
}

struct Extra {
    retry_after: String,
    cut_after: Option<usize>,
    cache_read: u64,
    cache_creation: u64,
}

impl Extra {
    /// Headers first, then the mock's options.
    fn new(h: &HeaderMap, o: &super::MockOptions) -> Extra {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
        Extra {
            retry_after: get("x-mock-retry-after")
                .map_or_else(|| o.retry_after.unwrap_or(1).to_string(), str::to_owned),
            cut_after: get("x-mock-cut-after")
                .and_then(|v| v.parse().ok())
                .or(o.cut_after),
            cache_read: get("x-mock-cache-read-tokens")
                .and_then(|v| v.parse().ok())
                .unwrap_or(o.cache_read_tokens),
            cache_creation: get("x-mock-cache-creation-tokens")
                .and_then(|v| v.parse().ok())
                .unwrap_or(o.cache_creation_tokens),
        }
    }
}

fn respond(
    status: StatusCode,
    body: &Value,
    headers: &[(&'static str, String)],
) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    insert_request_id(h);
    resp
}

fn error_body(format: Format, status: StatusCode, message: &str) -> Value {
    let code = status.as_u16();
    match format {
        Format::Anthropic => {
            let kind = match code {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Format::Gemini => {
            let s = match code {
                400 => "INVALID_ARGUMENT",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                _ => "INTERNAL",
            };
            json!({"error": {"code": code, "message": message, "status": s}})
        }
        Format::OpenAi => {
            json!({"error": {"message": message, "type": super::error_type(status), "param": null, "code": null}})
        }
    }
}

impl MockProvider {
    fn fail_as(
        &self,
        format: Format,
        status: StatusCode,
        message: &str,
        extra: &Extra,
    ) -> Response<RespBody> {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let headers = if status == StatusCode::TOO_MANY_REQUESTS {
            vec![("retry-after", extra.retry_after.clone())]
        } else {
            vec![]
        };
        respond(status, &error_body(format, status, message), &headers)
    }

    /// Prompt tokens: the option, else ceil(bytes of every text in the body / 4).
    fn prompt_tokens(&self, body: &Value) -> u64 {
        fn text_bytes(v: &Value) -> u64 {
            match v {
                Value::Object(o) => o
                    .iter()
                    .map(|(k, v)| match (k.as_str(), v) {
                        ("text" | "content" | "input" | "prompt", Value::String(s)) => {
                            s.len() as u64
                        }
                        _ => text_bytes(v),
                    })
                    .sum(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| match x {
                        Value::String(s) => s.len() as u64,
                        x => text_bytes(x),
                    })
                    .sum(),
                _ => 0,
            }
        }
        match self.opts.prompt_tokens {
            Some(p) => u64::from(p),
            None => {
                let mut b = 0;
                for k in [
                    "messages",
                    "system",
                    "contents",
                    "systemInstruction",
                    "input",
                    "prompt",
                    "requests",
                ] {
                    b += match &body[k] {
                        Value::String(s) => s.len() as u64,
                        v => text_bytes(v),
                    };
                }
                b.div_ceil(4)
            }
        }
    }

    pub(super) async fn handle_format(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Response<RespBody> {
        let Some((format, route, model)) = route(req.uri().path()) else {
            return super::error_response(StatusCode::NOT_FOUND, "Invalid URL");
        };
        let seq = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let overrides = Overrides::from_headers(req.headers());
        let extra = Extra::new(req.headers(), &self.opts);
        let headers = req.headers().clone();
        let seen = super::headers_json(&headers);
        let query = req.uri().query().unwrap_or_default().to_owned();
        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(c) => {
                let body = c.to_bytes();
                self.remember(seen, &body);
                body
            }
            Err(e) => {
                return self.fail_as(
                    format,
                    StatusCode::BAD_REQUEST,
                    &format!("could not read the body: {e}"),
                    &extra,
                )
            }
        };
        let latency = overrides.latency_ms.unwrap_or(self.opts.latency_ms);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        match format {
            Format::Anthropic if !headers.contains_key("x-api-key") => {
                return self.fail_as(format, StatusCode::UNAUTHORIZED, "x-api-key header is required", &extra)
            }
            Format::Anthropic if !headers.contains_key("anthropic-version") => {
                return self.fail_as(format, StatusCode::BAD_REQUEST, "anthropic-version: header is required", &extra)
            }
            Format::Gemini if !headers.contains_key("x-goog-api-key") && !query.contains("key=") => {
                return self.fail_as(
                    format,
                    StatusCode::FORBIDDEN,
                    "Method doesn't allow unregistered callers (callers without established identity).",
                    &extra,
                )
            }
            _ => {}
        }
        if let Some(key) = headers
            .get("x-api-key")
            .map(|k| format!("x-api-key {}", String::from_utf8_lossy(k.as_bytes())))
            .or_else(|| {
                headers
                    .get("x-goog-api-key")
                    .map(|k| format!("x-goog-api-key {}", String::from_utf8_lossy(k.as_bytes())))
            })
        {
            *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
        }
        let Ok(parsed) = serde_json::from_slice::<Value>(&body) else {
            return self.fail_as(
                format,
                StatusCode::BAD_REQUEST,
                "the body is not valid JSON",
                &extra,
            );
        };
        let injected = overrides.fail.or(self.opts.fail_status).or_else(|| {
            let every = u64::from(self.opts.fail_every);
            (every > 0 && seq.is_multiple_of(every)).then_some(500)
        });
        if let Some(code) = injected {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let msg = match code {
                529 => "Overloaded".to_owned(),
                429 => "Rate limited (mock)".to_owned(),
                _ if status.is_server_error() => "Internal server error (mock)".to_owned(),
                _ => format!("Mock failure injected with status {code}"),
            };
            return self.fail_as(format, status, &msg, &extra);
        }
        let prompt = self.prompt_tokens(&parsed);
        let wanted = u64::from(
            overrides
                .completion_tokens
                .unwrap_or(self.opts.completion_tokens),
        );
        match route {
            Route::Embeddings | Route::GeminiEmbed => self.embed(format, &parsed, prompt),
            Route::Generate { stream } if stream && !query.contains("alt=sse") => self.fail_as(
                format,
                StatusCode::BAD_REQUEST,
                "the mock streams only with alt=sse",
                &extra,
            ),
            _ => {
                let cap = match format {
                    Format::Anthropic => parsed["max_tokens"].as_u64(),
                    Format::Gemini => parsed["generationConfig"]["maxOutputTokens"].as_u64(),
                    Format::OpenAi => parsed["max_tokens"].as_u64(),
                };
                if format == Format::Anthropic && cap.is_none() {
                    return self.fail_as(
                        format,
                        StatusCode::BAD_REQUEST,
                        "max_tokens: Field required",
                        &extra,
                    );
                }
                let (completion, limited) = match cap {
                    Some(c) if c < wanted => (c, true),
                    _ => (wanted, false),
                };
                // A text completion runs every prompt of a prompt array max(n, best_of)
                // times, each up to max_tokens, as OpenAI does (and bills).
                let completion = match format {
                    Format::OpenAi => completion.saturating_mul(completion_runs(&parsed)),
                    _ => completion,
                };
                let tool = tool_to_call(format, &parsed);
                let a = Gen {
                    id: uuid::Uuid::new_v4().simple().to_string(),
                    model: if model.is_empty() {
                        parsed["model"].as_str().unwrap_or("mock").to_owned()
                    } else {
                        model
                    },
                    prompt,
                    completion,
                    limited,
                    tool,
                    cache_read: extra.cache_read,
                    cache_creation: extra.cache_creation,
                    chunks: self.opts.chunks.max(1),
                };
                let stream = match route {
                    Route::Generate { stream } => stream,
                    _ => parsed["stream"] == true,
                };
                let include_usage = parsed["stream_options"]["include_usage"] == true;
                if stream {
                    let events = match format {
                        Format::Anthropic => a.anthropic_events(),
                        Format::Gemini => a.gemini_events(),
                        Format::OpenAi => a.completion_events(include_usage),
                    };
                    self.stream_events(events, extra.cut_after)
                } else {
                    self.served.fetch_add(1, Ordering::Relaxed);
                    let v = match format {
                        Format::Anthropic => a.anthropic_json(),
                        Format::Gemini => a.gemini_json(),
                        Format::OpenAi => a.completion_json(),
                    };
                    respond(StatusCode::OK, &v, &[])
                }
            }
        }
    }

    fn embed(&self, format: Format, body: &Value, prompt: u64) -> Response<RespBody> {
        use base64::Engine as _;
        let dims = body["dimensions"]
            .as_u64()
            .or_else(|| body["requests"][0]["outputDimensionality"].as_u64())
            .unwrap_or(8)
            .clamp(1, 4096);
        let vector = |i: usize| -> Vec<f32> {
            (0..dims)
                .map(|d| (i as f32 + 1.0) / (d as f32 + 2.0))
                .collect()
        };
        self.served.fetch_add(1, Ordering::Relaxed);
        match format {
            Format::Gemini => {
                let n = body["requests"].as_array().map_or(0, Vec::len);
                let embeddings: Vec<Value> =
                    (0..n).map(|i| json!({ "values": vector(i) })).collect();
                let mut answer = json!({"embeddings": embeddings});
                if !self.opts.embed_without_usage {
                    answer["usageMetadata"] =
                        json!({"promptTokenCount": prompt, "totalTokenCount": prompt});
                }
                respond(StatusCode::OK, &answer, &[])
            }
            _ => {
                let n = match &body["input"] {
                    Value::Array(a) if a.iter().all(Value::is_number) => 1,
                    Value::Array(a) => a.len(),
                    _ => 1,
                };
                let base64 = body["encoding_format"] == "base64";
                let data: Vec<Value> = (0..n)
                    .map(|i| {
                        let v = vector(i);
                        let e = if base64 {
                            let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                            Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
                        } else {
                            json!(v)
                        };
                        json!({"object": "embedding", "index": i, "embedding": e})
                    })
                    .collect();
                respond(
                    StatusCode::OK,
                    &json!({"object": "list", "data": data, "model": body["model"],
                        "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}),
                    &[],
                )
            }
        }
    }

    fn stream_events(
        self: Arc<Self>,
        events: Vec<Bytes>,
        cut_after: Option<usize>,
    ) -> Response<RespBody> {
        let interval = Duration::from_millis(self.opts.chunk_interval_ms);
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let provider = self;
        let cut = cut_after.unwrap_or(usize::MAX);
        tokio::spawn(async move {
            let last = events.len().saturating_sub(1);
            for (i, event) in events.into_iter().enumerate() {
                if i >= cut {
                    // The stream ends here, without its closing events.
                    provider.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if i > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                if i == last {
                    provider.served.fetch_add(1, Ordering::Relaxed);
                }
                if tx.send(event).await.is_err() {
                    if i == last {
                        provider.served.fetch_sub(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        });
        let mut resp = Response::new(ChannelBody { rx }.boxed());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        insert_request_id(h);
        resp
    }
}

/// How many outputs a text completion generates: prompts × max(n, best_of).
fn completion_runs(body: &Value) -> u64 {
    let prompts = match &body["prompt"] {
        Value::Array(a) if a.iter().all(Value::is_number) => 1,
        Value::Array(a) => a.len() as u64,
        _ => 1,
    };
    let n = body["n"].as_u64().unwrap_or(1);
    let best_of = body["best_of"].as_u64().unwrap_or(1);
    prompts.max(1) * n.max(best_of).max(1)
}

/// OpenAI chat with tools: answers with a call of the first tool (JSON or SSE), unless
/// the last message is a tool result. `None`: answer as usual.
pub(super) fn openai_tool_call(
    provider: &Arc<MockProvider>,
    body: &[u8],
    completion: u64,
) -> Option<Response<RespBody>> {
    let parsed: Value = serde_json::from_slice(body).ok()?;
    let tool = tool_to_call(Format::OpenAi, &parsed)?;
    let prompt = provider.prompt_tokens(&parsed);
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let call_id = format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]);
    let model = parsed["model"].as_str().unwrap_or("gpt-5");
    let created = unix_now();
    if parsed["stream"] == true {
        let include_usage = parsed["stream_options"]["include_usage"] == true;
        let chunk = |choices: Value, usage: Option<&Value>| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
            if include_usage {
                c["usage"] = usage.cloned().unwrap_or(Value::Null);
            }
            Bytes::from(format!("data: {c}\n\n"))
        };
        let mut events = vec![
            chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": call_id, "type": "function", "function": {"name": tool.0, "arguments": ""}}]},
                "logprobs": null, "finish_reason": null}]),
                None,
            ),
            chunk(
                json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": tool.1}}]},
                "logprobs": null, "finish_reason": null}]),
                None,
            ),
            chunk(
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}]),
                None,
            ),
        ];
        if include_usage {
            events.push(chunk(json!([]), Some(&usage)));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        return Some(Arc::clone(provider).stream_events(events, None));
    }
    provider.served.fetch_add(1, Ordering::Relaxed);
    Some(respond(
        StatusCode::OK,
        &json!({"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": tool.0, "arguments": tool.1}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": usage}),
        &[],
    ))
}

/// (name, JSON arguments) of the tool to call: the first one offered, with each
/// required property set to "mock" — unless the last message is a tool result.
fn tool_to_call(format: Format, body: &Value) -> Option<(String, String)> {
    let (name, schema) = match format {
        Format::Anthropic => {
            let t = body["tools"].as_array()?.first()?;
            (t["name"].as_str()?, &t["input_schema"])
        }
        Format::Gemini => {
            let t = body["tools"][0]["functionDeclarations"]
                .as_array()?
                .first()?;
            (t["name"].as_str()?, &t["parameters"])
        }
        Format::OpenAi => {
            let t = body["tools"].as_array()?.first()?;
            (
                t["function"]["name"].as_str()?,
                &t["function"]["parameters"],
            )
        }
    };
    let answered = match format {
        Format::Anthropic => body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_array())
            .is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result")),
        Format::Gemini => body["contents"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["parts"].as_array())
            .is_some_and(|p| p.iter().any(|x| x.get("functionResponse").is_some())),
        Format::OpenAi => body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| m["role"] == "tool"),
    };
    if answered || body["tool_choice"] == "none" || body["tool_choice"]["type"] == "none" {
        return None;
    }
    let mut args = serde_json::Map::new();
    for r in schema["required"].as_array().into_iter().flatten() {
        if let Some(r) = r.as_str() {
            args.insert(r.to_owned(), Value::String("mock".into()));
        }
    }
    Some((name.to_owned(), Value::Object(args).to_string()))
}

/// One generated answer, rendered in each format.
struct Gen {
    id: String,
    model: String,
    prompt: u64,
    completion: u64,
    limited: bool,
    tool: Option<(String, String)>,
    cache_read: u64,
    cache_creation: u64,
    chunks: u32,
}

impl Gen {
    fn text(&self) -> String {
        WORD.repeat(usize::try_from(self.completion).unwrap_or(0))
    }

    /// The text split into `chunks` pieces.
    fn pieces(&self) -> Vec<String> {
        let n = u64::from(self.chunks);
        (0..n)
            .map(|i| {
                WORD.repeat(
                    usize::try_from((i + 1) * self.completion / n - i * self.completion / n)
                        .unwrap_or(0),
                )
            })
            .collect()
    }

    fn anthropic_stop(&self) -> &'static str {
        if self.tool.is_some() {
            "tool_use"
        } else if self.limited {
            "max_tokens"
        } else {
            "end_turn"
        }
    }

    fn anthropic_json(&self) -> Value {
        let mut content = vec![];
        if let Some((name, args)) = &self.tool {
            content.push(
                json!({"type": "tool_use", "id": format!("toolu_{}", &self.id[..24]), "name": name,
                "input": serde_json::from_str::<Value>(args).unwrap_or(Value::Null)}),
            );
        } else {
            content.push(json!({"type": "text", "text": self.text()}));
        }
        json!({"id": format!("msg_{}", self.id), "type": "message", "role": "assistant", "model": self.model,
            "content": content, "stop_reason": self.anthropic_stop(), "stop_sequence": null,
            "usage": {"input_tokens": self.prompt, "cache_creation_input_tokens": self.cache_creation,
                "cache_read_input_tokens": self.cache_read, "output_tokens": self.completion}})
    }

    fn anthropic_events(&self) -> Vec<Bytes> {
        let ev = |name: &str, v: Value| Bytes::from(format!("event: {name}\ndata: {v}\n\n"));
        let mut out = vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"id": format!("msg_{}", self.id),
                "type": "message", "role": "assistant", "model": self.model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": self.prompt, "cache_creation_input_tokens": self.cache_creation,
                    "cache_read_input_tokens": self.cache_read, "output_tokens": 1}}}),
            ),
            ev("ping", json!({"type": "ping"})),
        ];
        if let Some((name, args)) = &self.tool {
            out.push(ev("content_block_start", json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": format!("toolu_{}", &self.id[..24]), "name": name, "input": {}}})));
            let mid = args.len() / 2;
            for part in [&args[..mid], &args[mid..]] {
                out.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": part}}),
                ));
            }
        } else {
            out.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ));
            for p in self.pieces() {
                out.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": p}}),
                ));
            }
        }
        out.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        out.push(ev(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": self.anthropic_stop(), "stop_sequence": null},
            "usage": {"output_tokens": self.completion}}),
        ));
        out.push(ev("message_stop", json!({"type": "message_stop"})));
        out
    }

    fn gemini_finish(&self) -> &'static str {
        if self.limited && self.tool.is_none() {
            "MAX_TOKENS"
        } else {
            "STOP"
        }
    }

    fn gemini_parts(&self, text: String) -> Value {
        match &self.tool {
            Some((name, args)) => json!([{"functionCall": {"name": name,
                "args": serde_json::from_str::<Value>(args).unwrap_or(Value::Null)}}]),
            None => json!([{ "text": text }]),
        }
    }

    fn gemini_usage(&self) -> Value {
        let mut u = json!({"promptTokenCount": self.prompt, "candidatesTokenCount": self.completion,
            "totalTokenCount": self.prompt + self.completion});
        if self.cache_read > 0 {
            u["cachedContentTokenCount"] = json!(self.cache_read.min(self.prompt));
        }
        u
    }

    fn gemini_json(&self) -> Value {
        json!({"candidates": [{"content": {"parts": self.gemini_parts(self.text()), "role": "model"},
            "finishReason": self.gemini_finish(), "index": 0}],
            "usageMetadata": self.gemini_usage(), "modelVersion": self.model, "responseId": self.id})
    }

    fn gemini_events(&self) -> Vec<Bytes> {
        let frame = |v: Value| Bytes::from(format!("data: {v}\r\n\r\n"));
        let partial = json!({"promptTokenCount": self.prompt, "totalTokenCount": self.prompt});
        if self.tool.is_some() {
            return vec![frame(
                json!({"candidates": [{"content": {"parts": self.gemini_parts(String::new()), "role": "model"},
                "finishReason": "STOP", "index": 0}], "usageMetadata": self.gemini_usage(),
                "modelVersion": self.model, "responseId": self.id}),
            )];
        }
        let pieces = self.pieces();
        let last = pieces.len().saturating_sub(1);
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut c = json!({"content": {"parts": [{"text": p}], "role": "model"}, "index": 0});
                let usage = if i == last {
                    c["finishReason"] = json!(self.gemini_finish());
                    self.gemini_usage()
                } else {
                    partial.clone()
                };
                frame(json!({"candidates": [c], "usageMetadata": usage, "modelVersion": self.model, "responseId": self.id}))
            })
            .collect()
    }

    fn completion_usage(&self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion})
    }

    fn completion_finish(&self) -> &'static str {
        if self.limited {
            "length"
        } else {
            "stop"
        }
    }

    fn completion_json(&self) -> Value {
        json!({"id": format!("cmpl-{}", self.id), "object": "text_completion", "created": unix_now(),
            "model": self.model, "choices": [{"text": self.text(), "index": 0, "logprobs": null,
                "finish_reason": self.completion_finish()}], "usage": self.completion_usage()})
    }

    fn completion_events(&self, include_usage: bool) -> Vec<Bytes> {
        let created = unix_now();
        let chunk = |choices: Value, usage: Option<Value>| {
            let mut c = json!({"id": format!("cmpl-{}", self.id), "object": "text_completion", "created": created,
                "model": self.model, "choices": choices});
            if include_usage {
                c["usage"] = usage.unwrap_or(Value::Null);
            }
            Bytes::from(format!("data: {c}\n\n"))
        };
        let mut out: Vec<Bytes> = self
            .pieces()
            .into_iter()
            .map(|p| {
                chunk(
                    json!([{"text": p, "index": 0, "logprobs": null, "finish_reason": null}]),
                    None,
                )
            })
            .collect();
        out.push(chunk(json!([{"text": "", "index": 0, "logprobs": null, "finish_reason": self.completion_finish()}]), None));
        if include_usage {
            out.push(chunk(json!([]), Some(self.completion_usage())));
        }
        out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn routes_of_each_format() {
        assert!(matches!(
            route("/v1/messages"),
            Some((Format::Anthropic, Route::Messages, _))
        ));
        let (f, r, m) =
            route("/v1beta/models/gemini-2.0-pro-exp-02-05:streamGenerateContent").unwrap();
        assert!(f == Format::Gemini && r == Route::Generate { stream: true });
        assert_eq!(m, "gemini-2.0-pro-exp-02-05");
        assert!(matches!(
            route("/v1beta/models/e:batchEmbedContents"),
            Some((_, Route::GeminiEmbed, _))
        ));
        assert!(route("/v1beta/models/e:countTokens").is_none());
        assert!(!serves("/v1/chat/completions"));
    }

    #[test]
    fn tools_are_called_until_a_result_comes_back() {
        let body = json!({"tools": [{"name": "f", "input_schema": {"type": "object", "required": ["a", "b"]}}],
            "messages": [{"role": "user", "content": "x"}]});
        let (name, args) = tool_to_call(Format::Anthropic, &body).unwrap();
        assert_eq!(name, "f");
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"a": "mock", "b": "mock"})
        );
        let answered = json!({"tools": body["tools"], "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}]});
        assert!(tool_to_call(Format::Anthropic, &answered).is_none());
        let gemini = json!({"tools": [{"functionDeclarations": [{"name": "g"}]}],
            "contents": [{"role": "user", "parts": [{"functionResponse": {"name": "g"}}]}]});
        assert!(tool_to_call(Format::Gemini, &gemini).is_none());
        let openai = json!({"tools": [{"type": "function", "function": {"name": "h"}}], "tool_choice": "none",
            "messages": [{"role": "user", "content": "x"}]});
        assert!(tool_to_call(Format::OpenAi, &openai).is_none());
    }

    #[test]
    fn error_bodies_have_each_providers_shape() {
        let a = error_body(
            Format::Anthropic,
            StatusCode::from_u16(529).unwrap(),
            "Overloaded",
        );
        assert_eq!(
            a,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
        let g = error_body(Format::Gemini, StatusCode::TOO_MANY_REQUESTS, "slow down");
        assert_eq!(g["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(g["error"]["code"], 429);
    }
}
