//! Stage 3, parse: read only what the gateway needs from a chat request — `model`,
//! `stream`, the token limits, `stream_options.include_usage` and an upper bound of the
//! prompt's tokens — and leave the body itself untouched for the provider.

use std::borrow::Cow;

use serde::Deserialize;

use crate::error::ApiError;

#[derive(Debug, Deserialize)]
struct RawChat<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
    #[serde(default)]
    stream_options: Option<RawStreamOptions>,
    #[serde(default)]
    n: Option<serde_json::Value>,
    #[serde(default)]
    temperature: Option<serde_json::Value>,
    #[serde(default, borrow)]
    messages: Option<Vec<RawMessage<'a>>>,
}

#[derive(Debug, Deserialize)]
struct RawStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct RawMessage<'a> {
    #[serde(default, borrow)]
    content: Option<&'a serde_json::value::RawValue>,
}

#[derive(Debug, Deserialize)]
struct RawPart<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    image_url: Option<&'a serde_json::value::RawValue>,
}

/// What the gateway knows about a chat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// The model the body names; filled from the user's preferences when it names none.
    pub model: String,
    /// The body names the model (else it is added upstream).
    pub model_in_body: bool,
    /// The body sets `temperature` (else the user's preference may add it).
    pub has_temperature: bool,
    pub stream: bool,
    /// `stream_options` was sent at all (then it must be rewritten, not added).
    pub has_stream_options: bool,
    /// The client asked for the usage chunk itself.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`, if the client set one.
    pub max_tokens: Option<i64>,
    /// Which field carried it.
    pub max_tokens_field: Option<&'static str>,
    /// An upper bound of the prompt's tokens (see [`parse_chat`]).
    pub prompt_tokens_bound: i64,
    /// How many choices the client asked for (`n`): each can use `max_tokens`.
    pub choices: i64,
}

/// The largest `n` accepted (OpenAI's own limit).
pub const MAX_CHOICES: i64 = 128;

/// Overhead per message (role and separator tokens) and per request (priming).
const TOKENS_PER_MESSAGE: i64 = 4;
const TOKENS_PER_REQUEST: i64 = 8;

fn token_limit(
    v: &Option<serde_json::Value>,
    field: &'static str,
) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(x) if x > 0 => Ok(Some(x)),
            _ => Err(ApiError::InvalidRequest {
                message: format!("`{field}` must be a positive integer"),
                param: Some(field),
            }),
        },
        Some(_) => Err(ApiError::InvalidRequest {
            message: format!("`{field}` must be a positive integer"),
            param: Some(field),
        }),
    }
}

/// The error of a request that names no model (and has no default model).
pub fn missing_model() -> ApiError {
    ApiError::InvalidRequest {
        message: "you must provide a model parameter".into(),
        param: Some("model"),
    }
}

/// Parses a chat-completions body; a missing model is an error (see
/// [`parse_chat_lenient`]).
pub fn parse_chat(body: &[u8], image_tokens: i64) -> Result<ChatRequest, ApiError> {
    let r = parse_chat_lenient(body, image_tokens)?;
    if r.model.is_empty() {
        return Err(missing_model());
    }
    Ok(r)
}

/// Parses a chat-completions body. The prompt bound counts every byte of text as a
/// token (byte-level BPE tokenizers never produce more tokens than bytes), plus a fixed
/// overhead per message and `image_tokens` per image part; it is an upper bound, used
/// only to size the hold.
///
/// A body that names no model parses with an empty `model` (a default may apply).
pub fn parse_chat_lenient(body: &[u8], image_tokens: i64) -> Result<ChatRequest, ApiError> {
    let raw: RawChat<'_> = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::invalid(format!("invalid chat request: {e}"))
        } else {
            ApiError::invalid(format!(
                "We could not parse the JSON body of your request ({e})"
            ))
        }
    })?;
    let model = match raw.model {
        Some(m) if !m.is_empty() => m.into_owned(),
        Some(_) => return Err(missing_model()),
        None => String::new(),
    };
    let messages = raw.messages.ok_or(ApiError::InvalidRequest {
        message: "`messages` is required".into(),
        param: Some("messages"),
    })?;
    if messages.is_empty() {
        return Err(ApiError::InvalidRequest {
            message: "`messages` must contain at least one message".into(),
            param: Some("messages"),
        });
    }
    // Every byte of the body (texts, tools, schemas, files, audio) counts as a token,
    // except that an image counts `image_tokens` instead of its (base64) bytes.
    let len = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let mut bound = TOKENS_PER_REQUEST.saturating_add(len(body.len()));
    for m in &messages {
        bound = bound.saturating_add(TOKENS_PER_MESSAGE);
        // Multi-part content (an array) is read again, part by part, for its images.
        let parts = m
            .content
            .filter(|c| c.get().starts_with('['))
            .and_then(|c| serde_json::from_str::<Vec<RawPart<'_>>>(c.get()).ok())
            .unwrap_or_default();
        for p in parts
            .iter()
            .filter(|p| p.kind.as_deref() == Some("image_url"))
        {
            let raw = p.image_url.map_or(0, |r| r.get().len());
            bound = bound.saturating_sub(len(raw)).saturating_add(image_tokens);
        }
    }
    let mct = token_limit(&raw.max_completion_tokens, "max_completion_tokens")?;
    let mt = token_limit(&raw.max_tokens, "max_tokens")?;
    let (max_tokens, max_tokens_field) = match (mct, mt) {
        (Some(a), _) => (Some(a), Some("max_completion_tokens")),
        (None, Some(b)) => (Some(b), Some("max_tokens")),
        (None, None) => (None, None),
    };
    let choices = match token_limit(&raw.n, "n")? {
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
    Ok(ChatRequest {
        model_in_body: !model.is_empty(),
        model,
        has_temperature: !matches!(raw.temperature, None | Some(serde_json::Value::Null)),
        stream,
        has_stream_options: raw.stream_options.is_some(),
        include_usage: stream
            && raw
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        max_tokens,
        max_tokens_field,
        prompt_tokens_bound: bound,
        choices,
    })
}

/// Edits of the upstream body beyond the model name and the usage chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Edits {
    /// Set this token limit (lowered to what the balance affords, or a preference).
    pub max_tokens: Option<i64>,
    /// Set `temperature` (a preference; only when the body sets none).
    pub temperature: Option<f64>,
}

/// Applies the gateway's edits to the JSON body sent upstream: ask for the usage
/// chunk on streams, set a lowered token limit, and name the provider's model.
pub fn rewrite_body(
    body: &[u8],
    req: &ChatRequest,
    upstream_model: &str,
    lowered_max_tokens: Option<i64>,
) -> Result<Option<Vec<u8>>, ApiError> {
    rewrite_body_with(
        body,
        req,
        upstream_model,
        Edits {
            max_tokens: lowered_max_tokens,
            temperature: None,
        },
    )
}

/// [`rewrite_body`] with every edit. The body is spliced (keys prepended) when none
/// of the edited keys is present, so the common case copies the body once and never
/// re-serialises it.
pub fn rewrite_body_with(
    body: &[u8],
    req: &ChatRequest,
    upstream_model: &str,
    edits: Edits,
) -> Result<Option<Vec<u8>>, ApiError> {
    let lowered_max_tokens = edits.max_tokens;
    let temperature = edits
        .temperature
        .filter(|_| !req.has_temperature)
        .and_then(serde_json::Number::from_f64);
    let want_usage = req.stream && !req.include_usage;
    let rename = upstream_model != req.model;
    let add_model = !req.model_in_body;
    if !want_usage && !rename && !add_model && lowered_max_tokens.is_none() && temperature.is_none()
    {
        return Ok(None);
    }
    // Keys present in the body at all (even as null) are rewritten, never duplicated.
    let has_key = |k: &[u8]| memchr::memmem::find(body, k).is_some();
    let clash = (want_usage && (req.has_stream_options || has_key(b"\"stream_options\"")))
        || (lowered_max_tokens.is_some()
            && (req.max_tokens.is_some()
                || has_key(b"\"max_completion_tokens\"")
                || has_key(b"\"max_tokens\"")))
        || (temperature.is_some() && has_key(b"\"temperature\""))
        || (add_model && has_key(b"\"model\""));
    let splice_ok = (!rename || add_model) && !clash;
    if splice_ok {
        let start = body.iter().position(|b| !b.is_ascii_whitespace());
        if let Some(i) = start.filter(|i| body[*i] == b'{') {
            let mut out = Vec::with_capacity(body.len() + 64);
            out.push(b'{');
            if want_usage {
                out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            }
            if let Some(m) = lowered_max_tokens {
                out.extend_from_slice(format!("\"max_completion_tokens\":{m},").as_bytes());
            }
            if let Some(t) = &temperature {
                out.extend_from_slice(format!("\"temperature\":{t},").as_bytes());
            }
            if add_model {
                out.extend_from_slice(b"\"model\":");
                serde_json::to_writer(&mut out, upstream_model).map_err(ApiError::internal)?;
                out.push(b',');
            }
            let rest = &body[i + 1..];
            // An empty object `{}` would leave a trailing comma: fall back below.
            if rest.iter().any(|b| !b.is_ascii_whitespace() && *b != b'}') {
                out.extend_from_slice(rest);
                return Ok(Some(out));
            }
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body ({e})")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    if want_usage {
        let so = obj
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(so) = so.as_object_mut() {
            so.insert("include_usage".into(), serde_json::Value::Bool(true));
        } else {
            *so = serde_json::json!({"include_usage": true});
        }
    }
    if let Some(m) = lowered_max_tokens {
        let field = req.max_tokens_field.unwrap_or("max_completion_tokens");
        obj.insert(field.into(), serde_json::Value::from(m));
    }
    if let Some(t) = temperature {
        obj.insert("temperature".into(), serde_json::Value::Number(t));
    }
    if rename || add_model {
        obj.insert(
            "model".into(),
            serde_json::Value::String(upstream_model.to_owned()),
        );
    }
    serde_json::to_vec(&v).map(Some).map_err(ApiError::internal)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_what_the_gateway_needs() {
        let b = br#"{"model":"gpt-5","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hello"}]}"#;
        let r = parse_chat(b, 2000).unwrap();
        assert_eq!(r.model, "gpt-5");
        assert!(r.stream && !r.include_usage && !r.has_stream_options);
        assert_eq!(r.max_tokens, Some(100));
        assert_eq!(r.max_tokens_field, Some("max_tokens"));
        assert_eq!(
            r.prompt_tokens_bound,
            TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE + b.len() as i64
        );
    }

    #[test]
    fn max_completion_tokens_wins_and_images_count() {
        let b = br#"{"model":"m","max_tokens":5,"max_completion_tokens":7,"messages":[{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"data:..."}}]}]}"#;
        let r = parse_chat(b, 2000).unwrap();
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.choices, 1);
        let image = r#"{"url":"data:..."}"#.len() as i64;
        assert_eq!(
            r.prompt_tokens_bound,
            TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE + b.len() as i64 - image + 2000
        );
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        for (body, needle) in [
            (
                &br#"{"model":"gpt-5","messages":[{"role":"user","content":"x"}"#[..],
                "parse the JSON",
            ),
            (br#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (br#"{"model":"gpt-5"}"#, "messages"),
            (br#"{"model":"gpt-5","messages":[]}"#, "at least one"),
            (
                br#"{"model":"gpt-5","max_tokens":-1,"messages":[{"role":"user","content":"x"}]}"#,
                "max_tokens",
            ),
            (
                br#"{"model":"gpt-5","max_tokens":"9","messages":[{"role":"user","content":"x"}]}"#,
                "max_tokens",
            ),
            (br#"[1,2]"#, "invalid chat request"),
            (
                br#"{"model":"gpt-5","n":0,"messages":[{"role":"user","content":"x"}]}"#,
                "`n`",
            ),
            (
                br#"{"model":"gpt-5","n":500,"messages":[{"role":"user","content":"x"}]}"#,
                "`n`",
            ),
        ] {
            let e = parse_chat(body, 0).unwrap_err();
            assert_eq!(e.status_code(), http::StatusCode::BAD_REQUEST);
            let ApiError::InvalidRequest { message, .. } = e else {
                panic!()
            };
            assert!(
                message.contains(needle),
                "{message} should mention {needle}"
            );
        }
    }

    #[test]
    fn splices_include_usage_without_reserialising() {
        let b = br#"{"model":"gpt-5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b, 0).unwrap();
        let out = rewrite_body(b, &r, "gpt-5", None).unwrap().unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(
            s.starts_with(r#"{"stream_options":{"include_usage":true},"model""#),
            "{s}"
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn rewrites_existing_stream_options_and_limits() {
        let b = br#"{"model":"gpt-5","stream":true,"stream_options":{"include_usage":false},"max_tokens":900,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b, 0).unwrap();
        let out = rewrite_body(b, &r, "gpt-5-upstream", Some(300))
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["max_tokens"], 300);
        assert_eq!(v["model"], "gpt-5-upstream");
    }

    #[test]
    fn null_keys_are_rewritten_not_duplicated() {
        let b = br#"{"model":"gpt-5","stream":true,"stream_options":null,"max_completion_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b, 0).unwrap();
        let out = rewrite_body(b, &r, "gpt-5", Some(300)).unwrap().unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(s.matches("stream_options").count(), 1, "{s}");
        assert_eq!(s.matches("max_completion_tokens").count(), 1, "{s}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["max_completion_tokens"], 300);
    }

    #[test]
    fn files_and_schemas_count_by_their_bytes() {
        let pdf = "A".repeat(30_000);
        let body = serde_json::to_vec(&serde_json::json!({
            "model": "gpt-5",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"description": "d".repeat(5000)}}},
            "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": pdf}}]}]
        }))
        .unwrap();
        let r = parse_chat(&body, 2000).unwrap();
        assert!(r.prompt_tokens_bound >= 35_000, "{}", r.prompt_tokens_bound);
    }

    #[test]
    fn no_edit_means_no_copy() {
        let b = br#"{"model":"gpt-5","messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b, 0).unwrap();
        assert!(rewrite_body(b, &r, "gpt-5", None).unwrap().is_none());
    }

    #[test]
    fn preference_edits_are_spliced_when_the_keys_are_absent() {
        let b = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat_lenient(b, 0).unwrap();
        assert!(r.model.is_empty() && !r.model_in_body && !r.has_temperature);
        assert!(
            parse_chat(b, 0).is_err(),
            "strict parse still wants a model"
        );
        let mut r = r;
        r.model = "gpt-5".into();
        let edits = Edits {
            max_tokens: Some(77),
            temperature: Some(0.25),
        };
        let out = rewrite_body_with(b, &r, "gpt-5-2025", edits)
            .unwrap()
            .unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(
            s.starts_with(
                r#"{"max_completion_tokens":77,"temperature":0.25,"model":"gpt-5-2025","messages""#
            ),
            "{s}"
        );
        serde_json::from_slice::<serde_json::Value>(&out).unwrap();
    }

    #[test]
    fn a_temperature_in_the_body_wins_and_null_keys_are_rewritten() {
        let b = br#"{"model":"gpt-5","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = parse_chat(b, 0).unwrap();
        assert!(r.has_temperature);
        let edits = Edits {
            max_tokens: None,
            temperature: Some(0.25),
        };
        assert!(rewrite_body_with(b, &r, "gpt-5", edits).unwrap().is_none());
        let b = br#"{"model":null,"temperature":null,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut r = parse_chat_lenient(b, 0).unwrap();
        assert!(!r.has_temperature && !r.model_in_body);
        r.model = "gpt-5".into();
        let out = rewrite_body_with(b, &r, "gpt-5", edits).unwrap().unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(s.matches("temperature").count(), 1, "{s}");
        assert_eq!(s.matches("\"model\"").count(), 1, "{s}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["model"].as_str(), v["temperature"].as_f64()),
            (Some("gpt-5"), Some(0.25))
        );
    }

    proptest! {
        /// The bound never undercounts: it is at least the bytes of every text.
        #[test]
        fn bound_covers_all_text(texts in proptest::collection::vec(".{0,40}", 1..6)) {
            let msgs: Vec<_> = texts.iter().map(|t| serde_json::json!({"role":"user","content":t})).collect();
            let body = serde_json::to_vec(&serde_json::json!({"model":"m","messages":msgs})).unwrap();
            let r = parse_chat(&body, 0).unwrap();
            let bytes: usize = texts.iter().map(|t| t.len()).sum();
            prop_assert!(r.prompt_tokens_bound >= bytes as i64);
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_chat(&body, 10);
        }
    }
}
