//! The agent daemon (`openbox-agent run`) as the end-to-end tests start and stop it.

use std::{
    fs,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use openbox_testkit::Proc;
use serde_json::Value;

use crate::{Env, START_TIMEOUT};

/// `openbox-agent run --socket S --events E --unattributed U`.
pub struct Agent {
    proc: Proc,
    pub socket: PathBuf,
    pub events: PathBuf,
    pub unattributed: PathBuf,
}

/// What the agent reported over one test.
#[derive(Debug)]
pub struct AgentReport {
    pub status: ExitStatus,
    /// The `{"type":"summary",…}` line it wrote to stderr on SIGTERM.
    pub summary: Value,
    pub stderr: String,
    /// The events file, one governance event per line.
    pub events: Vec<Value>,
    /// The unattributed file: `{"reason", "pid", "span"}` per line.
    pub unattributed: Vec<Value>,
    pub stderr_path: PathBuf,
    pub events_path: PathBuf,
    pub unattributed_path: PathBuf,
}

pub(crate) fn json_lines(path: &Path, what: &str) -> Vec<Value> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("reading {}: {e}", path.display()),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "line {} of the agent's {what} file {} is not JSON ({e}): {l:?}",
                    i + 1,
                    path.display()
                )
            })
        })
        .collect()
}

impl Agent {
    /// Starts the daemon and waits until its socket accepts connections.
    pub fn start(env: &Env, logs: &Path, socket: &Path) -> Agent {
        let events = logs.join("events.jsonl");
        let unattributed = logs.join("unattributed.jsonl");
        let mut cmd = Command::new(&env.agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(socket)
            .arg("--events")
            .arg(&events)
            .arg("--unattributed")
            .arg(&unattributed)
            .env(
                "OPENBOX_LOG",
                std::env::var("OPENBOX_LOG").unwrap_or_else(|_| "info".into()),
            );
        Agent::spawn(cmd, logs, socket, &events, &unattributed)
    }

    /// Starts `cmd`, an `openbox-agent run` however wrapped (e.g. `podman run`) that
    /// serves `socket` and writes `events` and `unattributed` (paths as the test sees
    /// them), and waits until the socket accepts connections.
    pub fn spawn(
        cmd: Command,
        logs: &Path,
        socket: &Path,
        events: &Path,
        unattributed: &Path,
    ) -> Agent {
        let mut proc = Proc::spawn("agent", cmd, logs);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "`openbox-agent run` exited ({status}) before its socket {} accepted a connection\nstderr: {}",
                    socket.display(),
                    proc.stderr_tail()
                );
            }
            if UnixStream::connect(socket).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "`openbox-agent run` did not accept connections on {} within {START_TIMEOUT:?}\nstderr: {}",
                    socket.display(),
                    proc.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        Agent {
            proc,
            socket: socket.to_path_buf(),
            events: events.to_path_buf(),
            unattributed: unattributed.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGTERM, wait for the drain, and read everything it reported. The agent must exit
    /// 0 and end with the summary line on stderr.
    pub fn stop(mut self) -> AgentReport {
        let (status, in_time) = self
            .proc
            .stop_leader(libc::SIGTERM, Duration::from_secs(60));
        let stderr = self.proc.stderr_text();
        assert!(
            in_time,
            "`openbox-agent run` did not exit within 60 s of SIGTERM (killed)\nstderr: {}",
            self.proc.stderr_tail()
        );
        assert!(
            status.success(),
            "`openbox-agent run` exited with {status} after SIGTERM, expected 0\nstderr: {}",
            self.proc.stderr_tail()
        );
        let summary = stderr
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find(|v| v.get("type").and_then(Value::as_str) == Some("summary"))
            .unwrap_or_else(|| {
                panic!(
                    "`openbox-agent run` wrote no {{\"type\":\"summary\",…}} line to stderr on SIGTERM\nstderr: {}",
                    self.proc.stderr_tail()
                )
            });
        AgentReport {
            status,
            summary,
            events: json_lines(&self.events, "events"),
            unattributed: json_lines(&self.unattributed, "unattributed"),
            stderr,
            stderr_path: self.proc.stderr.clone(),
            events_path: self.events.clone(),
            unattributed_path: self.unattributed.clone(),
        }
    }
}

impl AgentReport {
    pub fn summary_u64(&self, key: &str) -> u64 {
        self.summary
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| {
                panic!(
                    "the agent's summary has no integer {key:?}: {} ({})",
                    self.summary,
                    self.stderr_path.display()
                )
            })
    }

    /// Events of one `event_type`.
    pub fn events_of(&self, event_type: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e.get("event_type").and_then(Value::as_str) == Some(event_type))
            .collect()
    }
}
