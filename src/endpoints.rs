//! `POST /v1/completions` and `POST /v1/embeddings`: the same metered path as chat
//! (reserve → forward → settle), for the providers that offer these endpoints:
//! OpenAI both (passed through), Gemini embeddings (translated to
//! `batchEmbedContents`); anything else is a 400 naming the model.

use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::{Extension, Json};
use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::authenticate::Principal;
use crate::body::{self, Params, Present};
use crate::body::{parse_off_thread, read_body};
use crate::error::ApiError;
use crate::parse::{
    include_usage, len, missing_model, parse_chat_lenient, positive, positive_raw, upstream_body,
    ChatRequest, Edits, PromptSize, MAX_CHOICES, TOKENS_PER_REQUEST,
};
use crate::reserve::{admit, Admission};
use crate::route::Model;
use crate::state::{AppState, RequestId};
use crate::translate::{self, Endpoint, Kind};

/// OpenAI's default `max_tokens` of a text completion.
const COMPLETION_DEFAULT_MAX_TOKENS: i64 = 16;

/// The most prompts (or embedding inputs) one request may carry (OpenAI's own limit).
pub const MAX_PROMPTS: i64 = 2048;

/// The text-completions parameters the gateway passes on.
pub const COMPLETION_PARAMS: Params = Params {
    allowed: &[
        "model",
        "prompt",
        "suffix",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "best_of",
        "stream",
        "stream_options",
        "logprobs",
        "echo",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "user",
    ],
    refused: &[],
};

/// The embeddings parameters the gateway passes on.
pub const EMBEDDING_PARAMS: Params = Params {
    allowed: &["model", "input", "encoding_format", "dimensions", "user"],
    refused: &[],
};

/// A text-completions body as the gateway reads it: every parameter of
/// [`COMPLETION_PARAMS`], nothing else, none twice.
#[allow(dead_code)] // the pass-through parameters are read only so that they are accepted
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompletion<'a> {
    #[serde(default)]
    model: Option<String>,
    #[serde(default, borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(default)]
    suffix: Option<IgnoredAny>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    max_tokens: Option<&'a RawValue>,
    #[serde(default)]
    temperature: Option<IgnoredAny>,
    #[serde(default)]
    top_p: Option<IgnoredAny>,
    #[serde(default)]
    n: Option<serde_json::Value>,
    #[serde(default)]
    best_of: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow, deserialize_with = "body::present")]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    logprobs: Option<IgnoredAny>,
    #[serde(default)]
    echo: Option<IgnoredAny>,
    #[serde(default)]
    stop: Option<IgnoredAny>,
    #[serde(default)]
    presence_penalty: Option<IgnoredAny>,
    #[serde(default)]
    frequency_penalty: Option<IgnoredAny>,
    #[serde(default)]
    logit_bias: Option<IgnoredAny>,
    #[serde(default)]
    seed: Option<IgnoredAny>,
    #[serde(default)]
    user: Option<IgnoredAny>,
}

/// The parameters of a completions body whose values the gateway reads.
const COMPLETION_READERS: &[body::Reader] = &[
    ("model", |v| {
        serde_json::from_str::<Option<String>>(v).is_ok()
    }),
    ("stream", |v| {
        serde_json::from_str::<Option<bool>>(v).is_ok()
    }),
    ("stream_options", |v| {
        include_usage(serde_json::from_str(v).ok()).is_ok()
    }),
];

/// The parameters of an embeddings body whose values the gateway reads.
const EMBEDDING_READERS: &[body::Reader] = &[
    ("model", |v| {
        serde_json::from_str::<Option<String>>(v).is_ok()
    }),
    ("encoding_format", |v| {
        serde_json::from_str::<Option<String>>(v).is_ok()
    }),
];

fn model_of(m: Option<String>) -> Result<String, ApiError> {
    m.filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest {
            message: "you must provide a model parameter".into(),
            param: Some("model"),
        })
}

/// How many separate prompts (or inputs) a `prompt` / `input` value holds: a string or
/// an array of token ids is one; an array of strings or of token-id arrays is one per
/// element. Anything else is a 400 naming `param`.
fn prompt_count(v: &RawValue, param: &'static str) -> Result<i64, ApiError> {
    // The values are only matched for their shape.
    #[allow(dead_code)]
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item<'a> {
        Text(#[serde(borrow)] std::borrow::Cow<'a, str>),
        Token(u32),
        Tokens(Vec<u32>),
    }
    #[allow(dead_code)]
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Prompt<'a> {
        One(#[serde(borrow)] std::borrow::Cow<'a, str>),
        Many(#[serde(borrow)] Vec<Item<'a>>),
    }
    let shape = || {
        ApiError::InvalidRequest {
        message: format!(
            "`{param}` must be a string, an array of strings, an array of token ids or an array of token-id arrays"
        ),
        param: Some(param),
    }
    };
    let n = match serde_json::from_str::<Prompt<'_>>(v.get()).map_err(|_| shape())? {
        Prompt::One(_) => 1,
        Prompt::Many(items) if items.is_empty() => return Err(shape()),
        Prompt::Many(items) => {
            let tokens = items.iter().filter(|i| matches!(i, Item::Token(_))).count();
            if tokens == items.len() {
                1
            } else if tokens > 0
                || !(items.iter().all(|i| matches!(i, Item::Text(_)))
                    || items.iter().all(|i| matches!(i, Item::Tokens(_))))
            {
                return Err(shape());
            } else {
                len(items.len())
            }
        }
    };
    if n > MAX_PROMPTS {
        return Err(ApiError::InvalidRequest {
            message: format!("`{param}` may hold at most {MAX_PROMPTS} entries"),
            param: Some(param),
        });
    }
    Ok(n)
}

/// Parses a text-completions body into what the metered path needs. Every byte of the
/// body counts as a prompt token for the hold; every prompt of a prompt array runs
/// `max(n, best_of)` times, each up to `max_tokens`.
pub fn parse_completion(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let text = body::object_text(body)?;
    let raw: RawCompletion<'_> = serde_json::from_str(text)
        .map_err(|e| body::parse_error(body, &COMPLETION_PARAMS, COMPLETION_READERS, &e))?;
    let model = model_of(raw.model)?;
    let prompts = match raw.prompt.filter(|p| p.get() != "null") {
        Some(p) => prompt_count(p, "prompt")?,
        None => {
            return Err(ApiError::InvalidRequest {
                message: "`prompt` is required".into(),
                param: Some("prompt"),
            })
        }
    };
    let n = positive(&raw.n, "n")?.unwrap_or(1);
    let best_of = positive(&raw.best_of, "best_of")?.unwrap_or(1);
    if n.max(best_of) > MAX_CHOICES {
        return Err(ApiError::InvalidRequest {
            message: format!("`n` and `best_of` must be at most {MAX_CHOICES}"),
            param: Some(if n > best_of { "n" } else { "best_of" }),
        });
    }
    let stream = raw.stream.unwrap_or(false);
    let mt = positive_raw(raw.max_tokens, "max_tokens")?;
    let include_usage = include_usage(raw.stream_options)?;
    Ok(ChatRequest {
        model,
        stream,
        include_usage: stream && include_usage,
        // Absent means OpenAI's default of 16.
        max_tokens: Some(mt.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS)),
        limits: mt.map(|m| ("max_tokens", m)).into_iter().collect(),
        limit_field: "max_tokens",
        prompt: PromptSize {
            bytes: TOKENS_PER_REQUEST.saturating_add(len(body.len())),
            images: 0,
            files: 0,
            prompts,
        },
        prompt_tokens_bound: 0,
        choices: prompts.saturating_mul(n.max(best_of)),
        model_in_body: true,
        has_temperature: false,
        present: Present::default()
            .with("model", true)
            .with("max_tokens", raw.max_tokens.is_some())
            .with("stream_options", raw.stream_options.is_some()),
        tools: false,
    })
}

fn not_offered(model: &str, provider: &str, what: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("the model `{model}` (provider `{provider}`) does not offer {what}"),
        param: Some("model"),
    }
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(RequestId(rid)): Extension<RequestId>,
    req: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = read_body(req.into_body(), state.cfg.max_body_bytes).await?;
    let mut chat = parse_off_thread(&body, parse_completion).await?;
    let (model, kind) = route_sized(&state, &mut chat)?;
    // Only a provider that passes through may offer completions (none is translated).
    if !(kind.passes_through() && kind.offers(Endpoint::Completions)) {
        return Err(not_offered(
            &model.id,
            &model.provider,
            "text completions; use /v1/chat/completions",
        ));
    }
    let want = chat
        .max_tokens
        .map_or(model.output_cap(), |m| m.min(model.output_cap()));
    let admission = Admission {
        rid,
        started,
        kind,
        endpoint: Endpoint::Completions,
        operation: "completion",
        output_explicit: true,
    };
    let mut build = |m: i64| -> Result<Bytes, ApiError> {
        let edits = Edits {
            limit: Some(m),
            temperature: None,
        };
        passed_on(&body, &chat, &model, edits)
    };
    admit(
        &state,
        &principal,
        &model,
        &chat,
        want,
        admission,
        &mut build,
        chat.include_usage,
    )
    .await
}

/// An embeddings body as the gateway reads it: every parameter of
/// [`EMBEDDING_PARAMS`], nothing else, none twice.
#[allow(dead_code)] // `user` is read only so that it is accepted
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbeddings<'a> {
    #[serde(default)]
    model: Option<String>,
    #[serde(default, borrow)]
    input: Option<&'a RawValue>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<serde_json::Value>,
    #[serde(default)]
    user: Option<IgnoredAny>,
}

/// Parses an embeddings body: what the metered path needs, the input (for a translated
/// provider), whether the answer is wanted in base64, and `dimensions`.
pub fn parse_embeddings(
    body: &[u8],
) -> Result<(ChatRequest, &RawValue, bool, Option<i64>), ApiError> {
    let text = body::object_text(body)?;
    let raw: RawEmbeddings<'_> = serde_json::from_str(text)
        .map_err(|e| body::parse_error(body, &EMBEDDING_PARAMS, EMBEDDING_READERS, &e))?;
    let model = model_of(raw.model)?;
    let Some(input) = raw.input.filter(|i| i.get() != "null") else {
        return Err(ApiError::InvalidRequest {
            message: "`input` is required".into(),
            param: Some("input"),
        });
    };
    let inputs = prompt_count(input, "input")?;
    let base64 = match raw.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(ApiError::InvalidRequest {
                message: "`encoding_format` must be `float` or `base64`".into(),
                param: Some("encoding_format"),
            })
        }
    };
    let dimensions = positive(&raw.dimensions, "dimensions")?;
    let chat = ChatRequest {
        model,
        stream: false,
        include_usage: false,
        max_tokens: None,
        limits: Vec::new(),
        limit_field: "max_tokens",
        // Token arrays have at least one byte per token, texts at most one token a byte.
        prompt: PromptSize {
            bytes: TOKENS_PER_REQUEST.saturating_add(len(body.len())),
            images: 0,
            files: 0,
            prompts: inputs,
        },
        prompt_tokens_bound: 0,
        choices: 1,
        model_in_body: true,
        has_temperature: false,
        present: Present::default().with("model", true),
        tools: false,
    };
    Ok((chat, input, base64, dimensions))
}

pub async fn embeddings(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(RequestId(rid)): Extension<RequestId>,
    req: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = read_body(req.into_body(), state.cfg.max_body_bytes).await?;
    let (mut chat, input, base64, dimensions) = parse_off_thread(&body, |b| {
        parse_embeddings(b).map(|(c, i, b64, d)| (c, i.to_owned(), b64, d))
    })
    .await?;
    let (model, kind) = route_sized(&state, &mut chat)?;
    let endpoint = Endpoint::Embeddings { base64 };
    if !kind.offers(endpoint) {
        return Err(not_offered(&model.id, &model.provider, "embeddings"));
    }
    let translated = match kind.translation() {
        None => None,
        Some(t) => {
            let input: serde_json::Value =
                serde_json::from_str(input.get()).map_err(|e| body::json_error(&e))?;
            Some(t.embeddings_request(&input, &model, dimensions)?)
        }
    };
    let admission = Admission {
        rid,
        started,
        kind,
        endpoint,
        operation: "embedding",
        output_explicit: true,
    };
    let to_send = match translated {
        Some(v) => Bytes::from(serde_json::to_vec(&v).map_err(ApiError::internal)?),
        None => passed_on(&body, &chat, &model, Edits::default())?,
    };
    // Nothing to lower: an embedding holds for its input only.
    let mut same = |_: i64| Ok(to_send.clone());
    admit(
        &state, &principal, &model, &chat, 0, admission, &mut same, false,
    )
    .await
}

/// Stage 4 for a parsed request: its model and provider's format, with the prompt's
/// bound sized for them.
fn route_sized(
    state: &AppState,
    chat: &mut ChatRequest,
) -> Result<(std::sync::Arc<Model>, Kind), ApiError> {
    let model = state.models.route(&chat.model)?;
    let kind = state.upstream.provider(&model.provider)?.kind;
    if chat.tools {
        // The tool-use prompt a provider adds (Anthropic's), not in the body.
        chat.prompt.bytes = chat.prompt.bytes.saturating_add(kind.tool_prompt_tokens());
    }
    chat.size_for(&model, i64::from(state.cfg.metering.image_tokens));
    Ok((model, kind))
}

/// The body for an OpenAI-format provider: the client's, with `edits` (the client's
/// very bytes when they change nothing).
fn passed_on(
    body: &Bytes,
    chat: &ChatRequest,
    model: &Model,
    edits: Edits,
) -> Result<Bytes, ApiError> {
    Ok(upstream_body(body, chat, &model.name, edits)?.map_or_else(|| body.clone(), Bytes::from))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(RequestId(rid)): Extension<RequestId>,
    req: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = read_body(req.into_body(), state.cfg.max_body_bytes).await?;
    let mut chat = parse_off_thread(&body, parse_chat_lenient).await?;
    // The user's preferences fill in what the request leaves out (from memory).
    let prefs = if chat.model.is_empty() || chat.max_tokens.is_none() || !chat.has_temperature {
        state.preferences.get(&state, principal.user_id).await
    } else {
        None
    };
    if chat.model.is_empty() {
        chat.model = prefs
            .as_ref()
            .and_then(|p| p.default_model.clone())
            .ok_or_else(missing_model)?;
    }
    let pref_max_tokens = prefs
        .as_ref()
        .and_then(|p| p.max_tokens)
        .filter(|m| *m > 0 && chat.max_tokens.is_none());
    let temperature = prefs.as_ref().and_then(|p| p.temperature);
    let (model, kind) = route_sized(&state, &mut chat)?;
    // Translation runs before anything is held: what the provider cannot honour is a 400.
    let translated = match kind.translation() {
        None => None,
        Some(t) => {
            let m = model.clone();
            Some(parse_off_thread(&body, move |b| translate::request(t, b, &m)).await?)
        }
    };
    let want = chat
        .max_tokens
        .or(pref_max_tokens)
        .map_or(model.output_cap(), |m| m.min(model.output_cap()));
    let admission = Admission {
        rid,
        started,
        kind,
        endpoint: Endpoint::Chat,
        operation: "chat",
        output_explicit: chat.max_tokens.is_some() || pref_max_tokens.is_some(),
    };
    // The upstream body for `m` output tokens. The provider's limit is always what was
    // held for: whenever a limit field of the body is not exactly that (absent, above
    // the model's cap, or lowered to the balance), the body carries the held limit, so
    // the provider can never produce more than the hold covers.
    let mut translated = translated;
    let mut build = |m: i64| -> Result<Bytes, ApiError> {
        match translated.as_mut() {
            Some(t) => {
                t.set_max_tokens(m);
                if let Some(temp) = temperature {
                    t.default_temperature(temp);
                }
                t.to_bytes()
            }
            None => {
                let edits = Edits {
                    limit: Some(m),
                    temperature,
                };
                passed_on(&body, &chat, &model, edits)
            }
        }
    };
    admit(
        &state,
        &principal,
        &model,
        &chat,
        want,
        admission,
        &mut build,
        chat.include_usage,
    )
    .await
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .models
        .listed()
        .iter()
        .map(|m| m.to_openai())
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

pub async fn get_model(
    State(state): State<AppState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // A path that is not UTF-8 gets an OpenAI-shaped error too.
    let Path(id) = id.map_err(|e| ApiError::InvalidRequest {
        message: format!("invalid model id in the URL ({})", e.body_text()),
        param: Some("model"),
    })?;
    Ok(Json(state.models.route(&id)?.to_openai()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn completions_are_parsed_with_openai_defaults() {
        let b = br#"{"model":"gpt-5","prompt":"Say this is a test","stream":true,"stream_options":{"include_usage":true},"best_of":3}"#;
        let r = parse_completion(b).unwrap();
        assert_eq!(r.max_tokens, Some(16));
        assert!(r.limits.is_empty() && r.limit_field == "max_tokens");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.choices, 3);
        assert_eq!(r.prompt.bytes, 8 + b.len() as i64);
        for (body, param) in [
            (&br#"{"prompt":"x"}"#[..], Some("model")),
            (br#"{"model":"m"}"#, Some("prompt")),
            (br#"{"model":"m","prompt":null}"#, Some("prompt")),
            (
                br#"{"model":"m","prompt":"x","max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (br#"{"model":"m","prompt":"x","n":500}"#, Some("n")),
            (
                br#"{"model":"m","prompt":"x","best_of":129}"#,
                Some("best_of"),
            ),
            (br#"{"model":"m","prompt":[]}"#, Some("prompt")),
            (br#"{"model":"m","prompt":[1,"x"]}"#, Some("prompt")),
            (br#"{"model":"m","prompt":["x",[1]]}"#, Some("prompt")),
            (br#"{"model":"m","prompt":{"text":"x"}}"#, Some("prompt")),
            (
                br#"{"model":"m","prompt":"x","max_tokens":5,"max_\u0074okens":900}"#,
                Some("max_tokens"),
            ),
            (
                br#"{"model":"m","prompt":"x","max_completion_tokens":5}"#,
                None,
            ),
        ] {
            match parse_completion(body) {
                Err(ApiError::InvalidRequest { param: p, .. }) => {
                    assert_eq!(p, param, "{}", String::from_utf8_lossy(body))
                }
                other => panic!("{param:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_prompt_of_an_array_is_held_for_each_choice() {
        for (prompt, prompts) in [
            (r#""one""#, 1),
            (r#"[1, 2, 3]"#, 1),
            (r#"["a", "b", "c"]"#, 3),
            (r#"[[1, 2], [3], [4, 5, 6], [7]]"#, 4),
        ] {
            let b =
                format!(r#"{{"model":"m","prompt":{prompt},"n":2,"best_of":5,"max_tokens":10}}"#);
            let r = parse_completion(b.as_bytes()).unwrap();
            assert_eq!(r.prompt.prompts, prompts, "{prompt}");
            assert_eq!(r.choices, prompts * 5, "{prompt}");
            assert_eq!(r.limits, [("max_tokens", 10)]);
        }
        let many = format!(
            r#"{{"model":"m","prompt":[{}]}}"#,
            vec!["\"x\""; 2049].join(",")
        );
        assert!(parse_completion(many.as_bytes()).is_err());
    }

    #[test]
    fn embedding_inputs_are_counted_and_bounded_by_their_bytes() {
        for (input, n) in [
            (r#""text""#, 1),
            (r#"["a","b"]"#, 2),
            (r#"[100000, 100000, 100000]"#, 1),
            (r#"[[1,2],[3]]"#, 2),
        ] {
            let b = format!(r#"{{"model":"m","input":{input}}}"#);
            let (r, raw, base64, dims) = parse_embeddings(b.as_bytes()).unwrap();
            assert_eq!(r.prompt.prompts, n);
            assert_eq!(raw.get(), input);
            assert!(!base64 && dims.is_none());
            // Every token id and every text byte is at least one byte of the body.
            assert!(r.prompt.bytes >= b.len() as i64);
        }
        for (b, param) in [
            (r#"{"model":"m"}"#, Some("input")),
            (r#"{"model":"m","input":{"a":1}}"#, Some("input")),
            (
                r#"{"model":"m","input":"x","encoding_format":"hex"}"#,
                Some("encoding_format"),
            ),
            (r#"{"model":"m","input":"x","input":"y"}"#, Some("input")),
            (r#"{"model":"m","input":"x","n":2}"#, None),
        ] {
            match parse_embeddings(b.as_bytes()) {
                Err(ApiError::InvalidRequest { param: p, .. }) => assert_eq!(p, param, "{b}"),
                other => panic!("{b}: {other:?}"),
            }
        }
    }
}
