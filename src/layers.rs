//! The layering of the library's modules, and the test that enforces it.
//!
//! [`LAYERS`] lists the top-level modules from the bottom up. A module may refer only
//! to modules of a lower layer: never to a module above it, nor to another module of
//! its own layer (so a layer is a set of modules independent of each other, and no
//! import circle can form). The test reads every `src/**/*.rs` file and finds each
//! module's references to the others: `crate::x` paths (in `use` or anywhere in the
//! code, `use crate::{x, y::z}` groups included, `$crate::x` too) and `super::` paths
//! that climb from a submodule up to the crate root and down into another module.
//!
//! What is not a dependency, and is skipped: comments (doc comments included, so an
//! intra-doc link may point anywhere), string and char literals, and test code — an
//! item marked exactly `#[cfg(test)]` (a `mod tests { … }`, a `use`, a function) and
//! every file of a module declared `#[cfg(test)] mod x;` (the fuzz harness). Test code
//! may use any module.
//!
//! There is no list of tolerated exceptions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, bottom layer first. See the module doc for the rule. The order
/// follows the dependencies, which mostly follow the request's stages; where they do
/// not, the reason is given.
const LAYERS: &[&[&str]] = &[
    // Foundations, which use no other module: configuration, the error type, the
    // per-worker cell, the SSE parser, password hashing, a request's usage and price.
    &["config", "error", "worker", "sse", "password", "usage"],
    // Storage and the model request body.
    &["db", "body"],
    // Route's models (parse and translate read a model's limits), the ledger (reserve
    // and settle in Redis), and the per-user caches beside the request path.
    &["route", "ledger", "rate_limit", "preferences"],
    // Parse; the provider formats; off the request path, the flusher, the credit
    // lifecycle (changes made in PostgreSQL carried to the ledger) and reconciliation.
    &["parse", "translate", "flush", "lifecycle", "reconcile"],
    // A provider's deployments, retries and breaker.
    &["deploy"],
    // The provider clients (pooled connections, a request per deployment).
    &["upstream"],
    // Authenticate (its external issuer fetches keys with the upstream TLS settings).
    &["authenticate"],
    // The shared state every handler gets: it holds the parts above.
    &["state"],
    // What takes the shared state: settle, the OAuth server, ops, metrics, scopes.
    &["settle", "oauth", "ops", "telemetry", "scope"],
    // The request path's stages, each above the one it hands the request to: the
    // admitted request and its hold (ends in stage 8, settle), stream back (7),
    // forward (6), reserve (5).
    &["hold"],
    &["stream_back"],
    &["forward"],
    &["reserve"],
    // The handlers: the model endpoints (stages 3 and 4, then reserve), the account.
    &["endpoints", "account"],
    // The HTTP application: routes and middleware.
    &["app"],
    // The process: the server, then the command line.
    &["server"],
    &["cli"],
];

/// One reference from a file to another top-level module.
#[derive(Debug, Clone)]
struct Edge {
    from: String,
    to: String,
    file: String,
    line: usize,
}

/// The source with comments and string/char literals replaced by spaces (newlines
/// kept, so byte offsets and line numbers are the original's).
fn blank_comments_and_literals(src: &str) -> Vec<u8> {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let (mut j, mut depth) = (i + 2, 1);
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if c == b'r'
            && (i == 0 || !ident(b[i - 1]) || b[i - 1] == b'b')
            && matches!(b.get(i + 1), Some(b'"' | b'#'))
        {
            // A raw string r"…", r#"…"#, br"…" (or an identifier r#name).
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let start = i + 2 + hashes;
            let end = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| start + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, i, end);
            i = end;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                let end = b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map_or(b.len(), |p| i + 2 + p + 1);
                blank(&mut out, i, end);
                i = end;
            } else {
                let ch_len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                if b.get(i + 1 + ch_len) == Some(&b'\'') {
                    blank(&mut out, i, i + 2 + ch_len);
                    i += 2 + ch_len;
                } else {
                    i += 1;
                }
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The end (exclusive) of the item starting at `from`: its `;` or its `{ … }`,
/// whichever comes first outside brackets.
fn item_end(code: &[u8], from: usize) -> usize {
    let mut depth = 0usize;
    let mut i = from;
    while i < code.len() {
        match code[i] {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => return i + 1,
            b'{' if depth == 0 => return matching_brace(code, i) + 1,
            _ => {}
        }
        i += 1;
    }
    code.len()
}

/// The index of the `}` matching the `{` at `open`.
fn matching_brace(code: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, &c) in code.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// Skips whitespace and `#[…]` attributes from `i`.
fn skip_attributes(code: &[u8], mut i: usize) -> usize {
    loop {
        while i < code.len() && code[i].is_ascii_whitespace() {
            i += 1;
        }
        if code[i..].starts_with(b"#[") {
            let mut depth = 0usize;
            while i < code.len() {
                match code[i] {
                    b'[' => depth += 1,
                    b']' => {
                        depth -= 1;
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        } else {
            return i;
        }
    }
}

/// Blanks every item marked `#[cfg(test)]`; returns the names of the `mod x;` among
/// them (modules whose files are test code).
fn blank_test_items(code: &mut [u8]) -> Vec<String> {
    const MARK: &[u8] = b"#[cfg(test)]";
    let mut test_files = Vec::new();
    let mut i = 0;
    while let Some(p) = code[i..].windows(MARK.len()).position(|w| w == MARK) {
        let start = i + p;
        let item = skip_attributes(code, start);
        let end = item_end(code, item);
        let text = String::from_utf8_lossy(&code[item..end]).into_owned();
        let words: Vec<&str> = text
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ';'))
            .filter(|w| !w.is_empty())
            .collect();
        if let Some(m) = words.iter().position(|w| *w == "mod") {
            if let Some(name) = words.get(m + 1) {
                if text.trim_end().ends_with(';') {
                    test_files.push(name.trim_end_matches(';').to_string());
                }
            }
        }
        for c in &mut code[start..end] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        i = end;
    }
    test_files
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Reads an identifier at `i` (after whitespace); returns it and the index after it.
fn ident_at(code: &[u8], mut i: usize) -> (String, usize) {
    while i < code.len() && code[i].is_ascii_whitespace() {
        i += 1;
    }
    let start = i;
    while i < code.len() && is_ident(code[i]) {
        i += 1;
    }
    (String::from_utf8_lossy(&code[start..i]).into_owned(), i)
}

/// `::` at `i` (after whitespace): the index after it.
fn path_sep_at(code: &[u8], mut i: usize) -> Option<usize> {
    while i < code.len() && code[i].is_ascii_whitespace() {
        i += 1;
    }
    code[i..].starts_with(b"::").then_some(i + 2)
}

/// The first segment of each path in a `{ a, b::c, d::{e, f} }` group at `open`.
fn group_heads(code: &[u8], open: usize) -> Vec<(String, usize)> {
    let close = matching_brace(code, open);
    let mut heads = Vec::new();
    let mut i = open + 1;
    let mut depth = 0usize;
    let mut expect_head = true;
    while i < close {
        match code[i] {
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b',' if depth == 0 => expect_head = true,
            c if expect_head && depth == 0 && is_ident(c) => {
                let (name, next) = ident_at(code, i);
                heads.push((name, i));
                expect_head = false;
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    heads
}

/// The module path (below the crate root) of a file: `src/a.rs` → [a],
/// `src/a/mod.rs` → [a], `src/a/b.rs` → [a, b].
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// Every reference in one file (already blanked) to a top-level module.
fn references(code: &[u8], file_path: &[String], modules: &BTreeSet<&str>) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    // Inline `mod x {` blocks open at each point: (name, index of their `}`).
    let mut inline: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < code.len() {
        while inline.last().is_some_and(|&end| i > end) {
            inline.pop();
        }
        if !is_ident(code[i]) || (i > 0 && is_ident(code[i - 1])) {
            i += 1;
            continue;
        }
        let (word, after) = ident_at(code, i);
        match word.as_str() {
            "mod" => {
                let (_, after_name) = ident_at(code, after);
                let mut j = after_name;
                while j < code.len() && code[j].is_ascii_whitespace() {
                    j += 1;
                }
                if code.get(j) == Some(&b'{') {
                    inline.push(matching_brace(code, j));
                }
            }
            "crate" => {
                if let Some(next) = path_sep_at(code, after) {
                    found.extend(heads_at(code, next));
                }
            }
            "super" => {
                // Climb: each `super::` drops one segment of the current path.
                let depth = file_path.len() + inline.len();
                let mut ups = 1;
                let mut next = path_sep_at(code, after);
                while let Some(n) = next {
                    let (w, a) = ident_at(code, n);
                    if w == "super" {
                        ups += 1;
                        next = path_sep_at(code, a);
                    } else {
                        break;
                    }
                }
                if let Some(n) = next {
                    if ups >= depth {
                        found.extend(heads_at(code, n));
                    }
                    i = n;
                    continue;
                }
            }
            _ => {}
        }
        i = after;
    }
    found.retain(|(m, _)| modules.contains(m.as_str()));
    found
}

/// The top-level module(s) named at `i`, just after `crate::`: one name or a group.
fn heads_at(code: &[u8], mut i: usize) -> Vec<(String, usize)> {
    while i < code.len() && code[i].is_ascii_whitespace() {
        i += 1;
    }
    if code.get(i) == Some(&b'{') {
        group_heads(code, i)
    } else {
        vec![(ident_at(code, i).0, i)]
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn line_of(code: &[u8], at: usize) -> usize {
    code[..at].iter().filter(|&&c| c == b'\n').count() + 1
}

/// Every edge between top-level modules in the library's non-test code.
fn edges() -> Vec<Edge> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    let mut parsed = Vec::new();
    let mut test_dirs: Vec<Vec<String>> = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).expect("under src");
        let text = std::fs::read_to_string(path).expect("read source");
        let mut code = blank_comments_and_literals(&text);
        let mut parent = module_path(rel);
        let names = blank_test_items(&mut code);
        let is_root = rel == Path::new("lib.rs") || rel == Path::new("main.rs");
        if is_root {
            parent.clear();
        }
        for name in names {
            let mut m = parent.clone();
            m.push(name);
            test_dirs.push(m);
        }
        parsed.push((rel.to_path_buf(), is_root, code));
    }
    let mut out = Vec::new();
    for (rel, is_root, code) in parsed {
        if is_root {
            continue;
        }
        let path = module_path(&rel);
        if test_dirs.iter().any(|t| path.starts_with(t)) {
            continue;
        }
        let from = path[0].clone();
        for (to, at) in references(&code, &path, &modules) {
            if to != from {
                out.push(Edge {
                    from: from.clone(),
                    to,
                    file: format!("src/{}", rel.display()),
                    line: line_of(&code, at),
                });
            }
        }
    }
    out
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn every_module_is_in_one_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut declared = BTreeMap::new();
    for layer in LAYERS {
        for m in *layer {
            *declared.entry(*m).or_insert(0) += 1;
        }
    }
    let twice: Vec<_> = declared.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "modules listed more than once: {twice:?}");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let mut code = blank_comments_and_literals(&lib);
    blank_test_items(&mut code);
    let code = String::from_utf8_lossy(&code);
    let in_lib: BTreeSet<String> = code
        .split(';')
        .filter_map(|item| {
            let words: Vec<&str> = item.split_whitespace().collect();
            let m = words.iter().position(|w| *w == "mod")?;
            words.get(m + 1).map(|s| s.to_string())
        })
        .collect();
    let declared: BTreeSet<String> = declared.keys().map(|s| s.to_string()).collect();
    let missing: Vec<_> = in_lib.difference(&declared).collect();
    let unknown: Vec<_> = declared.difference(&in_lib).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "src/layers.rs LAYERS must list every module of lib.rs (test modules aside): \
         missing {missing:?}, not in lib.rs {unknown:?}"
    );
}

#[test]
fn modules_use_only_modules_below_them() {
    let edges = edges();
    assert!(
        edges.len() > 50,
        "found only {} references: is the scanner broken?",
        edges.len()
    );
    let mut violations = Vec::new();
    for e in &edges {
        let (Some(from), Some(to)) = (layer_of(&e.from), layer_of(&e.to)) else {
            violations.push(format!(
                "{}:{}: {} -> {} (module not in LAYERS)",
                e.file, e.line, e.from, e.to
            ));
            continue;
        };
        if to < from {
            continue;
        }
        let what = if to == from { "same layer" } else { "upward" };
        violations.push(format!(
            "{}:{}: {} -> {} ({what})",
            e.file, e.line, e.from, e.to
        ));
    }
    for v in &violations {
        eprintln!("layering violation: {v}");
    }
    assert!(
        violations.is_empty(),
        "{} reference(s) break the layering of src/layers.rs (listed above)",
        violations.len()
    );
}

/// The references found in one made-up file `src/a/b.rs` (module `a::b`).
fn scan(src: &str) -> Vec<(String, usize)> {
    let mut code = blank_comments_and_literals(src);
    blank_test_items(&mut code);
    let modules: BTreeSet<&str> = ["a", "x", "y", "z", "w", "v"].into_iter().collect();
    references(&code, &["a".into(), "b".into()], &modules)
        .into_iter()
        .map(|(m, at)| (m, line_of(&code, at)))
        .collect()
}

#[test]
fn the_scanner_finds_paths_and_skips_comments_literals_and_tests() {
    let src = r##"//! See [`crate::v`].
use crate::x::Thing;
use crate::{y, z::{One, Two}};
/// Unlike [`crate::v::Other`], this one is used.
fn f() -> super::super::w::T { let _ = "crate::v"; let _ = r#"crate::v"#; let _ = '"'; crate::x::g() }
/* crate::v */
#[cfg(test)]
#[allow(unused)]
mod tests {
    use crate::v::Tested;
}
#[cfg(test)]
use crate::v;
mod inner {
    use super::super::Sibling;
    use super::super::super::w::Deep;
}
"##;
    let found = scan(src);
    let expected: Vec<(String, usize)> =
        [("x", 2), ("y", 3), ("z", 3), ("w", 5), ("x", 5), ("w", 16)]
            .iter()
            .map(|(m, l)| (m.to_string(), *l))
            .collect();
    assert_eq!(found, expected);
}
