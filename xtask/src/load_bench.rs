//! `cargo xtask bench --only load`: the agent's own cost under a sustained load.
//!
//! `openbox-agent trace --json -- xtask load-gen …` watches one process that holds both
//! ends of loopback HTTP/1.1: a server (a thread per connection, each response one
//! write, TCP_NODELAY) and several keep-alive clients posting as fast as they can for a
//! bounded time. Every request is four watched socket calls (the client's write and
//! read, the server's read and write): four kernel events and two spans (the client's
//! and the server's view of the request).
//!
//! Measured: the agent's CPU time (user + system, from wait4's rusage, less what it had
//! spent when the load began — loading and verifying its programs is system time too)
//! per span and per event, its peak RSS, events per second, ring-buffer drops (the
//! agent's summary) and, with `kernel.bpf_stats_enabled` switched on for the run, the
//! kernel programs' own run time (`run_time_ns` in the agent's /proc fdinfo), which is
//! charged to the traced processes, not to the agent.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::proc::Proc;

const REQUEST: &[u8] = b"POST /v1/load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"load\":\"bench\"}\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"ok\":true}\n";

/// The load generator itself (`xtask load-gen`, run under the agent): `rate` requests
/// per second over all clients (0: as fast as they can). Creates `marker` when the load
/// begins; at its end writes one JSON line (requests made, seconds) to `out` (stdout
/// holds the agent's spans), then waits until `marker` is removed — so the bench can
/// read the agent's own CPU time while it is still alive (once it has reaped this
/// process, the kernel adds this process's CPU time to the agent's).
pub fn generate(clients: usize, seconds: f64, rate: f64, marker: &Path, out: &Path) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the load server")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    // Connections first, so the timed part holds only requests.
    let mut conns = Vec::new();
    for _ in 0..clients {
        let c = TcpStream::connect(addr).context("connecting to the load server")?;
        c.set_nodelay(true)?;
        conns.push(c);
    }
    // The agent learns a new socket from its connect; give it a moment to settle.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(marker, b"").with_context(|| format!("writing {}", marker.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let (stop, total) = (stop.clone(), total.clone());
            let interval = (rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 / rate));
            std::thread::spawn(move || client(c, interval, &stop, &total))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a load client panicked"))??;
    }
    let secs = started.elapsed().as_secs_f64();
    let line = format!(
        "{{\"requests\":{},\"seconds\":{secs:.3},\"clients\":{clients}}}\n",
        total.load(Ordering::Relaxed)
    );
    std::fs::write(out, line).with_context(|| format!("writing {}", out.display()))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while marker.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Reads requests (each ends with its 17-byte body: count them by their header ends)
/// and answers each with one write.
fn serve(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut have = 0usize;
    loop {
        let n = match conn.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        while have >= REQUEST.len() {
            if conn.write_all(RESPONSE).is_err() {
                return;
            }
            buf.copy_within(REQUEST.len()..have, 0);
            have -= REQUEST.len();
        }
    }
}

/// Posts on one connection until `stop`, one request per `interval` when given, on a
/// fixed schedule (a late request goes at once, so the rate holds on average).
fn client(
    mut conn: TcpStream,
    interval: Option<Duration>,
    stop: &AtomicBool,
    total: &AtomicU64,
) -> Result<()> {
    let mut buf = [0u8; 4096];
    let mut done = 0u64;
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(every) = interval {
            let due = start + every * done as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        conn.write_all(REQUEST).context("load client write")?;
        let mut got = 0;
        while got < RESPONSE.len() {
            let n = conn.read(&mut buf[got..]).context("load client read")?;
            if n == 0 {
                bail!("the load server closed the connection");
            }
            got += n;
        }
        done += 1;
    }
    total.fetch_add(done, Ordering::Relaxed);
    Ok(())
}

#[derive(Clone, Copy)]
pub struct Size {
    pub clients: usize,
    pub seconds: f64,
}

/// Watched socket calls per request: the client's write and read, the server's read and
/// write.
const EVENTS_PER_REQUEST: f64 = 4.0;

pub struct LoadResult {
    pub target_events_per_s: f64,
    pub requests_per_s: f64,
    pub events_per_s: f64,
    pub spans: u64,
    pub cpu_us_per_span: f64,
    pub cpu_us_per_event: f64,
    pub agent_cpu_share: f64,
    pub peak_rss_mib: f64,
    pub drops: f64,
    /// Kernel programs' run time per load request (all their runs, the machine's other
    /// processes' unwatched hits included).
    pub bpf_ns_per_request: Option<f64>,
}

/// CPU seconds (user + system) a live process has used itself (its threads, not the
/// children it reaped), from /proc/PID/stat.
pub fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Peak RSS of a live process in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// One BPF program's counters (0 unless kernel.bpf_stats_enabled is on).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgRuns {
    pub id: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The BPF programs process `pid` holds, with their counters (from its fdinfo).
pub fn bpf_programs(pid: u32) -> Vec<ProgRuns> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        let mut p = ProgRuns::default();
        for line in info.lines() {
            let mut it = line.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
                (Some("prog_id:"), Some(v)) => p.id = v as u32,
                (Some("run_time_ns:"), Some(v)) => p.run_time_ns = v,
                (Some("run_cnt:"), Some(v)) => p.run_cnt = v,
                _ => {}
            }
        }
        // A program held through two descriptors counts once.
        if !out.iter().any(|q: &ProgRuns| q.id == p.id) {
            out.push(p);
        }
    }
    out
}

/// Sum of `run_time_ns` and `run_cnt` over the BPF programs the process holds (0 unless
/// kernel.bpf_stats_enabled is on).
pub fn bpf_run_stats(pid: u32) -> (u64, u64) {
    bpf_programs(pid)
        .iter()
        .fold((0, 0), |(ns, cnt), p| (ns + p.run_time_ns, cnt + p.run_cnt))
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Switches kernel.bpf_stats_enabled on for its lifetime, back to what it was after.
pub struct BpfStats(Option<String>);

impl BpfStats {
    pub fn enable() -> BpfStats {
        let old = std::fs::read_to_string(BPF_STATS).ok();
        if std::fs::write(BPF_STATS, "1").is_err() {
            return BpfStats(None);
        }
        BpfStats(old)
    }

    /// Whether the counters are on (the sysctl could be set).
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(BPF_STATS, old.trim());
        }
    }
}

/// One run at `events_per_s` (0: as fast as the clients go).
pub fn run(agent: &Path, size: Size, events_per_s: f64) -> Result<LoadResult> {
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let marker: PathBuf =
        std::env::temp_dir().join(format!("openbox-load-bench-{}.started", std::process::id()));
    let out = marker.with_extension("result");
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&out);
    let rate = events_per_s / EVENTS_PER_REQUEST;
    println!(
        "\nsustained load: `trace --json -- xtask load-gen`, {} keep-alive clients and their server in one watched process, {} s, {}",
        size.clients,
        size.seconds,
        if rate > 0.0 {
            format!("{rate:.0} requests/s ({events_per_s:.0} events/s)")
        } else {
            "as fast as they go".into()
        }
    );
    let stats = BpfStats::enable();
    let mut proc = Proc::spawn(
        "agent (load)",
        Command::new(agent)
            .args(["trace", "--json", "--"])
            .arg(&xtask)
            .arg("load-gen")
            .args(["--clients", &size.clients.to_string()])
            .args(["--seconds", &size.seconds.to_string()])
            .args(["--rate", &rate.to_string()])
            .arg("--marker")
            .arg(&marker)
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null()),
        true,
    )?;
    let pid = proc.pid();
    let failed = |proc: &Proc, what: &str| {
        let _ = std::fs::remove_file(&marker);
        anyhow::anyhow!("{what}: {}", proc.stderr_text())
    };
    // The agent's CPU and its programs' run time when the load begins (loading and
    // verifying the programs is the agent's system time too).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (cpu0, bpf0) = loop {
        if marker.exists() {
            break (proc_cpu(pid).unwrap_or(0.0), bpf_run_stats(pid));
        }
        if proc.has_exited() || Instant::now() > deadline {
            return Err(failed(
                &proc,
                "the load generator did not start under the agent",
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let deadline = Instant::now() + Duration::from_secs_f64(size.seconds + 60.0);
    while !out.exists() {
        if proc.has_exited() || Instant::now() > deadline {
            return Err(failed(&proc, "the load generator did not finish"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The load is over; the agent drains what the ring still holds. Wait until its CPU
    // time stops moving, then read it, while the generator (which the agent will reap,
    // adding its CPU to the agent's rusage) is still alive.
    let mut cpu1 = proc_cpu(pid).unwrap_or(0.0);
    let settle = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = proc_cpu(pid).unwrap_or(cpu1);
        if now - cpu1 < 0.011 || Instant::now() > settle {
            cpu1 = now;
            break;
        }
        cpu1 = now;
    }
    let bpf1 = bpf_run_stats(pid);
    let rss = peak_rss_mib(pid).unwrap_or(f64::NAN);
    drop(stats);
    let _ = std::fs::remove_file(&marker);
    let status = proc.wait(Duration::from_secs(60))?;
    let gen = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        bail!("the load run failed ({status}): {}", proc.stderr_text());
    }
    let summary = proc.summary()?;
    let num = |k| crate::bench::json_num(&summary, k).unwrap_or(f64::NAN);
    let requests = crate::bench::json_num(&gen, "requests")
        .with_context(|| format!("the load generator wrote no result ({gen:?})"))?;
    let seconds = crate::bench::json_num(&gen, "seconds").unwrap_or(size.seconds);
    // Stdout holds only spans (the summary goes to stderr).
    let spans = proc.lines();
    let cpu = cpu1 - cpu0;
    let events = num("events");
    let (bpf_ns, bpf_cnt) = (bpf1.0 - bpf0.0, bpf1.1 - bpf0.1);
    let r = LoadResult {
        target_events_per_s: events_per_s,
        requests_per_s: requests / seconds,
        events_per_s: events / seconds,
        spans,
        cpu_us_per_span: cpu * 1e6 / spans.max(1) as f64,
        cpu_us_per_event: cpu * 1e6 / events.max(1.0),
        agent_cpu_share: cpu / seconds,
        peak_rss_mib: rss,
        drops: num("ringbuf_drops"),
        bpf_ns_per_request: (bpf_cnt > 0).then(|| bpf_ns as f64 / requests.max(1.0)),
    };
    println!(
        "  {:.0} requests/s, {:.0} events/s ({events:.0} events, {} spans in {seconds:.1} s), ring-buffer drops {:.0}",
        r.requests_per_s, r.events_per_s, r.spans, r.drops
    );
    println!(
        "  agent CPU from the load's start to the end of its drain: {cpu:.2} s = {:.2} µs per span, {:.2} µs per event, {:.0} % of a core; peak RSS {:.0} MiB",
        r.cpu_us_per_span,
        r.cpu_us_per_event,
        100.0 * r.agent_cpu_share,
        r.peak_rss_mib
    );
    match r.bpf_ns_per_request {
        Some(ns) => println!(
            "  kernel programs (bpf_stats, every process's runs): {bpf_cnt} runs, {:.0} ms, {:.0} ns per run, {ns:.0} ns per request (charged to the traced process, not the agent)",
            bpf_ns as f64 / 1e6,
            bpf_ns as f64 / bpf_cnt as f64
        ),
        None => println!("  kernel programs: no run_time_ns (kernel.bpf_stats_enabled could not be set)"),
    }
    Ok(r)
}
