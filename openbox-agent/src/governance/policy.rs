//! The embedded default's local policy: ordered rules over the governance events (read
//! typed, as the governor holds them), answering in Core's evaluate-response format so
//! verdicts take the same code path as Core's.
//!
//! Format (TOML; see the module docs of `governance` for a full example):
//!
//! ```toml
//! default_verdict = "allow"          # when no rule matches (default allow)
//!
//! [[rules]]
//! name = "no-drop-table"             # reported as policy_id (default "rules[<index>]")
//! event_type = "ActivityCompleted"   # conditions: a pattern or a list of patterns
//! sql = "re:(?i)\\bdrop\\s+table\\b"
//! verdict = "block"                  # allow | constrain | require_approval | block | halt
//! reason = "DROP TABLE is not allowed"
//! ```
//!
//! **Matching.** Rules are tried in file order; the **first** rule whose conditions all
//! hold decides. A condition holds when any of its patterns matches. A pattern is a glob
//! over the whole value (`*` any run of characters, `?` one character, everything else
//! literal) or, prefixed with `re:`, a regular expression (Rust `regex` syntax) searched
//! anywhere in the value. `http_host` and `http_method` globs ignore case.
//!
//! Conditions and what they look at:
//! - `event_type`, `activity_type`, `workflow_type`, `task_queue`, `signal_name`: the
//!   event's top-level fields.
//! - `input`: the compact JSON text of `activity_input` (or of `signal_args` for signals);
//!   `output`: of `activity_output` (or `workflow_output`).
//! - `http_host`, `http_method`, `http_url`: one HTTP span of `spans` must match all the
//!   given ones (its `http.url`/`http.method` attributes; the host comes from the URL,
//!   else `http.host`/`net.peer.name`).
//! - `sql`: a span's `db.statement`; `file_path`: a span's `file.path`. Span conditions
//!   only match events that carry spans (ActivityCompleted).
//!
//! Optional per rule: `[rules.guardrails]` (`input_type` — default `activity_input` for
//! ActivityStarted, `activity_output` otherwise —, `redacted_input`, `validation_passed`,
//! `reasons` as strings or `{type, field, reason}` tables) and `[rules.approval]` for
//! `require_approval` rules: `decision` (`approve` | `reject` | `expire` | `pending`,
//! default `approve`), `after_polls` (polls answered "pending" first, default 0), `reason`.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Mutex,
};

use regex::Regex;
use serde_json::{json, Map, Value};

use super::{events::Event, verdict::Verdict};
use crate::span::Span;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// One compiled pattern.
#[derive(Clone, Debug)]
struct Pattern(Regex);

impl Pattern {
    fn compile(text: &str, ignore_case: bool) -> Result<Pattern, String> {
        if let Some(re) = text.strip_prefix("re:") {
            return Regex::new(re)
                .map(Pattern)
                .map_err(|e| format!("invalid regular expression {re:?}: {e}"));
        }
        let mut re = String::from(if ignore_case { "(?is)^" } else { "(?s)^" });
        for c in text.chars() {
            match c {
                '*' => re.push_str(".*"),
                '?' => re.push('.'),
                c => re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
            }
        }
        re.push('$');
        Regex::new(&re)
            .map(Pattern)
            .map_err(|e| format!("invalid glob {text:?}: {e}"))
    }
}

/// Any of several patterns.
#[derive(Clone, Debug, Default)]
struct AnyOf(Vec<Pattern>);

impl AnyOf {
    fn matches(&self, value: Option<&str>) -> bool {
        value.is_some_and(|v| self.0.iter().any(|p| p.0.is_match(v)))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ApprovalDecision {
    Approve,
    Reject,
    Expire,
    Pending,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalBehaviour {
    pub decision: ApprovalDecision,
    pub after_polls: u64,
    pub reason: Option<String>,
}

impl Default for ApprovalBehaviour {
    fn default() -> Self {
        ApprovalBehaviour {
            decision: ApprovalDecision::Approve,
            after_polls: 0,
            reason: None,
        }
    }
}

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    fields: Vec<(&'static str, AnyOf)>,
    http: Vec<(&'static str, AnyOf)>,
    sql: Option<AnyOf>,
    file_path: Option<AnyOf>,
    verdict: Verdict,
    reason: Option<String>,
    guardrails: Option<Map<String, Value>>,
    approval: ApprovalBehaviour,
}

/// A parsed policy file.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    default_verdict: Verdict,
}

const RULE_KEYS: &[&str] = &[
    "name",
    "event_type",
    "activity_type",
    "workflow_type",
    "task_queue",
    "signal_name",
    "input",
    "output",
    "http_host",
    "http_method",
    "http_url",
    "sql",
    "file_path",
    "verdict",
    "reason",
    "guardrails",
    "approval",
];

const VERDICTS: &str = "allow, constrain, require_approval, block, halt";

impl Default for Policy {
    /// No rules: everything is allowed.
    fn default() -> Self {
        Policy {
            rules: Vec::new(),
            default_verdict: Verdict::Allow,
        }
    }
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError(format!("cannot read policy file {}: {e}", path.display())))?;
        Policy::parse(&text, path)
    }

    /// Parses policy text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let file = path.display();
        let doc: toml::Table = toml::from_str(text)
            .map_err(|e| PolicyError(format!("policy file {file} is not valid TOML: {e}")))?;
        let mut policy = Policy::default();
        for (key, value) in &doc {
            match key.as_str() {
                "default_verdict" => {
                    policy.default_verdict = value
                        .as_str()
                        .and_then(Verdict::parse_known)
                        .ok_or_else(|| {
                            PolicyError(format!(
                                "{file}: default_verdict must be one of {VERDICTS}, not {value}"
                            ))
                        })?;
                }
                "rules" => {}
                other => {
                    return Err(PolicyError(format!(
                        "{file}: unknown top-level key {other:?} (allowed: default_verdict, rules)"
                    )))
                }
            }
        }
        let rules = match doc.get("rules") {
            None => return Ok(policy),
            Some(toml::Value::Array(a)) => a,
            Some(_) => {
                return Err(PolicyError(format!(
                    "{file}: rules must be an array of tables ([[rules]])"
                )))
            }
        };
        for (i, raw) in rules.iter().enumerate() {
            let name = raw
                .get("name")
                .and_then(toml::Value::as_str)
                .map(str::to_owned);
            let at = match &name {
                Some(n) => format!("{file}: rules[{i}] ({n:?})"),
                None => format!("{file}: rules[{i}]"),
            };
            let table = raw
                .as_table()
                .ok_or_else(|| PolicyError(format!("{at}: must be a table")))?;
            policy.rules.push(parse_rule(
                table,
                name.unwrap_or_else(|| format!("rules[{i}]")),
                &at,
            )?);
        }
        Ok(policy)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The index of the first rule matching `event`.
    fn first_match(&self, event: &Event) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(event))
    }

    /// The Core-format evaluate response for `event`.
    pub fn evaluate(&self, event: &Event) -> Value {
        let Some(i) = self.first_match(event) else {
            return json!({"verdict": self.default_verdict.as_str()});
        };
        let rule = &self.rules[i];
        let mut out = Map::new();
        out.insert("verdict".into(), json!(rule.verdict.as_str()));
        if let Some(r) = &rule.reason {
            out.insert("reason".into(), json!(r));
        }
        out.insert("policy_id".into(), json!(rule.name));
        if let Some(g) = &rule.guardrails {
            let mut g = g.clone();
            if !g.contains_key("input_type") {
                let stage = if matches!(event, Event::ActivityStarted(_)) {
                    "activity_input"
                } else {
                    "activity_output"
                };
                g.insert("input_type".into(), json!(stage));
            }
            out.insert("guardrails_result".into(), Value::Object(g));
        }
        Value::Object(out)
    }
}

fn patterns(
    value: &toml::Value,
    ignore_case: bool,
    at: &str,
    key: &str,
) -> Result<AnyOf, PolicyError> {
    let texts: Vec<&str> = match value {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(a) => a
            .iter()
            .map(toml::Value::as_str)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                PolicyError(format!(
                    "{at}: {key} must be a pattern string or a list of them"
                ))
            })?,
        _ => {
            return Err(PolicyError(format!(
                "{at}: {key} must be a pattern string or a list of them"
            )))
        }
    };
    if texts.is_empty() {
        return Err(PolicyError(format!(
            "{at}: {key} is an empty list (it could never match)"
        )));
    }
    texts
        .into_iter()
        .map(|t| {
            Pattern::compile(t, ignore_case).map_err(|e| PolicyError(format!("{at}: {key}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(AnyOf)
}

fn parse_rule(table: &toml::Table, name: String, at: &str) -> Result<Rule, PolicyError> {
    if let Some(bad) = table.keys().find(|k| !RULE_KEYS.contains(&k.as_str())) {
        return Err(PolicyError(format!(
            "{at}: unknown field {bad:?} (allowed: {})",
            RULE_KEYS.join(", ")
        )));
    }
    let verdict = match table.get("verdict") {
        None => {
            return Err(PolicyError(format!(
                "{at}: verdict is missing (one of {VERDICTS})"
            )))
        }
        Some(v) => v.as_str().and_then(Verdict::parse_known).ok_or_else(|| {
            PolicyError(format!("{at}: verdict must be one of {VERDICTS}, not {v}"))
        })?,
    };
    let reason = match table.get("reason") {
        None => None,
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(PolicyError(format!(
                "{at}: reason must be a string, not {v}"
            )))
        }
    };
    let mut rule = Rule {
        name,
        fields: Vec::new(),
        http: Vec::new(),
        sql: None,
        file_path: None,
        verdict,
        reason,
        guardrails: None,
        approval: ApprovalBehaviour::default(),
    };
    for key in [
        "event_type",
        "activity_type",
        "workflow_type",
        "task_queue",
        "signal_name",
        "input",
        "output",
    ] {
        if let Some(v) = table.get(key) {
            rule.fields.push((key, patterns(v, false, at, key)?));
        }
    }
    for key in ["http_host", "http_method", "http_url"] {
        if let Some(v) = table.get(key) {
            rule.http
                .push((key, patterns(v, key != "http_url", at, key)?));
        }
    }
    if let Some(v) = table.get("sql") {
        rule.sql = Some(patterns(v, false, at, "sql")?);
    }
    if let Some(v) = table.get("file_path") {
        rule.file_path = Some(patterns(v, false, at, "file_path")?);
    }
    if let Some(g) = table.get("guardrails") {
        rule.guardrails = Some(parse_guardrails(g, at)?);
    }
    if let Some(a) = table.get("approval") {
        if rule.verdict != Verdict::RequireApproval {
            return Err(PolicyError(format!(
                "{at}: approval is only meaningful with verdict = \"require_approval\""
            )));
        }
        rule.approval = parse_approval(a, at)?;
    }
    Ok(rule)
}

fn parse_guardrails(v: &toml::Value, at: &str) -> Result<Map<String, Value>, PolicyError> {
    let t = v
        .as_table()
        .ok_or_else(|| PolicyError(format!("{at}: guardrails must be a table")))?;
    let mut out = Map::new();
    for (key, value) in t {
        let bad = |want: &str| PolicyError(format!("{at}: guardrails.{key} must be {want}"));
        match key.as_str() {
            "input_type" => match value.as_str() {
                Some(s @ ("activity_input" | "activity_output")) => {
                    out.insert(key.clone(), json!(s));
                }
                _ => return Err(bad("\"activity_input\" or \"activity_output\"")),
            },
            "redacted_input" => {
                out.insert(key.clone(), toml_to_json(value));
            }
            "validation_passed" => {
                out.insert(key.clone(), json!(value.as_bool().ok_or_else(|| bad("true or false"))?));
            }
            "reasons" => {
                let list = value.as_array().ok_or_else(|| bad("a list of strings or {type, field, reason} tables"))?;
                let mut reasons = Vec::new();
                for r in list {
                    reasons.push(match r {
                        toml::Value::String(s) => json!({"type": "policy", "field": "", "reason": s}),
                        toml::Value::Table(_) => toml_to_json(r),
                        _ => return Err(bad("a list of strings or {type, field, reason} tables")),
                    });
                }
                out.insert(key.clone(), Value::Array(reasons));
            }
            other => {
                return Err(PolicyError(format!(
                    "{at}: unknown field guardrails.{other} (allowed: input_type, redacted_input, validation_passed, reasons)"
                )))
            }
        }
    }
    Ok(out)
}

fn parse_approval(v: &toml::Value, at: &str) -> Result<ApprovalBehaviour, PolicyError> {
    let t = v
        .as_table()
        .ok_or_else(|| PolicyError(format!("{at}: approval must be a table")))?;
    let mut a = ApprovalBehaviour::default();
    for (key, value) in t {
        match key.as_str() {
            "decision" => {
                a.decision = match value.as_str() {
                    Some("approve") => ApprovalDecision::Approve,
                    Some("reject") => ApprovalDecision::Reject,
                    Some("expire") => ApprovalDecision::Expire,
                    Some("pending") => ApprovalDecision::Pending,
                    _ => {
                        return Err(PolicyError(format!(
                            "{at}: approval.decision must be approve, reject, expire or pending, not {value}"
                        )))
                    }
                }
            }
            "after_polls" => {
                a.after_polls = value
                    .as_integer()
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| PolicyError(format!("{at}: approval.after_polls must be a whole number ≥ 0")))?;
            }
            "reason" => {
                a.reason = Some(
                    value.as_str().ok_or_else(|| PolicyError(format!("{at}: approval.reason must be a string")))?.to_owned(),
                )
            }
            other => {
                return Err(PolicyError(format!(
                    "{at}: unknown field approval.{other} (allowed: decision, after_polls, reason)"
                )))
            }
        }
    }
    Ok(a)
}

fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => json!(s),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => json!(b),
        toml::Value::Datetime(d) => json!(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// The host of a URL: between `//` and the next `/`, `?` or `#`, without user info and
/// port (IPv6 brackets kept off).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split(']').next();
    }
    Some(hostport.split(':').next().unwrap_or(hostport))
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.trim_start_matches('[').split(']').next().unwrap_or(h);
    }
    h.split(':').next().unwrap_or(h)
}

/// A span's OTel attribute, when it is text.
fn span_text<'a>(span: &'a Span, attr: &str) -> Option<&'a str> {
    span.attributes.get(attr).and_then(Value::as_str)
}

fn compact(v: &(impl serde::Serialize + ?Sized)) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl Rule {
    fn matches(&self, event: &Event) -> bool {
        let activity = event.activity();
        for (key, pats) in &self.fields {
            let text: Option<String> = match *key {
                "input" => event.input().map(compact),
                "output" => event.output().map(compact),
                "event_type" => Some(event.event_type().to_owned()),
                "workflow_type" => Some(event.head().workflow_type.clone()),
                "activity_type" => activity.map(|a| a.activity_type.clone()),
                "task_queue" => event.task_queue().map(str::to_owned),
                "signal_name" => event.signal_name().map(str::to_owned),
                _ => None,
            };
            if !pats.matches(text.as_deref()) {
                return false;
            }
        }
        if self.http.is_empty() && self.sql.is_none() && self.file_path.is_none() {
            return true;
        }
        let spans = event.spans();
        if !self.http.is_empty() {
            let http_match = spans.iter().any(|s| {
                let url = span_text(s, "http.url");
                let method = span_text(s, "http.method");
                if url.is_none() && method.is_none() {
                    return false;
                }
                let host = url.and_then(url_host).or_else(|| {
                    span_text(s, "http.host")
                        .or_else(|| span_text(s, "net.peer.name"))
                        .map(strip_port)
                });
                self.http.iter().all(|(key, pats)| match *key {
                    "http_host" => pats.matches(host),
                    "http_method" => pats.matches(method),
                    _ => pats.matches(url),
                })
            });
            if !http_match {
                return false;
            }
        }
        if let Some(sql) = &self.sql {
            if !spans
                .iter()
                .any(|s| sql.matches(span_text(s, "db.statement")))
            {
                return false;
            }
        }
        if let Some(fp) = &self.file_path {
            if !spans.iter().any(|s| fp.matches(span_text(s, "file.path"))) {
                return false;
            }
        }
        true
    }
}

/// The embedded stand-in for Core: answers evaluate calls from a [`Policy`] and approval
/// polls from the matched rule's approval behaviour. An activity once approved is answered
/// ALLOW when its ActivityStarted is re-sent (§5: Core should allow an approved activity).
pub struct LocalCore {
    policy: Policy,
    source: Option<PathBuf>,
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    /// (workflow_id, run_id, activity_id) → (approval behaviour, reason, polls so far).
    waiting: HashMap<(String, String, String), (ApprovalBehaviour, u64)>,
    approved: HashSet<(String, String, String)>,
}

/// Bound on remembered approvals, so a long-running agent's memory stays flat.
const MAX_REMEMBERED: usize = 65_536;

fn key_of(event: &Event) -> (String, String, String) {
    let head = event.head();
    let activity_id = event.activity().map_or("", |a| a.activity_id.as_str());
    (
        head.workflow_id.clone(),
        head.run_id.clone(),
        activity_id.to_owned(),
    )
}

impl LocalCore {
    pub fn new(policy: Policy, source: Option<PathBuf>) -> LocalCore {
        LocalCore {
            policy,
            source,
            state: Mutex::new(LocalState::default()),
        }
    }

    /// The policy file this came from (`None`: built-in allow-all).
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    pub fn evaluate(&self, event: &Event) -> Value {
        let mut answer = self.policy.evaluate(event);
        if answer["verdict"] != "require_approval" {
            return answer;
        }
        let key = key_of(event);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.approved.contains(&key) {
            answer["verdict"] = json!("allow");
            answer["reason"] = json!("approved");
            return answer;
        }
        let behaviour = self
            .policy
            .first_match(event)
            .map(|i| self.policy.rules[i].approval.clone())
            .unwrap_or_default();
        if st.waiting.len() >= MAX_REMEMBERED {
            st.waiting.clear();
        }
        st.waiting.insert(key, (behaviour, 0));
        answer
    }

    pub fn approval(&self, workflow_id: &str, run_id: &str, activity_id: &str) -> Value {
        let key = (
            workflow_id.to_owned(),
            run_id.to_owned(),
            activity_id.to_owned(),
        );
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some((behaviour, polls)) = st.waiting.get_mut(&key) else {
            // Nothing is waiting (e.g. the agent restarted): nothing to hold the activity for.
            return json!({"verdict": "allow"});
        };
        *polls += 1;
        if *polls <= behaviour.after_polls {
            return json!({"verdict": "require_approval"});
        }
        let behaviour = behaviour.clone();
        let answer = match behaviour.decision {
            ApprovalDecision::Pending => return json!({"verdict": "require_approval"}),
            ApprovalDecision::Approve => {
                if st.approved.len() >= MAX_REMEMBERED {
                    st.approved.clear();
                }
                st.approved.insert(key.clone());
                json!({"verdict": "allow"})
            }
            ApprovalDecision::Reject => json!({"verdict": "block",
                "reason": behaviour.reason.as_deref().unwrap_or("Rejected by local policy")}),
            ApprovalDecision::Expire => json!({"verdict": "allow", "expired": true}),
        };
        st.waiting.remove(&key);
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::governance::events::{
        self, ActivityCompletion, ActivityInfo, ActivityStatus, WorkflowInfo,
    };

    /// The event the JSON describes (by its `event_type`, else ActivityStarted), with the
    /// fields it names; spans are given as `{"name", "attributes"}`.
    fn event_of(v: &Value) -> Event {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let list = |k: &str| {
            v.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let a = ActivityInfo {
            workflow_id: s("workflow_id"),
            run_id: s("run_id"),
            workflow_type: s("workflow_type"),
            activity_id: s("activity_id"),
            activity_type: s("activity_type"),
            task_queue: s("task_queue"),
            attempt: 1,
            multi_agent_session_id: None,
        };
        let wf = WorkflowInfo {
            workflow_id: s("workflow_id"),
            run_id: s("run_id"),
            workflow_type: s("workflow_type"),
            task_queue: s("task_queue"),
            multi_agent_session_id: None,
        };
        let at = UNIX_EPOCH;
        let output = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
        match s("event_type").as_str() {
            events::ACTIVITY_COMPLETED => {
                let spans = list("spans")
                    .iter()
                    .map(|sp| {
                        let name = sp.get("name").and_then(Value::as_str).unwrap_or("span");
                        crate::governance::testutil::span(
                            name,
                            sp.get("attributes").cloned().unwrap_or_default(),
                        )
                    })
                    .collect();
                let c = ActivityCompletion {
                    status: ActivityStatus::Completed,
                    start_time: at,
                    end_time: at,
                    activity_input: list("activity_input"),
                    activity_output: output("activity_output"),
                    error: None,
                    spans,
                };
                events::activity_completed(&a, c, at).into()
            }
            events::WORKFLOW_STARTED => events::workflow_started(&wf, at).into(),
            events::WORKFLOW_COMPLETED => {
                events::workflow_completed(&wf, output("workflow_output"), at).into()
            }
            events::WORKFLOW_FAILED => events::workflow_failed(&wf, output("error"), at).into(),
            events::SIGNAL_RECEIVED => {
                events::signal_received(&wf, &s("signal_name"), list("signal_args"), at).into()
            }
            _ => events::activity_started(&a, list("activity_input"), at).into(),
        }
    }

    /// `evaluate` of the event a JSON object describes (see [`event_of`]).
    trait EvalJson {
        fn eval(&self, v: &Value) -> Value;
    }

    impl EvalJson for Policy {
        fn eval(&self, v: &Value) -> Value {
            self.evaluate(&event_of(v))
        }
    }

    impl EvalJson for LocalCore {
        fn eval(&self, v: &Value) -> Value {
            self.evaluate(&event_of(v))
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(text, Path::new("policy.toml")).unwrap()
    }

    fn err(text: &str) -> String {
        Policy::parse(text, Path::new("policy.toml"))
            .unwrap_err()
            .to_string()
    }

    fn completed(spans: Value) -> Value {
        json!({"event_type": "ActivityCompleted", "workflow_id": "w", "run_id": "r", "activity_id": "1",
               "activity_type": "run_query", "workflow_type": "Etl", "activity_input": [{"q": "x"}],
               "activity_output": {"rows": 3}, "spans": spans})
    }

    #[test]
    fn an_empty_policy_allows_everything() {
        assert_eq!(
            Policy::default().eval(&json!({"event_type": "ActivityStarted"})),
            json!({"verdict": "allow"})
        );
        assert_eq!(
            policy("default_verdict = \"constrain\"").eval(&json!({})),
            json!({"verdict": "constrain"})
        );
    }

    #[test]
    fn the_first_matching_rule_wins_with_globs_lists_and_regexes() {
        let p = policy(
            r#"
[[rules]]
name = "llm-approval"
event_type = "ActivityStarted"
activity_type = ["call_*", "ask_llm"]
verdict = "require_approval"
reason = "LLM calls need a human"

[[rules]]
activity_type = "call_llm"
verdict = "block"

[[rules]]
name = "ssn"
input = 're:\d{3}-\d{2}-\d{4}'
verdict = "block"
reason = "SSN in input"
"#,
        );
        let started = |t: &str, input: Value| json!({"event_type": "ActivityStarted", "activity_type": t, "activity_input": input});
        assert_eq!(
            p.eval(&started("call_llm", json!([]))),
            json!({"verdict": "require_approval", "reason": "LLM calls need a human", "policy_id": "llm-approval"})
        );
        assert_eq!(
            p.eval(&started("ask_llm", json!([])))["verdict"],
            "require_approval"
        );
        assert_eq!(p.eval(&started("ask_llm2", json!([])))["verdict"], "allow");
        assert_eq!(
            p.eval(&started(
                "other",
                json!([{"prompt": "my ssn is 123-45-6789"}])
            )),
            json!({"verdict": "block", "reason": "SSN in input", "policy_id": "ssn"})
        );
        let c = json!({"event_type": "ActivityCompleted", "activity_type": "call_llm"});
        assert_eq!(
            p.eval(&c),
            json!({"verdict": "block", "policy_id": "rules[1]"})
        );
    }

    #[test]
    fn span_conditions_match_http_sql_and_file_spans() {
        let p = policy(
            r#"
[[rules]]
name = "openai-post"
http_host = "*.OpenAI.com"
http_method = "post"
http_url = 're:/v1/chat/'
verdict = "halt"

[[rules]]
name = "drop"
sql = 're:(?i)\bdrop\s+table\b'
verdict = "block"

[[rules]]
name = "etc"
file_path = "/etc/*"
verdict = "constrain"
"#,
        );
        let http = |method: &str, url: &str| {
            completed(
                json!([{"name": method, "attributes": {"http.method": method, "http.url": url}}]),
            )
        };
        assert_eq!(
            p.eval(&http("POST", "https://api.openai.com/v1/chat/completions"))["verdict"],
            "halt"
        );
        assert_eq!(
            p.eval(&http("GET", "https://api.openai.com/v1/chat/completions"))["verdict"],
            "allow"
        );
        assert_eq!(
            p.eval(&http("POST", "https://api.openai.com:443/v1/embeddings"))["verdict"],
            "allow"
        );
        assert_eq!(
            p.eval(&http("POST", "https://user@x.openai.com:8443/v1/chat/x"))["verdict"],
            "halt"
        );
        // Method from one span and URL from another do not combine.
        let mixed = completed(json!([
            {"attributes": {"http.method": "POST", "http.url": "https://example.com/v1/chat/"}},
            {"attributes": {"http.method": "GET", "http.url": "https://api.openai.com/v1/chat/"}}
        ]));
        assert_eq!(p.eval(&mixed)["verdict"], "allow");
        let sql = completed(
            json!([{"attributes": {"db.system": "postgresql", "db.statement": "Drop  TABLE users"}}]),
        );
        assert_eq!(p.eval(&sql)["policy_id"], "drop");
        let file =
            completed(json!([{"name": "file.open", "attributes": {"file.path": "/etc/passwd"}}]));
        assert_eq!(p.eval(&file)["verdict"], "constrain");
        let started =
            json!({"event_type": "ActivityStarted", "activity_type": "x", "activity_input": []});
        assert_eq!(
            p.eval(&started)["verdict"],
            "allow",
            "no spans: span rules never match"
        );
    }

    #[test]
    fn guardrails_default_their_input_type_to_the_stage() {
        let p = policy(
            r#"
[[rules]]
activity_type = "call_llm"
verdict = "allow"
[rules.guardrails]
redacted_input = [{ prompt = "[REDACTED]" }]

[[rules]]
activity_type = "summarize"
verdict = "allow"
[rules.guardrails]
validation_passed = false
reasons = ["toxic output", { type = "pii", field = "text", reason = "email" }]
"#,
        );
        let s = json!({"event_type": "ActivityStarted", "activity_type": "call_llm"});
        assert_eq!(
            p.eval(&s)["guardrails_result"],
            json!({"input_type": "activity_input", "redacted_input": [{"prompt": "[REDACTED]"}]})
        );
        let c = json!({"event_type": "ActivityCompleted", "activity_type": "summarize"});
        let g = &p.eval(&c)["guardrails_result"];
        assert_eq!(g["input_type"], "activity_output");
        assert_eq!(g["validation_passed"], false);
        assert_eq!(g["reasons"][0]["reason"], "toxic output");
        assert_eq!(
            g["reasons"][1],
            json!({"type": "pii", "field": "text", "reason": "email"})
        );
    }

    #[test]
    fn bad_policies_name_the_file_rule_and_field() {
        assert_eq!(
            err("[[rules]]\nactivity_type = \"x\"\nverdict = \"deny\"\n"),
            "policy.toml: rules[0]: verdict must be one of allow, constrain, require_approval, block, halt, not \"deny\""
        );
        assert_eq!(
            err("[[rules]]\nverdict = \"allow\"\n[[rules]]\nname = \"two\"\nsql = \"re:(\"\nverdict = \"block\"\n")
                .split(':')
                .take(3)
                .collect::<Vec<_>>()
                .join(":"),
            "policy.toml: rules[1] (\"two\"): sql"
        );
        assert!(err("[[rules]]\nverdict = \"block\"\nhost = \"x\"\n")
            .starts_with("policy.toml: rules[0]: unknown field \"host\""));
        assert_eq!(err("[[rules]]\nactivity_type = \"x\"\n"), "policy.toml: rules[0]: verdict is missing (one of allow, constrain, require_approval, block, halt)");
        assert!(err("[[rules]]\nverdict = \"block\"\nactivity_type = 3\n")
            .contains("rules[0]: activity_type must be a pattern string"));
        assert!(
            err("[[rules]]\nverdict = \"block\"\n[rules.approval]\ndecision = \"approve\"\n")
                .contains("only meaningful with verdict")
        );
        assert!(err(
            "[[rules]]\nverdict = \"require_approval\"\n[rules.approval]\ndecision = \"maybe\"\n"
        )
        .contains("rules[0]: approval.decision must be"));
        assert!(
            err("[[rules]]\nverdict = \"allow\"\n[rules.guardrails]\ninput_type = \"x\"\n")
                .contains("rules[0]: guardrails.input_type must be")
        );
        assert!(err("rule = 1\n").contains("unknown top-level key \"rule\""));
        assert!(err("[[rules]\n").starts_with("policy file policy.toml is not valid TOML"));
        let missing = Policy::load(Path::new("/nonexistent/p.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("cannot read policy file /nonexistent/p.toml"),
            "{missing}"
        );
    }

    #[test]
    fn local_core_answers_approval_polls_per_rule_and_allows_once_approved() {
        let p = policy(
            r#"
[[rules]]
activity_type = "pay"
verdict = "require_approval"
[rules.approval]
after_polls = 1

[[rules]]
activity_type = "wipe"
verdict = "require_approval"
[rules.approval]
decision = "reject"
reason = "not today"

[[rules]]
activity_type = "late"
verdict = "require_approval"
[rules.approval]
decision = "expire"
"#,
        );
        let core = LocalCore::new(p, None);
        let ev = |t: &str, id: &str| json!({"event_type": "ActivityStarted", "workflow_id": "w", "run_id": "r", "activity_id": id, "activity_type": t});
        assert_eq!(core.eval(&ev("pay", "1"))["verdict"], "require_approval");
        assert_eq!(
            core.approval("w", "r", "1"),
            json!({"verdict": "require_approval"})
        );
        assert_eq!(core.approval("w", "r", "1"), json!({"verdict": "allow"}));
        assert_eq!(
            core.eval(&ev("pay", "1"))["verdict"],
            "allow",
            "re-sent ActivityStarted after approval"
        );
        assert_eq!(
            core.eval(&ev("pay", "2"))["verdict"],
            "require_approval",
            "another activity still needs approval"
        );
        core.eval(&ev("wipe", "3"));
        assert_eq!(
            core.approval("w", "r", "3"),
            json!({"verdict": "block", "reason": "not today"})
        );
        core.eval(&ev("late", "4"));
        assert_eq!(core.approval("w", "r", "4")["expired"], true);
        assert_eq!(
            core.approval("w", "r", "nothing-waiting"),
            json!({"verdict": "allow"})
        );
    }

    #[test]
    fn the_documented_example_policy_parses_and_behaves_as_described() {
        let p = Policy::parse(
            include_str!("example-policy.toml"),
            Path::new("example-policy.toml"),
        )
        .unwrap();
        assert_eq!(p.rule_count(), 4);
        let sql = completed(json!([{"attributes": {"db.statement": "drop table t"}}]));
        assert_eq!(p.eval(&sql)["policy_id"], "no-drop-table");
        let pay = json!({"event_type": "ActivityStarted", "activity_type": "charge_card"});
        assert_eq!(p.eval(&pay)["verdict"], "require_approval");
        let llm = json!({"event_type": "ActivityStarted", "activity_type": "call_llm", "activity_input": [{"prompt": "123-45-6789"}]});
        assert_eq!(
            p.eval(&llm)["guardrails_result"]["redacted_input"],
            json!([{"prompt": "[REDACTED]"}])
        );
        let etl = json!({"event_type": "ActivityCompleted", "workflow_type": "EtlDaily",
            "spans": [{"attributes": {"http.method": "POST", "http.url": "https://api.openai.com/v1/chat"}}]});
        assert_eq!(p.eval(&etl)["verdict"], "halt");
    }
}
