//! Stage 3, parse: read only what the gateway needs from a chat request — `model`,
//! `stream`, the token limits, `n`, `stream_options.include_usage` and the size of the
//! prompt — and leave the rest of the body untouched for the provider.
//!
//! The body is first [checked](crate::body::check) so that the provider's reading of
//! every field equals the gateway's (no duplicate keys, allow-listed parameters); then
//! the content of each message is checked against the content policy (text, images,
//! inline files; no audio, no references to files stored at the provider).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use serde::de::IgnoredAny;

use crate::body::{self, Params, Present};
use crate::error::ApiError;
use crate::route::Model;

/// The chat-completions parameters the gateway passes on (reading or editing some).
pub const CHAT_PARAMS: Params = Params {
    allowed: &[
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "temperature",
        "top_p",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "seed",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "metadata",
        "store",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "reasoning_effort",
        "verbosity",
        // Checked below: text only.
        "modalities",
        // Checked below: `auto` or `default` only.
        "service_tier",
    ],
    refused: &[
        (
            "audio",
            "audio output is priced apart from text tokens, which is all the gateway bills",
        ),
        (
            "prediction",
            "rejected predicted tokens are billed beyond the output limit the gateway holds for",
        ),
        (
            "web_search_options",
            "web search is billed per call on top of tokens, which the gateway does not price",
        ),
    ],
};

/// A chat body as the gateway reads it: every parameter of [`CHAT_PARAMS`], nothing
/// else, none twice. The keys the gateway may set are read as they are (`null`
/// included), so that it knows they are there.
#[allow(dead_code)] // the pass-through parameters are read only so that they are accepted
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChat<'a> {
    #[serde(default, borrow, deserialize_with = "body::present")]
    model: Option<&'a RawValue>,
    #[serde(default, borrow)]
    messages: Option<Vec<RawMessage<'a>>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    stream_options: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    max_tokens: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(default)]
    n: Option<serde_json::Value>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    temperature: Option<&'a RawValue>,
    #[serde(default)]
    top_p: Option<IgnoredAny>,
    #[serde(default)]
    stop: Option<IgnoredAny>,
    #[serde(default)]
    presence_penalty: Option<IgnoredAny>,
    #[serde(default)]
    frequency_penalty: Option<IgnoredAny>,
    #[serde(default)]
    logit_bias: Option<IgnoredAny>,
    #[serde(default)]
    logprobs: Option<IgnoredAny>,
    #[serde(default)]
    top_logprobs: Option<IgnoredAny>,
    #[serde(default)]
    seed: Option<IgnoredAny>,
    #[serde(default)]
    user: Option<IgnoredAny>,
    #[serde(default)]
    safety_identifier: Option<IgnoredAny>,
    #[serde(default)]
    prompt_cache_key: Option<IgnoredAny>,
    #[serde(default)]
    metadata: Option<IgnoredAny>,
    #[serde(default)]
    store: Option<IgnoredAny>,
    #[serde(default, borrow)]
    tools: Option<Vec<RawTool<'a>>>,
    #[serde(default)]
    tool_choice: Option<IgnoredAny>,
    #[serde(default)]
    parallel_tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    functions: Option<IgnoredAny>,
    #[serde(default)]
    function_call: Option<IgnoredAny>,
    #[serde(default)]
    response_format: Option<IgnoredAny>,
    #[serde(default)]
    reasoning_effort: Option<IgnoredAny>,
    #[serde(default)]
    verbosity: Option<IgnoredAny>,
    #[serde(default, borrow)]
    modalities: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    service_tier: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    audio: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    prediction: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    web_search_options: Option<&'a RawValue>,
}

/// The parameters of a chat body whose values the gateway reads (to name the one at
/// fault when a body does not parse).
const CHAT_READERS: &[body::Reader] = &[
    ("model", |v| {
        serde_json::from_str::<Option<Cow<'_, str>>>(v).is_ok()
    }),
    ("messages", |v| {
        serde_json::from_str::<Vec<RawMessage<'_>>>(v).is_ok()
    }),
    ("stream", |v| {
        serde_json::from_str::<Option<bool>>(v).is_ok()
    }),
    ("stream_options", |v| {
        include_usage(serde_json::from_str(v).ok()).is_ok()
    }),
    ("tools", |v| {
        serde_json::from_str::<Option<Vec<RawTool<'_>>>>(v).is_ok()
    }),
    ("modalities", |v| {
        serde_json::from_str::<Option<Vec<Cow<'_, str>>>>(v).is_ok()
    }),
    ("service_tier", |v| {
        serde_json::from_str::<Option<Cow<'_, str>>>(v).is_ok()
    }),
];

/// A refused parameter given a value other than `null`: the 400 naming it.
pub(crate) fn refused(
    params: &Params,
    name: &'static str,
    value: Option<&RawValue>,
) -> Result<(), ApiError> {
    match (value, params.refused.iter().find(|(n, _)| *n == name)) {
        (Some(v), Some((_, why))) if v.get() != "null" => Err(ApiError::InvalidRequest {
            message: format!("the parameter `{name}` is not accepted: {why}"),
            param: Some(name),
        }),
        _ => Ok(()),
    }
}

/// A positive integer parameter read as it is (`null` or absent: `None`).
pub(crate) fn positive_raw(
    v: Option<&RawValue>,
    field: &'static str,
) -> Result<Option<i64>, ApiError> {
    let value = match v {
        None => None,
        Some(v) => Some(
            serde_json::from_str::<serde_json::Value>(v.get())
                .map_err(|_| must_be_positive(field))?,
        ),
    };
    positive(&value, field)
}

// The objects the gateway reads inside the body list every field OpenAI defines, and
// refuse others: a field the gateway would not see (`"FILE_ID"`) may be one a provider
// reads (Go's parser matches it to `file_id`).

// Fields read only so that they are accepted.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
    #[serde(default)]
    include_obfuscation: Option<serde::de::IgnoredAny>,
}

/// `stream_options.include_usage` (absent or null: false). The value must be an object
/// (or null), as the provider reads it: a derived struct would also read an array, and
/// take `[true]` for a request of the usage chunk that the provider never sees.
pub(crate) fn include_usage(stream_options: Option<&RawValue>) -> Result<bool, ApiError> {
    let bad = |why: String| ApiError::InvalidRequest {
        message: format!("`stream_options` {why}"),
        param: Some("stream_options"),
    };
    match stream_options.map(RawValue::get) {
        None | Some("null") => Ok(false),
        Some(o) if o.starts_with('{') => serde_json::from_str::<RawStreamOptions>(o)
            .map(|o| o.include_usage.unwrap_or(false))
            .map_err(|e| bad(format!("could not be read ({e})"))),
        Some(_) => Err(bad("must be an object".into())),
    }
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage<'a> {
    #[serde(default)]
    role: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    audio: Option<&'a RawValue>,
    #[serde(default)]
    name: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    tool_calls: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    tool_call_id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    function_call: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    refusal: Option<serde::de::IgnoredAny>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPart<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    text: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    image_url: Option<&'a RawValue>,
    #[serde(default, borrow)]
    file: Option<RawFile<'a>>,
    #[serde(default)]
    refusal: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    input_audio: Option<serde::de::IgnoredAny>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile<'a> {
    #[serde(default, borrow)]
    file_id: Option<&'a RawValue>,
    #[serde(default)]
    file_data: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    filename: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct RawTool<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
}

/// How big a prompt can be, before the model is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromptSize {
    /// Bytes of the body (every byte of text counts as a token: byte-level tokenizers
    /// never make more tokens than bytes), images' own bytes left out, plus a fixed
    /// overhead per message and per request.
    pub bytes: i64,
    /// Image parts: each costs at most the model's `image_tokens`.
    pub images: i64,
    /// File (PDF) parts: their pages are read as text and images, so their cost has no
    /// bound but the context length.
    pub files: i64,
    /// Prompts the provider runs separately (a completions prompt array, embedding
    /// inputs); each is at most the context length.
    pub prompts: i64,
}

impl PromptSize {
    /// An upper bound of the prompt tokens the provider can bill for `model`: the bytes,
    /// plus each image at the model's allowance (`default_image_tokens` when the model
    /// has none; 0 = the context length), never more than the context length per prompt
    /// (a longer prompt is refused by the provider, not billed).
    pub fn tokens_bound(&self, model: &Model, default_image_tokens: i64) -> i64 {
        let context = model.context_length.max(1);
        let ceiling = context.saturating_mul(self.prompts.max(1));
        if self.files > 0 {
            return ceiling;
        }
        let per_image = match model.image_tokens {
            Some(t) if t > 0 => t,
            _ if default_image_tokens > 0 => default_image_tokens,
            _ => context,
        };
        self.bytes
            .saturating_add(self.images.saturating_mul(per_image))
            .min(ceiling)
    }
}

/// What the gateway knows about a model request (chat, and the other endpoints too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// The model the body names; filled from the user's preferences when it names none.
    pub model: String,
    /// The body names the model (else it is added upstream).
    pub model_in_body: bool,
    /// The body sets `temperature` (else the user's preference may add it).
    pub has_temperature: bool,
    pub stream: bool,
    /// The client asked for the usage chunk itself.
    pub include_usage: bool,
    /// The client's output limit: `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<i64>,
    /// Every output-limit field the body sets (not null), with its value: each is set
    /// to the held limit upstream, whichever of them the provider honours.
    pub limits: Vec<(&'static str, i64)>,
    /// The limit field to add when the body sets none.
    pub limit_field: &'static str,
    /// How big the prompt can be (see [`PromptSize`]).
    pub prompt: PromptSize,
    /// An upper bound of the prompt's tokens for the routed model (0 until
    /// [`ChatRequest::size_for`] runs).
    pub prompt_tokens_bound: i64,
    /// Outputs the provider generates, each up to the limit: `n` for chat;
    /// prompts × max(`n`, `best_of`) for completions.
    pub choices: i64,
    /// Which of the keys the gateway may set the body has (even as `null`).
    pub present: Present,
    /// The request offers tools (some providers add hidden prompt tokens for them).
    pub tools: bool,
}

impl ChatRequest {
    /// Sizes the prompt bound for the routed model.
    pub fn size_for(&mut self, model: &Model, default_image_tokens: i64) {
        self.prompt_tokens_bound = self.prompt.tokens_bound(model, default_image_tokens);
    }

    /// A guess of the prompt's tokens, for when the provider reports none: a token per
    /// four bytes of text, plus what the bound adds for images; never above the bound.
    pub fn prompt_estimate(&self) -> i64 {
        let bytes = self.prompt.bytes.max(0);
        let bound = self.prompt_tokens_bound.max(0);
        let text = bytes.saturating_add(3) / 4;
        if bound >= bytes {
            text.saturating_add(bound - bytes)
        } else {
            text.min(bound)
        }
    }
}

/// The largest `n` accepted (OpenAI's own limit).
pub const MAX_CHOICES: i64 = 128;

/// Overhead per message (role and separator tokens) and per request (priming).
const TOKENS_PER_MESSAGE: i64 = 4;
pub(crate) const TOKENS_PER_REQUEST: i64 = 8;

pub(crate) fn len(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A positive integer parameter (`null` or absent: `None`).
pub(crate) fn positive(
    v: &Option<serde_json::Value>,
    field: &'static str,
) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(x) if x > 0 => Ok(Some(x)),
            _ => Err(must_be_positive(field)),
        },
        Some(_) => Err(must_be_positive(field)),
    }
}

fn must_be_positive(field: &'static str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("`{field}` must be a positive integer"),
        param: Some(field),
    }
}

/// The error of a request that names no model (and has no default model).
pub fn missing_model() -> ApiError {
    ApiError::InvalidRequest {
        message: "you must provide a model parameter".into(),
        param: Some("model"),
    }
}

fn bad_messages(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some("messages"),
    }
}

/// Parses a chat-completions body; a missing model is an error (see
/// [`parse_chat_lenient`]).
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let r = parse_chat_lenient(body)?;
    if r.model.is_empty() {
        return Err(missing_model());
    }
    Ok(r)
}

/// Parses a chat-completions body. A body that names no model parses with an empty
/// `model` (a default may apply).
pub fn parse_chat_lenient(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let text = body::object_text(body)?;
    let raw: RawChat<'_> = serde_json::from_str(text)
        .map_err(|e| body::parse_error(body, &CHAT_PARAMS, CHAT_READERS, &e))?;
    for (name, value) in [
        ("audio", raw.audio),
        ("prediction", raw.prediction),
        ("web_search_options", raw.web_search_options),
    ] {
        refused(&CHAT_PARAMS, name, value)?;
    }
    let model = match raw.model.map(RawValue::get) {
        None | Some("null") => String::new(),
        Some(m) => match serde_json::from_str::<Cow<'_, str>>(m) {
            Ok(m) if !m.is_empty() => m.into_owned(),
            Ok(_) => return Err(missing_model()),
            Err(_) => {
                return Err(ApiError::InvalidRequest {
                    message: "`model` must be a string".into(),
                    param: Some("model"),
                })
            }
        },
    };
    if let Some(m) = raw
        .modalities
        .as_ref()
        .filter(|m| m.iter().any(|m| m != "text"))
    {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "`modalities` must be [\"text\"] (got {m:?}): audio output is priced apart from text tokens"
            ),
            param: Some("modalities"),
        });
    }
    if let Some(t) = raw
        .service_tier
        .as_deref()
        .filter(|t| !matches!(*t, "auto" | "default"))
    {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "`service_tier` `{t}` is not accepted: the gateway bills the default tier's price (use `auto` or `default`)"
            ),
            param: Some("service_tier"),
        });
    }
    for t in raw.tools.iter().flatten() {
        if !matches!(t.kind.as_deref(), Some("function" | "custom")) {
            return Err(ApiError::InvalidRequest {
                message: "only `function` and `custom` tools are accepted".into(),
                param: Some("tools"),
            });
        }
    }
    let messages = raw.messages.as_ref().ok_or(ApiError::InvalidRequest {
        message: "`messages` is required".into(),
        param: Some("messages"),
    })?;
    if messages.is_empty() {
        return Err(bad_messages("`messages` must contain at least one message"));
    }
    let mut prompt = PromptSize {
        bytes: TOKENS_PER_REQUEST.saturating_add(len(body.len())),
        images: 0,
        files: 0,
        prompts: 1,
    };
    for m in messages {
        prompt.bytes = prompt.bytes.saturating_add(TOKENS_PER_MESSAGE);
        if m.audio.is_some_and(|a| a.get() != "null") {
            return Err(bad_messages(
                "a message's `audio` (a previous audio answer) is not accepted: audio is priced apart from text tokens",
            ));
        }
        content_parts(m.content, &mut prompt)?;
    }
    let mct = positive_raw(raw.max_completion_tokens, "max_completion_tokens")?;
    let mt = positive_raw(raw.max_tokens, "max_tokens")?;
    let limits: Vec<(&'static str, i64)> = [("max_completion_tokens", mct), ("max_tokens", mt)]
        .into_iter()
        .filter_map(|(f, v)| Some((f, v?)))
        .collect();
    let choices = match positive(&raw.n, "n")? {
        None => 1,
        Some(n) if n <= MAX_CHOICES => n,
        Some(_) => {
            return Err(ApiError::InvalidRequest {
                message: format!("`n` must be at most {MAX_CHOICES}"),
                param: Some("n"),
            })
        }
    };
    let stream = raw.stream.unwrap_or(false);
    let include_usage = include_usage(raw.stream_options)?;
    Ok(ChatRequest {
        model_in_body: !model.is_empty(),
        model,
        has_temperature: raw.temperature.is_some_and(|t| t.get() != "null"),
        stream,
        include_usage: stream && include_usage,
        max_tokens: mct.or(mt),
        limits,
        limit_field: "max_completion_tokens",
        prompt,
        prompt_tokens_bound: 0,
        choices,
        present: Present::default()
            .with("model", raw.model.is_some())
            .with("stream_options", raw.stream_options.is_some())
            .with("max_tokens", raw.max_tokens.is_some())
            .with("max_completion_tokens", raw.max_completion_tokens.is_some())
            .with("temperature", raw.temperature.is_some()),
        tools: raw.tools.is_some_and(|t| !t.is_empty()),
    })
}

/// Checks one message's content against the content policy and counts its images and
/// files: text and refusals; images (`image_url`); files given inline (`file_data`). A
/// file stored at the provider (`file_id`) is refused — it could be anyone's upload to
/// the operator's account, of any size — and so is audio, priced apart from text.
fn content_parts(content: Option<&RawValue>, prompt: &mut PromptSize) -> Result<(), ApiError> {
    let Some(c) = content else { return Ok(()) };
    match c.get().as_bytes().first() {
        Some(b'"') | Some(b'n') => return Ok(()),
        Some(b'[') => {}
        _ => {
            return Err(bad_messages(
                "a message's `content` must be a string or an array of content parts",
            ))
        }
    }
    let parts: Vec<RawPart<'_>> = serde_json::from_str(c.get())
        .map_err(|e| bad_messages(format!("a message's content parts could not be read ({e})")))?;
    for p in &parts {
        match p.kind.as_deref() {
            Some("text" | "refusal") => {}
            Some("image_url") => {
                // The image's own bytes (a data URL, often) are not prompt text.
                let raw = p.image_url.map_or(0, |r| r.get().len());
                prompt.bytes = prompt.bytes.saturating_sub(len(raw));
                prompt.images = prompt.images.saturating_add(1);
            }
            Some("file") => {
                if p
                    .file
                    .as_ref()
                    .and_then(|f| f.file_id)
                    .is_some_and(|id| id.get() != "null")
                {
                    return Err(bad_messages(
                        "files stored at the provider (`file_id`) are not accepted; send the file inline as `file_data`",
                    ));
                }
                prompt.files = prompt.files.saturating_add(1);
            }
            Some("input_audio") => {
                return Err(bad_messages(
                    "audio input (`input_audio`) is not accepted: audio is priced apart from text tokens",
                ))
            }
            Some(other) => {
                return Err(bad_messages(format!(
                    "content parts of type `{other}` are not supported"
                )))
            }
            None => return Err(bad_messages("every content part needs a `type`")),
        }
    }
    Ok(())
}

/// Edits of the upstream body.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Edits {
    /// The output limit the provider must read: the held one. Every limit field the
    /// body sets gets it; a body that sets none gets [`ChatRequest::limit_field`].
    pub limit: Option<i64>,
    /// Set `temperature` (a preference; only when the body sets none).
    pub temperature: Option<f64>,
}

/// The body sent upstream to an OpenAI-format provider: the client's, with the
/// gateway's edits — the usage chunk asked for on streams, the held output limit in
/// every limit field, a preferred temperature, and the provider's model name. `None`:
/// the body goes as it came.
///
/// Keys are added by splicing them in front when the body has none of them (even as
/// `null`; keys compared decoded), so the common case copies the body once; otherwise
/// the top level is [rebuilt](crate::body::rebuild) with each value's bytes kept.
pub fn upstream_body(
    body: &[u8],
    req: &ChatRequest,
    upstream_model: &str,
    edits: Edits,
) -> Result<Option<Vec<u8>>, ApiError> {
    let temperature = edits
        .temperature
        .filter(|_| !req.has_temperature)
        .and_then(serde_json::Number::from_f64);
    let want_usage = req.stream && !req.include_usage;
    let set_model = !req.model_in_body || upstream_model != req.model;
    let limit = edits
        .limit
        .filter(|m| req.limits.is_empty() || req.limits.iter().any(|(_, v)| v != m));
    if !want_usage && !set_model && limit.is_none() && temperature.is_none() {
        return Ok(None);
    }
    let has = |k: &str| req.present.contains(k);
    let splice = !(want_usage && has("stream_options"))
        && !(limit.is_some() && (has("max_tokens") || has("max_completion_tokens")))
        && !(temperature.is_some() && has("temperature"))
        && !(set_model && has("model"));
    let model_json = serde_json::to_vec(upstream_model).map_err(ApiError::internal)?;
    if splice {
        let start = body.iter().position(|b| !b.is_ascii_whitespace());
        if let Some(i) = start.filter(|i| body[*i] == b'{') {
            let rest = &body[i + 1..];
            // An empty object `{}` would leave a trailing comma: rebuild it instead.
            if rest.iter().any(|b| !b.is_ascii_whitespace() && *b != b'}') {
                let mut out = Vec::with_capacity(body.len() + 96);
                out.push(b'{');
                if want_usage {
                    out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
                }
                if let Some(m) = limit {
                    out.extend_from_slice(format!("\"{}\":{m},", req.limit_field).as_bytes());
                }
                if let Some(t) = &temperature {
                    out.extend_from_slice(format!("\"temperature\":{t},").as_bytes());
                }
                if set_model {
                    out.extend_from_slice(b"\"model\":");
                    out.extend_from_slice(&model_json);
                    out.push(b',');
                }
                out.extend_from_slice(rest);
                return Ok(Some(out));
            }
        }
    }
    let mut set: Vec<(&str, Vec<u8>)> = Vec::new();
    if want_usage {
        // The client's other options pass on as written (raw text: a `Value` would
        // give up on deep nesting and drop them); include_usage is set once.
        let mut v = b"{".to_vec();
        if has("stream_options") {
            let entries = body::entries(body)?;
            let so = entries.iter().rev().find(|(k, _)| k == "stream_options");
            // `null` reads as absent; any other value was checked to be an object.
            if let Some((_, so)) = so.filter(|(_, so)| so.get() != "null") {
                for (k, o) in body::entries(so.get().as_bytes())? {
                    if k != "include_usage" {
                        v.extend_from_slice(&serde_json::to_vec(&k).map_err(ApiError::internal)?);
                        v.push(b':');
                        v.extend_from_slice(o.get().as_bytes());
                        v.push(b',');
                    }
                }
            }
        }
        v.extend_from_slice(br#""include_usage":true}"#);
        set.push(("stream_options", v));
    }
    if let Some(m) = limit {
        let v = m.to_string().into_bytes();
        if req.limits.is_empty() {
            set.push((req.limit_field, v));
        } else {
            for (f, _) in &req.limits {
                set.push((f, v.clone()));
            }
        }
    }
    if let Some(t) = temperature {
        set.push(("temperature", t.to_string().into_bytes()));
    }
    if set_model {
        set.push(("model", model_json));
    }
    body::rebuild(body, &set).map(Some)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model() -> Model {
        Model {
            id: "gpt-5".into(),
            name: "gpt-5-upstream".into(),
            display_name: String::new(),
            provider: "openai".into(),
            capabilities: vec![],
            context_length: 400_000,
            max_output_tokens: Some(128_000),
            credits_per_1k_tokens: 2,
            rates: crate::usage::Rates::flat(2),
            provider_costs: crate::usage::ProviderCosts::default(),
            image_tokens: Some(1_500),
            is_available: true,
            is_deprecated: false,
            created: 0,
        }
    }

    fn limit(m: i64) -> Edits {
        Edits {
            limit: Some(m),
            temperature: None,
        }
    }

    /// The body sent, as a provider reads it: the last of duplicate keys wins, at any
    /// depth the gateway passes through.
    fn sent(body: &[u8], r: &ChatRequest, upstream: &str, e: Edits) -> serde_json::Value {
        use serde::Deserialize;
        let out = upstream_body(body, r, upstream, e).unwrap();
        let mut de = serde_json::Deserializer::from_slice(out.as_deref().unwrap_or(body));
        de.disable_recursion_limit();
        serde_json::Value::deserialize(&mut de).unwrap()
    }

    #[test]
    fn reads_what_the_gateway_needs() {
        let b = br#"{"model":"gpt-5","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hello"}]}"#;
        let mut r = parse_chat(b).unwrap();
        assert_eq!(r.model, "gpt-5");
        assert!(r.stream && !r.include_usage && !r.present.contains("stream_options"));
        assert_eq!(r.max_tokens, Some(100));
        assert_eq!(r.limits, [("max_tokens", 100)]);
        r.size_for(&model(), 0);
        assert_eq!(
            r.prompt_tokens_bound,
            TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE + b.len() as i64
        );
    }

    #[test]
    fn images_count_at_the_models_allowance_files_at_the_context_length() {
        let b = br#"{"model":"m","max_tokens":5,"max_completion_tokens":7,"messages":[{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"data:..."}}]}]}"#;
        let mut r = parse_chat(b).unwrap();
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.limits, [("max_completion_tokens", 7), ("max_tokens", 5)]);
        let image = r#"{"url":"data:..."}"#.len() as i64;
        let bytes = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE + b.len() as i64 - image;
        let mut m = model();
        r.size_for(&m, 0);
        assert_eq!(r.prompt_tokens_bound, bytes + 1_500);
        // No allowance of its own: the configured default, else the context length.
        m.image_tokens = None;
        r.size_for(&m, 3_000);
        assert_eq!(r.prompt_tokens_bound, bytes + 3_000);
        r.size_for(&m, 0);
        assert_eq!(r.prompt_tokens_bound, 400_000);
        let pdf = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"filename":"a.pdf","file_data":"data:application/pdf;base64,AAAA"}}]}]}"#;
        let mut r = parse_chat(pdf).unwrap();
        r.size_for(&model(), 0);
        assert_eq!(
            r.prompt_tokens_bound, 400_000,
            "a PDF's pages: up to the context"
        );
    }

    /// The typed parse reads exactly the allow-list (which `body::check` names faults
    /// with): every allowed or refused parameter is known to it, nothing else is.
    #[test]
    fn the_typed_parses_know_exactly_their_allow_lists() {
        use crate::endpoints::{
            parse_completion, parse_embeddings, COMPLETION_PARAMS, EMBEDDING_PARAMS,
        };
        let unknown = |e: &ApiError| matches!(e, ApiError::InvalidRequest { message, .. } if message.contains("unknown field") || message.contains("Unrecognized"));
        type Parse = fn(&[u8]) -> Result<(), ApiError>;
        let cases: [(&Params, &str, Parse); 3] = [
            (
                &CHAT_PARAMS,
                r#""model":"m","messages":[{"role":"user","content":"x"}]"#,
                |b| parse_chat_lenient(b).map(|_| ()),
            ),
            (&COMPLETION_PARAMS, r#""model":"m","prompt":"x""#, |b| {
                parse_completion(b).map(|_| ())
            }),
            (&EMBEDDING_PARAMS, r#""model":"m","input":"x""#, |b| {
                parse_embeddings(b).map(|_| ())
            }),
        ];
        for (params, base, parse) in cases {
            let names = params
                .allowed
                .iter()
                .chain(params.refused.iter().map(|(n, _)| n));
            for name in names {
                let body = format!("{{{base},\"{name}\":null}}");
                let body = if base.contains(&format!("\"{name}\"")) {
                    format!("{{{base}}}")
                } else {
                    body
                };
                if let Err(e) = parse(body.as_bytes()) {
                    assert!(!unknown(&e), "{name} is on the list but not read: {e:?}");
                }
            }
            let e = parse(format!("{{{base},\"frobnicate\":1}}").as_bytes()).unwrap_err();
            assert!(unknown(&e), "{e:?}");
        }
    }

    #[test]
    fn the_prompt_estimate_is_a_token_per_four_bytes_never_above_the_bound() {
        let mut r =
            parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        r.prompt = PromptSize {
            bytes: 4_000,
            images: 0,
            files: 0,
            prompts: 1,
        };
        let mut m = model();
        m.context_length = 2_048;
        r.size_for(&m, 0);
        assert_eq!((r.prompt_tokens_bound, r.prompt_estimate()), (2_048, 1_000));
        m.context_length = 900;
        r.size_for(&m, 0);
        assert_eq!(r.prompt_estimate(), 900);
        r.prompt = PromptSize {
            bytes: 100,
            images: 1,
            files: 0,
            prompts: 1,
        };
        r.size_for(&model(), 0);
        assert_eq!(r.prompt_estimate(), 25 + 1_500);
    }

    #[test]
    fn bad_inputs_get_clear_errors_naming_the_parameter() {
        let msg = r#""messages":[{"role":"user","content":"x"}]"#;
        for (body, param) in [
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":"x"}"#.to_owned(), None),
            (format!("{{{msg}}}"), Some("model")),
            (r#"{"model":"gpt-5"}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[]}"#.into(), Some("messages")),
            (format!(r#"{{"model":"gpt-5","max_tokens":-1,{msg}}}"#), Some("max_tokens")),
            (format!(r#"{{"model":"gpt-5","max_tokens":"9",{msg}}}"#), Some("max_tokens")),
            (format!(r#"{{"model":"gpt-5","max_tokens":1e3,{msg}}}"#), Some("max_tokens")),
            ("[1,2]".into(), None),
            (format!(r#"{{"model":"gpt-5","n":0,{msg}}}"#), Some("n")),
            (format!(r#"{{"model":"gpt-5","n":500,{msg}}}"#), Some("n")),
            (format!(r#"{{"model":"gpt-5","max_tokens":5,"max_\u0074okens":null,{msg}}}"#), Some("max_tokens")),
            (format!(r#"{{"model":"gpt-5","audio":{{"voice":"alloy","format":"wav"}},{msg}}}"#), Some("audio")),
            (format!(r#"{{"model":"gpt-5","modalities":["text","audio"],{msg}}}"#), Some("modalities")),
            (format!(r#"{{"model":"gpt-5","prediction":{{"type":"content","content":"x"}},{msg}}}"#), Some("prediction")),
            (format!(r#"{{"model":"gpt-5","service_tier":"priority",{msg}}}"#), Some("service_tier")),
            (format!(r#"{{"model":"gpt-5","web_search_options":{{}},{msg}}}"#), Some("web_search_options")),
            (format!(r#"{{"model":"gpt-5","tools":[{{"type":"web_search"}}],{msg}}}"#), Some("tools")),
            (format!(r#"{{"model":"gpt-5","frobnicate":1,{msg}}}"#), None),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{"data":"AA","format":"wav"}}]}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-abc"}}]}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"video","video":{}}]}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"text":"x"}]}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":7}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"assistant","audio":{"id":"audio_1"}}]}"#.into(), Some("messages")),
            // What a case-insensitive parser (Go's) would read as another field.
            (r#"{"model":"gpt-5","messages":[{"role":"user","CONTENT":[{"type":"file","file":{"file_id":"file-x"}}]}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":"hi","CONTENT":"x"}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"file","file":{"file_data":"AA","FILE_ID":"file-x"}}]}]}"#.into(), Some("messages")),
            (r#"{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"text","Type":"image_url","text":"x"}]}]}"#.into(), Some("messages")),
            (format!(r#"{{"model":"gpt-5","stream":true,"stream_options":{{"INCLUDE_USAGE":false}},{msg}}}"#), Some("stream_options")),
            (format!("{{\"model\":\"gpt-5\",\"stream\":true,\"stream_options\":{{\"include_usage\":true,\"include_u{}age\":false}},{msg}}}", '\u{17f}'), Some("stream_options")),
        ] {
            let e = parse_chat(body.as_bytes()).unwrap_err();
            assert_eq!(e.status_code(), http::StatusCode::BAD_REQUEST, "{body}");
            let ApiError::InvalidRequest { message, param: p } = e else {
                panic!("{body}")
            };
            assert_eq!(p, param, "{body}: {message}");
            assert!(!message.is_empty());
        }
        // Refused parameters set to null are absent for every parser: accepted.
        parse_chat(
            format!(r#"{{"model":"gpt-5","audio":null,"service_tier":"auto",{msg}}}"#).as_bytes(),
        )
        .unwrap();
    }

    /// Found by the `chat` fuzz target: a derived struct also reads an array, so
    /// `"stream_options":[true]` read as "the client asked for usage" and went upstream
    /// as it came, an array the provider does not read as asking for the usage chunk.
    #[test]
    fn stream_options_must_be_an_object() {
        let msg = r#""messages":[{"role":"user","content":"hi"}]"#;
        for so in [
            "[true]",
            "[]",
            "true",
            "\"x\"",
            "1",
            r#"{"include_usage":"yes"}"#,
        ] {
            let chat = format!(r#"{{"model":"gpt-5","stream":true,"stream_options":{so},{msg}}}"#);
            let completion =
                format!(r#"{{"model":"m","prompt":"x","stream":true,"stream_options":{so}}}"#);
            for r in [
                parse_chat(chat.as_bytes()),
                crate::endpoints::parse_completion(completion.as_bytes()),
            ] {
                match r {
                    Err(ApiError::InvalidRequest { param, .. }) => {
                        assert_eq!(param, Some("stream_options"), "{so}")
                    }
                    other => panic!("{so}: {other:?}"),
                }
            }
        }
        for (so, usage) in [
            ("null", false),
            ("{}", false),
            (r#"{"include_usage":true}"#, true),
        ] {
            let chat = format!(r#"{{"model":"gpt-5","stream":true,"stream_options":{so},{msg}}}"#);
            assert_eq!(
                parse_chat(chat.as_bytes()).unwrap().include_usage,
                usage,
                "{so}"
            );
        }
    }

    #[test]
    fn splices_include_usage_and_the_limit_without_reserialising() {
        let b = br#"{"model":"gpt-5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b).unwrap();
        let out = upstream_body(b, &r, "gpt-5", limit(50)).unwrap().unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(
            s.starts_with(
                r#"{"stream_options":{"include_usage":true},"max_completion_tokens":50,"model""#
            ),
            "{s}"
        );
    }

    #[test]
    fn present_keys_are_rewritten_in_place_never_duplicated() {
        let b = br#"{"model":"gpt-5","stream":true,"stream_options":{"include_usage":false,"include_obfuscation":false},"max_tokens":900,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b).unwrap();
        let out = upstream_body(b, &r, "gpt-5-upstream", limit(300))
            .unwrap()
            .unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            s,
            r#"{"model":"gpt-5-upstream","stream":true,"stream_options":{"include_obfuscation":false,"include_usage":true},"max_tokens":300,"messages":[{"role":"user","content":"hi"}]}"#
        );
        // Escaped and null spellings of the keys the gateway sets.
        let b = br#"{"model":"gpt-5","stream":true,"stream_\u006fptions":null,"max_completion_\u0074okens":null,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b).unwrap();
        let out = upstream_body(b, &r, "gpt-5", limit(300)).unwrap().unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(s.matches("stream_options").count(), 1, "{s}");
        assert_eq!(s.matches("max_completion_tokens").count(), 1, "{s}");
        assert!(!s.contains("\\u"), "{s}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["max_completion_tokens"], 300);
    }

    #[test]
    fn both_limit_fields_carry_the_held_limit() {
        let b = br#"{"model":"gpt-5","max_completion_tokens":50,"max_tokens":100000,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b).unwrap();
        assert_eq!(r.max_tokens, Some(50));
        let v = sent(b, &r, "gpt-5", limit(50));
        assert_eq!(
            (
                v["max_completion_tokens"].as_i64(),
                v["max_tokens"].as_i64()
            ),
            (Some(50), Some(50))
        );
        // The client's own limit, held as asked: nothing to edit.
        let b = br#"{"model":"gpt-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b).unwrap();
        assert!(upstream_body(b, &r, "gpt-5", limit(50)).unwrap().is_none());
    }

    #[test]
    fn files_and_schemas_count_by_their_bytes() {
        let body = serde_json::to_vec(&serde_json::json!({
            "model": "gpt-5",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"description": "d".repeat(5000)}}},
            "messages": [{"role": "user", "content": "A".repeat(30_000)}]
        }))
        .unwrap();
        let mut r = parse_chat(&body).unwrap();
        r.size_for(&model(), 0);
        assert!(r.prompt_tokens_bound >= 35_000, "{}", r.prompt_tokens_bound);
    }

    #[test]
    fn preference_edits_are_spliced_when_the_keys_are_absent() {
        let b = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat_lenient(b).unwrap();
        assert!(r.model.is_empty() && !r.model_in_body && !r.has_temperature);
        assert!(parse_chat(b).is_err(), "strict parse still wants a model");
        let mut r = r;
        r.model = "gpt-5".into();
        let edits = Edits {
            limit: Some(77),
            temperature: Some(0.25),
        };
        let out = upstream_body(b, &r, "gpt-5-2025", edits).unwrap().unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(
            s.starts_with(
                r#"{"max_completion_tokens":77,"temperature":0.25,"model":"gpt-5-2025","messages""#
            ),
            "{s}"
        );
    }

    #[test]
    fn a_temperature_in_the_body_wins_and_null_keys_are_rewritten() {
        let b = br#"{"model":"gpt-5","temperature":1,"max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b).unwrap();
        assert!(r.has_temperature);
        let edits = Edits {
            limit: Some(9),
            temperature: Some(0.25),
        };
        assert!(upstream_body(b, &r, "gpt-5", edits).unwrap().is_none());
        let b = br#"{"model":null,"temperature":null,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut r = parse_chat_lenient(b).unwrap();
        assert!(!r.has_temperature && !r.model_in_body);
        r.model = "gpt-5".into();
        let v = sent(b, &r, "gpt-5", edits);
        assert_eq!(
            (v["model"].as_str(), v["temperature"].as_f64()),
            (Some("gpt-5"), Some(0.25))
        );
    }

    /// One spelling of a key: plain, or with some characters as `\u` escapes.
    fn spell(key: &'static str) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<bool>(), key.len()).prop_map(move |esc| {
            key.chars()
                .zip(esc)
                .map(|(c, e)| {
                    if e {
                        format!("\\u{:04x}", c as u32)
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        })
    }

    /// A value for `key`: mostly valid, sometimes `null`, now and then of a wrong type.
    fn value_for(key: &'static str) -> BoxedStrategy<String> {
        let s = |v: &str| Just(v.to_owned());
        let int = prop_oneof![
            12 => (1i64..2_000_000).prop_map(|n| n.to_string()),
            3 => s("null"),
            1 => s("0"),
            1 => s("-4"),
            1 => s("1.5"),
            1 => s("\"64\""),
        ];
        match key {
            "model" => prop_oneof![
                6 => s("\"gpt-5\""),
                3 => s("\"gpt\\u002d5\""),
                1 => s("null"),
                1 => s("\"other\""),
            ]
            .boxed(),
            "stream" => prop_oneof![
                4 => s("true"),
                2 => s("false"),
                2 => s("null"),
                1 => s("\"true\""),
            ]
            .boxed(),
            "stream_options" => (
                spell("include_usage"),
                spell("include_usage"),
                any::<bool>(),
                0u8..5,
            )
                .prop_map(|(a, b, v, shape)| match shape {
                    0 => "null".to_owned(),
                    1 | 4 => format!("{{\"{a}\":{v}}}"),
                    2 => format!("{{\"{a}\":{v},\"{b}\":{}}}", !v),
                    _ => format!("{{\"{a}\":null}}"),
                })
                .boxed(),
            "n" => prop_oneof![
                6 => (1i64..5).prop_map(|n| n.to_string()),
                2 => s("null"),
                1 => s("200"),
            ]
            .boxed(),
            "messages" => (0usize..200, any::<bool>())
                .prop_map(|(depth, image)| {
                    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                    let part = if image {
                        r#"{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}"#
                    } else {
                        r#"{"type":"text","text":"hello"}"#
                    };
                    format!(
                        r#"[{{"role":"user","content":[{part}],"name":"x","tool_calls":{deep}}}]"#
                    )
                })
                .boxed(),
            "temperature" => prop_oneof![s("0.5"), s("null")].boxed(),
            _ => int.boxed(),
        }
    }

    const KEYS: &[&str] = &[
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "temperature",
        "messages",
    ];

    /// A key of [`KEYS`] in some spelling, with a value.
    fn entry(k: &'static str) -> impl Strategy<Value = String> {
        (spell(k), value_for(k)).prop_map(|(s, v)| format!("\"{s}\":{v}"))
    }

    /// A body made of entries for some of [`KEYS`] (`model` and `messages` usually),
    /// sometimes one key twice, in any order, with JSON whitespace around the tokens —
    /// now and then a BOM or a non-JSON space.
    fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
        let picks = KEYS
            .iter()
            .map(|k| {
                let p = if matches!(*k, "model" | "messages") {
                    0.95
                } else {
                    0.5
                };
                proptest::option::weighted(p, entry(k))
            })
            .collect::<Vec<_>>();
        let ws = prop_oneof![
            20 => proptest::sample::select(&["", " ", "\t", "\n", "\r\n", "  "][..]),
            1 => proptest::sample::select(&["\u{a0}", "\u{feff}", "\u{2028}"][..]),
        ];
        let dup =
            proptest::option::weighted(0.3, proptest::sample::select(KEYS).prop_flat_map(entry));
        (
            picks,
            dup,
            proptest::collection::vec(ws, 16),
            proptest::bool::weighted(0.05),
        )
            .prop_flat_map(|(picks, dup, ws, bom)| {
                let mut entries: Vec<String> = picks.into_iter().flatten().chain(dup).collect();
                for (e, w) in entries.iter_mut().zip(ws.iter().cycle()) {
                    *e = format!("{w}{e}{w}");
                }
                (Just(entries).prop_shuffle(), Just(bom), Just(ws[0]))
            })
            .prop_map(|(entries, bom, lead)| {
                let mut s = String::new();
                if bom {
                    s.push('\u{feff}');
                }
                s.push_str(lead);
                s.push('{');
                s.push_str(&entries.join(","));
                s.push('}');
                s.into_bytes()
            })
    }

    /// The generator is not vacuous: a good share of its bodies are accepted, and some
    /// are refused for each kind of hostility.
    #[test]
    fn hostile_bodies_are_often_accepted_and_sometimes_refused() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut ok, mut dup, mut other) = (0, 0, 0);
        for _ in 0..2000 {
            let body = hostile_body().new_tree(&mut runner).unwrap().current();
            match parse_chat(&body) {
                Ok(_) => ok += 1,
                Err(ApiError::InvalidRequest { message, .. })
                    if message.contains("more than once") =>
                {
                    dup += 1
                }
                Err(_) => other += 1,
            }
        }
        assert!(ok >= 300, "accepted {ok}, duplicates {dup}, other {other}");
        assert!(
            dup >= 100 && other >= 100,
            "accepted {ok}, duplicates {dup}, other {other}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Whatever the spelling of a body, if the gateway accepts it, the provider
        /// (a last-wins parser that decodes escapes) reads: the routed model, the
        /// gateway's `stream`, `n` and a limit no higher than the held one, and on a
        /// stream the usage chunk asked for — so the hold covers what it may produce.
        #[test]
        fn the_provider_reads_what_the_hold_covers(body in hostile_body(), frac in 0.0f64..1.0) {
            let Ok(mut r) = parse_chat(&body) else { return Ok(()) };
            let m = model();
            if r.model != m.id { return Ok(()) }
            r.size_for(&m, 0);
            let want = r.max_tokens.map_or(m.output_cap(), |x| x.min(m.output_cap()));
            // The reserve may lower the limit to anything down to 1.
            let held = ((want as f64 * frac) as i64).clamp(1, want);
            let v = sent(&body, &r, &m.name, limit(held));
            prop_assert_eq!(v["model"].as_str(), Some("gpt-5-upstream"));
            let stream = v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
            prop_assert_eq!(stream, r.stream);
            let n = v.get("n").and_then(|n| n.as_i64()).unwrap_or(1);
            prop_assert_eq!(n, r.choices);
            let limits: Vec<i64> = ["max_tokens", "max_completion_tokens"]
                .iter()
                .filter_map(|f| v.get(*f).filter(|x| !x.is_null()))
                .map(|x| x.as_i64().unwrap())
                .collect();
            prop_assert!(!limits.is_empty(), "no limit upstream");
            prop_assert!(limits.iter().all(|l| *l <= held), "{:?} > {}", limits, held);
            if stream {
                prop_assert_eq!(v["stream_options"]["include_usage"].as_bool(), Some(true));
            }
            // The translated providers get the held limit in their own field.
            for (provider, field) in [("anthropic", "/max_tokens"), ("google", "/generationConfig/maxOutputTokens")] {
                let kind = crate::translate::for_name(provider);
                let mut mm = m.clone();
                mm.provider = provider.into();
                if let Ok(mut t) = crate::translate::request(kind.translation().unwrap(), &body, &mm) {
                    t.set_max_tokens(held);
                    let tv: serde_json::Value = serde_json::from_slice(&t.to_bytes().unwrap()).unwrap();
                    let out = tv.pointer(field).and_then(serde_json::Value::as_i64);
                    prop_assert_eq!(out, Some(held));
                }
            }
        }

        /// The bound never undercounts: it is at least the bytes of every text.
        #[test]
        fn bound_covers_all_text(texts in proptest::collection::vec(".{0,40}", 1..6)) {
            let msgs: Vec<_> = texts.iter().map(|t| serde_json::json!({"role":"user","content":t})).collect();
            let body = serde_json::to_vec(&serde_json::json!({"model":"m","messages":msgs})).unwrap();
            let mut r = parse_chat(&body).unwrap();
            r.size_for(&model(), 0);
            let bytes: usize = texts.iter().map(|t| t.len()).sum();
            prop_assert!(r.prompt_tokens_bound >= bytes as i64);
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_chat(&body);
        }
    }
}
