//! `openbox-agent run`: the daemon. It serves the hook socket, watches the workers that
//! register and everything they start, attributes what they do to activities, and
//! writes one governance event per activity start and end.
//!
//! One task owns the capture session and the registry: ring-buffer records, hook
//! requests and process exits are handled in the order they arrive, so an
//! `activity_end` is answered only after every record the activity's syscalls produced
//! has been read (they are in the ring before the hook can even send the request).

pub mod hook;
pub mod registry;

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::{
    capture::{tls, Capture, CaptureConfig},
    conn::{Pid, SkipPaths},
    procfs,
    span::{Span, SpanConfig},
    trace::{self, Session},
};
use hook::{reply, HookMsg};
use registry::{ActivityInfo, Registry, Unattributed, Worker};

#[derive(Debug, Clone)]
pub struct RunOpts {
    pub socket: PathBuf,
    /// Governance events as JSON lines: a file (appended), or `-` for stdout.
    pub events: PathBuf,
    /// Spans that could not be attributed, as JSON lines with the reason.
    pub unattributed: Option<PathBuf>,
    pub spans: SpanConfig,
    pub capture: CaptureConfig,
    pub tls_libs: Vec<PathBuf>,
    pub skip: SkipPaths,
    /// Most spans kept per activity.
    pub span_limit: usize,
}

/// A JSON-lines output: a file appended to, or stdout. Flushed per line.
pub struct Lines {
    out: Box<dyn Write + Send>,
    path: String,
}

impl Lines {
    pub fn open(path: &Path) -> Result<Lines> {
        let out: Box<dyn Write + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {} for writing", path.display()))?,
            )
        };
        Ok(Lines {
            out,
            path: path.display().to_string(),
        })
    }

    pub fn write(&mut self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        if let Err(e) = self.out.write_all(line.as_bytes()).and_then(|_| self.out.flush()) {
            tracing::error!(path = %self.path, "writing an event failed: {e}");
        }
    }
}

struct Daemon {
    session: Session,
    registry: Registry,
    /// Hook connection → the worker it registered as.
    conns: std::collections::HashMap<u64, Pid>,
    events: Lines,
    unattributed: Option<Lines>,
}

pub async fn run(opts: RunOpts) -> Result<i32> {
    let mut cap = Capture::load(&opts.capture)?;
    for lib in &opts.tls_libs {
        cap.attach_tls(lib).map_err(|e| anyhow!("{e}"))?;
    }
    for lib in tls::system_libssl() {
        if let Err(e) = cap.attach_tls(&lib) {
            tracing::warn!("{e}");
        }
    }
    let mut ring = cap.events()?;
    let events = Lines::open(&opts.events)?;
    let unattributed = opts.unattributed.as_deref().map(Lines::open).transpose()?;
    let listener = hook::bind(&opts.socket).await?;
    let mut d = Daemon {
        session: Session::collecting(cap, opts.skip.clone(), opts.spans.clone()),
        registry: Registry::new(opts.span_limit),
        conns: Default::default(),
        events,
        unattributed,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(hook::serve(listener, tx));
    eprintln!(
        "openbox-agent: listening for worker hooks on {}",
        opts.socket.display()
    );

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                trace::drain(guard.get_inner_mut(), &mut d.session);
                guard.clear_ready();
                d.route();
            }
            _ = tick.tick() => {
                trace::drain(ring.get_mut(), &mut d.session);
                d.route();
            }
            Some(msg) = rx.recv() => {
                // What the worker did before sending this is in the ring: read it first.
                trace::drain(ring.get_mut(), &mut d.session);
                d.route();
                d.handle(msg);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&opts.socket);
    trace::drain(ring.get_mut(), &mut d.session);
    d.session.finish_spans();
    d.route();
    let c = d.session.cap.counters();
    let mut summary = json!({"type": "summary"});
    if let (Value::Object(s), Value::Object(r), Ok(Value::Object(k))) =
        (&mut summary, d.registry.summary(), serde_json::to_value(c))
    {
        s.extend(r);
        s.extend(k);
        s.insert("records_received".into(), d.session.records_received.into());
    }
    eprintln!("{summary}");
    Ok(0)
}

impl Daemon {
    /// Moves the spans the session finished onto their activities.
    fn route(&mut self) {
        let Some(collected) = self.session.collected.as_mut() else {
            return;
        };
        let spans = std::mem::take(&mut collected.spans);
        let exits = std::mem::take(&mut collected.exits);
        for span in spans {
            if let Err((why, span)) = self.registry.route(span) {
                self.write_unattributed(why, &span);
            }
        }
        for pid in exits {
            if let Some(w) = self.registry.worker_exited(pid) {
                for tid in w.threads.keys() {
                    self.session.cap.unregister_thread(*tid);
                }
                tracing::info!(pid, "worker exited");
            }
        }
    }

    fn write_unattributed(&mut self, why: Unattributed, span: &Span) {
        if let Some(out) = self.unattributed.as_mut() {
            out.write(&json!({"reason": why.as_str(), "pid": span.pid, "tid": span.tid,
                "worker": span.attr.owner, "token": span.attr.activity, "span": span}));
        }
    }

    fn handle(&mut self, msg: HookMsg) {
        match msg {
            HookMsg::Closed { conn } => {
                self.conns.remove(&conn);
            }
            HookMsg::Request {
                conn,
                peer,
                req,
                reply: tx,
            } => {
                let id = req.get("id").cloned().unwrap_or(Value::Null);
                let op = req.get("op").and_then(Value::as_str).unwrap_or("");
                let result = match (op, self.conns.get(&conn).copied()) {
                    ("hello", _) => self.hello(conn, peer, &req),
                    (_, None) => Err("send `hello` first".to_string()),
                    ("thread", Some(w)) => self.thread(w, &req),
                    ("activity_start", Some(w)) => self.activity_start(w, &req),
                    ("activity_end", Some(w)) => self.activity_end(w, &req),
                    (other, Some(_)) => Err(format!("unknown op {other:?}")),
                };
                reply(&tx, &id, result);
            }
        }
    }

    fn refuse(&mut self, peer: Pid, why: String) -> Result<Value, String> {
        self.registry.stats.registrations_refused += 1;
        tracing::warn!(peer, "refused hook registration: {why}");
        Err(format!("refused: {why}"))
    }

    /// Registers the peer as a worker. The peer's identity comes from the kernel
    /// (SO_PEERCRED); what it claims must match it, in its own PID namespace.
    fn hello(&mut self, conn: u64, peer: Pid, req: &Value) -> Result<Value, String> {
        let claimed = req.get("pid").and_then(Value::as_u64);
        let ns_pid = procfs::nspids(&format!("/proc/{peer}/status"))
            .and_then(|ids| ids.last().copied())
            .ok_or_else(|| format!("process {peer} vanished"))?;
        if claimed != Some(ns_pid as u64) {
            let claim = claimed.map(|c| c.to_string()).unwrap_or_else(|| "nothing".into());
            return self.refuse(
                peer,
                format!("process {peer} (pid {ns_pid} in its own namespace) claims to be pid {claim}"),
            );
        }
        let addr = req.get("slots_addr").and_then(Value::as_u64).unwrap_or(0);
        let slots = req.get("slots").and_then(Value::as_u64).unwrap_or(0);
        if !(1..=65536).contains(&slots) || !procfs::writable_range(peer, addr, slots * 8) {
            return self.refuse(
                peer,
                format!("process {peer}: the slot table {addr:#x} ({slots} slots) is not writable memory of that process"),
            );
        }
        if let Some(w) = self.registry.workers.get(&peer) {
            if (w.slots_addr, w.slots) != (addr, slots) {
                return self.refuse(
                    peer,
                    format!("process {peer} is registered already with another slot table"),
                );
            }
        } else {
            self.session
                .watch(peer)
                .map_err(|e| format!("cannot watch process {peer}: {e:#}"))?;
            for child in procfs::descendants(peer) {
                let _ = self.session.watch(child);
            }
            self.registry.workers.insert(
                peer,
                Worker {
                    pid: peer,
                    ns_pid,
                    slots_addr: addr,
                    slots,
                    threads: Default::default(),
                    config: req.get("config").cloned().unwrap_or(Value::Null),
                },
            );
            self.registry.stats.workers += 1;
            tracing::info!(pid = peer, ns_pid, hook = ?req.get("hook"), "worker registered");
        }
        self.conns.insert(conn, peer);
        Ok(json!({"agent": concat!("openbox-agent/", env!("CARGO_PKG_VERSION")), "worker": peer}))
    }

    /// Tells the kernel where a worker thread publishes its activity.
    fn thread(&mut self, worker: Pid, req: &Value) -> Result<Value, String> {
        let (Some(tid), Some(slot)) = (
            req.get("tid").and_then(Value::as_u64),
            req.get("slot").and_then(Value::as_u64),
        ) else {
            return Err("thread needs `tid` and `slot` (integers)".into());
        };
        let Some(w) = self.registry.workers.get(&worker) else {
            return Err("the worker is gone".into());
        };
        if slot >= w.slots {
            return Err(format!("slot {slot} is outside the table of {} slots", w.slots));
        }
        let addr = w.slots_addr + slot * 8;
        let Some(host_tid) = u32::try_from(tid).ok().and_then(|t| procfs::host_tid(worker, t))
        else {
            return self.refuse(
                worker,
                format!("thread {tid} is not a thread of process {worker}"),
            );
        };
        self.session
            .cap
            .register_thread(host_tid, worker, addr)
            .map_err(|e| format!("{e:#}"))?;
        if let Some(w) = self.registry.workers.get_mut(&worker) {
            w.threads.insert(host_tid, slot);
        }
        Ok(json!({"host_tid": host_tid}))
    }

    fn activity_start(&mut self, worker: Pid, req: &Value) -> Result<Value, String> {
        let info = ActivityInfo::from_request(req)?;
        let event = activity_event("ActivityStarted", &info, now_rfc3339());
        let token = self.registry.start(worker, info);
        self.events.write(&event);
        Ok(json!({"token": token}))
    }

    fn activity_end(&mut self, worker: Pid, req: &Value) -> Result<Value, String> {
        let token = req
            .get("token")
            .and_then(Value::as_u64)
            .ok_or("activity_end needs `token`")?;
        let Some(a) = self.registry.end(worker, token) else {
            return Err(format!("no activity {token} of this worker is running"));
        };
        let end_time = req
            .get("end_time")
            .and_then(Value::as_f64)
            .unwrap_or_else(registry::now_secs);
        let status = match req.get("status").and_then(Value::as_str) {
            Some("failed") => "failed",
            _ => "completed",
        };
        let mut event = activity_event("ActivityCompleted", &a.info, now_rfc3339());
        let fields = event.as_object_mut().expect("an object");
        fields.insert("status".into(), status.into());
        fields.insert("start_time".into(), a.info.start_time.into());
        fields.insert("end_time".into(), end_time.into());
        fields.insert(
            "duration_ms".into(),
            ((end_time - a.info.start_time) * 1000.0).max(0.0).into(),
        );
        fields.insert("span_count".into(), a.spans.len().into());
        fields.insert(
            "spans".into(),
            serde_json::to_value(&a.spans).unwrap_or(Value::Array(Vec::new())),
        );
        let output = if status == "failed" {
            Value::Null
        } else {
            req.get("output").cloned().unwrap_or(Value::Null)
        };
        fields.insert("activity_output".into(), output);
        fields.insert(
            "error".into(),
            match req.get("error") {
                Some(e @ Value::Object(_)) => e.clone(),
                _ => Value::Null,
            },
        );
        self.events.write(&event);
        Ok(json!({"span_count": a.spans.len(), "spans_dropped": a.dropped}))
    }
}

/// The fields ActivityStarted and ActivityCompleted share (protocol §2.2).
fn activity_event(kind: &str, a: &ActivityInfo, timestamp: String) -> Value {
    let mut m = Map::new();
    m.insert("source".into(), "workflow-telemetry".into());
    m.insert("event_type".into(), kind.into());
    m.insert("workflow_id".into(), a.workflow_id.clone().into());
    m.insert("run_id".into(), a.run_id.clone().into());
    m.insert("workflow_type".into(), a.workflow_type.clone().into());
    m.insert("activity_id".into(), a.activity_id.clone().into());
    m.insert("activity_type".into(), a.activity_type.clone().into());
    m.insert("task_queue".into(), a.task_queue.clone().into());
    m.insert("attempt".into(), a.attempt.into());
    m.insert("timestamp".into(), timestamp.into());
    m.insert("activity_input".into(), a.input.clone());
    Value::Object(m)
}

/// UTC now as RFC 3339 with milliseconds and `Z` (protocol §2.1).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_ms(now.as_millis() as i64)
}

pub fn rfc3339_ms(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_736_937_045_123), "2025-01-15T10:30:45.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
