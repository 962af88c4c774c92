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

/// The load generator itself (`xtask load-gen`, run under the agent): writes one JSON
/// line with the requests made and the seconds they took to `out` (stdout holds the
/// agent's spans). Creates `marker` when the load begins.
pub fn generate(clients: usize, seconds: f64, marker: &Path, out: &Path) -> Result<()> {
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
            std::thread::spawn(move || client(c, &stop, &total))
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
    std::fs::write(out, line).with_context(|| format!("writing {}", out.display()))
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

fn client(mut conn: TcpStream, stop: &AtomicBool, total: &AtomicU64) -> Result<()> {
    let mut buf = [0u8; 4096];
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) {
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

pub struct LoadResult {
    pub requests_per_s: f64,
    pub events_per_s: f64,
    pub spans: u64,
    pub cpu_us_per_span: f64,
    pub cpu_us_per_event: f64,
    pub agent_cpu_share: f64,
    pub peak_rss_mib: f64,
    pub drops: f64,
    pub bpf_ns_per_event: Option<f64>,
}

/// CPU seconds (user + system) a live process has used, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Sum of `run_time_ns` and `run_cnt` over the BPF programs the process holds (0 unless
/// kernel.bpf_stats_enabled is on).
fn bpf_run_stats(pid: u32) -> (u64, u64) {
    let (mut ns, mut cnt) = (0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    for e in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        for line in info.lines() {
            let mut it = line.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
                (Some("run_time_ns:"), Some(v)) => ns += v,
                (Some("run_cnt:"), Some(v)) => cnt += v,
                _ => {}
            }
        }
    }
    (ns, cnt)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Switches kernel.bpf_stats_enabled on for its lifetime, back to what it was after.
struct BpfStats(Option<String>);

impl BpfStats {
    fn enable() -> BpfStats {
        let old = std::fs::read_to_string(BPF_STATS).ok();
        if std::fs::write(BPF_STATS, "1").is_err() {
            return BpfStats(None);
        }
        BpfStats(old)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(BPF_STATS, old.trim());
        }
    }
}

pub fn run(agent: &Path, size: Size) -> Result<LoadResult> {
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let marker: PathBuf =
        std::env::temp_dir().join(format!("openbox-load-bench-{}.started", std::process::id()));
    let out = marker.with_extension("result");
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&out);
    println!(
        "\nsustained load: `trace --json -- xtask load-gen`, {} keep-alive clients and their server in one watched process, {} s",
        size.clients, size.seconds
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
            .arg("--marker")
            .arg(&marker)
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null()),
        true,
    )?;
    let pid = proc.pid();
    // The agent's CPU and its programs' run time when the load begins.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (cpu0, bpf0) = loop {
        if marker.exists() {
            break (proc_cpu(pid).unwrap_or(0.0), bpf_run_stats(pid));
        }
        if proc.has_exited() || Instant::now() > deadline {
            bail!(
                "the load generator did not start under the agent: {}",
                proc.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The programs' totals just before the generator exits (the fds close with the agent).
    let mut bpf1 = bpf0;
    let limit = Instant::now() + Duration::from_secs_f64(size.seconds + 120.0);
    while !proc.has_exited() && Instant::now() < limit {
        let now = bpf_run_stats(pid);
        if now.1 >= bpf1.1 {
            bpf1 = now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, usage) = proc.wait_rusage(Duration::from_secs(60))?;
    drop(stats);
    let _ = std::fs::remove_file(&marker);
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
    // Stdout holds only spans (the summary goes to stderr); the few before the load
    // (none: its connections carry no request yet) are counted too.
    let spans = proc.lines();
    let cpu = usage.user_s + usage.sys_s - cpu0;
    let events = num("events");
    let (bpf_ns, bpf_cnt) = (bpf1.0 - bpf0.0, bpf1.1 - bpf0.1);
    let r = LoadResult {
        requests_per_s: requests / seconds,
        events_per_s: events / seconds,
        spans,
        cpu_us_per_span: cpu * 1e6 / spans.max(1) as f64,
        cpu_us_per_event: cpu * 1e6 / events.max(1.0),
        agent_cpu_share: cpu / seconds,
        peak_rss_mib: usage.max_rss_kib as f64 / 1024.0,
        drops: num("ringbuf_drops"),
        bpf_ns_per_event: (bpf_cnt > 0).then(|| bpf_ns as f64 / events.max(1.0)),
    };
    println!(
        "  {:.0} requests/s, {:.0} events/s ({events:.0} events, {} spans in {seconds:.1} s), ring-buffer drops {:.0}",
        r.requests_per_s, r.events_per_s, r.spans, r.drops
    );
    println!(
        "  agent CPU during the load {cpu:.2} s (user {:.2} s + system {:.2} s over its whole run): {:.2} µs per span, {:.2} µs per event, {:.0} % of a core; peak RSS {:.0} MiB",
        usage.user_s,
        usage.sys_s,
        r.cpu_us_per_span,
        r.cpu_us_per_event,
        100.0 * r.agent_cpu_share,
        r.peak_rss_mib
    );
    match r.bpf_ns_per_event {
        Some(ns) => println!(
            "  kernel programs (bpf_stats): {bpf_cnt} runs, {:.0} ms, {ns:.0} ns per event emitted, {:.0} ns per run (charged to the traced process)",
            bpf_ns as f64 / 1e6,
            bpf_ns as f64 / bpf_cnt as f64
        ),
        None => println!("  kernel programs: no run_time_ns (kernel.bpf_stats_enabled could not be set)"),
    }
    println!("  targets: ≤ 5 µs agent CPU per span; 100 000 events/s with 0 drops on 2 cores");
    Ok(r)
}
