//! Workers in their own containers, as on a Kubernetes node: the agent image
//! (deploy/Containerfile) run as the DaemonSet runs it (host PID namespace, only the
//! capabilities deploy/README.md lists, tracefs, BTF, the hook socket's directory and
//! the spool from the host), and a real Temporal worker in a container with its own root
//! filesystem (its own Python, temporalio, libssl, psycopg2-binary's bundled libssl),
//! the hook socket mounted in. Its HTTPS, SQL and file activities must be captured and
//! attributed exactly, with the worker's own paths and its container id on every span.
//!
//! The second test runs the agent on the host instead: the worker's libssl is then at
//! the same path as the host's own, a different file, which is the case where probing
//! "the" libssl at that path attached to the wrong one.

use std::path::Path;

use openbox_e2e::{
    assert_workflows_ok, check_attribution, logs_dir, run_workflows, shared, start_agent_container,
    start_worker_container, Agent, Env, ExpectedActivity, HostDirs, Kind, TempDir, WorkerOpts,
    FILES_IN_WORKER,
};
use openbox_testkit::unique;
use serde_json::{json, Value};

const ALL: &[Kind] = &[Kind::Https, Kind::Sql, Kind::FileOpen];
/// Activities per workflow: one workflow of async activities (httpx, asyncpg: Python's
/// ssl module over the container's libssl), one of sync activities (requests; psycopg2
/// over the libssl its wheel bundles).
const PER_WORKFLOW: usize = 6;

fn workers_in_containers(name: &str, agent_in_container: bool) {
    let env = Env::get();
    let shared = shared(&env);
    let logs = logs_dir(name);
    let tmp = TempDir::new("containers");
    let dirs = HostDirs::new(tmp.path());
    let (agent, agent_container) = if agent_in_container {
        let (a, c) = start_agent_container(&logs, &dirs);
        (a, Some(c))
    } else {
        (Agent::start(&env, &logs, &dirs.socket()), None)
    };
    let id = unique();
    let token = format!("mk{id}");
    let task_queue = format!("tq-{name}-{id}");
    let opts = WorkerOpts::default();
    let (worker, worker_container) =
        start_worker_container(&env, &logs, &shared, &task_queue, &dirs, &opts);
    let container_id = worker_container.id();

    let marker = |i: usize| format!("{token}-{i:03}");
    let item = |i: usize, rendezvous: &str, count: usize| {
        json!({
            "marker": marker(i),
            "https_base": format!("https://127.0.0.1:{}", shared.https_port),
            "pg_port": shared.pg_port,
            "dir": FILES_IN_WORKER,
            "rendezvous": {"name": rendezvous, "count": count, "timeout": 20},
        })
    };
    let wf_async = format!("wf-{name}-async-{id}");
    let wf_sync = format!("wf-{name}-sync-{id}");
    let workflows = vec![
        (
            wf_async.clone(),
            json!({
                "activity": "async_io",
                "items": (0..PER_WORKFLOW).map(|i| item(i, &wf_async, PER_WORKFLOW)).collect::<Vec<_>>(),
            }),
        ),
        (
            wf_sync.clone(),
            json!({
                "activity": "sync_io",
                "items": (PER_WORKFLOW..2 * PER_WORKFLOW).map(|i| item(i, &wf_sync, 4)).collect::<Vec<_>>(),
            }),
        ),
    ];
    let outcomes = run_workflows(&env, &logs, &shared, &task_queue, &workflows, &worker);
    assert_workflows_ok(&outcomes, &logs.join("worker.stderr"));
    let worker_out = worker.stop();
    drop(worker_container);
    let report = agent.stop();
    drop(agent_container);

    let expected: Vec<_> = (0..2 * PER_WORKFLOW)
        .map(|i| {
            let wf = if i < PER_WORKFLOW {
                &wf_async
            } else {
                &wf_sync
            };
            ExpectedActivity::new(wf, &marker(i), ALL)
        })
        .collect();
    let attribution = check_attribution(&report, &token, &expected);
    attribution.print(name, &report);
    attribution.assert_exact(0, &report);

    // Every span of the worker's activities names its container (and the pod the
    // worker's downward-API variables name); paths are the worker's own.
    let mut spans = 0;
    let mut files = 0;
    for event in report.events_of("ActivityCompleted") {
        for span in event["spans"].as_array().into_iter().flatten() {
            spans += 1;
            let attrs = &span["attributes"];
            let problem = if attrs["container.id"] != json!(container_id) {
                Some("container.id is not the worker's container")
            } else if attrs["k8s.pod.name"] != json!("worker-pod-0")
                || attrs["k8s.namespace.name"] != json!("e2e")
            {
                Some("k8s.pod.name / k8s.namespace.name are not the worker's")
            } else {
                None
            };
            if let Some(p) = problem {
                panic!(
                    "{p} ({container_id}, worker-pod-0, e2e):\n{span}\n(events: {})",
                    report.events_path.display()
                );
            }
            if span["name"] == json!("file.open") {
                let path = attrs["file.path"].as_str().unwrap_or_default();
                if path.contains(&token) {
                    files += 1;
                    assert!(
                        path.starts_with(&format!("{FILES_IN_WORKER}/{token}-")),
                        "file.path {path:?} is not the path the worker opened (under {FILES_IN_WORKER} in its own root)"
                    );
                    assert!(
                        !Path::new(path).exists(),
                        "{path} exists on the host too: the test must use a path only the worker's root has"
                    );
                }
            }
        }
    }
    assert!(
        spans > 0,
        "no spans at all in {}",
        report.events_path.display()
    );
    assert_eq!(
        files,
        2 * PER_WORKFLOW,
        "file.open spans of the activities' files (events: {})",
        report.events_path.display()
    );
    // The worker's own libssl files were probed through its root, not the agent's.
    let probed: Vec<&str> = report
        .stderr
        .lines()
        .filter(|l| l.contains("attached TLS probes") && l.contains("/root/"))
        .collect();
    assert!(
        !probed.is_empty(),
        "the agent logged no TLS probes attached through the worker's /proc/PID/root\nagent stderr: {}",
        report.stderr_path.display()
    );
    assert!(
        worker_out.status.success(),
        "the worker exited with {} after SIGTERM ({})",
        worker_out.status,
        worker_out.stderr_path.display()
    );
    let summary: &Value = &report.summary;
    eprintln!("{name}: {spans} spans, all with container.id {container_id}; summary {summary}");
}

/// The agent image with the measured capabilities, the worker in its own container.
#[test]
fn a_worker_in_its_own_container_is_captured_by_the_agent_image_run_as_the_daemonset() {
    workers_in_containers(
        "a_worker_in_its_own_container_is_captured_by_the_agent_image_run_as_the_daemonset",
        true,
    );
}

/// The agent on the host, the worker in its own container: the worker's libssl is at
/// the same path as the host's, and must be probed as the worker's file.
#[test]
fn a_worker_in_its_own_container_is_captured_by_an_agent_on_the_host() {
    workers_in_containers(
        "a_worker_in_its_own_container_is_captured_by_an_agent_on_the_host",
        false,
    );
}
