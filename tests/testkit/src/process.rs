//! Guards for the processes a test starts: dropping one stops its process, also when the
//! test panics.
//!
//! - [`Proc`]: a process group whose output goes to files (kept for the failure message's
//!   reader), started with `PR_SET_PDEATHSIG` from a thread that lives as long as the test
//!   binary, so nothing outlives the tests even when the binary is killed.
//! - [`Background`]: a fixture beside the test whose stdout the test reads line by line
//!   (its stderr goes to the test's), stopped with SIGTERM so it can clean up.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{mpsc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

/// The longest a fixture may take to print its first line (its port).
const START_TIMEOUT: Duration = Duration::from_secs(90);

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
            .name("test-process-keeper".into())
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

/// A fixture process running beside the test (not under the agent). Stopped with
/// SIGTERM on drop, so it can clean up (pg_server.py shuts PostgreSQL down).
pub struct Background {
    name: String,
    child: Child,
    stdout: Option<mpsc::Receiver<String>>,
}

impl Background {
    pub fn spawn(name: &str, cmd: &mut Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        Background {
            name: name.to_string(),
            child,
            stdout: Some(stdout),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line; fails the test if the process exits or stays silent.
    pub fn line(&mut self) -> String {
        let rx = self.stdout.as_ref().expect("stdout reader");
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{} printed nothing within {START_TIMEOUT:?}", self.name)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                panic!(
                    "{} exited ({status:?}) before printing the expected line; its stderr is above",
                    self.name
                )
            }
        }
    }

    /// The first stdout line, as a port number.
    pub fn port(&mut self) -> u16 {
        let line = self.line();
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{} printed {line:?}, not a port", self.name))
    }

    /// SIGTERM, then wait; returns the rest of stdout.
    pub fn stop(mut self) -> Vec<String> {
        self.terminate();
        let rx = self.stdout.take().expect("stdout reader");
        let mut rest = Vec::new();
        // The reader thread forwards what the process printed before it exited.
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            rest.push(line);
        }
        rest
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid, which we have not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn lines_of(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}
