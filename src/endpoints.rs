//! `POST /v1/completions` and `POST /v1/embeddings`: the same metered path as chat
//! (reserve → forward → settle), for the providers that offer these endpoints:
//! OpenAI both (passed through), Gemini embeddings (translated to
//! `batchEmbedContents`); anything else is a 400 naming the model.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use serde::Deserialize;

use crate::authenticate::Principal;
use crate::error::ApiError;
use crate::parse::{rewrite_body, ChatRequest, MAX_CHOICES};
use crate::router::{admit_and_run, read_body, Admission, Api, RequestId};
use crate::state::AppState;
use crate::translate::{self, Kind};

/// OpenAI's default `max_tokens` of a text completion.
const COMPLETION_DEFAULT_MAX_TOKENS: i64 = 16;
const TOKENS_PER_REQUEST: i64 = 8;

#[derive(Deserialize)]
struct RawCompletion {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<RawStreamOptions>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    n: Option<serde_json::Value>,
    #[serde(default)]
    best_of: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn json_error(e: serde_json::Error) -> ApiError {
    if e.is_data() {
        ApiError::invalid(format!("invalid request: {e}"))
    } else {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request ({e})"
        ))
    }
}

fn positive(v: &Option<serde_json::Value>, param: &'static str) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => match x.as_i64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(ApiError::InvalidRequest {
                message: format!("`{param}` must be a positive integer"),
                param: Some(param),
            }),
        },
    }
}

fn model_of(m: Option<String>) -> Result<String, ApiError> {
    m.filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::InvalidRequest {
            message: "you must provide a model parameter".into(),
            param: Some("model"),
        })
}

fn len(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Parses a text-completions body into what the metered path needs. Every byte of
/// the body counts as a prompt token for the hold.
pub fn parse_completion(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let raw: RawCompletion = serde_json::from_slice(body).map_err(json_error)?;
    let model = model_of(raw.model)?;
    if raw.prompt.is_none() {
        return Err(ApiError::InvalidRequest {
            message: "`prompt` is required".into(),
            param: Some("prompt"),
        });
    }
    let n = positive(&raw.n, "n")?.unwrap_or(1);
    let best_of = positive(&raw.best_of, "best_of")?.unwrap_or(1);
    let choices = n.max(best_of);
    if choices > MAX_CHOICES {
        return Err(ApiError::InvalidRequest {
            message: format!("`n` and `best_of` must be at most {MAX_CHOICES}"),
            param: Some("n"),
        });
    }
    let stream = raw.stream.unwrap_or(false);
    // Always explicit, so a lowered limit rewrites `max_tokens` (the field of this API).
    let max_tokens =
        positive(&raw.max_tokens, "max_tokens")?.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS);
    Ok(ChatRequest {
        model,
        stream,
        has_stream_options: raw.stream_options.is_some(),
        include_usage: stream
            && raw
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        max_tokens: Some(max_tokens),
        max_tokens_field: Some("max_tokens"),
        prompt_tokens_bound: TOKENS_PER_REQUEST.saturating_add(len(body.len())),
        choices,
        model_in_body: true,
        has_temperature: false,
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
    let chat = parse_completion(&body)?;
    let model = state.models.route(&chat.model)?;
    let kind = state.upstream.provider(&model.provider)?.kind;
    if kind != Kind::OpenAi {
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
        endpoint: Api::Completions,
        operation: "completion",
        output_explicit: true,
    };
    let mut build = |m: i64| -> Result<Bytes, ApiError> {
        let lowered = (chat.max_tokens != Some(m)).then_some(m);
        Ok(rewrite_body(&body, &chat, &model.name, lowered)?
            .map_or_else(|| body.clone(), Bytes::from))
    };
    admit_and_run(
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

#[derive(Deserialize)]
struct RawEmbeddings {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<serde_json::Value>,
}

pub async fn embeddings(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(RequestId(rid)): Extension<RequestId>,
    req: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = read_body(req.into_body(), state.cfg.max_body_bytes).await?;
    let raw: RawEmbeddings = serde_json::from_slice(&body).map_err(json_error)?;
    let model_id = model_of(raw.model)?;
    let input = match raw.input {
        Some(serde_json::Value::Null) | None => {
            return Err(ApiError::InvalidRequest {
                message: "`input` is required".into(),
                param: Some("input"),
            })
        }
        Some(i) => i,
    };
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
    let model = state.models.route(&model_id)?;
    let kind = state.upstream.provider(&model.provider)?.kind;
    let chat = ChatRequest {
        model: model_id,
        stream: false,
        has_stream_options: false,
        include_usage: false,
        max_tokens: None,
        max_tokens_field: None,
        // Token arrays have at least one byte per token, texts at most one token a byte.
        prompt_tokens_bound: TOKENS_PER_REQUEST.saturating_add(len(body.len())),
        choices: 1,
        model_in_body: true,
        has_temperature: false,
    };
    let translated = match kind {
        Kind::OpenAi => None,
        Kind::Gemini => Some(translate::gemini::embed_request(
            &input, &model, dimensions,
        )?),
        Kind::Anthropic => {
            return Err(not_offered(&model.id, &model.provider, "embeddings"));
        }
    };
    let admission = Admission {
        rid,
        started,
        kind,
        endpoint: Api::Embeddings { base64 },
        operation: "embedding",
        output_explicit: true,
    };
    let upstream_body = match translated {
        Some(v) => Bytes::from(serde_json::to_vec(&v).map_err(ApiError::internal)?),
        None => {
            rewrite_body(&body, &chat, &model.name, None)?.map_or_else(|| body.clone(), Bytes::from)
        }
    };
    // Nothing to lower: an embedding holds for its input only.
    let mut same = |_: i64| Ok(upstream_body.clone());
    admit_and_run(
        &state, &principal, &model, &chat, 0, admission, &mut same, false,
    )
    .await
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
        assert_eq!(r.max_tokens_field, Some("max_tokens"));
        assert!(r.stream && r.include_usage);
        assert_eq!(r.choices, 3);
        assert_eq!(r.prompt_tokens_bound, 8 + b.len() as i64);
        for (body, param) in [
            (&br#"{"prompt":"x"}"#[..], "model"),
            (br#"{"model":"m"}"#, "prompt"),
            (
                br#"{"model":"m","prompt":"x","max_tokens":0}"#,
                "max_tokens",
            ),
            (br#"{"model":"m","prompt":"x","n":500}"#, "n"),
        ] {
            match parse_completion(body) {
                Err(ApiError::InvalidRequest { param: p, .. }) => assert_eq!(p, Some(param)),
                other => panic!("{param}: {other:?}"),
            }
        }
    }
}
