//! What the daemon counted, in one snapshot with two renderings: the JSON summary it
//! prints at exit and the Prometheus text served at `/metrics`. Both are made from the
//! same [`Summary`], itself read from the counters each stage keeps (the kernel's
//! per-CPU counters, the pipeline's, the registry's, the hook socket's, the governor's),
//! so a scrape and the summary never disagree about what was seen.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use serde_json::{json, Value};

use super::{
    hook,
    registry::{self, Unattributed},
};
use crate::{
    capture::Counters,
    export::OtlpStats,
    governance::GovernanceStats,
    pipeline,
    protocol::{Loss, Protocol},
};

/// Counts from the hook socket.
#[derive(Clone, Debug, Default)]
pub struct HookStats {
    pub socket: hook::SocketStats,
    /// Connections open now whose `hello` was accepted.
    pub connections_registered: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// `fentry` or `tracepoint` (see `capture::mode`).
    pub capture_mode: &'static str,
    pub kernel: Counters,
    pub pipeline: pipeline::Stats,
    pub registry: registry::Stats,
    pub workers_now: u64,
    pub activities_in_flight: u64,
    pub hook: HookStats,
    pub governance: GovernanceStats,
    /// OTLP export, when configured.
    pub otlp: Option<OtlpStats>,
    /// Enforcement before the operation (`--enforce`), when on.
    pub enforcement: Option<super::enforce::StatsSnapshot>,
    /// Activity ends waiting for the ring buffer to be read past them ([`super::order`]).
    pub order: super::order::OrderStats,
}

impl Summary {
    /// The `{"type": "summary", …}` line `run` prints on stderr at exit.
    pub fn to_json(&self) -> Value {
        let r = &self.registry;
        let g = &self.governance;
        let requests: serde_json::Map<String, Value> = g
            .requests
            .by_outcome
            .iter()
            .map(|(outcome, n)| (outcome.to_string(), (*n).into()))
            .collect();
        let mut s = json!({
            "type": "summary",
            "capture_mode": self.capture_mode,
            "workers": r.workers,
            "activities": r.activities,
            "activities_in_flight": self.activities_in_flight,
            "activities_abandoned": r.activities_abandoned,
            "governance_calls_abandoned": r.governance_calls_abandoned,
            "spans_attributed": r.spans_attributed,
            "spans_unattributed": r.unattributed.values().sum::<u64>(),
            "unattributed_reasons": r.unattributed,
            "spans_dropped_over_limit": r.spans_dropped,
            "registrations_refused": r.registrations_refused,
            "worker_settings_refused": r.worker_settings_refused,
            "worker_governors_freed": r.worker_governors_freed,
            "hook_connections": self.hook.socket.connections_accepted,
            "hook_connections_registered": self.hook.connections_registered,
            "hook_connections_refused": self.hook.socket.connections_refused,
            "hook_peers_dropped": self.hook.socket.peers_dropped,
            "hook_closed_without_hello": self.hook.socket.closed_without_hello,
            "records_received": self.pipeline.records_received,
            "unparsed_records": self.pipeline.unparsed_records,
            "unparsed_messages": self.pipeline.unparsed_messages,
            "unparsed_by_protocol": self.pipeline.unparsed_by_protocol,
            "parser_losses": self.pipeline.parser_losses,
            "unrecognised_connections": self.pipeline.unrecognised_connections,
            "resumed": self.pipeline.resumed,
            "resume_failures": self.pipeline.resume_failures,
            "resumed_at_start": self.pipeline.resumed_at_start,
            "tls_probes": self.pipeline.tls_probes,
            "governance": {
                "spool_pending": g.spool_pending, "spool_bytes": g.spool_bytes,
                "spool_dropped": g.spool_dropped, "delivered_from_spool": g.delivered_from_spool,
                "rejected_by_core": g.rejected_by_core, "core_failures": g.core_failures,
                "spool_write_errors": g.spool_write_errors, "spool_retries": g.spool_retries,
                "requests": requests,
                "request_seconds_sum": g.requests.latency_sum_nanos as f64 / 1e9,
                "core_reachable": g.requests.core_reachable,
            },
        });
        if let (Value::Object(s), Ok(Value::Object(k))) =
            (&mut s, serde_json::to_value(self.kernel))
        {
            s.extend(k);
        }
        s["tls_links"] = json!(self.pipeline.tls_links);
        s["ring_queue"] = json!(self.pipeline.ring_queue);
        s["activity_end_order"] = json!(self.order);
        if let Some(o) = &self.otlp {
            s["otlp"] = json!(o);
        }
        if let Some(e) = &self.enforcement {
            s["enforcement"] = json!(e);
        }
        if r.bad_traceparents > 0 {
            s["bad_traceparents"] = r.bad_traceparents.into();
        }
        s
    }

    /// `/metrics`, in the Prometheus text format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut registry = Registry::with_prefix("openbox");
        registry.register_collector(Box::new(Metrics(self.clone())));
        let mut out = String::new();
        // Writing to a String cannot fail, and every name here is valid.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug)]
struct Metrics(Summary);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter with one label, a series per `(value, count)`.
fn labelled(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'static str, u64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in series {
        let labels = [(label, value)];
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
    }
    Ok(())
}

/// A counter family with two labels.
fn labelled2(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: (&str, &str),
    series: impl IntoIterator<Item = ((&'static str, &'static str), u64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for ((a, b), n) in series {
        let set = [(labels.0, a), (labels.1, b)];
        m.encode_family(&set)?
            .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
    }
    Ok(())
}

/// One metric of a [`group`]: its kind and value.
enum Metric<'a> {
    Counter(u64),
    Gauge(u64),
    /// A counter with one label (named first), a series per `(value, count)`.
    Labelled(&'static str, &'a [(&'static str, u64)]),
}

/// The metrics of an optional part of the daemon (enforcement, OTLP export), each
/// `(name, help, metric)`, in order.
fn group(e: &mut DescriptorEncoder, metrics: &[(&str, &str, Metric)]) -> std::fmt::Result {
    for (name, help, metric) in metrics {
        match metric {
            Metric::Counter(v) => counter(e, name, help, *v)?,
            Metric::Gauge(v) => gauge(e, name, help, *v)?,
            Metric::Labelled(label, series) => {
                labelled(e, name, help, label, series.iter().copied())?
            }
        }
    }
    Ok(())
}

impl Collector for Metrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let (k, p, r, g) = (&s.kernel, &s.pipeline, &s.registry, &s.governance);
        let e = &mut e;
        // Capture: the kernel's per-CPU counters summed, then the reader's.
        counter(
            e,
            "events",
            "Records the kernel programs emitted.",
            k.events,
        )?;
        counter(
            e,
            "ringbuf_drops",
            "Records lost because the ring buffer was full.",
            k.ringbuf_drops,
        )?;
        counter(
            e,
            "truncated_calls",
            "Calls whose payload was cut at the capture limit.",
            k.truncated_calls,
        )?;
        counter(
            e,
            "truncated_bytes",
            "Payload bytes not captured because of the capture limit.",
            k.truncated_bytes,
        )?;
        counter(
            e,
            "captured_bytes",
            "Payload bytes captured.",
            k.captured_bytes,
        )?;
        counter(
            e,
            "map_full",
            "Kernel map insertions that failed because the map was full.",
            k.map_full,
        )?;
        counter(
            e,
            "read_failures",
            "User-memory reads that failed in the kernel programs.",
            k.read_failures,
        )?;
        counter(
            e,
            "kernel_read_failures",
            "Kernel-memory reads that failed in the kernel programs.",
            k.kernel_read_failures,
        )?;
        counter(
            e,
            "slot_read_failures",
            "Activity slot reads that failed in the kernel programs.",
            k.slot_read_failures,
        )?;
        counter(
            e,
            "scratch_failures",
            "Kernel programs that found no scratch buffer.",
            k.scratch_failures,
        )?;
        counter(
            e,
            "pause_failures",
            "Processes the kernel could not pause while their TLS probes attached.",
            k.pause_failures,
        )?;
        counter(
            e,
            "watched_hits",
            "Probe hits in watched processes.",
            k.watched_hits,
        )?;
        counter(
            e,
            "unwatched_hits",
            "Probe hits in other processes (filtered out in the kernel).",
            k.unwatched_hits,
        )?;
        counter(
            e,
            "records_received",
            "Ring-buffer records the agent read.",
            p.records_received,
        )?;
        counter(
            e,
            "records_unparsed",
            "Ring-buffer records that did not decode.",
            p.unparsed_records,
        )?;
        counter(
            e,
            "ring_queue_full",
            "Times the queue between the ring buffer's drain thread and the parsers was full (copying then stopped and the ring filled behind it).",
            p.ring_queue.full,
        )?;
        gauge(
            e,
            "ring_queue_peak_bytes",
            "Most bytes of records queued at once between the ring buffer's drain thread and the parsers.",
            p.ring_queue.peak_bytes,
        )?;
        counter(
            e,
            "resume_failures",
            "Paused processes the agent could not resume.",
            p.resume_failures,
        )?;
        counter(
            e,
            "resumed",
            "Processes resumed once the TLS probes of the libssl they opened were attached.",
            p.resumed,
        )?;
        gauge(
            e,
            "tls_probes",
            "libssl uprobes attached now (per watched process).",
            p.tls_probes.probes,
        )?;
        counter(
            e,
            "tls_probes_not_attached",
            "libssl uprobes that could not be attached (each also logged).",
            p.tls_probes.not_attached,
        )?;
        counter(
            e,
            "tls_unwatched_hits",
            "libssl probe runs in processes that are not watched (0 but at a process's exit).",
            k.tls_unwatched_hits,
        )?;
        counter(
            e,
            "io_uring_ops_not_captured",
            "io_uring requests submitted by watched processes: their I/O is not captured.",
            k.io_uring_ops,
        )?;
        counter(
            e,
            "io_uring_data_ops_not_captured",
            "Of the io_uring requests, those that move bytes (read, write, send, recv and their variants).",
            k.io_uring_data_ops,
        )?;
        counter(
            e,
            "resumed_at_start",
            "Processes an earlier agent left stopped (a crash), resumed at this one's start.",
            p.resumed_at_start,
        )?;
        // Parsers.
        labelled(
            e,
            "parser_unparsed_messages",
            "Protocol messages a parser could not make sense of, by protocol.",
            "protocol",
            Protocol::ALL.iter().map(|pr| {
                let n = p
                    .unparsed_by_protocol
                    .get(pr.as_str())
                    .copied()
                    .unwrap_or(0);
                (pr.as_str(), n)
            }),
        )?;
        labelled2(
            e,
            "parser_lost_messages",
            "Protocol messages a parser dropped, by protocol and reason (malformed: bytes it could not parse, or the middle of a message; gap: bytes not captured; unpaired: a response whose request was not seen, or a request whose response could not be told apart; oversize: over the buffer limits).",
            ("protocol", "reason"),
            Protocol::ALL.iter().flat_map(|pr| {
                Loss::ALL.iter().map(move |why| {
                    let n = p
                        .parser_losses
                        .get(pr.as_str())
                        .and_then(|m| m.get(why.as_str()))
                        .copied()
                        .unwrap_or(0);
                    ((pr.as_str(), why.as_str()), n)
                })
            }),
        )?;
        counter(
            e,
            "connections_unrecognised",
            "Connections of no known protocol.",
            p.unrecognised_connections,
        )?;
        counter(
            e,
            "tls_links_ambiguous",
            "Ciphertext writes to a TLS socket no SSL object owned yet, made by a thread with two or more memory-BIO SSL objects waiting for their socket: not used to link (their reads link them).",
            p.tls_links.ambiguous,
        )?;
        counter(
            e,
            "tls_unlinked_calls",
            "libssl calls whose plaintext never found its socket (reported without a connection, seen by no parser).",
            p.tls_links.unlinked_calls,
        )?;
        // Attribution.
        counter(
            e,
            "spans_attributed",
            "Spans attributed to an activity.",
            r.spans_attributed,
        )?;
        labelled(
            e,
            "spans_unattributed",
            "Spans that could not be attributed exactly, by reason.",
            "reason",
            Unattributed::ALL.iter().map(|why| {
                let n = r.unattributed.get(why.as_str()).copied().unwrap_or(0);
                (why.as_str(), n)
            }),
        )?;
        counter(
            e,
            "spans_dropped_over_limit",
            "Spans beyond the per-activity limit (counted, not kept).",
            r.spans_dropped,
        )?;
        counter(e, "activities", "Activities started.", r.activities)?;
        let o = &s.order;
        counter(
            e,
            "activity_ends_proven",
            "Activity ends handled once the ring buffer was read past everything the worker did before sending them.",
            o.activity_ends_proven,
        )?;
        counter(
            e,
            "activity_ends_waited",
            "Of those, ends that waited for a ring-buffer slot another CPU had reserved and not yet committed.",
            o.activity_ends_waited,
        )?;
        counter(
            e,
            "activity_ends_unproven",
            "Activity ends handled when their wait for the ring buffer reached its bound: a late record of the activity is unattributed (after_activity_end).",
            o.activity_ends_unproven,
        )?;
        gauge(
            e,
            "activity_end_wait_max_microseconds",
            "Longest wait of an activity end for the ring buffer.",
            o.activity_end_wait_max_us,
        )?;
        gauge(
            e,
            "activities_in_flight",
            "Activities running now.",
            s.activities_in_flight,
        )?;
        counter(
            e,
            "activities_abandoned",
            "Activities whose worker died before they ended.",
            r.activities_abandoned,
        )?;
        // Hook socket.
        counter(
            e,
            "workers_registered",
            "Worker registrations accepted.",
            r.workers,
        )?;
        gauge(e, "workers", "Workers registered now.", s.workers_now)?;
        counter(
            e,
            "hook_connections",
            "Hook socket connections accepted.",
            s.hook.socket.connections_accepted,
        )?;
        gauge(
            e,
            "hook_connections_registered",
            "Open hook connections whose hello was accepted.",
            s.hook.connections_registered,
        )?;
        counter(
            e,
            "hook_registrations_refused",
            "Hook requests refused (a peer claiming another process, thread or memory).",
            r.registrations_refused,
        )?;
        let h = &s.hook.socket;
        counter(
            e,
            "hook_connections_refused",
            "Hook connections refused: the uid held --max-connections-per-uid already.",
            h.connections_refused,
        )?;
        counter(
            e,
            "hook_peers_dropped",
            "Hook connections dropped because the peer left its replies unread.",
            h.peers_dropped,
        )?;
        counter(
            e,
            "hook_closed_without_hello",
            "Hook connections closed for sending no accepted hello in time.",
            h.closed_without_hello,
        )?;
        counter(
            e,
            "worker_settings_refused",
            "Workers whose own governance settings were refused.",
            r.worker_settings_refused,
        )?;
        counter(
            e,
            "worker_governors_freed",
            "Governors of workers' own settings freed with their last worker.",
            r.worker_governors_freed,
        )?;
        // Governance.
        labelled(
            e,
            "governance_requests",
            "Governance calls (to Core, or the embedded local policy) by outcome.",
            "outcome",
            g.requests.by_outcome.iter().copied(),
        )?;
        let mut h = e.encode_descriptor(
            "governance_request_duration_seconds",
            "Latency of governance calls.",
            None,
            MetricType::Histogram,
        )?;
        h.encode_histogram::<NoLabelSet>(
            g.requests.latency_sum_nanos as f64 / 1e9,
            g.requests.latency_count,
            &g.requests.latency_buckets,
            None,
        )?;
        counter(
            e,
            "governance_core_failures",
            "Governance events Core did not answer.",
            g.core_failures,
        )?;
        counter(
            e,
            "governance_rejected_by_core",
            "Governance events Core refused (4xx; not retried).",
            g.rejected_by_core,
        )?;
        counter(
            e,
            "governance_delivered_from_spool",
            "Spooled governance events delivered.",
            g.delivered_from_spool,
        )?;
        gauge(
            e,
            "spool_events",
            "Governance events waiting in the spool.",
            g.spool_pending,
        )?;
        gauge(
            e,
            "spool_bytes",
            "Bytes waiting in the spool.",
            g.spool_bytes,
        )?;
        counter(
            e,
            "spool_dropped",
            "Governance events dropped because the spool was full.",
            g.spool_dropped,
        )?;
        counter(
            e,
            "spool_write_errors",
            "Governance events lost because the spool could not be written.",
            g.spool_write_errors,
        )?;
        counter(
            e,
            "spool_retries",
            "Deliveries of spooled events Core did not take, each followed by a backoff wait.",
            g.spool_retries,
        )?;
        if let Some(up) = g.requests.core_reachable {
            gauge(
                e,
                "core_reachable",
                "1 when OpenBox Core answered the last call, 0 when it did not.",
                up.into(),
            )?;
        }
        if let Some(f) = &s.enforcement {
            group(
                e,
                &[
                    (
                        "enforce_listeners",
                        "Seccomp listeners held for enforcement (one per filtered worker thread).",
                        Metric::Gauge(f.listeners),
                    ),
                    (
                        "enforce_calls",
                        "Calls the kernel held for enforcement, by how they were answered.",
                        Metric::Labelled(
                            "outcome",
                            &[
                                ("continued", f.continued),
                                ("asked", f.asked),
                                ("cached", f.cached),
                                ("denied", f.denied),
                            ],
                        ),
                    ),
                    (
                        "enforce_held_calls",
                        "Calls the kernel held for enforcement.",
                        Metric::Counter(f.held),
                    ),
                    (
                        "enforce_tls_sends",
                        "Held TLS sends made outside libssl (memory-BIO TLS, asyncio), by whether the plaintext they carry was told exactly (unnamed: decided by the failure policy).",
                        Metric::Labelled(
                            "plaintext",
                            &[("named", f.tls_named), ("unnamed", f.tls_unnamed)],
                        ),
                    ),
                    (
                        "enforce_sends_outside_step",
                        "Held TLS sends carrying what an activity's step encrypted, made outside that step (asyncio's event loop sending a buffered remainder): governed by that activity.",
                        Metric::Counter(f.outside_step),
                    ),
                ],
            )?;
        }
        if let Some(o) = &s.otlp {
            group(
                e,
                &[
                    (
                        "otlp_spans_exported",
                        "Spans the OTLP collector accepted.",
                        Metric::Counter(o.spans_exported),
                    ),
                    (
                        "otlp_spans_dropped",
                        "Spans not exported: the queue was full, or their export failed.",
                        Metric::Labelled(
                            "reason",
                            &[
                                ("queue_full", o.spans_dropped_queue_full),
                                ("export_failed", o.spans_dropped_export_failed),
                            ],
                        ),
                    ),
                    (
                        "otlp_export_failures",
                        "OTLP export requests that failed.",
                        Metric::Counter(o.export_failures),
                    ),
                    (
                        "otlp_queue_spans",
                        "Spans waiting for OTLP export.",
                        Metric::Gauge(o.spans_queued),
                    ),
                ],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_hold_the_summary_values_with_every_label_present() {
        let mut s = Summary::default();
        s.kernel.ringbuf_drops = 3;
        s.kernel.events = 1234;
        s.registry.spans_attributed = 7;
        s.registry.unattributed.insert("no_activity", 2);
        s.pipeline.unparsed_by_protocol.insert("postgres", 5);
        s.pipeline
            .parser_losses
            .entry("http")
            .or_default()
            .insert("unpaired", 2);
        s.governance.requests.by_outcome = vec![("ok", 4), ("timeout", 1)];
        s.governance.requests.latency_buckets = vec![(0.001, 3), (1.0, 1)];
        s.governance.requests.latency_count = 5;
        s.governance.requests.latency_sum_nanos = 31_500_000_000;
        let text = s.to_prometheus();
        for line in [
            "openbox_ringbuf_drops_total 3",
            "openbox_events_total 1234",
            "openbox_spans_attributed_total 7",
            "openbox_spans_unattributed_total{reason=\"no_activity\"} 2",
            "openbox_spans_unattributed_total{reason=\"unknown_activity\"} 0",
            "openbox_parser_unparsed_messages_total{protocol=\"postgres\"} 5",
            "openbox_parser_unparsed_messages_total{protocol=\"mongo\"} 0",
            "openbox_parser_lost_messages_total{protocol=\"http\",reason=\"unpaired\"} 2",
            "openbox_parser_lost_messages_total{protocol=\"redis\",reason=\"gap\"} 0",
            "openbox_governance_requests_total{outcome=\"timeout\"} 1",
            "openbox_governance_request_duration_seconds_bucket{le=\"0.001\"} 3",
            "openbox_governance_request_duration_seconds_bucket{le=\"1\"} 4",
            "openbox_governance_request_duration_seconds_bucket{le=\"+Inf\"} 5",
            "openbox_governance_request_duration_seconds_sum 31.5",
            "openbox_governance_request_duration_seconds_count 5",
            "openbox_spool_events 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Without Core, reachability is not a question.
        assert!(!text.contains("core_reachable"), "{text}");
        s.governance.requests.core_reachable = Some(false);
        assert!(s
            .to_prometheus()
            .lines()
            .any(|l| l == "openbox_core_reachable 0"));
        // Enforcement figures only when `--enforce` is on.
        assert!(!text.contains("enforce"), "{text}");
        assert!(s.to_json().get("enforcement").is_none());
        s.enforcement = Some(crate::daemon::enforce::StatsSnapshot {
            listeners: 2,
            held: 9,
            continued: 5,
            asked: 2,
            cached: 1,
            denied: 1,
            tls_named: 3,
            tls_unnamed: 1,
            outside_step: 4,
        });
        let text = s.to_prometheus();
        for line in [
            "openbox_enforce_listeners 2",
            "openbox_enforce_calls_total{outcome=\"continued\"} 5",
            "openbox_enforce_calls_total{outcome=\"denied\"} 1",
            "openbox_enforce_held_calls_total 9",
            "openbox_enforce_tls_sends_total{plaintext=\"unnamed\"} 1",
            "openbox_enforce_sends_outside_step_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        let j = s.to_json();
        assert_eq!(j["enforcement"]["denied"], 1);
        assert_eq!(j["enforcement"]["asked"], 2);
        assert_eq!(j["ringbuf_drops"], 3);
        assert_eq!(j["unparsed_by_protocol"]["postgres"], 5);
        assert_eq!(j["parser_losses"]["http"]["unpaired"], 2);
        assert_eq!(j["governance"]["requests"]["ok"], 4);
    }
}
