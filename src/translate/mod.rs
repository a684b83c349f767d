//! Translation between OpenAI's chat-completions wire format (what clients speak) and
//! the providers' own, behind one seam per provider: the [`Wire`] trait
//! (`wire.rs`, with the registry [`PROVIDERS`]), implemented once per provider in its
//! own file — `openai.rs` (passed through untouched, see
//! [`crate::parse::upstream_body`]), `anthropic.rs` (Messages API), `gemini.rs`
//! (`generateContent`), and `toy.rs` (tests only: the recipe followed).
//!
//! What is shared by the providers that translate lives here:
//! - [`request`]: an OpenAI chat body → the provider's body ([`Translated`]), its limit
//!   and temperature set by the provider's [`Translation::set_max_tokens`] and
//!   [`Translation::default_temperature`].
//! - [`chat_completion`]: a provider's reading of its answer → `chat.completion`.
//! - [`StreamTranslator`]: the provider's SSE → `chat.completion.chunk` events (each
//!   event handed to the provider's [`StreamState`]), the usage chunk when the client
//!   asked for it, and `[DONE]` withheld until settled.
//! - [`error_body`]: an error a provider reported → an OpenAI-shaped body.
//! - the pieces of a request the translations read alike (text, image parts, tools,
//!   `stop`, `tool_choice`, parameter checks).

pub mod anthropic;
pub mod gemini;
pub mod openai;
#[cfg(test)]
mod toy;
mod wire;

pub use wire::{
    for_name, path_segment, secret, ChatId, Endpoint, Kind, Translation, Wire, PROVIDERS,
};

use bytes::{Bytes, BytesMut};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::route::Model;
use crate::sse::{SseEvent, SseParser};
use crate::usage::{Billed, Usage};

/// A translated request: the provider body, with the output limit still to be set
/// (the reserve may lower it).
#[derive(Clone)]
pub struct Translated {
    pub via: &'static dyn Translation,
    pub body: Value,
}

impl std::fmt::Debug for Translated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translated")
            .field("body", &self.body)
            .finish()
    }
}

impl Translated {
    /// Sets the provider's output-token limit ([`Translation::set_max_tokens`]).
    pub fn set_max_tokens(&mut self, n: i64) {
        self.via.set_max_tokens(&mut self.body, n);
    }

    /// Sets the sampling temperature unless the request has one (a user preference),
    /// within the provider's range ([`Translation::default_temperature`]).
    pub fn default_temperature(&mut self, t: f64) {
        self.via.default_temperature(&mut self.body, t);
    }

    pub fn to_bytes(&self) -> Result<Bytes, ApiError> {
        serde_json::to_vec(&self.body)
            .map(Bytes::from)
            .map_err(ApiError::internal)
    }
}

/// Appends a turn of `role` with `items` under `key`, merged into the previous turn when
/// that has the same role (both providers want roles to alternate).
pub(crate) fn push_turn(turns: &mut Vec<Value>, role: &str, key: &str, items: Vec<Value>) {
    match turns.last_mut() {
        Some(last) if last["role"] == role => {
            if let Some(a) = last[key].as_array_mut() {
                a.extend(items);
            }
        }
        _ => {
            let mut turn = Map::new();
            turn.insert("role".into(), Value::from(role));
            turn.insert(key.into(), Value::Array(items));
            turns.push(Value::Object(turn));
        }
    }
}

pub(crate) fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param),
    }
}

/// Translates an OpenAI chat body for `model`'s provider (`via`: its translation).
pub fn request(
    via: &'static dyn Translation,
    body: &[u8],
    model: &Model,
) -> Result<Translated, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body ({e})")))?;
    let Value::Object(req) = v else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    let body = via.chat_request(req, model)?;
    Ok(Translated { via, body })
}

/// What a translated JSON answer gives the gateway.
#[derive(Debug)]
pub struct Answer {
    /// The `chat.completion` body for the client.
    pub body: Bytes,
    pub usage: Option<Usage>,
    pub tool_call: bool,
}

/// Why a provider's non-streamed answer could not be translated (logged; the client
/// is answered 502).
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// Not JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("not an Anthropic message")]
    NotAnthropic,
    #[error("not a Gemini response")]
    NotGemini,
    /// Not an answer of the provider named.
    #[error("not a {0} answer")]
    NotAnswer(&'static str),
    #[error("no `embeddings` in the answer")]
    NoEmbeddings,
    #[error("an embedding has no `values`")]
    NoEmbeddingValues,
}

/// A provider's chat answer, read as an OpenAI `message`, its finish reason and the
/// usage reported → the `chat.completion` for the client (id `id`, model `model`).
pub fn chat_completion(
    message: Value,
    finish: &str,
    usage: Option<Usage>,
    id: &dyn std::fmt::Display,
    model: &str,
) -> Answer {
    let tool_call = message.get("tool_calls").is_some();
    let mut out = json!({
        "id": id.to_string(),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
    });
    if let Some(u) = usage {
        out["usage"] = usage_json(&u);
    }
    Answer {
        body: Bytes::from(out.to_string()),
        usage,
        tool_call,
    }
}

/// Provider usage, with the cache-read share shown as OpenAI's `cached_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderUsage {
    pub prompt: i64,
    pub completion: i64,
    pub total: i64,
    pub cached: i64,
}

impl ProviderUsage {
    /// The gateway's usage: nothing negative, the cached share within the prompt, the
    /// total at least prompt + completion.
    pub fn usage(&self) -> Usage {
        let prompt = self.prompt.max(0);
        let completion = self.completion.max(0);
        let total = self.total.max(prompt.saturating_add(completion));
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            cached_tokens: self.cached.clamp(0, prompt),
            estimated: false,
        }
    }
}

/// OpenAI's `usage` object, with the cached share of the prompt as
/// `prompt_tokens_details.cached_tokens`.
pub(crate) fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The OpenAI-shaped error body for a provider's error answer of `status`: the
/// provider's `message` (else one naming the status) and its error code, if any.
pub fn error_body(status: http::StatusCode, message: Option<&str>, code: Option<&str>) -> Bytes {
    let kind = match status.as_u16() {
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    let message = match message {
        Some(m) => format!("upstream: {m}"),
        None => format!("upstream: upstream provider answered {status}"),
    };
    crate::error::error_body(&message, kind, None, code)
}

/// Renders OpenAI `chat.completion.chunk` events.
#[derive(Debug)]
pub struct ChunkWriter {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    role_sent: bool,
}

impl ChunkWriter {
    pub fn new(id: &str, model: &str, include_usage: bool) -> ChunkWriter {
        ChunkWriter {
            id: id.to_owned(),
            created: now(),
            model: model.to_owned(),
            include_usage,
            role_sent: false,
        }
    }

    fn push(&self, out: &mut BytesMut, choices: Value, usage: Option<Value>) {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = u;
        } else if self.include_usage {
            c["usage"] = Value::Null;
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(c.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    /// The first chunk carries the role.
    pub fn role(&mut self, out: &mut BytesMut) {
        if !self.role_sent {
            self.role_sent = true;
            self.delta(out, json!({"role": "assistant", "content": ""}));
        }
    }

    pub fn delta(&mut self, out: &mut BytesMut, delta: Value) {
        if !self.role_sent {
            self.role(out);
        }
        self.push(
            out,
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]),
            None,
        );
    }

    pub fn text(&mut self, out: &mut BytesMut, text: &str) {
        if !text.is_empty() {
            self.delta(out, json!({ "content": text }));
        }
    }

    pub fn finish(&mut self, out: &mut BytesMut, reason: &str) {
        self.role(out);
        self.push(
            out,
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason}]),
            None,
        );
    }

    /// The usage chunk (when the client asked for it), with the charge's figures as
    /// top-level fields when the request is settled (see [`charge_fields`]).
    pub fn usage(&self, out: &mut BytesMut, u: &Usage, billed: Option<&Billed>) {
        if !self.include_usage {
            return;
        }
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(u),
        });
        if let (Some(b), Value::Object(m)) = (billed, &mut c) {
            m.extend(charge_fields(b));
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(c.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }
}

/// The name of the usage chunk's field with the credits a request was charged.
pub const CHARGED_FIELD: &str = "x_credits_charged";
/// The name of the usage chunk's field with the spendable balance after the charge.
pub const REMAINING_FIELD: &str = "x_credits_remaining";

/// The fields a stream's usage chunk carries once the request is settled:
/// `x_credits_charged`, and `x_credits_remaining` when the ledger told it.
pub fn charge_fields(b: &Billed) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(CHARGED_FIELD.into(), Value::from(b.credits));
    if let Some(r) = b.remaining {
        m.insert(REMAINING_FIELD.into(), Value::from(r));
    }
    m
}

/// Per-provider stream state: turns one provider event into OpenAI chunks
/// ([`Translation::stream_state`] hands one out per stream).
pub trait StreamState {
    fn event(&mut self, ev: &SseEvent, w: &mut ChunkWriter, out: &mut BytesMut) -> Step;
    /// The usage reported so far (None until the provider's final count is known).
    fn usage(&self) -> Option<Usage>;
    /// The provider's end of the answer was seen (its finish chunk is sent).
    fn stopped(&self) -> bool;
    fn tool_call(&self) -> bool;
}

/// What an event meant for the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    /// The provider reported an error inside the stream.
    Failed,
}

/// Translates a provider's SSE stream into OpenAI chunks as it arrives.
pub struct StreamTranslator {
    parser: SseParser,
    state: Box<dyn StreamState + Send>,
    writer: ChunkWriter,
    events: Vec<SseEvent>,
    bytes: usize,
    deltas: usize,
    failed: bool,
    ended: bool,
}

impl StreamTranslator {
    /// The translator of `kind`'s streams (`None` for a provider that passes through).
    pub fn new(kind: Kind, id: &str, model: &str, include_usage: bool) -> Option<StreamTranslator> {
        Some(StreamTranslator::with_state(
            kind.translation()?.stream_state(),
            id,
            model,
            include_usage,
        ))
    }

    /// A translator around a provider's stream state.
    pub fn with_state(
        state: Box<dyn StreamState + Send>,
        id: &str,
        model: &str,
        include_usage: bool,
    ) -> StreamTranslator {
        StreamTranslator {
            parser: SseParser::new(),
            state,
            writer: ChunkWriter::new(id, model, include_usage),
            events: Vec::new(),
            bytes: 0,
            deltas: 0,
            failed: false,
            ended: false,
        }
    }

    /// Feeds one frame from the provider; returns what to send the client now.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Bytes> {
        self.bytes += chunk.len();
        self.parser.feed(chunk, &mut self.events);
        if self.events.is_empty() {
            return None;
        }
        let mut out = BytesMut::new();
        for ev in std::mem::take(&mut self.events) {
            if self.failed {
                break;
            }
            self.deltas += 1;
            if self.state.event(&ev, &mut self.writer, &mut out) == Step::Failed {
                self.failed = true;
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    pub fn usage(&self) -> Option<Usage> {
        self.state.usage()
    }

    pub fn bytes_seen(&self) -> usize {
        self.bytes
    }

    pub fn events_seen(&self) -> usize {
        self.deltas
    }

    pub fn tool_call(&self) -> bool {
        self.state.tool_call()
    }

    /// Whether the provider reported an error inside the stream.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether the provider's end of the answer was seen (a stream that closes
    /// before it was cut).
    pub fn complete(&self) -> bool {
        !self.failed && self.state.stopped()
    }

    /// After the provider's stream ended: the closing chunk, the usage chunk if asked
    /// for, and `[DONE]` — only for a stream that ended properly (a cut stream ends
    /// without `[DONE]`, as OpenAI's would).
    pub fn finish(&mut self) -> Bytes {
        self.finish_billed(None)
    }

    /// [`StreamTranslator::finish`] once the request is settled: the usage chunk is
    /// the usage charged (the provider's, or the estimate when it reported none) with
    /// the charge's figures ([`charge_fields`]).
    pub fn finish_billed(&mut self, billed: Option<&Billed>) -> Bytes {
        let mut out = BytesMut::new();
        if self.ended || self.failed || self.parser.pending() {
            return out.freeze();
        }
        self.ended = true;
        if self.state.stopped() {
            if let Some(u) = billed.map(|b| b.usage).or_else(|| self.state.usage()) {
                self.writer.usage(&mut out, &u, billed);
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        out.freeze()
    }
}

/// Maps OpenAI `stop` (a string or up to 4 strings) to a list.
pub(crate) fn stop_list(v: &Value) -> Result<Vec<Value>, ApiError> {
    match v {
        Value::Null => Ok(vec![]),
        Value::String(_) => Ok(vec![v.clone()]),
        Value::Array(a) if a.iter().all(Value::is_string) => Ok(a.clone()),
        _ => Err(bad(
            "stop",
            "`stop` must be a string or an array of strings",
        )),
    }
}

/// A number in `[lo, hi]`, or 400 naming the parameter.
pub(crate) fn number_in(
    v: &Value,
    param: &'static str,
    lo: f64,
    hi: f64,
    provider: &str,
) -> Result<Value, ApiError> {
    match v.as_f64() {
        Some(x) if (lo..=hi).contains(&x) => Ok(v.clone()),
        _ => Err(bad(
            param,
            format!("`{param}` must be a number between {lo} and {hi} for {provider} models"),
        )),
    }
}

/// The text of an OpenAI message content: a string, or an array of text parts.
pub(crate) fn text_of(content: &Value, param: &'static str) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => {
                        return Err(bad(
                            param,
                            "only text parts are accepted in this message's content",
                        ))
                    }
                }
            }
            Ok(s)
        }
        _ => Err(bad(param, "message content must be a string or an array")),
    }
}

/// A content part the providers understand.
pub(crate) enum Part {
    Text(String),
    /// A `data:` URL image: media type and base64 data.
    InlineImage {
        media_type: String,
        data: String,
    },
    /// An http(s) URL image.
    UrlImage(String),
}

/// Reads a user message's content into parts; images only for vision models.
pub(crate) fn user_parts(content: &Value, model: &Model) -> Result<Vec<Part>, ApiError> {
    match content {
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                match p["type"].as_str() {
                    Some("text") => out.push(Part::Text(
                        p["text"].as_str().unwrap_or_default().to_owned(),
                    )),
                    Some("image_url") => {
                        if !model.capabilities.iter().any(|c| c == "vision") {
                            return Err(bad(
                                "messages",
                                format!("the model `{}` does not accept images", model.id),
                            ));
                        }
                        let url = p["image_url"]["url"]
                            .as_str()
                            .or_else(|| p["image_url"].as_str())
                            .unwrap_or_default();
                        out.push(image(url)?);
                    }
                    other => {
                        return Err(bad(
                            "messages",
                            format!(
                                "content parts of type `{}` are not supported for model `{}`",
                                other.unwrap_or("?"),
                                model.id
                            ),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Value::Null => Ok(vec![]),
        _ => Err(bad(
            "messages",
            "message content must be a string or an array",
        )),
    }
}

fn image(url: &str) -> Result<Part, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("messages", "an image data URL has no `,`"))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| bad("messages", "image data URLs must be base64-encoded"))?;
        if !media_type.starts_with("image/") {
            return Err(bad(
                "messages",
                "an image data URL must be of an image/* type",
            ));
        }
        return Ok(Part::InlineImage {
            media_type: media_type.to_owned(),
            data: data.to_owned(),
        });
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(Part::UrlImage(url.to_owned()));
    }
    Err(bad(
        "messages",
        "an image URL must be an http(s) URL or a base64 data URL",
    ))
}

/// The function tools of an OpenAI request: (name, description, parameters).
pub(crate) fn function_tools(
    tools: &Value,
    model: &Model,
) -> Result<Vec<(String, Option<String>, Value)>, ApiError> {
    let Value::Array(tools) = tools else {
        return Err(bad("tools", "`tools` must be an array"));
    };
    if !tools.is_empty() && !model.capabilities.iter().any(|c| c == "function_calling") {
        return Err(bad(
            "tools",
            format!("the model `{}` does not support function calling", model.id),
        ));
    }
    let mut out = Vec::with_capacity(tools.len());
    for t in tools {
        if t["type"].as_str() != Some("function") {
            return Err(bad("tools", "only tools of type `function` are supported"));
        }
        let f = &t["function"];
        let name = f["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("tools", "every function tool needs a `name`"))?;
        let params = match &f["parameters"] {
            Value::Null => json!({"type": "object", "properties": {}}),
            p => p.clone(),
        };
        out.push((
            name.to_owned(),
            f["description"].as_str().map(str::to_owned),
            params,
        ));
    }
    Ok(out)
}

/// OpenAI `tool_choice`, read.
pub(crate) enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

pub(crate) fn tool_choice(v: &Value) -> Result<ToolChoice, ApiError> {
    match v {
        Value::String(s) if s == "auto" => Ok(ToolChoice::Auto),
        Value::String(s) if s == "none" => Ok(ToolChoice::None),
        Value::String(s) if s == "required" => Ok(ToolChoice::Required),
        Value::Object(_) if v["type"] == "function" => v["function"]["name"]
            .as_str()
            .map(|n| ToolChoice::Function(n.to_owned()))
            .ok_or_else(|| bad("tool_choice", "`tool_choice.function.name` is required")),
        _ => Err(bad(
            "tool_choice",
            "`tool_choice` must be `auto`, `none`, `required` or a function",
        )),
    }
}

/// Checks every key of the request against the ones the translation handles.
pub(crate) fn check_keys(
    req: &Map<String, Value>,
    known: &[&str],
    provider: &str,
) -> Result<(), ApiError> {
    for (k, v) in req {
        if v.is_null() || known.contains(&k.as_str()) {
            continue;
        }
        // The literal key of the request, named in the error.
        let param: &'static str = ALL_PARAMS
            .iter()
            .find(|p| **p == k.as_str())
            .copied()
            .unwrap_or("unknown parameter");
        return Err(ApiError::InvalidRequest {
            message: format!("the parameter `{k}` is not supported for {provider} models"),
            param: Some(param),
        });
    }
    Ok(())
}

/// OpenAI chat parameters, so an error can name the one at fault with a static str.
const ALL_PARAMS: &[&str] = &[
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

/// Arguments of an OpenAI tool call (a JSON string) as a JSON object.
pub(crate) fn arguments(v: &Value) -> Result<Value, ApiError> {
    let s = v.as_str().unwrap_or("{}");
    let s = if s.trim().is_empty() { "{}" } else { s };
    serde_json::from_str(s).map_err(|_| {
        bad(
            "messages",
            "tool call `arguments` must be a JSON object encoded as a string",
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;

    pub fn model(provider: &str, caps: &[&str]) -> Model {
        Model {
            id: format!("{provider}-model"),
            name: format!("{provider}-upstream"),
            display_name: String::new(),
            provider: provider.into(),
            capabilities: caps.iter().map(|c| (*c).to_owned()).collect(),
            context_length: 1000,
            max_output_tokens: Some(100),
            credits_per_1k_tokens: 1,
            rates: crate::usage::Rates::flat(1),
            provider_costs: crate::usage::ProviderCosts::default(),
            image_tokens: None,
            is_available: true,
            is_deprecated: false,
            created: 0,
        }
    }

    /// The `data:` payloads of an SSE body, parsed (`[DONE]` as a string).
    pub fn chunks(b: &[u8]) -> Vec<Value> {
        let mut p = SseParser::new();
        let mut ev = Vec::new();
        p.feed(b, &mut ev);
        ev.into_iter()
            .map(|e| serde_json::from_str(&e.data).unwrap_or(Value::String(e.data)))
            .collect()
    }

    /// A provider's chat answer `bytes`, through its [`Wire::answer`].
    pub fn response(
        kind: Kind,
        bytes: &[u8],
        id: &str,
        model: &str,
    ) -> Result<Answer, AnswerError> {
        kind.answer(Endpoint::Chat, Bytes::copy_from_slice(bytes), &id, model)
    }

    /// A provider's error answer, through its [`Wire::error`].
    pub fn error(kind: Kind, status: http::StatusCode, body: &[u8]) -> Bytes {
        kind.error(status, Bytes::copy_from_slice(body))
    }

    pub fn run(t: &mut StreamTranslator, body: &[u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in body.chunks(step.max(1)) {
            if let Some(b) = t.feed(piece) {
                out.extend_from_slice(&b);
            }
        }
        out.extend_from_slice(&t.finish());
        out
    }

    #[test]
    fn provider_errors_become_openai_shaped() {
        let a = error(
            for_name("anthropic"),
            http::StatusCode::BAD_REQUEST,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#,
        );
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_request_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens: Field required"));
        assert!(v["error"]["param"].is_null());
        let g = error(
            for_name("google"),
            http::StatusCode::NOT_FOUND,
            br#"{"error":{"code":404,"message":"models/x is not found","status":"NOT_FOUND"}}"#,
        );
        let v: Value = serde_json::from_slice(&g).unwrap();
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], "NOT_FOUND");
        let junk = error(for_name("google"), http::StatusCode::BAD_REQUEST, b"<html>");
        let v: Value = serde_json::from_slice(&junk).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("400"));
    }

    #[test]
    fn unknown_parameters_are_named() {
        let req: Map<String, Value> =
            serde_json::from_str(r#"{"model":"m","logit_bias":{"1":2},"user":null}"#).unwrap();
        let e = check_keys(&req, &["model"], "Anthropic").unwrap_err();
        let ApiError::InvalidRequest { param, message } = e else {
            panic!()
        };
        assert_eq!(param, Some("logit_bias"));
        assert!(message.contains("logit_bias"));
    }
}
