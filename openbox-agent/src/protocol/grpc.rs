//! gRPC over HTTP/2: what the HTTP/2 parser adds to a stream whose request says
//! `content-type: application/grpc…` — the method from `:path`, the status from the
//! trailers, and the count and size of the length-prefixed messages each way
//! (gRPC's "Length-Prefixed-Message": a compressed flag, a 4-byte big-endian length,
//! the message).

use super::bytes::be_u32;
use super::http::header;
use super::Op;
use super::StatusCode;

/// Whether a request's headers make its stream a gRPC call.
pub(super) fn is_grpc(headers: &[(String, String)]) -> bool {
    header(headers, "content-type").is_some_and(|c| {
        c.get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
    })
}

/// Counts the messages of one direction of a call, across DATA frames of any size.
/// The message bytes themselves are kept by the HTTP/2 parser as the body.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Messages {
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    pub(super) count: u64,
    /// Message bytes announced by the prefixes (without the prefixes).
    pub(super) bytes: u64,
    /// Bytes were lost where a prefix was expected: the counts stop there.
    pub(super) lost: bool,
}

impl Messages {
    pub(super) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= take as u64;
                data = data.get(take..).unwrap_or_default();
                continue;
            }
            let take = (5 - self.prefix_len).min(data.len());
            if let (Some(dst), Some(src)) = (
                self.prefix.get_mut(self.prefix_len..self.prefix_len + take),
                data.get(..take),
            ) {
                dst.copy_from_slice(src);
            }
            self.prefix_len += take;
            data = data.get(take..).unwrap_or_default();
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let len = u64::from(be_u32(&self.prefix, 1).unwrap_or(0));
                self.count += 1;
                self.bytes += len;
                self.remaining = len;
            }
        }
    }

    /// `n` bytes of this direction's DATA were not captured. Inside a message they are
    /// skipped (its length is known); past its end a prefix was lost.
    pub(super) fn gap(&mut self, n: u64) {
        if n <= self.remaining && self.prefix_len == 0 {
            self.remaining -= n;
        } else {
            self.lost = true;
        }
    }

    /// A message was cut short by the end of the stream.
    fn partial(&self) -> bool {
        self.prefix_len > 0 || self.remaining > 0
    }
}

/// Adds the `rpc.*` attributes of a finished call to its op: service and method from
/// the `:path` (`/package.Service/Method`), `grpc-status` from the trailers (or from the
/// headers of a trailers-only response), the message counts and sizes. The span is
/// named `package.Service/Method`, as gRPC instrumentations name it.
pub(super) fn annotate(
    op: &mut Op,
    path: &str,
    response: &[(String, String)],
    sent: &Messages,
    received: &Messages,
) {
    op.attr("rpc.system", "grpc");
    if let Some((service, method)) = path.trim_start_matches('/').split_once('/') {
        op.attr("rpc.service", service.to_string());
        op.attr("rpc.method", method.to_string());
        op.name = format!("{service}/{method}");
    }
    for (dir, m) in [("request", sent), ("response", received)] {
        op.attr(&format!("rpc.grpc.{dir}.message_count"), m.count);
        op.attr(&format!("rpc.grpc.{dir}.message_bytes"), m.bytes);
        if m.lost || m.partial() {
            op.attr(&format!("rpc.grpc.{dir}.messages_incomplete"), true);
        }
    }
    let Some(code) = header(response, "grpc-status").and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    op.attr("rpc.grpc.status_code", code);
    if code != 0 {
        op.status = StatusCode::Error;
        let message = header(response, "grpc-message")
            .map(percent_decode)
            .filter(|m| !m.is_empty());
        op.status_description = Some(match message {
            Some(m) => format!("gRPC status {code} ({}): {m}", status_name(code)),
            None => format!("gRPC status {code} ({})", status_name(code)),
        });
    }
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 protocol spec).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_name(code: u32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "unknown code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_counted_across_any_split() {
        let wire: Vec<u8> = [
            &[0, 0, 0, 0, 3][..],
            b"abc",
            &[0, 0, 0, 0, 0],
            &[1, 0, 0, 1, 0],
        ]
        .concat()
        .into_iter()
        .chain(std::iter::repeat_n(7, 256))
        .collect();
        for cut in 0..wire.len() {
            let mut m = Messages::default();
            m.feed(&wire[..cut]);
            m.feed(&wire[cut..]);
            assert_eq!(
                (m.count, m.bytes, m.partial(), m.lost),
                (3, 259, false, false)
            );
        }
    }

    #[test]
    fn a_gap_inside_a_message_keeps_the_count_and_elsewhere_stops_it() {
        let mut m = Messages::default();
        m.feed(&[0, 0, 0, 0, 4, b'a']);
        m.gap(2);
        m.feed(&[b'd', 0, 0, 0, 0, 1, b'x']);
        assert_eq!((m.count, m.bytes, m.lost), (2, 5, false));
        m.gap(1);
        assert!(m.lost);
        m.feed(&[0, 0, 0, 0, 1, b'x']);
        assert_eq!(m.count, 2);
    }

    #[test]
    fn status_and_method_come_from_path_and_trailers() {
        let mut op = Op::default();
        let trailers = vec![
            ("grpc-status".to_string(), "5".to_string()),
            ("grpc-message".to_string(), "no%20such%20user%".to_string()),
        ];
        annotate(
            &mut op,
            "/users.v1.Users/Get",
            &trailers,
            &Messages::default(),
            &Messages::default(),
        );
        assert_eq!(op.name, "users.v1.Users/Get");
        assert_eq!(op.attributes["rpc.service"], "users.v1.Users");
        assert_eq!(op.attributes["rpc.method"], "Get");
        assert_eq!(op.attributes["rpc.grpc.status_code"], 5);
        assert_eq!(op.status, StatusCode::Error);
        assert_eq!(
            op.status_description.as_deref(),
            Some("gRPC status 5 (NOT_FOUND): no such user%")
        );
        assert!(is_grpc(&[(
            "Content-Type".into(),
            "application/grpc+proto".into()
        )]));
        assert!(!is_grpc(&[(
            "content-type".into(),
            "application/json".into()
        )]));
    }
}
