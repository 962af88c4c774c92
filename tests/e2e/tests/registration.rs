//! The hook without an agent, and the agent against registrations that lie. Real
//! Temporal dev server, real Python worker with the hook, the agent daemon.

use std::{fs, time::Duration};

use openbox_e2e::{
    under_both_conventions, ExpectedActivity, Kind, Proc, Scenario, ScenarioOpts, Sdk, WorkerOpts,
};
use serde_json::{json, Value};

const ALL: &[Kind] = &[Kind::Https, Kind::Sql, Kind::FileOpen];

/// No agent (the socket path names no file): sync and async activities succeed, and
/// the worker logs exactly one warning from the `openbox.hook` logger, however many
/// activities run.
#[test]
fn worker_without_agent_runs_normally_and_warns_once() {
    let s = Scenario::start(
        "worker_without_agent_runs_normally_and_warns_once",
        ScenarioOpts {
            agent: false,
            ..ScenarioOpts::default()
        },
    );
    assert!(
        !s.socket.exists(),
        "{} must not exist in this test",
        s.socket.display()
    );
    let (wf_async, wf_sync) = (s.workflow_id(0), s.workflow_id(1));
    let items = |range: std::ops::Range<usize>| range.map(|i| s.item(i)).collect::<Vec<_>>();
    s.run_ok(&[
        (
            wf_async.clone(),
            json!({"activity": "async_io", "items": items(0..4)}),
        ),
        (
            wf_sync.clone(),
            json!({"activity": "sync_io", "items": items(4..8)}),
        ),
    ]);
    // A second round: the warning is once per worker, not once per batch.
    s.run_ok(&[(
        s.workflow_id(2),
        json!({"activity": "async_io", "items": items(8..10)}),
    )]);
    let done = s.finish();
    assert!(
        done.worker.status.success(),
        "the worker exited with {} ({})",
        done.worker.status,
        done.worker.stderr_path.display()
    );
    // worker.py logs `LEVEL logger: message`.
    let warnings: Vec<&str> = done
        .worker
        .stderr
        .lines()
        .filter(|l| l.starts_with("WARNING openbox.hook"))
        .collect();
    println!("openbox.hook warnings: {warnings:#?}");
    let hook_lines: Vec<&str> = done
        .worker
        .stderr
        .lines()
        .filter(|l| l.contains("openbox.hook"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "expected exactly one `openbox.hook` warning without an agent; the worker's openbox.hook lines ({}):\n{}",
        done.worker.stderr_path.display(),
        hook_lines.join("\n")
    );
}

under_both_conventions!(worker_without_agent_under_fail_closed_fails_every_activity);

/// No agent, worker configured fail_closed (`OPENBOX_GOVERNANCE_POLICY`): nothing can
/// govern the activities, so none runs (issue 10: they used to run ungoverned). Under SDK
/// 1.0 conventions each one fails with the non-retryable `GovernanceHalt` naming the
/// socket and the workflow sees that error; under 2.0 that HALT terminates the workflow
/// with `Governance HALT: <the same message>`.
fn worker_without_agent_under_fail_closed_fails_every_activity(name: &str, sdk: Sdk) {
    let mut env = vec![("OPENBOX_GOVERNANCE_POLICY".into(), "fail_closed".into())];
    if sdk == Sdk::V2 {
        env.push(("OPENBOX_SDK_CONVENTIONS".into(), "2.0".into()));
    }
    let s = Scenario::start(
        name,
        ScenarioOpts {
            agent: false,
            worker: WorkerOpts {
                env,
                ..WorkerOpts::default()
            },
            ..ScenarioOpts::default()
        },
    );
    assert!(!s.socket.exists(), "{} must not exist", s.socket.display());
    let items = |range: std::ops::Range<usize>| range.map(|i| s.item(i)).collect::<Vec<_>>();
    let out = s.run(&[
        (
            s.workflow_id(0),
            json!({"activity": "async_io", "items": items(0..5)}),
        ),
        (
            s.workflow_id(1),
            json!({"activity": "sync_io", "items": items(5..10)}),
        ),
    ]);
    let socket = s.socket.display().to_string();
    for wf in out.iter().filter(|_| sdk == Sdk::V2) {
        let error = wf["error"].as_str().unwrap_or("");
        assert!(
            wf["ok"] == json!(false)
                && error.contains("TerminatedError")
                && error.contains("Governance HALT: ")
                && error.contains(&format!("openbox-agent unreachable at {socket}")),
            "the workflow is terminated with the HALT naming the socket: {wf}"
        );
    }
    for wf in out.iter().filter(|_| sdk == Sdk::V1) {
        assert_eq!(wf["ok"], json!(true), "the workflow itself completes: {wf}");
        let activities = wf["result"].as_array().expect("per-activity outcomes");
        assert_eq!(activities.len(), 5, "{wf}");
        for a in activities {
            let error = a["error"].as_str().unwrap_or("");
            assert!(
                a["ok"] == json!(false)
                    && a["error_type"] == json!("GovernanceHalt")
                    && error.contains(&format!("openbox-agent unreachable at {socket}"))
                    && error.contains("fail_closed"),
                "every activity fails with GovernanceHalt naming the socket: {a}"
            );
        }
    }
    for i in 0..10 {
        let marker = s.marker(i);
        let ran = fs::read_dir(&s.files)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().contains(&marker))
            })
            .unwrap_or(false);
        assert!(
            !ran,
            "activity {marker} ran: it left a file in {}",
            s.files.display()
        );
    }
    let done = s.finish();
    let warnings: Vec<&str> = done
        .worker
        .stderr
        .lines()
        .filter(|l| l.starts_with("WARNING openbox.hook"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:#?}");
    assert!(warnings[0].contains("GovernanceHalt"), "{}", warnings[0]);
}

fn ok_of(reply: &Value) -> Option<bool> {
    reply.get("ok").and_then(Value::as_bool)
}

/// A process connects to the agent's socket and (1) says hello claiming the real
/// worker's pid, (2) claiming pid 1, (3) says hello as itself and then registers a
/// thread id of the worker's: (1), (2) and (3)'s thread get `ok: false`, its own hello
/// and own thread are accepted; the agent logs `refused` and counts the refusals; the
/// real worker's activities are still attributed exactly.
#[test]
fn forged_registration_is_refused_and_logged() {
    let s = Scenario::start(
        "forged_registration_is_refused_and_logged",
        ScenarioOpts::default(),
    );
    let victim = s.worker().pid();
    let mut cmd = std::process::Command::new(&s.env.python);
    cmd.arg(s.env.script("forge.py"))
        .arg(&s.socket)
        .arg(victim.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let mut forge = Proc::spawn("forge", cmd, &s.logs);
    let status = forge
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("forge.py did not finish in 60 s: {}", forge.stderr_tail()));
    assert!(
        status.success(),
        "forge.py failed ({status}): {}",
        forge.stderr_tail()
    );
    let replies: Value = serde_json::from_str(fs::read_to_string(&forge.stdout).unwrap().trim())
        .unwrap_or_else(|e| panic!("forge.py printed no JSON ({e}): {}", forge.stdout.display()));
    println!("replies to the forged registrations: {replies:#}");
    for (step, want) in [
        ("forged_pid", false),
        ("pid_one", false),
        ("own_hello", true),
        ("own_thread", true),
        ("foreign_tid", false),
    ] {
        assert_eq!(
            ok_of(&replies[step]),
            Some(want),
            "{step}: expected a reply with ok: {want}, got {} (all replies: {replies})",
            replies[step]
        );
    }

    // The real worker is unaffected.
    let (wf_async, wf_sync) = (s.workflow_id(0), s.workflow_id(1));
    let items = |range: std::ops::Range<usize>| range.map(|i| s.item(i)).collect::<Vec<_>>();
    s.run_ok(&[
        (
            wf_async.clone(),
            json!({"activity": "async_io", "items": items(0..4)}),
        ),
        (
            wf_sync.clone(),
            json!({"activity": "sync_io", "items": items(4..8)}),
        ),
    ]);
    let mut expected: Vec<_> = (0..4)
        .map(|i| ExpectedActivity::new(&wf_async, &s.marker(i), ALL))
        .collect();
    expected.extend((4..8).map(|i| ExpectedActivity::new(&wf_sync, &s.marker(i), ALL)));
    let name = s.name.clone();
    let done = s.finish();
    let agent = done.agent.expect("the scenario ran an agent");
    let attribution = openbox_e2e::check_attribution(&agent, &done.token, &expected);
    attribution.print(&name, &agent);

    let refused_lines: Vec<&str> = agent
        .stderr
        .lines()
        // Log lines, not the summary (whose `registrations_refused` key would match).
        .filter(|l| l.contains("refused") && !l.trim_start().starts_with('{'))
        .collect();
    println!("agent stderr lines with `refused`: {refused_lines:#?}");
    assert!(
        !refused_lines.is_empty(),
        "the agent's stderr has no log line with `refused` ({})",
        agent.stderr_path.display()
    );
    let refused = agent.summary_u64("registrations_refused");
    assert!(
        refused >= 3,
        "the summary counts {refused} refused registrations; three were refused (forged pid, pid 1, foreign tid): {}",
        agent.summary
    );
    attribution.assert_exact(0, &agent);
}
