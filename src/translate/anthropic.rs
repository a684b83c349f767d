//! OpenAI chat completions ⇄ Anthropic Messages API (`POST /v1/messages`).

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{json, Map, Value};

use super::{
    arguments, bad, chat_completion, check_keys, function_tools, number_in, secret, stop_list,
    text_of, tool_choice, user_parts, Answer, AnswerError, ChunkWriter, Endpoint, Part,
    ProviderUsage, Step, StreamState, ToolChoice, Translation, Wire,
};
use crate::error::ApiError;
use crate::route::Model;
use crate::sse::SseEvent;
use crate::usage::Usage;

/// The API version the gateway speaks (sent as `anthropic-version`).
pub const VERSION: &str = "2023-06-01";

/// Prompt tokens Anthropic adds to a request with tools (its tool-use system prompt:
/// 313–346 for the current models, per its pricing documentation), which are not in
/// the body.
const TOOL_PROMPT_TOKENS: i64 = 400;

/// Anthropic's Messages API (`providers.anthropic`, `models.provider = 'anthropic'`):
/// chat only, key in `x-api-key`.
pub struct Anthropic;

impl Wire for Anthropic {
    fn translation(&self) -> Option<&dyn Translation> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn offers(&self, endpoint: Endpoint) -> bool {
        endpoint == Endpoint::Chat
    }

    fn url(&self, base: &str, endpoint: Endpoint, _model: &str, _stream: bool) -> Option<String> {
        (endpoint == Endpoint::Chat).then(|| format!("{base}/v1/messages"))
    }

    fn auth_headers(&self, key: Option<&str>) -> Vec<(HeaderName, HeaderValue)> {
        let mut h = Vec::with_capacity(2);
        if let Some(k) = key.and_then(secret) {
            h.push((HeaderName::from_static("x-api-key"), k));
        }
        h.push((
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(VERSION),
        ));
        h
    }

    fn tool_prompt_tokens(&self) -> i64 {
        TOOL_PROMPT_TOKENS
    }

    fn answer(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        id: &dyn std::fmt::Display,
        model: &str,
    ) -> Result<Answer, AnswerError> {
        if endpoint != Endpoint::Chat {
            return Err(AnswerError::NotAnthropic);
        }
        let v: Value = serde_json::from_slice(&body)?;
        let (message, finish, usage) = response(&v)?;
        Ok(chat_completion(message, finish, usage, id, model))
    }

    fn error(&self, status: StatusCode, body: Bytes) -> Bytes {
        // {"type":"error","error":{"type":"invalid_request_error","message":"..."}}
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        super::error_body(
            status,
            v["error"]["message"].as_str(),
            v["error"]["type"].as_str(),
        )
    }
}

impl Translation for Anthropic {
    fn chat_request(&self, req: Map<String, Value>, model: &Model) -> Result<Value, ApiError> {
        request(&req, model)
    }
    fn set_max_tokens(&self, body: &mut Value, n: i64) {
        body["max_tokens"] = Value::from(n);
    }
    fn default_temperature(&self, body: &mut Value, t: f64) {
        if let Some(o) = body.as_object_mut() {
            o.entry("temperature")
                .or_insert_with(|| Value::from(t.clamp(0.0, 1.0)));
        }
    }
    fn stream_state(&self) -> Box<dyn StreamState + Send> {
        Box::<Stream>::default()
    }
}

const KNOWN: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "n",
    "response_format",
];

/// OpenAI chat body → Anthropic Messages body (`max_tokens` is set afterwards).
pub fn request(req: &Map<String, Value>, model: &Model) -> Result<Value, ApiError> {
    check_keys(req, KNOWN, "Anthropic")?;
    if req.get("n").and_then(Value::as_i64).is_some_and(|n| n != 1) {
        return Err(bad(
            "n",
            "Anthropic models answer with one choice (`n` = 1)",
        ));
    }
    match req.get("response_format").map(|f| &f["type"]) {
        None | Some(Value::Null) => {}
        Some(t) if t == "text" => {}
        Some(_) => {
            return Err(bad(
                "response_format",
                "Anthropic models have no JSON mode; only `response_format` `text` is accepted",
            ))
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::String(model.name.clone()));
    let mut system: Vec<Value> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let msgs = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages", "`messages` must be an array"))?;
    for m in msgs {
        let content = &m["content"];
        let (role, blocks) = match m["role"].as_str() {
            Some("system" | "developer") => {
                let t = text_of(content, "messages")?;
                system.push(json!({"type": "text", "text": t}));
                continue;
            }
            Some("user") => ("user", user_blocks(content, model)?),
            Some("assistant") => {
                let mut blocks = Vec::new();
                let t = text_of(content, "messages")?;
                if !t.is_empty() {
                    blocks.push(json!({"type": "text", "text": t}));
                }
                if let Some(calls) = m["tool_calls"].as_array() {
                    for c in calls {
                        blocks.push(json!({
                            "type": "tool_use",
                            "id": c["id"].as_str().unwrap_or_default(),
                            "name": c["function"]["name"].as_str().unwrap_or_default(),
                            "input": arguments(&c["function"]["arguments"])?,
                        }));
                    }
                }
                ("assistant", blocks)
            }
            Some("tool") => {
                let id = m["tool_call_id"]
                    .as_str()
                    .ok_or_else(|| bad("messages", "a `tool` message needs `tool_call_id`"))?;
                (
                    "user",
                    vec![json!({
                        "type": "tool_result",
                        "tool_use_id": id,
                        "content": text_of(content, "messages")?,
                    })],
                )
            }
            _ => {
                return Err(bad(
                    "messages",
                    "message roles must be system, developer, user, assistant or tool",
                ))
            }
        };
        if blocks.is_empty() {
            continue;
        }
        // Consecutive messages of one role become one (tool results follow the call).
        super::push_turn(&mut messages, role, "content", blocks);
    }
    if messages.is_empty() {
        return Err(bad(
            "messages",
            "Anthropic models need at least one user or assistant message",
        ));
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(t) = req.get("temperature").filter(|v| !v.is_null()) {
        out.insert(
            "temperature".into(),
            number_in(t, "temperature", 0.0, 1.0, "Anthropic")?,
        );
    }
    if let Some(t) = req.get("top_p").filter(|v| !v.is_null()) {
        out.insert(
            "top_p".into(),
            number_in(t, "top_p", 0.0, 1.0, "Anthropic")?,
        );
    }
    if let Some(s) = req.get("stop") {
        let s = stop_list(s)?;
        if !s.is_empty() {
            out.insert("stop_sequences".into(), Value::Array(s));
        }
    }
    if let Some(u) = req.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({ "user_id": u }));
    }
    let tools = match req.get("tools") {
        Some(t) if !t.is_null() => function_tools(t, model)?,
        _ => vec![],
    };
    if !tools.is_empty() {
        let tools: Vec<Value> = tools
            .into_iter()
            .map(|(name, desc, params)| {
                let mut t = json!({"name": name, "input_schema": params});
                if let Some(d) = desc {
                    t["description"] = Value::String(d);
                }
                t
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    let parallel = req.get("parallel_tool_calls").and_then(Value::as_bool);
    let choice = match req.get("tool_choice") {
        Some(c) if !c.is_null() => Some(tool_choice(c)?),
        _ => None,
    };
    if choice.is_some() || parallel == Some(false) {
        if !out.contains_key("tools") {
            return Err(bad("tool_choice", "`tool_choice` needs `tools`"));
        }
        let mut c = match choice.unwrap_or(ToolChoice::Auto) {
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Function(name) => json!({"type": "tool", "name": name}),
        };
        if parallel == Some(false) && c["type"] != "none" {
            c["disable_parallel_tool_use"] = Value::Bool(true);
        }
        out.insert("tool_choice".into(), c);
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
    }
    Ok(Value::Object(out))
}

fn user_blocks(content: &Value, model: &Model) -> Result<Vec<Value>, ApiError> {
    Ok(user_parts(content, model)?
        .into_iter()
        .filter(|p| !matches!(p, Part::Text(t) if t.is_empty()))
        .map(|p| match p {
            Part::Text(t) => json!({"type": "text", "text": t}),
            Part::InlineImage { media_type, data } => json!({
                "type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data},
            }),
            Part::UrlImage(url) => json!({"type": "image", "source": {"type": "url", "url": url}}),
        })
        .collect())
}

pub fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Anthropic's `input_tokens` excludes both cache counts: the prompt is all three,
/// cache writes (`cache_creation_input_tokens`) charged as input, cache reads
/// (`cache_read_input_tokens`) at the cached-input rate. A later event's counts are
/// cumulative: the prompt never shrinks.
fn read_usage(u: &Value, into: &mut ProviderUsage) {
    let n = |k: &str| u[k].as_i64().map(|x| x.max(0));
    if let Some(i) = n("input_tokens") {
        let create = n("cache_creation_input_tokens").unwrap_or(0);
        let read = n("cache_read_input_tokens").unwrap_or(0);
        into.prompt = into
            .prompt
            .max(i.saturating_add(create).saturating_add(read));
        into.cached = read;
    }
    // Output tokens are cumulative in every event that carries them: the last wins.
    if let Some(o) = n("output_tokens") {
        into.completion = o;
    }
    into.total = into.prompt.saturating_add(into.completion);
}

/// A Messages answer → (OpenAI message, finish reason, usage).
pub fn response(v: &Value) -> Result<(Value, &'static str, Option<Usage>), super::AnswerError> {
    if v["type"] != "message" {
        return Err(super::AnswerError::NotAnthropic);
    }
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in v["content"].as_array().into_iter().flatten() {
        match b["type"].as_str() {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(json!({
                "id": b["id"],
                "type": "function",
                "function": {"name": b["name"], "arguments": b["input"].to_string()},
            })),
            _ => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let finish = finish_reason(v["stop_reason"].as_str().unwrap_or("end_turn"));
    let usage = v.get("usage").filter(|u| u.is_object()).map(|u| {
        let mut p = ProviderUsage::default();
        read_usage(u, &mut p);
        p.usage()
    });
    Ok((message, finish, usage))
}

/// Stream state: content block index → OpenAI tool-call index.
#[derive(Default)]
pub struct Stream {
    tools: HashMap<i64, i64>,
    usage: ProviderUsage,
    started: bool,
    final_usage: bool,
    stopped: bool,
}

impl StreamState for Stream {
    fn event(&mut self, ev: &SseEvent, w: &mut ChunkWriter, out: &mut BytesMut) -> Step {
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return Step::Continue;
        };
        let kind = v["type"].as_str().or(ev.event.as_deref()).unwrap_or("");
        match kind {
            "message_start" => {
                self.started = true;
                read_usage(&v["message"]["usage"], &mut self.usage);
                w.role(out);
            }
            "content_block_start" => {
                let b = &v["content_block"];
                match b["type"].as_str() {
                    Some("tool_use") => {
                        let i = i64::try_from(self.tools.len()).unwrap_or(i64::MAX);
                        self.tools.insert(v["index"].as_i64().unwrap_or(-1), i);
                        w.delta(
                            out,
                            json!({"tool_calls": [{
                                "index": i, "id": b["id"], "type": "function",
                                "function": {"name": b["name"], "arguments": ""},
                            }]}),
                        );
                    }
                    Some("text") => w.text(out, b["text"].as_str().unwrap_or_default()),
                    _ => {}
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => w.text(out, d["text"].as_str().unwrap_or_default()),
                    Some("input_json_delta") => {
                        let Some(i) = self.tools.get(&v["index"].as_i64().unwrap_or(-1)) else {
                            return Step::Continue;
                        };
                        let part = d["partial_json"].as_str().unwrap_or_default();
                        if !part.is_empty() {
                            w.delta(
                                out,
                                json!({"tool_calls": [{"index": i, "function": {"arguments": part}}]}),
                            );
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                read_usage(&v["usage"], &mut self.usage);
                self.final_usage = true;
                if let Some(stop) = v["delta"]["stop_reason"].as_str() {
                    if !self.stopped {
                        self.stopped = true;
                        w.finish(out, finish_reason(stop));
                    }
                }
            }
            "message_stop" if !self.stopped => {
                self.stopped = true;
                w.finish(out, "stop");
            }
            "error" => return Step::Failed,
            _ => {}
        }
        Step::Continue
    }

    fn usage(&self) -> Option<Usage> {
        (self.started && self.final_usage).then(|| self.usage.usage())
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    fn tool_call(&self) -> bool {
        !self.tools.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::super::tests::response as translate_response;
    use super::super::tests::{chunks, model, run};
    use super::super::StreamTranslator;
    use super::*;

    fn req(v: Value) -> Result<Value, ApiError> {
        request(
            v.as_object().unwrap(),
            &model("anthropic", &["text", "vision", "function_calling"]),
        )
    }

    #[test]
    fn system_roles_images_and_sampling_are_translated() {
        let out = req(json!({
            "model": "claude",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
                ]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Sure?"}
            ],
            "temperature": 0.5, "top_p": 0.9, "stop": "END", "user": "u-1", "stream": true
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "anthropic-upstream",
                "system": [{"type": "text", "text": "You are terse."}],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
                    ]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}
                ],
                "temperature": 0.5, "top_p": 0.9, "stop_sequences": ["END"],
                "metadata": {"user_id": "u-1"}, "stream": true
            })
        );
    }

    #[test]
    fn tools_choice_calls_and_results_round_trip() {
        let out = req(json!({
            "model": "claude",
            "messages": [
                {"role": "user", "content": "Weather in SF?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "toolu_01A", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"San Francisco, CA\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_01A", "content": "15 degrees"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}],
            "tool_choice": "required", "parallel_tool_calls": false
        }))
        .unwrap();
        assert_eq!(
            out["tools"],
            json!([{"name": "get_weather", "description": "Get the weather",
                "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}])
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            out["messages"][1],
            json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"location": "San Francisco, CA"}}]})
        );
        assert_eq!(
            out["messages"][2],
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "15 degrees"}]})
        );
        let named = req(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}))
        .unwrap();
        assert_eq!(named["tool_choice"], json!({"type": "tool", "name": "f"}));
        assert_eq!(
            named["tools"][0]["input_schema"],
            json!({"type": "object", "properties": {}})
        );
    }

    #[test]
    fn unsupported_parameters_are_400_naming_them() {
        let cases = [
            (json!({"seed": 1}), "seed"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"frequency_penalty": 0.5}), "frequency_penalty"),
            (json!({"n": 2}), "n"),
            (json!({"temperature": 1.5}), "temperature"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"stop": 5}), "stop"),
        ];
        for (extra, param) in cases {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            match req(body) {
                Err(ApiError::InvalidRequest { param: p, .. }) => assert_eq!(p, Some(param)),
                other => panic!("{param}: {other:?}"),
            }
        }
        let no_vision = request(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]})
                .as_object()
                .unwrap(),
            &model("anthropic", &["text"]),
        );
        assert!(
            matches!(no_vision, Err(ApiError::InvalidRequest { ref message, .. }) if message.contains("images"))
        );
    }

    /// The non-streaming example of Anthropic's Messages API reference.
    #[test]
    fn documented_message_becomes_a_chat_completion() {
        let body = br#"{
          "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
          "type": "message",
          "role": "assistant",
          "model": "claude-3-5-sonnet-20241022",
          "content": [{"type": "text", "text": "Hi! My name is Claude."}],
          "stop_reason": "end_turn",
          "stop_sequence": null,
          "usage": {"input_tokens": 2095, "output_tokens": 503, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 100}
        }"#;
        let a = translate_response(&Anthropic, body, "chatcmpl-1", "claude-3.5-sonnet").unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["id"], "chatcmpl-1");
        assert_eq!(v["model"], "claude-3.5-sonnet");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Hi! My name is Claude."
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 2205, "completion_tokens": 503, "total_tokens": 2708, "prompt_tokens_details": {"cached_tokens": 100}})
        );
        assert_eq!(a.usage.unwrap().total_tokens, 2708);
        assert!(!a.tool_call);

        let tool = br#"{"id":"msg_01Aq9w938a90dw8q","type":"message","role":"assistant","model":"claude-3-5-sonnet-20241022",
          "content":[{"type":"text","text":"I'll check the weather."},{"type":"tool_use","id":"toolu_01A09q90qw90lq917835lq9","name":"get_weather","input":{"location":"San Francisco, CA","unit":"celsius"}}],
          "stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":91}}"#;
        let a = translate_response(&Anthropic, tool, "c", "m").unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert!(a.tool_call);
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(
            args,
            json!({"location": "San Francisco, CA", "unit": "celsius"})
        );
        assert_eq!(a.usage.unwrap().total_tokens, 563);
        assert!(translate_response(&Anthropic, b"{}", "c", "m").is_err());
    }

    /// The basic streaming example of Anthropic's streaming documentation.
    const TEXT_STREAM: &str = "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-3-5-sonnet-20241022\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}}}\n\nevent: content_block_start\ndata: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\nevent: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\nevent: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"!\"}}\n\nevent: content_block_stop\ndata: {\"type\": \"content_block_stop\", \"index\": 0}\n\nevent: message_delta\ndata: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\nevent: message_stop\ndata: {\"type\": \"message_stop\"}\n\n";

    /// The tool-use streaming example (input_json_delta) of the same page.
    const TOOL_STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_014p7gG3wDgGV9EUtLvnow3U\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-3-haiku-20240307\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"output_tokens\":2},\"content\":[],\"stop_reason\":null}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Okay\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01T1x1fJ34qAmk2tNTrN7Up6\",\"name\":\"get_weather\",\"input\":{}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"location\\\":\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\" \\\"San Francisco, CA\\\"}\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn documented_text_stream_becomes_chunks() {
        for step in [TEXT_STREAM.len(), 7, 1] {
            let mut t = StreamTranslator::new(&Anthropic, "chatcmpl-x", "claude", true).unwrap();
            let out = run(&mut t, TEXT_STREAM.as_bytes(), step);
            let c = chunks(&out);
            assert_eq!(
                c[0]["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""})
            );
            let text: String = c
                .iter()
                .filter_map(|x| x["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, "Hello!");
            for x in &c[..c.len() - 1] {
                assert_eq!(x["object"], "chat.completion.chunk");
                assert_eq!(x["id"], "chatcmpl-x");
                assert_eq!(x["model"], "claude");
            }
            let n = c.len();
            assert_eq!(c[n - 3]["choices"][0]["finish_reason"], "stop");
            // Output tokens are cumulative: 15, not 1 + 15.
            assert_eq!(
                c[n - 2]["usage"],
                json!({"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40, "prompt_tokens_details": {"cached_tokens": 0}})
            );
            assert_eq!(c[n - 2]["choices"], json!([]));
            assert_eq!(c[n - 1], Value::String("[DONE]".into()));
            assert_eq!(t.usage().unwrap().total_tokens, 40);
        }
        let mut t = StreamTranslator::new(&Anthropic, "c", "m", false).unwrap();
        let out = run(&mut t, TEXT_STREAM.as_bytes(), 3);
        let c = chunks(&out);
        assert!(c.iter().all(|x| x.get("usage").is_none() || x.is_string()));
        assert_eq!(t.usage().unwrap().total_tokens, 40);
    }

    #[test]
    fn documented_tool_stream_becomes_tool_call_deltas() {
        let mut t = StreamTranslator::new(&Anthropic, "c", "m", false).unwrap();
        let out = run(&mut t, TOOL_STREAM.as_bytes(), 5);
        let c = chunks(&out);
        let calls: Vec<&Value> = c
            .iter()
            .filter_map(|x| x["choices"][0]["delta"].get("tool_calls"))
            .collect();
        assert_eq!(calls[0][0]["id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
        assert_eq!(calls[0][0]["index"], 0);
        assert_eq!(calls[0][0]["function"]["name"], "get_weather");
        let args: String = calls
            .iter()
            .filter_map(|x| x[0]["function"]["arguments"].as_str())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"location": "San Francisco, CA"})
        );
        let finish: Vec<&Value> = c
            .iter()
            .map(|x| &x["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("tool_calls")]);
        assert!(t.tool_call());
        assert_eq!(t.usage().unwrap().total_tokens, 472 + 89);
    }

    #[test]
    fn a_cut_or_failed_stream_has_no_done_and_no_final_usage() {
        let cut = &TEXT_STREAM[..TEXT_STREAM.find("event: message_delta").unwrap()];
        let mut t = StreamTranslator::new(&Anthropic, "c", "m", true).unwrap();
        let out = run(&mut t, cut.as_bytes(), 9);
        assert!(!String::from_utf8(out).unwrap().contains("[DONE]"));
        assert!(t.usage().is_none());
        let failed = format!(
            "{}event: error\ndata: {{\"type\": \"error\", \"error\": {{\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}}}\n\n",
            &TEXT_STREAM[..TEXT_STREAM.find("event: content_block_stop").unwrap()]
        );
        let mut t = StreamTranslator::new(&Anthropic, "c", "m", true).unwrap();
        let out = run(&mut t, failed.as_bytes(), 4);
        assert!(t.failed());
        assert!(!String::from_utf8(out).unwrap().contains("[DONE]"));
    }

    /// `input_tokens` excludes cache reads and writes: the prompt is all three, the
    /// cached part the reads. A later event's cumulative counts never shrink the prompt,
    /// and its cache reads are the ones charged (none reported: none cached — a higher
    /// charge, never a lower one). The usage chunk after the settle carries the charge.
    #[test]
    fn cache_reads_and_writes_are_prompt_tokens_and_reads_are_cached() {
        let stream = TEXT_STREAM
            .replace(
                "\"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}",
                "\"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 7, \"cache_read_input_tokens\": 300, \"output_tokens\": 1}",
            )
            .replace(
                "\"usage\": {\"output_tokens\": 15}",
                "\"usage\": {\"input_tokens\": 20, \"output_tokens\": 15}",
            );
        assert_ne!(stream, TEXT_STREAM);
        let mut t = StreamTranslator::new(&Anthropic, "c", "m", true).unwrap();
        t.feed(stream.as_bytes());
        let u = t.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (332, 0, 15)
        );
        let billed = crate::usage::Billed {
            usage: u,
            credits: 4,
            remaining: Some(6),
        };
        let c = chunks(&t.finish_billed(Some(&billed)));
        assert_eq!(c[0]["usage"]["prompt_tokens"], 332);
        assert_eq!(
            (
                c[0]["x_credits_charged"].as_i64(),
                c[0]["x_credits_remaining"].as_i64()
            ),
            (Some(4), Some(6))
        );
        assert_eq!(c[1], "[DONE]");
        // Without a later input count, the reads are the cached part.
        let stream = TEXT_STREAM.replace(
            "\"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}",
            "\"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 7, \"cache_read_input_tokens\": 300, \"output_tokens\": 1}",
        );
        let mut t = StreamTranslator::new(&Anthropic, "c", "m", true).unwrap();
        t.feed(stream.as_bytes());
        let u = t.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.total_tokens),
            (332, 300, 347)
        );
        let c = chunks(&t.finish());
        assert_eq!(c[0]["usage"]["prompt_tokens_details"]["cached_tokens"], 300);
    }
}
