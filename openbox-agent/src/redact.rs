//! Redaction of secrets in spans, by name pattern: header values, URL query parameters
//! (and URL passwords), form-encoded and JSON body fields at any depth, and the
//! passwords of SQL `ALTER ROLE … PASSWORD` / `IDENTIFIED BY`. Applied where spans are
//! built, so every output (trace, run events, Core) carries only the redacted text.
//!
//! Everything but a secret value stays byte-exact: bodies are scanned, not parsed and
//! re-serialised, so a truncated or invalid body is still redacted as far as it reads.

use std::borrow::Cow;

/// What a secret value becomes.
pub const REDACTED: &str = "[REDACTED]";

/// Name patterns on by default (issue 10's list): a name containing one is a secret.
pub const DEFAULT_PATTERNS: [&str; 9] = [
    "auth",
    "token",
    "secret",
    "key",
    "password",
    "session",
    "cookie",
    "signature",
    "credential",
];

/// Words that contain a pattern but name no secret; an occurrence inside one of these
/// words does not count. The LLM APIs the agent mostly watches report `prompt_tokens`,
/// `max_tokens`; bibliographic and git APIs have `author`; HTTP/2 has `:authority`.
const HARMLESS_WORDS: [&str; 18] = [
    "author",
    "authors",
    "authored",
    "authority",
    "authorities",
    "tokens",
    "tokenize",
    "tokenized",
    "tokenizer",
    "keyboard",
    "keyword",
    "keywords",
    "monkey",
    "donkey",
    "turkey",
    "hockey",
    "jockey",
    "whiskey",
];

/// A last word that makes the name describe a secret rather than hold one
/// (`token_type`, `totalTokenCount`, `key_length`).
const DESCRIPTIVE_LAST_WORDS: [&str; 6] = ["count", "counts", "type", "limit", "length", "size"];

#[derive(Debug, Clone)]
pub struct Redactor {
    /// Lowercase substrings that make a name secret.
    patterns: Vec<String>,
    /// The patterns' first bytes, one bit per byte value: most names (every header of a
    /// plain request) are cleared in one pass over their bytes, a pattern compared only
    /// where one of these starts (one pass per pattern was ~4 % of the agent's CPU under
    /// load).
    firsts: [u64; 4],
    /// The patterns' first two bytes, one bit per pair: a name's byte that starts no
    /// pattern's pair is passed over without comparing the patterns (header names such
    /// as `content-type` hold several first bytes, and the comparisons were ~3 % of the
    /// agent's CPU under load). Not used when a pattern is one byte long.
    pairs: PairSet,
    /// Lowercase header names redacted whatever the patterns say.
    headers: Vec<String>,
}

impl Default for Redactor {
    fn default() -> Self {
        let patterns: Vec<String> = DEFAULT_PATTERNS.iter().map(|p| p.to_string()).collect();
        Self {
            firsts: first_bytes(&patterns),
            pairs: PairSet::of(&patterns),
            patterns,
            headers: Vec::new(),
        }
    }
}

impl Redactor {
    /// Redacts nothing (`--no-redact`).
    pub fn off() -> Self {
        Self {
            patterns: Vec::new(),
            firsts: [0; 4],
            pairs: PairSet::of(&[]),
            headers: Vec::new(),
        }
    }

    /// Also treat names containing `pattern` (case-insensitive) as secret.
    pub fn add_pattern(&mut self, pattern: &str) {
        let p = pattern.to_ascii_lowercase();
        if !p.is_empty() && !self.patterns.contains(&p) {
            self.patterns.push(p);
            self.firsts = first_bytes(&self.patterns);
            self.pairs = PairSet::of(&self.patterns);
        }
    }

    /// Stop treating names containing `pattern` as secret.
    pub fn remove_pattern(&mut self, pattern: &str) {
        let p = pattern.to_ascii_lowercase();
        self.patterns.retain(|q| *q != p);
        self.firsts = first_bytes(&self.patterns);
        self.pairs = PairSet::of(&self.patterns);
    }

    /// Always redact this header (exact name, case-insensitive).
    pub fn add_header(&mut self, name: &str) {
        self.headers.push(name.to_ascii_lowercase());
    }

    pub fn is_off(&self) -> bool {
        self.patterns.is_empty() && self.headers.is_empty()
    }

    /// Whether a header, query parameter or body field of this name holds a secret.
    pub fn is_secret(&self, name: &str) -> bool {
        // Most names (every header of a plain request) hold no pattern at all: answer
        // those without allocating; only a name with an occurrence is split into words.
        if !self.holds_pattern(name) {
            return false;
        }
        let lower = name.to_ascii_lowercase();
        let words = words(name);
        if let Some(&(s, e)) = words.last() {
            if words.len() > 1 && DESCRIPTIVE_LAST_WORDS.contains(&&lower[s..e]) {
                return false;
            }
        }
        self.patterns.iter().any(|p| {
            lower.match_indices(p.as_str()).any(|(at, _)| {
                let end = at + p.len();
                // Harmless only when the occurrence lies inside a harmless word.
                !words
                    .iter()
                    .any(|&(s, e)| s <= at && end <= e && HARMLESS_WORDS.contains(&&lower[s..e]))
            })
        })
    }

    /// Whether `name` contains one of the patterns, ASCII case ignored.
    fn holds_pattern(&self, name: &str) -> bool {
        let b = name.as_bytes();
        (0..b.len()).any(|i| {
            let c = b[i].to_ascii_lowercase();
            self.firsts[usize::from(c >> 6)] & (1 << (c & 63)) != 0
                && self
                    .pairs
                    .may_start(c, b.get(i + 1).map(u8::to_ascii_lowercase))
                && self.patterns.iter().any(|p| {
                    let p = p.as_bytes();
                    p[0] == c && b.len() - i >= p.len() && b[i..i + p.len()].eq_ignore_ascii_case(p)
                })
        })
    }

    pub fn is_secret_header(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.eq_ignore_ascii_case(name)) || self.is_secret(name)
    }

    /// The header's value as it may be shown: redacted when the name is secret; a URL
    /// value (`Location`, `Referer`) with its secret parameters redacted.
    pub fn header_value(&self, name: &str, value: &str) -> String {
        if self.is_secret_header(name) {
            return REDACTED.to_string();
        }
        if ["location", "referer", "content-location"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
        {
            return self.url(value);
        }
        value.to_string()
    }

    /// A URL or request target with the password of its userinfo and the values of its
    /// secret query parameters redacted.
    pub fn url(&self, url: &str) -> String {
        self.url_cow(url).into_owned()
    }

    /// [`Redactor::url`] of a string the caller gives up: returned as it is (no copy)
    /// when it has nothing to redact, as most request targets.
    pub fn url_owned(&self, url: String) -> String {
        keep_unless_changed(url, |u| self.url_cow(u))
    }

    fn url_cow<'a>(&self, url: &'a str) -> Cow<'a, str> {
        // Without a query or userinfo (most targets) nothing can be redacted: three URLs
        // per HTTP span come through here.
        if self.is_off() || !url.bytes().any(|b| b == b'?' || b == b'@') {
            return url.into();
        }
        let mut out = String::with_capacity(url.len());
        let (before_fragment, fragment) = match url.find('#') {
            Some(i) => url.split_at(i),
            None => (url, ""),
        };
        let (head, query) = match before_fragment.find('?') {
            Some(i) => (&before_fragment[..i], Some(&before_fragment[i + 1..])),
            None => (before_fragment, None),
        };
        out.push_str(&self.userinfo(head));
        if let Some(q) = query {
            out.push('?');
            out.push_str(&self.form(q));
        }
        out.push_str(fragment);
        out.into()
    }

    /// `scheme://user:password@host/…` → `scheme://user:[REDACTED]@host/…`.
    fn userinfo<'a>(&self, head: &'a str) -> Cow<'a, str> {
        let Some(scheme_end) = head.find("://") else {
            return head.into();
        };
        let auth_start = scheme_end + 3;
        let auth_end = head[auth_start..]
            .find('/')
            .map_or(head.len(), |i| auth_start + i);
        let authority = &head[auth_start..auth_end];
        match authority.rfind('@') {
            Some(at) if authority[..at].contains(':') => {
                let colon = authority.find(':').unwrap_or(at);
                format!(
                    "{}{}:{REDACTED}{}",
                    &head[..auth_start],
                    &authority[..colon],
                    &head[auth_start + at..]
                )
                .into()
            }
            _ => head.into(),
        }
    }

    /// `a=1&password=x` (a query string or a form-encoded body): the values of secret
    /// names redacted, every other byte kept.
    pub fn form(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for (i, pair) in s.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) if self.is_secret(&form_decode(name)) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                _ => out.push_str(pair),
            }
        }
        out
    }

    /// An HTTP body by its content type: form fields, JSON fields (also in JSON lines
    /// and server-sent events, and in an untyped body that starts like JSON).
    pub fn body(&self, body: &str, content_type: Option<&str>) -> String {
        self.body_cow(body, content_type).into_owned()
    }

    /// [`Redactor::body`] of a body the caller gives up: returned as it is (no copy) when
    /// nothing in it was redacted.
    pub fn body_owned(&self, body: String, content_type: Option<&str>) -> String {
        keep_unless_changed(body, |b| self.body_cow(b, content_type))
    }

    fn body_cow<'a>(&self, body: &'a str, content_type: Option<&str>) -> Cow<'a, str> {
        if self.is_off() {
            return body.into();
        }
        // The media type, compared without lowercasing a copy of it.
        let ct = content_type.map(|c| c.split(';').next().unwrap_or("").trim());
        let starts_like_json = matches!(body.trim_start().as_bytes().first(), Some(b'{' | b'['));
        match ct {
            Some(c) if c.eq_ignore_ascii_case("application/x-www-form-urlencoded") => {
                self.form(body).into()
            }
            Some(c)
                if c.as_bytes()
                    .windows(4)
                    .any(|w| w.eq_ignore_ascii_case(b"json"))
                    || c.eq_ignore_ascii_case("text/event-stream") =>
            {
                self.json_cow(body)
            }
            _ if starts_like_json => self.json_cow(body),
            _ => body.into(),
        }
    }

    /// JSON text with the value of every member whose name is secret replaced by
    /// `"[REDACTED]"` (a whole object or array value included), at any depth. A scanner,
    /// not a parser: a string followed by `:` is a member name wherever it appears, so a
    /// truncated or malformed document is redacted up to where it ends.
    pub fn json(&self, s: &str) -> String {
        self.json_cow(s).into_owned()
    }

    /// [`Redactor::json`] of a document the caller gives up: returned as it is (no copy)
    /// when no member was secret.
    pub fn json_owned(&self, s: String) -> String {
        keep_unless_changed(s, |s| self.json_cow(s))
    }

    fn json_cow<'a>(&self, s: &'a str) -> Cow<'a, str> {
        let b = s.as_bytes();
        // Allocated at the first secret: most documents have none.
        let mut out = String::new();
        let mut copied = 0;
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'"' {
                i += 1;
                continue;
            }
            let end = string_end(b, i);
            let mut j = skip_ws(b, end);
            if j >= b.len() || b[j] != b':' || end > b.len() || b[end - 1] != b'"' {
                i = end;
                continue;
            }
            let name = json_name(&s[i..end]);
            j = skip_ws(b, j + 1);
            if j >= b.len() || !self.is_secret(&name) {
                i = j;
                continue;
            }
            let value_end = match b[j] {
                b'"' => string_end(b, j),
                b'{' | b'[' => container_end(b, j),
                b'n' | b't' | b'f' if is_literal(&b[j..]) => {
                    // null/true/false hold no secret; keep the document's types.
                    i = j;
                    continue;
                }
                _ => scalar_end(b, j),
            };
            if out.capacity() == 0 {
                out.reserve(s.len());
            }
            out.push_str(&s[copied..j]);
            out.push('"');
            out.push_str(REDACTED);
            // A value cut off by truncation stays open, like the document.
            if value_end <= b.len() {
                out.push('"');
            }
            copied = value_end.min(b.len());
            i = copied;
        }
        if copied == 0 {
            // Nothing redacted: `out` is still empty.
            return s.into();
        }
        out.push_str(&s[copied..]);
        out.into()
    }

    /// A SQL statement with the password literal of `PASSWORD '…'` (PostgreSQL
    /// `CREATE/ALTER ROLE`, MySQL `SET PASSWORD`) and `IDENTIFIED BY|AS '…'` (MySQL)
    /// redacted.
    pub fn sql(&self, s: &str) -> String {
        if self.is_off() {
            return s.to_string();
        }
        let b = s.as_bytes();
        let mut out = String::with_capacity(s.len());
        let mut copied = 0;
        let (mut armed, mut identified, mut after_for) = (false, false, false);
        let mut last_was_password = false;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'\'' || c == b'"' {
                let end = quoted_end(b, i);
                if armed {
                    out.push_str(&s[copied..i]);
                    out.push(c as char);
                    out.push_str(REDACTED);
                    if end <= b.len() && end - i >= 2 && b[end - 1] == c {
                        out.push(c as char);
                    }
                    copied = end.min(b.len());
                    armed = false;
                }
                i = end;
            } else if c.is_ascii_alphabetic() || c == b'_' {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                let word = &s[start..i];
                let is = |w: &str| word.eq_ignore_ascii_case(w);
                // `SET PASSWORD FOR 'user'@'host' = '…'`: the user is not the secret.
                after_for |= is("for") && last_was_password;
                last_was_password = is("password");
                if is("identified") {
                    identified = true;
                }
                armed = last_was_password || identified && (is("by") || is("as"));
            } else {
                if c == b';' {
                    (armed, identified, after_for) = (false, false, false);
                } else if c == b'=' && after_for {
                    armed = true;
                    after_for = false;
                }
                i += 1;
            }
        }
        out.push_str(&s[copied..]);
        out
    }
}

/// The first byte of each (non-empty, lowercase) pattern, as a set of byte values.
/// The first two bytes of each pattern (see [`Redactor`]'s `pairs`).
#[derive(Clone)]
struct PairSet {
    bits: Box<[u64; 1024]>,
    /// A pattern of one byte: every first byte may start a match.
    any_second: bool,
}

impl PairSet {
    fn of(patterns: &[String]) -> Self {
        let mut bits = Box::new([0u64; 1024]);
        for p in patterns
            .iter()
            .map(|p| p.as_bytes())
            .filter(|p| p.len() >= 2)
        {
            let pair = usize::from(p[0]) << 8 | usize::from(p[1]);
            bits[pair >> 6] |= 1 << (pair & 63);
        }
        PairSet {
            bits,
            any_second: patterns.iter().any(|p| p.len() == 1),
        }
    }

    /// Whether a pattern may start at a byte `c` followed by `next` (both lowercase).
    fn may_start(&self, c: u8, next: Option<u8>) -> bool {
        if self.any_second {
            return true;
        }
        let Some(n) = next else {
            return false;
        };
        let pair = usize::from(c) << 8 | usize::from(n);
        self.bits[pair >> 6] & (1 << (pair & 63)) != 0
    }
}

impl std::fmt::Debug for PairSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairSet")
    }
}

/// `owned` itself when `redact` borrowed it back unchanged, else what `redact` made.
fn keep_unless_changed(owned: String, redact: impl FnOnce(&str) -> Cow<'_, str>) -> String {
    let changed = match redact(&owned) {
        Cow::Borrowed(_) => None,
        Cow::Owned(o) => Some(o),
    };
    changed.unwrap_or(owned)
}

fn first_bytes(patterns: &[String]) -> [u64; 4] {
    let mut set = [0u64; 4];
    for c in patterns.iter().filter_map(|p| p.as_bytes().first()) {
        set[usize::from(c >> 6)] |= 1 << (c & 63);
    }
    set
}

/// Byte ranges of a name's words: split at anything not alphanumeric and at camelCase
/// humps (`xGoogApiKey` → x, Goog, Api, Key).
fn words(name: &str) -> Vec<(usize, usize)> {
    let b = name.as_bytes();
    let mut out = Vec::new();
    let mut start = None;
    for i in 0..=b.len() {
        let c = b.get(i).copied();
        let alnum = c.is_some_and(|c| c.is_ascii_alphanumeric());
        let hump = alnum
            && i > 0
            && c.is_some_and(|c| c.is_ascii_uppercase())
            && (b[i - 1].is_ascii_lowercase() || b[i - 1].is_ascii_digit());
        if let Some(s) = start {
            if !alnum || hump {
                out.push((s, i));
                start = None;
            }
        }
        if alnum && start.is_none() {
            start = Some(i);
        }
    }
    out
}

/// A form or query name as sent: `+` is a space, `%XX` a byte.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// The member name of a JSON string token (with its quotes), escapes decoded.
fn json_name(token: &str) -> Cow<'_, str> {
    let inner = &token[1..token.len() - 1];
    if inner.contains('\\') {
        if let Ok(s) = serde_json::from_str::<String>(token) {
            return s.into();
        }
    }
    inner.into()
}

/// One past the closing quote of the JSON string starting at `start`, or past the end
/// when it is not closed.
fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len() + 1
}

/// One past the bracket closing the object or array starting at `start` (strings
/// skipped), or past the end when it is not closed.
fn container_end(b: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i);
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    b.len() + 1
}

fn scalar_end(b: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < b.len() && !matches!(b[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n') {
        i += 1;
    }
    i
}

fn is_literal(b: &[u8]) -> bool {
    let end = scalar_end(b, 0);
    matches!(&b[..end], b"null" | b"true" | b"false")
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// One past the quote closing the SQL literal starting at `start` (a doubled quote or a
/// backslash escapes), or past the end when it is not closed.
fn quoted_end(b: &[u8], start: usize) -> usize {
    let q = b[start];
    let mut i = start + 1;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
        } else if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_by_pattern_outside_harmless_words() {
        let r = Redactor::default();
        for secret in [
            "Authorization",
            "Proxy-Authorization",
            "X-Goog-Api-Key",
            "Private-Token",
            "access_token",
            "api_key",
            "apikey",
            "apiKey",
            "password",
            "client_secret",
            "JSESSIONID",
            "session_id",
            "Cookie",
            "Set-Cookie",
            "X-Amz-Signature",
            "X-Amz-Credential",
            "x-amz-security-token",
            "credentials",
            "key",
            "oauth_token",
            "X-Hub-Signature-256",
        ] {
            assert!(r.is_secret(secret), "{secret} should be secret");
        }
        for plain in [
            "max_tokens",
            "prompt_tokens",
            "completionTokens",
            "totalTokenCount",
            "token_type",
            "author",
            ":authority",
            "keyboard_layout",
            "monkey",
            "keywords",
            "content-type",
            "model",
        ] {
            assert!(!r.is_secret(plain), "{plain} should not be secret");
        }
    }

    /// The one-pass prefilter finds exactly the names a per-pattern substring search
    /// finds, whatever the case, position, non-ASCII bytes or patterns added and removed.
    #[test]
    fn pattern_prefilter_matches_a_substring_search() {
        let names = [
            "",
            "k",
            "ke",
            "KEY",
            "x-api-key",
            "XApiKEY",
            "tokenizer",
            "sessionid",
            "élan-key",
            "clé",
            "pinned",
            "SPIN",
            "café-pin",
            "Authorization",
            "content-length",
            "zz-p",
        ];
        let naive = |r: &Redactor, n: &str| {
            let n = n.to_ascii_lowercase();
            r.patterns.iter().any(|p| n.contains(p.as_str()))
        };
        let mut r = Redactor::default();
        for step in 0..3 {
            match step {
                1 => r.add_pattern("PIN"),
                2 => {
                    r.remove_pattern("key");
                    r.add_pattern("é");
                }
                _ => {}
            }
            for n in names {
                assert_eq!(r.holds_pattern(n), naive(&r, n), "{n:?} at step {step}");
            }
        }
        assert!(!Redactor::off().holds_pattern("password"));
    }

    #[test]
    fn patterns_can_be_extended_and_relaxed() {
        let mut r = Redactor::default();
        assert!(!r.is_secret("X-Tenant-Pin"));
        r.add_pattern("PIN");
        assert!(r.is_secret("X-Tenant-Pin"));
        assert!(r.is_secret("cache_key"));
        r.remove_pattern("key");
        assert!(!r.is_secret("cache_key"));
        assert!(!r.is_secret_header("X-Internal"));
        r.add_header("X-Internal");
        assert!(r.is_secret_header("x-internal"));
        assert!(!r.is_secret("x-internal"));
        let off = Redactor::off();
        assert!(!off.is_secret("password"));
        assert_eq!(off.url("/a?token=1"), "/a?token=1");
        assert_eq!(off.body(r#"{"token":1}"#, None), r#"{"token":1}"#);
    }

    /// The redaction table: input → output, every other byte kept.
    #[test]
    fn redaction_table() {
        let r = Redactor::default();
        let url = |s: &str| r.url(s);
        let form = |s: &str| r.body(s, Some("application/x-www-form-urlencoded; charset=utf-8"));
        let json = |s: &str| r.body(s, Some("application/json"));
        let cases: Vec<(String, &str)> = vec![
            (
                url("/v1/x?access_token=s3cr3t&page=2"),
                "/v1/x?access_token=[REDACTED]&page=2",
            ),
            (
                url("https://h/v1?api_key=s3cr3t"),
                "https://h/v1?api_key=[REDACTED]",
            ),
            (
                url("/m?key=AIza&q=a+b#frag"),
                "/m?key=[REDACTED]&q=a+b#frag",
            ),
            (
                url("/e?%61pi_key=x&flag&=v&a=="),
                "/e?%61pi_key=[REDACTED]&flag&=v&a==",
            ),
            (
                url("https://u:pw@h:1/p?x=1"),
                "https://u:[REDACTED]@h:1/p?x=1",
            ),
            (url("https://u@h/p"), "https://u@h/p"),
            (url("/plain/path"), "/plain/path"),
            (
                form("user=ann&password=hunter2&remember=1"),
                "user=ann&password=[REDACTED]&remember=1",
            ),
            (
                form("pass+word=x&client_secret=y"),
                "pass+word=x&client_secret=[REDACTED]",
            ),
            (
                json(r#"{"user":"ann", "token" : "t0k","n":1}"#),
                r#"{"user":"ann", "token" : "[REDACTED]","n":1}"#,
            ),
            (
                json("{\n  \"a\": {\"b\": [{\"api_key\": 12345}, {\"ok\": \"x\"}]}\n}"),
                "{\n  \"a\": {\"b\": [{\"api_key\": \"[REDACTED]\"}, {\"ok\": \"x\"}]}\n}",
            ),
            (
                json(r#"{"credentials": {"user": "u", "pw": "p"}, "k": [1]}"#),
                r#"{"credentials": "[REDACTED]", "k": [1]}"#,
            ),
            (
                json(r#"{"note": "a \"password\": b", "secret": "x\"y", "session": null}"#),
                r#"{"note": "a \"password\": b", "secret": "[REDACTED]", "session": null}"#,
            ),
            (
                json(r#"{"pass\u0077ord": "x"}"#),
                r#"{"pass\u0077ord": "[REDACTED]"}"#,
            ),
            (
                json(r#"{"usage": {"prompt_tokens": 9, "max_tokens": 5}}"#),
                r#"{"usage": {"prompt_tokens": 9, "max_tokens": 5}}"#,
            ),
            // Truncated and invalid documents: redacted as far as they read.
            (
                json(r#"{"a": 1, "token": "abc"#),
                r#"{"a": 1, "token": "[REDACTED]"#,
            ),
            (json(r#"{"auth": {"x": "abc", "#), r#"{"auth": "[REDACTED]"#),
            (
                json(r#"{"a": [1,, }, "token": "t", "b"#),
                r#"{"a": [1,, }, "token": "[REDACTED]", "b"#,
            ),
            (json(r#"{"password""#), r#"{"password""#),
            (json(r#"{"password":"#), r#"{"password":"#),
            (
                r.body(r#"data: {"token": "t"}"#, Some("text/event-stream")),
                r#"data: {"token": "[REDACTED]"}"#,
            ),
            (
                r.body(r#"[{"token": "t"}]"#, None),
                r#"[{"token": "[REDACTED]"}]"#,
            ),
            (r.body("password=x", Some("text/plain")), "password=x"),
            (
                r.sql("ALTER ROLE app WITH LOGIN PASSWORD 'hunter2' VALID UNTIL '2030-01-01'"),
                "ALTER ROLE app WITH LOGIN PASSWORD '[REDACTED]' VALID UNTIL '2030-01-01'",
            ),
            (
                r.sql("CREATE USER u ENCRYPTED PASSWORD 'it''s'; SELECT 'a'"),
                "CREATE USER u ENCRYPTED PASSWORD '[REDACTED]'; SELECT 'a'",
            ),
            (
                r.sql("ALTER ROLE app PASSWORD NULL VALID UNTIL 'infinity'"),
                "ALTER ROLE app PASSWORD NULL VALID UNTIL 'infinity'",
            ),
            (
                r.sql("CREATE USER 'u'@'%' IDENTIFIED WITH 'caching_sha2_password' BY \"pw\""),
                "CREATE USER 'u'@'%' IDENTIFIED WITH 'caching_sha2_password' BY \"[REDACTED]\"",
            ),
            (
                r.sql("SET PASSWORD FOR 'u'@'h' = 'pw'"),
                "SET PASSWORD FOR 'u'@'h' = '[REDACTED]'",
            ),
            (
                r.sql("SET PASSWORD = PASSWORD('pw')"),
                "SET PASSWORD = PASSWORD('[REDACTED]')",
            ),
            (
                r.sql("ALTER USER u PASSWORD 'cut"),
                "ALTER USER u PASSWORD '[REDACTED]",
            ),
            (
                r.sql("SELECT password FROM t WHERE id = 'x'"),
                "SELECT password FROM t WHERE id = 'x'",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn owned_and_borrowed_redaction_agree() {
        for r in [Redactor::default(), Redactor::off()] {
            for (body, ct) in [
                (r#"{"password":"x","a":1}"#, Some("application/json")),
                (
                    r#"{"a":1,"b":[{"c":"d"}]}"#,
                    Some("Application/JSON; charset=utf-8"),
                ),
                (r#"{"token": "t"#, None),
                ("data: {\"api_key\":\"k\"}\n\n", Some("text/event-stream")),
                ("data: {\"api_key\":\"k\"}\n\n", Some("TEXT/EVENT-STREAM")),
                (
                    "user=a&password=b",
                    Some("application/x-www-form-urlencoded"),
                ),
                (
                    "user=a&password=b",
                    Some("Application/X-WWW-Form-Urlencoded ;x"),
                ),
                ("user=a&password=b", Some("text/plain")),
                (r#"[{"secret":1}]"#, Some("text/plain")),
                ("", None),
            ] {
                assert_eq!(r.body_owned(body.to_string(), ct), r.body(body, ct));
                assert_eq!(r.json_owned(body.to_string()), r.json(body));
            }
            for url in [
                "/v1/load",
                "/cb?code=1&access_token=t",
                "https://u:p@host/x",
                "https://u@host/x",
                "",
            ] {
                assert_eq!(r.url_owned(url.to_string()), r.url(url));
            }
        }
        let r = Redactor::default();
        assert_eq!(
            r.body(r#"{"password":"x","a":1}"#, Some("application/json")),
            r#"{"password":"[REDACTED]","a":1}"#
        );
        assert_eq!(
            r.body(
                "user=a&password=b",
                Some("Application/X-WWW-Form-Urlencoded")
            ),
            "user=a&password=[REDACTED]"
        );
    }

    #[test]
    fn header_values() {
        let r = Redactor::default();
        assert_eq!(r.header_value("X-Goog-Api-Key", "AIza"), REDACTED);
        assert_eq!(
            r.header_value("Location", "/cb?code=1&state=2&access_token=t"),
            "/cb?code=1&state=2&access_token=[REDACTED]"
        );
        assert_eq!(r.header_value("Content-Type", "text/plain"), "text/plain");
    }

    #[test]
    fn scanning_never_panics_on_odd_input() {
        let r = Redactor::default();
        for s in [
            "\"",
            "\"token\":",
            "\"token\":\"\\",
            "{\"key\":[\"]",
            "%",
            "a=%e9&key=%",
            "'",
            "password '",
            "é=é&tökén=1",
        ] {
            let _ = r.json(s);
            let _ = r.form(s);
            let _ = r.url(s);
            let _ = r.sql(s);
        }
    }
}
