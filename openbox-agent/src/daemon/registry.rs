//! Who is registered and which activity every span belongs to.
//!
//! A worker is a process whose hook said `hello` and passed the credential check. Each
//! activity execution gets a token from the agent; the hook writes it into the slot of
//! whatever thread runs the activity's code, and the kernel copies the slot into every
//! record. A span is attributed only when its token names an activity of the worker
//! the kernel saw (`owner`), which is the exact evidence rule: anything else is counted
//! as unattributed, with the reason.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use opentelemetry::KeyValue;
use serde_json::Value;

use super::protocol::ActivityStart;
use crate::{
    bounded::BoundedMap,
    conn::{Attribution, Pid},
    export::tree::{self, ActivityPlace},
    governance::{
        hook_events::{FunctionCall, HookStage},
        Verdict,
    },
    span::Span,
    workload::Workload,
};

pub struct Worker {
    /// Host pid.
    pub pid: Pid,
    /// The pid the worker knows itself by (its own PID namespace).
    pub ns_pid: u32,
    pub slots_addr: u64,
    pub slots: u64,
    /// Host tid → slot index.
    pub threads: HashMap<u32, u64>,
    /// Settings the hook passed in `hello` (governance options of create_openbox_worker).
    pub config: Value,
    /// Which of the daemon's per-worker governors governs it (None: the agent's own).
    pub governor: Option<String>,
    /// The request conventions its hook chose (`sdk_conventions`, `max_body_size`).
    pub style: crate::governance::conventions::WorkerStyle,
    /// Its container and pod, for the resource of its activity and workflow spans.
    pub workload: Workload,
    /// A helper (a process pool's worker) of this registered worker, its ancestor: its
    /// threads publish that worker's tokens, so the kernel records them as its own.
    pub helper_of: Option<Pid>,
}

pub struct Activity {
    /// What the hook said when the activity started (`start_time` filled in).
    pub start: ActivityStart,
    pub owner: Pid,
    pub token: u64,
    /// The attempt's span, its trace (which its spans take) and its parent: the run's
    /// span, or the worker's own activity span when it sent its trace context.
    pub place: ActivityPlace,
    pub started: SystemTime,
    /// Governance's answer to the start, as span attributes, once it is known.
    pub start_verdict: Arc<OnceLock<Vec<KeyValue>>>,
    pub spans: Vec<Span>,
    /// Spans beyond the per-activity limit: counted, not kept.
    pub dropped: u64,
    /// Verdicts of its hook events (SDK 2.0, §3.2), read at its end.
    pub hooks: Arc<HookState>,
    /// Answered when its latest governance event is (ActivityStarted, then each hook
    /// event): the next one waits for it, so Core gets them in the activity's order.
    pub tail: Option<tokio::sync::watch::Receiver<bool>>,
    /// `@traced` calls under way: their span and what `started` reported, by span id.
    pub functions: HashMap<String, (Span, FunctionCall)>,
}

/// An activity: its worker and its token.
pub type ActivityKey = (Pid, u64);

/// A span no activity claims, and why.
pub type Refused = Box<(Unattributed, Span)>;

/// What the hook events of one activity decided.
#[derive(Debug, Default)]
pub struct HookState {
    stop: std::sync::Mutex<Option<HookStop>>,
    /// Hook events not sent because an earlier one stopped the activity (SDK 2.0's later
    /// hooks fail fast).
    pub skipped: std::sync::atomic::AtomicU64,
}

/// A BLOCK or HALT on one of an activity's hook events.
#[derive(Debug, Clone, PartialEq)]
pub struct HookStop {
    pub stage: HookStage,
    pub verdict: Verdict,
    pub reason: String,
}

impl HookState {
    /// The first BLOCK/HALT is kept, unless a HALT follows a BLOCK.
    pub fn stop(&self, stop: HookStop) {
        let mut held = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_none_or(|h| stop.verdict > h.verdict) {
            *held = Some(stop);
        }
    }

    pub fn stopped(&self) -> Option<HookStop> {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a span could not be attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unattributed {
    /// Made while no activity ran on the thread (worker housekeeping, an event-loop
    /// callback, a thread the hook does not know).
    NoActivity,
    /// Its activity had already ended (a subprocess or connection outliving it).
    AfterActivityEnd,
    /// The token names no activity of that worker (a stale or forged slot value).
    UnknownActivity,
}

impl Unattributed {
    pub const ALL: [Unattributed; 3] = [
        Unattributed::NoActivity,
        Unattributed::AfterActivityEnd,
        Unattributed::UnknownActivity,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Unattributed::NoActivity => "no_activity",
            Unattributed::AfterActivityEnd => "after_activity_end",
            Unattributed::UnknownActivity => "unknown_activity",
        }
    }
}

/// Activities that ended, remembered (bounded) to tell late spans from unknown tokens.
const ENDED_MEMORY: usize = 65536;

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub workers: u64,
    pub activities: u64,
    pub spans_attributed: u64,
    pub unattributed: BTreeMap<&'static str, u64>,
    pub spans_dropped: u64,
    pub registrations_refused: u64,
    /// Workers whose own governance settings the agent refused (their activities follow
    /// their failure policy).
    pub worker_settings_refused: u64,
    /// Governors of workers' own settings freed with their last worker.
    pub worker_governors_freed: u64,
    pub activities_abandoned: u64,
    /// `traceparent` values from hooks that were not W3C trace contexts (ignored).
    pub bad_traceparents: u64,
    /// Calls to Core (with their replies to workers) still under way when the agent's
    /// shutdown stopped waiting for them: neither delivered nor spooled.
    pub governance_calls_abandoned: u64,
}

pub struct Registry {
    pub workers: HashMap<Pid, Worker>,
    pub activities: HashMap<(Pid, u64), Activity>,
    ended: BoundedMap<(Pid, u64), ()>,
    next_token: u64,
    /// Most spans kept per activity.
    pub span_limit: usize,
    pub stats: Stats,
}

impl Registry {
    pub fn new(span_limit: usize) -> Self {
        Self {
            workers: HashMap::new(),
            activities: HashMap::new(),
            ended: BoundedMap::new(ENDED_MEMORY),
            next_token: 1,
            span_limit,
            stats: Stats::default(),
        }
    }

    pub fn start(&mut self, owner: Pid, start: ActivityStart) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.stats.activities += 1;
        let remote = start
            .traceparent
            .as_deref()
            .and_then(|tp| tree::parse_traceparent(tp, start.tracestate.as_deref()));
        if start.traceparent.is_some() && remote.is_none() {
            self.stats.bad_traceparents += 1;
        }
        let span_id = new_span_id();
        let place = ActivityPlace::new(&start.activity, span_id, remote);
        self.activities.insert(
            (owner, token),
            Activity {
                start,
                owner,
                token,
                place,
                started: SystemTime::now(),
                start_verdict: Arc::default(),
                spans: Vec::new(),
                dropped: 0,
                hooks: Arc::default(),
                tail: None,
                functions: HashMap::new(),
            },
        );
        token
    }

    /// Takes an ended activity out, with the spans it gathered.
    pub fn end(&mut self, owner: Pid, token: u64) -> Option<Activity> {
        let a = self.activities.remove(&(owner, token))?;
        self.remember_ended((owner, token));
        Some(a)
    }

    fn remember_ended(&mut self, key: (Pid, u64)) {
        self.ended.insert(key, ());
    }

    /// Puts a span on its activity and returns the activity's key (`None`: over the
    /// per-activity limit, counted, not kept), or says why it cannot be.
    pub fn route(&mut self, mut span: Span) -> Result<Option<ActivityKey>, Refused> {
        let Attribution { owner, activity } = span.attr;
        if activity == 0 {
            return Err(self.unattributed(Unattributed::NoActivity, span));
        }
        let key = (owner, activity);
        match self.activities.get_mut(&key) {
            Some(a) => {
                if a.spans.len() >= self.span_limit {
                    if a.dropped == 0 {
                        tracing::warn!(
                            activity_id = %a.start.activity.activity_id,
                            workflow_id = %a.start.activity.workflow_id,
                            limit = self.span_limit,
                            "activity produced more spans than the per-activity limit: the rest are counted, not kept"
                        );
                    }
                    a.dropped += 1;
                    self.stats.spans_dropped += 1;
                    return Ok(None);
                }
                span.activity_id = Some(a.start.activity.activity_id.clone());
                span.trace_id = a.place.trace_id.clone();
                a.spans.push(span);
                self.stats.spans_attributed += 1;
                Ok(Some(key))
            }
            None if self.ended.contains_key(&key) => {
                Err(self.unattributed(Unattributed::AfterActivityEnd, span))
            }
            None => Err(self.unattributed(Unattributed::UnknownActivity, span)),
        }
    }

    fn unattributed(&mut self, why: Unattributed, span: Span) -> Box<(Unattributed, Span)> {
        *self.stats.unattributed.entry(why.as_str()).or_default() += 1;
        Box::new((why, span))
    }

    /// A worker process died: its activities and threads go with it.
    pub fn worker_exited(&mut self, pid: Pid) -> Option<Worker> {
        let w = self.workers.remove(&pid)?;
        let gone: Vec<(Pid, u64)> = self
            .activities
            .keys()
            .filter(|(owner, _)| *owner == pid)
            .copied()
            .collect();
        for key in gone {
            self.activities.remove(&key);
            self.remember_ended(key);
            self.stats.activities_abandoned += 1;
        }
        Some(w)
    }
}

/// A fresh random span id (16 hex characters, never zero).
pub fn new_span_id() -> String {
    format!("{:016x}", random_u64().max(1))
}

pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A span of `owner`'s thread carrying the token `activity`.
    pub(crate) fn span(owner: Pid, activity: u64) -> Span {
        Span {
            pid: owner,
            tid: owner,
            attr: Attribution { owner, activity },
            ..crate::governance::testutil::span("GET", serde_json::Value::Null)
        }
    }

    /// What a hook says when activity `id` starts.
    pub(crate) fn info(id: &str) -> ActivityStart {
        ActivityStart {
            activity: crate::governance::events::ActivityInfo {
                activity_id: id.into(),
                attempt: 1,
                ..Default::default()
            },
            input: Vec::new(),
            start_time: None,
            traceparent: None,
            tracestate: None,
        }
    }

    #[test]
    fn spans_land_only_on_the_activity_their_token_names_for_that_worker() {
        let mut r = Registry::new(10);
        let a = r.start(100, info("a"));
        let b = r.start(200, info("b"));
        assert!(r.route(span(100, a)).is_ok());
        // Worker 200 writing worker 100's token into its own slot claims nothing.
        assert_eq!(
            r.route(span(200, a)).unwrap_err().0,
            Unattributed::UnknownActivity
        );
        assert_eq!(
            r.route(span(100, 0)).unwrap_err().0,
            Unattributed::NoActivity
        );
        let done = r.end(100, a).unwrap();
        assert_eq!(done.spans.len(), 1);
        assert_eq!(done.spans[0].activity_id.as_deref(), Some("a"));
        assert_eq!(done.spans[0].trace_id, done.place.trace_id);
        assert_eq!(
            r.route(span(100, a)).unwrap_err().0,
            Unattributed::AfterActivityEnd
        );
        assert!(r.route(span(200, b)).is_ok());
    }

    #[test]
    fn spans_over_the_limit_are_counted_not_kept() {
        let mut r = Registry::new(2);
        let a = r.start(1, info("a"));
        for _ in 0..5 {
            r.route(span(1, a)).unwrap();
        }
        let done = r.end(1, a).unwrap();
        assert_eq!((done.spans.len(), done.dropped), (2, 3));
        assert_eq!(r.stats.spans_dropped, 3);
    }

    #[test]
    fn a_dead_worker_takes_its_activities_with_it() {
        let mut r = Registry::new(10);
        r.workers.insert(
            7,
            Worker {
                pid: 7,
                ns_pid: 7,
                slots_addr: 0,
                slots: 1,
                threads: HashMap::new(),
                config: Value::Null,
                governor: None,
                style: Default::default(),
                workload: Workload::default(),
                helper_of: None,
            },
        );
        let a = r.start(7, info("a"));
        assert!(r.worker_exited(7).is_some());
        assert!(r.activities.is_empty());
        assert_eq!(r.stats.activities_abandoned, 1);
        assert_eq!(
            r.route(span(7, a)).unwrap_err().0,
            Unattributed::AfterActivityEnd
        );
    }
}
