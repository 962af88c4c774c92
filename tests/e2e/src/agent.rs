//! The agent daemon (`openbox-agent run`) as the end-to-end tests start and stop it.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use openbox_testkit::Proc;
use serde_json::Value;

use crate::{Env, START_TIMEOUT};

/// `openbox-agent run --socket S --events E --unattributed U --metrics-addr 127.0.0.1:0`.
pub struct Agent {
    proc: Proc,
    pub socket: PathBuf,
    /// Where it serves /metrics (the port it chose, from its stderr).
    pub metrics_addr: Option<String>,
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
    /// `/metrics` scraped just before SIGTERM (the worker already stopped): series →
    /// value, and the text.
    pub metrics: BTreeMap<String, f64>,
    pub metrics_text: String,
}

/// `GET /metrics` over plain HTTP/1.1.
fn scrape(addr: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("/metrics answered: {out}"))),
    }
}

/// Prometheus text → `name{labels}` → value.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
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
        Agent::start_with(env, logs, socket, &[])
    }

    /// The same with more arguments to `run` (e.g. `--otlp-endpoint URL`).
    pub fn start_with(env: &Env, logs: &Path, socket: &Path, extra: &[String]) -> Agent {
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
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
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
        // Printed before the programs load, so it is there once the socket serves.
        let metrics_addr = proc
            .stderr_text()
            .split("/readyz on http://")
            .nth(1)
            .map(|rest| {
                rest.chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect()
            });
        Agent {
            proc,
            socket: socket.to_path_buf(),
            metrics_addr,
            events: events.to_path_buf(),
            unattributed: unattributed.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// What it has logged so far.
    pub fn stderr_text(&self) -> String {
        self.proc.stderr_text()
    }

    /// SIGTERM, wait for the drain, and read everything it reported. The agent must exit
    /// 0 and end with the summary line on stderr.
    pub fn stop(mut self) -> AgentReport {
        let addr = self.metrics_addr.clone().unwrap_or_else(|| {
            panic!(
                "`openbox-agent run --metrics-addr` did not say where it serves\nstderr: {}",
                self.proc.stderr_tail()
            )
        });
        // Once every record the kernel emitted has been read (the drain thread copies
        // records into a queue that the session parses a moment later): up to 2 s.
        let mut metrics_text = String::new();
        for _ in 0..40 {
            metrics_text = scrape(&addr).unwrap_or_else(|e| {
                panic!(
                    "scraping http://{addr}/metrics: {e}\nstderr: {}",
                    self.proc.stderr_tail()
                )
            });
            let m = parse_metrics(&metrics_text);
            if m.get("openbox_records_received_total") == m.get("openbox_events_total") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
            metrics: parse_metrics(&metrics_text),
            metrics_text,
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

    /// `/metrics`, scraped after the worker stopped, holds the values of the summary the
    /// agent printed at exit. Counters that the shutdown itself can still move (spans of
    /// connections still open when the agent stops are finished then: unattributed
    /// reasons, parser losses, unrecognised connections, OTLP export counts) may only have
    /// grown by exit.
    pub fn assert_metrics_match_summary(&self) {
        let s = &self.summary;
        let num = |v: &Value| v.as_u64().unwrap_or(0);
        let metric = |name: &str| -> u64 {
            *self
                .metrics
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{}", self.metrics_text))
                as u64
        };
        let g = &s["governance"];
        let mut equal: Vec<(String, u64)> = [
            ("openbox_events_total", &s["events"]),
            ("openbox_ringbuf_drops_total", &s["ringbuf_drops"]),
            ("openbox_truncated_calls_total", &s["truncated_calls"]),
            ("openbox_truncated_bytes_total", &s["truncated_bytes"]),
            ("openbox_records_received_total", &s["records_received"]),
            ("openbox_spans_attributed_total", &s["spans_attributed"]),
            (
                "openbox_spans_dropped_over_limit_total",
                &s["spans_dropped_over_limit"],
            ),
            ("openbox_hook_connections_total", &s["hook_connections"]),
            (
                "openbox_hook_registrations_refused_total",
                &s["registrations_refused"],
            ),
            ("openbox_activities_total", &s["activities"]),
            ("openbox_workers_registered_total", &s["workers"]),
            ("openbox_spool_events", &g["spool_pending"]),
            ("openbox_spool_dropped_total", &g["spool_dropped"]),
            (
                "openbox_governance_core_failures_total",
                &g["core_failures"],
            ),
        ]
        .into_iter()
        .map(|(name, v)| (name.to_string(), num(v)))
        .collect();
        for outcome in ["ok", "non_json", "http_error", "timeout", "network"] {
            equal.push((
                format!("openbox_governance_requests_total{{outcome=\"{outcome}\"}}"),
                num(&g["requests"][outcome]),
            ));
        }
        for (name, want) in &equal {
            assert_eq!(
                metric(name),
                *want,
                "{name}: /metrics after the worker stopped and the summary at exit disagree\nsummary: {s}\n/metrics:\n{}",
                self.metrics_text
            );
        }
        let mut grown: Vec<(String, u64)> = vec![(
            "openbox_connections_unrecognised_total".into(),
            num(&s["unrecognised_connections"]),
        )];
        for reason in ["no_activity", "after_activity_end", "unknown_activity"] {
            grown.push((
                format!("openbox_spans_unattributed_total{{reason=\"{reason}\"}}"),
                num(&s["unattributed_reasons"][reason]),
            ));
        }
        for protocol in ["http", "postgres", "mysql", "redis", "mongo"] {
            grown.push((
                format!("openbox_parser_unparsed_messages_total{{protocol=\"{protocol}\"}}"),
                num(&s["unparsed_by_protocol"][protocol]),
            ));
            for reason in ["malformed", "gap", "unpaired", "oversize"] {
                grown.push((
                    format!(
                        "openbox_parser_lost_messages_total{{protocol=\"{protocol}\",reason=\"{reason}\"}}"
                    ),
                    num(&s["parser_losses"][protocol][reason]),
                ));
            }
        }
        // OTLP export goes on while the agent drains and exits.
        if let Some(o) = s.get("otlp") {
            grown.push((
                "openbox_otlp_spans_exported_total".into(),
                num(&o["spans_exported"]),
            ));
            for (reason, key) in [
                ("queue_full", "spans_dropped_queue_full"),
                ("export_failed", "spans_dropped_export_failed"),
            ] {
                grown.push((
                    format!("openbox_otlp_spans_dropped_total{{reason=\"{reason}\"}}"),
                    num(&o[key]),
                ));
            }
        }
        for (name, at_exit) in &grown {
            assert!(
                metric(name) <= *at_exit,
                "{name}: /metrics says more than the summary at exit ({at_exit})\n{}",
                self.metrics_text
            );
        }
        assert!(
            metric("openbox_spans_attributed_total") > 0,
            "{}",
            self.metrics_text
        );
        assert!(
            metric("openbox_governance_requests_total{outcome=\"ok\"}") > 0,
            "{}",
            self.metrics_text
        );
    }

    /// Events of one `event_type`.
    pub fn events_of(&self, event_type: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e.get("event_type").and_then(Value::as_str) == Some(event_type))
            .collect()
    }
}
