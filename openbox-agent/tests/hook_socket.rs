//! The hook socket on a shared node: a peer that floods requests without reading the
//! replies, or that holds thousands of idle connections, must neither grow the agent
//! without bound nor keep a real worker from registering. The stand-in hook
//! (support/fake_hook.py) plays the real worker, as in tests/daemon.rs.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream,
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// gid and uid of `nogroup`/`nobody` on Debian and most distributions.
const NOBODY: u32 = 65534;

/// The flooding peer's connections when run as the helper below.
const IDLE_CONNECTIONS: usize = 2000;
const CAP: usize = 256;

struct Agent {
    child: Option<Child>,
    dir: TempDir,
    socket: PathBuf,
}

impl Agent {
    /// `run` with its socket in a directory of its own making (`<tmp>/run`).
    fn start(env: &TestEnv, args: &[&str]) -> Agent {
        let dir = TempDir::new("hook-socket");
        // Others must reach <tmp>/run: the test makes the helper an unprivileged user.
        fs::set_permissions(dir.join("."), fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.join("run/agent.sock");
        let stderr = fs::File::create(dir.join("agent.err")).unwrap();
        let child = Command::new(&env.agent)
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--events")
            .arg(dir.join("events.jsonl"))
            .args(args)
            .env("OPENBOX_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting openbox-agent run");
        let a = Agent {
            child: Some(child),
            dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&a.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent did not listen within 30 s; its stderr:\n{}",
                a.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("agent.err")).unwrap_or_default()
    }

    /// SIGTERM, wait, and return the summary it printed last on stderr.
    fn stop(&mut self) -> Value {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let err = self.stderr();
        assert!(status.success(), "the agent exited with {status}: {err}");
        let last = err.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|_| panic!("no summary at the end of stderr:\n{err}"))
    }

    /// A registration by the stand-in hook, as root: the hello's reply.
    fn hello(&self, env: &TestEnv, args: &[&str]) -> Vec<Value> {
        let mut cmd = Command::new(&env.python);
        cmd.arg(env.script("fake_hook.py"))
            .arg(&self.socket)
            .arg("hello")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (status, out, err) = run_bounded(&mut cmd, Duration::from_secs(60));
        assert!(status.success(), "fake_hook.py hello failed: {err}");
        String::from_utf8_lossy(&out)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["reply"].clone())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (soft, hard) "Max open files" of a process.
fn nofile(pid: u32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

fn raise_own_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn a_peer_that_never_reads_its_replies_is_dropped_and_the_agent_stays_small() {
    let env = TestEnv::get();
    let mut agent = Agent::start(&env, &[]);
    let pid = agent.pid();

    // The open-files limit was raised to the hard limit at start, and said so.
    let (soft, hard) = nofile(pid);
    assert_eq!(soft, hard, "the agent's open-files limit was not raised");
    assert!(
        agent.stderr().contains("open-files limit"),
        "no info line about the open-files limit:\n{}",
        agent.stderr()
    );

    thread::sleep(Duration::from_millis(500));
    let start = rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(rss_kib(pid));
                thread::sleep(Duration::from_millis(5));
            }
            max
        })
    };
    // 200 000 requests (before any hello, so each is answered with an error), never
    // reading a reply.
    let socket = agent.socket.clone();
    let flood = thread::spawn(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        let chunk: String = (0..1000)
            .map(|i| format!("{{\"id\":{i},\"op\":\"thread\",\"tid\":1,\"slot\":0}}\n"))
            .collect();
        let mut sent = 0usize;
        for _ in 0..200 {
            if s.write_all(chunk.as_bytes()).is_err() {
                break;
            }
            sent += 1000;
        }
        // Keep the connection open (and unread) a moment: dropping it must be the
        // agent's doing.
        thread::sleep(Duration::from_secs(1));
        let mut buf = [0u8; 1];
        let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
        let _ = s.read(&mut buf);
        sent
    });
    // Meanwhile a real worker registers.
    thread::sleep(Duration::from_millis(100));
    let replies = agent.hello(&env, &[]);
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[0]["ok"], true,
        "hello during the flood: {replies:?}"
    );
    let sent = flood.join().unwrap();
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let max = sampler.join().unwrap();
    let after = rss_kib(pid);
    eprintln!(
        "VmRSS: {start} KiB at start, {max} KiB at most during the flood, {after} KiB after; {sent} request lines written"
    );
    // The peer holds at most REPLY_QUEUE (1024) small replies and the shared request
    // queue at most 4096 requests, a few MiB in all: 64 MiB over the start leaves room
    // for the allocator, while an unbounded queue grew by hundreds of MiB.
    assert!(
        max < start + 64 * 1024,
        "the agent grew from {start} KiB to {max} KiB under a flood"
    );
    let summary = agent.stop();
    assert!(
        summary["hook_peers_dropped"].as_u64().unwrap_or(0) >= 1,
        "the flooding peer was not dropped: {summary}"
    );
}

/// Not a test by itself: run by the test below as an unprivileged user, it holds
/// IDLE_CONNECTIONS connections to the socket in OPENBOX_TEST_FLOOD_SOCKET until its
/// stdin closes.
#[test]
fn idle_connections_helper() {
    let Some(socket) = std::env::var_os("OPENBOX_TEST_FLOOD_SOCKET") else {
        return;
    };
    raise_own_nofile();
    let mut held = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        match UnixStream::connect(&socket) {
            Ok(s) => held.push(s),
            Err(e) => {
                // Straight to fd 1: the harness captures `println!` until the test ends.
                let _ = writeln!(std::io::stdout(), "error {e}");
                return;
            }
        }
    }
    writeln!(std::io::stdout(), "ready {}", held.len()).unwrap();
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn idle_peer(socket: &Path, uid: u32, gid: u32) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "idle_connections_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("OPENBOX_TEST_FLOOD_SOCKET", socket)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn idle_connections_are_capped_per_uid_and_a_worker_still_registers() {
    let env = TestEnv::get();
    let mut agent = Agent::start(&env, &["--socket-group", "65534"]);

    // Socket 0660 and directory 0750, both of the group given.
    let dir = fs::metadata(agent.socket.parent().unwrap()).unwrap();
    assert_eq!(dir.mode() & 0o7777, 0o750, "socket directory mode");
    assert_eq!(dir.gid(), NOBODY, "socket directory group");
    let sock = fs::metadata(&agent.socket).unwrap();
    assert_eq!(sock.mode() & 0o7777, 0o660, "socket mode");
    assert_eq!(sock.gid(), NOBODY, "socket group");

    // A user outside the group cannot connect at all.
    let mut outsider = idle_peer(&agent.socket, NOBODY, NOBODY - 1);
    let mut out = String::new();
    outsider
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = outsider.wait();
    assert!(
        out.contains("error") && out.contains("ermission denied"),
        "a user outside --socket-group connected: {out}"
    );

    // One uid (in the group) holds 2 000 idle connections.
    let mut peer = idle_peer(&agent.socket, NOBODY, NOBODY);
    // The test harness prints its own lines first.
    let line = BufReader::new(peer.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("ready") || l.starts_with("error"))
        .unwrap_or_default();
    let held_at = Instant::now();
    assert_eq!(
        line,
        format!("ready {IDLE_CONNECTIONS}"),
        "the idle peer: {line}"
    );

    // A worker registers meanwhile, and keeps its connection past the hello timeout.
    let replies = agent.hello(&env, &["11"]);
    assert_eq!(replies.len(), 2, "{replies:?}");
    for r in &replies {
        assert_eq!(
            r["ok"], true,
            "hello while a uid holds 2 000 connections: {r}"
        );
    }
    // By now the idle connections are past the hello timeout.
    let wait = Duration::from_secs(11).saturating_sub(held_at.elapsed());
    thread::sleep(wait);

    drop(peer.stdin.take());
    let _ = peer.wait();
    let summary = agent.stop();
    let err = agent.stderr();
    assert!(
        !err.contains("Too many open files") && !err.contains("EMFILE"),
        "the agent ran out of file descriptors:\n{err}"
    );
    assert_eq!(
        summary["hook_connections_refused"].as_u64(),
        Some((IDLE_CONNECTIONS - CAP) as u64),
        "{summary}"
    );
    assert_eq!(
        summary["hook_closed_without_hello"].as_u64(),
        Some(CAP as u64),
        "{summary}"
    );
    let refusals = err.matches("refused a hook connection").count();
    assert!(
        (1..=15).contains(&refusals),
        "refusals must be logged, at most once a second per uid: {refusals} lines"
    );
}
