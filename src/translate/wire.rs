//! The seam between the gateway and one provider: the [`Wire`] trait, which holds
//! everything that differs from one provider to the next, and the registry
//! [`PROVIDERS`] that maps a provider's name (`models.provider`, the key of
//! `providers.<name>` in config) to its implementation.
//!
//! Adding a provider = one file implementing [`Wire`] (beside `openai.rs`,
//! `anthropic.rs`, `gemini.rs`) and one line in [`PROVIDERS`]; ARCHITECTURE.md ("Adding
//! a provider") lists what each method must guarantee, and `toy.rs` (tests only) is a
//! provider written that way, driven through the generic code by its tests.
//!
//! Nothing here runs per chunk of a stream: the gateway asks the [`Kind`] of a request
//! once for its URL, headers, body and answer; the stream translator it hands out is
//! the only per-chunk code, and it was already behind a `Box<dyn StreamState>`.

use std::fmt;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{Map, Value};

use super::{Answer, AnswerError, StreamState};
use crate::error::ApiError;
use crate::route::Model;

/// The OpenAI endpoint a request came in on; each provider knows its URL for it
/// ([`Wire::url`]) and whether it offers it at all ([`Wire::offers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`: OpenAI `/chat/completions`, Anthropic `/v1/messages`,
    /// Gemini `models/{model}:generateContent` (`:streamGenerateContent?alt=sse` for
    /// streams).
    Chat,
    /// `/v1/completions`: OpenAI `/completions`.
    Completions,
    /// `/v1/embeddings`: OpenAI `/embeddings`, Gemini `models/{model}:batchEmbedContents`.
    /// `base64`: the client asked for `encoding_format: base64`.
    Embeddings { base64: bool },
}

/// A provider's wire format: one implementation per provider, registered in
/// [`PROVIDERS`]. The gateway's request path is generic over it.
///
/// A provider that speaks OpenAI's format has no [`Translation`]: its request bodies
/// are spliced, not rebuilt (`parse::upstream_body`), and its streams are tapped as
/// they come (`stream_back::SseTap`); every other method still applies.
pub trait Wire: Send + Sync + 'static {
    /// The provider's name in `models.provider` and `providers.<name>`.
    fn name(&self) -> &'static str;

    /// How the provider's bodies and streams are translated; `None` for a provider
    /// that speaks OpenAI's wire format: its bodies are spliced, not rebuilt
    /// (`parse::upstream_body`), and its streams tapped as they come
    /// (`stream_back::SseTap`) — the fast path.
    fn translation(&self) -> Option<&dyn Translation>;

    /// Speaks OpenAI's wire format (no [`Wire::translation`]).
    fn passes_through(&self) -> bool {
        self.translation().is_none()
    }

    /// Whether the provider offers `endpoint` (checked before anything is held; the
    /// client gets 400 naming the model otherwise). Every provider offers chat. Only a
    /// provider that [passes through](Wire::passes_through) may offer completions
    /// (there is no completions translation).
    fn offers(&self, endpoint: Endpoint) -> bool;

    /// The URL of `endpoint` at a deployment whose base URL is `base` (no trailing
    /// slash), for the upstream model `model`; `None` when it does not offer it (or
    /// `model` cannot go into a URL: see [`path_segment`]).
    fn url(&self, base: &str, endpoint: Endpoint, model: &str, stream: bool) -> Option<String>;

    /// The chat URL depends on the deployment alone (not on the model or `stream`): it
    /// is built and parsed once per deployment at start-up, not per request.
    fn fixed_chat_url(&self) -> bool {
        false
    }

    /// The headers that authenticate the gateway with a deployment's `key` (`None`:
    /// the key's variable is unset; headers that do not carry the key are sent all
    /// the same). Built once per deployment at start-up. Every value that carries the
    /// key must be made with [`secret`] (sensitive: never logged).
    fn auth_headers(&self, key: Option<&str>) -> Vec<(HeaderName, HeaderValue)>;

    /// Prompt tokens the provider adds to a request with tools that are not in its
    /// body (a tool-use system prompt): added to the prompt's bound before the hold.
    fn tool_prompt_tokens(&self) -> i64 {
        0
    }

    /// A 2xx JSON answer of `endpoint` → the body for the client in OpenAI's shape
    /// (a translated chat answer gets the id `id` and the model `model`), the usage
    /// the provider reported (`None` if it reported none: the gateway then bills an
    /// estimate and marks it) and whether the answer called a tool. Usage is read
    /// whole — every token kind the provider bills (cache reads and writes count as
    /// prompt tokens) — never less than it reported.
    fn answer(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        id: &dyn fmt::Display,
        model: &str,
    ) -> Result<Answer, AnswerError>;

    /// A non-2xx answer's body → an OpenAI-shaped error body (same status); see
    /// [`super::error_body`].
    fn error(&self, status: StatusCode, body: Bytes) -> Bytes;

    /// The provider refused the gateway's key with an answer other than 401/403
    /// (which always mean so): the client gets 502 without the provider's message, and
    /// the deployment is not tried again within the request.
    fn key_refused(&self, status: StatusCode, body: &[u8]) -> bool {
        let _ = (status, body);
        false
    }
}

/// The request and stream translation of a provider that does not speak OpenAI's
/// format ([`Wire::translation`]).
pub trait Translation: Send + Sync {
    /// An OpenAI chat body (one object) → the provider's body, without the output
    /// limit (see [`Translation::set_max_tokens`]). Anything the provider cannot honour is a
    /// 400 naming the parameter ([`super::check_keys`]); nothing is held yet.
    fn chat_request(&self, req: Map<String, Value>, model: &Model) -> Result<Value, ApiError>;

    /// Sets the output-token limit of a body made by [`Translation::chat_request`] to `n`,
    /// replacing whatever the client asked: the provider must never be able to
    /// produce more than the hold was sized for. Called again with a lower `n` when
    /// the balance lowered the limit.
    fn set_max_tokens(&self, body: &mut Value, n: i64);

    /// Sets the sampling temperature of such a body unless it has one (a user
    /// preference), clamped to the provider's range.
    fn default_temperature(&self, body: &mut Value, t: f64);

    /// An OpenAI embeddings `input` → the provider's body (only called when it
    /// [offers](Wire::offers) embeddings).
    fn embeddings_request(
        &self,
        input: &Value,
        model: &Model,
        dimensions: Option<i64>,
    ) -> Result<Value, ApiError> {
        let _ = (input, dimensions);
        Err(super::bad(
            "model",
            format!("the model `{}` does not offer embeddings", model.id),
        ))
    }

    /// The translator of one streamed answer: provider SSE events →
    /// `chat.completion.chunk`s, the usage (cumulative, never less than the provider
    /// reported; `None` until its final count), whether the provider's end of the
    /// answer was seen (else the stream was cut) and whether it called a tool.
    fn stream_state(&self) -> Box<dyn StreamState + Send>;
}

/// A provider's wire format, as a cheap `Copy` handle (what a `Provider` and an
/// admitted request carry).
pub type Kind = &'static dyn Wire;

impl fmt::Debug for dyn Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every provider the gateway speaks to: one line each.
pub static PROVIDERS: &[Kind] = &[
    &super::openai::OpenAi,
    &super::anthropic::Anthropic,
    &super::gemini::Gemini,
    #[cfg(test)]
    &super::toy::Toy,
];

/// The provider named `name`; a name not registered speaks OpenAI's format (an
/// OpenAI-compatible server under a name of its own).
pub fn for_name(name: &str) -> Kind {
    PROVIDERS
        .iter()
        .copied()
        .find(|w| w.name() == name)
        .unwrap_or(&super::openai::OpenAi)
}

/// A header value that carries a key: sensitive (never logged); `None` if it is not a
/// valid header value.
pub fn secret(s: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(s).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Whether `model` may go into a URL path as one segment (letters, digits, `-._`).
pub fn path_segment(model: &str) -> bool {
    !model.is_empty()
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The id of a translated chat answer: `chatcmpl-<request id>`, rendered only when a
/// provider translates its answer.
pub struct ChatId(pub uuid::Uuid);

impl fmt::Display for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chatcmpl-{}", self.0.simple())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::super::tests::model;
    use super::*;

    const ENDPOINTS: [Endpoint; 4] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Embeddings { base64: false },
        Endpoint::Embeddings { base64: true },
    ];

    #[test]
    fn names_are_unique_and_unknown_names_speak_openai() {
        for w in PROVIDERS {
            assert_eq!(for_name(w.name()).name(), w.name());
            assert_eq!(PROVIDERS.iter().filter(|x| x.name() == w.name()).count(), 1);
        }
        assert_eq!(for_name("anthropic").name(), "anthropic");
        assert_eq!(for_name("google").name(), "google");
        let other = for_name("my-vllm");
        assert_eq!(other.name(), "openai");
        assert!(other.passes_through());
        assert_eq!(format!("{other:?}"), "openai");
    }

    /// What the seam promises, checked of every registered provider (a new one too).
    #[test]
    fn every_provider_keeps_the_promises_of_the_seam() {
        for w in PROVIDERS {
            let name = w.name();
            assert!(w.offers(Endpoint::Chat), "{name}");
            for e in ENDPOINTS {
                for stream in [false, true] {
                    let url = w.url("http://h.invalid", e, "m-1.5_x", stream);
                    assert_eq!(w.offers(e), url.is_some(), "{name} {e:?}");
                    if let Some(u) = url {
                        assert!(u.starts_with("http://h.invalid/"), "{name}: {u}");
                        assert!(u.parse::<http::Uri>().is_ok(), "{name}: {u}");
                    }
                }
            }
            if w.offers(Endpoint::Completions) {
                assert!(w.passes_through(), "{name}: completions are not translated");
            }
            if w.fixed_chat_url() {
                assert_eq!(
                    w.url("http://h.invalid", Endpoint::Chat, "a", false),
                    w.url("http://h.invalid", Endpoint::Chat, "b", true),
                    "{name}"
                );
            }
            // The key goes in a sensitive header, and only with a key.
            let with = w.auth_headers(Some("sk-seam-test"));
            let keyed: Vec<_> = with
                .iter()
                .filter(|(_, v)| v.to_str().is_ok_and(|s| s.contains("sk-seam-test")))
                .collect();
            assert!(!keyed.is_empty(), "{name}");
            assert!(keyed.iter().all(|(_, v)| v.is_sensitive()), "{name}");
            assert_eq!(
                w.auth_headers(None).len(),
                with.len() - keyed.len(),
                "{name}"
            );
            // The held limit replaces the client's, however often it is lowered.
            let Some(t) = w.translation() else { continue };
            let req: Map<String, Value> = serde_json::from_str(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4321}"#,
            )
            .unwrap();
            let mut body = t.chat_request(req, &model(name, &[])).unwrap();
            t.set_max_tokens(&mut body, 200);
            t.set_max_tokens(&mut body, 17);
            let sent = body.to_string();
            assert!(sent.contains(":17"), "{name}: {sent}");
            assert!(
                !sent.contains("4321") && !sent.contains(":200"),
                "{name}: {sent}"
            );
        }
    }

    #[test]
    fn chat_ids_name_the_request() {
        let rid = uuid::Uuid::nil();
        assert_eq!(
            ChatId(rid).to_string(),
            "chatcmpl-00000000000000000000000000000000"
        );
    }
}
