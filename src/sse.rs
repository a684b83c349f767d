//! An incremental server-sent-events parser (the WHATWG event-stream rules): bytes go
//! in as they arrive, in frames of any size, and whole events come out. Used to read
//! the streams of providers whose events are translated (Anthropic, Gemini); the
//! OpenAI pass-through has its own zero-copy tap in [`crate::stream_back`].

use memchr::memchr2;

/// One dispatched event: its `event:` name (if any) and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not yet terminated.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    event: Option<String>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds bytes; appends every event completed by them to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(i) = memchr2(b'\n', b'\r', bytes) {
            self.line.extend_from_slice(&bytes[..i]);
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out);
            self.line = line;
            self.line.clear();
            if bytes[i] == b'\r' {
                match bytes.get(i + 1) {
                    Some(b'\n') => bytes = &bytes[i + 2..],
                    Some(_) => bytes = &bytes[i + 1..],
                    None => {
                        self.after_cr = true;
                        return;
                    }
                }
            } else {
                bytes = &bytes[i + 1..];
            }
        }
        self.line.extend_from_slice(bytes);
    }

    /// Whether an event is started but not yet dispatched (the stream ended mid-event).
    pub fn pending(&self) -> bool {
        self.has_data || !self.line.is_empty()
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                let data = String::from_utf8_lossy(&self.data).into_owned();
                out.push(SseEvent {
                    event: self.event.take(),
                    data,
                });
            }
            self.event = None;
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line.starts_with(b":") {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_pieces(pieces: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for piece in pieces {
            p.feed(piece, &mut out);
        }
        out
    }

    #[test]
    fn names_data_comments_and_line_endings() {
        let s = b": keep-alive\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\ndata:a\r\ndata: b\r\n\r\nevent: x\rdata: c\r\rid: 7\nretry: 5\ndata\n\n";
        let ev = parse_pieces(&[s]);
        assert_eq!(
            ev,
            vec![
                SseEvent {
                    event: Some("ping".into()),
                    data: "{\"type\": \"ping\"}".into()
                },
                SseEvent {
                    event: None,
                    data: "a\nb".into()
                },
                SseEvent {
                    event: Some("x".into()),
                    data: "c".into()
                },
                SseEvent {
                    event: None,
                    data: String::new()
                },
            ]
        );
    }

    #[test]
    fn an_unterminated_event_is_pending_not_dispatched() {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        p.feed(b"data: {\"a\":1}\n", &mut out);
        assert!(out.is_empty());
        assert!(p.pending());
        p.feed(b"\n", &mut out);
        assert_eq!(out.len(), 1);
        assert!(!p.pending());
    }

    /// A stream mixing everything: names, multi-line data, CRLF, CR, comments and
    /// multi-byte UTF-8.
    const MIXED: &str = "event: message_start\r\ndata: {\"type\":\"message_start\"}\r\n\r\n: comment\n\nevent: content_block_delta\ndata: {\"text\":\"h\u{e9}llo \u{1f600}\"}\n\ndata: one\rdata: two\r\rdata: [DONE]\n\n";

    proptest! {
        /// The same events whether the bytes arrive whole, cut at arbitrary points, or
        /// one at a time.
        #[test]
        fn framing_does_not_matter(cuts in proptest::collection::vec(0usize..MIXED.len(), 0..20)) {
            let bytes = MIXED.as_bytes();
            let whole = parse_pieces(&[bytes]);
            prop_assert_eq!(whole.len(), 4);
            let mut cuts = cuts;
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in cuts { pieces.push(&bytes[last..c]); last = c; }
            pieces.push(&bytes[last..]);
            prop_assert_eq!(&parse_pieces(&pieces), &whole);
            let singles: Vec<&[u8]> = bytes.chunks(1).collect();
            prop_assert_eq!(&parse_pieces(&singles), &whole);
        }

        /// Arbitrary bytes never panic, and framing still does not matter.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200), cut in 0usize..200) {
            let whole = parse_pieces(&[&bytes]);
            let c = cut.min(bytes.len());
            prop_assert_eq!(parse_pieces(&[&bytes[..c], &bytes[c..]]), whole);
        }
    }
}
