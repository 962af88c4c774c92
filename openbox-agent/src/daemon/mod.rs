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

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::{
    capture::CaptureConfig,
    conn::{Pid, SkipPaths},
    governance::{
        config::normalize_url,
        events,
        verdict::{Decision, ErrorType},
        FailPolicy, GovernanceConfig, Governor,
    },
    pipeline::{self, Collect, Output, Session},
    procfs,
    span::{Span, SpanConfig},
};
use hook::{reply, HookMsg, ReplyTx};
use registry::{ActivityInfo, Registry, Unattributed, Worker};

#[derive(Debug, Clone)]
pub struct RunOpts {
    pub socket: PathBuf,
    /// Core, the embedded policy, the events sink, the spool.
    pub governance: GovernanceConfig,
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
    session: Session<Collect>,
    registry: Registry,
    /// Hook connection → the worker it registered as.
    conns: std::collections::HashMap<u64, Pid>,
    governor: Arc<Governor>,
    /// The agent's own governance settings, the base of per-worker ones.
    base_config: GovernanceConfig,
    /// Governors for workers that passed their own settings (create_openbox_worker),
    /// by those settings; `Err` holds why Core refused them.
    worker_governors: std::collections::HashMap<String, GovernorState>,
    ready_tx: mpsc::UnboundedSender<(String, Result<Arc<Governor>, String>)>,
    /// Per run (workflow id, run id): becomes true when the run's latest workflow event
    /// (started, signal) has been answered. Activity events of the run wait for it, and
    /// so does the next workflow event: Core gets WorkflowStarted before the run's
    /// activities, though every event is governed in a task of its own and the hook sends
    /// workflow events on a connection of their own. Activities of one run stay parallel.
    run_tail: std::collections::HashMap<(String, String), tokio::sync::watch::Receiver<bool>>,
    unattributed: Option<Lines>,
}

/// Runs remembered for ordering; past this the oldest are forgotten (their later events
/// are then ordered only by arrival).
const MAX_ORDERED_RUNS: usize = 65536;

enum GovernorState {
    Ready(Arc<Governor>),
    Refused(String),
    /// Being started (Core validates the key): hellos waiting for it.
    Starting(Vec<(ReplyTx, Value, Value)>),
}

pub async fn run(opts: RunOpts) -> Result<i32> {
    let (session, mut ring) = pipeline::start(
        &opts.capture,
        &opts.tls_libs,
        opts.skip.clone(),
        Output::Spans(opts.spans.clone()),
        Collect::default(),
    )?;
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let governor = Arc::new(
        Governor::new(opts.governance.clone())
            .await
            .context("starting governance")?,
    );
    let unattributed = opts.unattributed.as_deref().map(Lines::open).transpose()?;
    let listener = hook::bind(&opts.socket).await?;
    let mut d = Daemon {
        session,
        registry: Registry::new(opts.span_limit),
        conns: Default::default(),
        governor,
        base_config: opts.governance.clone(),
        worker_governors: Default::default(),
        ready_tx,
        run_tail: Default::default(),
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
    loop {
        tokio::select! {
            ready = ring.ready() => {
                ready?;
                ring.drain(&mut d.session);
                d.route();
            }
            Some(msg) = rx.recv() => {
                // What the worker did before sending this is in the ring: read it first.
                ring.drain(&mut d.session);
                d.route();
                d.handle(msg);
            }
            Some((key, result)) = ready_rx.recv() => d.governor_ready(key, result),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&opts.socket);
    ring.drain(&mut d.session);
    d.session.finish();
    d.route();
    let c = d.session.counters();
    let mut summary = json!({"type": "summary"});
    if let (Value::Object(s), Value::Object(r), Ok(Value::Object(k))) =
        (&mut summary, d.registry.summary(), serde_json::to_value(c))
    {
        s.extend(r);
        s.extend(k);
        s.insert(
            "records_received".into(),
            d.session.stats().records_received.into(),
        );
        let g = d.governor.stats();
        s.insert(
            "governance".into(),
            json!({"spool_pending": g.spool_pending, "spool_bytes": g.spool_bytes,
                "spool_dropped": g.spool_dropped, "delivered_from_spool": g.delivered_from_spool,
                "rejected_by_core": g.rejected_by_core, "core_failures": g.core_failures,
                "spool_write_errors": g.spool_write_errors}),
        );
    }
    eprintln!("{summary}");
    Ok(0)
}

impl Daemon {
    /// Moves the spans the session finished onto their activities.
    fn route(&mut self) {
        let Collect { spans, exits } = self.session.sink_mut().take();
        for span in spans {
            if let Err(refused) = self.registry.route(span) {
                let (why, span) = *refused;
                self.write_unattributed(why, &span);
            }
        }
        for pid in exits {
            if let Some(w) = self.registry.worker_exited(pid) {
                for tid in w.threads.keys() {
                    self.session.capture_mut().unregister_thread(*tid);
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
                // Governed ops answer from a task of their own: Core may take its time.
                let result = match (op, self.conns.get(&conn).copied()) {
                    ("hello", _) => match self.hello(conn, peer, &req) {
                        Ok(ok) if !self.worker_governor(peer, &tx, &id, &ok) => return,
                        other => other,
                    },
                    (_, None) => Err("send `hello` first".to_string()),
                    ("thread", Some(w)) => self.thread(w, &req),
                    ("activity_start", Some(w)) => match self.activity_start(w, &req, &tx, &id) {
                        Ok(()) => return,
                        Err(e) => Err(e),
                    },
                    ("activity_end", Some(w)) => match self.activity_end(w, &req, &tx, &id) {
                        Ok(()) => return,
                        Err(e) => Err(e),
                    },
                    ("workflow_event", Some(w)) => self.workflow_event(w, &req),
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
                    governor: None,
                },
            );
            self.registry.stats.workers += 1;
            tracing::info!(pid = peer, ns_pid, hook = ?req.get("hook"), "worker registered");
        }
        self.conns.insert(conn, peer);
        Ok(json!({"agent": concat!("openbox-agent/", env!("CARGO_PKG_VERSION")), "worker": peer}))
    }

    /// A worker that passed governance settings of its own (create_openbox_worker with
    /// the SDK's parameters) gets a governor with them, started once per distinct set;
    /// its hello is answered when that governor is ready. Returns false when the hello
    /// is answered later.
    fn worker_governor(&mut self, worker: Pid, tx: &ReplyTx, id: &Value, ok: &Value) -> bool {
        let Some(config) = self.registry.workers.get(&worker).map(|w| w.config.clone()) else {
            return true;
        };
        let cfg = match worker_config(&self.base_config, &config) {
            Ok(None) => return true,
            Ok(Some(cfg)) => cfg,
            Err(e) => {
                tracing::warn!(pid = worker, "the worker's governance settings are invalid: {e}");
                self.set_worker_governor(worker, format!("invalid: {e}"));
                self.worker_governors
                    .insert(format!("invalid: {e}"), GovernorState::Refused(e));
                return true;
            }
        };
        let key = config.to_string();
        self.set_worker_governor(worker, key.clone());
        match self.worker_governors.get_mut(&key) {
            Some(GovernorState::Starting(waiting)) => {
                waiting.push((tx.clone(), id.clone(), ok.clone()));
                false
            }
            Some(_) => true,
            None => {
                self.worker_governors.insert(
                    key.clone(),
                    GovernorState::Starting(vec![(tx.clone(), id.clone(), ok.clone())]),
                );
                let ready = self.ready_tx.clone();
                tokio::spawn(async move {
                    let result = Governor::new(cfg).await.map(Arc::new).map_err(|e| e.to_string());
                    let _ = ready.send((key, result));
                });
                false
            }
        }
    }

    fn set_worker_governor(&mut self, worker: Pid, key: String) {
        if let Some(w) = self.registry.workers.get_mut(&worker) {
            w.governor = Some(key);
        }
    }

    fn governor_ready(&mut self, key: String, result: Result<Arc<Governor>, String>) {
        let state = match result {
            Ok(g) => GovernorState::Ready(g),
            Err(e) => {
                tracing::error!("governance with a worker's own settings could not start: {e}; its activities are halted");
                GovernorState::Refused(e)
            }
        };
        if let Some(GovernorState::Starting(waiting)) = self.worker_governors.insert(key, state) {
            for (tx, id, ok) in waiting {
                reply(&tx, &id, Ok(ok));
            }
        }
    }

    /// The run's latest workflow event, for an activity event of the run to wait for.
    fn run_latest(&self, workflow_id: &str, run_id: &str) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.run_tail
            .get(&(workflow_id.to_string(), run_id.to_string()))
            .cloned()
    }

    /// A workflow event of the run becomes its latest: returns the previous one to wait
    /// for, and the sender that marks this one answered. `last` (the run's final event)
    /// forgets the run.
    fn run_turn(
        &mut self,
        workflow_id: &str,
        run_id: &str,
        last: bool,
    ) -> (
        Option<tokio::sync::watch::Receiver<bool>>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let key = (workflow_id.to_string(), run_id.to_string());
        let (done, next) = tokio::sync::watch::channel(false);
        let prev = if last {
            self.run_tail.remove(&key)
        } else {
            if self.run_tail.len() >= MAX_ORDERED_RUNS && !self.run_tail.contains_key(&key) {
                self.run_tail.clear();
            }
            self.run_tail.insert(key, next)
        };
        (prev, done)
    }

    /// The governor of a worker's activities: its own, or the agent's. `Err` carries the
    /// decision for a worker whose own settings Core refused (fail closed: a worker that
    /// asked to be governed is never run ungoverned).
    fn governor_of(&self, worker: Pid) -> Result<Arc<Governor>, Decision> {
        let key = self
            .registry
            .workers
            .get(&worker)
            .and_then(|w| w.governor.as_ref());
        match key.and_then(|k| self.worker_governors.get(k)) {
            None => Ok(self.governor.clone()),
            Some(GovernorState::Ready(g)) => Ok(g.clone()),
            Some(GovernorState::Refused(e)) => Err(Decision::fail(
                ErrorType::GovernanceHalt,
                format!("Governance API error: {e}"),
            )),
            Some(GovernorState::Starting(_)) => Err(Decision::fail(
                ErrorType::GovernanceHalt,
                "Governance API error: governance for this worker is still starting",
            )),
        }
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
            .capture_mut()
            .register_thread(host_tid, worker, addr)
            .map_err(|e| format!("{e:#}"))?;
        if let Some(w) = self.registry.workers.get_mut(&worker) {
            w.threads.insert(host_tid, slot);
        }
        Ok(json!({"host_tid": host_tid}))
    }

    fn activity_start(
        &mut self,
        worker: Pid,
        req: &Value,
        tx: &ReplyTx,
        id: &Value,
    ) -> Result<(), String> {
        let info = ActivityInfo::from_request(req)?;
        let event = events::activity_started(&info.id, info.input.clone(), SystemTime::now());
        let prev = self.run_latest(&info.id.workflow_id, &info.id.run_id);
        let token = self.registry.start(worker, info);
        let (gov, tx, id) = (self.governor_of(worker), tx.clone(), id.clone());
        tokio::spawn(async move {
            after(prev).await;
            let decision = match gov {
                Ok(gov) => gov.activity_started(event).await,
                Err(refused) => refused,
            };
            reply(&tx, &id, Ok(json!({"token": token, "decision": decision})));
        });
        Ok(())
    }

    fn activity_end(
        &mut self,
        worker: Pid,
        req: &Value,
        tx: &ReplyTx,
        id: &Value,
    ) -> Result<(), String> {
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
        let failed = req.get("status").and_then(Value::as_str) == Some("failed");
        // The agent's own calls to Core are never governed (protocol §3.2).
        let own = self.governor_of(worker).unwrap_or_else(|_| self.governor.clone());
        let spans: Vec<Value> = a
            .spans
            .iter()
            .filter(|s| {
                !s.attributes
                    .get("http.url")
                    .and_then(Value::as_str)
                    .is_some_and(|u| own.is_core_url(u) || self.governor.is_core_url(u))
            })
            .filter_map(|s| serde_json::to_value(s).ok())
            .collect();
        let span_count = spans.len();
        let gov = self.governor_of(worker);
        let completion = events::ActivityCompletion {
            status: if failed {
                events::ActivityStatus::Failed
            } else {
                events::ActivityStatus::Completed
            },
            start_time: system_time(a.info.start_time),
            end_time: system_time(end_time),
            // The hook reports the arguments the activity really ran with (after input
            // redaction); older hooks do not, and then they are the ones it started with.
            activity_input: req
                .get("input")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_else(|| a.info.input.clone()),
            activity_output: if failed {
                Value::Null
            } else {
                req.get("output").cloned().unwrap_or(Value::Null)
            },
            error: req.get("error").and_then(|e| {
                Some(events::ActivityError {
                    kind: e.get("type")?.as_str()?.to_string(),
                    message: e.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
                })
            }),
            spans,
        };
        let event = events::activity_completed(&a.info.id, completion, SystemTime::now());
        let (tx, id, dropped) = (tx.clone(), id.clone(), a.dropped);
        let prev = self.run_latest(&a.info.id.workflow_id, &a.info.id.run_id);
        tokio::spawn(async move {
            after(prev).await;
            let decision = match gov {
                Ok(gov) => gov.activity_completed(event).await,
                Err(refused) => refused,
            };
            reply(
                &tx,
                &id,
                Ok(json!({"span_count": span_count, "spans_dropped": dropped, "decision": decision})),
            );
        });
        Ok(())
    }

    /// WorkflowStarted/Completed/Failed and SignalReceived from the hook's workflow
    /// interceptor: governed in the background, the workflow never waits.
    fn workflow_event(&mut self, worker: Pid, req: &Value) -> Result<Value, String> {
        let s = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let wf = events::WorkflowInfo {
            workflow_id: s("workflow_id"),
            run_id: s("run_id"),
            workflow_type: s("workflow_type"),
            task_queue: s("task_queue"),
        };
        if wf.workflow_id.is_empty() || wf.run_id.is_empty() {
            return Err("workflow_event needs `workflow_id` and `run_id`".into());
        }
        let now = SystemTime::now();
        let Ok(gov) = self.governor_of(worker) else {
            return Err("governance for this worker is not available".into());
        };
        let (event, signal) = match s("event_type").as_str() {
            events::WORKFLOW_STARTED => (events::workflow_started(&wf, now), false),
            events::WORKFLOW_COMPLETED => {
                let output = req.get("workflow_output").cloned().unwrap_or(Value::Null);
                (events::workflow_completed(&wf, output, now), false)
            }
            events::WORKFLOW_FAILED => {
                let error = req.get("error").cloned().unwrap_or(Value::Null);
                (events::workflow_failed(&wf, error, now), false)
            }
            events::SIGNAL_RECEIVED => {
                let args = req
                    .get("signal_args")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                (events::signal_received(&wf, &s("signal_name"), args, now), true)
            }
            other => return Err(format!("unknown workflow event_type {other:?}")),
        };
        let last = matches!(
            events::str_field(&event, "event_type"),
            events::WORKFLOW_COMPLETED | events::WORKFLOW_FAILED
        );
        let (prev, done) = self.run_turn(&wf.workflow_id, &wf.run_id, last);
        tokio::spawn(async move {
            after(prev).await;
            if signal {
                gov.signal(event).await;
            } else {
                gov.workflow_event(event).await;
            }
            let _ = done.send(true);
        });
        Ok(json!({}))
    }
}

/// The agent's settings with a worker's own (the create_openbox_worker parameters its
/// hook sent in `hello`) laid over them; None when it sent none. A Core URL configured on
/// the agent wins over the worker's (a different one is reported and ignored).
fn worker_config(base: &GovernanceConfig, v: &Value) -> Result<Option<GovernanceConfig>, String> {
    const KEYS: [&str; 10] = [
        "openbox_url",
        "openbox_api_key",
        "governance_timeout",
        "governance_policy",
        "send_start_event",
        "send_activity_start_event",
        "skip_workflow_types",
        "skip_activity_types",
        "skip_signals",
        "hitl_enabled",
    ];
    let Some(m) = v.as_object() else {
        return Ok(None);
    };
    if !KEYS.iter().any(|k| m.get(*k).is_some_and(|v| !v.is_null())) {
        return Ok(None);
    }
    let mut cfg = base.clone();
    let set = |k: &str| -> Result<Option<std::collections::BTreeSet<String>>, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string).ok_or(format!("{k} must be a list of names")))
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(format!("{k} must be a list of names")),
        }
    };
    let flag = |k: &str| -> Result<Option<bool>, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(format!("{k} must be true or false")),
        }
    };
    if let Some(url) = m.get("openbox_url").and_then(Value::as_str) {
        let url = normalize_url(url)?;
        match (&base.openbox_url, url) {
            (Some(mine), Some(theirs)) if *mine != theirs => tracing::warn!(
                agent = %mine, worker = %theirs,
                "a worker asked for another OpenBox Core URL; the agent's configured one is used"
            ),
            (None, Some(theirs)) => {
                cfg.openbox_url = Some(theirs);
                cfg.openbox_api_key = m
                    .get("openbox_api_key")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                // Each Core has a spool of its own (a spool directory is locked by one user).
                let tag: u64 = cfg
                    .openbox_url
                    .as_deref()
                    .unwrap_or("")
                    .bytes()
                    .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
                cfg.spool_dir = base.spool_dir.join(format!("core-{tag:016x}"));
            }
            _ => {}
        }
    }
    if let Some(t) = m.get("governance_timeout").filter(|v| !v.is_null()) {
        let secs = t
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86400.0)
            .ok_or("governance_timeout must be a positive number of seconds")?;
        cfg.governance_timeout = Duration::from_secs_f64(secs);
    }
    match m.get("governance_policy").and_then(Value::as_str) {
        None => {}
        Some("fail_open") => cfg.on_api_error = FailPolicy::FailOpen,
        Some("fail_closed") => cfg.on_api_error = FailPolicy::FailClosed,
        Some(other) => return Err(format!("governance_policy {other:?}: use fail_open or fail_closed")),
    }
    if let Some(b) = flag("send_start_event")? {
        cfg.send_start_event = b;
    }
    if let Some(b) = flag("send_activity_start_event")? {
        cfg.send_activity_start_event = b;
    }
    if let Some(b) = flag("hitl_enabled")? {
        cfg.hitl_enabled = b;
    }
    if let Some(s) = set("skip_workflow_types")? {
        cfg.skip_workflow_types = s;
    }
    if let Some(s) = set("skip_activity_types")? {
        cfg.skip_activity_types = s;
    }
    if let Some(s) = set("skip_signals")? {
        cfg.skip_signals = s;
    }
    Ok(Some(cfg))
}

/// Waits until the run's latest workflow event has been answered (or was dropped).
async fn after(prev: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut prev) = prev {
        let _ = prev.wait_for(|answered| *answered).await;
    }
}

fn system_time(secs: f64) -> SystemTime {
    if secs.is_finite() && secs > 0.0 {
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    } else {
        SystemTime::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_hook_keeps_the_agents_settings() {
        let base = GovernanceConfig::default();
        assert!(worker_config(&base, &json!({})).unwrap().is_none());
        assert!(worker_config(&base, &Value::Null).unwrap().is_none());
    }

    #[test]
    fn a_workers_sdk_parameters_lay_over_the_agents_settings() {
        let base = GovernanceConfig::default();
        let cfg = worker_config(
            &base,
            &json!({"openbox_url": "http://localhost:8086/", "openbox_api_key": "obx_test_k",
                "governance_timeout": 2.5, "governance_policy": "fail_closed",
                "skip_activity_types": ["a", "b"], "send_start_event": false}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(cfg.openbox_url.as_deref(), Some("http://localhost:8086"));
        assert_eq!(cfg.openbox_api_key.as_deref(), Some("obx_test_k"));
        assert_eq!(cfg.governance_timeout, Duration::from_millis(2500));
        assert_eq!(cfg.on_api_error, FailPolicy::FailClosed);
        assert!(!cfg.send_start_event);
        assert_eq!(cfg.skip_activity_types.len(), 2);
        assert_ne!(cfg.spool_dir, base.spool_dir);
    }

    #[test]
    fn the_agents_core_url_wins_and_bad_values_are_named() {
        let base = GovernanceConfig {
            openbox_url: Some("https://core.example.com".into()),
            ..Default::default()
        };
        let cfg = worker_config(&base, &json!({"openbox_url": "https://other.example.com"}))
            .unwrap()
            .unwrap();
        assert_eq!(cfg.openbox_url.as_deref(), Some("https://core.example.com"));
        let err = worker_config(&base, &json!({"governance_policy": "sometimes"})).unwrap_err();
        assert!(err.contains("governance_policy"), "{err}");
        let err = worker_config(&base, &json!({"governance_timeout": -1})).unwrap_err();
        assert!(err.contains("governance_timeout"), "{err}");
        let err = worker_config(&base, &json!({"openbox_url": "http://core.example.com"})).unwrap_err();
        assert!(err.contains("https"), "{err}");
    }
}
