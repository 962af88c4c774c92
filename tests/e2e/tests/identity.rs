//! SDK 2.0's Okta AI agent (API v2) and workload (API v3) identities, end to end: the
//! agent holds the operator's key (a PKCS8 PEM RSA key made for this test by openssl,
//! never committed, in a file only the agent reads), a real worker adopts the hook with
//! `OpenBoxPlugin`, and the fake Core verifies every request (fake_core.py
//! `--okta-key-file` / `--workload-key-file`: RS256 assertion or token, claims, audience,
//! exp window, jti replay; bootstrap and token endpoint).
//!
//! Checked: every request of the run reaches Core on the identity's routes and passes
//! its checks; in Okta mode Core's 401 on an activity's event fails that activity with
//! `OpenBoxAuthError` under fail_open — never the fallback ALLOW fail_open gives other
//! HTTP errors — and its body never runs. (Wrong keys, tampered and replayed requests,
//! 403s, approval polls and fail_closed: governance::tests in the agent's unit tests,
//! against the same fake Core.)

use std::{path::PathBuf, time::Duration};

use openbox_e2e::{FakeCore, GovWorld, FAKE_CORE_KEY};
use serde_json::{json, Value};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// A fresh RSA key in the test's directory, readable by root only.
fn rsa_key(w: &GovWorld, name: &str) -> PathBuf {
    openbox_testkit::rsa_key(w.tmp.path(), name)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

/// Core registered with `core_flag key`, the agent with `agent_flag key`, and a worker
/// adopting the hook with `OpenBoxPlugin`.
fn world(name: &str, core_flag: &str, agent_flag: &str, script: &Value) -> GovWorld {
    let mut w = GovWorld::new(name);
    let key = rsa_key(&w, "identity");
    let core = FakeCore::start_with(
        &w.env,
        &w.logs,
        "core",
        FAKE_CORE_KEY,
        script,
        &[core_flag.to_owned(), key.display().to_string()],
    );
    w.core = Some(core);
    let mut args = w.core().agent_args();
    args.extend([
        "--spool-dir".to_owned(),
        w.spool_dir().display().to_string(),
        agent_flag.to_owned(),
        key.display().to_string(),
    ]);
    w.start_agent(&args);
    let url = w.core().url();
    w.start_worker_with(&[
        "--plugin".into(),
        "--openbox-url".into(),
        url,
        "--openbox-api-key".into(),
        FAKE_CORE_KEY.into(),
    ]);
    w
}

fn echo_workflow(w: &GovWorld, id: &str, marker: &str) -> Value {
    let dir = w.files.display().to_string();
    json!({"id": id, "workflow": "GovSession", "arg": {
        "tag": "t", "max_attempts": 2, "retry_ms": 200,
        "steps": [{"activity": "echo", "args": [{"marker": marker, "dir": dir}], "activity_id": marker}]}})
}

/// (method, path, identity check, status) of every request Core got.
fn seen(w: &GovWorld) -> Vec<(String, String, String, u64)> {
    w.core()
        .requests()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap_or("").to_owned(),
                r["path"].as_str().unwrap_or("").to_owned(),
                r["identity"].as_str().unwrap_or("-").to_owned(),
                r["status"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn okta_bootstrap_identity_signs_every_request_and_a_refusal_fails_the_activity_under_fail_open() {
    let w = world(
        "okta_bootstrap_identity_signs_every_request",
        "--okta-key-file",
        "--okta-agent-private-key-file",
        &json!({}),
    );
    let (m0, m1) = (w.marker(0), w.marker(1));
    w.core().set_script(&json!({"rules": [
        {"match": {"event_type": "ActivityStarted", "activity_id": m1},
         "status": 401, "body": {"reason_code": "signature_invalid"}}]}));
    let out = w.run(
        &[
            echo_workflow(&w, &w.workflow_id(0), &m0),
            echo_workflow(&w, &w.workflow_id(1), &m1),
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(
        out[0]["ok"],
        json!(true),
        "the signed run failed: {}",
        out[0]
    );
    assert_eq!(
        out[1]["ok"],
        json!(false),
        "a refused identity let the activity through: {}",
        out[1]
    );
    let text = out[1].to_string();
    assert!(
        text.contains("OpenBoxAuthError") && text.contains("HTTP 401, signature_invalid"),
        "the activity must fail with OpenBoxAuthError naming Core's reason: {text}"
    );
    assert!(
        w.ran_attempts(&m1).is_empty(),
        "the refused activity's body ran"
    );
    assert_eq!(w.ran_attempts(&m0), vec![1]);

    let reqs = seen(&w);
    assert_eq!(
        reqs.first().map(|r| (r.0.as_str(), r.1.as_str())),
        Some(("GET", "/api/v2/auth/bootstrap")),
        "bootstrap mode asks Core for the agent's ids first: {reqs:?}"
    );
    // The worker's governor (its plugin settings) bootstraps too.
    let governed: Vec<_> = reqs
        .iter()
        .filter(|r| !r.1.ends_with("/bootstrap"))
        .collect();
    assert!(governed.len() >= 5, "{reqs:?}");
    for r in &governed {
        assert!(
            r.1.starts_with("/api/v2/"),
            "a request off the v2 routes: {r:?}"
        );
        assert_eq!(r.2, "ok", "a request whose assertion Core refused: {r:?}");
    }
    // Both attempts of the refused activity reached Core and were answered 401.
    let refused = governed.iter().filter(|r| r.3 == 401).count();
    assert_eq!(refused, 2, "{reqs:?}");
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
}

#[test]
fn workload_identity_reaches_core_on_v3_with_a_token_from_the_token_endpoint() {
    let w = world(
        "workload_identity_reaches_core_on_v3",
        "--workload-key-file",
        "--workload-private-key-file",
        &json!({}),
    );
    let m0 = w.marker(0);
    let out = w.run(&[echo_workflow(&w, &w.workflow_id(0), &m0)], RUN_TIMEOUT);
    assert_eq!(out[0]["ok"], json!(true), "{}", out[0]);
    let reqs = seen(&w);
    let token = "/realms/openbox/protocol/openid-connect/token";
    assert_eq!(
        reqs.iter()
            .take(2)
            .map(|r| r.1.as_str())
            .collect::<Vec<_>>(),
        vec!["/api/v3/auth/bootstrap", token],
        "{reqs:?}"
    );
    let governed: Vec<_> = reqs
        .iter()
        .filter(|r| r.1 != token && !r.1.ends_with("/bootstrap"))
        .collect();
    assert!(governed.len() >= 4, "{reqs:?}");
    for r in governed {
        assert!(
            r.1.starts_with("/api/v3/") && r.2 == "ok" && r.3 == 200,
            "{r:?}"
        );
    }
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
}
