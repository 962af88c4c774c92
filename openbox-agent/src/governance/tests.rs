//! Governor tests against a real in-process HTTP "Core" and the embedded local policy.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde_json::{json, Value};

use super::{
    events::{self, ActivityCompletion, ActivityInfo, ActivityStatus, WorkflowInfo},
    identity::{self, Identity},
    signing::DidSigner,
    testutil::{Canned, FakeHttp, Request, TempDir},
    *,
};

const KEY: &str = "obx_test_key";

fn activity(run: &str, id: &str, activity_type: &str) -> ActivityInfo {
    ActivityInfo {
        workflow_id: "wf-1".into(),
        run_id: run.into(),
        workflow_type: "OrderWorkflow".into(),
        activity_id: id.into(),
        activity_type: activity_type.into(),
        task_queue: "q".into(),
        attempt: 1,
        multi_agent_session_id: None,
    }
}

fn workflow(run: &str) -> WorkflowInfo {
    WorkflowInfo {
        workflow_id: "wf-1".into(),
        run_id: run.into(),
        workflow_type: "OrderWorkflow".into(),
        task_queue: "q".into(),
        multi_agent_session_id: None,
    }
}

fn started(a: &ActivityInfo, input: Value) -> events::ActivityStarted {
    let Value::Array(args) = input else {
        panic!("input must be an array")
    };
    events::activity_started(a, args, SystemTime::now())
}

fn completed(a: &ActivityInfo, output: Value) -> events::ActivityCompleted {
    let now = SystemTime::now();
    events::activity_completed(
        a,
        ActivityCompletion {
            status: ActivityStatus::Completed,
            start_time: now,
            end_time: now,
            activity_input: vec![],
            activity_output: output,
            error: None,
            spans: vec![],
        },
        now,
    )
}

fn core_config(server: &FakeHttp, dir: &TempDir) -> GovernanceConfig {
    GovernanceConfig {
        openbox_url: Some(server.base_url()),
        openbox_api_key: Some(KEY.into()),
        governance_timeout: Duration::from_millis(1500),
        events_sink: None,
        spool_dir: dir.path().join("spool"),
        spool_retry_initial: Duration::from_millis(20),
        spool_retry_max: Duration::from_millis(100),
        ..GovernanceConfig::default()
    }
}

/// Validate answers 200 for the right key; evaluate/approval answers come from `f`.
fn core(
    f: impl Fn(&Request) -> Canned + Send + Sync + 'static,
) -> impl Fn(&Request) -> Canned + Send + Sync + 'static {
    move |req: &Request| {
        if req.path == client::VALIDATE_PATH {
            if req.header("authorization") == Some(&format!("Bearer {KEY}")) {
                Canned::json(200, json!({"valid": true}))
            } else {
                Canned::json(401, json!({}))
            }
        } else {
            f(req)
        }
    }
}

fn evaluated_types(server: &FakeHttp) -> Vec<String> {
    server
        .evaluated()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn embedded_block_rule_fails_the_activity_and_the_sink_gets_every_event() {
    let dir = TempDir::new("gov-embedded");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nname = \"no-wipe\"\nactivity_type = \"wipe_*\"\nverdict = \"block\"\nreason = \"wiping is not allowed\"\n",
    )
    .unwrap();
    let sink = dir.path().join("events.jsonl");
    let config = GovernanceConfig {
        policy_file: Some(policy),
        events_sink: Some(SinkTarget::File(sink.clone())),
        ..GovernanceConfig::default()
    };
    let g = Governor::new(config).await.unwrap();
    let d = g
        .activity_started(started(&activity("r", "1", "wipe_disk"), json!([])))
        .await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::GovernanceBlock,
            "Governance blocked: wiping is not allowed",
            true
        ))
    );
    let d = g
        .activity_started(started(&activity("r", "2", "read_disk"), json!([1])))
        .await;
    assert_eq!(
        d,
        Decision::Continue {
            verdict: Some(Verdict::Allow),
            constrained: false,
            redaction: None
        }
    );
    assert_eq!(
        g.workflow_event(events::workflow_started(&workflow("r"), SystemTime::now()))
            .await,
        EventDisposition::Delivered {
            verdict: Some(Verdict::Allow),
            reason: None
        }
    );
    let lines: Vec<Value> = std::fs::read_to_string(&sink)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["activity_type"], "wipe_disk");
    assert_eq!(lines[2]["event_type"], "WorkflowStarted");
    assert!(
        !g.is_core_url("http://127.0.0.1/api"),
        "no Core in embedded mode"
    );
}

#[tokio::test]
async fn embedded_approval_is_polled_on_retry_and_activity_started_is_sent_again() {
    let dir = TempDir::new("gov-approval");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nactivity_type = \"pay\"\nverdict = \"require_approval\"\nreason = \"big spend\"\n[rules.approval]\nafter_polls = 1\n",
    )
    .unwrap();
    let config = GovernanceConfig {
        policy_file: Some(policy),
        events_sink: None,
        ..GovernanceConfig::default()
    };
    let g = Governor::new(config).await.unwrap();
    let mut a = activity("r", "7", "pay");
    let d = g.activity_started(started(&a, json!([]))).await;
    assert_eq!(
        d,
        Decision::ApprovalPending {
            message: "Approval required: big spend".into()
        }
    );
    a.attempt = 2;
    let d = g.activity_started(started(&a, json!([]))).await;
    assert_eq!(
        d,
        Decision::ApprovalPending {
            message: "Awaiting approval for activity pay".into()
        }
    );
    a.attempt = 3;
    let d = g.activity_started(started(&a, json!([]))).await;
    assert_eq!(
        d,
        Decision::Continue {
            verdict: Some(Verdict::Allow),
            constrained: false,
            redaction: None
        }
    );
    // hitl disabled: REQUIRE_APPROVAL simply continues.
    let policy = dir.path().join("policy.toml");
    let config = GovernanceConfig {
        policy_file: Some(policy),
        events_sink: None,
        hitl_enabled: false,
        ..GovernanceConfig::default()
    };
    let g = Governor::new(config).await.unwrap();
    let d = g
        .activity_started(started(&activity("r", "8", "pay"), json!([])))
        .await;
    assert_eq!(
        d,
        Decision::Continue {
            verdict: Some(Verdict::RequireApproval),
            constrained: false,
            redaction: None
        }
    );
}

#[tokio::test]
async fn a_refused_api_key_or_a_wrong_url_stops_start_up() {
    let dir = TempDir::new("gov-key");
    let server = FakeHttp::start(core(|_| Canned::json(200, json!({})))).await;
    let mut config = core_config(&server, &dir);
    config.openbox_api_key = Some("obx_test_wrong".into());
    let err = Governor::new(config).await.err().unwrap();
    assert!(
        matches!(
            err,
            GovernanceError::Validate(client::ValidateError::KeyRefused { status: 401, .. })
        ),
        "{err}"
    );
    // Something that answers 404 at the validate route is not Core: a configuration error.
    let not_core = FakeHttp::start(|_| Canned::text(404, "")).await;
    let err = Governor::new(core_config(&not_core, &dir))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("cannot reach OpenBox Core at http://127.0.0.1:")
            && err.contains("HTTP 404"),
        "{err}"
    );
}

/// A port nothing listens on (yet).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 10: an agent (re)started during a Core outage used to exit, leaving its workers
/// ungoverned. It starts, applies the failure policy, and validates the key once Core
/// listens.
#[tokio::test]
async fn started_while_core_is_down_the_policy_applies_until_core_answers() {
    for policy in [FailPolicy::FailClosed, FailPolicy::FailOpen] {
        let name = policy.as_str();
        let dir = TempDir::new("gov-core-down");
        let port = closed_port();
        let config = GovernanceConfig {
            openbox_url: Some(format!("http://127.0.0.1:{port}")),
            governance_timeout: Duration::from_millis(500),
            spool_retry_initial: Duration::from_millis(20),
            spool_retry_max: Duration::from_millis(100),
            on_api_error: policy,
            ..core_config_dummy(&dir)
        };
        let g = Governor::new(config)
            .await
            .expect("starts while Core is down");
        assert!(!g.key_validated(), "{name}");
        let a = activity("r", "1", "x");
        let start = g.activity_started(started(&a, json!([]))).await;
        let end = g.activity_completed(completed(&a, json!(1))).await;
        match policy {
            FailPolicy::FailClosed => {
                for d in [&start, &end] {
                    let (t, msg, non_retryable) = d.error().expect("fail_closed halts");
                    assert_eq!(t, ErrorType::GovernanceHalt);
                    assert!(msg.contains("Governance API error"), "{msg}");
                    assert!(non_retryable);
                }
                assert_eq!(g.stats().spool_pending, 0, "fail_closed spools nothing");
            }
            FailPolicy::FailOpen => {
                assert_eq!(start, Decision::allow_without_verdict());
                assert_eq!(end, Decision::allow_without_verdict());
                assert_eq!(g.stats().spool_pending, 1, "ActivityCompleted spooled");
            }
        }

        let server = FakeHttp::start_at(
            port,
            core(|_| Canned::json(200, json!({"verdict": "allow"}))),
        )
        .await;
        wait_until("the key validated", || g.key_validated()).await;
        let validations: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| r.path == client::VALIDATE_PATH)
            .collect();
        assert_eq!(validations.len(), 1, "{name}");
        assert_eq!(
            validations[0].header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        let b = activity("r", "2", "x");
        let d = g.activity_started(started(&b, json!([]))).await;
        assert_eq!(d.error(), None, "{name}: governed again once Core answers");
        assert!(g.wait_spool_empty(Duration::from_secs(10)).await, "{name}");
        let types = evaluated_types(&server);
        assert!(
            types.contains(&"ActivityStarted".to_owned()),
            "{name}: {types:?}"
        );
        if policy == FailPolicy::FailOpen {
            assert_eq!(
                types.iter().filter(|t| *t == "ActivityCompleted").count(),
                1,
                "{name}: the spooled ActivityCompleted delivered: {types:?}"
            );
        }
        g.shutdown().await;
    }
}

fn core_config_dummy(dir: &TempDir) -> GovernanceConfig {
    GovernanceConfig {
        openbox_api_key: Some(KEY.into()),
        events_sink: None,
        spool_dir: dir.path().join("spool"),
        ..GovernanceConfig::default()
    }
}

#[tokio::test]
async fn core_verdicts_and_redactions_reach_the_decision() {
    let dir = TempDir::new("gov-core");
    let server = FakeHttp::start(core(|req| {
        let ev = req.json();
        match (ev["event_type"].as_str(), ev["activity_type"].as_str()) {
            (Some("ActivityStarted"), Some("call_llm")) => Canned::json(200, json!({"verdict": "allow",
                "guardrails_result": {"input_type": "activity_input", "redacted_input": {"prompt": "[REDACTED]"}}})),
            (Some("ActivityCompleted"), Some("call_llm")) => Canned::json(200, json!({"verdict": "constrain",
                "guardrails": {"input_type": "activity_output", "redacted_input": "[REDACTED]"}})),
            (_, Some("guarded")) => Canned::json(200, json!({"verdict": "allow",
                "guardrails_result": {"validation_passed": false, "reasons": [{"reason": "pii"}, {"reason": "toxic"}]}})),
            (_, Some("halted")) => Canned::json(200, json!({"action": "stop", "reason": "policy 9"})),
            _ => Canned::text(200, "OK"),
        }
    }))
    .await;
    let g = Governor::new(core_config(&server, &dir)).await.unwrap();
    let a = activity("r", "1", "call_llm");
    let Decision::Continue {
        redaction: Some(red),
        ..
    } = g
        .activity_started(started(&a, json!([{"prompt": "ssn 1"}, 2])))
        .await
    else {
        panic!("expected input redaction")
    };
    let mut args = vec![json!({"prompt": "ssn 1", "model": "m"}), json!(2)];
    red.apply_to_input_json(&mut args);
    assert_eq!(args[0], json!({"prompt": "[REDACTED]", "model": "m"}));
    let d = g
        .activity_completed(completed(&a, json!({"text": "secret"})))
        .await;
    assert_eq!(
        d,
        Decision::Continue {
            verdict: Some(Verdict::Constrain),
            constrained: true,
            redaction: Some(Redaction::Output {
                value: json!("[REDACTED]")
            })
        }
    );
    let d = g
        .activity_started(started(&activity("r", "2", "guarded"), json!([])))
        .await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::GuardrailsValidationFailed,
            "Guardrails validation failed: pii; toxic",
            true
        ))
    );
    let d = g
        .activity_completed(completed(&activity("r", "3", "halted"), json!(null)))
        .await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::GovernanceHalt,
            "Governance blocked: policy 9",
            true
        ))
    );
    // A non-JSON 200 is "no verdict": continue.
    let d = g
        .activity_started(started(&activity("r", "4", "other"), json!([])))
        .await;
    assert_eq!(d, Decision::allow_without_verdict());
    let req = server
        .requests()
        .into_iter()
        .find(|r| r.path == client::EVALUATE_PATH)
        .unwrap();
    assert_eq!(req.header("authorization"), Some("Bearer obx_test_key"));
    assert_eq!(req.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn fail_closed_halts_activities_on_500_timeout_and_network_errors_and_fail_open_continues() {
    let dir = TempDir::new("gov-failclosed");
    let server = FakeHttp::start(core(|req| match req.json()["activity_type"].as_str() {
        Some("slow") => {
            Canned::json(200, json!({"verdict": "allow"})).delayed(Duration::from_millis(2500))
        }
        Some("cut") => Canned::close(),
        Some("junk") => Canned::text(200, "<html>"),
        _ => Canned::text(500, "oops"),
    }))
    .await;
    let mut config = core_config(&server, &dir);
    config.governance_timeout = Duration::from_millis(300);
    config.on_api_error = FailPolicy::FailClosed;
    let g = Governor::new(config).await.unwrap();
    let d = g
        .activity_started(started(&activity("r", "1", "x"), json!([])))
        .await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::GovernanceHalt,
            "Governance blocked: Governance API error: HTTP 500",
            true
        ))
    );
    let d = g
        .activity_started(started(&activity("r", "2", "slow"), json!([])))
        .await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::GovernanceHalt,
            "Governance blocked: Governance API error: timed out",
            true
        ))
    );
    let d = g
        .activity_completed(completed(&activity("r", "3", "cut"), json!(1)))
        .await;
    let (t, msg, _) = d.error().unwrap();
    assert_eq!(t, ErrorType::GovernanceHalt);
    assert!(
        msg.starts_with("Governance blocked: Governance API error: "),
        "{msg}"
    );
    let d = g
        .activity_started(started(&activity("r", "4", "junk"), json!([])))
        .await;
    assert_eq!(
        d,
        Decision::allow_without_verdict(),
        "non-JSON continues under fail_closed too"
    );
    assert_eq!(
        g.stats().spool_pending,
        0,
        "fail_closed never spools ActivityCompleted"
    );
    drop(g);

    let dir = TempDir::new("gov-failopen");
    let mut config = core_config(&server, &dir);
    config.governance_timeout = Duration::from_millis(300);
    let g = Governor::new(config).await.unwrap();
    for t in ["x", "slow", "cut"] {
        assert_eq!(
            g.activity_started(started(&activity("r", "1", t), json!([])))
                .await,
            Decision::allow_without_verdict(),
            "{t}"
        );
    }
}

#[tokio::test]
async fn spooled_events_are_delivered_in_order_and_new_ones_queue_behind_them() {
    let dir = TempDir::new("gov-spool");
    let server = FakeHttp::start(core(|_| Canned::text(503, "down"))).await;
    let g = Governor::new(core_config(&server, &dir)).await.unwrap();
    let wf = workflow("r");
    assert_eq!(
        g.workflow_event(events::workflow_started(&wf, SystemTime::now()))
            .await,
        EventDisposition::Spooled
    );
    let d = g
        .activity_completed(completed(&activity("r", "1", "a"), json!("out")))
        .await;
    assert_eq!(
        d,
        Decision::allow_without_verdict(),
        "fail_open: no verdict, continue"
    );
    assert_eq!(
        g.signal(events::signal_received(
            &wf,
            "go",
            vec![],
            SystemTime::now()
        ))
        .await,
        EventDisposition::Spooled
    );
    assert_eq!(g.stats().spool_pending, 3);

    let delivered = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = delivered.clone();
    server.set_handler(core(move |req| {
        log.lock()
            .unwrap()
            .push(req.json()["event_type"].as_str().unwrap_or("").to_owned());
        Canned::json(200, json!({"verdict": "allow"}))
    }));
    // Sent right after Core comes back, before the backlog drained: must go behind it.
    let d = g
        .workflow_event(events::workflow_completed(
            &wf,
            json!(null),
            SystemTime::now(),
        ))
        .await;
    assert!(
        matches!(
            d,
            EventDisposition::Spooled | EventDisposition::Delivered { .. }
        ),
        "{d:?}"
    );
    assert!(g.wait_spool_empty(Duration::from_secs(10)).await);
    assert_eq!(
        *delivered.lock().unwrap(),
        [
            "WorkflowStarted",
            "ActivityCompleted",
            "SignalReceived",
            "WorkflowCompleted"
        ]
    );
    let stats = g.stats();
    assert_eq!(stats.spool_pending, 0);
    assert!(stats.delivered_from_spool >= 3, "{stats:?}");
    // Only the first event was tried: the others queued behind it without a call.
    assert_eq!(stats.core_failures, 1, "{stats:?}");
}

#[tokio::test]
async fn the_spool_survives_a_restart_and_is_delivered_by_the_next_governor() {
    let dir = TempDir::new("gov-restart");
    let server = FakeHttp::start(core(|_| Canned::close())).await;
    let g = Governor::new(core_config(&server, &dir)).await.unwrap();
    for run in ["r1", "r2"] {
        assert_eq!(
            g.workflow_event(events::workflow_started(&workflow(run), SystemTime::now()))
                .await,
            EventDisposition::Spooled
        );
    }
    assert_eq!(g.stats().spool_pending, 2);
    g.shutdown().await;
    server.set_handler(core(|_| Canned::json(200, json!({"verdict": "allow"}))));
    let before = server.evaluated().len();
    let g = Governor::new(core_config(&server, &dir)).await.unwrap();
    assert!(g.wait_spool_empty(Duration::from_secs(10)).await);
    let runs: Vec<Value> = server.evaluated()[before..]
        .iter()
        .map(|e| e["run_id"].clone())
        .collect();
    assert_eq!(runs, [json!("r1"), json!("r2")]);
}

#[tokio::test]
async fn core_refusing_an_event_with_a_4xx_drops_it_loudly_instead_of_retrying_forever() {
    let dir = TempDir::new("gov-4xx");
    let server = FakeHttp::start(core(|_| Canned::text(422, "bad event"))).await;
    let g = Governor::new(core_config(&server, &dir)).await.unwrap();
    let d = g
        .workflow_event(events::workflow_started(&workflow("r"), SystemTime::now()))
        .await;
    assert_eq!(d, EventDisposition::Dropped);
    assert_eq!(g.stats().rejected_by_core, 1);
    assert_eq!(g.stats().spool_pending, 0);
}

#[tokio::test]
async fn a_signal_block_is_enforced_at_the_next_activity_of_that_run_only() {
    let dir = TempDir::new("gov-signal");
    let server = FakeHttp::start(core(|req| match req.json()["signal_name"].as_str() {
        Some("cancel") => Canned::json(
            200,
            json!({"verdict": "block", "reason": "cancelled by policy"}),
        ),
        _ => Canned::json(200, json!({"verdict": "allow"})),
    }))
    .await;
    let mut config = core_config(&server, &dir);
    config.skip_signals = ["heartbeat".to_owned()].into();
    let g = Governor::new(config).await.unwrap();
    let wf = workflow("r1");
    assert_eq!(
        g.signal(events::signal_received(
            &wf,
            "heartbeat",
            vec![],
            SystemTime::now()
        ))
        .await,
        EventDisposition::Skipped
    );
    assert!(
        server.evaluated().is_empty(),
        "skipped signals are not sent"
    );
    let d = g
        .signal(events::signal_received(
            &wf,
            "cancel",
            vec![json!(1)],
            SystemTime::now(),
        ))
        .await;
    assert_eq!(
        d,
        EventDisposition::Delivered {
            verdict: Some(Verdict::Block),
            reason: Some("cancelled by policy".into())
        }
    );
    let d = g
        .activity_started(started(&activity("r1", "5", "any"), json!([])))
        .await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::GovernanceBlock,
            "Governance blocked: cancelled by policy",
            true
        ))
    );
    let d = g
        .activity_started(started(&activity("r2", "5", "any"), json!([])))
        .await;
    assert_eq!(d.error(), None, "another run is not affected");
    // The run's end clears what was stored for it.
    g.workflow_event(events::workflow_failed(
        &wf,
        events::workflow_error("ActivityError", "x", None, None),
        SystemTime::now(),
    ))
    .await;
    assert_eq!(
        g.activity_started(started(&activity("r1", "6", "any"), json!([])))
            .await
            .error(),
        None
    );
}

#[tokio::test]
async fn fail_closed_workflow_event_failures_halt_the_run_at_its_next_activity() {
    let dir = TempDir::new("gov-wf-closed");
    let server = FakeHttp::start(core(|req| match req.json()["event_type"].as_str() {
        Some("WorkflowStarted") => Canned::text(502, ""),
        _ => Canned::json(200, json!({"verdict": "allow"})),
    }))
    .await;
    let mut config = core_config(&server, &dir);
    config.on_api_error = FailPolicy::FailClosed;
    config.spool_retry_initial = Duration::from_secs(5);
    let g = Governor::new(config).await.unwrap();
    assert_eq!(
        g.workflow_event(events::workflow_started(&workflow("r"), SystemTime::now()))
            .await,
        EventDisposition::Spooled
    );
    let d = g
        .activity_started(started(&activity("r", "1", "a"), json!([])))
        .await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::GovernanceHalt,
            "Governance blocked: Governance API error: HTTP 502",
            true
        ))
    );
}

#[tokio::test]
async fn skip_lists_and_send_flags_are_honoured() {
    let dir = TempDir::new("gov-skip");
    let server = FakeHttp::start(core(|_| Canned::json(200, json!({"verdict": "block"})))).await;
    let mut config = core_config(&server, &dir);
    config.send_start_event = false;
    config.send_activity_start_event = false;
    config.skip_workflow_types = ["Noisy".to_owned()].into();
    let g = Governor::new(config).await.unwrap();
    let d = g
        .activity_started(started(
            &activity("r", "1", "send_governance_event"),
            json!([]),
        ))
        .await;
    assert_eq!(d, Decision::allow_without_verdict());
    let d = g
        .activity_completed(completed(
            &activity("r", "1", "send_governance_event"),
            json!(1),
        ))
        .await;
    assert_eq!(d, Decision::allow_without_verdict());
    let d = g
        .activity_started(started(&activity("r", "2", "work"), json!([])))
        .await;
    assert_eq!(
        d,
        Decision::allow_without_verdict(),
        "send_activity_start_event = false"
    );
    assert_eq!(
        g.workflow_event(events::workflow_started(&workflow("r"), SystemTime::now()))
            .await,
        EventDisposition::Skipped
    );
    let noisy = WorkflowInfo {
        workflow_type: "Noisy".into(),
        ..workflow("r")
    };
    assert_eq!(
        g.workflow_event(events::workflow_completed(
            &noisy,
            json!(1),
            SystemTime::now()
        ))
        .await,
        EventDisposition::Skipped
    );
    assert_eq!(
        g.signal(events::signal_received(
            &noisy,
            "s",
            vec![],
            SystemTime::now()
        ))
        .await,
        EventDisposition::Skipped
    );
    assert!(
        server.evaluated().is_empty(),
        "{:?}",
        evaluated_types(&server)
    );
    // Activities of a skipped workflow type are still governed.
    let a = ActivityInfo {
        workflow_type: "Noisy".into(),
        ..activity("r", "3", "work")
    };
    assert_eq!(
        g.activity_completed(completed(&a, json!(1)))
            .await
            .error()
            .unwrap()
            .0,
        ErrorType::GovernanceBlock
    );
    assert_eq!(evaluated_types(&server), ["ActivityCompleted"]);
}

#[tokio::test]
async fn core_approval_polls_cover_failure_pending_rejection_expiry_and_approval() {
    let dir = TempDir::new("gov-core-approval");
    let answers: Arc<Mutex<VecDeque<Canned>>> = Arc::new(Mutex::new(VecDeque::from([
        Canned::text(500, ""),
        Canned::json(200, json!({"verdict": "require_approval"})),
        Canned::json(200, json!({"verdict": "allow"})),
    ])));
    let next = answers.clone();
    let approved = Arc::new(Mutex::new(false));
    let flag = approved.clone();
    let server = FakeHttp::start(core(move |req| {
        if req.path == client::APPROVAL_PATH {
            let a = next
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| Canned::json(200, json!({})));
            if a.status() == 200 {
                *flag.lock().unwrap() = true;
            }
            return a;
        }
        match req.json()["activity_type"].as_str() {
            Some("pay") if !*flag.lock().unwrap() => Canned::json(
                200,
                json!({"verdict": "require-approval", "reason": "money"}),
            ),
            Some("export") => Canned::json(200, json!({"verdict": "require_approval"})),
            _ => Canned::json(200, json!({"verdict": "allow"})),
        }
    }))
    .await;
    let g = Governor::new(core_config(&server, &dir)).await.unwrap();
    let a = activity("r", "9", "pay");
    assert_eq!(
        g.activity_started(started(&a, json!([]))).await,
        Decision::ApprovalPending {
            message: "Approval required: money".into()
        }
    );
    assert_eq!(
        g.activity_started(started(&a, json!([]))).await,
        Decision::ApprovalPending {
            message: "Failed to check approval status, retrying...".into()
        }
    );
    assert_eq!(
        g.activity_started(started(&a, json!([]))).await,
        Decision::ApprovalPending {
            message: "Awaiting approval for activity pay".into()
        }
    );
    let d = g.activity_started(started(&a, json!([]))).await;
    assert_eq!(
        d.error(),
        None,
        "approved, and the re-sent ActivityStarted is allowed: {d:?}"
    );
    let approval = server
        .requests()
        .into_iter()
        .find(|r| r.path == client::APPROVAL_PATH)
        .unwrap();
    assert_eq!(
        approval.json(),
        json!({"workflow_id": "wf-1", "run_id": "r", "activity_id": "9"})
    );
    let starts = server
        .evaluated()
        .iter()
        .filter(|e| e["activity_id"] == "9")
        .count();
    assert_eq!(
        starts, 2,
        "ActivityStarted sent, then re-sent after approval"
    );

    // Approval requested after completion, then rejected on the retry.
    let e = activity("r", "10", "export");
    let d = g.activity_completed(completed(&e, json!(1))).await;
    assert_eq!(
        d,
        Decision::ApprovalPending {
            message: "Approval required for output: Activity output requires human approval".into()
        }
    );
    answers.lock().unwrap().push_back(Canned::json(
        200,
        json!({"verdict": "halt", "reason": "no export"}),
    ));
    assert_eq!(
        g.activity_started(started(&e, json!([]))).await.error(),
        Some((
            ErrorType::ApprovalRejected,
            "Activity rejected: no export",
            true
        ))
    );

    // Expired.
    let x = activity("r", "11", "export");
    g.activity_started(started(&x, json!([]))).await;
    answers.lock().unwrap().push_back(Canned::json(
        200,
        json!({"verdict": "allow", "approval_expiration_time": "2020-01-01 00:00:00"}),
    ));
    let d = g.activity_started(started(&x, json!([]))).await;
    assert_eq!(
        d.error(),
        Some((
            ErrorType::ApprovalExpired,
            "Approval expired for activity export (workflow_id=wf-1, run_id=r, activity_id=11)",
            true
        ))
    );
}

#[tokio::test]
async fn core_urls_are_recognised_by_normalised_prefix() {
    let p = core_url_prefix("HTTPS://Core.Example.com/").unwrap();
    assert_eq!(p, "https://core.example.com:443");
    assert!(is_core_url(
        &p,
        "https://core.example.com/api/v1/governance/evaluate"
    ));
    assert!(is_core_url(&p, "https://CORE.example.com:443/x"));
    assert!(is_core_url(&p, "https://core.example.com"));
    assert!(
        !is_core_url(&p, "http://core.example.com/api"),
        "other scheme"
    );
    assert!(
        !is_core_url(&p, "https://core.example.com:8443/api"),
        "other port"
    );
    assert!(!is_core_url(&p, "https://core.example.com.evil.net/api"));
    assert!(!is_core_url(&p, "not a url"));
    let p = core_url_prefix("http://localhost:8086/openbox").unwrap();
    assert!(is_core_url(&p, "http://localhost:8086/openbox/api/v1/x"));
    assert!(!is_core_url(&p, "http://localhost:8086/openboxer"));
    assert!(!is_core_url(&p, "http://localhost:8086/"));

    let dir = TempDir::new("gov-coreurl");
    let server = FakeHttp::start(core(|_| Canned::json(200, json!({})))).await;
    let g = Governor::new(core_config(&server, &dir)).await.unwrap();
    assert!(g.is_core_url(&format!(
        "http://127.0.0.1:{}/api/v1/governance/evaluate",
        server.port()
    )));
    assert!(!g.is_core_url("http://127.0.0.1:1/api"));
}

/// The repository's `tests/fake_core` directory.
fn fake_core_dir() -> Option<std::path::PathBuf> {
    let from_manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fake_core");
    let from_source = std::path::Path::new(file!())
        .ancestors()
        .nth(4)
        .map(|root| root.join("tests/fake_core"));
    [Some(from_manifest), from_source]
        .into_iter()
        .flatten()
        .find(|d| d.join("fake_core.py").is_file())
}

/// A fake_core.py process, killed on drop.
struct FakeCoreProcess {
    child: std::process::Child,
    port: u16,
}

impl Drop for FakeCoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_fake_core(
    dir: &std::path::Path,
    record: &std::path::Path,
    script: &std::path::Path,
    extra: &[String],
) -> Option<FakeCoreProcess> {
    use std::io::BufRead;
    let mut child = std::process::Command::new("python3")
        .arg(dir.join("fake_core.py"))
        .args(["--port", "0", "--api-key", KEY, "--record"])
        .arg(record)
        .arg("--script")
        .arg(script)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take()?)
        .read_line(&mut line)
        .ok()?;
    let port = line.trim().strip_prefix("listening on ")?.parse().ok()?;
    Some(FakeCoreProcess { child, port })
}

const TEST_DID: &str = "did:aip:0f8e2c1a-6b7d-4e3f-9a21-5c4d3b2a1f00";

/// A signer with a fixed test seed, and the fake Core flags that register its identity.
fn test_signer(seed: u8) -> (Arc<Identity>, Vec<String>) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let signer = DidSigner::new(TEST_DID, &b64.encode([seed; 32])).unwrap();
    let flags = vec![
        "--agent-did".to_owned(),
        TEST_DID.to_owned(),
        "--agent-public-key".to_owned(),
        b64.encode(signer.public_key()),
    ];
    (Arc::new(Identity::Did(signer)), flags)
}

#[tokio::test]
async fn events_sent_to_the_python_fake_core_match_the_schema_under_sdk_1_0_conventions() {
    events_reach_the_python_fake_core(Conventions::V1, false).await;
}

#[tokio::test]
async fn events_sent_to_the_python_fake_core_match_the_schema_under_sdk_2_0_conventions() {
    events_reach_the_python_fake_core(Conventions::V2, false).await;
}

#[tokio::test]
async fn signed_events_are_verified_by_the_python_fake_core_under_both_conventions() {
    events_reach_the_python_fake_core(Conventions::V1, true).await;
    events_reach_the_python_fake_core(Conventions::V2, true).await;
}

/// The same workflow's events through a real Core client to fake_core.py, recorded and
/// checked against the JSON Schema; `signed`: the fake Core requires (and verifies) the
/// agent's DID signature on every request.
async fn events_reach_the_python_fake_core(conventions: Conventions, signed: bool) {
    let Some(fc_dir) = fake_core_dir() else {
        eprintln!("skipped: tests/fake_core not found");
        return;
    };
    let dir = TempDir::new("gov-e2e");
    let record = dir.path().join("requests.jsonl");
    let script = dir.path().join("script.json");
    std::fs::write(
        &script,
        json!({
            "rules": [
                {"match": {"event_type": "ActivityStarted", "activity_type": "pay"}, "body": {"verdict": "require_approval", "reason": "money"}, "times": 1},
                {"match": {"activity_type": "wipe"}, "body": {"verdict": "block", "reason": "no wiping"}}
            ],
            "approvals": [{"match": {"activity_id": "2"}, "responses": [{"body": {"verdict": "require_approval"}}, {"body": {"verdict": "allow"}}]}]
        })
        .to_string(),
    )
    .unwrap();
    let (signer, identity_flags) = test_signer(11);
    let extra = if signed { identity_flags } else { vec![] };
    let Some(fc) = start_fake_core(&fc_dir, &record, &script, &extra) else {
        eprintln!("skipped: python3 could not start fake_core.py");
        return;
    };
    let base = format!("http://127.0.0.1:{}", fc.port);
    let config = GovernanceConfig {
        openbox_url: Some(base.clone()),
        openbox_api_key: Some(KEY.into()),
        events_sink: None,
        spool_dir: dir.path().join("spool"),
        spool_retry_initial: Duration::from_millis(50),
        spool_retry_max: Duration::from_millis(200),
        sdk_conventions: conventions,
        identity: signed.then_some(signer),
        ..GovernanceConfig::default()
    };
    let g = Governor::new(config).await.unwrap();
    let wf = workflow("r-e2e");
    let mut wf_started = events::workflow_started(&wf, SystemTime::now());
    // The hook sends the workflow's arguments; 2.0 forwards them, 1.0 leaves them out
    // (the schema requires the one and refuses the other).
    wf_started.activity_input = Some(vec![json!({"order": "tea"})]);
    g.workflow_event(wf_started).await;
    let a = activity("r-e2e", "1", "call_llm");
    assert_eq!(
        g.activity_started(started(&a, json!([{"prompt": "hi"}])))
            .await
            .error(),
        None
    );
    let now = SystemTime::now();
    let mut span = testutil::span(
        "POST",
        json!({"http.method": "POST", "http.url": "https://api.example.com/v1/chat"}),
    );
    span.span_id = "00f067aa0ba902b7".into();
    span.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736".into();
    span.start_time = 1_736_937_045_100_000_000;
    span.end_time = 1_736_937_045_200_000_000;
    span.duration_ns = Some(100_000_000);
    span.activity_id = Some("1".into());
    span.request_body = Some("{\"prompt\":\"héllo\"}".into());
    if conventions == Conventions::V2 {
        // Under 2.0 the span goes out as its two hook events (§3.2), not in
        // ActivityCompleted.
        for stage in super::hook_events::stages(&span, "00f067aa0ba902b8", 65_536).unwrap() {
            let hook = events::hook_event(&a, vec![json!({"prompt": "hi"})], stage, None, now);
            assert_eq!(g.hook_event_as(hook, g.default_style()).await, None);
        }
    }
    let c = events::activity_completed(
        &a,
        ActivityCompletion {
            status: ActivityStatus::Completed,
            start_time: now,
            end_time: now + Duration::from_millis(5),
            activity_input: vec![json!({"prompt": "hi"})],
            activity_output: json!({"text": "hello"}),
            error: None,
            spans: vec![span],
        },
        SystemTime::now(),
    );
    assert_eq!(g.activity_completed(c).await.error(), None);
    g.signal(events::signal_received(
        &wf,
        "nudge",
        vec![json!({"x": 1})],
        SystemTime::now(),
    ))
    .await;
    let mut p = activity("r-e2e", "2", "pay");
    assert!(matches!(
        g.activity_started(started(&p, json!([5]))).await,
        Decision::ApprovalPending { .. }
    ));
    p.attempt = 2;
    assert!(matches!(
        g.activity_started(started(&p, json!([5]))).await,
        Decision::ApprovalPending { .. }
    ));
    p.attempt = 3;
    assert_eq!(
        g.activity_started(started(&p, json!([5]))).await.error(),
        None,
        "approved on the second poll"
    );
    let w = activity("r-e2e", "3", "wipe");
    assert_eq!(
        g.activity_started(started(&w, json!([])))
            .await
            .error()
            .unwrap()
            .0,
        ErrorType::GovernanceBlock
    );
    let failed = events::activity_completed(
        &w,
        ActivityCompletion {
            status: ActivityStatus::Failed,
            start_time: now,
            end_time: now,
            activity_input: vec![],
            activity_output: json!(null),
            error: Some(events::ActivityError {
                kind: "ApplicationError".into(),
                message: "Governance blocked: no wiping".into(),
            }),
            spans: vec![],
        },
        SystemTime::now(),
    );
    g.activity_completed(failed).await;

    // Core goes down: the workflow's end is spooled, then delivered when it is back.
    let control = reqwest::Client::new();
    control
        .post(format!("{base}/_control"))
        .body(r#"{"down":"close"}"#)
        .send()
        .await
        .unwrap();
    let cause = events::ErrorLink {
        kind: "ApplicationError".into(),
        message: "Governance blocked: no wiping".into(),
        error_type: Some("GovernanceBlock".into()),
        non_retryable: Some(true),
    };
    let error = events::workflow_error("ActivityError", "Activity task failed", Some(&cause), None);
    assert_eq!(
        g.workflow_event(events::workflow_failed(&wf, error, SystemTime::now()))
            .await,
        EventDisposition::Spooled
    );
    control
        .post(format!("{base}/_control"))
        .body(r#"{"down":false}"#)
        .send()
        .await
        .unwrap();
    assert!(g.wait_spool_empty(Duration::from_secs(10)).await);
    drop(g);
    drop(fc);

    let lines: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let answered: Vec<&Value> = lines.iter().filter(|l| l["status"] != 0).collect();
    let kinds: Vec<String> = answered
        .iter()
        .map(|l| {
            l["body"]["event_type"]
                .as_str()
                .map_or_else(|| l["path"].as_str().unwrap().to_owned(), str::to_owned)
        })
        .collect();
    let mut expected = vec![
        "/api/v1/auth/validate",
        "WorkflowStarted",
        "ActivityStarted",
        "ActivityCompleted",
        "SignalReceived",
        "ActivityStarted",
        "/api/v1/governance/approval",
        "/api/v1/governance/approval",
        "ActivityStarted",
        "ActivityStarted",
        "ActivityCompleted",
        "WorkflowFailed",
    ];
    if conventions == Conventions::V2 {
        // SDK 2.0 sends no ActivityCompleted for the failed (blocked) activity, and the
        // first activity's span as its started and completed hook events.
        expected.remove(10);
        expected.insert(3, "ActivityStarted");
        expected.insert(3, "ActivityStarted");
    }
    assert_eq!(kinds, expected, "{conventions} signed={signed}");
    for l in &answered {
        let h = &l["headers"];
        assert_eq!(l["status"], 200, "refused: {l}");
        match conventions {
            Conventions::V1 => {
                assert_eq!(h["content-type"], "application/json", "{l}");
                assert!(h.get("x-openbox-sdk-version").is_none(), "{l}");
            }
            Conventions::V2 => {
                // SDK 2.0's hook events come from its hook runtime's client, which names
                // the base library (no Okta identity here); the rest name SDK 2.0.
                let sdk = if l["body"]["hook_trigger"] == true {
                    "openbox-base-python-v1.4.0"
                } else {
                    "openbox-temporal-python-v2.0.0"
                };
                assert_eq!(h["x-openbox-sdk-version"], sdk, "{l}");
                assert_eq!(
                    h["user-agent"].as_str().unwrap_or("").split(' ').next(),
                    Some(format!("OpenBox-SDK/{sdk}").as_str()),
                    "{l}"
                );
                let is_get = l["method"] == "GET";
                assert_eq!(h.get("content-type").is_some(), is_get, "{l}");
            }
        }
        if signed {
            assert_eq!(l["signature"], "ok", "{l}");
            assert_eq!(h["x-openbox-agent-did"], TEST_DID);
        } else {
            assert!(h.get("x-openbox-agent-signature").is_none(), "{l}");
        }
    }
    // The span's non-ASCII body: escaped as Python does under 2.0, UTF-8 under 1.0 —
    // the parsed body is the same either way.
    let completed = answered
        .iter()
        .find(|l| l["body"]["event_type"] == "ActivityCompleted")
        .unwrap();
    let span = match conventions {
        Conventions::V1 => &completed["body"]["spans"][0],
        Conventions::V2 => {
            assert_eq!(
                completed["body"]["spans"],
                json!([]),
                "2.0: spans went as hook events"
            );
            assert_eq!(completed["body"]["span_count"], 0);
            let hook = answered
                .iter()
                .find(|l| {
                    l["body"]["hook_trigger"] == true
                        && l["body"]["spans"][0]["stage"] == "completed"
                })
                .expect("the completed hook event");
            &hook["body"]["spans"][0]
        }
    };
    assert_eq!(span["request_body"], "{\"prompt\":\"héllo\"}");
    let out = std::process::Command::new("python3")
        .arg(fc_dir.join("validate.py"))
        .arg(&record)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schema validation failed:\n{report}");
}

/// What Core does with requests that are not signed by the registered identity: a
/// missing signature, another key, a body changed after signing and a replayed nonce are
/// each refused with 401 and the reason code; the agent's start-up says which.
#[tokio::test]
async fn the_python_fake_core_refuses_unsigned_tampered_and_replayed_requests() {
    let Some(fc_dir) = fake_core_dir() else {
        eprintln!("skipped: tests/fake_core not found");
        return;
    };
    let dir = TempDir::new("gov-signed");
    let record = dir.path().join("requests.jsonl");
    let script = dir.path().join("script.json");
    std::fs::write(&script, "{}").unwrap();
    let (signer, flags) = test_signer(21);
    let Some(fc) = start_fake_core(&fc_dir, &record, &script, &flags) else {
        eprintln!("skipped: python3 could not start fake_core.py");
        return;
    };
    let base = format!("http://127.0.0.1:{}", fc.port);
    let client = |signer: Option<Arc<Identity>>| {
        CoreClient::new(&base, KEY, Duration::from_secs(5), None)
            .unwrap()
            .with_identity(signer, Conventions::V2)
    };
    client(Some(signer.clone())).validate().await.unwrap();

    let err = client(None).validate().await.unwrap_err();
    assert!(
        matches!(err, client::ValidateError::KeyRefused { status: 401, .. }),
        "unsigned: {err}"
    );
    let (other, _) = test_signer(22);
    let err = client(Some(other))
        .validate()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refused this agent's signed identity (HTTP 401, signature_invalid")
            && err.contains(TEST_DID),
        "another key: {err}"
    );

    // Signed for one body, sent with another; then the genuine request twice.
    let path = client::EVALUATE_PATH;
    let body = br#"{"source":"workflow-telemetry","event_type":"ActivityStarted"}"#.to_vec();
    let Identity::Did(did_signer) = &*signer else {
        unreachable!("test_signer makes DID identities")
    };
    let headers = did_signer.headers("POST", path, &body);
    let send = |body: Vec<u8>| {
        let mut req = reqwest::Client::new()
            .post(format!("{base}{path}"))
            .bearer_auth(KEY)
            .body(body);
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        req.send()
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, client::reason_code(&r.bytes().await.unwrap()))
    };
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let out = answer(send(tampered).await.unwrap()).await;
    assert_eq!(
        out,
        (401, Some("signature_invalid".into())),
        "tampered body"
    );
    let out = answer(send(body.clone()).await.unwrap()).await;
    assert_eq!(out.0, 200, "the genuine request");
    let out = answer(send(body).await.unwrap()).await;
    assert_eq!(out, (401, Some("nonce_replayed".into())), "replayed");
    // fake_core.py records a request just after answering it (a refused signature just
    // before): wait for all six.
    for _ in 0..100 {
        let lines = std::fs::read_to_string(&record).unwrap_or_default();
        if lines.lines().count() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(fc);
    // The server answers on one thread per request and records each just after
    // answering, so the record's order may differ from the order sent (the answers
    // above were checked in order); the record is compared as a multiset.
    let mut reasons: Vec<String> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["signature"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "nonce_replayed",
            "ok",
            "ok",
            "signature_invalid",
            "signature_invalid",
            "signature_invalid",
        ]
    );
}

#[test]
fn the_schema_validator_passes_its_self_test() {
    let Some(fc_dir) = fake_core_dir() else {
        eprintln!("skipped: tests/fake_core not found");
        return;
    };
    let Ok(out) = std::process::Command::new("python3")
        .arg(fc_dir.join("validate.py"))
        .arg("--self-test")
        .output()
    else {
        eprintln!("skipped: no python3");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The daemon spawns these futures on a multi-threaded runtime: they must be Send, and
/// the governor shareable.
#[expect(dead_code, reason = "compile-time check only")]
fn governor_futures_are_send(g: &'static Governor) {
    fn is_send<T: Send>(_: T) {}
    fn is_sync<T: Send + Sync>() {}
    is_sync::<Governor>();
    let a = events::ActivityInfo::default();
    let wf = events::WorkflowInfo::default();
    let now = SystemTime::now();
    is_send(g.activity_started(events::activity_started(&a, vec![], now)));
    is_send(g.activity_completed(completed(&a, Value::Null)));
    is_send(g.workflow_event(events::workflow_started(&wf, now)));
    is_send(g.signal(events::signal_received(&wf, "s", vec![], now)));
    is_send(g.wait_spool_empty(Duration::ZERO));
}

/// The ids fake_core.py registers its Okta agent with (OKTA_IDS there).
fn fake_core_okta_ids() -> identity::OktaIds {
    identity::OktaIds {
        openbox_agent_id: "obx-agent-e2e".into(),
        organization_id: "obx-org-e2e".into(),
        deployment_id: "obx-deployment-e2e".into(),
        okta_agent_id: "wlp-okta-e2e".into(),
        key_id: "okta-kid-e2e".into(),
        audience: "https://core.openbox.test/agent-proof".into(),
    }
}

/// fake_core.py's record lines, once there are at least `n` (it writes a line just after
/// answering, so the last answer can come before its line).
fn recorded_at_least(path: &std::path::Path, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= n || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn okta(pem: &str, ids: Option<identity::OktaIds>) -> Arc<Identity> {
    Arc::new(Identity::Okta {
        key: identity::RsaKey::from_pem(pem, "okta_agent_private_key").unwrap(),
        ids,
    })
}

/// fake_core.py for an identity test: a test directory, the RSA keys named made in it
/// (their PEM text in that order), the first given to Core with `key_flag`, and what
/// Core records of each request.
struct IdentityCore<const N: usize> {
    dir: TempDir,
    pems: [String; N],
    record: std::path::PathBuf,
    fc: FakeCoreProcess,
}

/// The set-up of [`IdentityCore`]; None, the reason printed, when the test cannot run
/// here.
fn identity_core<const N: usize>(
    label: &str,
    key_flag: &str,
    keys: [&str; N],
    script: &str,
) -> Option<IdentityCore<N>> {
    let Some(fc_dir) = fake_core_dir() else {
        eprintln!("skipped: tests/fake_core not found");
        return None;
    };
    let dir = TempDir::new(label);
    let made: Option<Vec<_>> = keys
        .iter()
        .map(|name| openbox_testkit::rsa_key(dir.path(), name).ok())
        .collect();
    let Some(made) = made else {
        eprintln!("skipped: openssl cannot make test keys");
        return None;
    };
    let record = dir.path().join("requests.jsonl");
    let script_file = dir.path().join("script.json");
    std::fs::write(&script_file, script).unwrap();
    let flags = vec![key_flag.to_owned(), made[0].0.display().to_string()];
    let Some(fc) = start_fake_core(&fc_dir, &record, &script_file, &flags) else {
        eprintln!("skipped: python3 could not start fake_core.py");
        return None;
    };
    let pems = made.into_iter().map(|(_, pem)| pem).collect::<Vec<_>>();
    Some(IdentityCore {
        dir,
        pems: pems.try_into().ok()?,
        record,
        fc,
    })
}

/// Okta AI agent mode against fake_core.py verifying RS256 assertions: the explicit set
/// and bootstrap mode are accepted on the /api/v2 routes; another key is refused (at
/// bootstrap by its thumbprint, with the explicit set by Core's signature check);
/// a request whose body differs from the one signed, and an assertion sent twice, are
/// refused with their reason codes; Core's 401 on evaluate is a hard error.
#[tokio::test]
async fn okta_identity_signs_v2_requests_that_the_python_fake_core_verifies() {
    let Some(IdentityCore {
        // Bound: the directory (with the record) lives until the test ends.
        dir: _dir,
        pems: [pem, other_pem],
        record,
        fc,
    }) = identity_core("gov-okta", "--okta-key-file", ["okta", "other"], "{}")
    else {
        return;
    };
    let base = format!("http://127.0.0.1:{}", fc.port);
    let client = |id: Arc<Identity>| {
        CoreClient::new(&base, KEY, Duration::from_secs(5), None)
            .unwrap()
            .with_identity(Some(id), Conventions::V2)
    };
    let body = |n: u32| {
        format!(r#"{{"source":"workflow-telemetry","event_type":"ActivityStarted","n":{n}}}"#)
            .into_bytes()
    };

    let explicit = client(okta(&pem, Some(fake_core_okta_ids())));
    explicit.validate().await.unwrap();
    assert!(matches!(
        explicit.evaluate(body(1)).await,
        CoreOutcome::Ok(_)
    ));
    let bootstrap = client(okta(&pem, None));
    bootstrap.validate().await.unwrap();
    assert!(matches!(
        bootstrap.approval("wf", "run", "1").await,
        CoreOutcome::Ok(_)
    ));
    let seen: Vec<(String, String, String)> = recorded_at_least(&record, 5)
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap_or("").to_owned(),
                r["path"].as_str().unwrap_or("").to_owned(),
                r["identity"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    let want = |m: &str, p: &str, i: &str| (m.to_owned(), p.to_owned(), i.to_owned());
    assert_eq!(
        seen,
        vec![
            want("GET", "/api/v2/auth/validate", "ok"),
            want("POST", "/api/v2/governance/evaluate", "ok"),
            want("GET", "/api/v2/auth/bootstrap", "-"),
            want("GET", "/api/v2/auth/validate", "ok"),
            want("POST", "/api/v2/governance/approval", "ok"),
        ]
    );

    let e = client(okta(&other_pem, None))
        .validate()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not match the selected Okta credential"),
        "bootstrap with another key: {e}"
    );
    let wrong = client(okta(&other_pem, Some(fake_core_okta_ids())));
    let e = wrong.validate().await.unwrap_err().to_string();
    assert!(
        e.contains("refused this agent's identity: OpenBox Core refused the Okta AI agent wlp-okta-e2e (key id okta-kid-e2e) (HTTP 401, signature_invalid)"),
        "explicit set with another key: {e}"
    );
    match wrong.evaluate(body(2)).await {
        CoreOutcome::AuthRefused(m) => assert!(m.contains("signature_invalid"), "{m}"),
        other => panic!("a 401 in Okta mode must be a hard error, got {other:?}"),
    }

    // Signed for one body, sent with another; then the genuine request twice.
    let key = identity::RsaKey::from_pem(&pem, "k").unwrap();
    let path = "/api/v2/governance/evaluate";
    let assertion =
        identity::okta_assertion(&key, &fake_core_okta_ids(), KEY, "POST", path, &body(3));
    let send = |b: Vec<u8>| {
        reqwest::Client::new()
            .post(format!("{base}{path}"))
            .bearer_auth(KEY)
            .header(identity::HEADER_ASSERTION, &assertion)
            .body(b)
            .send()
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, client::reason_code(&r.bytes().await.unwrap()))
    };
    assert_eq!(
        answer(send(body(4)).await.unwrap()).await,
        (401, Some("body_hash_mismatch".into()))
    );
    // The tampered request used the jti up: the genuine one is now a replay too, so a
    // fresh assertion shows replay on its second use.
    let fresh = identity::okta_assertion(&key, &fake_core_okta_ids(), KEY, "POST", path, &body(5));
    let again = || {
        reqwest::Client::new()
            .post(format!("{base}{path}"))
            .bearer_auth(KEY)
            .header(identity::HEADER_ASSERTION, &fresh)
            .body(body(5))
            .send()
    };
    assert_eq!(answer(again().await.unwrap()).await, (200, None));
    assert_eq!(
        answer(again().await.unwrap()).await,
        (401, Some("proof_replayed".into()))
    );
}

/// Workload mode against fake_core.py as Core and token endpoint: bootstrap, token
/// exchange with a private_key_jwt Core verifies, then the /api/v3 routes with the
/// token; a key Core does not know is refused at the token exchange (hard error); when
/// Core has no v3 (409 workload_identity_unavailable, or 404) requests go to the v1
/// routes unsigned, and the bootstrap is not asked again before 60 s.
#[tokio::test]
async fn workload_identity_uses_a_token_on_v3_and_the_v1_routes_when_core_has_no_v3() {
    let Some(IdentityCore {
        // Bound: the directory (with the record) lives until the test ends.
        dir: _dir,
        pems: [pem, other_pem],
        record,
        fc,
    }) = identity_core(
        "gov-workload",
        "--workload-key-file",
        ["workload", "other"],
        "{}",
    )
    else {
        return;
    };
    let base = format!("http://127.0.0.1:{}", fc.port);
    let client = |pem: &str| {
        CoreClient::new(&base, KEY, Duration::from_secs(5), None)
            .unwrap()
            .with_identity(
                Some(Arc::new(Identity::Workload {
                    key: identity::RsaKey::from_pem(pem, "workload_private_key").unwrap(),
                })),
                Conventions::V2,
            )
    };
    let paths = |n: usize| -> Vec<(String, u64)> {
        recorded_at_least(&record, n)
            .iter()
            .map(|r| {
                (
                    r["path"].as_str().unwrap_or("").to_owned(),
                    r["status"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let good = client(&pem);
    good.validate().await.unwrap();
    assert!(matches!(
        good.evaluate(br#"{"event_type":"ActivityStarted"}"#.to_vec())
            .await,
        CoreOutcome::Ok(_)
    ));
    let token_path = "/realms/openbox/protocol/openid-connect/token";
    let p = |s: &str, st: u64| (s.to_owned(), st);
    assert_eq!(
        paths(4),
        vec![
            p("/api/v3/auth/bootstrap", 200),
            p(token_path, 200),
            p("/api/v3/auth/validate", 200),
            p("/api/v3/governance/evaluate", 200),
        ],
        "one token serves both requests"
    );

    let e = client(&other_pem).validate().await.unwrap_err().to_string();
    assert!(
        e.contains("the workload token exchange was refused (HTTP 401, signature_invalid)"),
        "{e}"
    );
    match client(&other_pem).evaluate(b"{}".to_vec()).await {
        CoreOutcome::AuthRefused(m) => assert!(m.contains("signature_invalid"), "{m}"),
        other => panic!("a refused workload token must be a hard error, got {other:?}"),
    }

    // A token the fake Core never issued.
    let forged = reqwest::Client::new()
        .post(format!("{base}/api/v3/governance/evaluate"))
        .bearer_auth(KEY)
        .header(identity::HEADER_WORKLOAD_TOKEN, "made-up")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    assert_eq!(
        client::reason_code(&forged.bytes().await.unwrap()).as_deref(),
        Some("workload_token_invalid")
    );

    // Lines so far: 4 above, bootstrap + token for each refused client, the forged one.
    let mut before = 9;
    for unavailable in [json!(409), json!(404)] {
        reqwest::Client::new()
            .post(format!("{base}/_control"))
            .body(json!({"workload_unavailable": unavailable}).to_string())
            .send()
            .await
            .unwrap();
        let legacy = client(&pem);
        legacy.validate().await.unwrap();
        assert!(matches!(
            legacy.evaluate(b"{}".to_vec()).await,
            CoreOutcome::Ok(_)
        ));
        let expected = if unavailable == json!(409) { 409 } else { 404 };
        assert_eq!(
            paths(before + 3)[before..].to_vec(),
            vec![
                p("/api/v3/auth/bootstrap", expected),
                p("/api/v1/auth/validate", 200),
                p("/api/v1/governance/evaluate", 200),
            ],
            "no v3 ({unavailable}): v1 routes, and no second bootstrap within 60 s"
        );
        before += 3;
    }
}

/// In Okta mode Core's 401/403 on evaluate or approval fails the activity with
/// OpenBoxAuthError under fail_open and fail_closed alike: never a fallback ALLOW, never
/// "still pending".
#[tokio::test]
async fn okta_refusals_fail_the_activity_in_every_policy() {
    let script = json!({"rules": [
                 {"match": {"activity_type": "refused"}, "status": 401, "body": {"reason_code": "signature_invalid"}},
                 {"match": {"activity_type": "forbidden"}, "status": 403, "body": {"reason_code": "did_agent_mismatch"}},
                 {"match": {"activity_type": "needs_human"}, "body": {"verdict": "require_approval"}}],
               "approvals": [{"match": {}, "responses": [{"status": 403, "body": {"reason_code": "verifier_not_configured"}}]}]})
        .to_string();
    let Some(IdentityCore {
        dir,
        pems: [pem],
        fc,
        ..
    }) = identity_core("gov-okta-policy", "--okta-key-file", ["okta"], &script)
    else {
        return;
    };
    for policy in [FailPolicy::FailOpen, FailPolicy::FailClosed] {
        let config = GovernanceConfig {
            openbox_url: Some(format!("http://127.0.0.1:{}", fc.port)),
            openbox_api_key: Some(KEY.into()),
            on_api_error: policy,
            events_sink: None,
            spool_dir: dir.path().join(format!("spool-{}", policy.as_str())),
            sdk_conventions: Conventions::V2,
            identity: Some(okta(&pem, None)),
            ..GovernanceConfig::default()
        };
        let g = Governor::new(config).await.unwrap();
        let run = format!("r-{}", policy.as_str());
        for (id, kind, reason) in [
            ("1", "refused", "HTTP 401, signature_invalid"),
            ("2", "forbidden", "HTTP 403, did_agent_mismatch"),
        ] {
            let d = g
                .activity_started(started(&activity(&run, id, kind), json!([])))
                .await;
            let (error_type, message, non_retryable) = d
                .error()
                .unwrap_or_else(|| panic!("{}: a {reason} went through as {d:?}", policy.as_str()));
            assert_eq!(error_type, verdict::ErrorType::OpenBoxAuthError);
            assert!(message.contains(reason) && !non_retryable, "{message}");
        }
        // Approval: the first answer asks for it, the poll is refused.
        let a = activity(&run, "3", "needs_human");
        let first = g.activity_started(started(&a, json!([]))).await;
        assert!(
            matches!(first, verdict::Decision::ApprovalPending { .. }),
            "{first:?}"
        );
        let poll = g.activity_started(started(&a, json!([]))).await;
        assert_eq!(
            poll.error()
                .map(|e| (e.0, e.1.contains("verifier_not_configured"))),
            Some((verdict::ErrorType::OpenBoxAuthError, true)),
            "{}: a refused approval poll is not still pending: {poll:?}",
            policy.as_str()
        );
    }
}
