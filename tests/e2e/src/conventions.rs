//! The SDK conventions a governance case runs under, and what differs between them
//! (shared/docs/openbox-core-protocol.md §1.2, §2.2 notes, §4.2, §6): the worker's hook
//! asks for them in `hello` (`OPENBOX_SDK_CONVENTIONS`, see [`GovWorld::sdk_conventions`])
//! and the agent follows them in that worker's requests to Core.
//!
//! A case is one function `fn(name: &str, sdk: Sdk)`; [`under_both_conventions!`] makes
//! it two tests, `<case>::sdk_1_0` and `<case>::sdk_2_0`, each with a world of its own
//! (logs in `target/e2e-runs/<case>-sdk_1_0/` and `…-sdk_2_0/`) on the binary's shared
//! servers. Expected outcomes that differ are computed from [`Sdk`] here, in one place.
//!
//! [`GovWorld::sdk_conventions`]: crate::GovWorld

use serde_json::{json, Value};

/// The SDK release whose request conventions a worker follows under 2.0 (headers).
pub const SDK_V2_IDENTIFIER: &str = "openbox-temporal-python-v2.0.0";
/// What SDK 2.0's hook events name: its base library (openbox-sdk-python 1.4.0).
pub const SDK_V2_BASE_IDENTIFIER: &str = "openbox-base-python-v1.4.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sdk {
    V1,
    V2,
}

impl Sdk {
    /// What the hook is told (`OPENBOX_SDK_CONVENTIONS`) and the agent's flag takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Sdk::V1 => "1.0",
            Sdk::V2 => "2.0",
        }
    }

    /// The JSON Schema definition an evaluate body of these conventions must match.
    pub fn evaluate_schema_def(self) -> &'static str {
        match self {
            Sdk::V1 => "evaluateRequest",
            Sdk::V2 => "evaluateRequestV2",
        }
    }

    /// Whether ActivityCompleted carries the activity's captured spans. Under 1.0 it
    /// does (unless the agent runs with `--hook-events`). Under 2.0 the agent sends them
    /// as per-operation hook events (§3.2), as SDK 2.0 does, and ActivityCompleted
    /// carries `span_count: 0, spans: []`.
    pub fn completed_carries_spans(self) -> bool {
        self == Sdk::V1
    }

    /// Whether an ActivityCompleted of an activity that did not return normally is sent:
    /// SDK 1.0 sends one from a `finally` (`status: "failed"`; the agent may), SDK 2.0
    /// never (§2.2 notes).
    pub fn completed_only_when_returned(self) -> bool {
        self == Sdk::V2
    }

    /// Whether a HALT (and a fail_closed HALT without Core's answer) terminates the
    /// workflow (2.0), or only fails the activity with GovernanceHalt (1.0) (§4.2, §6).
    pub fn halt_terminates(self) -> bool {
        self == Sdk::V2
    }

    /// What is wrong with the headers of a request to Core made under these conventions
    /// (§1.2); empty when they are right.
    pub fn header_problems(self, request: &Value) -> Vec<String> {
        let h = &request["headers"];
        let what = format!("{} {}", s(request, "method"), s(request, "path"));
        let mut p = Vec::new();
        match self {
            Sdk::V2 => {
                let get = request["method"] == json!("GET");
                // Hook events come from SDK 2.0's hook runtime client, which names the
                // base library (but under an Okta identity, not used in these tests).
                let sdk = if is_hook_event(&request["body"]) {
                    SDK_V2_BASE_IDENTIFIER
                } else {
                    SDK_V2_IDENTIFIER
                };
                if h["x-openbox-sdk-version"] != json!(sdk)
                    || !s(h, "user-agent").starts_with(&format!("OpenBox-SDK/{sdk}"))
                    // Only the validate GET names a Content-Type under 2.0.
                    || h.get("content-type").is_some() != get
                {
                    p.push(format!("{what}: not SDK 2.0 headers: {h}"));
                }
            }
            Sdk::V1 => {
                if h["content-type"] != json!("application/json")
                    || h.get("x-openbox-sdk-version").is_some()
                {
                    p.push(format!("{what}: not SDK 1.0 headers: {h}"));
                }
            }
        }
        p
    }
}

impl std::fmt::Display for Sdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A per-operation hook event (SDK 2.0, §3.2: `event_type: "ActivityStarted"` with
/// `hook_trigger: true`), not a lifecycle event: lifecycle assertions leave them out.
pub fn is_hook_event(body: &Value) -> bool {
    body["hook_trigger"] == json!(true)
}

/// What is wrong with the outcome `o` (support/gov_client.py) of a workflow whose
/// activity governance stopped with a HALT of reason `reason` (`~`: a substring of it):
/// under 1.0 it fails with the non-retryable GovernanceHalt naming the reason, under 2.0
/// it is terminated with `Governance HALT: <reason>`.
pub fn halt_problems(o: &Value, sdk: Sdk, reason: &str) -> Vec<String> {
    let (want, exact) = match reason.strip_prefix('~') {
        Some(part) => (part, false),
        None => (reason, true),
    };
    let chain = o["error"]["chain"].as_array().cloned().unwrap_or_default();
    let link = |class: &str| chain.iter().find(|l| l["class"] == json!(class)).cloned();
    let mut p = Vec::new();
    if o["ok"] == json!(true) {
        p.push(format!(
            "the workflow completed ({}), expected a HALT",
            o["result"]
        ));
        return p;
    }
    if sdk.halt_terminates() {
        if o["status"] != json!("TERMINATED") {
            p.push(format!(
                "status {}, expected TERMINATED (HALT under SDK 2.0 conventions)",
                o["status"]
            ));
        }
        let Some(t) = link("TerminatedError") else {
            p.push(format!(
                "no TerminatedError in the failure chain: {chain:?}"
            ));
            return p;
        };
        let got = t["details"][0].as_str().unwrap_or("");
        let full = format!("Governance HALT: {want}");
        let ok = if exact {
            got == full
        } else {
            got.starts_with("Governance HALT: ") && got.contains(want)
        };
        if !ok {
            p.push(format!("termination reason {got:?}, expected {full:?}"));
        }
    } else {
        if o["status"] != json!("FAILED") {
            p.push(format!("status {}, expected FAILED", o["status"]));
        }
        if link("TerminatedError").is_some() {
            p.push("terminated under SDK 1.0 conventions".into());
        }
        let Some(app) = link("ApplicationError") else {
            p.push(format!(
                "no ApplicationError in the failure chain: {chain:?}"
            ));
            return p;
        };
        if app["type"] != json!("GovernanceHalt") || app["non_retryable"] != json!(true) {
            p.push(format!(
                "ApplicationError type {} non_retryable {}, expected the non-retryable GovernanceHalt",
                app["type"], app["non_retryable"]
            ));
        }
        let got = s(&app, "message");
        if !got.contains(want) {
            p.push(format!(
                "ApplicationError message {got:?} does not name {want:?}"
            ));
        }
    }
    p
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Two tests per case `fn $case(name: &str, sdk: Sdk)`: `$case::sdk_1_0` and
/// `$case::sdk_2_0` (a module of the case's name; the function and the module live in
/// different namespaces). `name` names the test's logs directory.
#[macro_export]
macro_rules! under_both_conventions {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[test]
            fn sdk_1_0() {
                super::$case(concat!(stringify!($case), "-sdk_1_0"), $crate::Sdk::V1)
            }

            #[test]
            fn sdk_2_0() {
                super::$case(concat!(stringify!($case), "-sdk_2_0"), $crate::Sdk::V2)
            }
        }
    )+};
}
