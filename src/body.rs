//! What a model request's body may be, so that the provider reads what the gateway read.
//!
//! The gateway sizes a request's hold from a few fields and edits a few others; the
//! provider then parses the body with its own JSON parser, which (Python's, Go's and
//! JavaScript's alike) keeps the LAST of duplicate keys and decodes escapes in keys,
//! and (Go's) matches keys ignoring letter case. A body the two could read differently
//! is refused before anything is held:
//!
//! - anything but one JSON object (a BOM, trailing bytes, NaN, lone surrogates, more
//!   than 128 levels — serde_json's limits);
//! - a top-level key not on the endpoint's allow-list ([`Params`]; 400 `Unrecognized
//!   request argument supplied`, as OpenAI answers), so no case variant of a parameter
//!   (`MAX_TOKENS`) either;
//! - in every object the gateway reads (the top level, messages, content parts, files,
//!   `stream_options`), a key given twice (escapes decoded: `"max_\u0074okens"` is
//!   `max_tokens`) or a key it does not know (`CONTENT`, `FILE_ID`, `include_uſage`).
//!
//! The endpoints get this from ONE typed parse: each of those objects is a struct that
//! lists every field OpenAI defines (`deny_unknown_fields`; serde refuses a field twice).
//! The subtrees the gateway does not read (tool schemas, metadata) may repeat keys with
//! no effect on the price. When that parse fails, [`check`] walks the whole body to name
//! the fault — any key twice at any depth, keys compared decoded and case-folded — and
//! the tests and fuzz targets hold the parse to it.
//!
//! An edit is exact: a key the gateway adds is spliced in front only when the body has
//! no such key ([`Present`]); otherwise the top level is rebuilt from its entries, each
//! value's bytes kept as they came ([`rebuild`]).

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// The top-level keys of a checked body (decoded), in their order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys(Vec<String>);

impl Keys {
    pub fn contains(&self, key: &str) -> bool {
        self.0.iter().any(|k| k == key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// Where a duplicate key was found: the key, whether it repeats another only up to
/// letter case, and the top-level key it sits under (`None`: at the top level itself).
#[derive(Debug, Default)]
struct Found {
    duplicate: Option<(String, bool, Option<String>)>,
}

/// A key folded to one letter case, as a case-insensitive parser (Go's
/// `encoding/json` matches struct fields so, Unicode folding included) would match it.
fn fold<'a>(key: &Cow<'a, str>) -> Cow<'a, str> {
    if key.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
        // Borrowed from the body, most of the time: no copy.
        return key.clone();
    }
    Cow::Owned(
        key.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect(),
    )
}

/// Walks any JSON value, refusing an object that holds a key twice.
struct Strict<'s> {
    found: &'s RefCell<Found>,
    /// The top-level key this value sits under (`None` at the top level).
    under: Option<&'s str>,
    /// Collects the keys of the object walked (the top level only).
    keys: Option<&'s RefCell<Vec<String>>>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A key, borrowed from the body when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Objects with more keys than this are checked with a hash set.
const LINEAR_KEYS: usize = 16;

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Strict {
                found: self.found,
                under: self.under,
                keys: None,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Keys folded to one case, with the key as written: a key seen again, or seen
        // again but for letter case, is refused.
        let mut few: Vec<(Cow<'de, str>, Cow<'de, str>)> = Vec::new();
        let mut many: HashMap<Cow<'de, str>, Cow<'de, str>> = HashMap::new();
        while let Some(key) = map.next_key_seed(Key)? {
            let folded = fold(&key);
            let seen = if many.is_empty() {
                few.iter().find(|(f, _)| *f == folded).map(|(_, k)| k)
            } else {
                many.get(&folded)
            };
            if let Some(earlier) = seen {
                let only_case = *earlier != key;
                let under = self.under.map(str::to_owned);
                self.found.borrow_mut().duplicate = Some((key.into_owned(), only_case, under));
                return Err(de::Error::custom("duplicate key"));
            }
            if let Some(keys) = self.keys {
                keys.borrow_mut().push(key.clone().into_owned());
            }
            let under_owned;
            let under = match self.under {
                Some(u) => Some(u),
                None => {
                    under_owned = key.clone();
                    Some(&*under_owned)
                }
            };
            map.next_value_seed(Strict {
                found: self.found,
                under,
                keys: None,
            })?;
            if many.is_empty() && few.len() < LINEAR_KEYS {
                few.push((folded, key));
            } else {
                many.extend(few.drain(..));
                many.insert(folded, key);
            }
        }
        Ok(())
    }
}

/// Which of the top-level keys the gateway may set a body has (even as `null`): a key
/// present must be rewritten, never added again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Present(u8);

impl Present {
    /// The keys the gateway may set.
    pub const EDITED: [&'static str; 5] = [
        "model",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
    ];

    /// `self` with `key` marked present when `present` holds.
    pub fn with(self, key: &str, present: bool) -> Present {
        match Self::EDITED.iter().position(|k| *k == key) {
            Some(i) if present => Present(self.0 | 1 << i),
            _ => self,
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        Self::EDITED
            .iter()
            .position(|k| *k == key)
            .is_some_and(|i| self.0 & 1 << i != 0)
    }
}

/// For an `Option<&RawValue>` field: the value as it is, `null` included (serde's own
/// `Option` would read `null` as absent, and the gateway must know the key is there).
pub fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

/// Bodies up to this size get a walk of the whole body to name what a failed parse
/// tripped on; a larger one gets the parser's own message (the walk costs as much as
/// the parse, and a failing body is cheap to send).
const DIAGNOSED_BYTES: usize = 64 * 1024;

/// A body as text: valid UTF-8 (a value the gateway only passes through is not checked
/// by its parse, and a provider's decoder may read invalid bytes otherwise) and a JSON
/// object at the top (a derived struct would also read an array, field by field).
pub fn object_text(body: &[u8]) -> Result<&str, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid UTF-8 ({e})")))?;
    if text.trim_start().starts_with('{') {
        Ok(text)
    } else {
        Err(ApiError::invalid(
            "invalid request: the body must be a JSON object",
        ))
    }
}

/// A top-level parameter and whether a value is one the gateway can read for it.
pub type Reader = (&'static str, fn(&str) -> bool);

/// The error of a body whose typed parse failed with `e`: [`check`]'s, which names
/// the parameter, when it finds the fault; else the parser's, naming the first
/// parameter whose value one of `readers` does not read.
pub fn parse_error(
    body: &[u8],
    params: &Params,
    readers: &[Reader],
    e: &serde_json::Error,
) -> ApiError {
    if body.len() > DIAGNOSED_BYTES {
        return json_error(e);
    }
    if let Err(found) = check(body, params) {
        return found;
    }
    let failing = entries(body).ok().and_then(|entries| {
        entries.iter().find_map(|(k, v)| {
            readers
                .iter()
                .find(|(name, read)| name == k && !read(v.get()))
                .map(|(name, _)| *name)
        })
    });
    match (failing, json_error(e)) {
        (Some(param), ApiError::InvalidRequest { message, .. }) => ApiError::InvalidRequest {
            message,
            param: Some(param),
        },
        (_, other) => other,
    }
}

/// The error of a body that is not JSON (or not an object).
pub fn json_error(e: &serde_json::Error) -> ApiError {
    if e.is_data() {
        ApiError::invalid(format!("invalid request: {e}"))
    } else {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request ({e})"
        ))
    }
}

/// The allow-list of one endpoint's top-level parameters.
pub struct Params {
    /// Passed to the provider as they are (or as the gateway edits them).
    pub allowed: &'static [&'static str],
    /// Known parameters the gateway refuses (they change the provider's price in ways
    /// the hold cannot bound), with the reason; `null` is accepted for them.
    pub refused: &'static [(&'static str, &'static str)],
}

/// Checks a model request body: one JSON object, no duplicate key at any depth, every
/// top-level key allowed. Returns the top-level keys.
pub fn check(body: &[u8], params: &Params) -> Result<Keys, ApiError> {
    let found = RefCell::new(Found::default());
    let keys = RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_slice(body);
    let walked = de::Deserializer::deserialize_map(
        &mut de,
        Strict {
            found: &found,
            under: None,
            keys: Some(&keys),
        },
    )
    .and_then(|()| de.end());
    if let Err(e) = walked {
        if let Some((key, only_case, under)) = found.into_inner().duplicate {
            return Err(duplicate(&key, only_case, under.as_deref(), params));
        }
        return Err(json_error(&e));
    }
    let keys = Keys(keys.into_inner());
    for k in keys.iter() {
        if params.allowed.contains(&k) {
            continue;
        }
        if let Some((name, why)) = params.refused.iter().find(|(n, _)| *n == k) {
            if is_null(body, name)? {
                continue;
            }
            return Err(ApiError::InvalidRequest {
                message: format!("the parameter `{name}` is not accepted: {why}"),
                param: Some(name),
            });
        }
        return Err(ApiError::InvalidRequest {
            message: format!("Unrecognized request argument supplied: {k}"),
            param: None,
        });
    }
    Ok(keys)
}

fn duplicate(key: &str, only_case: bool, under: Option<&str>, params: &Params) -> ApiError {
    // Name the top-level parameter at fault, with a static name when it is one we know.
    let top = under.unwrap_or(key);
    let param = params
        .allowed
        .iter()
        .copied()
        .chain(params.refused.iter().map(|(n, _)| *n))
        .find(|p| *p == top);
    let again = if only_case {
        "appears again but for letter case"
    } else {
        "appears more than once"
    };
    let message = match under {
        None => format!("the parameter `{key}` {again} in the request body"),
        Some(u) => format!("the key `{key}` {again} in an object of `{u}`"),
    };
    ApiError::InvalidRequest { message, param }
}

/// Whether the top-level `key` of a checked body is `null`.
fn is_null(body: &[u8], key: &str) -> Result<bool, ApiError> {
    Ok(entries(body)?
        .iter()
        .find(|(k, _)| k == key)
        .is_some_and(|(_, v)| v.get() == "null"))
}

/// The top-level entries of a checked body: decoded key, raw value.
pub fn entries(body: &[u8]) -> Result<Vec<(Cow<'_, str>, &RawValue)>, ApiError> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = map.next_key_seed(Key)? {
                let v: &'de RawValue = map.next_value()?;
                out.push((k, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let out = de::Deserializer::deserialize_map(&mut de, Entries)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| json_error(&e))?;
    Ok(out)
}

/// Rebuilds a checked body's top level: each entry once, its key written plainly and
/// its value's bytes kept, except the keys in `set`, whose values are replaced (or
/// appended when absent). Nothing else changes.
pub fn rebuild(body: &[u8], set: &[(&str, Vec<u8>)]) -> Result<Vec<u8>, ApiError> {
    let entries = entries(body)?;
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(b'{');
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, k: &str, v: &[u8]| -> Result<(), ApiError> {
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, k).map_err(ApiError::internal)?;
        out.push(b':');
        out.extend_from_slice(v);
        Ok(())
    };
    for (k, v) in &entries {
        match set.iter().find(|(s, _)| *s == k) {
            Some((_, new)) => put(&mut out, k, new)?,
            None => put(&mut out, k, v.get().as_bytes())?,
        }
    }
    for (k, v) in set {
        if !entries.iter().any(|(e, _)| e == k) {
            put(&mut out, k, v)?;
        }
    }
    out.push(b'}');
    Ok(out)
}

/// Bodies larger than this are checked and parsed on the blocking pool: a large body
/// costs its own CPU without holding up the other requests of this worker thread.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// Runs `parse` on `body`, on the blocking pool when the body is large.
pub async fn parse_off_thread<T: Send + 'static>(
    body: &Bytes,
    parse: impl FnOnce(&[u8]) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if body.len() <= INLINE_PARSE_BYTES {
        return parse(body);
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || parse(&body))
        .await
        .map_err(ApiError::internal)?
}

/// Reads the body, refusing more than `limit` bytes with 413.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(e) => Err(ApiError::invalid(format!(
            "could not read the request body ({e})"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const P: Params = Params {
        allowed: &["model", "messages", "max_tokens", "stream_options"],
        refused: &[("audio", "audio is priced apart")],
    };

    fn err(body: &str) -> (String, Option<&'static str>) {
        match check(body.as_bytes(), &P) {
            Err(ApiError::InvalidRequest { message, param }) => (message, param),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn duplicates_are_found_after_decoding_escapes_at_any_depth() {
        let (m, p) = err(r#"{"max_tokens":5,"max_\u0074okens":null}"#);
        assert_eq!(p, Some("max_tokens"));
        assert!(m.contains("more than once"), "{m}");
        let (m, p) = err(r#"{"stream_options":{"include_usage":true,"include_\u0075sage":false}}"#);
        assert_eq!(p, Some("stream_options"));
        assert!(m.contains("include_usage"), "{m}");
        let (_, p) = err(r#"{"messages":[{"content":[{"type":"text","type":"image_url"}]}]}"#);
        assert_eq!(p, Some("messages"));
        // An unknown top-level key twice: refused, no static name to give.
        let (_, p) = err(r#"{"x":1,"x":2}"#);
        assert_eq!(p, None);
        // Keys equal but for letter case, Unicode folding included.
        for body in [
            r#"{"stream_options":{"include_usage":true,"INCLUDE_USAGE":false}}"#,
            "{\"stream_options\":{\"include_usage\":true,\"include_u\u{17f}age\":false}}",
            r#"{"messages":[{"content":"hi","CONTENT":"bye"}]}"#,
        ] {
            let (m, p) = err(body);
            assert!(m.contains("but for letter case"), "{body}: {m}");
            assert!(p.is_some(), "{body}");
        }
        // Many keys (the hash-set path).
        let mut big = String::from("{\"messages\":{");
        for i in 0..40 {
            big.push_str(&format!("\"k{i}\":1,"));
        }
        big.push_str("\"k7\":2}}");
        assert_eq!(err(&big).1, Some("messages"));
    }

    #[test]
    fn only_allowed_keys_pass_and_refused_ones_only_as_null() {
        let keys = check(br#"{"model":"m","messages":[],"audio":null}"#, &P).unwrap();
        assert_eq!(
            keys.iter().collect::<Vec<_>>(),
            ["model", "messages", "audio"]
        );
        let (m, p) = err(r#"{"model":"m","audio":{"voice":"x"}}"#);
        assert_eq!(p, Some("audio"));
        assert!(m.contains("priced apart"), "{m}");
        let (m, p) = err(r#"{"model":"m","MAX_TOKENS":5}"#);
        assert_eq!(p, None);
        assert!(m.contains("Unrecognized request argument supplied: MAX_TOKENS"));
    }

    #[test]
    fn not_one_plain_object_is_refused() {
        for body in [
            "\u{feff}{\"model\":\"m\"}",
            "[1]",
            "{\"model\":\"m\"} x",
            "{\"model\":NaN}",
            "{\"model\":\"\\ud800\"}",
            "",
        ] {
            let (m, _) = err(body);
            assert!(!m.is_empty());
        }
        let deep = format!("{{\"messages\":{}{}}}", "[".repeat(200), "]".repeat(200));
        err(&deep);
    }

    #[test]
    fn rebuild_replaces_in_place_keeps_bytes_and_appends() {
        let body = br#"{ "model" : "a", "max_\u0074okens": null, "messages": [ {"x": 1.50} ] }"#;
        let out = rebuild(
            body,
            &[
                ("max_tokens", b"7".to_vec()),
                ("stream_options", b"{}".to_vec()),
            ],
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"a","max_tokens":7,"messages":[ {"x": 1.50} ],"stream_options":{}}"#
        );
    }
}
