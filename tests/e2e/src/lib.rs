//! Harness for the end-to-end tests: a real Temporal dev server, a real Python worker
//! with the OpenBox hook (support/worker.py), the agent daemon (`openbox-agent run`),
//! and the integration tests' fixture servers (an HTTPS server, a throwaway
//! PostgreSQL), all on 127.0.0.1.
//!
//! - Every process is started in its own process group, with `PR_SET_PDEATHSIG`
//!   (SIGKILL) set by a thread that lives as long as the test binary, so nothing
//!   outlives the tests even when the binary is killed; a test's processes are stopped
//!   (SIGTERM to the group, then SIGKILL) when their handle drops, also on panic.
//! - The Temporal dev server, the HTTPS server and PostgreSQL are shared by the tests of
//!   one binary ([`shared`]; they hold no state a test depends on) and stopped at exit.
//!   Each test has its own task queue, workflow ids and markers, its own agent and its
//!   own worker, so tests do not depend on their order.
//! - Every process's output goes to `target/e2e-runs/<test>/`, named in failure
//!   messages.
//!
//! The marker scheme: each activity gets a unique marker (`mk<hex>-NNN`) that it puts in
//! its HTTPS URL, its SQL text and its file name, so a captured span names the activity
//! that must own it; [`check_attribution`] compares that with what the agent reported.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::TcpListener,
    os::unix::{net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

const START_TIMEOUT: Duration = Duration::from_secs(90);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
const FIX: &str = "run `cargo xtask test` (it builds the agent, sets up the test environment and exports the OPENBOX_* variables)";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/e2e lives two levels below the workspace root")
        .to_path_buf()
}

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

/// What `cargo xtask test` provides (xtask/src/env.rs).
#[derive(Clone, Debug)]
pub struct Env {
    /// The fixtures' virtualenv python (temporalio, httpx, asyncpg, psycopg2, requests,
    /// and the hook installed from hooks/python).
    pub python: PathBuf,
    /// openbox-agent/tests/support: tls_server.py, pg_server.py.
    pub fixtures: PathBuf,
    /// tests/e2e/support: worker.py, client.py, forge.py.
    pub scripts: PathBuf,
    pub pg_bin: PathBuf,
    pub agent: PathBuf,
    pub temporal: PathBuf,
    pub hook_dir: PathBuf,
}

fn env_path(name: &str) -> PathBuf {
    let p = std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: {FIX}"));
    assert!(p.exists(), "{name}={} does not exist: {FIX}", p.display());
    p
}

impl Env {
    /// The environment; fails the test (never skips it) when anything is missing.
    pub fn get() -> Env {
        let env = Env {
            python: env_path("OPENBOX_TEST_PYTHON"),
            fixtures: env_path("OPENBOX_TEST_SUPPORT"),
            scripts: Path::new(env!("CARGO_MANIFEST_DIR")).join("support"),
            pg_bin: env_path("OPENBOX_PG_BIN"),
            agent: env_path("OPENBOX_AGENT_BIN"),
            temporal: env_path("OPENBOX_TEMPORAL_BIN"),
            hook_dir: env_path("OPENBOX_HOOK_DIR"),
        };
        static HOOK_CHECKED: OnceLock<()> = OnceLock::new();
        HOOK_CHECKED.get_or_init(|| env.check_hook());
        env
    }

    /// The hook must be installed in the virtualenv (setup-env does it from hooks/python).
    fn check_hook(&self) {
        let out = Command::new(&self.python)
            .args([
                "-c",
                "import openbox_hook; from openbox_hook import OpenBoxHook; print(openbox_hook.__file__)",
            ])
            .current_dir("/")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.python.display()));
        assert!(
            out.status.success(),
            "the worker hook is not importable in {} ({}): {} must hold the hook package and `cargo xtask setup-env` installs it; {FIX}",
            self.python.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.hook_dir.display()
        );
    }

    pub fn fixture(&self, name: &str) -> PathBuf {
        self.fixtures.join(name)
    }

    pub fn script(&self, name: &str) -> PathBuf {
        self.scripts.join(name)
    }

    /// `<venv python> -u <script>` with the environment every Python process here gets.
    fn python(&self, script: &Path) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg("-u")
            .arg(script)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1");
        cmd
    }
}

// ---------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------

fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // FNV-1a of the three, so two runs (or two tests) never share a value.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in nanos
        .to_le_bytes()
        .into_iter()
        .chain(std::process::id().to_le_bytes())
        .chain(n.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:08x}", h as u32)
}

/// A directory under the system temp dir, removed on drop. Short paths: the agent's
/// socket lives here (a Unix socket path has at most 107 bytes).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("obx-e2e-{label}-{}", unique()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `target/e2e-runs/<name>/`, emptied at the start: every process's output of one
/// test, kept after the test for its reader.
pub fn logs_dir(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/e2e-runs").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives until the test binary exits: the children's
/// `PR_SET_PDEATHSIG` fires when the thread that forked them ends, so forking from a
/// test's own thread would kill them when that test ends, and forking from no thread in
/// particular would leave them running if the binary were killed.
fn spawn_kept(mut cmd: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        thread::Builder::new()
            .name("e2e-process-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the process keeper thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl and getppid are async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.process_group(0);
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, tx))
        .expect("the process keeper thread is gone");
    rx.recv().expect("the process keeper thread is gone")
}

/// A process (group) started by the harness, its stdout and stderr in files. Dropping
/// it stops the whole group.
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// The end of a file's text, for failure messages.
pub fn tail(path: &Path, max: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    format!(
        "{}{} (all of it: {})",
        if start > 0 { "…" } else { "" },
        &text[start..],
        path.display()
    )
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `<logs>/<name>.stdout|.stderr`.
    pub fn spawn(name: &str, mut cmd: Command, logs: &Path) -> Proc {
        let stdout = logs.join(format!("{name}.stdout"));
        let stderr = logs.join(format!("{name}.stderr"));
        let file = |p: &Path| {
            fs::File::create(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()))
        };
        cmd.stdin(Stdio::null())
            .stdout(file(&stdout))
            .stderr(file(&stderr));
        let shown = format!("{cmd:?}");
        let child = spawn_kept(cmd).unwrap_or_else(|e| panic!("starting {name} ({shown}): {e}"));
        let _ = fs::write(logs.join(format!("{name}.command")), &shown);
        Proc {
            name: name.to_string(),
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                self.kill_group(libc::SIGKILL);
            }
        }
        self.status
    }

    pub fn stdout_text(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stderr_tail(&self) -> String {
        tail(&self.stderr, 6000)
    }

    /// The first complete stdout line `pred` accepts; fails the test when the process
    /// exits or `timeout` passes first.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stdout_text();
            let complete = text.rfind('\n').map_or("", |i| &text[..i]);
            if let Some(line) = complete.lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before {what}\nstdout: {}\nstderr: {}",
                    self.name,
                    tail(&self.stdout, 2000),
                    self.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not show {what} within {timeout:?}\nstdout: {}\nstderr: {}",
                    self.name,
                    tail(&self.stdout, 2000),
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first stdout line, as a port number (the fixture servers print theirs).
    pub fn port(&mut self) -> u16 {
        let line = self.wait_for_line("its port", START_TIMEOUT, |_| true);
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{} printed {line:?}, not a port", self.name))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_group(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the process group we created (pgid = the leader's pid).
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), sig) };
    }

    /// `sig` to the whole group, then SIGKILL after `grace`. Returns the leader's status
    /// and whether it exited within the grace period.
    pub fn stop(&mut self, sig: libc::c_int, grace: Duration) -> (ExitStatus, bool) {
        if let Some(s) = self.exited() {
            return (s, true);
        }
        self.kill_group(sig);
        if let Some(s) = self.wait(grace) {
            return (s, true);
        }
        self.kill_group(libc::SIGKILL);
        let s = self.child.wait().expect("waiting for a killed child");
        self.status = Some(s);
        (s, false)
    }

    /// `sig` to the leader only (for a daemon whose summary we want), then SIGKILL to the
    /// group after `grace`.
    pub fn stop_leader(&mut self, sig: libc::c_int, grace: Duration) -> (ExitStatus, bool) {
        if let Some(s) = self.exited() {
            return (s, true);
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        if let Some(s) = self.wait(grace) {
            return (s, true);
        }
        self.stop(libc::SIGKILL, Duration::from_secs(5))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM, Duration::from_secs(15));
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port on 127.0.0.1")
}

// ---------------------------------------------------------------------------------------
// Servers shared by the tests of one binary
// ---------------------------------------------------------------------------------------

/// `temporal server start-dev` on free ports, with its own database file.
pub struct TemporalServer {
    pub address: String,
    proc: Proc,
    _dir: TempDir,
}

impl TemporalServer {
    pub fn start(env: &Env, logs: &Path) -> TemporalServer {
        let mut last_error = String::new();
        // The port is free when we pick it but could be taken before the server binds
        // it: try again with another.
        for _ in 0..3 {
            let dir = TempDir::new("temporal");
            let port = free_port();
            let mut cmd = Command::new(&env.temporal);
            cmd.args([
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .arg("--db-filename")
            .arg(dir.join("temporal.db"))
            .args(["--log-level", "warn"]);
            let mut proc = Proc::spawn("temporal", cmd, logs);
            let address = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if proc.exited().is_some() {
                    last_error = format!("it exited: {}", proc.stderr_tail());
                    break;
                }
                let ready = Command::new(&env.temporal)
                    .args(["operator", "namespace", "describe", "default", "--address"])
                    .arg(&address)
                    .args(["--command-timeout", "5s"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ready {
                    return TemporalServer {
                        address,
                        proc,
                        _dir: dir,
                    };
                }
                if Instant::now() > deadline {
                    panic!(
                        "the Temporal dev server on {address} did not answer `temporal operator namespace describe default` within {START_TIMEOUT:?}: {}",
                        proc.stderr_tail()
                    );
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
        panic!("the Temporal dev server did not start: {last_error}");
    }
}

/// tls_server.py (HTTPS, self-signed; answers `echo:GET <path> 0`).
pub fn start_https(env: &Env, logs: &Path) -> (Proc, u16) {
    let mut cmd = env.python(&env.fixture("tls_server.py"));
    cmd.arg("0");
    let mut proc = Proc::spawn("https-server", cmd, logs);
    let port = proc.port();
    (proc, port)
}

/// pg_server.py: PostgreSQL over TLS, user `openbox`, database `shop`.
pub fn start_postgres(env: &Env, logs: &Path) -> (Proc, u16) {
    let mut cmd = env.python(&env.fixture("pg_server.py"));
    cmd.arg("--pg-bin").arg(&env.pg_bin).arg("0");
    let mut proc = Proc::spawn("postgres", cmd, logs);
    let port = proc.port();
    (proc, port)
}

/// The servers the tests of one binary share.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The Temporal frontend, `127.0.0.1:PORT`.
    pub temporal: String,
    pub https_port: u16,
    pub pg_port: u16,
    pub logs: PathBuf,
}

struct SharedProcs {
    procs: Vec<Proc>,
    _temporal_dir: Option<TempDir>,
}

static SHARED_PROCS: Mutex<Option<SharedProcs>> = Mutex::new(None);

extern "C" fn stop_shared_servers() {
    // At exit: the tests are over. try_lock: a test thread that panicked holding the
    // lock must not hang the exit (the PDEATHSIG still kills the servers then).
    if let Ok(mut guard) = SHARED_PROCS.try_lock() {
        if let Some(mut shared) = guard.take() {
            for p in &mut shared.procs {
                p.stop(libc::SIGTERM, Duration::from_secs(10));
            }
        }
    }
}

/// The shared servers, started on first use (logs in `target/e2e-runs/shared-<binary>/`)
/// and stopped when the test binary exits. Fails the test if one of them has died.
pub fn shared(env: &Env) -> Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let binary = std::env::args()
            .next()
            .and_then(|a| {
                Path::new(&a)
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
            })
            // `attribution-0123abcd…`: the test file's name without cargo's hash.
            .map(|f| f.rsplit_once('-').map_or(f.clone(), |(n, _)| n.to_string()))
            .unwrap_or_else(|| "tests".into());
        let logs = logs_dir(&format!("shared-{binary}"));
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(stop_shared_servers) };
        let TemporalServer {
            address,
            proc: temporal,
            _dir,
        } = TemporalServer::start(env, &logs);
        let (https, https_port) = start_https(env, &logs);
        let (pg, pg_port) = start_postgres(env, &logs);
        *SHARED_PROCS.lock().unwrap_or_else(|p| p.into_inner()) = Some(SharedProcs {
            procs: vec![temporal, https, pg],
            _temporal_dir: Some(_dir),
        });
        Shared {
            temporal: address,
            https_port,
            pg_port,
            logs,
        }
    });
    let mut guard = SHARED_PROCS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(procs) = guard.as_mut() {
        for p in &mut procs.procs {
            if let Some(status) = p.exited() {
                panic!(
                    "the shared {} server exited ({status}) during the tests: {}",
                    p.name(),
                    p.stderr_tail()
                );
            }
        }
    }
    shared.clone()
}

// ---------------------------------------------------------------------------------------
// The agent daemon
// ---------------------------------------------------------------------------------------

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

fn json_lines(path: &Path, what: &str) -> Vec<Value> {
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
            events,
            unattributed,
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

// ---------------------------------------------------------------------------------------
// Worker and client
// ---------------------------------------------------------------------------------------

/// support/worker.py, with the hook pointed at `socket`.
pub struct Worker {
    proc: Proc,
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
}

impl Default for WorkerOpts {
    fn default() -> WorkerOpts {
        WorkerOpts {
            threads: 8,
            max_concurrent: 100,
            unshare: false,
            shared_pools: false,
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
            .env("OPENBOX_AGENT_SOCKET", socket);
        if opts.shared_pools {
            cmd.arg("--https-base")
                .arg(format!("https://127.0.0.1:{}", shared.https_port))
                .arg("--pg-port")
                .arg(shared.pg_port.to_string());
        }
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

// ---------------------------------------------------------------------------------------
// A test's world
// ---------------------------------------------------------------------------------------

/// Options for [`Scenario::start`].
#[derive(Clone, Debug)]
pub struct ScenarioOpts {
    /// Start the agent daemon (otherwise the worker's socket path names no file).
    pub agent: bool,
    pub worker: WorkerOpts,
}

impl Default for ScenarioOpts {
    fn default() -> ScenarioOpts {
        ScenarioOpts {
            agent: true,
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
        let agent = opts.agent.then(|| Agent::start(&env, &logs, &socket));
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

// ---------------------------------------------------------------------------------------
// Attribution
// ---------------------------------------------------------------------------------------

/// What a marker span is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An HTTP span whose `http.url` holds the marker.
    Https,
    /// A PostgreSQL span whose `db.statement` holds the marker.
    Sql,
    /// A `file.open` span whose `file.path` holds the marker.
    FileOpen,
}

/// An activity attempt the test ran, and what the agent must have reported for it.
#[derive(Clone, Debug)]
pub struct ExpectedActivity {
    pub workflow_id: String,
    pub activity_id: String,
    pub attempt: u64,
    /// `completed` or `failed`.
    pub status: &'static str,
    /// The marker its spans carry (the activity id, plus `-attempt-N` for retries).
    pub marker: String,
    /// Spans it must have.
    pub kinds: Vec<Kind>,
}

impl ExpectedActivity {
    pub fn new(workflow_id: &str, marker: &str, kinds: &[Kind]) -> ExpectedActivity {
        ExpectedActivity {
            workflow_id: workflow_id.to_string(),
            activity_id: marker.to_string(),
            attempt: 1,
            status: "completed",
            marker: marker.to_string(),
            kinds: kinds.to_vec(),
        }
    }
}

/// Every marker (`<token>` followed by `[a-z0-9-]*`) in `text`.
pub fn markers_in_text(text: &str, token: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(token) {
        let after = &rest[i + token.len()..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .unwrap_or(after.len());
        out.push(format!("{token}{}", &after[..len]));
        rest = &after[len..];
    }
    out
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span.get("attributes")?.get(key)?.as_str()
}

/// The markers a span carries in `http.url`, `db.statement` or `file.path`.
pub fn span_markers(span: &Value, token: &str) -> BTreeSet<String> {
    ["http.url", "db.statement", "file.path"]
        .iter()
        .filter_map(|k| attr(span, k))
        .flat_map(|t| markers_in_text(t, token))
        .collect()
}

/// The kinds of marker span this span is, for `marker` (a marker of `token`).
pub fn span_kinds(span: &Value, token: &str, marker: &str) -> Vec<Kind> {
    let mut kinds = Vec::new();
    let has = |key: &str| {
        attr(span, key).is_some_and(|t| markers_in_text(t, token).iter().any(|m| m == marker))
    };
    if has("http.url") {
        kinds.push(Kind::Https);
    }
    if has("db.statement") {
        kinds.push(Kind::Sql);
    }
    if has("file.path") && span.get("name").and_then(Value::as_str) == Some("file.open") {
        kinds.push(Kind::FileOpen);
    }
    kinds
}

fn show_span(span: &Value) -> String {
    format!(
        "{} {} {}",
        span.get("name").and_then(Value::as_str).unwrap_or("?"),
        span.get("span_id").and_then(Value::as_str).unwrap_or("?"),
        span.get("attributes").cloned().unwrap_or(Value::Null)
    )
}

/// How the agent's report compares with the activities the test ran.
#[derive(Debug, Default)]
pub struct Attribution {
    /// Marker spans on an activity other than the marker's (the defect this suite is for).
    pub misattributed: Vec<String>,
    /// (marker, kind) an activity ran but the agent did not put on it.
    pub missing: Vec<(String, Kind)>,
    /// Anything else wrong with the events: a missing ActivityStarted or
    /// ActivityCompleted, a wrong status, a span whose own `activity_id` differs from
    /// its event's, a `span_count` that is not the number of spans.
    pub problems: Vec<String>,
    /// Marker spans in the unattributed file, by reason: the markers.
    pub unattributed: BTreeMap<String, Vec<String>>,
    /// Marker spans on the right activity.
    pub attributed: usize,
}

fn key_of(e: &Value) -> (String, String, u64) {
    (
        e.get("workflow_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        e.get("activity_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        e.get("attempt").and_then(Value::as_u64).unwrap_or(0),
    )
}

/// What is wrong with one ActivityStarted/ActivityCompleted of `exp` against the SDK 1.0
/// format (openbox-core-protocol.md §2.2): field presence and types, the worker's
/// `Fanout` workflow type, the activity's input, and, for ActivityCompleted, status,
/// error and output consistency and every span inside the activity's time window.
pub fn event_shape_problems(e: &Value, exp: &ExpectedActivity) -> Vec<String> {
    let mut p = Vec::new();
    let kind = e.get("event_type").and_then(Value::as_str).unwrap_or("?");
    let nonempty_str = |k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty())
    };
    if e.get("source").and_then(Value::as_str) != Some("workflow-telemetry") {
        p.push(format!("{kind}: source is not \"workflow-telemetry\""));
    }
    for k in ["run_id", "activity_type", "task_queue", "timestamp"] {
        if !nonempty_str(k) {
            p.push(format!("{kind}: {k} missing or not a non-empty string"));
        }
    }
    if e.get("workflow_type").and_then(Value::as_str) != Some("Fanout") {
        p.push(format!(
            "{kind}: workflow_type is {}, expected \"Fanout\"",
            e.get("workflow_type").cloned().unwrap_or(Value::Null)
        ));
    }
    if !e
        .get("timestamp")
        .and_then(Value::as_str)
        .is_some_and(|t| t.ends_with('Z') && t.contains('T'))
    {
        p.push(format!("{kind}: timestamp is not RFC 3339 UTC with Z"));
    }
    // worker.py passes one dict holding the marker: activity_input = [that dict].
    let input_marker = e
        .get("activity_input")
        .and_then(|i| i.get(0))
        .and_then(|d| d.get("marker"))
        .and_then(Value::as_str);
    if input_marker != Some(exp.activity_id.as_str()) {
        p.push(format!(
            "{kind}: activity_input is not [{{\"marker\": {:?}, …}}]: {}",
            exp.activity_id,
            e.get("activity_input").cloned().unwrap_or(Value::Null)
        ));
    }
    if kind != "ActivityCompleted" {
        return p;
    }
    let start = e.get("start_time").and_then(Value::as_f64);
    let end = e.get("end_time").and_then(Value::as_f64);
    match (start, end) {
        (Some(s), Some(t)) if s <= t => {
            // Spans are in Unix ns; the activity's window in float Unix seconds. The
            // kernel clock is converted to wall-clock time: allow 2 s of skew.
            let (lo, hi) = ((s - 2.0) * 1e9, (t + 2.0) * 1e9);
            for span in e
                .get("spans")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (a, b) = (
                    span.get("start_time").and_then(Value::as_f64),
                    span.get("end_time").and_then(Value::as_f64),
                );
                if !matches!((a, b), (Some(a), Some(b)) if a >= lo && b <= hi) {
                    p.push(format!(
                        "span outside the activity's time window [{s}, {t}] s: {}",
                        show_span(span)
                    ));
                }
            }
        }
        _ => p.push(format!(
            "start_time/end_time missing or start after end: {start:?} {end:?}"
        )),
    }
    if e.get("duration_ms").and_then(Value::as_f64).is_none() {
        p.push("duration_ms missing or not a number".into());
    }
    if e.get("span_count").and_then(Value::as_u64).is_none()
        || !e.get("spans").is_some_and(Value::is_array)
    {
        p.push("span_count or spans missing".into());
    }
    match e.get("status").and_then(Value::as_str) {
        Some("completed") => {
            if !e.get("error").is_some_and(Value::is_null) {
                p.push(format!(
                    "completed but error is {}",
                    e.get("error").cloned().unwrap_or(Value::Null)
                ));
            }
            if e.get("activity_output").is_none_or(Value::is_null) {
                p.push("completed but activity_output is null or missing".into());
            }
        }
        Some("failed") => {
            let err = e.get("error");
            if !err.is_some_and(|x| {
                x.get("type").is_some_and(Value::is_string)
                    && x.get("message").is_some_and(Value::is_string)
            }) {
                p.push(format!(
                    "failed but error is not {{type, message}}: {}",
                    err.cloned().unwrap_or(Value::Null)
                ));
            }
            if !e.get("activity_output").is_some_and(Value::is_null) {
                p.push("failed but activity_output is not null".into());
            }
        }
        other => p.push(format!("status is {other:?}")),
    }
    p
}

/// Compares the agent's events and unattributed spans with `expected`. Every marker
/// span (one whose URL, statement or path holds a marker of `token`) found on any
/// ActivityCompleted must be on the activity attempt whose marker it carries.
pub fn check_attribution(
    report: &AgentReport,
    token: &str,
    expected: &[ExpectedActivity],
) -> Attribution {
    let mut out = Attribution::default();
    let by_marker: BTreeMap<&str, &ExpectedActivity> =
        expected.iter().map(|e| (e.marker.as_str(), e)).collect();
    let completed = report.events_of("ActivityCompleted");
    let started: BTreeSet<(String, String, u64)> = report
        .events_of("ActivityStarted")
        .into_iter()
        .map(key_of)
        .collect();
    let mut by_key: BTreeMap<(String, String, u64), Vec<&Value>> = BTreeMap::new();
    for e in &completed {
        by_key.entry(key_of(e)).or_default().push(e);
    }

    for exp in expected {
        let key = (
            exp.workflow_id.clone(),
            exp.activity_id.clone(),
            exp.attempt,
        );
        let who = format!(
            "{} / {} attempt {}",
            exp.workflow_id, exp.activity_id, exp.attempt
        );
        if !started.contains(&key) {
            out.problems.push(format!("no ActivityStarted for {who}"));
        }
        let events = by_key.get(&key).cloned().unwrap_or_default();
        match events.len() {
            0 => {
                out.problems.push(format!("no ActivityCompleted for {who}"));
                for k in &exp.kinds {
                    out.missing.push((exp.marker.clone(), *k));
                }
                continue;
            }
            1 => {}
            n => out
                .problems
                .push(format!("{n} ActivityCompleted events for {who}")),
        }
        let event = events[0];
        for e in events.iter().copied().chain(
            report
                .events_of("ActivityStarted")
                .into_iter()
                .filter(|e| key_of(e) == key),
        ) {
            out.problems.extend(
                event_shape_problems(e, exp)
                    .into_iter()
                    .map(|p| format!("{who}: {p}")),
            );
        }
        let status = event.get("status").and_then(Value::as_str).unwrap_or("");
        if status != exp.status {
            out.problems.push(format!(
                "ActivityCompleted for {who} has status {status:?}, expected {:?} (error: {})",
                exp.status,
                event.get("error").cloned().unwrap_or(Value::Null)
            ));
        }
        let spans: Vec<&Value> = event
            .get("spans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        let have: BTreeSet<Kind> = spans
            .iter()
            .flat_map(|s| span_kinds(s, token, &exp.marker))
            .collect();
        for k in &exp.kinds {
            if !have.contains(k) {
                out.missing.push((exp.marker.clone(), *k));
            }
        }
    }

    for e in &completed {
        let (wf, aid, attempt) = key_of(e);
        let spans: Vec<&Value> = e
            .get("spans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        if let Some(n) = e.get("span_count").and_then(Value::as_u64) {
            if n != spans.len() as u64 {
                out.problems.push(format!(
                    "ActivityCompleted {wf} / {aid} attempt {attempt}: span_count {n} but {} spans",
                    spans.len()
                ));
            }
        }
        let owner = expected
            .iter()
            .find(|x| x.workflow_id == wf && x.activity_id == aid && x.attempt == attempt);
        for span in spans {
            if let Some(span_aid) = span.get("activity_id").and_then(Value::as_str) {
                if span_aid != aid {
                    out.problems.push(format!(
                        "span on ActivityCompleted {wf} / {aid} says activity_id {span_aid:?}: {}",
                        show_span(span)
                    ));
                }
            }
            for m in span_markers(span, token) {
                match (owner, by_marker.get(m.as_str())) {
                    (Some(o), Some(_)) if o.marker == m => out.attributed += 1,
                    (_, Some(right)) => out.misattributed.push(format!(
                        "span of {} (attempt {}) on {wf} / {aid} attempt {attempt}: {}",
                        right.activity_id,
                        right.attempt,
                        show_span(span)
                    )),
                    (_, None) => out.misattributed.push(format!(
                        "span with marker {m}, which no activity of the test used, on {wf} / {aid} attempt {attempt}: {}",
                        show_span(span)
                    )),
                }
            }
        }
    }

    for u in &report.unattributed {
        let reason = u
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("(no reason)")
            .to_string();
        let Some(span) = u.get("span") else { continue };
        for m in span_markers(span, token) {
            out.unattributed
                .entry(reason.clone())
                .or_default()
                .push(format!(
                    "{m}: {}",
                    span.get("name").and_then(Value::as_str).unwrap_or("?")
                ));
        }
    }
    out
}

impl Attribution {
    /// Prints the comparison (always, so a passing run shows its gaps too).
    pub fn print(&self, what: &str, report: &AgentReport) {
        println!("== {what}: attribution");
        println!("  marker spans on the right activity: {}", self.attributed);
        println!("  misattributed: {}", self.misattributed.len());
        for m in self.misattributed.iter().take(20) {
            println!("    {m}");
        }
        println!("  missing (activity, kind): {}", self.missing.len());
        for (m, k) in self.missing.iter().take(30) {
            println!("    {m} {k:?}");
        }
        let n: usize = self.unattributed.values().map(Vec::len).sum();
        println!("  marker spans reported unattributed: {n}");
        for (reason, ms) in &self.unattributed {
            println!(
                "    {reason}: {} ({})",
                ms.len(),
                ms.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        println!("  other problems: {}", self.problems.len());
        for p in self.problems.iter().take(20) {
            println!("    {p}");
        }
        println!("  agent summary: {}", report.summary);
        println!(
            "  files: {} {} {}",
            report.events_path.display(),
            report.unattributed_path.display(),
            report.stderr_path.display()
        );
    }

    /// Zero misattributed marker spans, at most `allowed_missing` missing ones, no other
    /// problem.
    #[track_caller]
    pub fn assert_exact(&self, allowed_missing: usize, report: &AgentReport) {
        assert!(
            self.misattributed.is_empty(),
            "{} marker span(s) attributed to the WRONG activity (see the output above and {}):\n{}",
            self.misattributed.len(),
            report.events_path.display(),
            self.misattributed
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            self.problems.is_empty(),
            "the agent's events are wrong (see {}):\n{}",
            report.events_path.display(),
            self.problems
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            self.missing.len() <= allowed_missing,
            "{} expected span(s) missing from their activity (allowed {allowed_missing}); unattributed by reason: {:?} (see {} and {}):\n{}",
            self.missing.len(),
            self.unattributed.iter().map(|(r, m)| (r.clone(), m.len())).collect::<BTreeMap<_, _>>(),
            report.events_path.display(),
            report.unattributed_path.display(),
            self.missing.iter().take(30).map(|(m, k)| format!("{m} {k:?}")).collect::<Vec<_>>().join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Governance: the fake OpenBox Core, the governing agent, the governance worker and client
// ---------------------------------------------------------------------------------------

/// The API key the fake Core accepts in the governance tests.
pub const FAKE_CORE_KEY: &str = "obx_test_e2e_governance_key";

/// One HTTP/1.1 request to `127.0.0.1:port` (`Connection: close`): status and body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp).to_string();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// Writes `text` to `path` atomically (temp file and rename), for files another process
/// polls.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

/// tests/fake_core/fake_core.py: a fake OpenBox Core that records every request (JSON
/// lines), answers scripted verdicts, and can be taken down (connection refused) and
/// brought back.
pub struct FakeCore {
    proc: Proc,
    pub port: u16,
    pub api_key: String,
    /// The recorded requests, one JSON object per line (see fake_core.py).
    pub record: PathBuf,
    pub script_file: PathBuf,
    pub control_file: PathBuf,
}

impl FakeCore {
    /// Starts it with `script` (see fake_core.py) and waits until it listens.
    pub fn start(env: &Env, logs: &Path, name: &str, api_key: &str, script: &Value) -> FakeCore {
        let record = logs.join(format!("{name}.requests.jsonl"));
        let script_file = logs.join(format!("{name}.script.json"));
        let control_file = logs.join(format!("{name}.control.json"));
        write_atomic(&script_file, &serde_json::to_string_pretty(script).unwrap());
        write_atomic(&control_file, "{\"down\": false}");
        let mut cmd = env.python(&workspace_root().join("tests/fake_core/fake_core.py"));
        cmd.args(["--port", "0", "--api-key", api_key])
            .arg("--record")
            .arg(&record)
            .arg("--script")
            .arg(&script_file)
            .arg("--control-file")
            .arg(&control_file);
        let mut proc = Proc::spawn(name, cmd, logs);
        let line = proc.wait_for_line("`listening on PORT`", START_TIMEOUT, |l| {
            l.starts_with("listening on ")
        });
        let port = line["listening on ".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("fake Core printed {line:?}"));
        FakeCore {
            proc,
            port,
            api_key: api_key.to_string(),
            record,
            script_file,
            control_file,
        }
    }

    /// `http://127.0.0.1:PORT`, its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `--openbox-url URL --openbox-api-key KEY` for the agent.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--openbox-url".into(),
            self.url(),
            "--openbox-api-key".into(),
            self.api_key.clone(),
        ]
    }

    fn control_state(&self) -> Option<Value> {
        let (status, body) = http_request(self.port, "GET", "/_control", None).ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Replaces the script and waits until the server uses it.
    pub fn set_script(&self, script: &Value) {
        write_atomic(
            &self.script_file,
            &serde_json::to_string_pretty(script).unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .control_state()
                .is_some_and(|s| s.get("script") == Some(script))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the fake Core did not take the new script within 10 s: {}",
                self.stderr_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops listening (connection refused) until [`FakeCore::up`].
    pub fn down(&self) {
        write_atomic(&self.control_file, "{\"down\": \"refuse\"}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the fake Core still accepts connections 10 s after being told to go down"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Listens again on the same port.
    pub fn up(&self) {
        write_atomic(&self.control_file, "{\"down\": false}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.control_state().is_none() {
            assert!(
                Instant::now() < deadline,
                "the fake Core did not come back within 10 s: {}",
                self.stderr_tail()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every request recorded so far, in the order they were answered.
    pub fn requests(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.record).unwrap_or_default();
        // A line being written may be incomplete: only complete lines.
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!(
                        "{} holds a line that is not JSON ({e}): {l}",
                        self.record.display()
                    )
                })
            })
            .collect()
    }

    /// The evaluate requests Core answered with `status` (0: the connection was closed),
    /// as their bodies, in order.
    pub fn evaluated(&self, status: u64) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["path"] == json!("/api/v1/governance/evaluate") && r["status"] == json!(status)
            })
            .map(|r| r["body"].clone())
            .collect()
    }

    /// Waits (up to `timeout`) until `pred` holds for the recorded requests.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.requests()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the fake Core did not record {what} within {timeout:?} (recorded: {})",
                self.record.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// tests/fake_core/validate.py over everything recorded: `Err(its output)` unless
    /// every request matches tests/schema/openbox-core-v1.schema.json.
    pub fn validate_schema(&self, env: &Env) -> Result<String, String> {
        validate_with_schema(env, &self.record, None)
    }

    pub fn stderr_tail(&self) -> String {
        self.proc.stderr_tail()
    }
}

/// validate.py over a JSON-lines file (`def`: validate each line's `body` against
/// `$defs/<def>`): `Ok(output)` when valid, else `Err(output)`.
pub fn validate_with_schema(env: &Env, file: &Path, def: Option<&str>) -> Result<String, String> {
    let mut cmd = env.python(&workspace_root().join("tests/fake_core/validate.py"));
    cmd.arg(file);
    if let Some(d) = def {
        cmd.args(["--def", d]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running validate.py: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `openbox-agent run` with governance flags.
pub struct GovAgent {
    proc: Proc,
    pub name: String,
    pub socket: PathBuf,
    /// Its `--events` file.
    pub events: PathBuf,
}

/// What a governing agent left when it stopped.
#[derive(Debug)]
pub struct GovAgentReport {
    pub status: ExitStatus,
    /// Whether it exited within the grace period after SIGTERM.
    pub in_time: bool,
    pub stderr: String,
    pub stderr_path: PathBuf,
    pub events: Vec<Value>,
    pub events_path: PathBuf,
    /// The `{"type":"summary",…}` line on stderr, if any.
    pub summary: Option<Value>,
}

impl GovAgent {
    fn command(
        env: &Env,
        logs: &Path,
        name: &str,
        socket: &Path,
        args: &[String],
    ) -> (Command, PathBuf) {
        let events = logs.join(format!("{name}.events.jsonl"));
        let mut cmd = Command::new(&env.agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(socket)
            .arg("--events")
            .arg(&events)
            .arg("--unattributed")
            .arg(logs.join(format!("{name}.unattributed.jsonl")))
            .args(args)
            .env(
                "OPENBOX_LOG",
                std::env::var("OPENBOX_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Only what the test passes: none of the developer's own settings.
            .env_remove("OPENBOX_URL")
            .env_remove("OPENBOX_API_KEY")
            .env_remove("OPENBOX_GOVERNANCE_TIMEOUT")
            .env_remove("OPENBOX_GOVERNANCE_POLICY");
        (cmd, events)
    }

    /// Starts the daemon (logs `<name>.stdout|stderr`, events `<name>.events.jsonl`) and
    /// waits until its socket accepts connections.
    pub fn start(env: &Env, logs: &Path, name: &str, socket: &Path, args: &[String]) -> GovAgent {
        let (cmd, events) = Self::command(env, logs, name, socket, args);
        let mut proc = Proc::spawn(name, cmd, logs);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "`openbox-agent run` ({name}) exited ({status}) before its socket {} accepted a connection\nstderr: {}",
                    socket.display(),
                    proc.stderr_tail()
                );
            }
            if UnixStream::connect(socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "`openbox-agent run` ({name}) did not accept connections on {} within {START_TIMEOUT:?}\nstderr: {}",
                socket.display(),
                proc.stderr_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
        GovAgent {
            proc,
            name: name.to_string(),
            socket: socket.to_path_buf(),
            events,
        }
    }

    /// Starts the daemon (with `extra_env` set) expecting it to exit by itself within
    /// `timeout`: its status and stderr (fails the test if it is still running then).
    pub fn start_expecting_exit(
        env: &Env,
        logs: &Path,
        name: &str,
        socket: &Path,
        args: &[String],
        extra_env: &[(&str, &str)],
        timeout: Duration,
    ) -> (ExitStatus, String) {
        let (mut cmd, _) = Self::command(env, logs, name, socket, args);
        cmd.envs(extra_env.iter().copied());
        let mut proc = Proc::spawn(name, cmd, logs);
        match proc.wait(timeout) {
            Some(status) => (status, proc.stderr_text()),
            None => panic!(
                "`openbox-agent run` ({name}) was expected to exit but still runs after {timeout:?}\nstderr: {}",
                proc.stderr_tail()
            ),
        }
    }

    /// Fails the test if the daemon has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.proc.exited() {
            panic!(
                "`openbox-agent run` ({}) exited ({status}) while it should be running\nstderr: {}",
                self.name,
                self.proc.stderr_tail()
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The events it has written to its `--events` file so far.
    pub fn events_so_far(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.events).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        complete
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to `timeout`) until `pred` holds for its events so far.
    pub fn wait_for_events(&self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.events_so_far()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent ({}) did not write {what} to {} within {timeout:?}\nstderr: {}",
                self.name,
                self.events.display(),
                self.proc.stderr_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr_tail(&self) -> String {
        self.proc.stderr_tail()
    }

    /// SIGTERM to the daemon, wait up to 30 s, and collect what it left.
    pub fn stop(mut self) -> GovAgentReport {
        let (status, in_time) = self
            .proc
            .stop_leader(libc::SIGTERM, Duration::from_secs(30));
        let stderr = self.proc.stderr_text();
        let summary = stderr
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find(|v| v.get("type").and_then(Value::as_str) == Some("summary"));
        GovAgentReport {
            status,
            in_time,
            stderr,
            stderr_path: self.proc.stderr.clone(),
            events: json_lines(&self.events, "events"),
            events_path: self.events.clone(),
            summary,
        }
    }
}

impl GovAgentReport {
    /// It exited 0 within the grace period after SIGTERM.
    #[track_caller]
    pub fn assert_clean_exit(&self) {
        assert!(
            self.in_time && self.status.success(),
            "`openbox-agent run` did not exit cleanly after SIGTERM ({}, in time: {})\nstderr: {}",
            self.status,
            self.in_time,
            tail(&self.stderr_path, 6000)
        );
    }

    /// `summary.governance.<key>` as an integer.
    pub fn governance_stat(&self, key: &str) -> Option<u64> {
        self.summary.as_ref()?.get("governance")?.get(key)?.as_u64()
    }
}

/// support/gov_worker.py (workflows of support/gov_workflows.py) with the hook pointed
/// at `socket`.
pub struct GovWorker {
    proc: Proc,
}

impl GovWorker {
    pub fn start(
        env: &Env,
        logs: &Path,
        shared: &Shared,
        task_queue: &str,
        socket: &Path,
    ) -> GovWorker {
        let mut cmd = env.python(&env.script("gov_worker.py"));
        cmd.arg("--address")
            .arg(&shared.temporal)
            .arg("--task-queue")
            .arg(task_queue)
            .arg("--socket")
            .arg(socket)
            .env("OPENBOX_AGENT_SOCKET", socket)
            .current_dir(&env.scripts);
        let mut proc = Proc::spawn("worker", cmd, logs);
        proc.wait_for_line("`ready`", START_TIMEOUT, |l| l.starts_with("ready"));
        GovWorker { proc }
    }

    pub fn stderr_tail(&self) -> String {
        self.proc.stderr_tail()
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.proc.stderr.clone()
    }

    /// SIGTERM (clean shutdown), then its stderr.
    pub fn stop(mut self) -> WorkerOutput {
        let (status, _) = self.proc.stop(libc::SIGTERM, Duration::from_secs(30));
        WorkerOutput {
            status,
            stderr: self.proc.stderr_text(),
            stderr_path: self.proc.stderr.clone(),
        }
    }
}

/// One governance test's processes on the shared servers: a fake Core (optional), the
/// agent (restartable), and the worker. Field order is drop order: worker, agent, Core.
pub struct GovWorld {
    pub worker: Option<GovWorker>,
    pub agent: Option<GovAgent>,
    pub core: Option<FakeCore>,
    pub env: Env,
    pub shared: Shared,
    pub name: String,
    pub logs: PathBuf,
    /// Marker prefix of this run (`mk<8 hex>`).
    pub token: String,
    pub task_queue: String,
    pub socket: PathBuf,
    /// Where the activities write their files (and their `ran-…` marks).
    pub files: PathBuf,
    agents_started: usize,
    clients_run: std::cell::Cell<usize>,
    pub tmp: TempDir,
}

impl GovWorld {
    /// The shared servers and this test's directories; no process of its own yet.
    pub fn new(name: &str) -> GovWorld {
        let env = Env::get();
        let shared = shared(&env);
        let logs = logs_dir(name);
        let tmp = TempDir::new("gov");
        let files = tmp.join("files");
        fs::create_dir_all(&files).expect("creating the activities' file directory");
        let id = unique();
        GovWorld {
            worker: None,
            agent: None,
            core: None,
            socket: tmp.join("agent.sock"),
            task_queue: format!("tq-{name}-{id}"),
            token: format!("mk{id}"),
            env,
            shared,
            name: name.to_string(),
            logs,
            files,
            agents_started: 0,
            clients_run: std::cell::Cell::new(0),
            tmp,
        }
    }

    /// Starts the fake Core (key [`FAKE_CORE_KEY`]) with `script`.
    pub fn start_core(&mut self, script: &Value) -> &FakeCore {
        let core = FakeCore::start(&self.env, &self.logs, "core", FAKE_CORE_KEY, script);
        self.core.insert(core)
    }

    pub fn core(&self) -> &FakeCore {
        self.core.as_ref().expect("start_core() first")
    }

    /// The spool directory of this test (kept across agent restarts).
    pub fn spool_dir(&self) -> PathBuf {
        self.tmp.join("spool")
    }

    /// Starts an agent (`agent`, then `agent-2`, … in the logs) with `args`.
    pub fn start_agent(&mut self, args: &[String]) -> &mut GovAgent {
        assert!(self.agent.is_none(), "an agent already runs");
        self.agents_started += 1;
        let name = match self.agents_started {
            1 => "agent".to_string(),
            n => format!("agent-{n}"),
        };
        let agent = GovAgent::start(&self.env, &self.logs, &name, &self.socket, args);
        self.agent.insert(agent)
    }

    pub fn agent(&self) -> &GovAgent {
        self.agent.as_ref().expect("start_agent() first")
    }

    pub fn agent_mut(&mut self) -> &mut GovAgent {
        self.agent.as_mut().expect("start_agent() first")
    }

    pub fn stop_agent(&mut self) -> GovAgentReport {
        self.agent.take().expect("an agent runs").stop()
    }

    pub fn start_worker(&mut self) {
        assert!(self.worker.is_none(), "a worker already runs");
        self.worker = Some(GovWorker::start(
            &self.env,
            &self.logs,
            &self.shared,
            &self.task_queue,
            &self.socket,
        ));
    }

    pub fn worker(&self) -> &GovWorker {
        self.worker.as_ref().expect("start_worker() first")
    }

    /// The marker of activity `i`: `<token>-NNN`.
    pub fn marker(&self, i: usize) -> String {
        format!("{}-{i:03}", self.token)
    }

    /// Workflow id `k` of this run.
    pub fn workflow_id(&self, k: usize) -> String {
        format!("wf-{}-{k}-{}", self.name, &self.token[2..])
    }

    /// `{"marker", "https_base", "pg_port", "dir"}` for activity `i`.
    pub fn item(&self, i: usize) -> Value {
        json!({
            "marker": self.marker(i),
            "https_base": format!("https://127.0.0.1:{}", self.shared.https_port),
            "pg_port": self.shared.pg_port,
            "dir": self.files.display().to_string(),
        })
    }

    /// Runs support/gov_client.py with `workflows` (`{"id", "workflow", "arg",
    /// "signal"?}`) and returns their outcomes in order (`{"id", "run_id", "ok",
    /// "result"|"error"}`).
    pub fn run(&self, workflows: &[Value], timeout: Duration) -> Vec<Value> {
        let n = self.clients_run.get() + 1;
        self.clients_run.set(n);
        let name = if n == 1 {
            "client".to_string()
        } else {
            format!("client-{n}")
        };
        let plan_path = self.logs.join(format!("{name}.plan.json"));
        fs::write(
            &plan_path,
            serde_json::to_vec_pretty(&json!({ "workflows": workflows })).unwrap(),
        )
        .expect("writing the plan");
        let mut cmd = self.env.python(&self.env.script("gov_client.py"));
        cmd.arg("--address")
            .arg(&self.shared.temporal)
            .arg("--task-queue")
            .arg(&self.task_queue)
            .arg("--plan")
            .arg(&plan_path)
            .arg("--timeout")
            .arg(timeout.as_secs().to_string());
        let mut proc = Proc::spawn(&name, cmd, &self.logs);
        let worker_tail = || {
            self.worker
                .as_ref()
                .map_or_else(String::new, GovWorker::stderr_tail)
        };
        let status = proc
            .wait(timeout + Duration::from_secs(30))
            .unwrap_or_else(|| {
                panic!(
                    "{name} did not finish within {timeout:?}\nstderr: {}\nworker stderr: {}",
                    proc.stderr_tail(),
                    worker_tail()
                )
            });
        assert!(
            status.success(),
            "{name} failed ({status}): no outcome for every workflow within {timeout:?}\nstderr: {}\nworker stderr: {}",
            proc.stderr_tail(),
            worker_tail()
        );
        let out: Value = serde_json::from_str(proc.stdout_text().trim()).unwrap_or_else(|e| {
            panic!(
                "{name}'s stdout is not JSON ({e}): {}",
                tail(&proc.stdout, 2000)
            )
        });
        out["workflows"].as_array().cloned().unwrap_or_default()
    }

    /// The attempts of activity `activity_id` that really ran their body (the `ran-…`
    /// files support/gov_worker.py's `echo`, `echo_dc` and `answer` create).
    pub fn ran_attempts(&self, activity_id: &str) -> Vec<u64> {
        let prefix = format!("ran-{activity_id}-");
        let mut out: Vec<u64> = fs::read_dir(&self.files)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix)?.parse().ok())
            .collect();
        out.sort_unstable();
        out
    }

    /// Stops the worker, then the agent (if one runs), then the fake Core.
    pub fn finish(mut self) -> (Option<WorkerOutput>, Option<GovAgentReport>) {
        let worker = self.worker.take().map(GovWorker::stop);
        let agent = self.agent.take().map(GovAgent::stop);
        (worker, agent)
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn rfc3339_utc_seconds(text: &str) -> Option<f64> {
    let t = text.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut hms = time.split(':');
    let (h, mi) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = hms.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + s)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    const T: &str = "mk0123abcd";

    fn span(name: &str, attrs: Value, aid: &str) -> Value {
        json!({"name": name, "span_id": "00000000000000aa", "start_time": 1_000_000_000u64,
               "end_time": 1_500_000_000u64, "attributes": attrs, "activity_id": aid})
    }

    fn completed(marker: &str, attempt: u64, status: &str, spans: Vec<Value>) -> Value {
        json!({"source": "workflow-telemetry", "event_type": "ActivityCompleted",
               "workflow_id": "wf", "run_id": "r", "workflow_type": "Fanout",
               "activity_id": marker, "activity_type": "async_io", "task_queue": "q",
               "attempt": attempt, "timestamp": "2026-01-01T00:00:00.000Z", "status": status,
               "start_time": 0.5, "end_time": 2.0, "duration_ms": 1500.0,
               "span_count": spans.len(), "spans": spans,
               "activity_input": [{"marker": marker}],
               "activity_output": if status == "completed" { json!({}) } else { Value::Null },
               "error": if status == "completed" { Value::Null } else { json!({"type": "E", "message": "m"}) }})
    }

    fn started(marker: &str, attempt: u64) -> Value {
        let mut e = completed(marker, attempt, "completed", vec![]);
        e["event_type"] = json!("ActivityStarted");
        e
    }

    fn report(events: Vec<Value>, unattributed: Vec<Value>) -> AgentReport {
        AgentReport {
            status: ExitStatus::from_raw(0),
            summary: json!({"type": "summary"}),
            stderr: String::new(),
            events,
            unattributed,
            stderr_path: PathBuf::new(),
            events_path: PathBuf::new(),
            unattributed_path: PathBuf::new(),
        }
    }

    fn all_three(m: &str) -> Vec<Value> {
        vec![
            span(
                "GET",
                json!({"http.url": format!("https://127.0.0.1:1/e2e/{m}")}),
                m,
            ),
            span(
                "SELECT",
                json!({"db.system": "postgresql", "db.statement": format!("SELECT '{m}'::text")}),
                m,
            ),
            span(
                "file.open",
                json!({"file.path": format!("/tmp/x/{m}.txt")}),
                m,
            ),
        ]
    }

    #[test]
    fn markers_are_whole_words_so_one_is_never_a_prefix_of_another() {
        let text = format!("/e2e/{T}-001/{T}-001-attempt-2?x={T}-0011&y");
        assert_eq!(
            markers_in_text(&text, T),
            vec![
                format!("{T}-001"),
                format!("{T}-001-attempt-2"),
                format!("{T}-0011")
            ]
        );
        assert_eq!(
            markers_in_text(&format!("SELECT '{T}-007'::text"), T),
            vec![format!("{T}-007")]
        );
    }

    #[test]
    fn exact_attribution_passes() {
        let (a, b) = (format!("{T}-000"), format!("{T}-001"));
        let events = vec![
            started(&a, 1),
            started(&b, 1),
            completed(&a, 1, "completed", all_three(&a)),
            completed(&b, 1, "completed", all_three(&b)),
        ];
        let expected = [
            ExpectedActivity::new("wf", &a, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
            ExpectedActivity::new("wf", &b, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
        ];
        let r = report(events, vec![]);
        let got = check_attribution(&r, T, &expected);
        assert!(
            got.misattributed.is_empty() && got.missing.is_empty() && got.problems.is_empty(),
            "{got:?}"
        );
        assert_eq!(got.attributed, 6);
    }

    #[test]
    fn a_span_on_the_wrong_activity_is_misattributed_and_missing_from_its_own() {
        let (a, b) = (format!("{T}-000"), format!("{T}-001"));
        let mut spans_a = all_three(&a);
        let mut spans_b = all_three(&b);
        // b's SQL span ends up on a.
        let moved = spans_b.remove(1);
        spans_a.push(moved);
        let events = vec![
            started(&a, 1),
            started(&b, 1),
            completed(&a, 1, "completed", spans_a),
            completed(&b, 1, "completed", spans_b),
        ];
        let expected = [
            ExpectedActivity::new("wf", &a, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
            ExpectedActivity::new("wf", &b, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
        ];
        let unattributed = vec![json!({"reason": "no_activity", "pid": 1,
            "span": span("GET", json!({"http.url": format!("https://h/{b}")}), "")})];
        let got = check_attribution(&report(events, unattributed), T, &expected);
        assert_eq!(got.misattributed.len(), 1, "{got:?}");
        assert_eq!(got.missing, vec![(b.clone(), Kind::Sql)]);
        // The moved span still says it belongs to b while sitting on a.
        assert!(
            got.problems.iter().any(|p| p.contains("says activity_id")),
            "{got:?}"
        );
        assert_eq!(got.unattributed["no_activity"].len(), 1);
    }

    #[test]
    fn retry_attempts_are_told_apart_by_attempt_marker() {
        let a = format!("{T}-000");
        let (m1, m2) = (format!("{a}-attempt-1"), format!("{a}-attempt-2"));
        let mut first = all_three(&m1);
        for s in &mut first {
            s["activity_id"] = json!(a);
        }
        // An attempt-2 span on attempt 1.
        let mut stray = all_three(&m2).remove(0);
        stray["activity_id"] = json!(a);
        first.push(stray);
        let mut second = all_three(&m2);
        for s in &mut second {
            s["activity_id"] = json!(a);
        }
        let events = vec![
            started(&a, 1),
            started(&a, 2),
            completed(&a, 1, "failed", first),
            completed(&a, 2, "completed", second),
        ];
        let exp = |attempt: u64, status, marker: &str| ExpectedActivity {
            workflow_id: "wf".into(),
            activity_id: a.clone(),
            attempt,
            status,
            marker: marker.to_string(),
            kinds: vec![Kind::Https, Kind::Sql, Kind::FileOpen],
        };
        let expected = [exp(1, "failed", &m1), exp(2, "completed", &m2)];
        let got = check_attribution(&report(events, vec![]), T, &expected);
        assert_eq!(got.misattributed.len(), 1, "{got:?}");
        assert!(got.problems.is_empty(), "{got:?}");
    }
}
