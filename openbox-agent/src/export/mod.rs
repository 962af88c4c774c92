//! Where spans leave the agent besides Core: OTLP export ([`otlp`]), with the captured
//! spans' attributes under the stable semantic-convention names ([`semconv`]) and placed
//! in a tree of workflow run → activity attempt → operation ([`tree`]).
//!
//! The `trace` command exports through [`CommandExport`], a pipeline sink; the daemon
//! exports at each activity's end and workflow run's end, where the tree is known.

pub mod otlp;
pub mod semconv;
pub mod tree;

use std::time::SystemTime;

pub use self::otlp::{Exporter, OtlpConfig, OtlpSettings, OtlpStats};
use self::semconv::Placement;
use crate::{
    capture::clock::Clock,
    conn::{Pid, Record},
    pipeline::Sink,
    span::Span,
};

/// The `trace` command's OTLP sink: every captured span under one root span for the
/// traced command (or process), in one trace.
pub struct CommandExport {
    exporter: Exporter,
    command: String,
    pid: Pid,
    root_span_id: String,
    trace_id: Option<String>,
    start: SystemTime,
}

impl CommandExport {
    pub fn new(exporter: Exporter, command: String) -> CommandExport {
        CommandExport {
            exporter,
            command,
            pid: 0,
            root_span_id: format!("{:016x}", random_u64().max(1)),
            trace_id: None,
            start: SystemTime::now(),
        }
    }

    /// The traced process, once known.
    pub fn set_pid(&mut self, pid: Pid) {
        self.pid = pid;
    }

    /// Sends the root span (from the start of tracing to now).
    pub fn end(&mut self, exit_code: Option<i32>) {
        let trace_id = self
            .trace_id
            .clone()
            .unwrap_or_else(|| format!("{:016x}{:016x}", random_u64(), random_u64().max(1)));
        let root = tree::command_span(
            &trace_id,
            &self.root_span_id,
            &self.command,
            self.pid,
            self.start,
            SystemTime::now(),
            exit_code,
        );
        let resource = otlp::Resource::new(vec![opentelemetry::KeyValue::new(
            "process.pid",
            i64::from(self.pid),
        )]);
        self.exporter.send(resource, root);
    }
}

impl Sink for CommandExport {
    fn span(&mut self, span: Span) {
        // One session makes one trace id: the command's trace.
        let trace_id = self
            .trace_id
            .get_or_insert_with(|| span.trace_id.clone())
            .clone();
        let at = Placement {
            trace_id,
            parent: Some(self.root_span_id.clone()),
        };
        self.exporter
            .send(semconv::resource_of(&span), semconv::span_data(&span, &at));
    }

    fn record(&mut self, _record: &Record, _clock: &Clock) {}
}

pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b)
}
