//! One direction's reader of length-prefixed messages, shared by the binary parsers
//! (PostgreSQL, MySQL, MongoDB): a fixed-size header that gives the body's length, then
//! the body, of which at most a chosen number of bytes is kept.
//!
//! The reader only gathers bytes across pieces of any size; what a header means (its
//! length field, whether it is plausible, how much of the body is worth keeping) is the
//! parser's. A lost stretch of bytes ([`FrameReader::skip`]) is skipped when it falls
//! inside a body, whose length is known; anywhere else nothing is left to frame on and
//! the reader is `dead` until the parser restarts it.

/// Reads headers of at most `H` bytes and the bodies they announce.
pub(super) struct FrameReader<const H: usize> {
    header: [u8; H],
    header_len: usize,
    in_body: bool,
    /// Body bytes still to come.
    remaining: usize,
    /// Most body bytes kept.
    keep: usize,
    body: Vec<u8>,
    /// Some body bytes were not kept: over the keep limit, or lost to a gap.
    truncated: bool,
    /// Timestamp of the piece that held the message's first header byte.
    pub(super) start_ts: u64,
    /// The stream can no longer be framed (impossible header, or bytes lost between
    /// messages).
    pub(super) dead: bool,
}

impl<const H: usize> Default for FrameReader<H> {
    fn default() -> Self {
        Self {
            header: [0; H],
            header_len: 0,
            in_body: false,
            remaining: 0,
            keep: 0,
            body: Vec::new(),
            truncated: false,
            start_ts: 0,
            dead: false,
        }
    }
}

impl<const H: usize> FrameReader<H> {
    /// Between messages: no header or body byte of the next one read yet.
    pub(super) fn at_boundary(&self) -> bool {
        !self.in_body && self.header_len == 0
    }

    pub(super) fn in_body(&self) -> bool {
        self.in_body
    }

    /// Takes header bytes from `data` until `need` (≤ `H`) have been read, then returns
    /// them; `None` while more are needed or when reading a body. `stamp`: this header
    /// starts a message (its first byte's `ts` becomes `start_ts`), rather than
    /// continuing one.
    pub(super) fn read_header(
        &mut self,
        data: &mut &[u8],
        ts: u64,
        need: usize,
        stamp: bool,
    ) -> Option<[u8; H]> {
        if self.in_body || data.is_empty() {
            return None;
        }
        let need = need.min(H);
        if self.header_len == 0 && stamp {
            self.start_ts = ts;
        }
        let take = need.saturating_sub(self.header_len).min(data.len());
        let (head, rest) = data.split_at(take);
        if let Some(dst) = self.header.get_mut(self.header_len..self.header_len + take) {
            dst.copy_from_slice(head);
        }
        self.header_len += take;
        *data = rest;
        if self.header_len < need {
            return None;
        }
        self.header_len = 0;
        Some(self.header)
    }

    /// The header just read announces a body of `len` bytes, of which `keep` are kept.
    pub(super) fn start_body(&mut self, len: usize, keep: usize) {
        self.body.clear();
        self.keep = keep;
        self.truncated = false;
        self.continue_body(len);
    }

    /// The header just read announces `len` more bytes of the same body (a payload
    /// split over several packets): they are kept after the ones before, within the
    /// same keep limit.
    pub(super) fn continue_body(&mut self, len: usize) {
        self.remaining = len;
        self.in_body = true;
    }

    /// Takes body bytes from `data`; true when the body (as announced so far) is complete.
    pub(super) fn read_body(&mut self, data: &mut &[u8]) -> bool {
        if !self.in_body {
            return false;
        }
        let take = self.remaining.min(data.len());
        let (chunk, rest) = data.split_at(take);
        let room = self.keep.saturating_sub(self.body.len()).min(take);
        self.body
            .extend_from_slice(chunk.get(..room).unwrap_or_default());
        if room < take {
            self.truncated = true;
        }
        self.remaining -= take;
        *data = rest;
        if self.remaining > 0 {
            return false;
        }
        self.in_body = false;
        true
    }

    /// The kept bytes of the body just completed, and whether some were not kept.
    pub(super) fn take_body(&mut self) -> (Vec<u8>, bool) {
        (std::mem::take(&mut self.body), self.truncated)
    }

    /// Gives a parsed body's buffer back for the next message, unless it grew large.
    pub(super) fn recycle(&mut self, mut body: Vec<u8>) {
        body.clear();
        if self.body.capacity() == 0 && body.capacity() <= 64 * 1024 {
            self.body = body;
        }
    }

    /// `n` bytes were lost. Inside a body they are skipped; returns (the body ended,
    /// the stream is lost). A body ended this way is marked truncated. Bytes lost outside
    /// a body, or running past its end, leave nothing to frame on: the reader is dead.
    pub(super) fn skip(&mut self, n: u64) -> (bool, bool) {
        if !self.in_body {
            self.dead = true;
            return (false, true);
        }
        // Bytes after the hole would land at the wrong offset: keep no more.
        self.keep = self.body.len();
        self.truncated = true;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n < self.remaining {
            self.remaining -= n;
            return (false, false);
        }
        let lost = n > self.remaining;
        self.remaining = 0;
        self.in_body = false;
        if lost {
            self.dead = true;
        }
        (true, lost)
    }

    /// Room of the buffer that keeps body bytes.
    #[cfg(test)]
    pub(super) fn kept_capacity(&self) -> usize {
        self.body.capacity()
    }

    /// Forgets the message in progress and a lost stream: the next byte starts a message.
    pub(super) fn restart(&mut self) {
        self.header_len = 0;
        self.in_body = false;
        self.remaining = 0;
        self.keep = 0;
        self.truncated = false;
        self.body.clear();
        self.dead = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-byte big-endian length, then that many bytes; at most 3 kept.
    fn read_all(r: &mut FrameReader<2>, mut data: &[u8], ts: u64) -> Vec<(Vec<u8>, bool, u64)> {
        let mut out = Vec::new();
        while !data.is_empty() {
            if !r.in_body() {
                let Some([hi, lo]) = r.read_header(&mut data, ts, 2, true) else {
                    continue;
                };
                r.start_body(usize::from(u16::from_be_bytes([hi, lo])), 3);
            }
            if r.read_body(&mut data) {
                let (body, truncated) = r.take_body();
                out.push((body, truncated, r.start_ts));
            }
        }
        out
    }

    #[test]
    fn frames_across_pieces_and_keeps_a_prefix() {
        let mut r = FrameReader::<2>::default();
        assert!(read_all(&mut r, &[0], 1).is_empty());
        assert!(!r.at_boundary());
        assert!(read_all(&mut r, &[2, b'a'], 2).is_empty());
        let got = read_all(&mut r, &[b'b', 0, 5, 1, 2, 3, 4, 5, 0, 0], 3);
        assert_eq!(
            got,
            vec![
                (b"ab".to_vec(), false, 1),
                (vec![1, 2, 3], true, 3),
                (vec![], false, 3)
            ]
        );
        assert!(r.at_boundary());
    }

    #[test]
    fn a_body_split_over_packets_is_one_body() {
        let mut r = FrameReader::<2>::default();
        let mut data: &[u8] = &[0, 2, b'a', b'b', 0, 2, b'c', b'd'];
        r.read_header(&mut data, 1, 2, true).unwrap();
        r.start_body(2, 3);
        assert!(r.read_body(&mut data));
        assert!(r.read_header(&mut data, 2, 2, false).is_some());
        r.continue_body(2);
        assert!(r.read_body(&mut data));
        assert_eq!(r.take_body(), (b"abc".to_vec(), true));
        assert_eq!(r.start_ts, 1);
    }

    #[test]
    fn gaps_inside_a_body_are_skipped_and_outside_lose_the_stream() {
        let mut r = FrameReader::<2>::default();
        let mut data: &[u8] = &[0, 4, b'a'];
        r.read_header(&mut data, 1, 2, true).unwrap();
        r.start_body(4, 10);
        assert!(!r.read_body(&mut data));
        assert_eq!(r.skip(1), (false, false));
        // Bytes after the hole are not kept.
        assert!(r.read_body(&mut &b"cd"[..]));
        assert_eq!(r.take_body(), (b"a".to_vec(), true));
        assert_eq!(r.skip(1), (false, true));
        assert!(r.dead);
        r.restart();
        assert!(!r.dead && r.at_boundary());
        let mut data: &[u8] = &[0, 2];
        r.read_header(&mut data, 1, 2, true).unwrap();
        r.start_body(2, 10);
        assert_eq!(r.skip(3), (true, true));
    }
}
