//! Streamed response bodies split into events as the bytes arrive: server-sent events
//! (`text/event-stream`, WHATWG HTML §9.2.6) and JSON lines (`application/x-ndjson`, as
//! Ollama streams). The reader is incremental and bounded: a line or an event's data
//! longer than `max` is dropped (and counted), never buffered whole.

/// How the body divides into events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `event:`/`data:` fields, an empty line ends an event.
    Sse,
    /// One JSON document per line.
    JsonLines,
}

impl Format {
    /// The streaming format of a response's `Content-Type`, if it is one.
    pub fn of(content_type: Option<&str>) -> Option<Format> {
        let ct = content_type?
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match ct.as_str() {
            "text/event-stream" => Some(Format::Sse),
            "application/x-ndjson" | "application/jsonl" | "application/json-lines" => {
                Some(Format::JsonLines)
            }
            _ => None,
        }
    }
}

/// One event: its type (`event:` field; empty for none) and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub kind: &'a str,
    pub data: &'a str,
}

#[derive(Debug, Clone)]
pub struct Reader {
    format: Format,
    max: usize,
    line: Vec<u8>,
    /// The current line overflowed `max`: skip to its end.
    skipping: bool,
    kind: String,
    data: String,
    /// The current event's data overflowed: drop the event.
    data_dropped: bool,
    /// Events dropped for being longer than `max`.
    pub dropped: u64,
}

impl Reader {
    pub fn new(format: Format, max: usize) -> Self {
        Self {
            format,
            max,
            line: Vec::new(),
            skipping: false,
            kind: String::new(),
            data: String::new(),
            data_dropped: false,
            dropped: 0,
        }
    }

    /// Feeds body bytes (after transfer decoding); calls `on_event` for each event they
    /// complete.
    pub fn feed(&mut self, mut bytes: &[u8], on_event: &mut dyn FnMut(Event<'_>)) {
        while !bytes.is_empty() {
            let nl = bytes.iter().position(|&b| b == b'\n');
            let (piece, rest, ends) = match nl {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if !self.skipping {
                if self.line.len() + piece.len() > self.max {
                    self.skipping = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(piece);
                }
            }
            if !ends {
                continue;
            }
            if self.skipping {
                self.skipping = false;
                self.dropped += 1;
                self.data_dropped = true;
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line_done(&line, on_event);
            line.clear();
            self.line = line;
        }
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut dyn FnMut(Event<'_>)) {
        let line = String::from_utf8_lossy(line);
        match self.format {
            Format::JsonLines => {
                if !line.trim().is_empty() {
                    on_event(Event {
                        kind: "",
                        data: line.trim(),
                    });
                }
            }
            Format::Sse => {
                if line.is_empty() {
                    let nothing = self.data.is_empty() && self.kind.is_empty();
                    if !self.data_dropped && !nothing {
                        on_event(Event {
                            kind: &self.kind,
                            data: &self.data,
                        });
                    }
                    self.kind.clear();
                    self.data.clear();
                    self.data_dropped = false;
                    return;
                }
                if line.starts_with(':') {
                    return; // comment (keep-alive)
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (&*line, ""),
                };
                match field {
                    "event" => self.kind = value.to_string(),
                    "data" => {
                        if self.data.len() + value.len() + 1 > self.max {
                            if !self.data_dropped {
                                self.dropped += 1;
                            }
                            self.data_dropped = true;
                            self.data.clear();
                        } else if !self.data_dropped {
                            if !self.data.is_empty() {
                                self.data.push('\n');
                            }
                            self.data.push_str(value);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(format: Format, max: usize, pieces: &[&[u8]]) -> (Vec<(String, String)>, u64) {
        let mut r = Reader::new(format, max);
        let mut out = Vec::new();
        for p in pieces {
            r.feed(p, &mut |e| {
                out.push((e.kind.to_string(), e.data.to_string()))
            });
        }
        (out, r.dropped)
    }

    #[test]
    fn sse_events_are_split_whatever_the_piece_boundaries() {
        let body = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let want = vec![
            ("message_start".to_string(), "{\"a\":1}".to_string()),
            (String::new(), "x\ny".to_string()),
            (String::new(), "[DONE]".to_string()),
        ];
        assert_eq!(events(Format::Sse, 1024, &[body]), (want.clone(), 0));
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(events(Format::Sse, 1024, &bytes), (want, 0));
    }

    #[test]
    fn json_lines_are_events() {
        let (ev, _) = events(
            Format::JsonLines,
            1024,
            &[b"{\"done\":false}\n{\"do", b"ne\":true}\n"],
        );
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1].1, "{\"done\":true}");
    }

    #[test]
    fn an_oversized_event_is_dropped_and_counted_not_buffered() {
        let long = vec![b'x'; 100];
        let body = [b"data: ".as_slice(), &long, b"\n\ndata: ok\n\n"].concat();
        let (ev, dropped) = events(Format::Sse, 50, &[&body]);
        assert_eq!(ev, vec![(String::new(), "ok".to_string())]);
        assert_eq!(dropped, 1);
    }

    #[test]
    fn formats_come_from_the_content_type() {
        assert_eq!(
            Format::of(Some("text/event-stream; charset=utf-8")),
            Some(Format::Sse)
        );
        assert_eq!(
            Format::of(Some("application/x-ndjson")),
            Some(Format::JsonLines)
        );
        assert_eq!(Format::of(Some("application/json")), None);
        assert_eq!(Format::of(None), None);
    }
}
