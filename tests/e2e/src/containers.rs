//! The agent image run as the DaemonSet runs it, and a worker in a container of its own
//! (tests/e2e/tests/containers.rs). Both images are built by `cargo xtask test`
//! (xtask/src/image.rs), which names them in `OPENBOX_AGENT_IMAGE` and
//! `OPENBOX_WORKER_IMAGE`; podman runs with the options this machine needs and
//! `CONTAINERS_CONF` from the same place.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use openbox_testkit::{unique, FIX};

use crate::{Agent, Env, Shared, Worker, WorkerOpts};

/// The capabilities the agent's container gets: the set deploy/README.md lists under
/// "Privileges (measured)", and all the agent needs (the test fails without any one of
/// them, see that section for what fails).
pub const AGENT_CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "KILL",
    // Attaching a uprobe from a container fails without it (perf_event_open: EPERM);
    // see deploy/README.md.
    "SYS_ADMIN",
];

/// Where support/worker.py is mounted in the worker's container.
const SCRIPTS_IN_CONTAINER: &str = "/opt/openbox-e2e";
/// The hook socket's directory, in both containers (the hostPath `/run/openbox`).
const SOCKET_DIR_IN_CONTAINER: &str = "/run/openbox";
/// Where the worker's activities write their files: in the worker's own root
/// filesystem, a path that exists nowhere else.
pub const FILES_IN_WORKER: &str = "/srv/openbox-e2e-files";

fn image(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: `cargo xtask test` builds the image and sets it; {FIX}")
    })
}

/// `podman` with this machine's runtime options (design.md: crun refuses the hybrid
/// cgroup layout; `CONTAINERS_CONF` comes from `cargo xtask test`).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

/// A named container, removed (whatever state it is in) when this drops: a test that
/// panics, or a `podman run` killed before it could clean up, leaves none behind.
pub struct Container {
    pub name: String,
}

impl Container {
    fn new(role: &str) -> Container {
        let name = format!("openbox-e2e-{role}-{}", unique());
        Container { name }
    }

    /// The full container id, as podman knows it.
    pub fn id(&self) -> String {
        let out = podman()
            .args(["inspect", "--format", "{{.Id}}", &self.name])
            .output()
            .expect("running podman inspect");
        assert!(
            out.status.success(),
            "podman inspect {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

/// The socket directory both containers mount, and the agent's output directory.
pub struct HostDirs {
    pub socket_dir: PathBuf,
    pub spool: PathBuf,
    pub out: PathBuf,
}

impl HostDirs {
    pub fn new(root: &Path) -> HostDirs {
        let d = HostDirs {
            socket_dir: root.join("run-openbox"),
            spool: root.join("var-lib-openbox-agent"),
            out: root.join("agent-out"),
        };
        for p in [&d.socket_dir, &d.spool, &d.out] {
            fs::create_dir_all(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        }
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.socket_dir.join("agent.sock")
    }
}

/// `podman run` of the agent image as the DaemonSet runs it: the host's PID namespace,
/// no capability but [`AGENT_CAPABILITIES`], tracefs and BTF from the host, the hook
/// socket's directory and the spool as host directories. Its events and unattributed
/// spans go to `dirs.out`.
pub fn start_agent_container(logs: &Path, dirs: &HostDirs) -> (Agent, Container) {
    let container = Container::new("agent");
    let mut cmd = podman();
    cmd.args(["run", "--rm", "--name", &container.name])
        .arg("--pid=host")
        .arg("--network=host")
        .arg("--cap-drop=all")
        // The default seccomp profile lets bpf(2) and perf_event_open(2) through only
        // with CAP_SYS_ADMIN: with CAP_BPF alone, creating the ring buffer fails (EPERM).
        .args(["--security-opt", "seccomp=unconfined"]);
    // OPENBOX_E2E_AGENT_CAPS (comma-separated) replaces the set: how deploy/README.md's
    // "Privileges (measured)" was measured, one capability left out at a time.
    let caps: Vec<String> = match std::env::var("OPENBOX_E2E_AGENT_CAPS") {
        Ok(v) => v
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect(),
        Err(_) => AGENT_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
    };
    for cap in &caps {
        cmd.arg(format!("--cap-add={cap}"));
    }
    cmd.args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing"])
        .args(["-v", "/sys/kernel/btf:/sys/kernel/btf:ro"])
        // The pinned map of paused processes outlives the container (as in the manifests).
        .args(["-v", "/sys/fs/bpf:/sys/fs/bpf"])
        .arg("-v")
        .arg(format!(
            "{}:{SOCKET_DIR_IN_CONTAINER}",
            dirs.socket_dir.display()
        ))
        .arg("-v")
        .arg(format!("{}:/var/lib/openbox-agent", dirs.spool.display()))
        .arg("-v")
        .arg(format!("{}:/out", dirs.out.display()))
        .args(["-e", "OPENBOX_LOG=info"])
        .arg(image("OPENBOX_AGENT_IMAGE"))
        .args([
            "run",
            "--events",
            "/out/events.jsonl",
            "--unattributed",
            "/out/unattributed.jsonl",
            // As the DaemonSet serves its probes; host network, so the test scrapes it.
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
    let agent = Agent::spawn(
        cmd,
        logs,
        &dirs.socket(),
        &dirs.out.join("events.jsonl"),
        &dirs.out.join("unattributed.jsonl"),
    );
    (agent, container)
}

/// `podman run` of the worker image: its own root filesystem (Python, temporalio, libssl,
/// the hook), its own PID namespace, the host's network (the Temporal dev server and the
/// fixture servers listen on 127.0.0.1), the hook socket's directory mounted in.
pub fn start_worker_container(
    env: &Env,
    logs: &Path,
    shared: &Shared,
    task_queue: &str,
    dirs: &HostDirs,
    opts: &WorkerOpts,
) -> (Worker, Container) {
    let container = Container::new("worker");
    let socket = format!("{SOCKET_DIR_IN_CONTAINER}/agent.sock");
    let mut cmd = podman();
    cmd.args(["run", "--rm", "--name", &container.name])
        .arg("--network=host")
        .arg("-v")
        .arg(format!(
            "{}:{SOCKET_DIR_IN_CONTAINER}",
            dirs.socket_dir.display()
        ))
        .arg("-v")
        .arg(format!(
            "{}:{SCRIPTS_IN_CONTAINER}:ro",
            env.scripts.display()
        ))
        .args(["-e", &format!("OPENBOX_AGENT_SOCKET={socket}")])
        .args(["-e", "OPENBOX_POD_NAME=worker-pod-0"])
        .args(["-e", "OPENBOX_POD_NAMESPACE=e2e"])
        .arg(image("OPENBOX_WORKER_IMAGE"))
        .args(["sh", "-c"])
        .arg(format!(
            "mkdir -p {FILES_IN_WORKER} && exec python -u {SCRIPTS_IN_CONTAINER}/worker.py \"$@\""
        ))
        .arg("worker.py")
        .arg("--address")
        .arg(&shared.temporal)
        .arg("--task-queue")
        .arg(task_queue)
        .arg("--socket")
        .arg(&socket)
        .arg("--threads")
        .arg(opts.threads.to_string())
        .arg("--max-concurrent")
        .arg(opts.max_concurrent.to_string());
    (Worker::spawn(cmd, logs), container)
}
