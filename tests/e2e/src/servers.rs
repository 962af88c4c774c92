//! Servers shared by the tests of one binary: the Temporal dev server, the HTTPS server
//! and PostgreSQL, started on first use and stopped when the binary exits.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use openbox_testkit::{fixtures, free_port, Proc, TempDir};

use crate::{env::python_env, logs_dir, Env, START_TIMEOUT};

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
    let mut cmd = fixtures::tls_server(&env.python, &env.fixtures, true, None, 0);
    python_env(&mut cmd);
    let mut proc = Proc::spawn("https-server", cmd, logs);
    let port = proc.port();
    (proc, port)
}

/// tls_server.py --plain (HTTP; the same answers).
pub fn start_http(env: &Env, logs: &Path) -> (Proc, u16) {
    let mut cmd = fixtures::tls_server(&env.python, &env.fixtures, false, None, 0);
    python_env(&mut cmd);
    let mut proc = Proc::spawn("http-server", cmd, logs);
    let port = proc.port();
    (proc, port)
}

/// llm_server.py (a fake LLM API: OpenAI chat completions and responses, Anthropic
/// messages; gzip, br and streamed answers), plain HTTP.
pub fn start_llm(env: &Env, logs: &Path) -> (Proc, u16) {
    let mut cmd = Command::new(&env.python);
    cmd.arg(env.fixture("llm_server.py")).arg("0");
    python_env(&mut cmd);
    let mut proc = Proc::spawn("llm-server", cmd, logs);
    let port = proc.port();
    (proc, port)
}

/// pg_server.py: PostgreSQL over TLS, user `openbox`, database `shop`.
pub fn start_postgres(env: &Env, logs: &Path) -> (Proc, u16) {
    let mut cmd = fixtures::pg_server(&env.python, &env.fixtures, &env.pg_bin, false, 0);
    python_env(&mut cmd);
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
    /// The same server in plain HTTP.
    pub http_port: u16,
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
        let (http, http_port) = start_http(env, &logs);
        let (pg, pg_port) = start_postgres(env, &logs);
        *SHARED_PROCS.lock().unwrap_or_else(|p| p.into_inner()) = Some(SharedProcs {
            procs: vec![temporal, https, http, pg],
            _temporal_dir: Some(_dir),
        });
        Shared {
            temporal: address,
            https_port,
            http_port,
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

/// Reads from `conn` until the end of an HTTP request head (or the connection's end or
/// error); returns what was read (empty: nothing came).
pub fn read_request_head(conn: &mut impl std::io::Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf
}
