//! Which SDK's request conventions a worker's governance requests follow: SDK 1.0 (the
//! default) or SDK 2.0 (`openbox-core-protocol.md` §1.2, §2.2 notes). A worker chooses
//! in its hook's `hello` (`sdk_conventions`), the agent's `sdk_conventions` setting is the
//! default for the others.
//!
//! What changes under 2.0:
//! - headers: `User-Agent` and `X-OpenBox-SDK-Version` name the SDK release whose
//!   conventions are followed; POSTs carry no `Content-Type`;
//! - the body is compact JSON with non-ASCII characters escaped `\uXXXX` (Python's
//!   `json.dumps` default), the exact bytes that are hashed and signed;
//! - ActivityCompleted is sent only when the activity returned normally;
//! - WorkflowStarted carries the workflow's arguments (`activity_input`);
//! - an approval poll answer is read `action` first, and one naming no decision is still
//!   pending (1.0: approved; `verdict::interpret_approval`);
//! - WorkflowFailed: `cause`/`root_cause` messages cut at 500 characters, an
//!   `error_type` of 200 characters or more left out;
//! - span bodies cut at `max_body_size` characters (default 65 536).
//!
//!
//! Hook events (§3.2) go with 2.0 conventions, or with every worker when the agent runs
//! with `hook_events`: each captured operation is then sent as its own `started` and
//! `completed` evaluate requests, and ActivityCompleted carries `span_count: 0, spans: []`
//! as SDK 2.0's does (see [`RequestStyle::hook_events`]).

use std::io;

use serde::Serialize;
use serde_json::Value;

use super::events::{ActivityStatus, Event};

/// The SDK release whose conventions [`Conventions::V2`] follows (§1.2 pattern
/// `openbox-{engine}-{language}-v{semver}`).
pub const SDK_V2_IDENTIFIER: &str = "openbox-temporal-python-v2.0.0";
/// What SDK 2.0 names itself on its hook events (§3.2): it sends them through its base
/// library's client (openbox-sdk-python 1.4.0), which it builds without its own version
/// unless the worker has an Okta identity; that client names the base library.
pub const SDK_V2_BASE_IDENTIFIER: &str = "openbox-base-python-v1.4.0";
/// SDK 2.0's default `max_body_size` (characters).
pub const DEFAULT_MAX_BODY_SIZE: usize = 65_536;
/// SDK 2.0 cuts `cause.message` and `root_cause.message` of WorkflowFailed here.
const CAUSE_MESSAGE_CHARS: usize = 500;
/// SDK 2.0 sends an `error_type` only when shorter than this.
const ERROR_TYPE_CHARS: usize = 200;

/// How one worker's requests are built: its conventions and, under 2.0, how much of each
/// captured body is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestStyle {
    pub conventions: Conventions,
    /// `None`: the agent's setting, else SDK 2.0's default.
    pub max_body_size: Option<usize>,
    /// The agent's `hook_events` setting: hook events whatever the conventions (see
    /// [`RequestStyle::sends_hook_events`]).
    pub hook_events: bool,
}

impl RequestStyle {
    pub fn new(conventions: Conventions) -> RequestStyle {
        RequestStyle {
            conventions,
            max_body_size: None,
            hook_events: false,
        }
    }

    /// Operations go to Core as hook events, not inside ActivityCompleted: always under
    /// 2.0 conventions, and for every worker with the agent's `hook_events`.
    pub fn sends_hook_events(self) -> bool {
        self.hook_events || self.conventions == Conventions::V2
    }

    /// The characters kept of each captured body (SDK 2.0's default when unset).
    pub fn body_limit(self) -> usize {
        self.max_body_size.unwrap_or(DEFAULT_MAX_BODY_SIZE)
    }

    /// The event as this worker's requests send it, or `None` when nothing is sent (see
    /// [`Conventions::shape`]). With hook events, ActivityCompleted carries no spans: they
    /// went out one by one as hook events.
    pub fn shape(self, event: Event) -> Option<Event> {
        match self.conventions.shape(event, self.max_body_size)? {
            Event::ActivityCompleted(mut e) if self.sends_hook_events() => {
                e.spans.clear();
                e.span_count = 0;
                Some(Event::ActivityCompleted(e))
            }
            other => Some(other),
        }
    }
}

/// What a worker's hook chose in `hello` (`sdk_conventions`, `max_body_size` in its
/// settings); what it leaves out is the agent's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStyle {
    pub conventions: Option<Conventions>,
    pub max_body_size: Option<usize>,
}

impl WorkerStyle {
    /// From the settings object of a hook's `hello`; the error says what is wrong.
    pub fn from_settings(settings: &Value) -> Result<WorkerStyle, String> {
        let mut style = WorkerStyle::default();
        if let Some(v) = settings.get("sdk_conventions").filter(|v| !v.is_null()) {
            let parsed = match v {
                Value::String(s) => Conventions::parse(s),
                Value::Number(n) => Conventions::parse(&n.to_string()),
                _ => None,
            };
            style.conventions = Some(parsed.ok_or_else(|| {
                format!("the worker's sdk_conventions must be \"1.0\" or \"2.0\", not {v}")
            })?);
        }
        if let Some(v) = settings.get("max_body_size").filter(|v| !v.is_null()) {
            let n = v
                .as_u64()
                .filter(|n| *n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    format!("the worker's max_body_size must be a positive whole number, not {v}")
                })?;
            style.max_body_size = Some(n);
        }
        Ok(style)
    }

    /// This worker's choices over the governor's defaults.
    pub fn over(self, default: RequestStyle) -> RequestStyle {
        RequestStyle {
            conventions: self.conventions.unwrap_or(default.conventions),
            max_body_size: self.max_body_size.or(default.max_body_size),
            hook_events: default.hook_events,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Conventions {
    #[default]
    V1,
    V2,
}

impl Conventions {
    /// `"1.0"` or `"2.0"` (also `1`, `2`, `1.0.0`, `2.0.0`).
    pub fn parse(text: &str) -> Option<Conventions> {
        match text.trim() {
            "1" | "1.0" | "1.0.0" => Some(Conventions::V1),
            "2" | "2.0" | "2.0.0" => Some(Conventions::V2),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Conventions::V1 => "1.0",
            Conventions::V2 => "2.0",
        }
    }

    /// The event's request body: compact JSON in the SDK's key order; under 2.0 with
    /// non-ASCII escaped as Python does.
    pub fn encode(self, event: &impl Serialize) -> Vec<u8> {
        match self {
            Conventions::V1 => super::events::encode(event),
            Conventions::V2 => {
                let mut out = Vec::with_capacity(256);
                let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
                // Strings, numbers, spans and JSON values always serialize.
                match event.serialize(&mut ser) {
                    Ok(()) => out,
                    Err(_) => Vec::new(),
                }
            }
        }
    }

    /// The event as these conventions send it, or `None` when they send nothing (2.0:
    /// ActivityCompleted of a failed activity).
    pub fn shape(self, event: Event, max_body_size: Option<usize>) -> Option<Event> {
        if self == Conventions::V1 {
            return Some(match event {
                // SDK 1.0 sends no workflow arguments.
                Event::WorkflowStarted(mut e) => {
                    e.activity_input = None;
                    Event::WorkflowStarted(e)
                }
                other => other,
            });
        }
        match event {
            Event::ActivityCompleted(e) if e.status == ActivityStatus::Failed => None,
            Event::ActivityCompleted(mut e) => {
                let limit = max_body_size.unwrap_or(DEFAULT_MAX_BODY_SIZE);
                for span in &mut e.spans {
                    for body in [&mut span.request_body, &mut span.response_body]
                        .into_iter()
                        .flatten()
                    {
                        truncate_chars(body, limit);
                    }
                }
                Some(Event::ActivityCompleted(e))
            }
            Event::WorkflowFailed(mut e) => {
                for key in ["cause", "root_cause"] {
                    if let Some(Value::Object(link)) = e.error.get_mut(key) {
                        if let Some(Value::String(m)) = link.get_mut("message") {
                            truncate_chars(m, CAUSE_MESSAGE_CHARS);
                        }
                        let long = link
                            .get("error_type")
                            .and_then(Value::as_str)
                            .is_some_and(|t| t.chars().count() >= ERROR_TYPE_CHARS);
                        if long {
                            link.remove("error_type");
                        }
                    }
                }
                Some(Event::WorkflowFailed(e))
            }
            other => Some(other),
        }
    }

    /// A spool line holding `body`: a 1.0 body as it is (spools written before 2.0
    /// existed read the same), a 2.0 body inside an envelope that says so, so delivery
    /// sends it with 2.0 headers after a restart too.
    pub fn spool_line(self, body: &[u8]) -> Vec<u8> {
        match self {
            Conventions::V1 => body.to_vec(),
            Conventions::V2 => {
                let mut line = Vec::with_capacity(SPOOL_V2_PREFIX.len() + body.len() + 1);
                line.extend_from_slice(SPOOL_V2_PREFIX);
                line.extend_from_slice(body);
                line.push(b'}');
                line
            }
        }
    }

    /// The conventions and request body of a spool line (see [`Conventions::spool_line`]).
    pub fn from_spool_line(line: &[u8]) -> (Conventions, &[u8]) {
        match line
            .strip_prefix(SPOOL_V2_PREFIX)
            .and_then(|rest| rest.strip_suffix(b"}"))
        {
            Some(body) => (Conventions::V2, body),
            None => (Conventions::V1, line),
        }
    }
}

impl std::fmt::Display for Conventions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const SPOOL_V2_PREFIX: &[u8] = b"{\"openbox_spool_sdk_conventions\":\"2.0\",\"body\":";

/// Cuts `text` to at most `limit` characters (Python's `s[:limit]`).
pub(crate) fn truncate_chars(text: &mut String, limit: usize) {
    if let Some((at, _)) = text.char_indices().nth(limit) {
        text.truncate(at);
    }
}

/// serde_json's compact output with DEL and every character above it written as `\uXXXX`
/// (UTF-16 surrogate pairs above U+FFFF), lowercase hex: Python's `json.dumps` with
/// `ensure_ascii=True`, which SDK 2.0 hashes and sends.
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() && c != '\x7f' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;
    use crate::governance::events::{self, ActivityCompletion, ActivityInfo, WorkflowInfo};

    fn info() -> ActivityInfo {
        ActivityInfo {
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "T".into(),
            activity_id: "1".into(),
            activity_type: "a".into(),
            task_queue: "q".into(),
            attempt: 1,
            multi_agent_session_id: None,
        }
    }

    fn completed(status: ActivityStatus, body: &str) -> Event {
        let mut span = crate::governance::testutil::span("POST", json!({}));
        span.request_body = Some(body.to_owned());
        events::activity_completed(
            &info(),
            ActivityCompletion {
                status,
                start_time: UNIX_EPOCH,
                end_time: UNIX_EPOCH + Duration::from_secs(1),
                activity_input: vec![json!("é")],
                activity_output: json!(null),
                error: None,
                spans: vec![span],
            },
            UNIX_EPOCH,
        )
        .into()
    }

    #[test]
    fn v2_bodies_escape_non_ascii_like_python_and_v1_bodies_keep_utf8() {
        let v = json!({"a": "é\u{1F600}\u{7f}\n\"x\"", "b": [1.5, null, true]});
        assert_eq!(
            String::from_utf8(Conventions::V2.encode(&v)).unwrap(),
            // python3 -c 'import json; print(json.dumps({"a": "é\U0001F600\x7f\n\"x\"",
            //   "b": [1.5, None, True]}, separators=(",", ":")))'
            "{\"a\":\"\\u00e9\\ud83d\\ude00\\u007f\\n\\\"x\\\"\",\"b\":[1.5,null,true]}"
        );
        assert_eq!(
            String::from_utf8(Conventions::V1.encode(&v)).unwrap(),
            "{\"a\":\"é\u{1F600}\u{7f}\\n\\\"x\\\"\",\"b\":[1.5,null,true]}"
        );
    }

    #[test]
    fn v2_sends_activity_completed_only_for_success_with_bodies_cut_at_max_body_size() {
        assert!(Conventions::V2
            .shape(completed(ActivityStatus::Failed, "x"), None)
            .is_none());
        assert!(Conventions::V1
            .shape(completed(ActivityStatus::Failed, "x"), None)
            .is_some());
        let long = "é".repeat(70_000);
        let Some(Event::ActivityCompleted(e)) =
            Conventions::V2.shape(completed(ActivityStatus::Completed, &long), None)
        else {
            panic!()
        };
        assert_eq!(
            e.spans[0].request_body.as_ref().unwrap().chars().count(),
            65_536
        );
        let Some(Event::ActivityCompleted(e)) =
            Conventions::V2.shape(completed(ActivityStatus::Completed, &long), Some(10))
        else {
            panic!()
        };
        assert_eq!(e.spans[0].request_body.as_deref(), Some("éééééééééé"));
        let Some(Event::ActivityCompleted(e)) =
            Conventions::V1.shape(completed(ActivityStatus::Completed, &long), Some(10))
        else {
            panic!()
        };
        assert_eq!(e.spans[0].request_body.as_ref().unwrap().len(), long.len());
    }

    #[test]
    fn v2_workflow_failed_cuts_cause_messages_and_drops_long_error_types() {
        let wf = WorkflowInfo {
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "T".into(),
            task_queue: "q".into(),
            multi_agent_session_id: None,
        };
        let error = json!({"type": "ActivityError", "message": "m".repeat(600),
            "cause": {"type": "ApplicationError", "message": "c".repeat(600), "error_type": "t".repeat(200)},
            "root_cause": {"type": "ValueError", "message": "r".repeat(501), "error_type": "short"}});
        let ev: Event = events::workflow_failed(&wf, error, UNIX_EPOCH).into();
        let Some(Event::WorkflowFailed(e)) = Conventions::V2.shape(ev.clone(), None) else {
            panic!()
        };
        assert_eq!(
            e.error["message"].as_str().unwrap().len(),
            600,
            "top level kept"
        );
        assert_eq!(e.error["cause"]["message"].as_str().unwrap().len(), 500);
        assert!(e.error["cause"].get("error_type").is_none());
        assert_eq!(
            e.error["root_cause"]["message"].as_str().unwrap().len(),
            500
        );
        assert_eq!(e.error["root_cause"]["error_type"], "short");
        let Some(Event::WorkflowFailed(e)) = Conventions::V1.shape(ev, None) else {
            panic!()
        };
        assert_eq!(e.error["cause"]["message"].as_str().unwrap().len(), 600);
    }

    #[test]
    fn workflow_started_carries_the_workflow_arguments_under_v2_only() {
        let wf = WorkflowInfo {
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "T".into(),
            task_queue: "q".into(),
            multi_agent_session_id: None,
        };
        let mut started = events::workflow_started(&wf, UNIX_EPOCH);
        started.activity_input = Some(vec![json!({"n": 1}), json!("é")]);
        let ev: Event = started.into();
        let v2 = Conventions::V2.shape(ev.clone(), None).unwrap();
        assert_eq!(
            String::from_utf8(Conventions::V2.encode(&v2)).unwrap(),
            r#"{"source":"workflow-telemetry","event_type":"WorkflowStarted","workflow_id":"w","run_id":"r","workflow_type":"T","task_queue":"q","timestamp":"1970-01-01T00:00:00.000Z","activity_input":[{"n":1},"\u00e9"]}"#
        );
        let v1 = Conventions::V1.shape(ev, None).unwrap();
        assert_eq!(
            String::from_utf8(Conventions::V1.encode(&v1)).unwrap(),
            r#"{"source":"workflow-telemetry","event_type":"WorkflowStarted","workflow_id":"w","run_id":"r","workflow_type":"T","task_queue":"q","timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
    }

    #[test]
    fn spool_lines_carry_the_conventions_and_give_back_the_exact_body() {
        let body = br#"{"source":"workflow-telemetry","x":"\u00e9"}"#;
        let line = Conventions::V2.spool_line(body);
        serde_json::from_slice::<Value>(&line).expect("a spool line is one JSON value");
        assert_eq!(
            Conventions::from_spool_line(&line),
            (Conventions::V2, &body[..])
        );
        let old = Conventions::V1.spool_line(body);
        assert_eq!(old, body);
        assert_eq!(
            Conventions::from_spool_line(&old),
            (Conventions::V1, &body[..])
        );
    }

    #[test]
    fn a_worker_chooses_its_conventions_and_body_limit_and_bad_values_are_named() {
        let agent = RequestStyle {
            conventions: Conventions::V1,
            max_body_size: Some(100),
            hook_events: false,
        };
        let none = WorkerStyle::from_settings(&json!({"governance_policy": "fail_open"})).unwrap();
        assert_eq!(none.over(agent), agent);
        let two = WorkerStyle::from_settings(&json!({"sdk_conventions": "2.0"})).unwrap();
        assert_eq!(
            two.over(agent),
            RequestStyle {
                conventions: Conventions::V2,
                max_body_size: Some(100),
                hook_events: false,
            }
        );
        assert!(
            two.over(agent).sends_hook_events(),
            "2.0 brings hook events"
        );
        assert!(!none.over(agent).sends_hook_events());
        let one = WorkerStyle::from_settings(&json!({"sdk_conventions": "1.0"})).unwrap();
        let agent_v2 = RequestStyle {
            conventions: Conventions::V2,
            ..agent
        };
        assert!(
            !one.over(agent_v2).sends_hook_events(),
            "a worker that chose 1.0 keeps its spans in ActivityCompleted"
        );
        let every = RequestStyle {
            hook_events: true,
            ..agent
        };
        assert!(
            one.over(every).sends_hook_events(),
            "--hook-events: every worker"
        );
        let both =
            WorkerStyle::from_settings(&json!({"sdk_conventions": 2, "max_body_size": 5})).unwrap();
        assert_eq!(both.over(agent).max_body_size, Some(5));
        let e = WorkerStyle::from_settings(&json!({"sdk_conventions": "3"})).unwrap_err();
        assert!(e.contains("\"1.0\" or \"2.0\""), "{e}");
        let e = WorkerStyle::from_settings(&json!({"max_body_size": -1})).unwrap_err();
        assert!(e.contains("max_body_size"), "{e}");
        assert_eq!(
            WorkerStyle::from_settings(&Value::Null).unwrap(),
            WorkerStyle::default()
        );
    }

    #[test]
    fn conventions_parse_the_names_users_write() {
        for (text, want) in [
            ("1.0", Some(Conventions::V1)),
            ("2.0", Some(Conventions::V2)),
            (" 2 ", Some(Conventions::V2)),
            ("2.0.0", Some(Conventions::V2)),
            ("3.0", None),
            ("", None),
        ] {
            assert_eq!(Conventions::parse(text), want, "{text:?}");
        }
    }
}
