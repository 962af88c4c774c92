//! Governance: forwards what activities do to OpenBox Core (or to the embedded local
//! policy) and tells the worker hook what to do (`openbox-core-protocol.md`, API v1
//! routes, Bearer key, SDK 1.0 payloads).
//!
//! # Using it from the daemon
//!
//! ```ignore
//! use openbox_agent::governance::{self, Governor, GovernanceConfig, RawSettings, events};
//!
//! // Start-up: flags (clap) > OPENBOX_* environment > [governance] of the TOML file > defaults.
//! let config = GovernanceConfig::load(&raw_settings_from_clap, config_file.as_deref())?;
//! // With a URL: validates the key (GET /api/v1/auth/validate) — an error here (key
//! // refused, wrong URL) must stop the daemon; Core down is not one: the governor starts,
//! // the failure policy applies until Core answers, and the key is validated then —
//! // opens the spool and starts its delivery task. Without: embedded mode.
//! let governor = std::sync::Arc::new(Governor::new(config).await?);
//!
//! // Hook `activity_start` {workflow_id, run_id, workflow_type, activity_id, activity_type,
//! // task_queue, attempt, start_time, input:[…]}:
//! let info: events::ActivityInfo = serde_json::from_value(msg.clone())?;
//! let started = events::activity_started(&info, input_args.clone(), SystemTime::now());
//! let decision = governor.activity_started(started).await;
//! // → answer the hook with serde_json::to_value(&decision) (see `Decision`), and keep
//! //   `input_args` with the input redaction applied (`Redaction::apply_to_input_json`)
//! //   for ActivityCompleted — or use the arguments the hook reports after applying it.
//!
//! // Hook `activity_end` {token, status, end_time, output, error}: build ActivityCompleted
//! // with the captured §3.1 spans (drop spans whose URL `governor.is_core_url(url)`).
//! let completed = events::activity_completed(&info, events::ActivityCompletion { … }, SystemTime::now());
//! let decision = governor.activity_completed(completed).await;   // output redaction / failure
//!
//! // Workflow-level events from the hook's workflow interceptor (no answer needed):
//! governor.workflow_event(events::workflow_started(&wf, now)).await;
//! governor.signal(events::signal_received(&wf, "approve", args, now)).await;
//! ```
//!
//! The hook acts on a [`Decision`] (JSON: `{"action":"continue"|"fail"|"approval_pending",…}`):
//! - `continue`: run the activity / return its result, after applying `redaction` if
//!   present: `{"target":"input","args":[{"index":i,"value":{…}}]}` — merge `value` into
//!   argument `i` when it is a dataclass (recursively, only existing fields), otherwise
//!   replace argument `i` with `value` (the real argument, not a copy); or
//!   `{"target":"output","value":v}` — merge into a dataclass result when `v` is an object,
//!   otherwise replace the result with `v`.
//! - `fail`: raise `ApplicationError(message, type=error_type, non_retryable=…)`.
//! - `approval_pending`: raise the **retryable** `ApplicationError(message,
//!   type="ApprovalPending")`; Temporal's retry brings the activity back and the next
//!   [`Governor::activity_started`] polls the approval.
//!
//! # Choices
//!
//! - **Error names.** SDK 1.0's decision order (§4.2: BLOCK/HALT, guardrails failure,
//!   REQUIRE_APPROVAL, redaction) with SDK 2.0's type names: `GovernanceBlock` for BLOCK,
//!   `GovernanceHalt` for HALT (SDK 1.0 said `GovernanceStop` for both), plus
//!   `GuardrailsValidationFailed`, `ApprovalPending`, `ApprovalRejected`, `ApprovalExpired`.
//!   The agent holds no Temporal client, so **HALT does not terminate the workflow**: it
//!   fails the activity non-retryably (as SDK 1.0 did); the workflow sees the error.
//! - **Approval marker** keyed by (workflow_id, run_id, activity_id) (SDK 2.0), not by
//!   workflow id alone (SDK 1.0), so parallel activities of one workflow do not consume
//!   each other's approvals. It lives in memory, as in the SDK: after an agent restart the
//!   retry re-evaluates ActivityStarted instead of polling.
//! - **Stored run verdicts.** A BLOCK/HALT answer to SignalReceived or WorkflowStarted is
//!   stored for that run and fails the run's next activities with the same error as an
//!   activity BLOCK/HALT (§4.2; SDK 1.0 also halts the workflow on a WorkflowStarted
//!   BLOCK/HALT, which the agent can only do this way). Under fail_closed, a workflow event
//!   or signal Core could not take stores a synthetic HALT `Governance API error: …` the
//!   same way. Stored state of a run is dropped at its WorkflowCompleted/WorkflowFailed.
//! - **Spool.** Events that need no synchronous verdict — workflow events, signals, and
//!   ActivityCompleted under fail_open — go to the durable spool ([`spool`]) when Core
//!   does not take them (network error, timeout, 5xx, 408, 429), and are delivered in
//!   order by a background task. After a failed try it waits per [`Backoff`]: uniform in
//!   [0, min(30 s, 0.5 s·2ⁿ)] after the n-th failure in a row (full jitter, so nodes do
//!   not retry in lockstep), and new events never cut that wait short. Spooling returns
//!   once the event is fsync'd (group commit: one fsync per batch of waiting events), and
//!   only then does the daemon acknowledge a workflow event to the hook. While the spool
//!   holds anything, new events of these kinds queue behind it, and an activity event
//!   waits for the backlog up to the governance timeout (so under fail_open an
//!   ActivityCompleted gets no verdict until the backlog is delivered — as if Core were
//!   still down). Events Core refuses with another 4xx are not retried: they are logged
//!   at error level and counted. Events already in flight when another one is spooled may
//!   overtake it. A delivered signal's BLOCK/HALT is stored for its run as above.
//! - **Core URLs are never governed**: [`Governor::is_core_url`] tests a URL against the
//!   normalized Core prefix (lowercase scheme and host, explicit default port, no trailing
//!   slash; §3.2) so the daemon can drop the agent's own calls from spans.
//!
//! # Config file (TOML, `[governance]` table; other tables are left to other parts)
//!
//! The same text is `example-config.toml` beside this file (parsed by a test).
//!
//! ```toml
//! [governance]
//! openbox_url = "https://core.openbox.ai"   # unset: embedded mode (local policy + sink)
//! openbox_api_key = "obx_live_…"            # or OPENBOX_API_KEY
//! governance_policy = "fail_open"           # alias on_api_error; fail_open | fail_closed
//! governance_timeout = 30                   # alias api_timeout; seconds per HTTP call
//! send_start_event = true
//! send_activity_start_event = true
//! skip_workflow_types = []
//! skip_signals = []
//! skip_activity_types = ["send_governance_event"]   # a list replaces the default
//! hitl_enabled = true
//! skip_hitl_activity_types = ["send_governance_event"]
//! policy_file = "policy.toml"               # embedded mode; relative to this file
//! events_sink = "-"                         # path, "-" (stdout) or "off"; default "-"
//!                                           # in embedded mode, off with a Core URL
//! ca_file = "/etc/openbox/core-ca.pem"      # extra CA besides the system roots
//! spool_dir = "/var/lib/openbox-agent/spool"
//! spool_max_bytes = "256MiB"
//! spool_max_events = 100000
//! sdk_conventions = "1.0"                   # 1.0 | 2.0: for workers whose hook does not choose
//! hook_events = false                       # every worker's operations as SDK 2.0 hook events
//! max_body_size = 65536                     # 2.0 conventions: characters kept of each body
//! # agent_did = "did:aip:…"                 # sign every request (OpenBox DID), with its key:
//! # agent_private_key_file = "/etc/openbox/agent-key.b64"   # base64 Ed25519 seed, mode 0600
//! ```
//!
//! # Local policy file (embedded mode; TOML, first matching rule wins)
//!
//! The same text is `example-policy.toml` beside this file (parsed by a test).
//!
//! ```toml
//! default_verdict = "allow"
//!
//! [[rules]]
//! name = "no-drop-table"
//! event_type = "ActivityCompleted"
//! sql = 're:(?i)\bdrop\s+table\b'          # `re:` = regex search; otherwise a glob
//! verdict = "block"
//! reason = "DROP TABLE is not allowed"
//!
//! [[rules]]
//! name = "payments-need-approval"
//! activity_type = ["charge_*", "refund"]
//! verdict = "require_approval"
//! reason = "payments need a human"
//! [rules.approval]                          # how the embedded default answers polls
//! decision = "approve"                      # approve | reject | expire | pending
//! after_polls = 2
//!
//! [[rules]]
//! name = "redact-prompts"
//! event_type = "ActivityStarted"
//! activity_type = "call_llm"
//! input = 're:\d{3}-\d{2}-\d{4}'
//! verdict = "allow"
//! [rules.guardrails]
//! redacted_input = [{ prompt = "[REDACTED]" }]
//!
//! [[rules]]
//! name = "no-openai-from-etl"
//! workflow_type = "Etl*"
//! http_host = "*.openai.com"
//! http_method = "POST"
//! verdict = "halt"
//! ```
//!
//! Conditions: `event_type`, `activity_type`, `workflow_type`, `task_queue`,
//! `signal_name`, `input`, `output`, `http_host`, `http_method`, `http_url`, `sql`,
//! `file_path` (see [`policy`]).

pub mod client;
pub mod clock;
pub mod config;
pub mod conventions;
pub mod events;
pub mod hook_events;
pub mod identity;
pub mod policy;
pub mod private;
pub mod requests;
pub mod signing;
pub mod sink;
pub mod spool;
pub mod verdict;

#[cfg(test)]
pub(crate) mod testutil;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

pub use client::{apply_fail_policy, Backoff, CoreClient, CoreOutcome};
pub use config::{FailPolicy, GovernanceConfig, RawSettings, SinkTarget};
pub use conventions::{Conventions, RequestStyle};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};
pub use verdict::{
    ApprovalStatus, ArgRedaction, Decision, ErrorType, EvaluateResponse, Redaction, Stage, Verdict,
};

use self::{
    events::Event,
    policy::{LocalCore, Policy},
    sink::Sink,
    spool::{Appended, Spool, SpoolLimits},
};
use crate::bounded::BoundedMap;

/// Why the governor could not start. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(transparent)]
    Validate(#[from] client::ValidateError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("{0}")]
    Sink(std::io::Error),
    #[error("governance spool: {0}")]
    Spool(std::io::Error),
}

/// What happened to a workflow event or signal.
#[derive(Clone, Debug, PartialEq)]
pub enum EventDisposition {
    /// Not sent: skip lists or `send_start_event = false`.
    Skipped,
    /// Core (or the local policy) answered. `verdict` is `None` for a non-JSON answer.
    Delivered {
        verdict: Option<Verdict>,
        reason: Option<String>,
    },
    /// Queued in the spool for later delivery.
    Spooled,
    /// Lost: the spool was full, it could not be written, or Core refused the event with a
    /// 4xx. Logged at error level and counted.
    Dropped,
}

/// Counters for the daemon's status output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GovernanceStats {
    pub spool_pending: u64,
    pub spool_bytes: u64,
    pub spool_dropped: u64,
    pub delivered_from_spool: u64,
    pub rejected_by_core: u64,
    pub core_failures: u64,
    /// Events lost because the spool could not be written (disk full, I/O error).
    pub spool_write_errors: u64,
    /// Calls to Core (or the embedded local policy) by outcome, their latency, and
    /// whether Core answered the last one.
    pub requests: requests::RequestStats,
    /// Delivery attempts of spooled events that Core did not take (each one followed by
    /// a backoff wait).
    pub spool_retries: u64,
}

enum Backend {
    Core(CoreClient),
    Local(LocalCore),
}

impl Backend {
    /// `body` is `event` encoded (Core gets the bytes, the local policy reads the event).
    async fn evaluate(
        &self,
        event: &Event,
        body: Vec<u8>,
        conventions: Conventions,
    ) -> CoreOutcome<EvaluateResponse> {
        match self {
            Backend::Core(c) if event.is_hook() => c.evaluate_hook_with(conventions, body).await,
            Backend::Core(c) => c.evaluate_with(conventions, body).await,
            Backend::Local(l) => match EvaluateResponse::from_value(&l.evaluate(event)) {
                Some(r) => CoreOutcome::Ok(r),
                None => CoreOutcome::NonJson { status: 200 },
            },
        }
    }

    async fn approval(
        &self,
        wf: &str,
        run: &str,
        act: &str,
        conventions: Conventions,
    ) -> CoreOutcome<Value> {
        match self {
            Backend::Core(c) => c.approval_with(conventions, wf, run, act).await,
            Backend::Local(l) => CoreOutcome::Ok(l.approval(wf, run, act)),
        }
    }
}

const MAX_RUNS: usize = 65_536;

type RunKey = (String, String);
type ActivityKey = (String, String, String);

struct RunState {
    /// BLOCK/HALT stored for a run (signal, WorkflowStarted, fail_closed failures).
    verdicts: BoundedMap<RunKey, (Verdict, String)>,
    /// Activities waiting for approval.
    approvals: BoundedMap<ActivityKey, ()>,
}

#[derive(Default)]
struct Counters {
    /// Delivery attempts of spooled events that Core did not take (it is still down).
    spool_retries: AtomicU64,
    delivered_from_spool: AtomicU64,
    rejected_by_core: AtomicU64,
    core_failures: AtomicU64,
    lost: AtomicU64,
    requests: requests::Requests,
}

/// A spool line (see [`Conventions::spool_line`]), and where to say whether it is on disk.
type SpoolWrite = (Vec<u8>, oneshot::Sender<std::io::Result<Appended>>);

/// Most events written with one fsync. Their acknowledgements reach the hook together, so
/// this stays well below the daemon's per-connection reply queue (`hook::REPLY_QUEUE`),
/// which drops a peer that lets it fill; at ~3 ms an fsync, 256 a batch still spools
/// tens of thousands of events a second.
const MAX_SPOOL_BATCH: usize = 256;

struct Inner {
    config: GovernanceConfig,
    backend: Backend,
    sink: Option<Sink>,
    spool: Option<Arc<Mutex<Spool>>>,
    /// To the task that appends to the spool (group commit, see [`write_spool`]).
    spool_writes: Option<mpsc::Sender<SpoolWrite>>,
    /// Wakes spool delivery when it is idle (a backoff wait is never cut short).
    wake: Notify,
    /// Spool delivery emptied the spool: activity events waiting for the backlog go on.
    drained: Notify,
    runs: Mutex<RunState>,
    core_prefix: Option<String>,
    counters: Counters,
    /// Core accepted the API key (always true without Core). False while the agent runs
    /// on its failure policy after starting during a Core outage.
    key_validated: AtomicBool,
}

/// The governance facade the daemon calls. Share it as `Arc<Governor>`; dropping it stops
/// the spool delivery task (undelivered events stay in the spool for the next start).
pub struct Governor {
    inner: Arc<Inner>,
    delivery: Option<tokio::task::JoinHandle<()>>,
    spool_writer: Option<tokio::task::JoinHandle<()>>,
    /// Validates the key again once Core answers, after a start during an outage.
    revalidation: Option<tokio::task::JoinHandle<()>>,
}

impl Governor {
    /// Stops the spool delivery and returns once the spool is closed (its directory lock
    /// released), so another governor — the agent started again — can open it at once.
    /// Dropping a governor stops delivery too, but the task lets go of the spool only
    /// when the runtime next runs it.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.revalidation.take() {
            task.abort();
        }
        for task in [self.delivery.take(), self.spool_writer.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
            let _ = task.await;
        }
        // A spool read the task had handed to a blocking thread may still hold it briefly.
        if let Some(spool) = self.inner.spool.as_ref() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(spool) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

impl Drop for Governor {
    fn drop(&mut self) {
        for task in [
            self.delivery.take(),
            self.spool_writer.take(),
            self.revalidation.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
    }
}

fn run_key(head: &events::Head) -> RunKey {
    (head.workflow_id.clone(), head.run_id.clone())
}

fn activity_key(activity: &events::ActivityHead) -> ActivityKey {
    (
        activity.head.workflow_id.clone(),
        activity.head.run_id.clone(),
        activity.activity_id.clone(),
    )
}

/// The normalized Core prefix of §3.2: `scheme://host:port/path` with lowercase scheme and
/// host, the default port made explicit, and no trailing slash.
pub fn core_url_prefix(base: &str) -> Option<String> {
    let url = reqwest::Url::parse(base.trim()).ok()?;
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(format!(
        "{}://{}:{}{}",
        url.scheme(),
        host,
        port,
        url.path().trim_end_matches('/')
    ))
}

/// True when `url` is under the Core base URL whose [`core_url_prefix`] is `prefix`.
pub fn is_core_url(prefix: &str, url: &str) -> bool {
    let Some(candidate) = core_url_prefix(url) else {
        return false;
    };
    match candidate.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl Governor {
    /// Starts governance. With `openbox_url`: builds the Core client, validates the API key
    /// (refusing to start when Core refuses it or answers like a wrong URL, §1.4), opens
    /// the spool and starts delivering it. A Core that cannot answer (network error,
    /// timeout, 5xx) does not stop the start: a restart during an outage must not leave
    /// workers ungoverned, so the failure policy applies to every activity until Core
    /// answers (fail_open spools, fail_closed halts), and the key is validated then.
    /// Without: loads the local policy (built-in allow-all when no `policy_file`).
    pub async fn new(config: GovernanceConfig) -> Result<Governor, GovernanceError> {
        let sink = config
            .events_sink
            .as_ref()
            .map(Sink::open)
            .transpose()
            .map_err(GovernanceError::Sink)?;
        let mut key_validated = true;
        let (backend, spool, core_prefix) = match (&config.openbox_url, &config.openbox_api_key) {
            (Some(url), key) => {
                let client = CoreClient::new(
                    url,
                    key.as_deref().unwrap_or(""),
                    config.governance_timeout,
                    config.ca_file.as_deref(),
                )?
                .with_identity(config.identity.clone(), config.sdk_conventions);
                match client.validate().await {
                    Ok(()) => tracing::info!(url = %url, "OpenBox Core API key validated"),
                    Err(e) if e.is_outage() => {
                        key_validated = false;
                        tracing::error!(
                            error = %e,
                            policy = config.on_api_error.as_str(),
                            "OpenBox Core is unreachable: starting anyway; the failure policy \
                             applies to every activity until Core answers (fail_open: continue \
                             and spool events, fail_closed: halt activities), and the API key is \
                             validated then"
                        );
                    }
                    Err(e) => return Err(e.into()),
                }
                let limits = SpoolLimits::new(config.spool_max_bytes, config.spool_max_events);
                let dir = config.spool_dir.clone();
                let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, limits))
                    .await
                    .map_err(|e| GovernanceError::Spool(std::io::Error::other(e)))?
                    .map_err(GovernanceError::Spool)?;
                (
                    Backend::Core(client),
                    Some(Arc::new(Mutex::new(spool))),
                    core_url_prefix(url),
                )
            }
            (None, _) => {
                let policy = match &config.policy_file {
                    Some(p) => Policy::load(p)?,
                    None => Policy::default(),
                };
                tracing::info!(
                    policy = %config.policy_file.as_ref().map_or("built-in allow-all".into(), |p| p.display().to_string()),
                    rules = policy.rule_count(),
                    "governance runs on the embedded local policy (no openbox_url)"
                );
                (
                    Backend::Local(LocalCore::new(policy, config.policy_file.clone())),
                    None,
                    None,
                )
            }
        };
        let (spool_writes, spool_writer) = match &spool {
            Some(spool) => {
                let (tx, rx) = mpsc::channel(MAX_SPOOL_BATCH);
                (Some(tx), Some(tokio::spawn(write_spool(spool.clone(), rx))))
            }
            None => (None, None),
        };
        let inner = Arc::new(Inner {
            config,
            backend,
            sink,
            spool,
            spool_writes,
            wake: Notify::new(),
            drained: Notify::new(),
            runs: Mutex::new(RunState {
                verdicts: BoundedMap::new(MAX_RUNS),
                approvals: BoundedMap::new(MAX_RUNS),
            }),
            core_prefix,
            counters: Counters::default(),
            key_validated: AtomicBool::new(key_validated),
        });
        if matches!(inner.backend, Backend::Core(_)) {
            inner.counters.requests.set_reachable(key_validated);
        }
        let delivery = inner
            .spool
            .is_some()
            .then(|| tokio::spawn(deliver_spool(inner.clone())));
        let revalidation = (!key_validated).then(|| tokio::spawn(revalidate_key(inner.clone())));
        inner.wake.notify_one();
        Ok(Governor {
            inner,
            delivery,
            spool_writer,
            revalidation,
        })
    }

    /// False while the agent runs on its failure policy after starting during a Core
    /// outage (until Core validates the key); always true without Core.
    pub fn key_validated(&self) -> bool {
        self.inner.key_validated.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &GovernanceConfig {
        &self.inner.config
    }

    /// True when `url` is under the Core base URL (never govern the agent's own calls).
    /// Always false in embedded mode.
    pub fn is_core_url(&self, url: &str) -> bool {
        self.inner
            .core_prefix
            .as_deref()
            .is_some_and(|p| is_core_url(p, url))
    }

    /// The request style of workers that do not choose theirs (the agent's settings).
    pub fn default_style(&self) -> RequestStyle {
        RequestStyle {
            conventions: self.inner.config.sdk_conventions,
            max_body_size: self.inner.config.max_body_size,
            hook_events: self.inner.config.hook_events,
        }
    }

    /// [`Governor::activity_started_as`] in the agent's default style.
    pub async fn activity_started(&self, event: events::ActivityStarted) -> Decision {
        self.activity_started_as(event, self.default_style()).await
    }

    /// ActivityStarted (before the activity runs): skip list, stored run verdict, pending
    /// approval poll, then the evaluate call and §4.2.
    pub async fn activity_started_as(
        &self,
        event: events::ActivityStarted,
        style: RequestStyle,
    ) -> Decision {
        let conventions = style.conventions;
        let inner = &self.inner;
        let cfg = &inner.config;
        let activity_type = event.activity.activity_type.clone();
        if cfg.skip_activity_types.contains(&activity_type) {
            return Decision::allow_without_verdict();
        }
        let run = run_key(&event.activity.head);
        let stored = inner.lock_runs().verdicts.get(&run).cloned();
        if let Some((verdict, reason)) = stored {
            tracing::info!(workflow_id = %run.0, run_id = %run.1, activity_type = %activity_type, verdict = %verdict,
                "activity stopped by a verdict stored for its run");
            return verdict::stop_decision(verdict, &reason);
        }
        let hitl = cfg.hitl_enabled && !cfg.skip_hitl_activity_types.contains(&activity_type);
        let key = activity_key(&event.activity);
        if hitl && inner.lock_runs().approvals.get(&key).is_some() {
            let now = clock::unix_seconds(SystemTime::now());
            let started = Instant::now();
            let outcome = inner
                .backend
                .approval(&key.0, &key.1, &key.2, conventions)
                .await;
            inner.counters.requests.record(&outcome, started.elapsed());
            let status = match outcome {
                CoreOutcome::Ok(body) => Some(verdict::interpret_approval(&body, now, conventions)),
                // Never read as "still pending": the poll would go on for ever (§5).
                CoreOutcome::AuthRefused(message) => {
                    tracing::error!(workflow_id = %key.0, activity_id = %key.2, error = %message, "approval poll refused: the identity was not accepted");
                    return Decision::auth_refused(message);
                }
                other => {
                    tracing::warn!(workflow_id = %key.0, activity_id = %key.2, outcome = ?other, "approval poll failed; still pending");
                    None
                }
            };
            tracing::info!(workflow_id = %key.0, run_id = %key.1, activity_id = %key.2, status = ?status, "approval poll");
            match status {
                None => {
                    return Decision::ApprovalPending {
                        message: "Failed to check approval status, retrying...".into(),
                    }
                }
                Some(ApprovalStatus::Pending) => {
                    return Decision::ApprovalPending {
                        message: format!("Awaiting approval for activity {activity_type}"),
                    }
                }
                Some(ApprovalStatus::Expired) => {
                    inner.lock_runs().approvals.remove(&key);
                    return Decision::fail(
                        ErrorType::ApprovalExpired,
                        format!(
                            "Approval expired for activity {activity_type} (workflow_id={}, run_id={}, activity_id={})",
                            key.0, key.1, key.2
                        ),
                    );
                }
                Some(ApprovalStatus::Rejected { reason }) => {
                    inner.lock_runs().approvals.remove(&key);
                    return Decision::fail(
                        ErrorType::ApprovalRejected,
                        format!("Activity rejected: {reason}"),
                    );
                }
                Some(ApprovalStatus::Approved) => {
                    // Approved: ActivityStarted is sent again below and its verdict enforced.
                    inner.lock_runs().approvals.remove(&key);
                }
            }
        }
        if !cfg.send_activity_start_event {
            return Decision::allow_without_verdict();
        }
        let arg_count = event.activity_input.len();
        let event = Event::ActivityStarted(event);
        let body = conventions.encode(&event);
        inner.write_sink(&body);
        inner.drain_backlog_first().await;
        let outcome = inner
            .evaluate_after_backlog(&event, body, conventions)
            .await;
        inner.note_failure(&outcome, &event);
        if let CoreOutcome::AuthRefused(message) = &outcome {
            return inner.auth_refused(&key, &activity_type, "ActivityStarted", message);
        }
        let response = apply_fail_policy(&outcome, cfg.on_api_error);
        let decision = verdict::decide(Stage::Started { arg_count }, response.as_ref(), hitl);
        inner.after_activity_decision(&key, &activity_type, "ActivityStarted", &decision);
        decision
    }

    /// [`Governor::activity_completed_as`] in the agent's default style.
    pub async fn activity_completed(&self, event: events::ActivityCompleted) -> Decision {
        self.activity_completed_as(event, self.default_style())
            .await
    }

    /// ActivityCompleted (after the activity ran, with its spans): evaluate and §4.2 with
    /// output redaction. Under fail_open, when Core does not take it (or a backlog is
    /// being delivered) the event is spooled and the activity continues without a verdict.
    /// Under 2.0 conventions a failed activity sends nothing (SDK 2.0 sends
    /// ActivityCompleted only when the activity returned).
    pub async fn activity_completed_as(
        &self,
        event: events::ActivityCompleted,
        style: RequestStyle,
    ) -> Decision {
        let conventions = style.conventions;
        let inner = &self.inner;
        let cfg = &inner.config;
        let activity_type = event.activity.activity_type.clone();
        if cfg.skip_activity_types.contains(&activity_type) {
            return Decision::allow_without_verdict();
        }
        let key = activity_key(&event.activity);
        let style = RequestStyle {
            max_body_size: style.max_body_size.or(cfg.max_body_size),
            ..style
        };
        let Some(event) = style.shape(Event::ActivityCompleted(event)) else {
            return Decision::allow_without_verdict();
        };
        let body = conventions.encode(&event);
        inner.write_sink(&body);
        let fail_open = cfg.on_api_error == FailPolicy::FailOpen;
        inner.drain_backlog_first().await;
        if fail_open && inner.spool_backlog().await {
            inner.spool_event(&event, body, conventions).await;
            return Decision::allow_without_verdict();
        }
        let outcome = inner
            .evaluate_after_backlog(&event, body.clone(), conventions)
            .await;
        inner.note_failure(&outcome, &event);
        if let CoreOutcome::AuthRefused(message) = &outcome {
            return inner.auth_refused(&key, &activity_type, "ActivityCompleted", message);
        }
        if fail_open && outcome.retryable() {
            inner.spool_event(&event, body, conventions).await;
        }
        let response = apply_fail_policy(&outcome, cfg.on_api_error);
        let hitl = cfg.hitl_enabled && !cfg.skip_hitl_activity_types.contains(&activity_type);
        let decision = verdict::decide(Stage::Completed, response.as_ref(), hitl);
        inner.after_activity_decision(&key, &activity_type, "ActivityCompleted", &decision);
        decision
    }

    /// One stage of an operation as an SDK 2.0 hook event (§3.2). Skipped for activity
    /// types in `skip_activity_types`. Spooled like ActivityCompleted: under fail_open an
    /// event Core does not take, or that would overtake spooled events, is spooled and
    /// gets no verdict; under fail_closed it waits for the backlog (up to the governance
    /// timeout) and meets the failure policy if it cannot be sent. Returns the BLOCK/HALT verdict
    /// and its reason when the operation must stop (fail_closed without an answer: HALT).
    pub async fn hook_event_as(
        &self,
        event: events::HookEvent,
        style: RequestStyle,
    ) -> Option<(Verdict, String)> {
        let conventions = style.conventions;
        let inner = &self.inner;
        let cfg = &inner.config;
        if cfg
            .skip_activity_types
            .contains(&event.activity.activity_type)
        {
            return None;
        }
        let event = Event::HookEvent(event);
        let body = conventions.encode(&event);
        inner.write_sink(&body);
        let fail_open = cfg.on_api_error == FailPolicy::FailOpen;
        if fail_open {
            // Nothing waits for this verdict before the activity's end: behind a backlog
            // it queues at once, in order, rather than waiting a timeout per operation.
            if inner.spool_backlog().await {
                inner.spool_event(&event, body, conventions).await;
                return None;
            }
        } else {
            inner.drain_backlog_first().await;
        }
        let outcome = inner
            .evaluate_after_backlog(&event, body.clone(), conventions)
            .await;
        inner.note_failure(&outcome, &event);
        if fail_open && outcome.retryable() {
            inner.spool_event(&event, body, conventions).await;
        }
        let response = apply_fail_policy(&outcome, cfg.on_api_error)?;
        response.verdict.should_stop().then(|| {
            let reason = response
                .reason
                .clone()
                .unwrap_or_else(|| "Operation blocked by governance".to_owned());
            (response.verdict, reason)
        })
    }

    /// WorkflowStarted / WorkflowCompleted / WorkflowFailed. Honours `skip_workflow_types`
    /// and `send_start_event`; spooled when Core does not take it. A BLOCK/HALT answer to
    /// WorkflowStarted is stored for the run (see the module docs).
    pub async fn workflow_event(&self, event: impl Into<Event>) -> EventDisposition {
        self.workflow_event_as(event, self.default_style()).await
    }

    /// [`Governor::workflow_event`] in a worker's style.
    pub async fn workflow_event_as(
        &self,
        event: impl Into<Event>,
        style: RequestStyle,
    ) -> EventDisposition {
        let event = event.into();
        let cfg = &self.inner.config;
        // SDK 2.0 sends a Handoff whatever the skip list says (it is the application's
        // explicit call, not an interceptor's event).
        if event.event_type() != events::HANDOFF
            && cfg
                .skip_workflow_types
                .contains(&event.head().workflow_type)
        {
            return EventDisposition::Skipped;
        }
        if event.event_type() == events::WORKFLOW_STARTED && !cfg.send_start_event {
            return EventDisposition::Skipped;
        }
        self.inner.send_or_spool(event, style).await
    }

    /// SignalReceived. Honours `skip_workflow_types` and `skip_signals`. The signal itself
    /// never fails; a BLOCK/HALT answer is stored for the run and enforced at its next
    /// activity (§4.2).
    pub async fn signal(&self, event: events::SignalReceived) -> EventDisposition {
        self.signal_as(event, self.default_style()).await
    }

    /// [`Governor::signal`] in a worker's style.
    pub async fn signal_as(
        &self,
        event: events::SignalReceived,
        style: RequestStyle,
    ) -> EventDisposition {
        let cfg = &self.inner.config;
        if cfg.skip_workflow_types.contains(&event.head.workflow_type)
            || cfg.skip_signals.contains(&event.signal_name)
        {
            return EventDisposition::Skipped;
        }
        self.inner
            .send_or_spool(Event::SignalReceived(event), style)
            .await
    }

    pub fn stats(&self) -> GovernanceStats {
        let c = &self.inner.counters;
        let (spool_pending, spool_bytes, spool_dropped) = match &self.inner.spool {
            Some(s) => {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                (s.len(), s.bytes(), s.dropped())
            }
            None => (0, 0, 0),
        };
        GovernanceStats {
            spool_pending,
            spool_bytes,
            spool_dropped,
            delivered_from_spool: c.delivered_from_spool.load(Ordering::Relaxed),
            rejected_by_core: c.rejected_by_core.load(Ordering::Relaxed),
            core_failures: c.core_failures.load(Ordering::Relaxed),
            spool_write_errors: c.lost.load(Ordering::Relaxed),
            requests: c.requests.snapshot(),
            spool_retries: c.spool_retries.load(Ordering::Relaxed),
        }
    }

    /// Waits until the spool is empty (e.g. before a clean shutdown); false on timeout.
    pub async fn wait_spool_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.inner.spool_backlog().await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Inner {
    /// An Okta / workload identity refused (or impossible to set up) on an activity
    /// event: the activity fails with the authentication error in every policy (§1.3,
    /// §6), as SDK 2.0's interceptor raises it.
    fn auth_refused(
        &self,
        key: &ActivityKey,
        activity_type: &str,
        event_type: &str,
        message: &str,
    ) -> Decision {
        tracing::error!(workflow_id = %key.0, activity_id = %key.2, activity_type, event_type, error = %message,
            "OpenBox Core did not accept the agent's identity: the activity fails whatever the failure policy");
        Decision::auth_refused(message.to_owned())
    }

    fn lock_runs(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_sink(&self, body: &[u8]) {
        if let Some(s) = &self.sink {
            s.write(body);
        }
    }

    fn note_failure<T>(&self, outcome: &CoreOutcome<T>, event: &Event) {
        if let Some(err) = outcome.error_text() {
            self.counters.core_failures.fetch_add(1, Ordering::Relaxed);
            let activity_id = event.activity().map_or("", |a| a.activity_id.as_str());
            tracing::warn!(event_type = event.event_type(), workflow_id = %event.head().workflow_id,
                activity_id, error = %err, policy = self.config.on_api_error.as_str(),
                "OpenBox Core did not answer a governance event");
        }
    }

    fn after_activity_decision(
        &self,
        key: &ActivityKey,
        activity_type: &str,
        stage: &str,
        d: &Decision,
    ) {
        if matches!(d, Decision::ApprovalPending { .. }) {
            self.lock_runs().approvals.insert(key.clone(), ());
        }
        match d {
            Decision::Continue {
                verdict, redaction, ..
            } => tracing::debug!(workflow_id = %key.0, activity_id = %key.2,
                activity_type, stage, verdict = ?verdict, redaction = redaction.is_some(), "governance decision"),
            other => {
                tracing::info!(workflow_id = %key.0, run_id = %key.1, activity_id = %key.2, activity_type, stage,
                decision = ?other, "governance decision")
            }
        }
    }

    /// Before an activity event goes to Core directly, the events spooled before it must
    /// arrive first (a run's WorkflowStarted before its ActivityStarted): waits until the
    /// spool is empty, for at most the governance timeout — the time the event itself
    /// would have had to get an answer. Delivery is woken if it is idle; a delivery that
    /// is backing off keeps its wait (one try per backoff step, not one per activity).
    async fn drain_backlog_first(&self) {
        let deadline = tokio::time::Instant::now() + self.config.governance_timeout;
        let mut woke = false;
        loop {
            // Registered before the check, so an emptying in between is not missed.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.spool_backlog().await {
                return;
            }
            if !woke {
                self.wake.notify_one();
                woke = true;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return;
            }
        }
    }

    /// Evaluates an activity event, unless events spooled before it are still waiting
    /// for Core: it would overtake them, so it meets the failure policy as if Core were
    /// unreachable (ActivityStarted needs an answer at once and is never spooled).
    async fn evaluate_after_backlog(
        &self,
        event: &Event,
        body: Vec<u8>,
        conventions: Conventions,
    ) -> CoreOutcome<EvaluateResponse> {
        if self.spool_backlog().await {
            return CoreOutcome::Network(
                "earlier governance events are still waiting for OpenBox Core".into(),
            );
        }
        self.evaluate(event, body, conventions).await
    }

    /// One evaluate call, counted by outcome and timed.
    async fn evaluate(
        &self,
        event: &Event,
        body: Vec<u8>,
        conventions: Conventions,
    ) -> CoreOutcome<EvaluateResponse> {
        let started = Instant::now();
        let outcome = self.backend.evaluate(event, body, conventions).await;
        self.counters.requests.record(&outcome, started.elapsed());
        outcome
    }

    async fn spool_backlog(&self) -> bool {
        match &self.spool {
            Some(s) => !s.lock().unwrap_or_else(|p| p.into_inner()).is_empty(),
            None => false,
        }
    }

    /// Returns once the event is fsync'd in the spool (or lost, counted and logged): only
    /// then may the event be acknowledged to the hook.
    async fn spool_event(
        &self,
        event: &Event,
        body: Vec<u8>,
        conventions: Conventions,
    ) -> EventDisposition {
        let Some(writes) = &self.spool_writes else {
            return EventDisposition::Dropped;
        };
        let stopped = || std::io::Error::other("the spool writer has stopped (agent shutdown)");
        let (done, stored) = oneshot::channel();
        let line = conventions.spool_line(&body);
        let appended = match writes.send((line, done)).await {
            Ok(()) => stored.await.unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        match appended {
            Ok(Appended::Stored) => {
                self.wake.notify_one();
                EventDisposition::Spooled
            }
            Ok(Appended::Dropped) => EventDisposition::Dropped,
            Err(e) => {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, event_type = event.event_type(),
                    "cannot spool a governance event; it is lost");
                EventDisposition::Dropped
            }
        }
    }

    /// A workflow event or signal: written to the sink, then to Core or the spool.
    async fn send_or_spool(&self, event: Event, style: RequestStyle) -> EventDisposition {
        let conventions = style.conventions;
        let Some(event) = style.shape(event) else {
            return EventDisposition::Skipped;
        };
        let body = conventions.encode(&event);
        self.write_sink(&body);
        if self.spool_backlog().await {
            // Queued behind the backlog; its answer is applied when it is delivered.
            return self.spool_event(&event, body, conventions).await;
        }
        let outcome = self.evaluate(&event, body.clone(), conventions).await;
        self.note_failure(&outcome, &event);
        let (event_type, run) = (event.event_type(), run_key(event.head()));
        match outcome {
            CoreOutcome::Ok(r) => {
                self.after_delivery(event_type, run, Some(&r));
                EventDisposition::Delivered {
                    verdict: Some(r.verdict),
                    reason: r.reason,
                }
            }
            CoreOutcome::NonJson { .. } => {
                self.after_delivery(event_type, run, None);
                EventDisposition::Delivered {
                    verdict: None,
                    reason: None,
                }
            }
            ref failed if failed.retryable() => {
                let d = self.spool_event(&event, body, conventions).await;
                self.fail_closed_store(event_type, run, &failed.error_text().unwrap_or_default());
                d
            }
            failed => {
                self.counters
                    .rejected_by_core
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(event_type, workflow_id = %run.0,
                    outcome = ?failed, "OpenBox Core refused a governance event; it is not retried");
                self.fail_closed_store(event_type, run, &failed.error_text().unwrap_or_default());
                EventDisposition::Dropped
            }
        }
    }

    /// fail_closed: a run whose WorkflowStarted or signal Core could not take is halted at
    /// its next activity (SDK 1.0 halts the workflow).
    fn fail_closed_store(&self, event_type: &str, run: RunKey, error: &str) {
        if self.config.on_api_error == FailPolicy::FailClosed
            && (event_type == events::WORKFLOW_STARTED || event_type == events::SIGNAL_RECEIVED)
        {
            self.lock_runs().verdicts.insert(
                run,
                (Verdict::Halt, format!("Governance API error: {error}")),
            );
        }
    }

    /// What a delivered workflow-level event's answer changes: BLOCK/HALT stored for the
    /// run (signal, WorkflowStarted), run state dropped at the run's end.
    fn after_delivery(&self, et: &str, run: RunKey, response: Option<&EvaluateResponse>) {
        match et {
            events::WORKFLOW_COMPLETED | events::WORKFLOW_FAILED => {
                let mut runs = self.lock_runs();
                runs.verdicts.remove(&run);
                runs.approvals.retain(|k| !(k.0 == run.0 && k.1 == run.1));
            }
            events::SIGNAL_RECEIVED | events::WORKFLOW_STARTED => {
                if let Some(r) = response.filter(|r| r.verdict.should_stop()) {
                    let reason = r
                        .reason
                        .clone()
                        .unwrap_or_else(|| "Workflow blocked by governance".to_owned());
                    tracing::info!(workflow_id = %run.0, run_id = %run.1, event_type = et, verdict = %r.verdict,
                        reason = %reason, "verdict stored for the run; its next activity will fail");
                    self.lock_runs().verdicts.insert(run, (r.verdict, reason));
                }
            }
            _ => {}
        }
    }
}

/// After a start during a Core outage: validates the key again, backing off like spool
/// delivery, until Core answers. A key refused then cannot stop an agent that is already
/// serving workers: it is logged as an error, and Core's refusals of every event keep the
/// failure policy applying.
async fn revalidate_key(inner: Arc<Inner>) {
    let Backend::Core(client) = &inner.backend else {
        return;
    };
    let mut backoff = Backoff::new(
        inner.config.spool_retry_initial,
        inner.config.spool_retry_max,
    );
    loop {
        tokio::time::sleep(backoff.next_wait()).await;
        match client.validate().await {
            Ok(()) => {
                inner.key_validated.store(true, Ordering::Relaxed);
                inner.counters.requests.set_reachable(true);
                tracing::info!(url = %client.base_url(), "OpenBox Core answers again: API key validated");
                return;
            }
            Err(e) if e.is_outage() => {
                tracing::debug!(error = %e, "OpenBox Core still unreachable");
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    policy = inner.config.on_api_error.as_str(),
                    "OpenBox Core answers again but refuses this agent: the failure policy \
                     keeps applying; fix the key or URL and restart the agent"
                );
                return;
            }
        }
    }
}

/// Appends spooled events for every producer: the events that queue up while one batch is
/// being written and fsync'd go to disk together with the next fsync (group commit), so
/// a burst of events costs a few fsyncs, not one each. Each producer hears back once its
/// event is durable.
async fn write_spool(spool: Arc<Mutex<Spool>>, mut writes: mpsc::Receiver<SpoolWrite>) {
    let mut batch = Vec::with_capacity(MAX_SPOOL_BATCH);
    while writes.recv_many(&mut batch, MAX_SPOOL_BATCH).await > 0 {
        let (bodies, waiting): (Vec<Vec<u8>>, Vec<_>) = batch.drain(..).unzip();
        let s = spool.clone();
        let written = tokio::task::spawn_blocking(move || {
            let bodies: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .append_batch(&bodies)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match written {
            Ok(appended) => {
                for (done, a) in waiting.into_iter().zip(appended) {
                    let _ = done.send(Ok(a));
                }
            }
            Err(e) => {
                for done in waiting {
                    let _ = done.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
}

/// Delivers spooled events in order while the spool is non-empty. After a failure it
/// waits as [`Backoff`] says (full jitter) and nothing cuts that wait short: new events
/// wake delivery only when it is idle.
async fn deliver_spool(inner: Arc<Inner>) {
    let (Some(spool), Backend::Core(client)) = (inner.spool.clone(), &inner.backend) else {
        return;
    };
    let mut backoff = Backoff::new(
        inner.config.spool_retry_initial,
        inner.config.spool_retry_max,
    );
    loop {
        let s = spool.clone();
        let next =
            tokio::task::spawn_blocking(move || s.lock().unwrap_or_else(|p| p.into_inner()).peek())
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
        let item = match next {
            Ok(Some(item)) => item,
            Ok(None) => {
                backoff.reset();
                inner.drained.notify_waiters();
                inner.wake.notified().await;
                continue;
            }
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "cannot read the governance spool; retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let started = Instant::now();
        let (conventions, body) = Conventions::from_spool_line(&item.body);
        let outcome = client.evaluate_spooled(conventions, body.to_vec()).await;
        inner.counters.requests.record(&outcome, started.elapsed());
        if outcome.retryable() {
            inner.counters.spool_retries.fetch_add(1, Ordering::Relaxed);
            let wait = backoff.next_wait();
            tracing::warn!(outcome = ?outcome, retry_in_ms = wait.as_millis() as u64,
                "OpenBox Core still unreachable; spooled governance events wait");
            tokio::time::sleep(wait).await;
            continue;
        }
        backoff.reset();
        let event: events::Spooled = serde_json::from_slice(body).unwrap_or_default();
        let run = (event.workflow_id, event.run_id);
        match &outcome {
            CoreOutcome::Ok(v) => {
                inner
                    .counters
                    .delivered_from_spool
                    .fetch_add(1, Ordering::Relaxed);
                inner.after_delivery(
                    &event.event_type,
                    run,
                    EvaluateResponse::from_value(v).as_ref(),
                );
            }
            CoreOutcome::NonJson { .. } => {
                inner
                    .counters
                    .delivered_from_spool
                    .fetch_add(1, Ordering::Relaxed);
                inner.after_delivery(&event.event_type, run, None);
            }
            refused => {
                inner
                    .counters
                    .rejected_by_core
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(event_type = %event.event_type, outcome = ?refused,
                    "OpenBox Core refused a spooled governance event; dropping it");
            }
        }
        let s = spool.clone();
        let acked = tokio::task::spawn_blocking(move || {
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.ack(&item).map(|()| s.is_empty())
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match acked {
            Ok(true) => inner.drained.notify_waiters(),
            Ok(false) => {}
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "cannot record spool delivery; the event may be sent again");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
