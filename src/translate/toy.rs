//! A provider that exists only in the tests: the "Adding a provider" recipe of
//! ARCHITECTURE.md followed (one file implementing [`Wire`], one line in
//! [`super::PROVIDERS`]), and its tests, which reach it by name through the generic
//! code — the URL and headers of an upstream request (`upstream`), the request
//! translation with the held limit and the default temperature, the JSON answer with
//! its usage, the stream tap (`stream_back::Tap`), the error mapping — as a new
//! provider's tests should.
//!
//! Its wire format, small on purpose:
//! - `POST {base}/toy/{model}/say` (`?stream=1` for a stream), key in `x-toy-key`,
//!   and `toy-version: 1`;
//! - request `{"input": "<the messages' text, one per line>", "limit": n, "temp": t}`;
//! - answer `{"output": "...", "cut": false, "used": {"in": 3, "out": 5}}`;
//! - stream: `data: {"text": "...", "out": <output tokens so far>}` events, then
//!   `event: done` with `data: {"in": 3, "out": 5}`; `event: error` fails it;
//! - error `{"problem": "...", "code": "..."}`; a refused key says `TOY_BAD_KEY`.

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{json, Map, Value};

use super::{
    chat_completion, check_keys, error_body, number_in, path_segment, secret, text_of, Answer,
    AnswerError, ChunkWriter, Endpoint, ProviderUsage, Step, StreamState, Translation, Wire,
};
use crate::error::ApiError;
use crate::route::Model;
use crate::sse::SseEvent;
use crate::usage::Usage;

pub struct Toy;

const KNOWN: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
];

impl Wire for Toy {
    fn translation(&self) -> Option<&dyn Translation> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        "toy"
    }

    fn offers(&self, endpoint: Endpoint) -> bool {
        endpoint == Endpoint::Chat
    }

    fn url(&self, base: &str, endpoint: Endpoint, model: &str, stream: bool) -> Option<String> {
        if endpoint != Endpoint::Chat || !path_segment(model) {
            return None;
        }
        let query = if stream { "?stream=1" } else { "" };
        Some(format!("{base}/toy/{model}/say{query}"))
    }

    fn auth_headers(&self, key: Option<&str>) -> Vec<(HeaderName, HeaderValue)> {
        let mut h: Vec<_> = key
            .and_then(secret)
            .map(|k| (HeaderName::from_static("x-toy-key"), k))
            .into_iter()
            .collect();
        h.push((
            HeaderName::from_static("toy-version"),
            HeaderValue::from_static("1"),
        ));
        h
    }

    fn tool_prompt_tokens(&self) -> i64 {
        7
    }

    fn answer(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        id: &dyn std::fmt::Display,
        model: &str,
    ) -> Result<Answer, AnswerError> {
        let v: Value = serde_json::from_slice(&body)?;
        let (Endpoint::Chat, Some(text)) = (endpoint, v["output"].as_str()) else {
            return Err(AnswerError::NotAnswer("toy"));
        };
        let message = json!({"role": "assistant", "content": text, "refusal": null});
        let finish = if v["cut"] == true { "length" } else { "stop" };
        let usage = v.get("used").map(|u| usage_of(u, 0));
        Ok(chat_completion(message, finish, usage, id, model))
    }

    fn error(&self, status: StatusCode, body: Bytes) -> Bytes {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        error_body(status, v["problem"].as_str(), v["code"].as_str())
    }

    fn key_refused(&self, _status: StatusCode, body: &[u8]) -> bool {
        memchr::memmem::find(body, b"TOY_BAD_KEY").is_some()
    }
}

impl Translation for Toy {
    fn chat_request(&self, req: Map<String, Value>, _model: &Model) -> Result<Value, ApiError> {
        check_keys(&req, KNOWN, "Toy")?;
        let mut input = Vec::new();
        for m in req
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            input.push(text_of(&m["content"], "messages")?);
        }
        let mut out = json!({
            "input": input.join("\n"),
            "stream": req.get("stream").and_then(Value::as_bool).unwrap_or(false),
        });
        if let Some(t) = req.get("temperature").filter(|t| !t.is_null()) {
            out["temp"] = number_in(t, "temperature", 0.0, 1.0, "Toy")?;
        }
        Ok(out)
    }
    fn set_max_tokens(&self, body: &mut Value, n: i64) {
        body["limit"] = Value::from(n);
    }
    fn default_temperature(&self, body: &mut Value, t: f64) {
        if let Some(o) = body.as_object_mut() {
            o.entry("temp")
                .or_insert_with(|| Value::from(t.clamp(0.0, 1.0)));
        }
    }
    fn stream_state(&self) -> Box<dyn StreamState + Send> {
        Box::<Stream>::default()
    }
}

/// `{"in": .., "out": ..}`, the output never below `seen` (counts the stream showed).
fn usage_of(u: &Value, seen: i64) -> Usage {
    let n = |k: &str| u[k].as_i64().unwrap_or(0).max(0);
    let out = n("out").max(seen);
    ProviderUsage {
        prompt: n("in"),
        completion: out,
        total: n("in").saturating_add(out),
        cached: 0,
    }
    .usage()
}

#[derive(Default)]
struct Stream {
    /// Output tokens reported so far (cumulative counts: the largest wins).
    out: i64,
    usage: Option<Usage>,
    stopped: bool,
}

impl StreamState for Stream {
    fn event(&mut self, ev: &SseEvent, w: &mut ChunkWriter, out: &mut BytesMut) -> Step {
        let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
        match ev.event.as_deref() {
            Some("error") => return Step::Failed,
            Some("done") if !self.stopped => {
                self.stopped = true;
                self.usage = Some(usage_of(&v, self.out));
                w.finish(out, "stop");
            }
            _ => {
                self.out = self.out.max(v["out"].as_i64().unwrap_or(0));
                w.text(out, v["text"].as_str().unwrap_or_default());
            }
        }
        Step::Continue
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    fn tool_call(&self) -> bool {
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::super::tests::{chunks, model};
    use super::super::{for_name, request, ChatId, Endpoint, PROVIDERS};
    use crate::config::{DeploymentConfig, ProviderConfig};
    use crate::deploy::{Breaker, Deployment};
    use crate::error::ApiError;
    use crate::stream_back::Tap;
    use crate::upstream::Upstream;
    use crate::usage::Usage;
    use bytes::Bytes;
    use http::StatusCode;
    use serde_json::{json, Value};

    fn config(name: &str) -> ProviderConfig {
        ProviderConfig {
            name: name.into(),
            deployments: vec![DeploymentConfig {
                base_url: "http://toy.invalid".into(),
                base_uri: "http://toy.invalid".parse().unwrap(),
                api_key_env: "TOLLGATE_TEST_UNSET_KEY".into(),
                weight: 1,
            }],
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_attempts: 1,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            retry_after_max: Duration::from_secs(10),
            breaker_failures: 3,
            breaker_open: Duration::from_millis(1000),
            retry_timeouts: false,
        }
    }

    fn upstream(name: &str) -> Upstream {
        Upstream::new(&BTreeMap::from([(name.to_owned(), config(name))]), 1).unwrap()
    }

    #[test]
    fn the_toy_is_found_by_its_name_once() {
        assert_eq!(for_name("toy").name(), "toy");
        assert_eq!(PROVIDERS.iter().filter(|w| w.name() == "toy").count(), 1);
        assert!(!for_name("toy").passes_through());
        let up = upstream("toy");
        assert_eq!(up.provider("toy").unwrap().kind.name(), "toy");
    }

    #[test]
    fn upstream_requests_go_to_the_toy_url_with_its_key_headers() {
        let up = upstream("toy");
        let p = up.provider("toy").unwrap();
        // The key's variable is unset: only the header without the key.
        let d = &p.pool.deployments()[0];
        let names: Vec<_> = d.auth.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["toy-version"]);
        let uri = |e, m, s| p.uri(d, e, m, s).map(|u| u.to_string());
        assert_eq!(
            uri(Endpoint::Chat, "toy-1", false).unwrap(),
            "http://toy.invalid/toy/toy-1/say"
        );
        assert_eq!(
            uri(Endpoint::Chat, "toy-1", true).unwrap(),
            "http://toy.invalid/toy/toy-1/say?stream=1"
        );
        assert!(uri(Endpoint::Chat, "../admin", false).is_err());
        assert!(uri(Endpoint::Completions, "toy-1", false).is_err());
        assert!(uri(Endpoint::Embeddings { base64: false }, "toy-1", false).is_err());

        // A deployment with a key: the request carries it (sensitive) in the toy's
        // header, beside the body and nothing else of the client's.
        let keyed = Deployment {
            index: 0,
            base_url: "http://toy.invalid".into(),
            auth: for_name("toy").auth_headers(Some("sk-toy")),
            weight: 1,
            breaker: Breaker::new(3, Duration::from_secs(1)),
        };
        let req = p
            .request(
                &keyed,
                Endpoint::Chat,
                "toy-1",
                Bytes::from_static(b"{}"),
                true,
            )
            .unwrap();
        assert_eq!(req.uri(), "http://toy.invalid/toy/toy-1/say?stream=1");
        let h = req.headers();
        assert_eq!(h["x-toy-key"], "sk-toy");
        assert!(h["x-toy-key"].is_sensitive());
        assert_eq!(h["toy-version"], "1");
        assert_eq!(h["accept"], "text/event-stream");
        assert!(h.get("authorization").is_none());
    }

    #[test]
    fn requests_carry_the_held_limit_and_the_default_temperature() {
        let kind = for_name("toy");
        let m = model("toy", &[]);
        let body = br#"{"model":"toy-model","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_tokens":4000}"#;
        let mut t = request(kind.translation().unwrap(), body, &m).unwrap();
        assert_eq!(t.body["input"], "Be brief.\nHi");
        // The client's 4000 is not what goes: the held limit does, lowered if need be.
        t.set_max_tokens(100);
        t.set_max_tokens(40);
        t.default_temperature(1.7);
        let sent: Value = serde_json::from_slice(&t.to_bytes().unwrap()).unwrap();
        assert_eq!(sent["limit"], 40);
        assert_eq!(sent["temp"], 1.0, "clamped to the toy's range");
        assert!(sent.get("max_tokens").is_none());

        // The client's own temperature stays.
        let mut t = request(
            kind.translation().unwrap(),
            br#"{"model":"m","messages":[],"temperature":0.25}"#,
            &m,
        )
        .unwrap();
        t.default_temperature(0.9);
        assert_eq!(t.body["temp"], 0.25);

        // What the toy cannot honour is a 400 naming it.
        for (b, param) in [
            (
                &br#"{"model":"m","messages":[],"logit_bias":{}}"#[..],
                "logit_bias",
            ),
            (
                br#"{"model":"m","messages":[],"temperature":2}"#,
                "temperature",
            ),
        ] {
            match request(kind.translation().unwrap(), b, &m) {
                Err(ApiError::InvalidRequest { param: p, .. }) => assert_eq!(p, Some(param)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(kind.tool_prompt_tokens(), 7);
    }

    #[test]
    fn answers_become_chat_completions_with_the_usage_reported() {
        let kind = for_name("toy");
        let rid = uuid::Uuid::new_v4();
        let a = kind
            .answer(
                Endpoint::Chat,
                Bytes::from_static(br#"{"output":"Hello!","cut":true,"used":{"in":3,"out":5}}"#),
                &ChatId(rid),
                "toy-model",
            )
            .unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["id"], format!("chatcmpl-{}", rid.simple()));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "toy-model");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello!");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 0}})
        );
        assert_eq!(
            a.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                total_tokens: 8,
                cached_tokens: 0,
                estimated: false
            })
        );
        assert!(!a.tool_call);
        // No usage reported: none (the gateway estimates and marks it).
        let a = kind
            .answer(
                Endpoint::Chat,
                Bytes::from_static(br#"{"output":""}"#),
                &"c",
                "m",
            )
            .unwrap();
        assert!(a.usage.is_none());
        for junk in [&b"<html>"[..], b"{}", br#"{"output":7}"#] {
            assert!(kind
                .answer(Endpoint::Chat, Bytes::copy_from_slice(junk), &"c", "m")
                .is_err());
        }
    }

    const STREAM: &[u8] = b"data: {\"text\":\"Hel\",\"out\":1}\n\ndata: {\"text\":\"lo\",\"out\":9}\n\nevent: done\ndata: {\"in\":3,\"out\":5}\n\n";

    /// The toy's stream through the gateway's tap, fed in pieces of `step` bytes.
    fn tap(body: &[u8], step: usize, wants_usage: bool) -> (Tap, Vec<u8>) {
        let mut t = Tap::new(for_name("toy"), wants_usage, uuid::Uuid::nil(), "toy-model");
        let mut out = Vec::new();
        for piece in body.chunks(step) {
            if let Some(b) = t.feed(Bytes::copy_from_slice(piece)) {
                out.extend_from_slice(&b);
            }
        }
        out.extend_from_slice(&t.finish());
        (t, out)
    }

    #[test]
    fn streams_become_chunks_with_usage_never_below_what_was_reported() {
        for step in [STREAM.len(), 5, 1] {
            let (t, out) = tap(STREAM, step, true);
            let c = chunks(&out);
            assert!(c
                .iter()
                .take(c.len() - 1)
                .all(|x| x["object"] == "chat.completion.chunk"));
            assert_eq!(c[0]["choices"][0]["delta"]["role"], "assistant");
            let text: String = c
                .iter()
                .filter_map(|x| x["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, "Hello");
            let finish: Vec<_> = c
                .iter()
                .filter_map(|x| x["choices"][0]["finish_reason"].as_str())
                .collect();
            assert_eq!(finish, ["stop"]);
            // The done event said 5 output tokens, the stream had shown 9: 9 is billed.
            let usage = json!({"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 0}});
            assert_eq!(c[c.len() - 2]["usage"], usage, "step {step}");
            assert_eq!(c[c.len() - 1], "[DONE]");
            assert_eq!(t.usage().unwrap().total_tokens, 12);
            assert!(!t.failed());
            assert_eq!(t.bytes_seen(), STREAM.len());
            assert_eq!(t.events_seen(), 3);
        }
        // Usage not asked for: no usage chunk, the tap still has it.
        let (t, out) = tap(STREAM, STREAM.len(), false);
        assert!(chunks(&out).iter().all(|x| x.get("usage").is_none()));
        assert_eq!(t.usage().unwrap().completion_tokens, 9);
    }

    #[test]
    fn a_stream_without_its_end_or_with_an_error_is_cut() {
        let cut = &STREAM[..STREAM.len() - 30];
        let (t, out) = tap(cut, 4, true);
        assert!(t.failed());
        assert!(t.usage().is_none());
        assert!(!String::from_utf8_lossy(&out).contains("[DONE]"));
        let failed = b"data: {\"text\":\"Hi\"}\n\nevent: error\ndata: {}\n\nevent: done\ndata: {\"in\":1,\"out\":1}\n\n";
        let (t, out) = tap(failed, failed.len(), true);
        assert!(t.failed());
        assert!(!String::from_utf8_lossy(&out).contains("[DONE]"));
    }

    #[test]
    fn errors_become_openai_shaped_and_a_refused_key_is_seen() {
        let kind = for_name("toy");
        let e = kind.error(
            StatusCode::TOO_MANY_REQUESTS,
            Bytes::from_static(br#"{"problem":"slow down","code":"busy"}"#),
        );
        let v: Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "busy");
        assert_eq!(v["error"]["message"], "upstream: slow down");
        let e = kind.error(StatusCode::BAD_GATEWAY, Bytes::from_static(b"<html>"));
        let v: Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("502"));
        let refused = br#"{"problem":"TOY_BAD_KEY"}"#;
        assert!(kind.key_refused(StatusCode::BAD_REQUEST, refused));
        assert!(!kind.key_refused(StatusCode::BAD_REQUEST, br#"{"problem":"no"}"#));
        // Another provider does not read the toy's words.
        assert!(!for_name("openai").key_refused(StatusCode::BAD_REQUEST, refused));
    }
}
