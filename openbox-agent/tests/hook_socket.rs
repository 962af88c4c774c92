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
    agent: RunningAgent,
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
        let agent = RunningAgent::start(env, &socket, &dir.join("agent.err"), |cmd| {
            // SAFETY: between fork and exec, only getrlimit/setrlimit (async-signal-safe).
            unsafe {
                cmd.pre_exec(|| {
                    // The usual soft limit, whatever the test runner's: the agent must raise it.
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                    lim.rlim_cur = lim.rlim_max.min(1024);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                    Ok(())
                });
            }
            cmd.arg("--events")
                .arg(dir.join("events.jsonl"))
                .args(args)
                .env("OPENBOX_LOG", "info");
        });
        Agent { agent, dir, socket }
    }

    fn pid(&self) -> u32 {
        self.agent.pid()
    }

    fn stderr(&self) -> String {
        self.agent.stderr_text()
    }

    /// SIGTERM, wait, and return the summary it printed last on stderr.
    fn stop(&mut self) -> Value {
        self.agent.stop()
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
        assert!(
            status.success(),
            "fake_hook.py hello failed: {err}\nthe agent's stderr:\n{}",
            self.stderr()
        );
        String::from_utf8_lossy(&out)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["reply"].clone())
            .collect()
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
        agent.stderr().contains("raised the open-files limit"),
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
                // On a line of its own: the harness has printed "test NAME ... " already.
                let _ = writeln!(std::io::stdout(), "\nerror {e}");
                return;
            }
        }
    }
    writeln!(std::io::stdout(), "\nready {}", held.len()).unwrap();
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
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("ready") || l.starts_with("error"))
        .unwrap_or_default();
    // The rest of its output, so that it never writes to a closed pipe.
    thread::spawn(move || lines.for_each(drop));
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
    // And a worker's activities are attributed exactly meanwhile.
    let server = HttpServer::start(&env, true);
    let work = TempDir::new("work");
    let url = format!("https://127.0.0.1:{}", server.port);
    agent.hook(&env, &["attribute", &url, &work.arg()]);
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
    let events: Vec<Value> = fs::read_to_string(agent.dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let done: Vec<&Value> = events
        .iter()
        .filter(|e| e["event_type"] == "ActivityCompleted")
        .collect();
    assert_eq!(done.len(), 2, "{events:?}");
    for e in done {
        let id = e["activity_id"].as_str().unwrap();
        let subjects: Vec<&str> = e["spans"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| {
                let a = &s["attributes"];
                a["http.url"].as_str().or(a["file.path"].as_str())
            })
            .collect();
        for want in [
            format!("{}/{id}-marker.txt", work.arg()),
            format!("{url}/{id}-marker"),
        ] {
            assert!(
                subjects.contains(&want.as_str()),
                "activity {id} lacks {want}: {subjects:?}"
            );
        }
        assert!(
            !subjects
                .iter()
                .any(|s| s.contains(if id == "a" { "/b-" } else { "/a-" })),
            "activity {id} holds the other's spans: {subjects:?}"
        );
    }
    let refusals = err.matches("refused a hook connection").count();
    assert!(
        (1..=15).contains(&refusals),
        "refusals must be logged, at most once a second per uid: {refusals} lines"
    );
}

impl Agent {
    /// The stand-in hook in `mode` as root: every (op, reply) it printed.
    fn hook(&self, env: &TestEnv, args: &[&str]) -> Vec<(String, Value)> {
        let mut cmd = Command::new(&env.python);
        cmd.arg(env.script("fake_hook.py"))
            .arg(&self.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (status, out, err) = run_bounded(&mut cmd, Duration::from_secs(60));
        assert!(status.success(), "fake_hook.py {args:?} failed: {err}");
        String::from_utf8_lossy(&out)
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["op"].as_str().unwrap_or_default().to_string(),
                    v["reply"].clone(),
                )
            })
            .collect()
    }

    fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or_default()
    }
}

/// The decision in the reply to the stand-in hook's `activity_start`.
fn start_decision(replies: &[(String, Value)]) -> Value {
    replies
        .iter()
        .find(|(op, _)| op == "activity_start")
        .map(|(_, r)| r["decision"].clone())
        .unwrap_or_else(|| panic!("no activity_start reply: {replies:?}"))
}

/// A worker's hello names a Core URL the operator did not allow: the agent never
/// connects there (its requests carry an API key), says so, counts it, and the worker's
/// activities follow the worker's failure policy.
#[test]
fn a_worker_supplied_core_url_is_refused_and_its_activities_follow_its_policy() {
    let env = TestEnv::get();
    // Where a hostile worker would have the agent send its key-bearing requests.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let url = format!("http://{}", trap.local_addr().unwrap());
    let mut agent = Agent::start(&env, &[]);

    let closed = serde_json::json!({"openbox_url": url, "openbox_api_key": "obx_test_stolen",
        "governance_policy": "fail_closed"})
    .to_string();
    let decision = start_decision(&agent.hook(&env, &["settings", &closed]));
    assert_eq!(decision["action"], "fail", "{decision}");
    assert_eq!(decision["error_type"], "GovernanceHalt", "{decision}");
    assert!(
        decision["message"]
            .as_str()
            .is_some_and(|m| m.contains("--allow-worker-core-url")),
        "the halt says why: {decision}"
    );

    let open = serde_json::json!({"openbox_url": url, "openbox_api_key": "obx_test_stolen",
        "governance_policy": "fail_open"})
    .to_string();
    let decision = start_decision(&agent.hook(&env, &["settings", &open]));
    assert_eq!(decision["action"], "continue", "{decision}");

    let summary = agent.stop();
    assert!(
        trap.accept().is_err(),
        "the agent connected to the worker's Core URL"
    );
    assert_eq!(summary["worker_settings_refused"], 2, "{summary}");
    let err = agent.stderr();
    assert_eq!(
        err.matches("refused the worker's governance settings")
            .count(),
        2,
        "each refusal is logged:\n{err}"
    );
    assert!(err.contains("ungoverned (fail_open)"), "{err}");
    assert!(err.contains("halted (fail_closed)"), "{err}");
}

/// Every distinct worker `config` starts a governor (a Core client, a spool, a handle on
/// the events file); it is freed with the last worker using it, so workers coming and
/// going with settings of their own do not pile up governors and file handles.
#[test]
fn a_workers_own_governor_is_freed_with_its_last_worker() {
    let env = TestEnv::get();
    let mut agent = Agent::start(&env, &[]);
    // One worker first, so lazily opened handles (the events file) are counted in the base.
    let warm = serde_json::json!({"governance_timeout": 29}).to_string();
    agent.hook(&env, &["settings", &warm]);
    let base = agent.open_fds();
    const WORKERS: u64 = 12;
    for i in 0..WORKERS {
        let own = serde_json::json!({"governance_timeout": 30 + i}).to_string();
        let decision = start_decision(&agent.hook(&env, &["settings", &own]));
        assert_eq!(decision["action"], "continue", "{decision}");
    }
    // The workers have exited; the agent sees their exits through the kernel.
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.open_fds() > base + 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let fds = agent.open_fds();
    let summary = agent.stop();
    assert!(
        fds <= base + 2,
        "{WORKERS} exited workers left handles behind: {base} open files before, {fds} after"
    );
    assert_eq!(
        summary["worker_governors_freed"].as_u64(),
        Some(WORKERS + 1),
        "{summary}"
    );
}
