//! What the SQL parsers (PostgreSQL, MySQL) share: the statement as a span shows it
//! (text cut to `max_statement`, operation keyword by dialect), the op with the SDK's
//! database attributes, and how a finished op records its row count and error.

use serde_json::Value;

use super::{truncate_statement, Op, StatusCode};

/// Most prepared statements (and PostgreSQL portals) remembered per connection; the
/// client names them without limit, so the oldest are forgotten.
pub(super) const MAX_STATEMENTS: usize = 256;
/// Most requests waiting for a response; beyond this the server side is evidently not
/// being seen, and the oldest request is given up.
pub(super) const MAX_PENDING: usize = 1024;
/// Largest integer JSON readers agree on (RFC 8259 §6: ±(2^53 − 1)); row counts are clamped.
const MAX_JSON_INT: u64 = (1 << 53) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dialect {
    Postgres,
    Mysql,
}

/// A statement as remembered: text already cut to `max_statement`, and its operation.
#[derive(Debug)]
pub(super) struct Statement {
    pub(super) text: String,
    pub(super) operation: Option<String>,
}

impl Statement {
    pub(super) fn new(sql: &str, max: usize, dialect: Dialect) -> Self {
        Self {
            text: truncate_statement(sql, max),
            operation: operation(sql, dialect),
        }
    }
}

/// The server's error for a statement: its message, and its code as the server gives it
/// (PostgreSQL's SQLSTATE text, MySQL's error number).
#[derive(Clone, Debug)]
pub(super) struct ServerError {
    pub(super) code: Option<Value>,
    pub(super) message: String,
}

/// An op with the SDK's database attributes, named by the statement's operation (or
/// `fallback` when there is none).
pub(super) fn new_op(
    stmt: Option<&Statement>,
    fallback: &str,
    database: Option<&str>,
    user: Option<&str>,
    start_ts: u64,
) -> Op {
    let operation = stmt.and_then(|s| s.operation.clone());
    let mut op = Op {
        name: operation.clone().unwrap_or_else(|| fallback.to_string()),
        start_ts,
        end_ts: start_ts,
        ..Op::default()
    };
    if let Some(s) = stmt {
        op.attr("db.statement", s.text.clone());
    }
    if let Some(o) = operation {
        op.attr("db.operation", o);
    }
    if let Some(d) = database {
        op.attr("db.name", d);
    }
    if let Some(u) = user {
        op.attr("db.user", u);
    }
    op
}

/// Ends an op at `end_ts` with its row count and, when the server refused it, its error.
pub(super) fn finish_op(
    mut op: Op,
    end_ts: u64,
    rowcount: Option<u64>,
    error: Option<ServerError>,
) -> Op {
    op.end_ts = end_ts;
    if let Some(n) = rowcount {
        op.attr("db.rowcount", n.min(MAX_JSON_INT));
    }
    if let Some(err) = error {
        op.status = StatusCode::Error;
        op.status_description = Some(err.message);
        if let Some(code) = err.code {
            op.attr("db.error.code", code);
        }
    }
    op
}

/// The statement's first keyword, uppercased: SELECT, INSERT, WITH, BEGIN …
/// Leading whitespace, `--` line comments and `/* */` block comments are skipped
/// (nested in PostgreSQL; `#` line comments and `/*!NNNNN …*/` version comments, whose
/// body is executed, in MySQL), as are opening parentheses and empty statements.
pub(super) fn operation(sql: &str, dialect: Dialect) -> Option<String> {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        match (b.get(i), b.get(i + 1)) {
            (Some(c), _) if c.is_ascii_whitespace() || *c == b'(' || *c == b';' => i += 1,
            (Some(b'-'), Some(b'-')) => i = skip_line(b, i),
            (Some(b'#'), _) if dialect == Dialect::Mysql => i = skip_line(b, i),
            (Some(b'/'), Some(b'*')) => {
                if dialect == Dialect::Mysql && b.get(i + 2) == Some(&b'!') {
                    // Executable comment: its content is SQL, after an optional version.
                    i += 3;
                    while b.get(i).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                    }
                } else {
                    i = skip_block(b, i, dialect == Dialect::Postgres);
                }
            }
            _ => break,
        }
    }
    let rest = b.get(i..)?;
    let len = rest
        .iter()
        .take_while(|c| c.is_ascii_alphabetic() || **c == b'_')
        .count();
    let word = rest.get(..len.min(32))?;
    (!word.is_empty()).then(|| String::from_utf8_lossy(word).to_ascii_uppercase())
}

fn skip_line(b: &[u8], i: usize) -> usize {
    match b.get(i..).and_then(|r| r.iter().position(|&c| c == b'\n')) {
        Some(p) => i + p + 1,
        None => b.len(),
    }
}

fn skip_block(b: &[u8], mut i: usize, nested: bool) -> usize {
    let mut depth = 0u32;
    while i < b.len() {
        match (b.get(i), b.get(i + 1)) {
            (Some(b'/'), Some(b'*')) if depth == 0 || nested => {
                depth = depth.saturating_add(1);
                i += 2;
            }
            (Some(b'*'), Some(b'/')) => {
                depth = depth.saturating_sub(1);
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn operation_is_first_keyword_after_comments() {
        let op = |s| operation(s, Dialect::Postgres);
        assert_eq!(op("  select 1").as_deref(), Some("SELECT"));
        assert_eq!(
            op("-- c\n/* a /* nested */ b */ WITH x AS (SELECT 1) SELECT * FROM x").as_deref(),
            Some("WITH")
        );
        assert_eq!(op("(SELECT 1) UNION (SELECT 2)").as_deref(), Some("SELECT"));
        assert_eq!(op("/* unterminated").as_deref(), None);
        assert_eq!(op("").as_deref(), None);
        assert_eq!(op("123").as_deref(), None);
        let my = |s| operation(s, Dialect::Mysql);
        assert_eq!(
            my("# c\ninsert into t values (1)").as_deref(),
            Some("INSERT")
        );
        assert_eq!(my("/*!40101 SET NAMES utf8 */").as_deref(), Some("SET"));
        // MySQL block comments do not nest: the first `*/` ends it.
        assert_eq!(my("/* a /* b */ select 1").as_deref(), Some("SELECT"));
        assert_eq!(op("# c\nselect 1").as_deref(), None);
    }

    #[test]
    fn finished_ops_carry_row_count_and_error() {
        let stmt = Statement::new("select 1", 5, Dialect::Postgres);
        let op = new_op(Some(&stmt), "QUERY", Some("db"), None, 7);
        assert_eq!(op.name, "SELECT");
        assert_eq!(op.attributes["db.statement"], json!("selec...[truncated]"));
        assert_eq!(op.attributes["db.name"], json!("db"));
        assert!(!op.attributes.contains_key("db.user"));
        let error = ServerError {
            code: Some(json!(1146)),
            message: "no table".into(),
        };
        let done = finish_op(op, 9, Some(u64::MAX), Some(error));
        assert_eq!(done.end_ts, 9);
        assert_eq!(done.attributes["db.rowcount"], json!(MAX_JSON_INT));
        assert_eq!(done.attributes["db.error.code"], json!(1146));
        assert_eq!(done.status, StatusCode::Error);
        assert_eq!(done.status_description.as_deref(), Some("no table"));
    }
}
