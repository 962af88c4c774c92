//! SDK 2.0 behaviour at the worker hook, end to end: a real Temporal dev server, a real
//! Python worker adopting the hook as an SDK 2.0 user writes it
//! (`plugins=[OpenBoxPlugin(openbox_url=…, openbox_api_key=…)]`, support/gov_worker.py
//! `--plugin`), the agent, and the fake OpenBox Core scripted with SDK 2.0 verdicts
//! (openbox-core-protocol.md §2.4, §4.2, §8).
//!
//! Checked: HALT terminates the workflow with the verdict's reason (and under SDK 1.0
//! conventions only fails the activity); BLOCK with patch continues the workflow as new
//! with the patched input and stops at `max_patch_restarts` with
//! `GovernancePatchLimitExceeded`; the memo's multi-agent session is on every event of
//! the run, and `emit_handoff()` reaches Core as a `Handoff` that the JSON Schema accepts.

use std::{collections::BTreeSet, time::Duration};

use openbox_e2e::{halt_problems, is_hook_event, GovWorld, Sdk, FAKE_CORE_KEY};
use serde_json::{json, Value};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const SESSION_MEMO: &str = "openbox_multi_agent_session_id";

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// A world with Core (`script`), the agent, and a worker that adopted the hook with
/// `OpenBoxPlugin` (`plugin`) or `OpenBoxHook` (SDK 1.0 conventions).
fn world(name: &str, script: &Value, plugin: bool) -> GovWorld {
    world_with(name, script, plugin, &[])
}

/// [`world`], with more arguments for the plugin worker (support/gov_worker.py).
fn world_with(name: &str, script: &Value, plugin: bool, worker_args: &[&str]) -> GovWorld {
    let mut w = GovWorld::new(name);
    w.start_core(script);
    let mut args = w.core().agent_args();
    args.push("--spool-dir".into());
    args.push(w.spool_dir().display().to_string());
    w.start_agent(&args);
    if plugin {
        let mut args = vec![
            "--plugin".into(),
            "--openbox-url".into(),
            w.core().url(),
            "--openbox-api-key".into(),
            FAKE_CORE_KEY.into(),
        ];
        args.extend(worker_args.iter().map(|a| a.to_string()));
        w.start_worker_with(&args);
    } else {
        w.start_worker();
    }
    w
}

fn step(activity: &str, args: Vec<Value>, activity_id: &str) -> Value {
    json!({"activity": activity, "args": args, "activity_id": activity_id})
}

/// A `GovSession` plan (support/gov_workflows.py) echoing each marker.
fn echo_plan(w: &GovWorld, tag: &str, markers: &[&str]) -> Value {
    let dir = w.files.display().to_string();
    let steps: Vec<Value> = markers
        .iter()
        .map(|m| step("echo", vec![json!({"marker": m, "dir": dir})], m))
        .collect();
    json!({"tag": tag, "steps": steps, "max_attempts": 3, "retry_ms": 200})
}

fn session_workflow(id: &str, plan: Value, memo: Option<Value>) -> Value {
    let mut wf = json!({"id": id, "workflow": "GovSession", "arg": plan});
    if let Some(memo) = memo {
        wf["memo"] = memo;
    }
    wf
}

/// The failure chain's link of class `class` (`WorkflowFailureError`, `ActivityError`,
/// `ApplicationError`, `TerminatedError`), the outermost first.
fn link<'a>(o: &'a Value, class: &str) -> Option<&'a Value> {
    o["error"]["chain"]
        .as_array()?
        .iter()
        .find(|l| l["class"] == json!(class))
}

/// The lifecycle evaluate bodies Core answered (no hook events), once `done` holds for
/// them.
fn evaluated_when(w: &GovWorld, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    w.core().wait_for(what, Duration::from_secs(30), |reqs| {
        let bodies: Vec<Value> = reqs
            .iter()
            .filter(|r| r["path"] == json!("/api/v1/governance/evaluate"))
            .map(|r| r["body"].clone())
            .filter(|b| !is_hook_event(b))
            .collect();
        done(&bodies)
    });
    w.core().lifecycle(200)
}

fn has_event(bodies: &[Value], wf: &str, event_type: &str) -> bool {
    bodies
        .iter()
        .any(|b| s(b, "workflow_id") == wf && s(b, "event_type") == event_type)
}

/// What Core does with the activity of [`halted_run`]'s workflow.
enum CoreDoes {
    /// Answers its ActivityStarted with this verdict body.
    Answer(Value),
    /// Refuses connections while the workflow runs.
    Down,
}

/// One `GovSession` workflow with one activity, Core treating it as `core` says, on a
/// worker that adopted the hook with `OpenBoxPlugin` (2.0, `worker_args` more for it) or
/// `OpenBoxHook` as it is (1.0): the activity never runs, and the outcome is a HALT with
/// `reason` (`~`: a substring) as the conventions have it — terminated with
/// `Governance HALT: <reason>` (2.0), failed with GovernanceHalt (1.0). Returns the
/// outcome for the caller's own checks.
fn halted_run(name: &str, sdk: Sdk, worker_args: &[&str], core: CoreDoes, reason: &str) -> Value {
    let w = world_with(name, &json!({}), sdk == Sdk::V2, worker_args);
    let m0 = w.marker(0);
    match &core {
        CoreDoes::Answer(verdict) => w.core().set_script(
            &json!({"rules": [{"match": {"event_type": "ActivityStarted", "activity_id": m0},
                               "body": verdict}]}),
        ),
        CoreDoes::Down => w.core().down(),
    }
    let wf0 = w.workflow_id(0);
    let o = w.run(
        &[session_workflow(&wf0, echo_plan(&w, "t", &[&m0]), None)],
        RUN_TIMEOUT,
    );
    let o = o[0].clone();
    let p = halt_problems(&o, sdk, reason);
    assert!(p.is_empty(), "{}\noutcome: {o}", p.join("; "));
    assert_eq!(
        w.ran_attempts(&m0),
        Vec::<u64>::new(),
        "the halted activity ran"
    );
    if let CoreDoes::Down = core {
        w.core().up();
    }
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
    o
}

/// HALT under SDK 2.0 conventions: the activity never runs, and the workflow is
/// terminated (not failed) with the reason `Governance HALT: <reason>`, which is what the
/// client sees (the termination reason: the error's details).
#[test]
fn openbox_plugin_halt_terminates_the_workflow_with_the_verdicts_reason() {
    halted_run(
        "openbox_plugin_halt_terminates_the_workflow_with_the_verdicts_reason",
        Sdk::V2,
        &[],
        CoreDoes::Answer(json!({"verdict": "halt", "reason": "runaway agent"})),
        "runaway agent",
    );
}

/// fail_closed under SDK 2.0 conventions with Core unreachable: the agent's synthetic HALT
/// terminates the workflow too, with `Governance HALT: Governance API error: …` (SDK 1.0
/// conventions only fail the activity: governance.rs,
/// `core_down_under_fail_closed_halts_the_activity`).
#[test]
fn openbox_plugin_fail_closed_without_core_terminates_the_workflow() {
    halted_run(
        "openbox_plugin_fail_closed_without_core_terminates_the_workflow",
        Sdk::V2,
        &[
            "--governance-policy",
            "fail_closed",
            "--governance-timeout",
            "2",
        ],
        CoreDoes::Down,
        "~Governance API error",
    );
}

/// The same HALT with the hook under SDK 1.0 conventions (`OpenBoxHook` as is): the
/// activity fails with the non-retryable `GovernanceHalt`, and the workflow fails (it is
/// not terminated).
#[test]
fn hook_under_sdk1_conventions_halt_fails_the_activity_only() {
    let o = halted_run(
        "hook_under_sdk1_conventions_halt_fails_the_activity_only",
        Sdk::V1,
        &[],
        CoreDoes::Answer(json!({"verdict": "halt", "reason": "runaway agent"})),
        "runaway agent",
    );
    let app = link(&o, "ApplicationError").unwrap_or_else(|| panic!("no ApplicationError: {o}"));
    assert_eq!(
        app["message"],
        json!("Governance blocked: runaway agent"),
        "{o}"
    );
}

/// BLOCK with patch (§8): wf0's activity is blocked with a patch naming a new plan; the
/// workflow continues as new with it (restart counter 1) and completes with the patched
/// activity's result. wf1's activity is blocked with a null patch (keep the input) every
/// time: the original run and 3 restarts (`max_patch_restarts` 3) each ask Core once, and
/// the 4th request fails the workflow with `GovernancePatchLimitExceeded`.
#[test]
fn block_with_patch_continues_as_new_with_the_new_input_up_to_the_restart_limit() {
    let w = world(
        "block_with_patch_continues_as_new_with_the_new_input_up_to_the_restart_limit",
        &json!({}),
        true,
    );
    let (m0, m1, m2) = (w.marker(0), w.marker(1), w.marker(2));
    let (wf0, wf1) = (w.workflow_id(0), w.workflow_id(1));
    let patched = echo_plan(&w, "patched", &[&m1]);
    w.core().set_script(&json!({"rules": [
        {"match": {"event_type": "ActivityStarted", "activity_id": m0},
         "body": {"verdict": "block", "reason": "use the safe input", "governance_event_id": "ge-1",
                  "patch": {"new_input": patched}}},
        {"match": {"event_type": "ActivityStarted", "activity_id": m2},
         "body": {"verdict": "block", "reason": "again", "patch": {"new_input": null}}},
    ]}));
    let o = w.run(
        &[
            session_workflow(&wf0, echo_plan(&w, "first", &[&m0]), None),
            session_workflow(&wf1, echo_plan(&w, "loop", &[&m2]), None),
        ],
        RUN_TIMEOUT,
    );
    let (o0, o1) = (&o[0], &o[1]);
    assert_eq!(
        o0["ok"],
        json!(true),
        "the patched workflow did not complete: {o0}"
    );
    assert_eq!(o0["result"]["tag"], json!("patched"), "{o0}");
    assert_eq!(o0["result"]["restarts"], json!(1), "{o0}");
    assert_eq!(
        o0["result"]["results"][0]["got"]["marker"],
        json!(m1),
        "{o0}"
    );
    assert_eq!(
        w.ran_attempts(&m0),
        Vec::<u64>::new(),
        "the blocked activity ran"
    );
    assert_eq!(w.ran_attempts(&m1), vec![1]);

    assert_eq!(o1["status"], json!("FAILED"), "{o1}");
    let app = link(o1, "ApplicationError").unwrap_or_else(|| panic!("no ApplicationError: {o1}"));
    assert_eq!(app["type"], json!("GovernancePatchLimitExceeded"), "{o1}");
    assert_eq!(
        app["message"],
        json!("Patch restart limit (3) exceeded"),
        "{o1}"
    );
    assert_eq!(app["non_retryable"], json!(true), "{o1}");
    assert_eq!(
        w.ran_attempts(&m2),
        Vec::<u64>::new(),
        "a blocked activity ran"
    );

    let bodies = evaluated_when(&w, "wf1's WorkflowFailed", |b| {
        has_event(b, &wf1, "WorkflowFailed") && has_event(b, &wf0, "WorkflowCompleted")
    });
    let asked: Vec<&Value> = bodies
        .iter()
        .filter(|b| s(b, "event_type") == "ActivityStarted" && s(b, "activity_id") == m2)
        .collect();
    let runs: BTreeSet<&str> = asked.iter().map(|b| s(b, "run_id")).collect();
    assert_eq!(
        (asked.len(), runs.len()),
        (4, 4),
        "wf1's activity must be asked about once in each of 4 runs (the first and 3 restarts)"
    );
    // Each run of wf1 reported its start; only the last its failure.
    let wf1_events: Vec<&str> = bodies
        .iter()
        .filter(|b| s(b, "workflow_id") == wf1 && s(b, "event_type").starts_with("Workflow"))
        .map(|b| s(b, "event_type"))
        .collect();
    assert_eq!(
        wf1_events,
        [
            "WorkflowStarted",
            "WorkflowStarted",
            "WorkflowStarted",
            "WorkflowStarted",
            "WorkflowFailed"
        ]
    );
    let failed = bodies
        .iter()
        .find(|b| s(b, "workflow_id") == wf1 && s(b, "event_type") == "WorkflowFailed")
        .unwrap();
    assert_eq!(
        failed["error"]["type"],
        json!("ApplicationError"),
        "{failed}"
    );
    assert_eq!(
        failed["error"]["cause"]["type"],
        json!("ActivityError"),
        "{failed}"
    );
    w.core()
        .validate_schema(&w.env)
        .unwrap_or_else(|e| panic!("schema: {e}"));
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
}

/// The memo's multi-agent session is on every event of wf0 (workflow events from the
/// memo, activity events through the header), `emit_handoff()` reaches Core as a Handoff
/// without run fields, and every recorded request matches the JSON Schema. wf1, started
/// without the memo key, has no session field at all.
#[test]
fn multi_agent_session_is_on_every_event_and_handoff_matches_the_schema() {
    let w = world(
        "multi_agent_session_is_on_every_event_and_handoff_matches_the_schema",
        &json!({}),
        true,
    );
    let (m0, m1, m2) = (w.marker(0), w.marker(1), w.marker(2));
    let (wf0, wf1) = (w.workflow_id(0), w.workflow_id(1));
    let session = format!("sess-{}", w.token);
    let mut plan0 = echo_plan(&w, "s", &[&m0, &m1]);
    plan0["handoff"] = json!({"session": session, "from": "did:example:planner"});
    let o = w.run(
        &[
            session_workflow(
                &wf0,
                plan0,
                Some(json!({SESSION_MEMO: session, "app": "kept"})),
            ),
            session_workflow(&wf1, echo_plan(&w, "n", &[&m2]), None),
        ],
        RUN_TIMEOUT,
    );
    for o in &o {
        assert_eq!(o["ok"], json!(true), "{o}");
    }
    let bodies = evaluated_when(&w, "both WorkflowCompleted and the Handoff", |b| {
        has_event(b, &wf0, "WorkflowCompleted")
            && has_event(b, &wf1, "WorkflowCompleted")
            && b.iter().any(|e| s(e, "event_type") == "Handoff")
    });
    let of = |wf: &str| -> Vec<&Value> {
        bodies
            .iter()
            .filter(|b| s(b, "workflow_id") == wf)
            .collect()
    };
    let events0 = of(&wf0);
    let types: Vec<&str> = events0.iter().map(|b| s(b, "event_type")).collect();
    assert_eq!(
        types,
        [
            "WorkflowStarted",
            "ActivityStarted",
            "ActivityCompleted",
            "ActivityStarted",
            "ActivityCompleted",
            "WorkflowCompleted"
        ]
    );
    for e in &events0 {
        assert_eq!(
            e["multi_agent_session_id"],
            json!(session),
            "an event of wf0 without its session: {e}"
        );
    }
    for e in of(&wf1) {
        assert!(
            e.get("multi_agent_session_id").is_none(),
            "an event of wf1 (no session in its memo) has one: {e}"
        );
    }
    let handoffs: Vec<&Value> = bodies
        .iter()
        .filter(|b| s(b, "event_type") == "Handoff")
        .collect();
    assert_eq!(handoffs.len(), 1, "{handoffs:?}");
    let h = handoffs[0];
    assert_eq!(h["from_agent_did"], json!("did:example:planner"));
    assert_eq!(h["multi_agent_session_id"], json!(session));
    assert_eq!(h["source"], json!("workflow-telemetry"));
    assert!(
        h.get("workflow_id").is_none(),
        "a Handoff carries no run fields: {h}"
    );
    w.core()
        .validate_schema(&w.env)
        .unwrap_or_else(|e| panic!("schema: {e}"));
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
}
