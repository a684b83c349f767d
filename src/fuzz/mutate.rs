//! Mutations: byte-level ones for any input, and structure-aware ones for each shape —
//! JSON members (duplicated keys, keys spelled with `\u` escapes, values swapped for
//! null, huge numbers or deep arrays, BOMs and odd whitespace), SSE events (duplicated,
//! dropped, split data lines, other line endings), JWT segments (a changed signature,
//! re-encoded header or claims, `alg: none`, HMAC keyed with the public key, the other
//! valid-looking signature of ECDSA and Ed25519) and form pairs (repeated, percent-
//! encoded, malformed escapes).

use std::ops::Range;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::{Rng, Shape};

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, 0xc0, 0xef, 0xbb, 0xbf, b'"', b'\\', b'{', b'}', b'[', b']', b',',
    b':', b' ', b'\n', b'\r', b'0', b'9', b'-', b'.', b'e', b'u', b'%', b'&', b'=', b'+',
];

const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "16",
    "64",
    "128",
    "129",
    "2048",
    "2049",
    "1.5",
    "-0",
    "1e3",
    "1E2",
    "1e400",
    "-1e400",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551616",
    "99999999999999999999999",
    "4294967296",
    "0.5",
    "00",
];

const JSON_VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "\"\"",
    "[]",
    "{}",
    "\"64\"",
    "\"true\"",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\u0000\"",
    "[null]",
    "{\"\":null}",
    "\"text\"",
    "[1,2,3]",
    "[\"a\",\"b\"]",
    "[[1],[2]]",
    "[\"a\",[1]]",
    "{\"type\":\"text\",\"text\":\"x\"}",
];

const WHITESPACE: &[&str] = &[
    " ", "\t", "\n", "\r\n", "\r", "\u{a0}", "\u{feff}", "\u{2028}", "\x0b", "\x0c", "\0",
];

const BOM: &[u8] = "\u{feff}".as_bytes();

/// One mutated child of `parent`: one to a few stacked mutations, structure-aware ones
/// more often than byte-level ones.
pub(crate) fn mutate(
    rng: &mut Rng,
    parent: &[u8],
    pool: &[Vec<u8>],
    shape: Shape,
    dict: &[&[u8]],
) -> Vec<u8> {
    let mut out = parent.to_vec();
    let long = rng.one_in(3);
    let steps = 1 + rng.below(if long { 6 } else { 2 });
    for _ in 0..steps {
        let structured = rng.below(10) < 6;
        let done = structured
            && match shape {
                Shape::Json => json(rng, &mut out, dict),
                Shape::Sse => sse(rng, &mut out, dict),
                Shape::Jwt => jwt(rng, &mut out, pool, dict),
                Shape::Form => form(rng, &mut out, dict),
            };
        if !done {
            bytes(rng, &mut out, pool, dict);
        }
    }
    out
}

fn insert(b: &mut Vec<u8>, at: usize, what: &[u8]) {
    let at = at.min(b.len());
    b.splice(at..at, what.iter().copied());
}

fn replace(b: &mut Vec<u8>, r: Range<usize>, what: &[u8]) {
    b.splice(r, what.iter().copied());
}

/// Byte-level mutations.
pub(crate) fn bytes(rng: &mut Rng, b: &mut Vec<u8>, pool: &[Vec<u8>], dict: &[&[u8]]) {
    let n = b.len();
    match rng.below(12) {
        0 if n > 0 => {
            let i = rng.below(n);
            b[i] ^= 1 << rng.below(8);
        }
        1 if n > 0 => {
            let i = rng.below(n);
            b[i] = *rng.pick(INTERESTING_BYTES);
        }
        2 => {
            let k = 1 + rng.below(4);
            let piece: Vec<u8> = (0..k).map(|_| rng.next() as u8).collect();
            insert(b, rng.below(n + 1), &piece);
        }
        3 if n > 0 => {
            let i = rng.below(n);
            let len = 1 + rng.below((n - i).min(32));
            b.drain(i..i + len);
        }
        4 if n > 0 => {
            let i = rng.below(n);
            let len = 1 + rng.below((n - i).min(64));
            let piece = b[i..i + len].to_vec();
            let at = if rng.one_in(2) {
                i + len
            } else {
                rng.below(n + 1)
            };
            insert(b, at, &piece);
        }
        5 if !pool.is_empty() => {
            let o = rng.pick(pool);
            let i = rng.below(n + 1);
            let j = rng.below(o.len() + 1);
            b.truncate(i);
            b.extend_from_slice(&o[j..]);
        }
        6 if !pool.is_empty() => {
            let o = rng.pick(pool);
            if !o.is_empty() {
                let j = rng.below(o.len());
                let len = 1 + rng.below((o.len() - j).min(64));
                insert(b, rng.below(n + 1), &o[j..j + len]);
            }
        }
        7 if !dict.is_empty() => {
            let t = rng.pick::<&[u8]>(dict);
            insert(b, rng.below(n + 1), t);
        }
        8 if n > 0 && !dict.is_empty() => {
            let t = rng.pick::<&[u8]>(dict);
            let i = rng.below(n);
            let end = (i + t.len()).min(n);
            replace(b, i..end, t);
        }
        9 if n > 0 => b.truncate(rng.below(n)),
        10 => {
            let runs = digit_runs(b);
            let num = rng.pick(NUMBERS).as_bytes();
            if runs.is_empty() {
                insert(b, rng.below(n + 1), num);
            } else {
                let r = rng.pick(&runs).clone();
                replace(b, r, num);
            }
        }
        _ => {
            let w = rng.pick(WHITESPACE).as_bytes();
            insert(b, rng.below(n + 1), w);
        }
    }
}

fn digit_runs(b: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let s = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push(s..i);
        } else {
            i += 1;
        }
    }
    out
}

// --- JSON ---------------------------------------------------------------------------

struct Member {
    /// The key with its quotes.
    key: Range<usize>,
    value: Range<usize>,
}

/// Where things are in a JSON text (a scan, not a validation).
#[derive(Default)]
struct Scan {
    members: Vec<Member>,
    /// Every value: members', array elements, the root.
    values: Vec<Range<usize>>,
    /// Every object: the position after its `{`, and whether it is empty.
    objects: Vec<(usize, bool)>,
    /// Positions between tokens.
    gaps: Vec<usize>,
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
        *i += 1;
    }
}

fn string(b: &[u8], i: &mut usize) -> Option<()> {
    if b.get(*i) != Some(&b'"') {
        return None;
    }
    *i += 1;
    loop {
        match *b.get(*i)? {
            b'\\' => *i += 2,
            b'"' => {
                *i += 1;
                return Some(());
            }
            _ => *i += 1,
        }
    }
}

fn value(b: &[u8], i: &mut usize, s: &mut Scan, depth: usize) -> Option<Range<usize>> {
    if depth > 200 {
        return None;
    }
    let start = *i;
    match *b.get(*i)? {
        b'{' => {
            *i += 1;
            let obj = s.objects.len();
            s.objects.push((*i, false));
            s.gaps.push(*i);
            skip_ws(b, i);
            if b.get(*i) == Some(&b'}') {
                *i += 1;
                s.objects[obj].1 = true;
            } else {
                loop {
                    skip_ws(b, i);
                    let ks = *i;
                    string(b, i)?;
                    let key = ks..*i;
                    s.gaps.push(*i);
                    skip_ws(b, i);
                    if b.get(*i) != Some(&b':') {
                        return None;
                    }
                    *i += 1;
                    s.gaps.push(*i);
                    skip_ws(b, i);
                    let v = value(b, i, s, depth + 1)?;
                    s.members.push(Member { key, value: v });
                    s.gaps.push(*i);
                    skip_ws(b, i);
                    match *b.get(*i)? {
                        b',' => {
                            *i += 1;
                            s.gaps.push(*i);
                        }
                        b'}' => {
                            *i += 1;
                            break;
                        }
                        _ => return None,
                    }
                }
            }
        }
        b'[' => {
            *i += 1;
            s.gaps.push(*i);
            skip_ws(b, i);
            if b.get(*i) == Some(&b']') {
                *i += 1;
            } else {
                loop {
                    skip_ws(b, i);
                    value(b, i, s, depth + 1)?;
                    s.gaps.push(*i);
                    skip_ws(b, i);
                    match *b.get(*i)? {
                        b',' => {
                            *i += 1;
                            s.gaps.push(*i);
                        }
                        b']' => {
                            *i += 1;
                            break;
                        }
                        _ => return None,
                    }
                }
            }
        }
        b'"' => string(b, i)?,
        _ => {
            while *i < b.len()
                && (b[*i].is_ascii_alphanumeric() || matches!(b[*i], b'+' | b'-' | b'.'))
            {
                *i += 1;
            }
            if *i == start {
                return None;
            }
        }
    }
    let r = start..*i;
    s.values.push(r.clone());
    Some(r)
}

fn scan(b: &[u8]) -> Option<Scan> {
    let mut s = Scan::default();
    let mut i = if b.starts_with(BOM) { BOM.len() } else { 0 };
    skip_ws(b, &mut i);
    value(b, &mut i, &mut s, 0)?;
    Some(s)
}

/// The key of a dictionary entry `"key":value` (with its quotes), if it is one.
fn dict_key(entry: &[u8]) -> Option<&[u8]> {
    if entry.first() != Some(&b'"') {
        return None;
    }
    let mut i = 0;
    string(entry, &mut i)?;
    (entry.get(i) == Some(&b':')).then(|| &entry[..i])
}

/// A value to put somewhere: a known odd one, a number, a dictionary entry's value, a
/// deep array or a long string.
fn json_value(rng: &mut Rng, dict: &[&[u8]]) -> Vec<u8> {
    match rng.below(10) {
        0..=3 => rng.pick(JSON_VALUES).as_bytes().to_vec(),
        4..=5 => rng.pick(NUMBERS).as_bytes().to_vec(),
        6..=7 if !dict.is_empty() => {
            let e = rng.pick::<&[u8]>(dict);
            match dict_key(e) {
                Some(k) => e[k.len() + 1..].to_vec(),
                None => e.to_vec(),
            }
        }
        8 => {
            let d = *rng.pick(&[2usize, 64, 127, 128, 129, 200]);
            let mut v = b"[".repeat(d);
            v.extend_from_slice(&b"]".repeat(d));
            v
        }
        _ => {
            let n = *rng.pick(&[1usize, 100, 5000, 40_000]);
            let mut v = b"\"".to_vec();
            v.extend(std::iter::repeat_n(b'a', n));
            v.push(b'"');
            v
        }
    }
}

/// A key spelled with some of its characters as `\u` escapes.
fn escape_key(rng: &mut Rng, key: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    let inner = &key[1..key.len().saturating_sub(1).max(1)];
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        if c == b'\\' {
            // Keep an existing escape whole.
            let end = (i + 2).min(inner.len());
            out.extend_from_slice(&inner[i..end]);
            i = end;
            continue;
        }
        if c.is_ascii() && rng.one_in(2) {
            let e = if rng.one_in(2) {
                format!("\\u{c:04x}")
            } else {
                format!("\\u{c:04X}")
            };
            out.extend_from_slice(e.as_bytes());
        } else {
            out.push(c);
        }
        i += 1;
    }
    out.push(b'"');
    out
}

/// JSON-aware mutations; false when the input is not JSON enough to apply one.
fn json(rng: &mut Rng, b: &mut Vec<u8>, dict: &[&[u8]]) -> bool {
    if rng.one_in(40) {
        insert(b, 0, BOM);
        return true;
    }
    let Some(s) = scan(b) else {
        return false;
    };
    match rng.below(13) {
        0 | 1 if !s.members.is_empty() => {
            // The same key twice (maybe spelled otherwise, maybe with another value).
            let m = rng.pick(&s.members);
            let mut key = b[m.key.clone()].to_vec();
            if rng.one_in(2) {
                key = escape_key(rng, &key);
            }
            let val = if rng.one_in(2) {
                b[m.value.clone()].to_vec()
            } else {
                json_value(rng, dict)
            };
            let mut ins = b",".to_vec();
            ins.extend_from_slice(&key);
            ins.push(b':');
            ins.extend_from_slice(&val);
            if rng.one_in(2) {
                insert(b, m.value.end, &ins);
            } else {
                // Before the member instead.
                ins.remove(0);
                ins.push(b',');
                insert(b, m.key.start, &ins);
            }
        }
        2 if !s.members.is_empty() => {
            let m = rng.pick(&s.members);
            let key = escape_key(rng, &b[m.key.clone()]);
            replace(b, m.key.clone(), &key);
        }
        3 | 4 if !s.values.is_empty() => {
            let v = rng.pick(&s.values).clone();
            let new = json_value(rng, dict);
            replace(b, v, &new);
        }
        5 if !s.gaps.is_empty() => {
            let g = *rng.pick(&s.gaps);
            insert(b, g, rng.pick(WHITESPACE).as_bytes());
        }
        6 if !s.members.is_empty() && !dict.is_empty() => {
            let m = rng.pick(&s.members);
            if let Some(k) = dict_key(rng.pick::<&[u8]>(dict)) {
                replace(b, m.key.clone(), k);
            }
        }
        7 if !s.members.is_empty() => {
            // Drop a member and a comma next to it.
            let m = rng.pick(&s.members);
            let mut r = m.key.start..m.value.end;
            let mut j = r.end;
            skip_ws(b, &mut j);
            if b.get(j) == Some(&b',') {
                r.end = j + 1;
            } else {
                let mut k = r.start;
                while k > 0 && matches!(b[k - 1], b' ' | b'\t' | b'\n' | b'\r') {
                    k -= 1;
                }
                if k > 0 && b[k - 1] == b',' {
                    r.start = k - 1;
                }
            }
            b.drain(r);
        }
        8 | 9 if !s.objects.is_empty() && !dict.is_empty() => {
            let (at, empty) = *rng.pick(&s.objects);
            let mut e = rng.pick(dict).to_vec();
            if dict_key(&e).is_none() {
                return false;
            }
            if !empty {
                e.push(b',');
            }
            insert(b, at, &e);
        }
        10 if !s.values.is_empty() => {
            let v = rng.pick(&s.values).clone();
            let (open, close): (&[u8], &[u8]) = if rng.one_in(2) {
                (b"[", b"]")
            } else {
                (b"{\"x\":", b"}")
            };
            insert(b, v.end, close);
            insert(b, v.start, open);
        }
        11 if s.members.len() >= 2 => {
            // One member's value copied over another's.
            let a = rng.pick(&s.members);
            let c = rng.pick(&s.members);
            let from = b[a.value.clone()].to_vec();
            let to = c.value.clone();
            let overlap = to.start < a.value.end && a.value.start < to.end;
            if overlap {
                return false;
            }
            replace(b, to, &from);
        }
        _ => {
            let runs: Vec<&Range<usize>> = s
                .values
                .iter()
                .filter(|r| b[r.start].is_ascii_digit() || b[r.start] == b'-')
                .collect();
            if runs.is_empty() {
                return false;
            }
            let r = (*rng.pick(&runs)).clone();
            replace(b, r, rng.pick(NUMBERS).as_bytes());
        }
    }
    true
}

// --- SSE ----------------------------------------------------------------------------

/// The events of an SSE text: each range ends after its blank line (or at the end).
fn events(b: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        let end = if b[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if b[i..].starts_with(b"\n\n") || b[i..].starts_with(b"\r\r") {
            Some(i + 2)
        } else {
            None
        };
        match end {
            Some(e) => {
                out.push(start..e);
                start = e;
                i = e;
            }
            None => i += 1,
        }
    }
    if start < b.len() {
        out.push(start..b.len());
    }
    out
}

/// The payloads of `data:` lines: from after `data:` (and one space) to the line end.
fn data_payloads(b: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut line_start = 0;
    for i in 0..=b.len() {
        if i == b.len() || b[i] == b'\n' || b[i] == b'\r' {
            let line = &b[line_start..i];
            if let Some(rest) = line.strip_prefix(b"data:") {
                let skip = usize::from(rest.starts_with(b" "));
                out.push(line_start + 5 + skip..i);
            }
            line_start = i + 1;
        }
    }
    out
}

fn line_starts(b: &[u8]) -> Vec<usize> {
    let mut out = vec![0];
    for (i, c) in b.iter().enumerate() {
        if *c == b'\n' || *c == b'\r' {
            out.push(i + 1);
        }
    }
    out
}

const SSE_LINES: &[&str] = &[
    ": ping\n",
    ":\n",
    "id: 1\n",
    "retry: 10\n",
    "event: error\n",
    "event: ping\n",
    "data\n",
    "data:\n",
    "\n",
    "data: [DONE]\n",
    "data: [DONE]\n\n",
    "data:[DONE]\n\n",
];

/// SSE-aware mutations; false when the input has no event to work on.
fn sse(rng: &mut Rng, b: &mut Vec<u8>, dict: &[&[u8]]) -> bool {
    let ev = events(b);
    if ev.is_empty() {
        return false;
    }
    match rng.below(11) {
        0 => {
            let e = rng.pick(&ev).clone();
            let piece = b[e.clone()].to_vec();
            insert(b, e.end, &piece);
        }
        1 => {
            let e = rng.pick(&ev).clone();
            b.drain(e);
        }
        2 if ev.len() >= 2 => {
            let i = rng.below(ev.len() - 1);
            let (x, y) = (ev[i].clone(), ev[i + 1].clone());
            let mut swapped = b[y.clone()].to_vec();
            swapped.extend_from_slice(&b[x.clone()]);
            replace(b, x.start..y.end, &swapped);
        }
        3 => {
            let nl: Vec<usize> = (0..b.len()).filter(|i| b[*i] == b'\n').collect();
            if nl.is_empty() {
                return false;
            }
            if rng.one_in(4) {
                let all: Vec<u8> = b
                    .iter()
                    .flat_map(|c| {
                        if *c == b'\n' {
                            b"\r\n".to_vec()
                        } else {
                            vec![*c]
                        }
                    })
                    .collect();
                *b = all;
            } else {
                let i = *rng.pick(&nl);
                let with: &[u8] = if rng.one_in(2) { b"\r\n" } else { b"\r" };
                replace(b, i..i + 1, with);
            }
        }
        4 => {
            // A data line cut in two (the payload joins with a newline).
            let d = data_payloads(b);
            if d.is_empty() {
                return false;
            }
            let r = rng.pick(&d).clone();
            let at = r.start + rng.below(r.len() + 1);
            let cut: &[u8] = if rng.one_in(2) {
                b"\ndata: "
            } else {
                b"\ndata:"
            };
            insert(b, at, cut);
        }
        5 if !dict.is_empty() => {
            let e = rng.pick(&ev).clone();
            let at = if rng.one_in(2) { e.start } else { e.end };
            insert(b, at, rng.pick::<&[u8]>(dict));
        }
        6..=8 => {
            // The JSON of one event mutated.
            let d = data_payloads(b);
            if d.is_empty() {
                return false;
            }
            let r = rng.pick(&d).clone();
            let mut payload = b[r.clone()].to_vec();
            if !json(rng, &mut payload, &[]) {
                return false;
            }
            replace(b, r, &payload);
        }
        9 => {
            let starts = line_starts(b);
            let at = *rng.pick(&starts);
            insert(b, at, rng.pick(SSE_LINES).as_bytes());
        }
        _ => {
            let e = rng.pick(&ev).clone();
            let at = e.start + rng.below(e.len() + 1);
            b.truncate(at);
        }
    }
    true
}

// --- JWT ----------------------------------------------------------------------------

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The order of P-256, big-endian.
const P256_N: [u8; 32] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51,
];

/// The order L of the Ed25519 group, little-endian.
const ED25519_L: [u8; 32] = [
    0xED, 0xD3, 0xF5, 0x5C, 0x1A, 0x63, 0x12, 0x58, 0xD6, 0x9C, 0xF7, 0xA2, 0xDE, 0xF9, 0xDE, 0x14,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
];

/// `n - s` for 32-byte big-endian numbers (ECDSA: the other valid `s`).
pub(super) fn negate_s(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

/// `s + L` for 32-byte little-endian numbers (Ed25519: a non-canonical `S`).
fn add_l(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let x = u16::from(s[i]) + u16::from(ED25519_L[i]) + carry;
        out[i] = x as u8;
        carry = x >> 8;
    }
    out
}

const HEADER_EDITS: &[(&str, &str)] = &[
    ("alg", "\"none\""),
    ("alg", "\"None\""),
    ("alg", "\"HS256\""),
    ("alg", "\"ES256\""),
    ("alg", "\"EdDSA\""),
    ("alg", "\"RS256\""),
    ("typ", "\"JWT\""),
    ("typ", "\"AT+JWT\""),
    ("typ", "\"application/at+jwt\""),
    ("typ", "null"),
    ("kid", "\"\""),
    ("kid", "null"),
    ("kid", "\"../../etc/passwd\""),
    ("jku", "\"https://attacker.test/jwks.json\""),
    ("x5u", "\"https://attacker.test/x.pem\""),
    (
        "jwk",
        "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"AAAA\"}",
    ),
    ("crit", "[\"exp\"]"),
];

const CLAIM_EDITS: &[(&str, &str)] = &[
    ("sub", "\"00000000-0000-0000-0000-000000000001\""),
    ("sub", "\"admin\""),
    ("exp", "99999999999"),
    ("exp", "1"),
    ("exp", "\"9999999999\""),
    ("exp", "1e20"),
    ("nbf", "0"),
    ("iat", "0"),
    ("aud", "[\"tollgate\",\"other\"]"),
    ("aud", "\"other\""),
    ("iss", "\"https://evil.test\""),
    (
        "scope",
        "\"llm.inference models.read credits.read user.info admin\"",
    ),
    ("client_id", "\"other-client\""),
    ("sid", "\"not-a-uuid\""),
    ("jti", "null"),
];

/// Sets `key` to `value` in a JSON object text (replacing or appending).
fn set_member(obj: &[u8], key: &str, value: &str) -> Option<Vec<u8>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(obj).ok()?;
    v.insert(key.to_owned(), serde_json::from_str(value).ok()?);
    serde_json::to_vec(&v).ok()
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    aws_lc_rs::hmac::sign(&k, msg).as_ref().to_vec()
}

/// JWT-aware mutations (`dict`: secrets to try as HMAC keys, e.g. the public keys).
fn jwt(rng: &mut Rng, b: &mut Vec<u8>, pool: &[Vec<u8>], dict: &[&[u8]]) -> bool {
    let Ok(s) = std::str::from_utf8(b) else {
        return false;
    };
    let parts: Vec<String> = s.split('.').map(str::to_owned).collect();
    if parts.len() != 3 {
        return false;
    }
    let (h, p, sig) = (&parts[0], &parts[1], &parts[2]);
    let out: String = match rng.below(14) {
        0..=2 if !sig.is_empty() => {
            // One character of the signature changed.
            let mut sb = sig.as_bytes().to_vec();
            let i = rng.below(sb.len());
            sb[i] = *rng.pick(B64URL);
            format!("{h}.{p}.{}", String::from_utf8_lossy(&sb))
        }
        3 => {
            // The last character of a segment with other low (padding) bits.
            let seg = rng.below(3);
            let mut ps = parts.clone();
            let Some(last) = ps[seg].pop() else {
                return false;
            };
            let Some(idx) = B64URL.iter().position(|c| char::from(*c) == last) else {
                return false;
            };
            let idx = idx ^ (1 + rng.below(15));
            ps[seg].push(char::from(B64URL[idx % 64]));
            ps.join(".")
        }
        4 | 5 => {
            // A header field set, re-encoded; claims and signature kept.
            let Ok(hj) = URL_SAFE_NO_PAD.decode(h) else {
                return false;
            };
            let (k, v) = rng.pick(HEADER_EDITS);
            let Some(nh) = set_member(&hj, k, v) else {
                return false;
            };
            format!("{}.{p}.{sig}", URL_SAFE_NO_PAD.encode(nh))
        }
        6 | 7 => {
            // A claim set (or the claims' JSON mutated), re-encoded; signature kept.
            let Ok(pj) = URL_SAFE_NO_PAD.decode(p) else {
                return false;
            };
            let np = if rng.one_in(2) {
                let (k, v) = rng.pick(CLAIM_EDITS);
                match set_member(&pj, k, v) {
                    Some(x) => x,
                    None => return false,
                }
            } else {
                let mut x = pj;
                if !json(rng, &mut x, &[]) {
                    return false;
                }
                x
            };
            format!("{h}.{}.{sig}", URL_SAFE_NO_PAD.encode(np))
        }
        8 => {
            // Another token's signature, or its header and claims.
            let o = rng.pick(pool);
            let Ok(os) = std::str::from_utf8(o) else {
                return false;
            };
            let op: Vec<&str> = os.split('.').collect();
            if op.len() != 3 {
                return false;
            }
            if rng.one_in(2) {
                format!("{h}.{p}.{}", op[2])
            } else {
                format!("{}.{}.{sig}", op[0], op[1])
            }
        }
        9 => {
            // The other signature that verifies the same message with a lax verifier.
            let Ok(raw) = URL_SAFE_NO_PAD.decode(sig) else {
                return false;
            };
            if raw.len() != 64 {
                return false;
            }
            let mut ns = raw[..32].to_vec();
            if rng.one_in(2) {
                ns.extend_from_slice(&negate_s(&raw[32..]));
            } else {
                ns.extend_from_slice(&add_l(&raw[32..]));
            }
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(ns))
        }
        10 => {
            // alg none (same kid), no signature or the old one.
            let Ok(hj) = URL_SAFE_NO_PAD.decode(h) else {
                return false;
            };
            let Some(nh) = set_member(&hj, "alg", "\"none\"") else {
                return false;
            };
            let tail = if rng.one_in(2) { "" } else { sig.as_str() };
            format!("{}.{p}.{tail}", URL_SAFE_NO_PAD.encode(nh))
        }
        11 if !dict.is_empty() => {
            // HS256 keyed with something public (key confusion).
            let Ok(hj) = URL_SAFE_NO_PAD.decode(h) else {
                return false;
            };
            let Some(nh) = set_member(&hj, "alg", "\"HS256\"") else {
                return false;
            };
            let nh = URL_SAFE_NO_PAD.encode(nh);
            let mac = hmac_sha256(rng.pick::<&[u8]>(dict), format!("{nh}.{p}").as_bytes());
            format!("{nh}.{p}.{}", URL_SAFE_NO_PAD.encode(mac))
        }
        12 => {
            let seg = rng.below(3);
            let mut ps = parts.clone();
            match rng.below(5) {
                0 => ps[seg].push('='),
                1 => ps[seg] = ps[seg].replace('-', "+").replace('_', "/"),
                2 => {
                    ps[seg].pop();
                }
                3 => ps[seg].push('A'),
                _ => ps[seg].clear(),
            }
            ps.join(".")
        }
        _ => match rng.below(5) {
            0 => format!(" {s}"),
            1 => format!("{s} "),
            2 => format!("{p}.{h}.{sig}"),
            3 => format!("{s}.{sig}"),
            _ => format!("{h}.{p}"),
        },
    };
    *b = out.into_bytes();
    true
}

// --- forms --------------------------------------------------------------------------

const FORM_ODDITIES: &[&str] = &[
    "%",
    "%G1",
    "%F",
    "%FF",
    "%C3%28",
    "%00",
    "%E2%80%A8",
    "%2B",
    "%26",
    "%3D",
    "+",
    "%20",
    "=",
];

/// Form-aware mutations (`dict`: `key=value` pairs to add).
fn form(rng: &mut Rng, b: &mut Vec<u8>, dict: &[&[u8]]) -> bool {
    let mut pairs: Vec<Vec<u8>> = b.split(|c| *c == b'&').map(<[u8]>::to_vec).collect();
    let n = pairs.len();
    let key_end = |p: &[u8]| p.iter().position(|c| *c == b'=').unwrap_or(p.len());
    match rng.below(11) {
        0 | 1 => {
            // A pair repeated: as it is, with another value, or empty.
            let p = rng.pick(&pairs).clone();
            let k = p[..key_end(&p)].to_vec();
            let dup = match rng.below(3) {
                0 => p,
                1 => [&k[..], b"="].concat(),
                _ => [&k[..], b"=other"].concat(),
            };
            let at = rng.below(n + 1);
            pairs.insert(at, dup);
        }
        2 | 3 => {
            // A key's characters percent-encoded (the same key once decoded).
            let i = rng.below(n);
            let ke = key_end(&pairs[i]);
            let mut nk = Vec::new();
            for c in &pairs[i][..ke] {
                if rng.one_in(2) {
                    let e = if rng.one_in(2) {
                        format!("%{c:02X}")
                    } else {
                        format!("%{c:02x}")
                    };
                    nk.extend_from_slice(e.as_bytes());
                } else {
                    nk.push(*c);
                }
            }
            let rest = pairs[i][ke..].to_vec();
            pairs[i] = [nk, rest].concat();
        }
        4 => {
            let i = rng.below(n);
            let ke = key_end(&pairs[i]);
            if rng.one_in(2) {
                pairs[i].truncate(ke);
            } else {
                let keep = (ke + 1).min(pairs[i].len());
                pairs[i].truncate(keep);
            }
        }
        5 => match rng.below(4) {
            0 => pairs.insert(rng.below(n + 1), Vec::new()),
            1 => pairs.insert(0, Vec::new()),
            2 => pairs.push(Vec::new()),
            _ => {
                let i = rng.below(n);
                let at = rng.below(pairs[i].len() + 1);
                pairs[i].insert(at, b';');
            }
        },
        6 => {
            let i = rng.below(n);
            let at = rng.below(pairs[i].len() + 1);
            let o = rng.pick(FORM_ODDITIES).as_bytes();
            pairs[i].splice(at..at, o.iter().copied());
        }
        7 if n > 1 => {
            pairs.remove(rng.below(n));
        }
        8 if n > 1 => {
            let (x, y) = (rng.below(n), rng.below(n));
            pairs.swap(x, y);
        }
        9 if !dict.is_empty() => {
            let e = rng.pick(dict).to_vec();
            pairs.insert(rng.below(n + 1), e);
        }
        _ => {
            // Case changed in a key.
            let i = rng.below(n);
            let ke = key_end(&pairs[i]);
            for c in &mut pairs[i][..ke] {
                if rng.one_in(2) {
                    *c = if c.is_ascii_lowercase() {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    };
                }
            }
        }
    }
    *b = pairs.join(&b'&');
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_finds_members_and_values() {
        let b = br#" {"a":1,"b":[true,{"c":"x\"y"}],"d":{}} "#;
        let s = scan(b).unwrap();
        let keys: Vec<&[u8]> = s.members.iter().map(|m| &b[m.key.clone()]).collect();
        assert_eq!(keys, [&b"\"a\""[..], b"\"c\"", b"\"b\"", b"\"d\""]);
        assert_eq!(&b[s.members[1].value.clone()], br#""x\"y""#);
        assert!(scan(br#"{"a":}"#).is_none());
        let k = escape_key(&mut Rng::new(3), b"\"ab\"");
        let decoded: String = serde_json::from_slice(&k).unwrap();
        assert_eq!(decoded, "ab");
    }

    #[test]
    fn signature_twins_are_computed() {
        // n - s, then n - (n - s) = s.
        let s: Vec<u8> = (1..=32).collect();
        assert_eq!(negate_s(&negate_s(&s)), s);
        let zero = [0u8; 32];
        assert_eq!(add_l(&zero), ED25519_L.to_vec());
    }

    #[test]
    fn events_and_data_payloads_are_found() {
        let b = b"event: a\ndata: {\"x\":1}\n\ndata:2\r\n\r\ntail";
        let ev = events(b);
        assert_eq!(ev.len(), 3);
        let d: Vec<&[u8]> = data_payloads(b).into_iter().map(|r| &b[r]).collect();
        assert_eq!(d, [&b"{\"x\":1}"[..], b"2"]);
    }
}
