//! `openbox-agent run`: the daemon. It serves the hook socket, watches the workers that
//! register and everything they start, attributes what they do to activities, and
//! writes one governance event per activity start and end.
//!
//! One task owns the capture session and the registry: ring-buffer records, hook
//! requests and process exits are handled in the order they arrive, and an
//! `activity_end` only once the ring has been read past every record the worker's
//! operations produced before it sent the request ([`order`]).

pub mod enforce;
pub mod hook;
pub mod notify;
pub mod ops;
pub mod order;
pub mod protocol;
pub mod registry;
pub mod status;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use hook::{reply, HookMsg, ReplyTx};
use protocol::{ActivityEnd, ActivityStart, Answer, Hello, Request, Thread, WorkflowEventKind};
use registry::{Registry, Unattributed, Worker};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::{
    bounded::BoundedMap,
    capture::CaptureConfig,
    conn::{Pid, SkipPaths},
    export::{
        otlp::{self, Resource},
        semconv::{self, Placement},
        tree, OtlpConfig,
    },
    governance::{
        conventions::WorkerStyle,
        events::{self, Event},
        hook_events::{self, HookStage},
        sink::Sink,
        verdict::{Decision, ErrorType},
        EventDisposition, FailPolicy, GovernanceConfig, Governor, Verdict,
    },
    pipeline::{self, Collect, Output, Ring, RingOrder, Session},
    procfs,
    span::{Span, SpanConfig},
    workload::Workload,
};

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
    /// Serve /metrics, /healthz and /readyz here (HOST:PORT).
    pub metrics_addr: Option<String>,
    /// Group of the socket and its directory (default: the agent's own).
    pub socket_group: Option<u32>,
    pub hook_limits: hook::Limits,
    /// Export spans over OTLP (the workflow → activity → operation tree).
    pub otlp: Option<OtlpConfig>,
    /// Hold operations until Core answers their `started` hook event ([`enforce`]).
    pub enforce: bool,
}

/// Test-only: names a file the agent waits for before it loads and attaches its kernel
/// programs, so a test can observe the endpoints while the agent is not ready yet
/// (tests/daemon.rs). Not a setting: nothing in production sets it.
const TEST_HOLD_ATTACH_ENV: &str = "OPENBOX_TEST_HOLD_ATTACH";

struct Daemon {
    session: Session<Collect>,
    registry: Registry,
    /// Hook connection → the worker it registered as.
    conns: std::collections::HashMap<u64, Pid>,
    governor: Arc<Governor>,
    /// The agent's own governance settings, the base of per-worker ones.
    base_config: GovernanceConfig,
    /// Governors for workers that passed their own settings (create_openbox_worker),
    /// by those settings, each freed with the last worker that uses it.
    worker_governors: std::collections::HashMap<String, WorkerGovernor>,
    ready_tx: mpsc::UnboundedSender<(String, Result<Arc<Governor>, String>)>,
    /// Per run (workflow id, run id): becomes true when the run's latest workflow event
    /// (started, signal) has been answered. Activity events of the run wait for it, and
    /// so does the next workflow event: Core gets WorkflowStarted before the run's
    /// activities, though every event is governed in a task of its own and the hook sends
    /// workflow events on a connection of their own. Activities of one run stay parallel.
    run_tail: std::collections::HashMap<(String, String), tokio::sync::watch::Receiver<bool>>,
    unattributed: Option<Sink>,
    /// Every governance call under way (a Core request and the reply to the worker), so
    /// that shutdown waits for them: each ends delivered, spooled or answered by the
    /// failure policy within the governance timeout.
    calls: tokio_util::task::TaskTracker,
    otlp: Option<otlp::Exporter>,
    /// Runs whose WorkflowStarted this agent saw, for their span at the run's end.
    runs: BoundedMap<(String, String), RunStart>,
    /// Operations held until Core answers (`--enforce`).
    enforcer: Option<Arc<enforce::Enforcer>>,
    /// Hook requests in arrival order, an `activity_end` held until the ring has been
    /// read past what its worker did before sending it.
    order: order::Ordered<HookMsg>,
}

/// What a run's span needs from its WorkflowStarted.
struct RunStart {
    at: SystemTime,
    task_queue: String,
    continued_run_id: Option<String>,
}

/// Runs remembered for ordering; past this the oldest are forgotten (their later events
/// are then ordered only by arrival).
const MAX_ORDERED_RUNS: usize = 65536;

/// SDK 2.0 identity parameters a worker's settings may carry; never used (the identity is
/// the operator's), only reported.
const IDENTITY_SETTINGS: &[&str] = &[
    "agent_did",
    "agent_private_key",
    "okta_agent_private_key",
    "okta_agent_id",
    "workload_private_key",
];

/// Distinct worker settings governed at once; a worker with yet other settings is
/// refused (each governor holds a Core client, a spool and a handle on the events file).
const MAX_WORKER_GOVERNORS: usize = 64;

struct WorkerGovernor {
    /// Registered workers using it.
    workers: usize,
    state: GovernorState,
}

enum GovernorState {
    Ready(Arc<Governor>),
    /// The agent would not govern with these settings, or Core refused them: the
    /// worker's activities follow `policy` (fail_open runs them ungoverned).
    Refused {
        why: String,
        policy: FailPolicy,
    },
    /// Being started (Core validates the key): hellos waiting for it.
    Starting(Vec<(ReplyTx, Value, Answer)>),
}

pub async fn run(opts: RunOpts) -> Result<i32> {
    // Before anything is attached: a signal's default action would end the daemon with
    // every program still attached, and the kernel then detaches them as the process
    // exits, one RCU grace period each under a kernel-wide mutex — 2–4 s before the
    // process is gone (the 3 s stop once measured by `cargo xtask bench --only startup`,
    // whose SIGTERM came as soon as the hook socket was bound, before these were set).
    // Caught, a signal during start-up ends the daemon through the exit path that hands
    // the detaching to a child (`capture/detach.rs`) once start-up is done.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Ends the daemon like SIGTERM, through the exit path that resumes paused processes.
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // The endpoints come first: /healthz answers (and /readyz says "not ready") while the
    // programs load, which can take seconds on a busy node.
    let readiness = Arc::new(ops::Readiness::default());
    let (scrape_tx, mut scrape_rx) = mpsc::channel(16);
    let ops_server = match &opts.metrics_addr {
        Some(addr) => {
            let listener = ops::bind(addr).await?;
            crate::logging::announce(format_args!(
                "serving /metrics, /healthz, /readyz on http://{}",
                listener.local_addr()?
            ));
            Some(tokio::spawn(ops::serve(
                listener,
                readiness.clone(),
                scrape_tx.clone(),
            )))
        }
        None => None,
    };
    if let Some(gate) = std::env::var_os(TEST_HOLD_ATTACH_ENV) {
        let gate = PathBuf::from(gate);
        tracing::warn!(file = %gate.display(), "{TEST_HOLD_ATTACH_ENV} is set (test only): waiting for the file before attaching");
        while !gate.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (session, mut ring) = pipeline::start(
        &opts.capture,
        &opts.tls_libs,
        opts.skip.clone(),
        Output::Spans(opts.spans.clone()),
        Collect::default(),
    )?;
    let chosen = session.capture().mode();
    crate::logging::announce(format_args!(
        "capturing sockets and files with {} ({})",
        chosen.mode, chosen.reason
    ));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let governor = Arc::new(
        Governor::new(opts.governance.clone())
            .await
            .context("starting governance")?,
    );
    let unattributed = opts
        .unattributed
        .as_deref()
        .map(|path| Sink::open_path(path, "unattributed spans file"))
        .transpose()?;
    let (otlp, otlp_done) = match &opts.otlp {
        Some(cfg) => {
            let (e, done) = otlp::Exporter::start(cfg)?;
            (Some(e), Some(done))
        }
        None => (None, None),
    };
    let (enforcer, mut decide_rx) = if opts.enforce {
        if !enforce::user_notification_available() {
            anyhow::bail!("--enforce: this kernel has no seccomp user notification (SECCOMP_RET_USER_NOTIF, Linux 5.0+ with CONFIG_SECCOMP_FILTER); run without --enforce, and verdicts act at activity boundaries");
        }
        let inherit = session
            .capture()
            .inherit_reader()
            .map_err(|e| {
                tracing::warn!("--enforce: processes started by activities are not held: {e:#}")
            })
            .ok();
        let (e, rx) = enforce::Enforcer::new(inherit, opts.skip.clone());
        match session.capture().ssl_args_reader() {
            Ok(map) => e.read_tls_calls(map),
            Err(e) => tracing::warn!(
                "--enforce: TLS requests are governed after they happen, not held: {e:#}"
            ),
        }
        match session.capture().tls_unsent_reader() {
            Ok(map) => e.read_unsent_tls(map),
            Err(e) => tracing::warn!(
                "--enforce: asyncio's TLS requests (memory BIO) are governed after they happen, not held: {e:#}"
            ),
        }
        crate::logging::announce(format_args!(
            "enforcing before the operation (seccomp user notification): HTTP requests and PostgreSQL simple queries (plain, or TLS through libssl's SSL_write, asyncio's memory BIO included) and opens for writing wait for Core's verdict on their started hook event, and after a HALT every connect/send/write/open-for-write of the activity's threads and processes is denied"
        ));
        (Some(e), Some(rx))
    } else {
        (None, None)
    };
    let listener = hook::bind(&opts.socket, opts.socket_group).await?;
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
        otlp,
        runs: BoundedMap::new(MAX_ORDERED_RUNS),
        calls: tokio_util::task::TaskTracker::new(),
        enforcer,
        order: order::Ordered::new(order::END_WAIT_BOUND),
    };
    let (tx, mut rx) = mpsc::channel(hook::REQUEST_QUEUE);
    let server = tokio::spawn(hook::serve(listener, tx, opts.hook_limits.clone()));
    crate::logging::announce(format_args!(
        "listening for worker hooks on {}",
        opts.socket.display()
    ));
    readiness.set(true);
    notify::ready();

    loop {
        tokio::select! {
            ready = ring.ready() => {
                ready?;
                d.read_ring(&mut ring);
            }
            Some(msg) = rx.recv() => d.arrived(msg, &mut ring),
            // A request waits for the ring to be read past it: read it again soon (the
            // kernel wakes the reader only once 64 KiB are waiting).
            _ = tokio::time::sleep(order::END_WAIT_POLL), if d.order.is_waiting() => {
                ring.copy_now();
                d.read_ring(&mut ring);
            }
            Some((key, result)) = ready_rx.recv() => d.governor_ready(key, result),
            Some(held) = async { match decide_rx.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                d.decide(held);
            }
            Some(reply) = scrape_rx.recv() => {
                // A scrape sees everything the kernel emitted so far, as the summary at
                // exit does (the drain thread may be in its idle sleep).
                ring.copy_now();
                d.read_ring(&mut ring);
                let _ = reply.send(d.summary());
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
        }
    }
    readiness.set(false);
    notify::stopping();
    server.abort();
    let _ = std::fs::remove_file(&opts.socket);
    // Requests workers sent before the signal and still queued are handled too: their
    // events are then finished with the calls under way.
    while let Ok(msg) = rx.try_recv() {
        d.arrived(msg, &mut ring);
    }
    while d.order.is_waiting() {
        tokio::time::sleep(order::END_WAIT_POLL).await;
        ring.copy_now();
        d.read_ring(&mut ring);
    }
    let again = async {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
            _ = sighup.recv() => {}
        }
    };
    d.finish_calls(opts.governance.governance_timeout, again)
        .await;
    ring.drain_all(&mut d.session);
    d.session.finish();
    d.route();
    if let Some(done) = otlp_done {
        done.finish().await;
    }
    eprintln!("{}", d.summary().to_json());
    d.session.capture_mut().hand_off_detach();
    drop(scrape_tx);
    if let Some(s) = ops_server {
        s.abort();
    }
    Ok(0)
}

impl Daemon {
    /// Waits for the governance calls under way — each is bounded by the governance
    /// timeout, then delivered, spooled or answered by the failure policy — so that a
    /// rolling update loses no event a worker sent before SIGTERM. Gives up after the
    /// timeout and 5 s more (the DaemonSet's grace period is the timeout and 15 s), or at
    /// a second signal, counting what it left.
    async fn finish_calls(
        &mut self,
        timeout: Duration,
        again: impl std::future::Future<Output = ()>,
    ) {
        self.calls.close();
        let pending = self.calls.len();
        if pending == 0 {
            return;
        }
        let limit = timeout + Duration::from_secs(5);
        tracing::warn!(
            "shutting down: waiting up to {:.0} s for {pending} governance call(s) under way (a second signal stops at once)",
            limit.as_secs_f64()
        );
        tokio::select! {
            _ = self.calls.wait() => return,
            _ = tokio::time::sleep(limit) => {}
            _ = again => {}
        }
        let left = self.calls.len() as u64;
        self.registry.stats.governance_calls_abandoned += left;
        tracing::error!(
            "exiting with {left} governance call(s) still under way: their events are neither delivered nor spooled, and their workers get no reply"
        );
    }

    /// A hook request arrived: an `activity_end` takes the ring's producer position now
    /// (everything its worker did before sending it lies below), then the ring is read
    /// and the requests whose turn has come are handled, in arrival order.
    fn arrived(&mut self, msg: HookMsg, ring: &mut Ring) {
        let ends = matches!(
            &msg,
            HookMsg::Request { req, .. } if matches!(**req, Ok(Request::ActivityEnd(_)))
        );
        let mark = ends.then(|| ring.mark());
        self.order.push(msg, mark, std::time::Instant::now());
        if ends {
            // The records below the mark are read now, not at the drain thread's next
            // wake-up (the kernel wakes it only once 64 KiB are waiting).
            ring.copy_now();
        }
        self.read_ring(ring);
    }

    /// Reads every record waiting in the ring, puts the spans they finished on their
    /// activities, then handles the hook requests whose turn has come.
    fn read_ring(&mut self, ring: &mut Ring) {
        ring.drain(&mut self.session);
        self.route();
        while let Some(msg) = self.order.pop_ready(&*ring, std::time::Instant::now()) {
            self.handle(msg);
        }
    }

    /// Everything counted so far: the summary at exit and every `/metrics` scrape.
    fn summary(&self) -> status::Summary {
        status::Summary {
            capture_mode: self.session.capture().mode().mode.as_str(),
            kernel: self.session.counters(),
            pipeline: self.session.stats(),
            registry: self.registry.stats.clone(),
            workers_now: self
                .registry
                .workers
                .values()
                .filter(|w| w.helper_of.is_none())
                .count() as u64,
            activities_in_flight: self.registry.activities.len() as u64,
            hook: status::HookStats {
                socket: hook::stats(),
                connections_registered: self.conns.len() as u64,
            },
            governance: self.governor.stats(),
            otlp: self.otlp.as_ref().map(otlp::Exporter::stats),
            enforcement: self.enforcer.as_ref().map(|e| e.stats.snapshot()),
            order: self.order.stats.clone(),
        }
    }

    /// Moves the spans the session finished onto their activities.
    fn route(&mut self) {
        let Collect {
            spans,
            closes,
            exits,
        } = self.session.sink_mut().take();
        for span in spans {
            match self.registry.route(span) {
                Ok(Some(activity)) => self.hook_events(activity),
                Ok(None) => {}
                Err(refused) => self.unattributed_span(*refused),
            }
        }
        if let Some(enforcer) = &self.enforcer {
            for &(pid, fd) in &closes {
                enforcer.socket_closed(pid, fd);
            }
            for &pid in &exits {
                enforcer.process_exited(pid);
            }
        }
        for pid in exits {
            if let Some(w) = self.registry.worker_exited(pid) {
                for tid in w.threads.keys() {
                    self.session.capture_mut().unregister_thread(*tid);
                }
                if let Some(key) = &w.governor {
                    self.release_governor(key);
                }
                tracing::info!(pid, "worker exited");
            }
        }
    }

    /// A span no activity claims: exported in a trace of its own, and written to the
    /// unattributed file with the reason.
    fn unattributed_span(&mut self, (why, mut span): (Unattributed, Span)) {
        // Its own trace, a root (a file.open's children share its trace).
        let root = span.parent_span_id.as_deref().unwrap_or(&span.span_id);
        span.trace_id = tree::unattributed_trace_id(&span.trace_id, root);
        if let Some(e) = &self.otlp {
            let at = Placement {
                trace_id: span.trace_id.clone(),
                parent: None,
            };
            e.send(semconv::resource_of(&span), semconv::span_data(&span, &at));
        }
        self.write_unattributed(why, &span);
    }

    /// The operation just put on `activity` goes to Core as its `started` and `completed`
    /// hook events (§3.2), when its worker's operations go out that way. The agent sees
    /// an operation whole once its answer is read, so both are sent then; nothing waits
    /// for their verdicts but the activity's end, where a BLOCK or HALT is enforced.
    fn hook_events(&mut self, activity: (Pid, u64)) {
        let Ok(gov) = self.governor_of(activity.0) else {
            return;
        };
        let style = self.style_of(activity.0).over(gov.default_style());
        if !style.sends_hook_events() {
            return;
        }
        let Some(a) = self.registry.activities.get_mut(&activity) else {
            return;
        };
        let Some(span) = a.spans.last() else {
            return;
        };
        // The agent's own calls to Core are never governed (§3.2).
        let own_call = span
            .attributes
            .get("http.url")
            .and_then(Value::as_str)
            .is_some_and(|u| gov.is_core_url(u) || self.governor.is_core_url(u));
        if own_call {
            return;
        }
        // A call held until Core answered: its `started` went out then, with this id.
        let preflight = self
            .enforcer
            .as_ref()
            .and_then(|e| e.gate(&activity))
            .zip(enforce::span_key(span))
            .and_then(|(gate, key)| gate.take_preflight(&key));
        if let Some(id) = &preflight {
            let old =
                std::mem::replace(&mut a.spans.last_mut().expect("a span").span_id, id.clone());
            for s in &mut a.spans {
                if s.parent_span_id.as_deref() == Some(old.as_str()) {
                    s.parent_span_id = Some(id.clone());
                }
            }
        }
        let Some(span) = a.spans.last() else {
            return;
        };
        let Some(stages) = hook_events::stages(span, &a.place.span_id, style.body_limit()) else {
            return;
        };
        let stages: Vec<_> = stages
            .into_iter()
            .filter(|s| preflight.is_none() || s.stage == HookStage::Completed)
            .collect();
        let operation = span.clone();
        let (info, input) = (a.start.activity.clone(), a.start.input.clone());
        let hooks = a.hooks.clone();
        let (done, turn) = tokio::sync::watch::channel(false);
        let prev = a.tail.replace(turn);
        self.calls.spawn(async move {
            after(prev).await;
            for stage in stages {
                if hooks.stopped().is_some() {
                    hooks
                        .skipped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                let at = stage.stage;
                let event = events::hook_event(
                    &info,
                    input.clone(),
                    stage,
                    Some(operation.clone()),
                    SystemTime::now(),
                );
                if let Some((verdict, reason)) = gov.hook_event_as(event, style).await {
                    tracing::info!(workflow_id = %info.workflow_id, activity_id = %info.activity_id,
                        span_id = %operation.span_id, %verdict, %reason,
                        "a hook event stopped the activity; enforced when it ends");
                    hooks.stop(registry::HookStop {
                        stage: at,
                        verdict,
                        reason,
                    });
                }
            }
            let _ = done.send(true);
        });
    }

    /// A `@traced` function of a running activity (`hook_event`, `function_call`): its
    /// `started` stage is answered with the verdict, its `completed` at once; both go to
    /// Core in the activity's order, and the call becomes a span of the activity.
    fn function_call(
        &mut self,
        worker: Pid,
        req: protocol::HookEvent,
        tx: &ReplyTx,
        id: &Value,
    ) -> Result<(), String> {
        let key = (worker, req.token);
        if !self.registry.activities.contains_key(&key) {
            return Err(format!(
                "no activity {} of this worker is running",
                req.token
            ));
        }
        // No governor, or a worker without hook events (SDK 2.0 without its hook
        // runtime): the decorator lets the call through.
        let let_through = || {
            reply(
                tx,
                id,
                Ok(Answer::HookEvent {
                    span_id: None,
                    decision: Decision::allow_without_verdict(),
                }),
            )
        };
        let Ok(gov) = self.governor_of(worker) else {
            let_through();
            return Ok(());
        };
        let style = self.style_of(worker).over(gov.default_style());
        if !style.sends_hook_events() {
            let_through();
            return Ok(());
        }
        let Some(a) = self.registry.activities.get_mut(&key) else {
            return Err(format!(
                "no activity {} of this worker is running",
                req.token
            ));
        };
        let now = SystemTime::now();
        let call = hook_events::FunctionCall {
            function: req.function,
            module: req.module,
            args: req.args,
            result: req.result,
            error: req.error,
        };
        let (span, stage) = match req.stage {
            HookStage::Started => {
                let span_id = registry::new_span_id();
                let subject = req
                    .name
                    .clone()
                    .or_else(|| call.function.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "function".to_owned());
                let mut attributes = serde_json::Map::new();
                attributes.insert("code.function".into(), call.function.clone());
                attributes.insert("code.namespace".into(), call.module.clone());
                let at = epoch_ns(now);
                let span = Span {
                    span_id: span_id.clone(),
                    trace_id: a.place.trace_id.clone(),
                    parent_span_id: None,
                    name: format!("function {subject}"),
                    kind: "INTERNAL",
                    start_time: at,
                    end_time: at,
                    duration_ns: None,
                    attributes,
                    status: crate::span::Status {
                        code: crate::protocol::StatusCode::Unset,
                        description: None,
                    },
                    events: Vec::new(),
                    activity_id: Some(a.start.activity.activity_id.clone()),
                    request_body: None,
                    response_body: None,
                    request_headers: None,
                    response_headers: None,
                    pid: worker,
                    tid: 0,
                    attr: Default::default(),
                };
                a.functions.insert(span_id, (span.clone(), call.clone()));
                let hook =
                    hook_events::function_call(&span, &a.place.span_id, HookStage::Started, &call);
                (span, hook)
            }
            HookStage::Completed => {
                let span_id = req.span_id.unwrap_or_default();
                let Some((mut span, started)) = a.functions.remove(&span_id) else {
                    return Err(format!(
                        "hook_event: no function call {span_id} of this activity was started"
                    ));
                };
                span.end_time = epoch_ns(now).max(span.start_time);
                span.duration_ns = Some(span.end_time - span.start_time);
                if let Some(e) = &call.error {
                    span.status = crate::span::Status {
                        code: crate::protocol::StatusCode::Error,
                        description: Some(e.clone()),
                    };
                }
                let call = hook_events::FunctionCall {
                    args: started.args,
                    ..call
                };
                let hook = hook_events::function_call(
                    &span,
                    &a.place.span_id,
                    HookStage::Completed,
                    &call,
                );
                a.spans.push(span.clone());
                (span, hook)
            }
        };
        let (info, input) = (a.start.activity.clone(), a.start.input.clone());
        let hooks = a.hooks.clone();
        let (done, turn) = tokio::sync::watch::channel(false);
        let prev = a.tail.replace(turn);
        let started = req.stage == HookStage::Started;
        let (tx, id) = (tx.clone(), id.clone());
        let span_id = span.span_id.clone();
        if !started {
            // Nothing waits for a completed stage (SDK 2.0 does not act on it before the
            // activity's end either).
            reply(
                &tx,
                &id,
                Ok(Answer::HookEvent {
                    span_id: Some(span_id.clone()),
                    decision: Decision::allow_without_verdict(),
                }),
            );
        }
        self.calls.spawn(async move {
            after(prev).await;
            let stop = match hooks.stopped() {
                // SDK 2.0: once a hook stopped the activity, later hooks fail fast.
                Some(stop) => {
                    hooks
                        .skipped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Some(stop)
                }
                None => {
                    let event =
                        events::hook_event(&info, input, stage.clone(), None, SystemTime::now());
                    let at = stage.stage;
                    gov.hook_event_as(event, style)
                        .await
                        .map(|(verdict, reason)| {
                            let stop = registry::HookStop {
                                stage: at,
                                verdict,
                                reason,
                            };
                            hooks.stop(stop.clone());
                            stop
                        })
                }
            };
            if started {
                let decision = match stop {
                    Some(stop) => {
                        hook_stop_decision(&stop).unwrap_or_else(Decision::allow_without_verdict)
                    }
                    None => Decision::allow_without_verdict(),
                };
                reply(
                    &tx,
                    &id,
                    Ok(Answer::HookEvent {
                        span_id: Some(span_id),
                        decision,
                    }),
                );
            }
            let _ = done.send(true);
        });
        Ok(())
    }

    fn write_unattributed(&mut self, why: Unattributed, span: &Span) {
        if let Some(out) = self.unattributed.as_mut() {
            out.write_value(
                &json!({"reason": why.as_str(), "pid": span.pid, "tid": span.tid,
                "worker": span.attr.owner, "token": span.attr.activity, "span": span}),
            );
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
                id,
                req,
                reply: tx,
            } => {
                // Governed ops answer from a task of their own: Core may take its time.
                let result = match (*req, self.conns.get(&conn).copied()) {
                    (Ok(Request::Hello(hello)), _) => match self.hello(conn, peer, &hello) {
                        Ok(ok) => {
                            tx.welcomed();
                            if !self.worker_governor(peer, &tx, &id, &ok) {
                                return;
                            }
                            Ok(ok)
                        }
                        other => other,
                    },
                    (Err(bad), _) if bad.before_hello => Err(bad.error),
                    (_, None) => Err("send `hello` first".to_string()),
                    (Err(bad), Some(_)) => Err(bad.error),
                    (Ok(Request::Thread(t)), Some(w)) => self.thread(w, &t),
                    (Ok(_), Some(w)) if self.is_helper(w) => {
                        Err("a helper process may only register threads".to_string())
                    }
                    (Ok(Request::ActivityStart(start)), Some(w)) => {
                        match self.activity_start(w, start, &tx, &id) {
                            Ok(()) => return,
                            Err(e) => Err(e),
                        }
                    }
                    (Ok(Request::ActivityEnd(end)), Some(w)) => {
                        match self.activity_end(w, end, &tx, &id) {
                            Ok(()) => return,
                            Err(e) => Err(e),
                        }
                    }
                    (Ok(Request::WorkflowEvent(ev)), Some(w)) => {
                        match self.workflow_event(w, ev, &tx, &id) {
                            Ok(()) => return,
                            Err(e) => Err(e),
                        }
                    }
                    (Ok(Request::Enforce(req)), Some(w)) => self.enforce(w, &req),
                    (Ok(Request::HookEvent(ev)), Some(w)) => {
                        match self.function_call(w, ev, &tx, &id) {
                            Ok(()) => return,
                            Err(e) => Err(e),
                        }
                    }
                };
                reply(&tx, &id, result);
            }
        }
    }

    fn is_helper(&self, pid: Pid) -> bool {
        self.registry
            .workers
            .get(&pid)
            .is_some_and(|w| w.helper_of.is_some())
    }

    fn refuse<T>(&mut self, peer: Pid, why: String) -> Result<T, String> {
        self.registry.stats.registrations_refused += 1;
        tracing::warn!(peer, "refused hook registration: {why}");
        Err(format!("refused: {why}"))
    }

    /// Registers the peer as a worker. The peer's identity comes from the kernel
    /// (SO_PEERCRED); what it claims must match it, in its own PID namespace.
    fn hello(&mut self, conn: u64, peer: Pid, req: &Hello) -> Result<Answer, String> {
        let claimed = req.pid;
        let ns_pid = procfs::nspids(&format!("/proc/{peer}/status"))
            .and_then(|ids| ids.last().copied())
            .ok_or_else(|| format!("process {peer} vanished"))?;
        if claimed != Some(ns_pid as u64) {
            let claim = claimed
                .map(|c| c.to_string())
                .unwrap_or_else(|| "nothing".into());
            return self.refuse(
                peer,
                format!(
                    "process {peer} (pid {ns_pid} in its own namespace) claims to be pid {claim}"
                ),
            );
        }
        // A helper's threads are recorded as its worker's: only a descendant of that
        // worker may publish the worker's tokens (the worker started it, or a pool or
        // fork server the worker started did).
        let helper_of = if req.helper {
            let Some(root) = procfs::ancestors(peer).into_iter().find(|a| {
                self.registry
                    .workers
                    .get(a)
                    .is_some_and(|w| w.helper_of.is_none())
            }) else {
                return self.refuse(
                    peer,
                    format!("process {peer} says it is a helper, but no registered worker is among its ancestors"),
                );
            };
            Some(root)
        } else {
            None
        };
        let (addr, slots) = (req.slots_addr, req.slots);
        if !(1..=65536).contains(&slots) || !procfs::writable_range(peer, addr, slots * 8) {
            return self.refuse(
                peer,
                format!("process {peer}: the slot table {addr:#x} ({slots} slots) is not writable memory of that process"),
            );
        }
        let style = match WorkerStyle::from_settings(&req.config) {
            Ok(style) => style,
            Err(why) => return self.refuse(peer, why),
        };
        if let Some(key) = IDENTITY_SETTINGS
            .iter()
            .find(|k| req.config.get(**k).is_some_and(|v| !v.is_null()))
        {
            tracing::warn!(
                peer,
                "ignored the worker's {key}: the agent signs requests with the identity its operator \
                 configured (OPENBOX_AGENT_DID, OPENBOX_AGENT_PRIVATE_KEY_FILE), never with keys from a worker"
            );
        }
        if let Some(w) = self.registry.workers.get(&peer) {
            if w.helper_of != helper_of {
                return self.refuse(
                    peer,
                    format!(
                        "process {peer} is registered already, as a {}",
                        if w.helper_of.is_some() {
                            "helper"
                        } else {
                            "worker"
                        }
                    ),
                );
            }
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
                    config: req.config.clone(),
                    governor: None,
                    style,
                    workload: Workload::of(peer),
                    helper_of,
                },
            );
            if let Some(worker) = helper_of {
                tracing::debug!(pid = peer, worker, "helper process registered");
            } else {
                self.registry.stats.workers += 1;
                tracing::info!(pid = peer, ns_pid, hook = ?req.hook, "worker registered");
            }
        }
        self.conns.insert(conn, peer);
        Ok(Answer::Hello {
            agent: concat!("openbox-agent/", env!("CARGO_PKG_VERSION")).to_string(),
            worker: peer,
        })
    }

    /// A worker that passed governance settings of its own (create_openbox_worker with
    /// the SDK's parameters) gets a governor with them, started once per distinct set;
    /// its hello is answered when that governor is ready. Returns false when the hello
    /// is answered later.
    fn worker_governor(&mut self, worker: Pid, tx: &ReplyTx, id: &Value, ok: &Answer) -> bool {
        let Some((config, style)) = self
            .registry
            .workers
            .get(&worker)
            .filter(|w| w.helper_of.is_none())
            .map(|w| (w.config.clone(), w.style))
        else {
            // Gone, or a helper: helpers are governed as the worker they work for.
            return true;
        };
        let cfg = match self.base_config.with_worker_settings(&config) {
            Ok(None) => return true,
            // Its governor's own calls (the start-up validate) follow the worker's
            // conventions too: an SDK 2.0 worker's validate carries 2.0's headers.
            Ok(Some(mut cfg)) => {
                if let Some(c) = style.conventions {
                    cfg.sdk_conventions = c;
                }
                cfg
            }
            Err(e) => {
                let policy = self.base_config.worker_fail_policy(&config);
                self.refuse_settings(worker, format!("invalid: {e}"), e.to_string(), policy);
                return true;
            }
        };
        let key = config.to_string();
        if !self.worker_governors.contains_key(&key)
            && self.worker_governors.len() >= MAX_WORKER_GOVERNORS
        {
            let why = format!(
                "{MAX_WORKER_GOVERNORS} workers with distinct governance settings are governed already"
            );
            let policy = self.base_config.worker_fail_policy(&config);
            self.refuse_settings(worker, "too many".into(), why, policy);
            return true;
        }
        self.set_worker_governor(worker, key.clone());
        match self.worker_governors.get_mut(&key).map(|g| &mut g.state) {
            Some(GovernorState::Starting(waiting)) => {
                waiting.push((tx.clone(), id.clone(), ok.clone()));
                false
            }
            Some(_) => true,
            None => {
                self.worker_governors.insert(
                    key.clone(),
                    WorkerGovernor {
                        workers: 1,
                        state: GovernorState::Starting(vec![(tx.clone(), id.clone(), ok.clone())]),
                    },
                );
                let ready = self.ready_tx.clone();
                tokio::spawn(async move {
                    let result = Governor::new(cfg)
                        .await
                        .map(Arc::new)
                        .map_err(|e| e.to_string());
                    let _ = ready.send((key, result));
                });
                false
            }
        }
    }

    /// The agent will not govern the worker with its own settings: said loudly, counted,
    /// and its activities follow `policy`.
    fn refuse_settings(&mut self, worker: Pid, key: String, why: String, policy: FailPolicy) {
        self.registry.stats.worker_settings_refused += 1;
        let then = match policy {
            FailPolicy::FailOpen => "its activities run ungoverned (fail_open)",
            FailPolicy::FailClosed => "its activities are halted (fail_closed)",
        };
        tracing::error!(
            pid = worker,
            "refused the worker's governance settings: {why}; {then}"
        );
        let key = format!("refused ({}): {key}: {why}", policy.as_str());
        self.worker_governors
            .entry(key.clone())
            .or_insert(WorkerGovernor {
                workers: 0,
                state: GovernorState::Refused { why, policy },
            });
        self.set_worker_governor(worker, key);
    }

    /// Points the worker at the governor of `key` (counted by `worker_governor` and
    /// `refuse_settings`); a worker that used another one lets go of it.
    fn set_worker_governor(&mut self, worker: Pid, key: String) {
        let old = match self.registry.workers.get_mut(&worker) {
            Some(w) if w.governor.as_deref() == Some(key.as_str()) => return,
            Some(w) => w.governor.replace(key.clone()),
            None => return,
        };
        if let Some(g) = self.worker_governors.get_mut(&key) {
            g.workers += 1;
        }
        if let Some(old) = old {
            self.release_governor(&old);
        }
    }

    /// A worker stopped using the governor of `key`: the last one frees it (its Core
    /// client, spool and events file handle; activities still being governed keep it
    /// until they are answered).
    fn release_governor(&mut self, key: &str) {
        let Some(g) = self.worker_governors.get_mut(key) else {
            return;
        };
        g.workers = g.workers.saturating_sub(1);
        if g.workers == 0 {
            self.worker_governors.remove(key);
            self.registry.stats.worker_governors_freed += 1;
            tracing::debug!(
                "freed the governor of a worker's own settings: its last worker is gone"
            );
        }
    }

    fn governor_ready(&mut self, key: String, result: Result<Arc<Governor>, String>) {
        let Some(entry) = self.worker_governors.get_mut(&key) else {
            // Its workers all exited while it started: nobody needs it.
            return;
        };
        let state = match result {
            Ok(g) => GovernorState::Ready(g),
            Err(why) => {
                tracing::error!("governance with a worker's own settings could not start: {why}; its activities are halted");
                GovernorState::Refused {
                    why,
                    policy: FailPolicy::FailClosed,
                }
            }
        };
        if let GovernorState::Starting(waiting) = std::mem::replace(&mut entry.state, state) {
            for (tx, id, ok) in waiting {
                reply(&tx, &id, Ok(ok));
            }
        }
    }

    /// The run's latest workflow event, for an activity event of the run to wait for.
    fn run_latest(
        &self,
        workflow_id: &str,
        run_id: &str,
    ) -> Option<tokio::sync::watch::Receiver<bool>> {
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
        match key
            .and_then(|k| self.worker_governors.get(k))
            .map(|g| &g.state)
        {
            None => Ok(self.governor.clone()),
            Some(GovernorState::Ready(g)) => Ok(g.clone()),
            Some(GovernorState::Refused {
                policy: FailPolicy::FailOpen,
                ..
            }) => Err(Decision::allow_without_verdict()),
            Some(GovernorState::Refused { why, .. }) => Err(Decision::fail(
                ErrorType::GovernanceHalt,
                format!("Governance API error: {why}"),
            )),
            Some(GovernorState::Starting(_)) => Err(Decision::fail(
                ErrorType::GovernanceHalt,
                "Governance API error: governance for this worker is still starting",
            )),
        }
    }

    /// The request conventions the worker's hook chose (none: its governor's).
    fn style_of(&self, worker: Pid) -> WorkerStyle {
        self.registry
            .workers
            .get(&worker)
            .map(|w| w.style)
            .unwrap_or_default()
    }

    /// Tells the kernel where a worker thread publishes its activity.
    fn thread(&mut self, worker: Pid, req: &Thread) -> Result<Answer, String> {
        let Thread { tid, slot } = *req;
        let Some(w) = self.registry.workers.get(&worker) else {
            return Err("the worker is gone".into());
        };
        if slot >= w.slots {
            return Err(format!(
                "slot {slot} is outside the table of {} slots",
                w.slots
            ));
        }
        let addr = w.slots_addr + slot * 8;
        // The slot is in this process's memory; the tokens in it are its worker's.
        let owner = w.helper_of.unwrap_or(worker);
        let Some(host_tid) = u32::try_from(tid)
            .ok()
            .and_then(|t| procfs::host_tid(worker, t))
        else {
            return self.refuse(
                worker,
                format!("thread {tid} is not a thread of process {worker}"),
            );
        };
        self.session
            .capture_mut()
            .register_thread(host_tid, owner, addr)
            .map_err(|e| format!("{e:#}"))?;
        if let Some(w) = self.registry.workers.get_mut(&worker) {
            w.threads.insert(host_tid, slot);
        }
        Ok(Answer::Thread {
            host_tid,
            enforce: self.enforces(worker),
        })
    }

    /// Whether the agent holds this worker's operations until Core answers: `--enforce`,
    /// and its operations go out as hook events.
    fn enforces(&self, worker: Pid) -> bool {
        self.enforcer.is_some()
            && self.governor_of(worker).is_ok_and(|gov| {
                self.style_of(worker)
                    .over(gov.default_style())
                    .sends_hook_events()
            })
    }

    /// `enforce`: takes a thread's seccomp listener and serves it.
    fn enforce(&mut self, worker: Pid, req: &protocol::Enforce) -> Result<Answer, String> {
        let Some(enforcer) = self.enforcer.clone().filter(|_| self.enforces(worker)) else {
            return Err(
                "this agent does not enforce for this worker (run --enforce, and hook events)"
                    .into(),
            );
        };
        let Some(w) = self.registry.workers.get(&worker) else {
            return Err("the worker is gone".into());
        };
        if req.slot >= w.slots {
            return Err(format!(
                "slot {} is outside the table of {} slots",
                req.slot, w.slots
            ));
        }
        let addr = w.slots_addr + req.slot * 8;
        let Some(host_tid) = u32::try_from(req.tid)
            .ok()
            .and_then(|t| procfs::host_tid(worker, t))
        else {
            return Err(format!(
                "thread {} is not a thread of process {worker}",
                req.tid
            ));
        };
        let listener = enforce::Listener::take(worker, req.fd)
            .map_err(|e| format!("taking descriptor {} of process {worker}: {e}", req.fd))?;
        enforcer.thread(host_tid, worker, addr);
        enforcer
            .supervise(listener, worker, host_tid)
            .map_err(|e| format!("starting its supervisor: {e}"))?;
        tracing::debug!(
            worker,
            host_tid,
            "holding a thread's operations until Core answers"
        );
        Ok(Answer::Thread {
            host_tid,
            enforce: true,
        })
    }

    /// A held call waits for Core: its `started` hook event goes out now, and the call
    /// is let through or denied by the verdict (the governance timeout and the failure
    /// policy bound the wait).
    fn decide(&mut self, held: enforce::Decide) {
        let worker = held.activity.0;
        let Ok(gov) = self.governor_of(worker) else {
            return held.answer(true);
        };
        if let enforce::Operation::Unnamed { why } = held.operation {
            // Which request the send carries cannot be told: never a guess, the failure
            // policy decides (counted in the enforcement summary).
            let closed = gov.config().on_api_error == FailPolicy::FailClosed;
            tracing::warn!(pid = held.pid, tid = held.tid, fd = held.fd, reason = why, fail_closed = closed,
                "a held TLS send carries plaintext the agent cannot name exactly: the failure policy decides it");
            if closed {
                held.gate.hooks.stop(registry::HookStop {
                    stage: HookStage::Started,
                    verdict: Verdict::Halt,
                    reason: format!("Governance: a TLS send could not be named exactly ({why}); on_api_error is fail_closed"),
                });
            }
            return held.answer(!closed);
        }
        let style = self.style_of(worker).over(gov.default_style());
        let Some(a) = self.registry.activities.get(&held.activity) else {
            // Ended meanwhile: nothing governs the call any more.
            return held.answer(true);
        };
        let span = enforce_span(&held, &a.place.trace_id, &a.start.activity.activity_id);
        let Some([started, _]) = hook_events::stages(&span, &a.place.span_id, style.body_limit())
        else {
            return held.answer(true);
        };
        let (info, input) = (a.start.activity.clone(), a.start.input.clone());
        let key = held.operation.key();
        self.calls.spawn(async move {
            let event =
                events::hook_event(&info, input, started, Some(span.clone()), SystemTime::now());
            match gov.hook_event_as(event, style).await {
                Some((verdict, reason)) => {
                    tracing::info!(workflow_id = %info.workflow_id, activity_id = %info.activity_id,
                        span_id = %span.span_id, %verdict, %reason, operation = %key,
                        "a hook event stopped the operation before it ran");
                    held.gate.hooks.stop(registry::HookStop {
                        stage: HookStage::Started,
                        verdict,
                        reason,
                    });
                    held.gate.remember(key, false);
                    held.answer(false);
                }
                None => {
                    held.gate.remember(key.clone(), true);
                    held.gate.add_preflight(key, span.span_id);
                    held.answer(true);
                }
            }
        });
    }

    fn activity_start(
        &mut self,
        worker: Pid,
        req: ActivityStart,
        tx: &ReplyTx,
        id: &Value,
    ) -> Result<(), String> {
        let mut req = req;
        req.start_time.get_or_insert_with(registry::now_secs);
        let event = events::activity_started(&req.activity, req.input.clone(), SystemTime::now());
        let prev = self.run_latest(&req.activity.workflow_id, &req.activity.run_id);
        let token = self.registry.start(worker, req);
        let verdict = self
            .registry
            .activities
            .get(&(worker, token))
            .map(|a| a.start_verdict.clone())
            .unwrap_or_default();
        let (gov, tx, id) = (self.governor_of(worker), tx.clone(), id.clone());
        let style = self.style_of(worker);
        // The activity's hook events go after its ActivityStarted.
        let (done, turn) = tokio::sync::watch::channel(false);
        if let Some(a) = self.registry.activities.get_mut(&(worker, token)) {
            a.tail = Some(turn);
        }
        if self.enforces(worker) {
            if let (Some(e), Some(a)) = (
                &self.enforcer,
                self.registry.activities.get(&(worker, token)),
            ) {
                e.open_gate(
                    (worker, token),
                    Arc::new(enforce::Gate::new(a.hooks.clone())),
                );
            }
        }
        self.calls.spawn(async move {
            after(prev).await;
            let decision = match gov {
                Ok(gov) => {
                    gov.activity_started_as(event, style.over(gov.default_style()))
                        .await
                }
                Err(refused) => refused,
            };
            let _ = done.send(true);
            let _ = verdict.set(tree::decision_attributes("started", &decision));
            reply(&tx, &id, Ok(Answer::ActivityStart { token, decision }));
        });
        Ok(())
    }

    fn activity_end(
        &mut self,
        worker: Pid,
        req: ActivityEnd,
        tx: &ReplyTx,
        id: &Value,
    ) -> Result<(), String> {
        let token = req.token;
        let Some(a) = self.registry.end(worker, token) else {
            return Err(format!("no activity {token} of this worker is running"));
        };
        let operations_denied = self
            .enforcer
            .as_ref()
            .and_then(|e| e.close_gate(&(worker, token)))
            .map_or(0, |g| g.denied.load(std::sync::atomic::Ordering::Relaxed));
        if operations_denied > 0 {
            tracing::warn!(workflow_id = %a.start.activity.workflow_id,
                activity_id = %a.start.activity.activity_id, operations_denied,
                "calls of the activity were denied in the kernel");
        }
        let end_time = req.end_time.unwrap_or_else(registry::now_secs);
        let failed = req.status == events::ActivityStatus::Failed;
        // The agent's own calls to Core are never governed (protocol §3.2).
        let own = self
            .governor_of(worker)
            .unwrap_or_else(|_| self.governor.clone());
        let spans: Vec<Span> = a
            .spans
            .into_iter()
            .filter(|s| {
                !s.attributes
                    .get("http.url")
                    .and_then(Value::as_str)
                    .is_some_and(|u| own.is_core_url(u) || self.governor.is_core_url(u))
            })
            .collect();
        let span_count = spans.len();
        let gov = self.governor_of(worker);
        // Its operations under its span now; its span once governance has answered.
        let export = self.otlp.clone().map(|e| {
            let at = Placement {
                trace_id: a.place.trace_id.clone(),
                parent: Some(a.place.span_id.clone()),
            };
            for s in &spans {
                e.send(semconv::resource_of(s), semconv::span_data(s, &at));
            }
            (e, self.worker_resource(worker))
        });
        let (place, start_verdict) = (a.place, a.start_verdict);
        // ActivityCompleted goes after the activity's hook events, whose verdicts it reads.
        let (tail, hooks) = (a.tail, a.hooks);
        let error = req.error.clone();
        let start = a.start;
        let completion = events::ActivityCompletion {
            status: req.status,
            start_time: system_time(start.start_time.unwrap_or_default()),
            end_time: system_time(end_time),
            // The hook reports the arguments the activity really ran with (after input
            // redaction); older hooks do not, and then they are the ones it started with.
            activity_input: req.input.unwrap_or(start.input),
            activity_output: if failed { Value::Null } else { req.output },
            error: req.error,
            spans,
        };
        let (started_at, ended_at) = (completion.start_time, completion.end_time);
        let (status, info) = (completion.status, start.activity.clone());
        let event = events::activity_completed(&start.activity, completion, SystemTime::now());
        let (tx, id, dropped) = (tx.clone(), id.clone(), a.dropped);
        let prev = self.run_latest(&start.activity.workflow_id, &start.activity.run_id);
        let style = self.style_of(worker);
        self.calls.spawn(async move {
            after(prev).await;
            after(tail).await;
            let decision = match (hooks.stopped(), gov) {
                // SDK 2.0 sends no ActivityCompleted once a hook verdict stopped an
                // operation of the activity.
                (Some(stop), _) => {
                    hook_stop_decision(&stop).unwrap_or_else(Decision::allow_without_verdict)
                }
                (None, Ok(gov)) => {
                    gov.activity_completed_as(event, style.over(gov.default_style()))
                        .await
                }
                (None, Err(refused)) => refused,
            };
            if let Some((e, resource)) = export {
                let mut governance = start_verdict.get().cloned().unwrap_or_default();
                governance.extend(tree::decision_attributes("completed", &decision));
                let span = tree::activity_span(tree::ActivityEnd {
                    info: &info,
                    place: &place,
                    start: started_at,
                    end: ended_at,
                    status,
                    error: error.as_ref(),
                    governance,
                });
                e.send(resource, span);
            }
            let answer = Answer::ActivityEnd {
                span_count,
                spans_dropped: dropped,
                decision,
                operations_denied,
            };
            reply(&tx, &id, Ok(answer));
        });
        Ok(())
    }

    /// WorkflowStarted/Completed/Failed and SignalReceived from the hook's workflow
    /// interceptor (which never waits for the reply). Acknowledged only once the event is
    /// safe — Core took it, or it is fsync'd in the spool — so an agent killed after the
    /// reply loses nothing it acknowledged.
    fn workflow_event(
        &mut self,
        worker: Pid,
        req: protocol::WorkflowEvent,
        tx: &ReplyTx,
        id: &Value,
    ) -> Result<(), String> {
        let wf = req.workflow;
        if wf.workflow_id.is_empty() || wf.run_id.is_empty() {
            return Err("workflow_event needs `workflow_id` and `run_id`".into());
        }
        let now = SystemTime::now();
        if req.event == (WorkflowEventKind::WorkflowContinuedAsNew {}) {
            // Nothing for Core (governed or not): the run's span ends, and its ordering
            // state goes once its earlier events are answered.
            self.run_span(worker, &wf, &req.event, now);
            let (prev, done) = self.run_turn(&wf.workflow_id, &wf.run_id, true);
            let (tx, id) = (tx.clone(), id.clone());
            self.calls.spawn(async move {
                after(prev).await;
                let _ = done.send(true);
                reply(&tx, &id, Ok(Answer::Accepted {}));
            });
            return Ok(());
        }
        let Ok(gov) = self.governor_of(worker) else {
            return Err("governance for this worker is not available".into());
        };
        self.run_span(worker, &wf, &req.event, now);
        let event: Event = match req.event {
            // Answered above, before the governor is looked up.
            WorkflowEventKind::WorkflowContinuedAsNew {} => return Ok(()),
            WorkflowEventKind::WorkflowStarted { activity_input, .. } => {
                let mut started = events::workflow_started(&wf, now);
                started.activity_input = activity_input;
                started.into()
            }
            WorkflowEventKind::WorkflowCompleted { workflow_output } => {
                events::workflow_completed(&wf, workflow_output, now).into()
            }
            WorkflowEventKind::WorkflowFailed { error } => {
                events::workflow_failed(&wf, error, now).into()
            }
            WorkflowEventKind::SignalReceived {
                signal_name,
                signal_args,
            } => events::signal_received(&wf, &signal_name, signal_args, now).into(),
            WorkflowEventKind::Handoff { from_agent_did } => {
                let session = wf.multi_agent_session_id.as_deref().unwrap_or_default();
                events::handoff(&wf, &from_agent_did, session, now).into()
            }
        };
        // The run's final event: its ordering state goes.
        let last = matches!(
            event,
            Event::WorkflowCompleted(_) | Event::WorkflowFailed(_)
        );
        let (prev, done) = self.run_turn(&wf.workflow_id, &wf.run_id, last);
        let (tx, id) = (tx.clone(), id.clone());
        let style = self.style_of(worker).over(gov.default_style());
        self.calls.spawn(async move {
            after(prev).await;
            let disposition = match event {
                Event::SignalReceived(signal) => gov.signal_as(signal, style).await,
                other => gov.workflow_event_as(other, style).await,
            };
            let _ = done.send(true);
            let answer = match disposition {
                EventDisposition::Delivered { .. }
                | EventDisposition::Spooled
                | EventDisposition::Skipped => Ok(Answer::Accepted {}),
                EventDisposition::Dropped => Err("the event was not accepted: OpenBox Core \
                    refused it, or the governance spool is full or cannot be written \
                    (the agent's log says which)"
                    .to_string()),
            };
            reply(&tx, &id, answer);
        });
        Ok(())
    }
}

impl Daemon {
    /// The resource of a worker's activity and workflow spans: the process and its
    /// container.
    fn worker_resource(&self, worker: Pid) -> Resource {
        let mut attrs = vec![opentelemetry::KeyValue::new(
            "process.pid",
            i64::from(worker),
        )];
        if let Some(w) = self.registry.workers.get(&worker) {
            for (k, v) in w.workload.attributes() {
                attrs.push(opentelemetry::KeyValue::new(k, v.to_string()));
            }
        }
        Resource::new(attrs)
    }

    /// A run's span: its start is remembered at WorkflowStarted, the span is exported at
    /// WorkflowCompleted/Failed (with the end as its start when this agent did not see
    /// the run start, e.g. it was restarted meanwhile).
    fn run_span(
        &mut self,
        worker: Pid,
        wf: &events::WorkflowInfo,
        event: &WorkflowEventKind,
        now: SystemTime,
    ) {
        if self.otlp.is_none() {
            return;
        }
        let key = (wf.workflow_id.clone(), wf.run_id.clone());
        let how = match event {
            WorkflowEventKind::WorkflowStarted {
                continued_run_id, ..
            } => {
                self.runs.insert(
                    key,
                    RunStart {
                        at: now,
                        task_queue: wf.task_queue.clone(),
                        continued_run_id: continued_run_id.clone(),
                    },
                );
                return;
            }
            WorkflowEventKind::WorkflowCompleted { .. } => tree::RunEnd::Completed,
            WorkflowEventKind::WorkflowContinuedAsNew {} => tree::RunEnd::ContinuedAsNew,
            WorkflowEventKind::WorkflowFailed { error } => tree::RunEnd::Failed { error },
            WorkflowEventKind::SignalReceived { .. } | WorkflowEventKind::Handoff { .. } => return,
        };
        let started = self.runs.remove(&key);
        let (at, task_queue, previous) = match &started {
            Some(r) => (r.at, r.task_queue.as_str(), r.continued_run_id.as_deref()),
            None => (now, "", None),
        };
        let span = tree::workflow_span(wf, task_queue, at, now, how, previous);
        let resource = self.worker_resource(worker);
        if let Some(e) = &self.otlp {
            e.send(resource, span);
        }
    }
}

/// Waits until the run's latest workflow event has been answered (or was dropped).
async fn after(prev: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut prev) = prev {
        let _ = prev.wait_for(|answered| *answered).await;
    }
}

/// What a BLOCK or HALT on a hook event does to its activity (§4.2, SDK 2.0 hooks):
/// at `started` the operation should not have run, so the activity fails
/// (`GovernanceBlock` / `GovernanceHalt`); a HALT at `completed` fails it too (the hook
/// terminates the workflow under 2.0 conventions); a plain BLOCK at `completed` only
/// suppresses ActivityCompleted and the activity's result is returned (`None`).
fn hook_stop_decision(stop: &registry::HookStop) -> Option<Decision> {
    let (error_type, word) = match (stop.verdict, stop.stage) {
        (Verdict::Halt, _) => (ErrorType::GovernanceHalt, "halt"),
        (_, HookStage::Started) => (ErrorType::GovernanceBlock, "block"),
        (_, HookStage::Completed) => return None,
    };
    Some(Decision::Fail {
        error_type,
        message: format!("Governance {word}: {}", stop.reason),
        non_retryable: true,
        reason: Some(stop.reason.clone()),
        patch: None,
    })
}

fn epoch_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn system_time(secs: f64) -> SystemTime {
    if secs.is_finite() && secs > 0.0 {
        UNIX_EPOCH + Duration::from_secs_f64(secs)
    } else {
        SystemTime::now()
    }
}

/// The span of a held call, as the capture will name the operation once it happened:
/// `file.open` with its path and mode, or an HTTP client span with method, URL and
/// request headers. Times are now; the outcome is unknown (its `started` stage).
fn enforce_span(held: &enforce::Decide, trace_id: &str, activity_id: &str) -> Span {
    let now = epoch_ns(SystemTime::now());
    let mut attributes = serde_json::Map::new();
    let (name, kind, headers) = match &held.operation {
        enforce::Operation::File { path, flags } => {
            attributes.insert("file.path".into(), path.clone().into());
            attributes.insert("file.mode".into(), crate::conn::open_mode(*flags).into());
            ("file.open".to_owned(), "INTERNAL", None)
        }
        enforce::Operation::Http {
            method,
            url,
            target,
            host,
            headers,
        } => {
            attributes.insert("http.method".into(), method.clone().into());
            attributes.insert("http.url".into(), url.clone().into());
            attributes.insert("http.target".into(), target.clone().into());
            attributes.insert("http.host".into(), host.clone().into());
            let scheme = url.split_once("://").map_or("http", |(s, _)| s);
            attributes.insert("http.scheme".into(), scheme.into());
            (method.clone(), "CLIENT", Some(headers.clone()))
        }
        enforce::Operation::Unnamed { why } => {
            // Never sent to Core (`decide` applies the failure policy first).
            attributes.insert("openbox.unnamed".into(), (*why).into());
            ("tls.send".to_owned(), "CLIENT", None)
        }
        enforce::Operation::Sql { statement } => {
            let operation = statement
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            attributes.insert("db.system".into(), "postgresql".into());
            attributes.insert("db.statement".into(), statement.clone().into());
            attributes.insert("db.operation".into(), operation.clone().into());
            (operation, "CLIENT", None)
        }
    };
    Span {
        span_id: registry::new_span_id(),
        trace_id: trace_id.to_owned(),
        parent_span_id: None,
        name,
        kind,
        start_time: now,
        end_time: now,
        duration_ns: None,
        attributes,
        status: crate::span::Status {
            code: Default::default(),
            description: None,
        },
        events: Vec::new(),
        activity_id: Some(activity_id.to_owned()),
        request_body: None,
        response_body: None,
        request_headers: headers,
        response_headers: None,
        pid: held.pid,
        tid: held.tid,
        attr: Default::default(),
    }
}
