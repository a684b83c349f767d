//! Stage 7, stream back: the provider's answer to the client, then stage 8 (settle).
//!
//! - [`json::answer_json`]: a JSON answer, read whole (bounded), translated when the
//!   provider is not OpenAI, charged, then sent.
//! - [`pump::answer_stream`]: a stream, passed on as it arrives by a pump task; the
//!   settle runs before the client sees the end.
//!
//! This module is the stream's tap: pass the provider's server-sent events to the
//! client as they arrive, while tapping them for the usage the provider reports in
//! its last chunk.
//!
//! The tap forwards each complete event as soon as its terminating blank line arrives
//! (a frame that is exactly whole events is passed on without a copy). It withholds
//! two things: the usage-only chunk (`"choices":[]` with a `usage` object) when the
//! client did not ask for it — the gateway asked upstream on its behalf — and the
//! closing `data: [DONE]`, which is sent only after the request is settled, so a
//! client that saw the end of the stream knows its usage is recorded.

pub mod json;
pub mod pump;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

pub use crate::translate::openai::finished_with_tool_calls;
use crate::translate::{charge_fields, ChatId, Kind, StreamTranslator};
use crate::usage::{Billed, Usage};

/// The tap of one stream: OpenAI's passed through, or another provider's translated.
pub enum Tap {
    OpenAi(SseTap),
    Translated(Box<StreamTranslator>),
}

impl Tap {
    /// The tap of a stream from `kind`'s provider: its own stream translator
    /// ([`crate::translate::Wire::stream_state`]), or OpenAI's passed through.
    pub fn new(kind: Kind, client_wants_usage: bool, rid: uuid::Uuid, model: &str) -> Tap {
        match kind.translation().map(|t| t.stream_state()) {
            None => Tap::OpenAi(SseTap::new(client_wants_usage)),
            Some(state) => Tap::Translated(Box::new(StreamTranslator::with_state(
                state,
                &ChatId(rid).to_string(),
                model,
                client_wants_usage,
            ))),
        }
    }

    pub fn feed(&mut self, chunk: Bytes) -> Option<Bytes> {
        match self {
            Tap::OpenAi(t) => t.feed(chunk),
            Tap::Translated(t) => t.feed(&chunk),
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        match self {
            Tap::OpenAi(t) => t.usage(),
            Tap::Translated(t) => t.usage(),
        }
    }

    pub fn bytes_seen(&self) -> usize {
        match self {
            Tap::OpenAi(t) => t.bytes_seen(),
            Tap::Translated(t) => t.bytes_seen(),
        }
    }

    pub fn events_seen(&self) -> usize {
        match self {
            Tap::OpenAi(t) => t.events_seen(),
            Tap::Translated(t) => t.events_seen(),
        }
    }

    /// The answer called a tool.
    pub fn tool_call(&self) -> bool {
        match self {
            Tap::OpenAi(t) => t.tool_call,
            Tap::Translated(t) => t.tool_call(),
        }
    }

    /// A translated stream that ended without the provider's end of the answer (an
    /// error event, or the connection closed early): it was cut.
    pub fn failed(&self) -> bool {
        match self {
            Tap::OpenAi(_) => false,
            Tap::Translated(t) => !t.complete(),
        }
    }

    /// After the provider's stream ended: what is left for the client (the usage chunk
    /// if asked for, `[DONE]` for a stream that ended properly).
    pub fn finish(&mut self) -> Bytes {
        self.finish_billed(None)
    }

    /// [`Tap::finish`] once the request is settled: the usage chunk (when the client
    /// asked for it) carries `x_credits_charged` and `x_credits_remaining`.
    pub fn finish_billed(&mut self, billed: Option<&Billed>) -> Bytes {
        match self {
            Tap::OpenAi(t) => t.finish_billed(billed),
            Tap::Translated(t) => t.finish_billed(billed),
        }
    }
}

/// Where reading a streamed answer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The provider ended its answer.
    Finished,
    /// The provider's stream broke, or a translated stream ended without the
    /// provider's end of the answer.
    UpstreamCut,
    /// No chunk within the provider's idle timeout.
    Silent,
    /// More than `server.max_response_bytes`: a provider that never ends its answer is
    /// cut rather than streamed for ever.
    TooLarge,
    /// The shutdown grace ended.
    ShutdownCut,
}

/// How a streamed answer ended: decided once, when the pump stops reading. The charge
/// (its estimate and the row's marks) and the end of the client's stream follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The client was reading when the answer stopped.
    Stopped(Stop),
    /// The client left (or stopped reading for `server.disconnect_drain_ms`); the
    /// answer was read on, for billing, until it stopped.
    ClientGone(Stop),
    /// The client left, and the drain time ran out before the answer stopped.
    DrainTimedOut,
    /// The client left while every drain permit (`server.disconnect_drains`) was
    /// taken: reading stopped at once. `unfinished`: a translated answer whose end had
    /// not come yet, marked `upstream_cut` as well.
    DrainSkipped { unfinished: bool },
}

impl StreamEnd {
    /// The client left before the end: its prompt is billed at the bound the hold
    /// covers when no usage came, not at a guess it could make low.
    pub fn client_gone(self) -> bool {
        !matches!(self, StreamEnd::Stopped(_))
    }

    /// The client is still there and nothing on our side cut the answer: once it is
    /// settled, the client gets the rest of the stream (`[DONE]` for a finished one).
    pub fn client_reads_the_end(self) -> bool {
        matches!(
            self,
            StreamEnd::Stopped(Stop::Finished | Stop::UpstreamCut | Stop::Silent)
        )
    }

    /// The marks of the usage row's metadata (each `true`), in this order.
    pub fn marks(self) -> impl Iterator<Item = &'static str> {
        let stop = match self {
            StreamEnd::Stopped(s) | StreamEnd::ClientGone(s) => Some(s),
            StreamEnd::DrainTimedOut | StreamEnd::DrainSkipped { .. } => None,
        };
        let cut = matches!(stop, Some(Stop::UpstreamCut | Stop::Silent))
            || self == StreamEnd::DrainSkipped { unfinished: true };
        [
            (self.client_gone(), "client_disconnected"),
            (cut, "upstream_cut"),
            (stop == Some(Stop::Silent), "upstream_timeout"),
            (stop == Some(Stop::ShutdownCut), "shutdown_cut"),
            (stop == Some(Stop::TooLarge), "answer_too_large"),
            (self == StreamEnd::DrainTimedOut, "drain_timed_out"),
            (
                matches!(self, StreamEnd::DrainSkipped { .. }),
                "drain_skipped",
            ),
        ]
        .into_iter()
        .filter_map(|(on, mark)| on.then_some(mark))
    }
}

pub struct SseTap {
    buf: BytesMut,
    client_wants_usage: bool,
    usage: Option<Usage>,
    done: bool,
    bytes: usize,
    events: usize,
    tool_call: bool,
    /// The usage-only chunk's payload, held back (when the client asked for it) to be
    /// sent after the settle with the charge's figures.
    withheld: Option<Vec<u8>>,
    /// The stream's id, object, created and model (from its first event, only when the
    /// client asked for usage): for a usage chunk the provider did not send.
    meta: Option<Box<ChunkMeta>>,
}

/// What a usage chunk the gateway adds repeats of the stream's chunks.
#[derive(Debug, Default, serde::Deserialize)]
struct ChunkMeta {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    object: Option<serde_json::Value>,
    #[serde(default)]
    created: Option<serde_json::Value>,
    #[serde(default)]
    model: Option<serde_json::Value>,
}

/// `payload` (a JSON object's text) with the charge's figures added as its last
/// fields, on one line; `None` when it is not an object.
fn with_charge_fields(payload: &[u8], billed: &Billed) -> Option<Vec<u8>> {
    let end = payload.iter().rposition(|c| !c.is_ascii_whitespace())?;
    if payload.get(end) != Some(&b'}')
        || payload.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{')
    {
        return None;
    }
    let body = &payload[..end];
    let empty = body.iter().skip(1).all(u8::is_ascii_whitespace);
    let mut out = Vec::with_capacity(payload.len() + 64);
    // A raw newline in valid JSON is whitespace (strings cannot hold one): one line.
    out.extend(
        body.iter()
            .map(|c| if *c == b'\n' || *c == b'\r' { b' ' } else { *c }),
    );
    for (i, (k, v)) in charge_fields(billed).into_iter().enumerate() {
        if i > 0 || !empty {
            out.push(b',');
        }
        out.extend_from_slice(serde_json::Value::String(k).to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(v.to_string().as_bytes());
    }
    out.push(b'}');
    Some(out)
}

/// Whether `b` holds a `"usage"` key whose value is an object (whitespace allowed),
/// as opposed to the `"usage":null` of ordinary chunks.
pub fn has_usage_object(b: &[u8]) -> bool {
    memmem::find_iter(b, b"\"usage\"").any(|i| {
        let mut rest = b[i + 7..].iter().skip_while(|c| c.is_ascii_whitespace());
        rest.next() == Some(&b':') && rest.find(|c| !c.is_ascii_whitespace()) == Some(&b'{')
    })
}

#[derive(serde::Deserialize)]
struct ChoicesOnly {
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

/// Where the first event of `buf` ends: (end of its body, start of the next).
pub(crate) fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memmem::find(buf, b"\n\n").map(|i| (i, i + 2));
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The `data:` payload of one event (multiple data lines joined by `\n`).
fn event_data(event: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            if !out.is_empty() {
                out.push(b'\n');
            }
            out.extend_from_slice(rest);
        }
    }
    out
}

impl SseTap {
    pub fn new(client_wants_usage: bool) -> SseTap {
        SseTap {
            buf: BytesMut::new(),
            client_wants_usage,
            usage: None,
            done: false,
            bytes: 0,
            events: 0,
            tool_call: false,
            withheld: None,
            meta: None,
        }
    }

    /// Notes the stream's id, object, created and model from its first data event (only
    /// when the client asked for usage: a usage chunk may have to be made).
    fn note_meta(&mut self, data: &[u8]) {
        if self.client_wants_usage && self.meta.is_none() && data != b"[DONE]" {
            self.meta = Some(Box::new(serde_json::from_slice(data).unwrap_or_default()));
        }
    }

    /// The usage the provider reported, if any.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Bytes received from the provider so far.
    pub fn bytes_seen(&self) -> usize {
        self.bytes
    }

    /// Data events received so far (a provider's stream carries about one token each).
    pub fn events_seen(&self) -> usize {
        self.events
    }

    /// Feeds one frame from the provider; returns what to send the client now.
    pub fn feed(&mut self, chunk: Bytes) -> Option<Bytes> {
        self.bytes += chunk.len();
        if self.buf.is_empty()
            && chunk.ends_with(b"\n\n")
            && !has_usage_object(&chunk)
            && memmem::find(&chunk, b"[DONE]").is_none()
        {
            self.events += memmem::find_iter(&chunk, b"data:").count();
            self.tool_call = self.tool_call || finished_with_tool_calls(&chunk);
            if self.client_wants_usage && self.meta.is_none() {
                if let Some((end, _)) = find_event_end(&chunk) {
                    let data = event_data(&chunk[..end]);
                    self.note_meta(&data);
                }
            }
            return Some(chunk);
        }
        self.buf.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        while let Some((end, next)) = find_event_end(&self.buf) {
            let event = self.buf.split_to(next);
            self.process(&event[..end], &event, &mut out);
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    fn process(&mut self, body: &[u8], whole: &[u8], out: &mut BytesMut) {
        let data = event_data(body);
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        if !data.is_empty() {
            self.events += 1;
            self.tool_call = self.tool_call || finished_with_tool_calls(&data);
            self.note_meta(&data);
        }
        if has_usage_object(&data) {
            if let Some(u) = Usage::from_openai_json(&data) {
                self.usage = Some(u);
                let usage_only = serde_json::from_slice::<ChoicesOnly>(&data)
                    .map(|c| c.choices.map(|v| v.is_empty()).unwrap_or(true))
                    .unwrap_or(false);
                if usage_only {
                    // Asked for: sent after the settle, with the charge's figures.
                    if self.client_wants_usage {
                        self.withheld = Some(data);
                    }
                    return;
                }
            }
        }
        out.extend_from_slice(whole);
    }

    /// After the provider's stream ended: the usage chunk held back, whatever is left,
    /// then the withheld `[DONE]`.
    pub fn finish(&mut self) -> Bytes {
        self.finish_billed(None)
    }

    /// [`SseTap::finish`] once the request is settled: the usage chunk (when the client
    /// asked for it) carries the charge's figures as its last fields; a stream that
    /// ended properly without one gets one, with the usage charged (an estimate).
    pub fn finish_billed(&mut self, billed: Option<&Billed>) -> Bytes {
        let mut out = BytesMut::new();
        let usage_chunk = match (self.withheld.take(), billed) {
            (Some(payload), Some(b)) => Some(with_charge_fields(&payload, b).unwrap_or(payload)),
            (Some(payload), None) => Some(payload),
            (None, Some(b)) if self.client_wants_usage && self.done => {
                Some(self.made_usage_chunk(b))
            }
            (None, _) => None,
        };
        if let Some(payload) = usage_chunk {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&payload);
            out.extend_from_slice(b"\n\n");
        }
        if !self.buf.is_empty() {
            let rest = self.buf.split();
            out.extend_from_slice(&rest);
            if !rest.ends_with(b"\n\n") {
                out.extend_from_slice(b"\n\n");
            }
        }
        if self.done {
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        out.freeze()
    }

    /// A usage-only chunk for a stream whose provider sent none: the stream's id,
    /// object, created and model, the usage charged and the charge's figures.
    fn made_usage_chunk(&self, b: &Billed) -> Vec<u8> {
        let meta = self.meta.as_deref();
        let field = |f: fn(&ChunkMeta) -> &Option<serde_json::Value>| {
            meta.and_then(|m| f(m).clone())
                .unwrap_or(serde_json::Value::Null)
        };
        let object = meta
            .and_then(|m| m.object.clone())
            .unwrap_or_else(|| "chat.completion.chunk".into());
        let mut c = serde_json::json!({
            "id": field(|m| &m.id),
            "object": object,
            "created": field(|m| &m.created),
            "model": field(|m| &m.model),
            "choices": [],
            "usage": crate::translate::usage_json(&b.usage),
        });
        if let serde_json::Value::Object(m) = &mut c {
            m.extend(charge_fields(b));
        }
        c.to_string().into_bytes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_end_of_a_stream_marks_bills_and_ends_the_client_stream_its_way() {
        use Stop::*;
        use StreamEnd::*;
        // (end, marks, billed at the prompt bound, client gets the end of the stream)
        let table: [(StreamEnd, &[&str], bool, bool); 13] = [
            (Stopped(Finished), &[], false, true),
            (Stopped(UpstreamCut), &["upstream_cut"], false, true),
            (
                Stopped(Silent),
                &["upstream_cut", "upstream_timeout"],
                false,
                true,
            ),
            (Stopped(TooLarge), &["answer_too_large"], false, false),
            (Stopped(ShutdownCut), &["shutdown_cut"], false, false),
            (ClientGone(Finished), &["client_disconnected"], true, false),
            (
                ClientGone(UpstreamCut),
                &["client_disconnected", "upstream_cut"],
                true,
                false,
            ),
            (
                ClientGone(Silent),
                &["client_disconnected", "upstream_cut", "upstream_timeout"],
                true,
                false,
            ),
            (
                ClientGone(TooLarge),
                &["client_disconnected", "answer_too_large"],
                true,
                false,
            ),
            (
                ClientGone(ShutdownCut),
                &["client_disconnected", "shutdown_cut"],
                true,
                false,
            ),
            (
                DrainTimedOut,
                &["client_disconnected", "drain_timed_out"],
                true,
                false,
            ),
            (
                DrainSkipped { unfinished: false },
                &["client_disconnected", "drain_skipped"],
                true,
                false,
            ),
            (
                DrainSkipped { unfinished: true },
                &["client_disconnected", "upstream_cut", "drain_skipped"],
                true,
                false,
            ),
        ];
        for (end, marks, gone, reads_end) in table {
            assert_eq!(end.marks().collect::<Vec<_>>(), marks, "{end:?}");
            assert_eq!(end.client_gone(), gone, "{end:?}");
            assert_eq!(end.client_reads_the_end(), reads_end, "{end:?}");
        }
    }

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n",
    );

    fn run(tap: &mut SseTap, pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            if let Some(b) = tap.feed(Bytes::copy_from_slice(p)) {
                out.extend_from_slice(&b);
            }
        }
        out.extend_from_slice(&tap.finish());
        out
    }

    #[test]
    fn strips_usage_chunk_the_client_did_not_ask_for() {
        let mut tap = SseTap::new(false);
        let out = run(&mut tap, &[STREAM.as_bytes()]);
        let s = String::from_utf8(out).unwrap();
        assert!(!s.contains("\"choices\":[]"), "{s}");
        assert!(s.ends_with("data: [DONE]\n\n"));
        assert_eq!(s.matches("data: ").count(), 4);
        assert_eq!(tap.usage().unwrap().total_tokens, 7);
    }

    #[test]
    fn keeps_usage_chunk_when_asked() {
        let mut tap = SseTap::new(true);
        let out = run(&mut tap, &[STREAM.as_bytes()]);
        assert_eq!(out, STREAM.as_bytes());
    }

    /// The usage-only chunk of [`STREAM`] as an event.
    const USAGE_EVENT: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";

    #[test]
    fn done_and_the_usage_chunk_are_withheld_until_finish() {
        let mut tap = SseTap::new(true);
        let mut out = Vec::new();
        if let Some(b) = tap.feed(Bytes::from_static(STREAM.as_bytes())) {
            out.extend_from_slice(&b);
        }
        let s = String::from_utf8_lossy(&out);
        assert!(!s.contains("[DONE]"));
        assert!(!s.contains("\"usage\":{"), "{s}");
        assert_eq!(
            String::from_utf8_lossy(&tap.finish()),
            format!("{USAGE_EVENT}data: [DONE]\n\n")
        );
    }

    fn billed(credits: i64, remaining: Option<i64>) -> Billed {
        Billed {
            usage: Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                total_tokens: 7,
                cached_tokens: 0,
                estimated: false,
            },
            credits,
            remaining,
        }
    }

    #[test]
    fn the_usage_chunk_carries_the_charge_after_the_settle() {
        let mut tap = SseTap::new(true);
        let out = tap.feed(Bytes::from_static(STREAM.as_bytes())).unwrap();
        let tail = tap.finish_billed(Some(&billed(3, Some(97))));
        assert_eq!(
            String::from_utf8_lossy(&tail),
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7},\"x_credits_charged\":3,\"x_credits_remaining\":97}\n\ndata: [DONE]\n\n"
        );
        // Everything else went out as it came, in order.
        let mut whole = out.to_vec();
        whole.extend_from_slice(&tap.finish());
        assert!(!String::from_utf8_lossy(&whole).contains("x_credits"));
        // A balance the ledger could not tell is left out; a client that did not ask for
        // usage gets no usage chunk at all.
        let mut tap = SseTap::new(true);
        tap.feed(Bytes::from_static(STREAM.as_bytes()));
        let tail = String::from_utf8(tap.finish_billed(Some(&billed(3, None))).to_vec()).unwrap();
        assert!(
            tail.contains(",\"x_credits_charged\":3}") && !tail.contains("remaining"),
            "{tail}"
        );
        let mut tap = SseTap::new(false);
        tap.feed(Bytes::from_static(STREAM.as_bytes()));
        assert_eq!(
            &tap.finish_billed(Some(&billed(3, Some(97))))[..],
            b"data: [DONE]\n\n"
        );
    }

    #[test]
    fn a_stream_without_usage_gets_a_usage_chunk_with_the_estimate_charged() {
        let no_usage = STREAM.replace(USAGE_EVENT, "");
        let mut tap = SseTap::new(true);
        tap.feed(Bytes::from(no_usage.clone()));
        assert!(tap.usage().is_none());
        let mut b = billed(1, Some(9));
        b.usage.estimated = true;
        let tail = String::from_utf8(tap.finish_billed(Some(&b)).to_vec()).unwrap();
        let (chunk, done) = tail.split_once("\n\n").unwrap();
        assert_eq!(done, "data: [DONE]\n\n");
        let v: serde_json::Value =
            serde_json::from_str(chunk.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["id"], "c", "the stream's own id: {v}");
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"], serde_json::json!([]));
        assert_eq!(v["usage"]["total_tokens"], 7);
        assert_eq!(
            (
                v["x_credits_charged"].as_i64(),
                v["x_credits_remaining"].as_i64()
            ),
            (Some(1), Some(9))
        );
        // A cut stream (no [DONE]) gets none.
        let cut = no_usage.replace("data: [DONE]\n\n", "");
        let mut tap = SseTap::new(true);
        tap.feed(Bytes::from(cut));
        assert!(tap.finish_billed(Some(&b)).is_empty());
    }

    #[test]
    fn figures_are_added_to_any_spelling_of_the_usage_chunk() {
        let b = billed(2, Some(5));
        let v = |s: &[u8]| -> serde_json::Value {
            serde_json::from_slice(&with_charge_fields(s, &b).unwrap()).unwrap()
        };
        let spaced = v(b"{ \"choices\" : [],\n \"usage\": {\"total_tokens\": 7} }  ");
        assert_eq!(spaced["x_credits_charged"], 2);
        assert_eq!(spaced["usage"]["total_tokens"], 7);
        assert_eq!(v(b"{}")["x_credits_remaining"], 5);
        assert!(with_charge_fields(b"[1]", &b).is_none());
        assert!(with_charge_fields(b"", &b).is_none());
    }

    #[test]
    fn whole_event_frames_pass_without_copy() {
        let mut tap = SseTap::new(false);
        let frame =
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        let out = tap.feed(frame.clone()).unwrap();
        assert_eq!(out.as_ptr(), frame.as_ptr());
    }

    #[test]
    fn usage_objects_are_found_with_any_spacing() {
        assert!(has_usage_object(br#"{"usage":{"total_tokens":1}}"#));
        assert!(has_usage_object(b"{\"usage\" :\n { \"total_tokens\":1}}"));
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(!has_usage_object(br#"{"usage" : null, "x":{}}"#));
        assert!(!has_usage_object(br#"{"usage"#));
        let spaced = STREAM.replace("\"usage\":{", "\"usage\": {");
        let mut tap = SseTap::new(false);
        let out = run(&mut tap, &[spaced.as_bytes()]);
        assert_eq!(tap.usage().unwrap().total_tokens, 7);
        assert!(!String::from_utf8(out).unwrap().contains("\"choices\":[]"));
    }

    #[test]
    fn a_tool_call_finish_is_seen_with_any_spacing() {
        assert!(finished_with_tool_calls(
            br#"{"choices":[{"finish_reason":"tool_calls"}]}"#
        ));
        assert!(finished_with_tool_calls(
            b"{\"finish_reason\" :\n \"function_call\"}"
        ));
        assert!(!finished_with_tool_calls(br#"{"finish_reason":"stop"}"#));
        assert!(!finished_with_tool_calls(
            br#"{"content":"\"finish_reason\":\"tool_calls\"","finish_reason":null}"#
        ));
        let mut tap = SseTap::new(false);
        tap.feed(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        ));
        assert!(tap.tool_call);
        let mut tap = SseTap::new(false);
        run(&mut tap, &[STREAM.as_bytes()]);
        assert!(!tap.tool_call);
    }

    #[test]
    fn crlf_events_are_understood() {
        let s = STREAM.replace("\n\n", "\r\n\r\n");
        let mut tap = SseTap::new(false);
        let out = run(&mut tap, &[s.as_bytes()]);
        assert_eq!(tap.usage().unwrap().total_tokens, 7);
        assert!(!String::from_utf8(out).unwrap().contains("\"choices\":[]"));
    }

    proptest! {
        /// Split anywhere, the tap yields the same bytes and the same usage.
        #[test]
        fn framing_does_not_matter(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..12), wants in any::<bool>()) {
            let mut whole = SseTap::new(wants);
            let expected = run(&mut whole, &[STREAM.as_bytes()]);
            let mut cuts = cuts;
            cuts.sort_unstable();
            cuts.dedup();
            let bytes = STREAM.as_bytes();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in cuts { pieces.push(&bytes[last..c]); last = c; }
            pieces.push(&bytes[last..]);
            let mut split = SseTap::new(wants);
            let got = run(&mut split, &pieces);
            prop_assert_eq!(got, expected);
            prop_assert_eq!(split.usage(), whole.usage());
        }
    }
}
