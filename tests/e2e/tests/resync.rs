//! Watching begins in the middle of a keep-alive connection's traffic: the worker's one
//! pooled aiohttp connection per server (HTTP and HTTPS) always has a slow background
//! request on its way (a health check, a token refresh) — from before the worker and its
//! hook exist, and again when the agent restarts under the running worker. The
//! activities' own requests on that same connection must every one be on its activity:
//! none missing, none on another. Real Temporal dev server, hooked worker, agent daemon.

use std::{
    thread,
    time::{Duration, Instant},
};

use openbox_e2e::{Agent, AgentReport, ExpectedActivity, Kind, Scenario, ScenarioOpts, WorkerOpts};
use serde_json::{json, Value};

/// `pooled_http` items `range`, alternately over HTTP and HTTPS.
fn pooled_plan(s: &Scenario, range: std::ops::Range<usize>) -> Value {
    let items: Vec<Value> = range
        .map(|i| {
            let mut item = s.item(i);
            item["base"] = if i % 2 == 0 {
                format!("http://127.0.0.1:{}", s.shared.http_port)
            } else {
                format!("https://127.0.0.1:{}", s.shared.https_port)
            }
            .into();
            item
        })
        .collect();
    json!({"activity": "pooled_http", "items": items})
}

fn expected(s: &Scenario, wf: &str, range: std::ops::Range<usize>) -> Vec<ExpectedActivity> {
    range
        .map(|i| ExpectedActivity::new(wf, &s.marker(i), &[Kind::Https]))
        .collect()
}

/// Prints the comparison and the parser's losses; asserted at the end, so that a run
/// shows both phases.
fn show(what: &str, attribution: &openbox_e2e::Attribution, agent: &AgentReport) {
    attribution.print(what, agent);
    println!(
        "  parser losses: {}",
        agent
            .summary
            .get("parser_losses")
            .cloned()
            .unwrap_or(Value::Null)
    );
}

/// 104 activities (52 over HTTP, 52 over HTTPS) on the busy pooled connections, then
/// the agent restarts while the worker idles with its background traffic going on, the
/// hook registers again without waiting for an activity, and 60 more run.
#[test]
fn busy_pooled_keep_alive_connections_lose_no_activity_span_at_start_or_after_an_agent_restart() {
    let name = "busy_pooled_keep_alive_connections_lose_no_activity_span";
    let env = openbox_e2e::Env::get();
    let shared = openbox_e2e::shared(&env);
    let background = vec![
        format!("http://127.0.0.1:{}", shared.http_port),
        format!("https://127.0.0.1:{}", shared.https_port),
    ];
    let mut s = Scenario::start(
        name,
        ScenarioOpts {
            worker: WorkerOpts {
                max_concurrent: 120,
                background,
                ..WorkerOpts::default()
            },
            ..ScenarioOpts::default()
        },
    );
    let wf1 = s.workflow_id(0);
    s.run_ok(&[(wf1.clone(), pooled_plan(&s, 0..104))]);
    let first = s.agent.take().expect("the scenario runs an agent").stop();
    let at_start = openbox_e2e::check_attribution(&first, &s.token, &expected(&s, &wf1, 0..104));
    show(&format!("{name}: at start"), &at_start, &first);

    // The worker keeps running (and its background requests keep going) while no agent
    // listens; then a new agent comes up on the same socket.
    thread::sleep(Duration::from_secs(1));
    let logs = s.logs.join("after-restart");
    std::fs::create_dir_all(&logs).expect("creating the second agent's log directory");
    let agent = Agent::start(&s.env, &logs, &s.socket);
    // The idle worker's hook registers with it on its own, before any activity runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut registered_idle = true;
    while !agent.stderr_text().contains("worker registered") {
        if Instant::now() > deadline {
            registered_idle = false;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    s.agent = Some(agent);
    let wf2 = s.workflow_id(1);
    s.run_ok(&[(wf2.clone(), pooled_plan(&s, 104..164))]);
    let (expected2, token) = (expected(&s, &wf2, 104..164), s.token.clone());
    // The worker stops first, so /metrics and the summary at exit hold the same counts.
    let second = s.finish().agent.expect("the restarted agent");
    let after_restart = openbox_e2e::check_attribution(&second, &token, &expected2);
    show(
        &format!("{name}: after an agent restart"),
        &after_restart,
        &second,
    );

    at_start.assert_exact(0, &first);
    // (The first agent stopped under a running worker: its /metrics, scraped just
    // before, cannot match its summary at exit, so they are not compared.)
    assert!(
        registered_idle,
        "the idle worker did not register again with the restarted agent within 30 s (no activity ran to make it)"
    );
    after_restart.assert_exact(0, &second);
    second.assert_metrics_match_summary();
}
