//! The Python worker with the hook (support/worker.py) and the client that runs the
//! workflows (support/client.py).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use openbox_testkit::{tail, Proc};
use serde_json::{json, Value};

use crate::{Env, Shared, CLIENT_TIMEOUT, START_TIMEOUT};

/// support/worker.py, with the hook pointed at `socket`.
pub struct Worker {
    pub(crate) proc: Proc,
}

/// What the worker left behind.
pub struct WorkerOutput {
    pub status: ExitStatus,
    pub stderr: String,
    pub stderr_path: PathBuf,
}

#[derive(Clone, Debug)]
pub struct WorkerOpts {
    /// Threads of the executor sync activities run on.
    pub threads: usize,
    /// `max_concurrent_activities`.
    pub max_concurrent: usize,
    /// Run it as `unshare --pid --fork --mount-proc <python> worker.py` (its own PID
    /// namespace, where it is pid 1).
    pub unshare: bool,
    /// Open the worker-wide httpx client (5 connections) and asyncpg pool (5) that
    /// activities with `"shared": true` use.
    pub shared_pools: bool,
    /// Extra environment of the worker (e.g. `OPENBOX_GOVERNANCE_POLICY`).
    pub env: Vec<(String, String)>,
    /// Base URLs the worker keeps a slow request on its way to, from before it starts,
    /// on the one shared aiohttp session `pooled_http` activities use.
    pub background: Vec<String>,
    /// Trace the worker itself (Temporal's `TracingInterceptor` before the hook), its
    /// spans sent to this OTLP/HTTP traces URL.
    pub otel_traces_url: Option<String>,
}

impl Default for WorkerOpts {
    fn default() -> WorkerOpts {
        WorkerOpts {
            threads: 8,
            max_concurrent: 100,
            unshare: false,
            shared_pools: false,
            env: Vec::new(),
            background: Vec::new(),
            otel_traces_url: None,
        }
    }
}

impl Worker {
    pub fn start(
        env: &Env,
        logs: &Path,
        shared: &Shared,
        task_queue: &str,
        socket: &Path,
        opts: &WorkerOpts,
    ) -> Worker {
        let mut cmd = if opts.unshare {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
                .arg(&env.python)
                .arg("-u")
                .arg(env.script("worker.py"))
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .env("PYTHONUNBUFFERED", "1");
            c
        } else {
            env.python(&env.script("worker.py"))
        };
        cmd.arg("--address")
            .arg(&shared.temporal)
            .arg("--task-queue")
            .arg(task_queue)
            .arg("--socket")
            .arg(socket)
            .arg("--threads")
            .arg(opts.threads.to_string())
            .arg("--max-concurrent")
            .arg(opts.max_concurrent.to_string())
            .env("OPENBOX_AGENT_SOCKET", socket)
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(url) = &opts.otel_traces_url {
            cmd.arg("--otel-traces-url").arg(url);
        }
        if opts.shared_pools {
            cmd.arg("--https-base")
                .arg(format!("https://127.0.0.1:{}", shared.https_port))
                .arg("--pg-port")
                .arg(shared.pg_port.to_string());
        }
        for base in &opts.background {
            cmd.arg("--background").arg(base);
        }
        let mut proc = Proc::spawn("worker", cmd, logs);
        proc.wait_for_line("`ready`", START_TIMEOUT, |l| l.starts_with("ready"));
        Worker { proc }
    }

    /// Starts `cmd`, a support/worker.py however wrapped (e.g. `podman run`), and waits
    /// for its `ready` line.
    pub fn spawn(cmd: Command, logs: &Path) -> Worker {
        let mut proc = Proc::spawn("worker", cmd, logs);
        proc.wait_for_line("`ready`", START_TIMEOUT, |l| l.starts_with("ready"));
        Worker { proc }
    }

    /// The worker's pid in the test's PID namespace (for an unshared worker: the pid of
    /// `unshare`, not of the worker).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGTERM (the worker shuts down cleanly), then its stderr.
    pub fn stop(mut self) -> WorkerOutput {
        let (status, _) = self.proc.stop(libc::SIGTERM, Duration::from_secs(30));
        WorkerOutput {
            status,
            stderr: self.proc.stderr_text(),
            stderr_path: self.proc.stderr.clone(),
        }
    }

    pub fn stderr_tail(&self) -> String {
        self.proc.stderr_tail()
    }
}

/// One workflow's outcome from support/client.py: `{"id", "ok", "result"|"error"}`.
pub type Outcome = Value;

/// Starts the `Fanout` workflows (id, plan) and waits for all of them.
pub fn run_workflows(
    env: &Env,
    logs: &Path,
    shared: &Shared,
    task_queue: &str,
    workflows: &[(String, Value)],
    worker: &Worker,
) -> Vec<Outcome> {
    let plan = json!({
        "workflows": workflows.iter().map(|(id, arg)| json!({"id": id, "arg": arg})).collect::<Vec<_>>()
    });
    let plan_path = logs.join("plan.json");
    fs::write(&plan_path, serde_json::to_vec_pretty(&plan).unwrap()).expect("writing the plan");
    let mut cmd = env.python(&env.script("client.py"));
    cmd.arg("--address")
        .arg(&shared.temporal)
        .arg("--task-queue")
        .arg(task_queue)
        .arg("--plan")
        .arg(&plan_path)
        .arg("--timeout")
        .arg(CLIENT_TIMEOUT.as_secs().to_string());
    let mut proc = Proc::spawn("client", cmd, logs);
    let status = proc.wait(CLIENT_TIMEOUT + Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "the workflow client did not finish within {CLIENT_TIMEOUT:?}\nclient stderr: {}\nworker stderr: {}",
            proc.stderr_tail(),
            worker.stderr_tail()
        )
    });
    assert!(
        status.success(),
        "the workflow client failed ({status})\nclient stderr: {}\nworker stderr: {}",
        proc.stderr_tail(),
        worker.stderr_tail()
    );
    let out: Value = serde_json::from_str(proc.stdout_text().trim()).unwrap_or_else(|e| {
        panic!(
            "the client's stdout is not JSON ({e}): {}",
            tail(&proc.stdout, 2000)
        )
    });
    out["workflows"].as_array().cloned().unwrap_or_default()
}

/// Every workflow completed and every one of its activities returned.
#[track_caller]
pub fn assert_workflows_ok(outcomes: &[Outcome], worker_log: &Path) {
    let mut bad = Vec::new();
    for wf in outcomes {
        if wf["ok"] != json!(true) {
            bad.push(format!("workflow {}: {}", wf["id"], wf["error"]));
            continue;
        }
        for (i, a) in wf["result"].as_array().into_iter().flatten().enumerate() {
            if a["ok"] != json!(true) {
                bad.push(format!(
                    "workflow {} activity #{i}: {}",
                    wf["id"], a["error"]
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} workflow(s)/activities failed (worker log: {}):\n{}",
        bad.len(),
        worker_log.display(),
        bad.join("\n")
    );
}
