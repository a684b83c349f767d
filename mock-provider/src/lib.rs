//! Bundled mock LLM provider speaking OpenAI's chat-completions wire format, and (in
//! its child module `formats`) Anthropic's, Gemini's and OpenAI's other endpoints.
//!
//! Used for load tests, local development and integration tests of the gateway, which
//! runs it as `tollgate mock-provider` ([`MockOptions`] are that command's options).
//! Depends on nothing of the gateway.
//!
//! Routes:
//! - `POST /v1/chat/completions` — JSON or SSE (`stream: true`) answers with usage;
//!   a request offering tools gets a tool call (see [`formats`]).
//! - `POST /v1/messages`, `POST /v1beta/models/{m}:generateContent`,
//!   `:streamGenerateContent?alt=sse`, `:batchEmbedContents`, `POST /v1/completions`,
//!   `POST /v1/embeddings` — see [`formats`].
//! - `GET /v1/models` — a one-model list.
//! - `GET /_mock/stats` — request counters and the last `Authorization` header seen.
//! - `GET /_mock/last` — the headers and JSON body of the last request received on a
//!   provider route (any format).
//!
//! Per-request overrides (headers): `x-mock-fail: <status>`,
//! `x-mock-completion-tokens: N`, `x-mock-latency-ms: N`, `x-mock-cut-after: N`,
//! `x-mock-cache-read-tokens: N` (chat's `usage.prompt_tokens_details.cached_tokens`,
//! at most the prompt; absent when 0).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

mod formats;

/// Options of the mock provider (also usable as a clap sub-command's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct MockOptions {
    /// Delay before the response headers (ms)
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Delay between SSE chunks (ms)
    #[arg(long, default_value_t = 0)]
    pub chunk_interval_ms: u64,
    /// Number of content chunks in a streamed answer
    #[arg(long, default_value_t = 8)]
    pub chunks: u32,
    /// Completion tokens reported (capped by the request's max_completion_tokens / max_tokens)
    #[arg(long, default_value_t = 16)]
    pub completion_tokens: u32,
    /// Prompt tokens reported; if unset, computed as ceil(bytes of all message contents / 4)
    #[arg(long)]
    pub prompt_tokens: Option<u32>,
    /// Fail every request with this HTTP status (e.g. 500) instead of answering
    #[arg(long)]
    pub fail_status: Option<u16>,
    /// Fail one request in N with 500 (0 = never)
    #[arg(long, default_value_t = 0)]
    pub fail_every: u32,
    /// With --fail-status: fail only the first N requests, then answer (0 = all)
    #[arg(long, default_value_t = 0)]
    pub fail_first: u64,
    /// Send `retry-after: N` (seconds) with injected 429 and 503 answers (OpenAI format;
    /// Anthropic and Gemini 429s carry N, default 1; header x-mock-retry-after)
    #[arg(long)]
    pub retry_after: Option<u64>,
    /// Cut streams after N events: OpenAI streams drop the connection mid-body;
    /// Anthropic/Gemini/completions streams end without their end event. An OpenAI
    /// chat JSON answer is cut after N bytes (the connection dropped short of its
    /// declared length). (header x-mock-cut-after)
    #[arg(long)]
    pub cut_after: Option<usize>,
    /// Input tokens read from the prompt cache (header x-mock-cache-read-tokens):
    /// Anthropic's `cache_read_input_tokens` (besides `input_tokens`); OpenAI chat's
    /// `prompt_tokens_details.cached_tokens` and Gemini's `cachedContentTokenCount`
    /// (part of the prompt, at most all of it)
    #[arg(long, default_value_t = 0)]
    pub cache_read_tokens: u64,
    /// Anthropic's `cache_creation_input_tokens` (header x-mock-cache-creation-tokens)
    #[arg(long, default_value_t = 0)]
    pub cache_creation_tokens: u64,
    /// Gemini embedding answers without `usageMetadata`, as the public API sends them
    #[arg(long)]
    pub embed_without_usage: bool,
}

/// State shared by every connection of one mock server: options and counters.
pub struct MockProvider {
    opts: MockOptions,
    /// Total `POST /v1/chat/completions` requests received.
    requests: AtomicU64,
    /// Successful completions (JSON answered, or stream reached `[DONE]`).
    served: AtomicU64,
    /// Requests answered with an error status (injected failures, malformed bodies).
    failed: AtomicU64,
    /// Last `Authorization` header value seen (any route but `/_mock/stats`).
    authorization: Mutex<Option<String>>,
    /// Headers and body of the last chat request (`/_mock/last`).
    last: Mutex<Option<serde_json::Value>>,
}

type RespBody = BoxBody<Bytes, Infallible>;

const MODEL_CREATED: u64 = 1_754_425_777;
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const WORD: &str = "tok ";

/// Serve until `shutdown` resolves. TCP_NODELAY on every accepted socket.
/// HTTP/1.1 keep-alive (and h2c prior knowledge) via hyper-util's auto builder.
/// After `shutdown`, open connections are asked to close gracefully and are
/// given a few seconds to finish in-flight responses.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: MockOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let provider = Arc::new(MockProvider::new(opts));
    let builder = ConnBuilder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(err) => {
                        // Transient (e.g. EMFILE, ECONNABORTED): back off briefly, keep serving.
                        tracing::warn!(error = %err, "mock provider: accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "mock provider: set_nodelay failed");
                }
                let provider = Arc::clone(&provider);
                let service = service_fn(move |req: Request<Incoming>| {
                    let provider = Arc::clone(&provider);
                    async move { Ok::<_, Infallible>(provider.handle(req).await) }
                });
                let conn = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(error = %err, "mock provider: connection error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::debug!("mock provider: graceful shutdown timed out");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Request / response wire types
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    /// Only with cached tokens (`--cache-read-tokens`), as OpenAI's older models.
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct PromptTokensDetails {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice<'a>>,
    /// `None`: field absent; `Some(None)`: `"usage":null`; `Some(Some(u))`: the usage object.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<()>,
    code: Option<()>,
}

#[derive(Serialize)]
struct Stats {
    requests: u64,
    served: u64,
    failed: u64,
    authorization: Option<String>,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: [ModelEntry; 1],
}

#[derive(Serialize)]
struct ModelEntry {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

// ---------------------------------------------------------------------------
// Streaming body: one frame per channel message, delivered as produced.
// ---------------------------------------------------------------------------

struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|msg| msg.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// Per-request header overrides.
#[derive(Debug, Default)]
struct Overrides {
    fail: Option<u16>,
    completion_tokens: Option<u32>,
    latency_ms: Option<u64>,
    cut_after: Option<usize>,
    cache_read: Option<u64>,
}

impl Overrides {
    fn from_headers(headers: &HeaderMap) -> Self {
        fn parse<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse().ok())
        }
        Self {
            fail: parse(headers, "x-mock-fail"),
            completion_tokens: parse(headers, "x-mock-completion-tokens"),
            latency_ms: parse(headers, "x-mock-latency-ms"),
            cut_after: parse(headers, "x-mock-cut-after"),
            cache_read: parse(headers, "x-mock-cache-read-tokens"),
        }
    }
}

impl MockProvider {
    fn new(opts: MockOptions) -> Self {
        Self {
            opts,
            requests: AtomicU64::new(0),
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            authorization: Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        if req.uri().path() != "/_mock/stats" {
            if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
                let value = String::from_utf8_lossy(auth.as_bytes()).into_owned();
                *self
                    .authorization
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(value);
            }
        }
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => self.chat(req).await,
            (&Method::POST, path) if formats::serves(path) => self.handle_format(req).await,
            (&Method::GET, "/v1/models") => self.models(),
            (&Method::GET, "/_mock/stats") => self.stats(),
            (&Method::GET, "/_mock/last") => {
                let last = self
                    .last
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                json_response(StatusCode::OK, &last)
            }
            (method, path) => {
                let msg = format!("Invalid URL ({method} {path})");
                error_response(StatusCode::NOT_FOUND, &msg)
            }
        }
    }

    fn models(&self) -> Response<RespBody> {
        let list = ModelList {
            object: "list",
            data: [ModelEntry {
                id: "gpt-5",
                object: "model",
                created: MODEL_CREATED,
                owned_by: "mock",
            }],
        };
        json_response(StatusCode::OK, &list)
    }

    fn stats(&self) -> Response<RespBody> {
        let authorization = self
            .authorization
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let stats = Stats {
            requests: self.requests.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            authorization,
        };
        json_response(StatusCode::OK, &stats)
    }

    fn fail(&self, status: StatusCode, message: &str) -> Response<RespBody> {
        self.failed.fetch_add(1, Ordering::Relaxed);
        error_response(status, message)
    }

    /// Keeps the headers and JSON body of a chat request for `/_mock/last`.
    fn remember(&self, headers: serde_json::Map<String, serde_json::Value>, body: &[u8]) {
        *self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(serde_json::json!({
            "headers": headers,
            "body": serde_json::from_slice::<serde_json::Value>(body).ok(),
        }));
    }

    async fn chat(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let seq = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let overrides = Overrides::from_headers(req.headers());
        let headers = headers_json(req.headers());

        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                let msg = format!("Could not read the request body: {err}");
                return self.fail(StatusCode::BAD_REQUEST, &msg);
            }
        };
        self.remember(headers, &body);

        let latency = overrides.latency_ms.unwrap_or(self.opts.latency_ms);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }

        // Like the real providers' parsers (Python's, Go's, JavaScript's), a key given
        // twice keeps its LAST value, and escapes in keys are decoded.
        let parsed: ChatRequest = match serde_json::from_slice::<serde_json::Value>(&body)
            .and_then(serde_json::from_value)
        {
            Ok(parsed) => parsed,
            Err(err) => {
                let msg = format!(
                    "We could not parse the JSON body of your request. ({err}) \
                     (HINT: This likely means you aren't using your HTTP library correctly.)"
                );
                return self.fail(StatusCode::BAD_REQUEST, &msg);
            }
        };

        // Failure injection: header, then --fail-status, then --fail-every.
        let fail_status = self
            .opts
            .fail_status
            .filter(|_| self.opts.fail_first == 0 || seq <= self.opts.fail_first);
        let injected = overrides.fail.or(fail_status).or_else(|| {
            let every = u64::from(self.opts.fail_every);
            (every > 0 && seq.is_multiple_of(every)).then_some(500)
        });
        if let Some(code) = injected {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let msg = if status.is_server_error() {
                "The server had an error while processing your request. Sorry about that! (mock)"
                    .to_owned()
            } else {
                format!("Mock failure injected with status {}", status.as_u16())
            };
            let mut resp = self.fail(status, &msg);
            if let (Some(secs), 429 | 503) = (self.opts.retry_after, status.as_u16()) {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            return resp;
        }
        let tool_tokens = overrides
            .completion_tokens
            .unwrap_or(self.opts.completion_tokens);
        if let Some(resp) = formats::openai_tool_call(&self, &body, u64::from(tool_tokens)) {
            return resp;
        }

        let prompt_tokens = match self.opts.prompt_tokens {
            Some(p) => u64::from(p),
            None => {
                let bytes: u64 = parsed
                    .messages
                    .iter()
                    .map(|m| content_bytes(m.content.as_ref()))
                    .sum();
                bytes.div_ceil(4)
            }
        };
        let wanted = u64::from(
            overrides
                .completion_tokens
                .unwrap_or(self.opts.completion_tokens),
        );
        let cap = match (parsed.max_completion_tokens, parsed.max_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (completion_tokens, finish_reason) = match cap {
            Some(cap) if cap < wanted => (cap, "length"),
            _ => (wanted, "stop"),
        };
        let cached = overrides
            .cache_read
            .unwrap_or(self.opts.cache_read_tokens)
            .min(prompt_tokens);
        let usage = Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: (cached > 0).then_some(PromptTokensDetails {
                cached_tokens: cached,
            }),
        };
        let answer = Answer {
            id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            created: unix_now(),
            model: parsed.model.unwrap_or_else(|| "gpt-5".to_owned()),
            usage,
            finish_reason,
        };

        if parsed.stream.unwrap_or(false) {
            let include_usage = parsed
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
            let cut_after = overrides.cut_after.or(self.opts.cut_after);
            self.stream(answer, include_usage, cut_after)
        } else {
            let content = WORD.repeat(usize::try_from(completion_tokens).unwrap_or(0));
            let completion = Completion {
                id: &answer.id,
                object: "chat.completion",
                created: answer.created,
                model: &answer.model,
                choices: [CompletionChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: &content,
                        refusal: None,
                    },
                    logprobs: None,
                    finish_reason,
                }],
                usage,
            };
            if let Some(n) = overrides.cut_after.or(self.opts.cut_after) {
                return cut_json(&completion, n);
            }
            self.served.fetch_add(1, Ordering::Relaxed);
            json_response(StatusCode::OK, &completion)
        }
    }

    /// Streams the answer; with `cut_after`, only that many events, then the
    /// connection is dropped mid-body (a declared length is never reached).
    fn stream(
        self: Arc<Self>,
        answer: Answer,
        include_usage: bool,
        cut_after: Option<usize>,
    ) -> Response<RespBody> {
        let mut events = answer.sse_events(self.opts.chunks, include_usage);
        if let Some(n) = cut_after {
            events.truncate(n);
        }
        let interval = Duration::from_millis(self.opts.chunk_interval_ms);
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let provider = self;
        tokio::spawn(async move {
            let last = events.len().saturating_sub(1);
            for (i, event) in events.into_iter().enumerate() {
                if i > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                if i == last && cut_after.is_none() {
                    // Count before the terminal `[DONE]` goes out so a client that
                    // saw `[DONE]` always finds the request counted as served.
                    provider.served.fetch_add(1, Ordering::Relaxed);
                }
                if tx.send(event).await.is_err() {
                    if i == last && cut_after.is_none() {
                        provider.served.fetch_sub(1, Ordering::Relaxed);
                    }
                    tracing::debug!("mock provider: client went away mid-stream");
                    return;
                }
            }
            if cut_after.is_some() {
                // Let what was sent be flushed before the connection drops.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut resp = Response::new(ChannelBody { rx }.boxed());
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if cut_after.is_some() {
            headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from_static("100000000"),
            );
        }
        insert_request_id(headers);
        resp
    }
}

/// Everything the answer's JSON / SSE rendering needs.
struct Answer {
    id: String,
    created: u64,
    model: String,
    usage: Usage,
    finish_reason: &'static str,
}

impl Answer {
    fn chunk(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<Option<Usage>>) -> Bytes {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        sse_data(&chunk)
    }

    /// All SSE events of a streamed answer, in order, ending with `[DONE]`.
    fn sse_events(&self, chunks: u32, include_usage: bool) -> Vec<Bytes> {
        let null_usage = include_usage.then_some(None);
        let words = self.usage.completion_tokens;
        let n = u64::from(chunks);
        let mut events = Vec::with_capacity(chunks as usize + 4);

        events.push(self.chunk(
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(""),
                },
                logprobs: None,
                finish_reason: None,
            }],
            null_usage,
        ));
        for i in 0..n {
            // Split the words evenly: chunk i gets words [i*W/n, (i+1)*W/n).
            let from = i * words / n;
            let to = (i + 1) * words / n;
            let text = WORD.repeat(usize::try_from(to - from).unwrap_or(0));
            events.push(self.chunk(
                vec![ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: None,
                        content: Some(&text),
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                null_usage,
            ));
        }
        events.push(self.chunk(
            vec![ChunkChoice {
                index: 0,
                delta: Delta::default(),
                logprobs: None,
                finish_reason: Some(self.finish_reason),
            }],
            null_usage,
        ));
        if include_usage {
            events.push(self.chunk(Vec::new(), Some(Some(self.usage))));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Bytes of a message's content: a string, or an array of parts with `text`.
fn content_bytes(content: Option<&serde_json::Value>) -> u64 {
    let len = match content {
        Some(serde_json::Value::String(s)) => s.len(),
        Some(serde_json::Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(serde_json::Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    };
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sse_data<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    // Serializing these plain structs into a Vec cannot fail.
    if serde_json::to_writer(&mut buf, value).is_err() {
        buf.extend_from_slice(b"{}");
    }
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

fn insert_request_id(headers: &mut HeaderMap) {
    let id = format!("req_{}", uuid::Uuid::new_v4().simple());
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert("x-request-id", value);
    }
}

/// A 200 JSON answer cut after `n` bytes: its full length is declared, then the
/// connection drops.
fn cut_json<T: Serialize>(value: &T, n: usize) -> Response<RespBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let len = body.len();
    let head = Bytes::from(body[..n.min(len.saturating_sub(1))].to_vec());
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let _ = tx.send(head).await;
        // Let what was sent be flushed before the connection drops.
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    let mut resp = Response::new(ChannelBody { rx }.boxed());
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    insert_request_id(headers);
    resp
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<RespBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    insert_request_id(headers);
    resp
}

fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

fn error_response(status: StatusCode, message: &str) -> Response<RespBody> {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind: error_type(status),
            param: None,
            code: None,
        },
    };
    json_response(status, &body)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Request headers as a JSON object (repeated headers joined with ", ").
fn headers_json(h: &http::HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for name in h.keys() {
        let values: Vec<String> = h
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        out.insert(name.as_str().to_owned(), values.join(", ").into());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::Client;
    use serde_json::{json, Value};
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::sync::oneshot;

    fn opts() -> MockOptions {
        MockOptions {
            latency_ms: 0,
            chunk_interval_ms: 0,
            chunks: 8,
            completion_tokens: 16,
            prompt_tokens: None,
            fail_status: None,
            fail_every: 0,
            fail_first: 0,
            retry_after: None,
            cut_after: None,
            cache_read_tokens: 0,
            cache_creation_tokens: 0,
            embed_without_usage: false,
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    }

    impl Server {
        async fn start(opts: MockOptions) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, opts, async move {
                let _ = rx.await;
            }));
            let client = Client::builder(TokioExecutor::new()).build_http();
            Self {
                addr,
                stop: Some(stop),
                task,
                client,
            }
        }

        async fn request(
            &self,
            method: Method,
            path: &str,
            headers: &[(&str, &str)],
            body: impl Into<Bytes>,
        ) -> Response<Incoming> {
            let mut req = Request::builder()
                .method(method)
                .uri(format!("http://{}{}", self.addr, path));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req.body(Full::new(body.into())).unwrap();
            self.client.request(req).await.unwrap()
        }

        async fn post_chat(&self, headers: &[(&str, &str)], body: &Value) -> Response<Incoming> {
            let mut all = vec![("content-type", "application/json")];
            all.extend_from_slice(headers);
            self.request(
                Method::POST,
                "/v1/chat/completions",
                &all,
                serde_json::to_vec(body).unwrap(),
            )
            .await
        }

        async fn stats(&self) -> Value {
            let resp = self.request(Method::GET, "/_mock/stats", &[], "").await;
            assert_eq!(resp.status(), StatusCode::OK);
            body_json(resp).await
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            drop(self.client);
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("serve did not stop")
                .unwrap()
                .unwrap();
        }
    }

    async fn body_bytes(resp: Response<Incoming>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    async fn body_json(resp: Response<Incoming>) -> Value {
        serde_json::from_slice(&body_bytes(resp).await).unwrap()
    }

    /// Split an SSE body into the payloads of its `data:` events.
    fn sse_payloads(body: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(body).unwrap();
        assert!(text.ends_with("\n\n"), "stream must end with a blank line");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_owned()
            })
            .collect()
    }

    fn chat_body(stream: bool, include_usage: Option<bool>) -> Value {
        let mut body = json!({
            "model": "gpt-5-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},            // 14 bytes
                {"role": "user", "content": [{"type": "text", "text": "Hello there!"}]} // 12 bytes
            ],
            "stream": stream,
        });
        if let Some(iu) = include_usage {
            body["stream_options"] = json!({ "include_usage": iu });
        }
        body
    }

    #[tokio::test]
    async fn json_answer_with_usage() {
        let srv = Server::start(opts()).await;
        let resp = srv
            .post_chat(
                &[("authorization", "Bearer sk-test")],
                &chat_body(false, None),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE].to_str().unwrap(),
            "application/json"
        );
        let v = body_json(resp).await;
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["object"], "chat.completion");
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(v["model"], "gpt-5-mini");
        let choice = &v["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], "tok ".repeat(16));
        assert_eq!(choice["finish_reason"], "stop");
        // ceil((14 + 12) / 4) = 7
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23})
        );

        let stats = srv.stats().await;
        assert_eq!(
            stats,
            json!({"requests": 1, "served": 1, "failed": 0, "authorization": "Bearer sk-test"})
        );
        srv.stop().await;
    }

    #[tokio::test]
    async fn prompt_tokens_option_and_completion_header() {
        let srv = Server::start(MockOptions {
            prompt_tokens: Some(100),
            ..opts()
        })
        .await;
        let resp = srv
            .post_chat(
                &[("x-mock-completion-tokens", "3")],
                &chat_body(false, None),
            )
            .await;
        let v = body_json(resp).await;
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103})
        );
        assert_eq!(v["choices"][0]["message"]["content"], "tok tok tok ");
        srv.stop().await;
    }

    #[tokio::test]
    async fn cached_tokens_are_reported_as_part_of_the_prompt() {
        let srv = Server::start(MockOptions {
            prompt_tokens: Some(100),
            cache_read_tokens: 40,
            ..opts()
        })
        .await;
        let v = body_json(srv.post_chat(&[], &chat_body(false, None)).await).await;
        assert_eq!(v["usage"]["prompt_tokens"], 100);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 40);
        // The header wins, and the cached part is never more than the prompt.
        let resp = srv
            .post_chat(
                &[("x-mock-cache-read-tokens", "500")],
                &chat_body(false, None),
            )
            .await;
        let v = body_json(resp).await;
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
        srv.stop().await;
    }

    #[tokio::test]
    async fn stream_with_include_usage() {
        let srv = Server::start(MockOptions {
            chunks: 4,
            completion_tokens: 10,
            ..opts()
        })
        .await;
        let resp = srv.post_chat(&[], &chat_body(true, Some(true))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let payloads = sse_payloads(&body_bytes(resp).await);
        // role chunk + 4 content chunks + finish chunk + usage chunk + [DONE]
        assert_eq!(payloads.len(), 1 + 4 + 1 + 1 + 1, "{payloads:#?}");
        assert_eq!(payloads.last().unwrap(), "[DONE]");

        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let id = chunks[0]["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("chatcmpl-"));
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], id.as_str());
            assert_eq!(c["model"], "gpt-5-mini");
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert!(chunks[0]["usage"].is_null());
        assert!(chunks[0].as_object().unwrap().contains_key("usage"));

        let content: Vec<&str> = chunks[1..5]
            .iter()
            .map(|c| {
                assert!(c["usage"].is_null());
                assert!(c["choices"][0]["finish_reason"].is_null());
                c["choices"][0]["delta"]["content"].as_str().unwrap()
            })
            .collect();
        assert_eq!(content.concat(), "tok ".repeat(10));

        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));

        let usage_chunk = &chunks[6];
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(
            usage_chunk["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17})
        );
        // Exact OpenAI field order of the usage chunk.
        let raw = &payloads[6];
        let created = usage_chunk["created"].as_u64().unwrap();
        assert_eq!(
            raw,
            &format!(
                r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":"gpt-5-mini","choices":[],"usage":{{"prompt_tokens":7,"completion_tokens":10,"total_tokens":17}}}}"#
            )
        );

        let stats = srv.stats().await;
        assert_eq!(stats["served"], 1);
        assert_eq!(stats["requests"], 1);
        srv.stop().await;
    }

    #[tokio::test]
    async fn stream_without_include_usage_has_no_usage_chunk() {
        let srv = Server::start(opts()).await;
        for include in [None, Some(false)] {
            let resp = srv.post_chat(&[], &chat_body(true, include)).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let payloads = sse_payloads(&body_bytes(resp).await);
            // role chunk + 8 content chunks + finish chunk + [DONE]
            assert_eq!(payloads.len(), 1 + 8 + 1 + 1, "{payloads:#?}");
            assert_eq!(payloads.last().unwrap(), "[DONE]");
            for p in &payloads[..payloads.len() - 1] {
                let c: Value = serde_json::from_str(p).unwrap();
                assert!(!c.as_object().unwrap().contains_key("usage"), "{p}");
                assert_eq!(c["choices"].as_array().unwrap().len(), 1);
            }
        }
        srv.stop().await;
    }

    #[tokio::test]
    async fn max_tokens_caps_completion_tokens() {
        let srv = Server::start(opts()).await;

        let mut body = chat_body(false, None);
        body["max_tokens"] = json!(5);
        let v = body_json(srv.post_chat(&[], &body).await).await;
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 12);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["message"]["content"], "tok ".repeat(5));

        let mut body = chat_body(false, None);
        body["max_completion_tokens"] = json!(3);
        let v = body_json(srv.post_chat(&[], &body).await).await;
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(v["choices"][0]["finish_reason"], "length");

        // A cap above the configured count does not change anything.
        let mut body = chat_body(false, None);
        body["max_tokens"] = json!(1000);
        let v = body_json(srv.post_chat(&[], &body).await).await;
        assert_eq!(v["usage"]["completion_tokens"], 16);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        // Streaming: the cap shows in the finish chunk and the usage chunk.
        let mut body = chat_body(true, Some(true));
        body["max_completion_tokens"] = json!(4);
        let payloads = sse_payloads(&body_bytes(srv.post_chat(&[], &body).await).await);
        let n = payloads.len();
        let finish: Value = serde_json::from_str(&payloads[n - 3]).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        let usage: Value = serde_json::from_str(&payloads[n - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 4);
        srv.stop().await;
    }

    #[tokio::test]
    async fn x_mock_fail_gives_status_and_counts() {
        let srv = Server::start(opts()).await;
        let resp = srv
            .post_chat(&[("x-mock-fail", "503")], &chat_body(false, None))
            .await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let v = body_json(resp).await;
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["code"].is_null());
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"].is_string());

        let resp = srv
            .post_chat(&[("x-mock-fail", "429")], &chat_body(true, Some(true)))
            .await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let _ = body_bytes(resp).await;

        let resp = srv.post_chat(&[], &chat_body(false, None)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = body_bytes(resp).await;

        let stats = srv.stats().await;
        assert_eq!(
            stats,
            json!({"requests": 3, "served": 1, "failed": 2, "authorization": null})
        );
        srv.stop().await;
    }

    #[tokio::test]
    async fn fail_status_and_fail_every_options() {
        let srv = Server::start(MockOptions {
            fail_status: Some(500),
            ..opts()
        })
        .await;
        let resp = srv.post_chat(&[], &chat_body(false, None)).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body_json(resp).await["error"]["type"], "server_error");
        srv.stop().await;

        let srv = Server::start(MockOptions {
            fail_every: 2,
            ..opts()
        })
        .await;
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let resp = srv.post_chat(&[], &chat_body(false, None)).await;
            statuses.push(resp.status().as_u16());
            let _ = body_bytes(resp).await;
        }
        assert_eq!(statuses, [200, 500, 200, 500]);
        let stats = srv.stats().await;
        assert_eq!(stats["served"], 2);
        assert_eq!(stats["failed"], 2);
        srv.stop().await;
    }

    #[tokio::test]
    async fn malformed_json_is_400() {
        let srv = Server::start(opts()).await;
        let resp = srv
            .request(
                Method::POST,
                "/v1/chat/completions",
                &[("content-type", "application/json")],
                "{\"model\": \"gpt-5\", \"messages\": [",
            )
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let v = body_json(resp).await;
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["code"].is_null());
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());

        let stats = srv.stats().await;
        assert_eq!(stats["requests"], 1);
        assert_eq!(stats["served"], 0);
        assert_eq!(stats["failed"], 1);
        srv.stop().await;
    }

    #[tokio::test]
    async fn models_and_404() {
        let srv = Server::start(opts()).await;
        let v = body_json(srv.request(Method::GET, "/v1/models", &[], "").await).await;
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "gpt-5");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["owned_by"], "mock");
        assert!(v["data"][0]["created"].is_u64());

        let resp = srv.request(Method::GET, "/v1/nope", &[], "").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let v = body_json(resp).await;
        assert_eq!(v["error"]["type"], "not_found_error");
        assert!(v["error"]["code"].is_null());
        srv.stop().await;
    }

    #[tokio::test]
    async fn chunks_are_delivered_one_by_one() {
        let srv = Server::start(MockOptions {
            chunks: 4,
            chunk_interval_ms: 80,
            ..opts()
        })
        .await;
        let started = Instant::now();
        let resp = srv.post_chat(&[], &chat_body(true, Some(true))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut arrivals = Vec::new();
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                arrivals.push(started.elapsed());
                all.extend_from_slice(&data);
            }
        }
        // 1 role + 4 content + finish + usage + [DONE] = 8 events, 7 gaps of 80 ms.
        assert_eq!(sse_payloads(&all).len(), 8);
        assert_eq!(
            arrivals.len(),
            8,
            "each event should arrive as its own frame"
        );
        let spread = *arrivals.last().unwrap() - arrivals[0];
        assert!(spread >= Duration::from_millis(7 * 80 - 20), "{arrivals:?}");
        srv.stop().await;
    }

    #[tokio::test]
    async fn latency_header_delays_response() {
        let srv = Server::start(opts()).await;
        let started = Instant::now();
        let resp = srv
            .post_chat(&[("x-mock-latency-ms", "150")], &chat_body(false, None))
            .await;
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = body_bytes(resp).await;
        srv.stop().await;
    }

    #[tokio::test]
    async fn fail_first_with_retry_after_then_answers() {
        let srv = Server::start(MockOptions {
            fail_status: Some(429),
            fail_first: 2,
            retry_after: Some(3),
            ..opts()
        })
        .await;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let resp = srv.post_chat(&[], &chat_body(false, None)).await;
            let ra = resp
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_owned());
            seen.push((resp.status().as_u16(), ra));
            let _ = body_bytes(resp).await;
        }
        assert_eq!(
            seen,
            [
                (429, Some("3".to_owned())),
                (429, Some("3".to_owned())),
                (200, None)
            ]
        );
        srv.stop().await;
    }

    #[tokio::test]
    async fn cut_after_drops_the_stream_mid_body() {
        let srv = Server::start(opts()).await;
        let resp = srv
            .post_chat(&[("x-mock-cut-after", "3")], &chat_body(true, Some(true)))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut data = Vec::new();
        let mut failed = false;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => data.extend_from_slice(&f.into_data().unwrap()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "the body must end in an error, not cleanly");
        let text = String::from_utf8(data).unwrap();
        assert_eq!(text.matches("data: ").count(), 3, "{text}");
        assert!(!text.contains("[DONE]"));
        assert_eq!(srv.stats().await["served"], 0);
        srv.stop().await;
    }

    #[tokio::test]
    async fn last_request_is_recorded() {
        let srv = Server::start(opts()).await;
        let resp = srv
            .post_chat(
                &[("authorization", "Bearer k"), ("cookie", "a=1")],
                &chat_body(false, None),
            )
            .await;
        let _ = body_bytes(resp).await;
        let v = body_json(srv.request(Method::GET, "/_mock/last", &[], "").await).await;
        assert_eq!(v["headers"]["authorization"], "Bearer k");
        assert_eq!(v["headers"]["cookie"], "a=1");
        assert_eq!(v["body"]["model"], "gpt-5-mini");
        srv.stop().await;
    }

    #[tokio::test]
    async fn raw_keep_alive_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let srv = Server::start(opts()).await;
        let mut sock = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        for _ in 0..2 {
            sock.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
            assert!(text.contains("\"owned_by\":\"mock\""), "{text}");
        }
        drop(sock);
        srv.stop().await;
    }
}
