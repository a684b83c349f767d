//! OpenAI (and any OpenAI-compatible server registered under another name): the wire
//! format clients speak, so nothing is translated. Request bodies are spliced by
//! [`crate::parse::upstream_body`] (model, limit, temperature, `stream_options`, each
//! value's bytes kept), streams are tapped as they come by
//! [`crate::stream_back::SseTap`], answers and error bodies go back as they came.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, StatusCode};
use memchr::memmem;

use super::{secret, Answer, AnswerError, Endpoint, Translation, Wire};
use crate::usage::Usage;

/// OpenAI's API (`providers.openai`, and every provider name not registered).
pub struct OpenAi;

impl Wire for OpenAi {
    /// Passes through: the gateway splices the client's body (`parse::upstream_body`)
    /// and taps the stream as it comes.
    fn translation(&self) -> Option<&dyn Translation> {
        None
    }

    fn name(&self) -> &'static str {
        "openai"
    }

    fn offers(&self, _endpoint: Endpoint) -> bool {
        true
    }

    fn url(&self, base: &str, endpoint: Endpoint, _model: &str, _stream: bool) -> Option<String> {
        Some(match endpoint {
            Endpoint::Chat => format!("{base}/chat/completions"),
            Endpoint::Completions => format!("{base}/completions"),
            Endpoint::Embeddings { .. } => format!("{base}/embeddings"),
        })
    }

    fn fixed_chat_url(&self) -> bool {
        true
    }

    fn auth_headers(&self, key: Option<&str>) -> Vec<(HeaderName, HeaderValue)> {
        key.and_then(|k| secret(&format!("Bearer {k}")))
            .map(|k| (header::AUTHORIZATION, k))
            .into_iter()
            .collect()
    }

    /// The answer as it came, with the usage it reports.
    fn answer(
        &self,
        _endpoint: Endpoint,
        body: Bytes,
        _id: &dyn std::fmt::Display,
        _model: &str,
    ) -> Result<Answer, AnswerError> {
        let usage = Usage::from_openai_json(&body);
        let tool_call = finished_with_tool_calls(&body);
        Ok(Answer {
            body,
            usage,
            tool_call,
        })
    }

    fn error(&self, _status: StatusCode, body: Bytes) -> Bytes {
        body
    }
}

/// Whether `b` holds a `"finish_reason"` of `"tool_calls"` (or the legacy
/// `"function_call"`): the answer called a tool.
pub fn finished_with_tool_calls(b: &[u8]) -> bool {
    let ws = |r: &[u8]| r.iter().take_while(|c| c.is_ascii_whitespace()).count();
    memmem::find_iter(b, b"\"finish_reason\"").any(|i| {
        let rest = &b[i + 15..];
        let Some(rest) = rest[ws(rest)..].strip_prefix(b":") else {
            return false;
        };
        let rest = &rest[ws(rest)..];
        rest.starts_with(b"\"tool_calls\"") || rest.starts_with(b"\"function_call\"")
    })
}
