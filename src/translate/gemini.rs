//! OpenAI chat completions ⇄ Gemini `models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse`.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::{json, Map, Value};

use super::{
    arguments, bad, chat_completion, check_keys, function_tools, number_in, path_segment, secret,
    stop_list, text_of, tool_choice, user_parts, Answer, AnswerError, ChunkWriter, Endpoint, Part,
    ProviderUsage, Step, StreamState, ToolChoice, Translation, Wire,
};
use crate::error::ApiError;
use crate::route::Model;
use crate::sse::SseEvent;
use crate::usage::Usage;

/// Google's Gemini API (`providers.google`, `models.provider = 'google'`): chat and
/// embeddings, key in `x-goog-api-key`.
pub struct Gemini;

impl Wire for Gemini {
    fn translation(&self) -> Option<&dyn Translation> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        "google"
    }

    fn offers(&self, endpoint: Endpoint) -> bool {
        matches!(endpoint, Endpoint::Chat | Endpoint::Embeddings { .. })
    }

    fn url(&self, base: &str, endpoint: Endpoint, model: &str, stream: bool) -> Option<String> {
        if !path_segment(model) {
            return None;
        }
        match endpoint {
            Endpoint::Chat if stream => Some(format!(
                "{base}/v1beta/models/{model}:streamGenerateContent?alt=sse"
            )),
            Endpoint::Chat => Some(format!("{base}/v1beta/models/{model}:generateContent")),
            Endpoint::Embeddings { .. } => {
                Some(format!("{base}/v1beta/models/{model}:batchEmbedContents"))
            }
            Endpoint::Completions => None,
        }
    }

    fn auth_headers(&self, key: Option<&str>) -> Vec<(HeaderName, HeaderValue)> {
        key.and_then(secret)
            .map(|k| (HeaderName::from_static("x-goog-api-key"), k))
            .into_iter()
            .collect()
    }

    fn answer(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        id: &dyn std::fmt::Display,
        model: &str,
    ) -> Result<Answer, AnswerError> {
        match endpoint {
            Endpoint::Embeddings { base64 } => embed_response(&body, model, base64),
            _ => {
                let v: Value = serde_json::from_slice(&body)?;
                let (message, finish, usage) = response(&v)?;
                Ok(chat_completion(message, finish, usage, id, model))
            }
        }
    }

    fn error(&self, status: StatusCode, body: Bytes) -> Bytes {
        // {"error":{"code":400,"message":"...","status":"INVALID_ARGUMENT"}}
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        super::error_body(
            status,
            v["error"]["message"].as_str(),
            v["error"]["status"].as_str(),
        )
    }

    /// Gemini refuses a bad key with 400 `API_KEY_INVALID`.
    fn key_refused(&self, _status: StatusCode, body: &[u8]) -> bool {
        memchr::memmem::find(body, b"API_KEY_INVALID").is_some()
    }
}

impl Translation for Gemini {
    fn chat_request(&self, req: Map<String, Value>, model: &Model) -> Result<Value, ApiError> {
        request(&req, model)
    }
    fn set_max_tokens(&self, body: &mut Value, n: i64) {
        if let Some(o) = body.as_object_mut() {
            let gc = o
                .entry("generationConfig")
                .or_insert_with(|| Value::Object(Map::new()));
            gc["maxOutputTokens"] = Value::from(n);
        }
    }
    fn default_temperature(&self, body: &mut Value, t: f64) {
        if let Some(gc) = body.as_object_mut().and_then(|o| {
            o.entry("generationConfig")
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
        }) {
            gc.entry("temperature")
                .or_insert_with(|| Value::from(t.clamp(0.0, 2.0)));
        }
    }
    fn embeddings_request(
        &self,
        input: &Value,
        model: &Model,
        dimensions: Option<i64>,
    ) -> Result<Value, ApiError> {
        embed_request(input, model, dimensions)
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
    "seed",
    "presence_penalty",
    "frequency_penalty",
];

/// JSON-Schema keys Gemini's schema subset rejects.
fn clean_schema(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "additionalProperties" | "$schema" | "strict")
                })
                .map(|(k, v)| (k.clone(), clean_schema(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(clean_schema).collect()),
        _ => v.clone(),
    }
}

/// OpenAI chat body → Gemini `GenerateContentRequest` (the output limit is set afterwards).
pub fn request(req: &Map<String, Value>, model: &Model) -> Result<Value, ApiError> {
    check_keys(req, KNOWN, "Gemini")?;
    if req.get("n").and_then(Value::as_i64).is_some_and(|n| n != 1) {
        return Err(bad(
            "n",
            "Gemini models are served with one choice (`n` = 1)",
        ));
    }
    if req.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) {
        return Err(bad(
            "parallel_tool_calls",
            "Gemini models cannot be limited to one tool call per turn",
        ));
    }
    let msgs = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages", "`messages` must be an array"))?;
    let mut system: Vec<Value> = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // Tool call id → function name: Gemini's function responses are matched by name.
    let mut call_names: HashMap<String, String> = HashMap::new();
    for m in msgs {
        let content = &m["content"];
        let (role, parts) = match m["role"].as_str() {
            Some("system" | "developer") => {
                system.push(json!({"text": text_of(content, "messages")?}));
                continue;
            }
            Some("user") => {
                let parts = user_parts(content, model)?
                    .into_iter()
                    .filter(|p| !matches!(p, Part::Text(t) if t.is_empty()))
                    .map(|p| match p {
                        Part::Text(t) => Ok(json!({"text": t})),
                        Part::InlineImage { media_type, data } => {
                            Ok(json!({"inlineData": {"mimeType": media_type, "data": data}}))
                        }
                        Part::UrlImage(_) => Err(bad(
                            "messages",
                            "Gemini models take images as base64 data URLs only",
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                ("user", parts)
            }
            Some("assistant") => {
                let mut parts = Vec::new();
                let t = text_of(content, "messages")?;
                if !t.is_empty() {
                    parts.push(json!({ "text": t }));
                }
                for c in m["tool_calls"].as_array().into_iter().flatten() {
                    let name = c["function"]["name"].as_str().unwrap_or_default();
                    if let Some(id) = c["id"].as_str() {
                        call_names.insert(id.to_owned(), name.to_owned());
                    }
                    parts.push(json!({"functionCall": {
                        "name": name,
                        "args": arguments(&c["function"]["arguments"])?,
                    }}));
                }
                ("model", parts)
            }
            Some("tool") => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                let name = call_names.get(id).ok_or_else(|| {
                    bad(
                        "messages",
                        format!(
                            "the tool message's `tool_call_id` `{id}` matches no earlier tool call"
                        ),
                    )
                })?;
                let text = text_of(content, "messages")?;
                let result = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or(Value::String(text));
                (
                    "user",
                    vec![json!({"functionResponse": {
                        "name": name,
                        "response": {"name": name, "content": result},
                    }})],
                )
            }
            _ => {
                return Err(bad(
                    "messages",
                    "message roles must be system, developer, user, assistant or tool",
                ))
            }
        };
        if parts.is_empty() {
            continue;
        }
        super::push_turn(&mut contents, role, "parts", parts);
    }
    if contents.is_empty() {
        return Err(bad(
            "messages",
            "Gemini models need at least one user or assistant message",
        ));
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    let mut gc = Map::new();
    if let Some(t) = req.get("temperature").filter(|v| !v.is_null()) {
        gc.insert(
            "temperature".into(),
            number_in(t, "temperature", 0.0, 2.0, "Gemini")?,
        );
    }
    if let Some(t) = req.get("top_p").filter(|v| !v.is_null()) {
        gc.insert("topP".into(), number_in(t, "top_p", 0.0, 1.0, "Gemini")?);
    }
    if let Some(t) = req.get("presence_penalty").filter(|v| !v.is_null()) {
        gc.insert(
            "presencePenalty".into(),
            number_in(t, "presence_penalty", -2.0, 2.0, "Gemini")?,
        );
    }
    if let Some(t) = req.get("frequency_penalty").filter(|v| !v.is_null()) {
        gc.insert(
            "frequencyPenalty".into(),
            number_in(t, "frequency_penalty", -2.0, 2.0, "Gemini")?,
        );
    }
    if let Some(s) = req.get("seed").filter(|v| !v.is_null()) {
        if !s.is_i64() {
            return Err(bad("seed", "`seed` must be an integer"));
        }
        gc.insert("seed".into(), s.clone());
    }
    if let Some(s) = req.get("stop") {
        let s = stop_list(s)?;
        if !s.is_empty() {
            gc.insert("stopSequences".into(), Value::Array(s));
        }
    }
    match req.get("response_format") {
        None | Some(Value::Null) => {}
        Some(f) => match f["type"].as_str() {
            Some("text") => {}
            Some("json_object") => {
                gc.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                gc.insert("responseMimeType".into(), json!("application/json"));
                let schema = &f["json_schema"]["schema"];
                if !schema.is_null() {
                    gc.insert("responseSchema".into(), clean_schema(schema));
                }
            }
            _ => {
                return Err(bad(
                    "response_format",
                    "`response_format.type` must be text, json_object or json_schema",
                ))
            }
        },
    }
    if !gc.is_empty() {
        out.insert("generationConfig".into(), Value::Object(gc));
    }
    let tools = match req.get("tools") {
        Some(t) if !t.is_null() => function_tools(t, model)?,
        _ => vec![],
    };
    if !tools.is_empty() {
        let decls: Vec<Value> = tools
            .into_iter()
            .map(|(name, desc, params)| {
                let mut d = json!({"name": name, "parameters": clean_schema(&params)});
                if let Some(desc) = desc {
                    d["description"] = Value::String(desc);
                }
                d
            })
            .collect();
        out.insert("tools".into(), json!([{ "functionDeclarations": decls }]));
    }
    if let Some(c) = req.get("tool_choice").filter(|c| !c.is_null()) {
        if !out.contains_key("tools") {
            return Err(bad("tool_choice", "`tool_choice` needs `tools`"));
        }
        let config = match tool_choice(c)? {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::Function(n) => json!({"mode": "ANY", "allowedFunctionNames": [n]}),
        };
        out.insert(
            "toolConfig".into(),
            json!({ "functionCallingConfig": config }),
        );
    }
    Ok(Value::Object(out))
}

pub fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ => "stop",
    }
}

fn read_usage(u: &Value) -> Option<ProviderUsage> {
    if !u.is_object() {
        return None;
    }
    let n = |k: &str| u[k].as_i64().unwrap_or(0).max(0);
    let prompt = n("promptTokenCount").saturating_add(n("toolUsePromptTokenCount"));
    let completion = n("candidatesTokenCount").saturating_add(n("thoughtsTokenCount"));
    Some(ProviderUsage {
        prompt,
        completion,
        total: n("totalTokenCount"),
        cached: n("cachedContentTokenCount"),
    })
}

fn call_id(fc: &Value) -> String {
    fc["id"].as_str().map_or_else(
        || format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
        str::to_owned,
    )
}

/// The visible text and function calls of a candidate's parts.
fn parts_of(c: &Value) -> (String, Vec<(String, String, String)>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for p in c["content"]["parts"].as_array().into_iter().flatten() {
        if p["thought"] == true {
            continue;
        }
        if let Some(t) = p["text"].as_str() {
            text.push_str(t);
        }
        let fc = &p["functionCall"];
        if fc.is_object() {
            let args = if fc["args"].is_null() {
                "{}".to_owned()
            } else {
                fc["args"].to_string()
            };
            calls.push((
                call_id(fc),
                fc["name"].as_str().unwrap_or_default().to_owned(),
                args,
            ));
        }
    }
    (text, calls)
}

/// A `GenerateContentResponse` → (OpenAI message, finish reason, usage).
pub fn response(v: &Value) -> Result<(Value, &'static str, Option<Usage>), super::AnswerError> {
    if !v.is_object() || v.get("error").is_some() {
        return Err(super::AnswerError::NotGemini);
    }
    let c = &v["candidates"][0];
    let (text, calls) = parts_of(c);
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    let finish = if !calls.is_empty() {
        let calls: Vec<Value> = calls
            .into_iter()
            .map(|(id, name, args)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
            })
            .collect();
        message["tool_calls"] = Value::Array(calls);
        "tool_calls"
    } else if c.is_null() && v["promptFeedback"]["blockReason"].is_string() {
        "content_filter"
    } else {
        finish_reason(c["finishReason"].as_str().unwrap_or("STOP"))
    };
    let usage = read_usage(&v["usageMetadata"]).map(|u| u.usage());
    Ok((message, finish, usage))
}

#[derive(Default)]
pub struct Stream {
    usage: Option<ProviderUsage>,
    tools: i64,
    stopped: bool,
}

impl StreamState for Stream {
    fn event(&mut self, ev: &SseEvent, w: &mut ChunkWriter, out: &mut BytesMut) -> Step {
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return Step::Continue;
        };
        if v.get("error").is_some() {
            return Step::Failed;
        }
        // Every frame may carry usage; the last one wins.
        if let Some(u) = read_usage(&v["usageMetadata"]) {
            self.usage = Some(u);
        }
        w.role(out);
        let c = &v["candidates"][0];
        let (text, calls) = parts_of(c);
        w.text(out, &text);
        for (id, name, args) in calls {
            w.delta(
                out,
                json!({"tool_calls": [{"index": self.tools, "id": id, "type": "function",
                    "function": {"name": name, "arguments": args}}]}),
            );
            self.tools += 1;
        }
        let reason = c["finishReason"].as_str().or_else(|| {
            v["promptFeedback"]["blockReason"]
                .as_str()
                .map(|_| "SAFETY")
        });
        if let Some(r) = reason {
            if !self.stopped {
                self.stopped = true;
                let f = if self.tools > 0 {
                    "tool_calls"
                } else {
                    finish_reason(r)
                };
                w.finish(out, f);
            }
        }
        Step::Continue
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.filter(|_| self.stopped).map(|u| u.usage())
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    fn tool_call(&self) -> bool {
        self.tools > 0
    }
}

/// OpenAI embeddings `input` → a `batchEmbedContents` request (texts only).
pub fn embed_request(
    input: &Value,
    model: &Model,
    dimensions: Option<i64>,
) -> Result<Value, ApiError> {
    let texts: Vec<&str> = match input {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).collect()
        }
        _ => {
            return Err(bad(
                "input",
                "Gemini embeddings take `input` as a string or a non-empty array of strings",
            ))
        }
    };
    let name = format!("models/{}", model.name);
    let requests: Vec<Value> = texts
        .into_iter()
        .map(|t| {
            let mut r = json!({"model": name, "content": {"parts": [{"text": t}]}});
            if let Some(d) = dimensions {
                r["outputDimensionality"] = Value::from(d);
            }
            r
        })
        .collect();
    Ok(json!({ "requests": requests }))
}

/// A `batchEmbedContents` answer → an OpenAI embeddings list. The usage is the one
/// the provider reports (`usageMetadata`), if any.
pub fn embed_response(
    bytes: &[u8],
    model: &str,
    base64: bool,
) -> Result<super::Answer, super::AnswerError> {
    use base64::Engine as _;
    let v: Value = serde_json::from_slice(bytes)?;
    let list = v["embeddings"]
        .as_array()
        .ok_or(super::AnswerError::NoEmbeddings)?;
    let mut data = Vec::with_capacity(list.len());
    for (i, e) in list.iter().enumerate() {
        let values = e["values"]
            .as_array()
            .ok_or(super::AnswerError::NoEmbeddingValues)?;
        let embedding = if base64 {
            let mut raw = Vec::with_capacity(values.len() * 4);
            for x in values {
                #[allow(clippy::cast_possible_truncation)]
                let f = x.as_f64().unwrap_or(0.0) as f32;
                raw.extend_from_slice(&f.to_le_bytes());
            }
            Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
        } else {
            Value::Array(values.clone())
        };
        data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
    }
    let usage = read_usage(&v["usageMetadata"]).map(|u| u.usage());
    let mut out = json!({"object": "list", "data": data, "model": model});
    if let Some(u) = &usage {
        out["usage"] = json!({"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens});
    }
    Ok(super::Answer {
        body: bytes::Bytes::from(out.to_string()),
        usage,
        tool_call: false,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::super::tests::response as translate_response;
    use super::super::tests::{chunks, model, run};
    use super::super::{request as translate, StreamTranslator};
    use super::*;

    fn req(v: Value) -> Result<Value, ApiError> {
        request(
            v.as_object().unwrap(),
            &model("google", &["text", "vision", "function_calling"]),
        )
    }

    #[test]
    fn system_roles_images_json_mode_and_sampling_are_translated() {
        let out = req(json!({
            "model": "gemini",
            "messages": [
                {"role": "system", "content": "You are a cat. Your name is Neko."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Tell me about this instrument"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}
                ]},
                {"role": "assistant", "content": "A violin."},
                {"role": "user", "content": "More."}
            ],
            "temperature": 1.5, "top_p": 0.8, "stop": ["Title"], "seed": 7,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}}}
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "contents": [
                    {"role": "user", "parts": [
                        {"text": "Tell me about this instrument"},
                        {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}}
                    ]},
                    {"role": "model", "parts": [{"text": "A violin."}]},
                    {"role": "user", "parts": [{"text": "More."}]}
                ],
                "systemInstruction": {"parts": [{"text": "You are a cat. Your name is Neko."}]},
                "generationConfig": {
                    "temperature": 1.5, "topP": 0.8, "seed": 7, "stopSequences": ["Title"],
                    "responseMimeType": "application/json",
                    "responseSchema": {"type": "object", "properties": {"a": {"type": "string"}}}
                }
            })
        );
        let mut t = translate(
            &Gemini,
            br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            &model("google", &[]),
        )
        .unwrap();
        t.set_max_tokens(42);
        assert_eq!(t.body["generationConfig"]["maxOutputTokens"], 42);
    }

    #[test]
    fn tools_choice_calls_and_results_round_trip() {
        let out = req(json!({
            "messages": [
                {"role": "user", "content": "Find theaters showing Barbie in Mountain View"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "find_theaters", "arguments": "{\"location\":\"Mountain View, CA\",\"movie\":\"Barbie\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"movie\":\"Barbie\",\"theaters\":[{\"name\":\"AMC\"}]}"}
            ],
            "tools": [{"type": "function", "function": {"name": "find_theaters", "description": "find theaters",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "movie": {"type": "string"}}, "required": ["location"]}}}],
            "tool_choice": {"type": "function", "function": {"name": "find_theaters"}}
        }))
        .unwrap();
        assert_eq!(
            out["tools"],
            json!([{"functionDeclarations": [{"name": "find_theaters", "description": "find theaters",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "movie": {"type": "string"}}, "required": ["location"]}}]}])
        );
        assert_eq!(
            out["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["find_theaters"]}})
        );
        assert_eq!(
            out["contents"][1],
            json!({"role": "model", "parts": [{"functionCall": {"name": "find_theaters", "args": {"location": "Mountain View, CA", "movie": "Barbie"}}}]})
        );
        assert_eq!(
            out["contents"][2],
            json!({"role": "user", "parts": [{"functionResponse": {"name": "find_theaters",
                "response": {"name": "find_theaters", "content": {"movie": "Barbie", "theaters": [{"name": "AMC"}]}}}}]})
        );
        let orphan =
            req(json!({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}));
        assert!(matches!(
            orphan,
            Err(ApiError::InvalidRequest {
                param: Some("messages"),
                ..
            })
        ));
    }

    #[test]
    fn unsupported_parameters_are_400_naming_them() {
        for (extra, param) in [
            (json!({"logit_bias": {"1": 1}}), "logit_bias"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"n": 3}), "n"),
            (json!({"temperature": 3}), "temperature"),
            (json!({"parallel_tool_calls": false}), "parallel_tool_calls"),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format",
            ),
        ] {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            match req(body) {
                Err(ApiError::InvalidRequest { param: p, .. }) => assert_eq!(p, Some(param)),
                other => panic!("{param}: {other:?}"),
            }
        }
        let url_image = req(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
        );
        assert!(matches!(
            url_image,
            Err(ApiError::InvalidRequest {
                param: Some("messages"),
                ..
            })
        ));
    }

    /// The text generation example of Gemini's `generateContent` reference.
    #[test]
    fn documented_response_becomes_a_chat_completion() {
        let body = br#"{
          "candidates": [{
            "content": {"parts": [{"text": "Once upon a time, in a cozy little cottage..."}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
          }],
          "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 524, "totalTokenCount": 532},
          "modelVersion": "gemini-2.0-flash"
        }"#;
        let a = translate_response(&Gemini, body, "chatcmpl-g", "gemini-2.0-pro").unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Once upon a time, in a cozy little cottage..."
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 8, "completion_tokens": 524, "total_tokens": 532, "prompt_tokens_details": {"cached_tokens": 0}})
        );

        let call = br#"{"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"find_theaters","args":{"location":"Mountain View, CA","movie":"Barbie"}}}]},"finishReason":"STOP","index":0}],
          "usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":5,"thoughtsTokenCount":3,"totalTokenCount":17}}"#;
        let a = translate_response(&Gemini, call, "c", "m").unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert!(a.tool_call);
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let tc = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(tc["function"]["name"], "find_theaters");
        assert!(tc["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(a.usage.unwrap().completion_tokens, 8);
        assert_eq!(a.usage.unwrap().total_tokens, 17);
        let limited =
            br#"{"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"MAX_TOKENS"}]}"#;
        let a = translate_response(&Gemini, limited, "c", "m").unwrap();
        assert!(a.usage.is_none());
        assert!(String::from_utf8_lossy(&a.body).contains("\"length\""));
    }

    #[test]
    fn cached_content_is_the_cached_part_of_the_prompt_and_never_more() {
        let answer = |cached: i64| {
            let b = format!(
                r#"{{"candidates":[{{"content":{{"parts":[{{"text":"a"}}]}},"finishReason":"STOP"}}],
                   "usageMetadata":{{"promptTokenCount":100,"cachedContentTokenCount":{cached},"candidatesTokenCount":5,"totalTokenCount":105}}}}"#
            );
            translate_response(&Gemini, b.as_bytes(), "c", "m").unwrap()
        };
        let a = answer(60);
        let u = a.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.cached_tokens), (100, 60));
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 60);
        assert_eq!(answer(500).usage.unwrap().cached_tokens, 100);
        assert_eq!(answer(-5).usage.unwrap().cached_tokens, 0);
    }

    /// A `streamGenerateContent?alt=sse` stream as documented: each frame a whole
    /// response, usage growing, the last frame's usage the final one.
    const STREAM: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Paris\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 11,\"totalTokenCount\": 11},\"modelVersion\": \"gemini-2.0-flash\"}\r\n\r\ndata: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" is the capital.\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 11,\"candidatesTokenCount\": 6,\"totalTokenCount\": 17},\"modelVersion\": \"gemini-2.0-flash\"}\r\n\r\n";

    #[test]
    fn documented_stream_becomes_chunks_and_the_last_usage_wins() {
        for step in [STREAM.len(), 13, 1] {
            let mut t = StreamTranslator::new(&Gemini, "chatcmpl-g", "gemini", true).unwrap();
            let out = run(&mut t, STREAM.as_bytes(), step);
            let c = chunks(&out);
            assert_eq!(c[0]["choices"][0]["delta"]["role"], "assistant");
            let text: String = c
                .iter()
                .filter_map(|x| x["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, "Paris is the capital.");
            let n = c.len();
            assert_eq!(c[n - 3]["choices"][0]["finish_reason"], "stop");
            assert_eq!(
                c[n - 2]["usage"],
                json!({"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17, "prompt_tokens_details": {"cached_tokens": 0}})
            );
            assert_eq!(c[n - 1], "[DONE]");
            assert_eq!(t.usage().unwrap().total_tokens, 17);
        }
        // Cut after the first frame: no final usage, no [DONE].
        let first = &STREAM[..STREAM.find("\r\n\r\n").unwrap() + 4];
        let mut t = StreamTranslator::new(&Gemini, "c", "m", true).unwrap();
        let out = run(&mut t, first.as_bytes(), 1);
        assert!(t.usage().is_none());
        assert!(!String::from_utf8(out).unwrap().contains("[DONE]"));
    }

    #[test]
    fn streamed_function_calls_become_tool_call_deltas() {
        let s = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"get_weather\",\"args\":{\"city\":\"Paris\"}}}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":20,\"candidatesTokenCount\":4,\"totalTokenCount\":24}}\n\n";
        let mut t = StreamTranslator::new(&Gemini, "c", "m", false).unwrap();
        let c = chunks(&run(&mut t, s.as_bytes(), 2));
        let tc = c
            .iter()
            .find_map(|x| x["choices"][0]["delta"].get("tool_calls"))
            .unwrap();
        assert_eq!(tc[0]["index"], 0);
        assert_eq!(tc[0]["function"]["name"], "get_weather");
        assert_eq!(tc[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert!(c
            .iter()
            .any(|x| x["choices"][0]["finish_reason"] == "tool_calls"));
        assert!(t.tool_call());
        assert_eq!(t.usage().unwrap().total_tokens, 24);
    }

    #[test]
    fn embeddings_are_batched_and_answered_as_floats_or_base64() {
        let m = model("google", &["text"]);
        let r = embed_request(&json!(["a", "b"]), &m, Some(8)).unwrap();
        assert_eq!(
            r,
            json!({"requests": [
                {"model": "models/google-upstream", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": 8},
                {"model": "models/google-upstream", "content": {"parts": [{"text": "b"}]}, "outputDimensionality": 8}
            ]})
        );
        assert!(matches!(
            embed_request(&json!([1, 2]), &m, None),
            Err(ApiError::InvalidRequest {
                param: Some("input"),
                ..
            })
        ));
        let body = br#"{"embeddings":[{"values":[0.5,-1.0]},{"values":[0.25,2.0]}],"usageMetadata":{"promptTokenCount":4,"totalTokenCount":4}}"#;
        let a = embed_response(body, "emb", false).unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["data"][1]["embedding"], json!([0.25, 2.0]));
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
        assert_eq!(a.usage.unwrap().total_tokens, 4);
        let a = embed_response(body, "emb", true).unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            raw,
            [0.5f32.to_le_bytes(), (-1.0f32).to_le_bytes()].concat()
        );
    }
}
