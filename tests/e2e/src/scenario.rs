//! A test's world: the shared servers, its own agent and worker, its workflows.

use std::{fs, path::PathBuf};

use openbox_testkit::{unique, TempDir};
use serde_json::{json, Value};

use crate::{
    assert_workflows_ok, logs_dir, run_workflows, shared, Agent, AgentReport, Env, Outcome, Shared,
    Worker, WorkerOpts, WorkerOutput,
};

/// Options for [`Scenario::start`].
#[derive(Clone, Debug)]
pub struct ScenarioOpts {
    /// Start the agent daemon (otherwise the worker's socket path names no file).
    pub agent: bool,
    /// More arguments to `openbox-agent run`.
    pub agent_args: Vec<String>,
    pub worker: WorkerOpts,
}

impl Default for ScenarioOpts {
    fn default() -> ScenarioOpts {
        ScenarioOpts {
            agent: true,
            agent_args: Vec::new(),
            worker: WorkerOpts::default(),
        }
    }
}

/// One test's processes on the shared servers: its agent (optional) and its worker.
/// Field order is drop order: the worker stops before the agent.
pub struct Scenario {
    pub worker: Option<Worker>,
    pub agent: Option<Agent>,
    pub env: Env,
    pub shared: Shared,
    pub name: String,
    pub logs: PathBuf,
    /// Marker prefix of this run (`mk<8 hex>`).
    pub token: String,
    pub task_queue: String,
    pub socket: PathBuf,
    /// Where the activities write their files.
    pub files: PathBuf,
    pub tmp: TempDir,
}

/// What a finished scenario left.
pub struct Finished {
    pub worker: WorkerOutput,
    pub agent: Option<AgentReport>,
    pub token: String,
    pub logs: PathBuf,
}

impl Scenario {
    pub fn start(name: &str, opts: ScenarioOpts) -> Scenario {
        let env = Env::get();
        let shared = shared(&env);
        let logs = logs_dir(name);
        let tmp = TempDir::new("run");
        let files = tmp.join("files");
        fs::create_dir_all(&files).expect("creating the activities' file directory");
        let socket = tmp.join("agent.sock");
        let id = unique();
        let agent = opts
            .agent
            .then(|| Agent::start_with(&env, &logs, &socket, &opts.agent_args));
        let task_queue = format!("tq-{name}-{id}");
        let worker = Worker::start(&env, &logs, &shared, &task_queue, &socket, &opts.worker);
        Scenario {
            worker: Some(worker),
            agent,
            env,
            shared,
            name: name.to_string(),
            logs,
            token: format!("mk{id}"),
            task_queue,
            socket,
            files,
            tmp,
        }
    }

    /// The marker of activity `i`: `<token>-NNN`.
    pub fn marker(&self, i: usize) -> String {
        format!("{}-{i:03}", self.token)
    }

    /// Workflow id `k` of this run (holds no marker).
    pub fn workflow_id(&self, k: usize) -> String {
        format!("wf-{}-{k}-{}", self.name, &self.token[2..])
    }

    /// The parameters every activity of support/worker.py takes, for activity `i`.
    pub fn item(&self, i: usize) -> Value {
        json!({
            "marker": self.marker(i),
            "https_base": format!("https://127.0.0.1:{}", self.shared.https_port),
            "pg_port": self.shared.pg_port,
            "dir": self.files.display().to_string(),
        })
    }

    pub fn worker(&self) -> &Worker {
        self.worker
            .as_ref()
            .expect("the worker runs until finish()")
    }

    /// Runs the workflows and fails the test unless all of them, and all their
    /// activities, succeeded.
    pub fn run_ok(&self, workflows: &[(String, Value)]) -> Vec<Outcome> {
        let out = self.run(workflows);
        assert_workflows_ok(&out, &self.worker().proc.stderr);
        out
    }

    /// Runs the workflows; their outcomes, whatever they are.
    pub fn run(&self, workflows: &[(String, Value)]) -> Vec<Outcome> {
        run_workflows(
            &self.env,
            &self.logs,
            &self.shared,
            &self.task_queue,
            workflows,
            self.worker(),
        )
    }

    /// Stops the worker, then the agent (which drains and writes its summary).
    pub fn finish(mut self) -> Finished {
        let worker = self.worker.take().expect("finish() once").stop();
        let agent = self.agent.take().map(Agent::stop);
        Finished {
            worker,
            agent,
            token: self.token.clone(),
            logs: self.logs.clone(),
        }
    }
}
