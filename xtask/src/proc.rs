//! The one guard for the processes the benches start: whatever happens (an error, a
//! panic), a process never outlives the task that started it.

use std::{
    io::Read,
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How long a process asked to stop gets before SIGKILL.
const GRACE: Duration = Duration::from_secs(15);

/// A child process stopped and reaped when dropped: first with its graceful signal when
/// it has one (SIGINT for the measured agent, so it detaches cleanly; SIGTERM for a
/// service), then SIGKILL. The measured agent's stdout is reduced to its last line and
/// its stderr kept.
pub struct Proc {
    name: String,
    child: Child,
    graceful: Option<libc::c_int>,
    last_line: Arc<Mutex<String>>,
    /// Complete lines read from stdout (spans, when it is the agent's span output).
    lines: Arc<AtomicU64>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// With `agent`, the agent under measurement (output captured, SIGINT first);
    /// otherwise a helper whose stdout is thrown away, killed outright.
    pub fn spawn(name: &str, cmd: &mut Command, agent: bool) -> Result<Proc> {
        if agent {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null());
        }
        Proc::start(name, cmd, agent.then_some(libc::SIGINT))
    }

    /// A service (a dev server, a daemon) with the output its command sets, asked to
    /// stop with SIGTERM.
    pub fn service(name: &str, cmd: &mut Command) -> Result<Proc> {
        Proc::start(name, cmd, Some(libc::SIGTERM))
    }

    fn start(name: &str, cmd: &mut Command, graceful: Option<libc::c_int>) -> Result<Proc> {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}: {cmd:?}"))?;
        let last_line = Arc::new(Mutex::new(String::new()));
        let lines = Arc::new(AtomicU64::new(0));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            let last = last_line.clone();
            let count = lines.clone();
            readers.push(std::thread::spawn(move || {
                // Keeps only the last complete line; the rest (hundreds of MB of JSON
                // when watched) is read and dropped, like /dev/null would.
                let mut buf = vec![0u8; 1 << 20];
                let mut pending: Vec<u8> = Vec::new();
                loop {
                    let n = match out.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    // memchr, not a byte loop: xtask is built unoptimised, and at
                    // 20 MB/s of spans a byte loop kept up no better than the agent.
                    let newlines = memchr::memchr_iter(b'\n', chunk).count();
                    count.fetch_add(newlines as u64, Ordering::Relaxed);
                    match memchr::memrchr(b'\n', chunk) {
                        Some(p) => {
                            let head = &chunk[..p];
                            let line = match memchr::memrchr(b'\n', head) {
                                Some(q) => head[q + 1..].to_vec(),
                                None => {
                                    let mut l = std::mem::take(&mut pending);
                                    l.extend_from_slice(head);
                                    l
                                }
                            };
                            *last.lock().unwrap() = String::from_utf8_lossy(&line).into_owned();
                            pending.clear();
                            pending.extend_from_slice(&chunk[p + 1..]);
                        }
                        None => pending.extend_from_slice(chunk),
                    }
                }
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            let keep = stderr.clone();
            readers.push(std::thread::spawn(move || {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text);
                *keep.lock().unwrap() = text;
            }));
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            graceful,
            last_line,
            lines,
            stderr,
            readers,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last complete line it printed on stdout (measured processes only).
    pub fn last_line(&self) -> String {
        self.last_line.lock().unwrap().clone()
    }

    /// How many lines it printed on stdout so far (measured processes only).
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Whether it has exited, without reaping it: its /proc entry stays readable.
    pub fn has_exited(&self) -> bool {
        // SAFETY: an all-zero siginfo_t is valid; waitid only fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with WNOWAIT on our own child leaves it unreaped.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is set by waitid when a child changed state, 0 otherwise.
        r == 0 && unsafe { info.si_pid() } != 0
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn interrupt(&self) -> Result<()> {
        self.signal(libc::SIGINT)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: kill(2) on our own child, not yet reaped (the guard owns it).
        if unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } != 0 {
            bail!(
                "signalling {} failed: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits until `socket` accepts a connection: a daemon's hook socket is bound once
    /// its programs are attached. Polled every 2 ms, as start-up is measured with it.
    /// Fails when the process exits first or `limit` passes.
    pub fn wait_for_socket(&mut self, socket: &Path, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before {} accepted a connection: {}",
                    self.name,
                    socket.display(),
                    self.stderr_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not open {} within {limit:?}; run it by hand to see why",
                    self.name,
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's closing summary line (call after `wait`): the last line of stdout,
    /// or, when stdout holds spans (`--json` without `--raw`), a line of stderr.
    pub fn summary(&self) -> Result<String> {
        let is_summary = |l: &str| l.contains("\"type\":\"summary\"");
        let last = self.last_line.lock().unwrap().clone();
        if is_summary(&last) {
            return Ok(last);
        }
        let stderr = self.stderr_text();
        match stderr.lines().rev().find(|l| is_summary(l)) {
            Some(line) => Ok(line.to_string()),
            None => bail!(
                "{}: no summary line (last stdout line {last:?}; stderr: {stderr})",
                self.name
            ),
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().trim().to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(sig) = self.graceful {
                if self.signal(sig).is_ok() {
                    let _ = self.wait(GRACE);
                }
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}
