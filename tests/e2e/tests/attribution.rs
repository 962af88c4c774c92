//! Every span on the activity that caused it: concurrent async activities on one event
//! loop (own connections, and a shared client and pool), sync activities on a thread
//! pool, subprocesses, retries, and a worker in its own PID namespace. Each test runs a
//! real Temporal dev server, a real Python worker with the hook, and the agent daemon.
//!
//! The rule (design.md, "Attribution"): a span on the wrong activity is a defect, so
//! there must be none; a span the agent could not attribute exactly is a gap, which the
//! tests print by reason. Every activity here does each of its operations exactly once,
//! while its activity is running, so the tests also require every one of them to be on
//! its activity (no gap allowed).

use openbox_e2e::{ExpectedActivity, Kind, Scenario, ScenarioOpts, WorkerOpts};
use serde_json::{json, Value};

const ALL: &[Kind] = &[Kind::Https, Kind::Sql, Kind::FileOpen];

/// Items 0..n of `s`, each with `extra` merged in.
fn items(s: &Scenario, range: std::ops::Range<usize>, extra: &Value) -> Vec<Value> {
    range
        .map(|i| {
            let mut item = s.item(i);
            for (k, v) in extra.as_object().expect("extra is an object") {
                item[k] = v.clone();
            }
            item
        })
        .collect()
}

/// Stops everything, compares, prints, asserts.
fn finish_and_check(s: Scenario, expected: &[ExpectedActivity]) {
    let name = s.name.clone();
    let done = s.finish();
    let agent = done.agent.expect("the scenario ran an agent");
    let attribution = openbox_e2e::check_attribution(&agent, &done.token, expected);
    attribution.print(&name, &agent);
    attribution.assert_exact(0, &agent);
    agent.assert_metrics_match_summary();
}

fn fifty_concurrent_async(name: &str, shared_pools: bool) {
    let s = Scenario::start(
        name,
        ScenarioOpts {
            worker: WorkerOpts {
                shared_pools,
                max_concurrent: 100,
                ..WorkerOpts::default()
            },
            ..ScenarioOpts::default()
        },
    );
    let wf = s.workflow_id(0);
    // All 50 wait for each other before their I/O, so they run at once on the loop.
    let plan = json!({
        "activity": "async_io",
        "items": items(&s, 0..50, &json!({
            "shared": shared_pools,
            "rendezvous": {"name": wf, "count": 50, "timeout": 30},
        })),
    });
    s.run_ok(&[(wf.clone(), plan)]);
    let expected: Vec<_> = (0..50)
        .map(|i| ExpectedActivity::new(&wf, &s.marker(i), ALL))
        .collect();
    finish_and_check(s, &expected);
}

/// 50 async activities at once on one event loop, each with its own httpx.AsyncClient
/// (HTTPS), its own asyncpg connection (PostgreSQL over TLS; 12 at a time, the fixture
/// server's connection limit) and a file write, every one with the activity's marker.
#[test]
fn fifty_concurrent_async_activities_each_get_exactly_their_own_spans() {
    fifty_concurrent_async(
        "fifty_concurrent_async_activities_each_get_exactly_their_own_spans",
        false,
    );
}

/// The same, but all 50 share one module-level httpx.AsyncClient (5 connections) and
/// one asyncpg pool of 5 connections: connections carry requests of many activities.
#[test]
fn fifty_concurrent_async_activities_sharing_one_client_and_a_small_pool_get_exactly_their_own_spans(
) {
    fifty_concurrent_async(
        "fifty_concurrent_async_activities_sharing_one_client_and_a_small_pool_get_exactly_their_own_spans",
        true,
    );
}

/// 50 sync activities (requests over HTTPS, psycopg2 over TLS, open().write) on
/// `activity_executor=ThreadPoolExecutor(8)`.
#[test]
fn sync_activities_on_an_eight_thread_pool_each_get_their_own_spans() {
    let s = Scenario::start(
        "sync_activities_on_an_eight_thread_pool_each_get_their_own_spans",
        ScenarioOpts {
            worker: WorkerOpts {
                threads: 8,
                max_concurrent: 100,
                ..WorkerOpts::default()
            },
            ..ScenarioOpts::default()
        },
    );
    let wf = s.workflow_id(0);
    // Waves of 8 wait for each other, so the 8 threads are busy at once.
    let plan = json!({
        "activity": "sync_io",
        "items": items(&s, 0..50, &json!({"rendezvous": {"name": wf, "count": 8, "timeout": 5}})),
    });
    s.run_ok(&[(wf.clone(), plan)]);
    let expected: Vec<_> = (0..50)
        .map(|i| ExpectedActivity::new(&wf, &s.marker(i), ALL))
        .collect();
    finish_and_check(s, &expected);
}

/// `subprocess.run(["curl", "-sk", url])` from sync activities and
/// `asyncio.create_subprocess_exec("curl", …)` from async ones, running at once: each
/// curl's HTTPS span is on the activity that started it.
#[test]
fn curl_subprocess_started_by_an_activity_is_attributed_to_it() {
    let s = Scenario::start(
        "curl_subprocess_started_by_an_activity_is_attributed_to_it",
        ScenarioOpts::default(),
    );
    let (wf_sync, wf_async) = (s.workflow_id(0), s.workflow_id(1));
    let sync_plan = json!({
        "activity": "curl_sync",
        "items": items(&s, 0..4, &json!({"rendezvous": {"name": wf_sync, "count": 4, "timeout": 10}})),
    });
    let async_plan = json!({
        "activity": "curl_async",
        "items": items(&s, 4..8, &json!({"rendezvous": {"name": wf_async, "count": 4, "timeout": 10}})),
    });
    s.run_ok(&[(wf_sync.clone(), sync_plan), (wf_async.clone(), async_plan)]);
    let mut expected: Vec<_> = (0..4)
        .map(|i| ExpectedActivity::new(&wf_sync, &s.marker(i), &[Kind::Https]))
        .collect();
    expected.extend((4..8).map(|i| ExpectedActivity::new(&wf_async, &s.marker(i), &[Kind::Https])));
    finish_and_check(s, &expected);
}

/// An activity does its I/O with marker `…-attempt-N` (N = `activity.info().attempt`),
/// then fails on attempt 1 and succeeds on attempt 2: ActivityCompleted of attempt 1
/// (status failed) holds only attempt-1 spans, that of attempt 2 only attempt-2 spans.
/// Async and sync activities, two of each.
#[test]
fn retry_attempts_never_mix_spans() {
    let s = Scenario::start("retry_attempts_never_mix_spans", ScenarioOpts::default());
    let (wf_async, wf_sync) = (s.workflow_id(0), s.workflow_id(1));
    let plan = |activity: &str, range| {
        json!({
            "activity": activity,
            "max_attempts": 3,
            "retry_initial_ms": 300,
            "items": items(&s, range, &json!({"fail_attempts": 1})),
        })
    };
    s.run_ok(&[
        (wf_async.clone(), plan("retry_async", 0..2)),
        (wf_sync.clone(), plan("retry_sync", 2..4)),
    ]);
    let mut expected = Vec::new();
    for i in 0..4 {
        let wf = if i < 2 { &wf_async } else { &wf_sync };
        for (attempt, status) in [(1, "failed"), (2, "completed")] {
            expected.push(ExpectedActivity {
                workflow_id: wf.clone(),
                activity_id: s.marker(i),
                attempt,
                status,
                marker: format!("{}-attempt-{attempt}", s.marker(i)),
                kinds: ALL.to_vec(),
            });
        }
    }
    let name = s.name.clone();
    let done = s.finish();
    let agent = done.agent.expect("the scenario ran an agent");
    let attribution = openbox_e2e::check_attribution(&agent, &done.token, &expected);
    attribution.print(&name, &agent);
    // A third attempt never ran, so there must be no event for one.
    let third: Vec<&Value> = agent
        .events_of("ActivityCompleted")
        .into_iter()
        .filter(|e| e["attempt"].as_u64() == Some(3))
        .collect();
    assert!(
        third.is_empty(),
        "ActivityCompleted for an attempt 3 that never ran: {third:?}"
    );
    for e in agent.events_of("ActivityCompleted") {
        if e["status"] == json!("failed") {
            assert!(
                e["error"].is_object(),
                "a failed ActivityCompleted must carry error {{type, message}}: {e}"
            );
        }
    }
    attribution.assert_exact(0, &agent);
}

/// The worker runs as `unshare --pid --fork --mount-proc <python> worker.py`: it is pid
/// 1 of its own PID namespace and says so in its hello; the agent must still attribute
/// its activities' spans (host pids and tids differ from the worker's).
#[test]
fn worker_in_its_own_pid_namespace_is_attributed() {
    let s = Scenario::start(
        "worker_in_its_own_pid_namespace_is_attributed",
        ScenarioOpts {
            worker: WorkerOpts {
                unshare: true,
                ..WorkerOpts::default()
            },
            ..ScenarioOpts::default()
        },
    );
    let (wf_async, wf_sync) = (s.workflow_id(0), s.workflow_id(1));
    s.run_ok(&[
        (
            wf_async.clone(),
            json!({"activity": "async_io", "items": items(&s, 0..4, &json!({"rendezvous": {"name": wf_async, "count": 4, "timeout": 10}}))}),
        ),
        (
            wf_sync.clone(),
            json!({"activity": "sync_io", "items": items(&s, 4..8, &json!({}))}),
        ),
    ]);
    let mut expected: Vec<_> = (0..4)
        .map(|i| ExpectedActivity::new(&wf_async, &s.marker(i), ALL))
        .collect();
    expected.extend((4..8).map(|i| ExpectedActivity::new(&wf_sync, &s.marker(i), ALL)));
    finish_and_check(s, &expected);
}

/// Work handed off the activity's own thread, 20 activities of each kind at once: an
/// async activity calling a sync client (httpx.Client, as sync LLM SDKs do; psycopg2;
/// a file write) through `asyncio.to_thread` — the loop's default executor, a few
/// threads every activity shares —, one fanning its steps out on a ThreadPoolExecutor
/// of its own, one doing them on a `threading.Thread` it starts and joins, and one
/// running them in a ProcessPoolExecutor shared by every activity, created (its
/// processes forked or spawned) inside the first activity that used it: fork, spawn and
/// forkserver in turn. Every span must be on its own activity, none on another (with
/// lifelong inheritance, every task of a pool forked inside an activity would land on
/// that one).
#[test]
fn work_handed_to_threads_pools_and_process_pools_is_attributed_to_its_activity() {
    let s = Scenario::start(
        "work_handed_to_threads_pools_and_process_pools_is_attributed_to_its_activity",
        ScenarioOpts {
            worker: WorkerOpts {
                max_concurrent: 100,
                ..WorkerOpts::default()
            },
            ..ScenarioOpts::default()
        },
    );
    const EACH: usize = 20;
    let kinds = [
        "to_thread_io",
        "own_pool_io",
        "own_thread_io",
        "process_pool_io",
    ];
    let rendezvous = s.workflow_id(0);
    let together =
        json!({"rendezvous": {"name": rendezvous, "count": EACH * kinds.len(), "timeout": 60}});
    let mut workflows = Vec::new();
    let mut expected = Vec::new();
    for (k, activity) in kinds.iter().enumerate() {
        let wf = s.workflow_id(k);
        let range = k * EACH..(k + 1) * EACH;
        let mut plan_items = items(&s, range.clone(), &together);
        for (j, item) in plan_items.iter_mut().enumerate() {
            item["start_method"] = json!(["fork", "spawn", "forkserver"][j % 3]);
        }
        workflows.push((
            wf.clone(),
            json!({"activity": activity, "items": plan_items}),
        ));
        expected.extend(range.map(|i| ExpectedActivity::new(&wf, &s.marker(i), ALL)));
    }
    s.run_ok(&workflows);
    finish_and_check(s, &expected);
}
