//! Where spans leave the pipeline: the `trace` printer, the daemon's collector for
//! attribution, and exporters (`export::CommandExport` for OTLP). A session hands every sink the same spans, in
//! the order the parsers finished them.

use crate::{
    capture::clock::Clock,
    conn::{Pid, Record},
    span::Span,
};

pub trait Sink {
    /// A finished span.
    fn span(&mut self, span: Span);

    /// Every capture record, in ring-buffer order, after the spans it finished. Sinks
    /// that show raw capture or follow process lifecycles look at them.
    fn record(&mut self, _record: &Record, _clock: &Clock) {}

    /// The session has drained what the ring held: a good moment to write out.
    fn flush(&mut self) {}

    /// Whether [`Sink::span`] does anything: an absent exporter does not, and a pair
    /// need not copy each span for it.
    fn takes_spans(&self) -> bool {
        true
    }
}

/// Two sinks fed the same spans and records (e.g. attribution and an exporter).
impl<A: Sink, B: Sink> Sink for (A, B) {
    fn span(&mut self, span: Span) {
        match (self.0.takes_spans(), self.1.takes_spans()) {
            (true, true) => {
                self.0.span(span.clone());
                self.1.span(span);
            }
            (true, false) => self.0.span(span),
            (false, _) => self.1.span(span),
        }
    }

    fn takes_spans(&self) -> bool {
        self.0.takes_spans() || self.1.takes_spans()
    }

    fn record(&mut self, record: &Record, clock: &Clock) {
        self.0.record(record, clock);
        self.1.record(record, clock);
    }

    fn flush(&mut self) {
        self.0.flush();
        self.1.flush();
    }
}

/// A sink that may be absent (an exporter that is not configured).
impl<S: Sink> Sink for Option<S> {
    fn span(&mut self, span: Span) {
        if let Some(s) = self {
            s.span(span);
        }
    }

    fn record(&mut self, record: &Record, clock: &Clock) {
        if let Some(s) = self {
            s.record(record, clock);
        }
    }

    fn flush(&mut self) {
        if let Some(s) = self {
            s.flush();
        }
    }

    fn takes_spans(&self) -> bool {
        self.as_ref().is_some_and(|s| s.takes_spans())
    }
}

/// Keeps spans, socket closes and process exits until the caller takes them (the daemon
/// routes them to activities after each drain).
#[derive(Debug, Default)]
pub struct Collect {
    pub spans: Vec<Span>,
    /// Sockets closed: (host tgid, descriptor).
    pub closes: Vec<(Pid, i32)>,
    /// Processes that exited (host tgids).
    pub exits: Vec<Pid>,
}

impl Collect {
    pub fn take(&mut self) -> Collect {
        std::mem::take(self)
    }
}

impl Sink for Collect {
    fn span(&mut self, span: Span) {
        self.spans.push(span);
    }

    fn record(&mut self, record: &Record, _clock: &Clock) {
        match record {
            Record::Exit { pid, .. } => self.exits.push(*pid),
            Record::Close { pid, fd, .. } => self.closes.push((*pid, *fd)),
            _ => {}
        }
    }
}
