//! OTLP trace export: the spans the agent builds, sent to an OpenTelemetry collector (or
//! any OTLP backend) over gRPC or HTTP/protobuf.
//!
//! The spans keep the ids Core sees, so they are built as [`SpanData`] here and handed to
//! the `opentelemetry-otlp` exporter directly, not made through a tracer (which would
//! choose its own ids). The capture loop and governance never wait for the collector:
//! [`Exporter::send`] only puts the span in a bounded queue, a task of its own batches
//! and exports, and a full queue or a failed export drops spans with a count (in the
//! summary and `/metrics`) and a log line when exporting starts or stops failing.

mod http;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{
    tonic_types::{
        metadata::MetadataMap,
        transport::{Certificate, ClientTlsConfig},
    },
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The `[otlp]` table of the config file, and what the command-line flags and the
/// standard `OTEL_*` variables give (the flags' names, `_` for `-`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSettings {
    /// The collector's base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`): HTTP/protobuf sends to
    /// `<endpoint>/v1/traces`, gRPC to the address itself.
    pub endpoint: Option<String>,
    /// The full URL for traces (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), used as it is.
    pub traces_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (`OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub protocol: Option<String>,
    /// Headers sent with every export, `name=value` (e.g. an API key).
    pub headers: Option<Vec<String>>,
    /// `service.name` of every span's resource (`OTEL_SERVICE_NAME`).
    pub service_name: Option<String>,
    /// More resource attributes, `key=value` (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: Option<Vec<String>>,
    /// An extra CA bundle (PEM) trusted for the collector (`OTEL_EXPORTER_OTLP_CERTIFICATE`).
    pub ca_file: Option<PathBuf>,
    /// Most spans waiting for export; more are dropped and counted.
    pub queue_size: Option<usize>,
}

/// Spans waiting for export, by default: with bodies kept up to the body limit, this
/// bounds what an unreachable collector can make the agent hold.
pub const DEFAULT_QUEUE_SIZE: usize = 4096;
/// Spans per export request.
const BATCH_SIZE: usize = 512;
/// How long the first span of a batch waits for others.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// One export request, retries included, gives up after this (the exporter's own
/// timeout, `OTEL_EXPORTER_OTLP_TIMEOUT`, applies to each attempt).
const EXPORT_DEADLINE: Duration = Duration::from_secs(30);
/// At exit, what is still queued gets this long to be sent.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Grpc,
    HttpProtobuf,
}

/// Resolved settings: export is on when an endpoint is known.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// Where spans go, as the exporter takes it (HTTP: the full `/v1/traces` URL).
    pub endpoint: String,
    pub wire: Wire,
    pub headers: Vec<(String, String)>,
    /// The resource every span shares (`service.name` and the configured attributes).
    pub resource: Vec<(String, String)>,
    pub ca_file: Option<PathBuf>,
    pub queue_size: usize,
}

impl OtlpSettings {
    /// The command line's settings over the file's (each field: the first one given).
    pub fn or(self, file: OtlpSettings) -> OtlpSettings {
        OtlpSettings {
            endpoint: self.endpoint.or(file.endpoint),
            traces_endpoint: self.traces_endpoint.or(file.traces_endpoint),
            protocol: self.protocol.or(file.protocol),
            headers: self.headers.or(file.headers),
            service_name: self.service_name.or(file.service_name),
            resource_attributes: self.resource_attributes.or(file.resource_attributes),
            ca_file: self.ca_file.or(file.ca_file),
            queue_size: self.queue_size.or(file.queue_size),
        }
    }

    /// `None` when no endpoint is set: nothing is exported.
    pub fn resolve(self) -> Result<Option<OtlpConfig>> {
        let wire = match self.protocol.as_deref().map(str::trim) {
            None | Some("") | Some("http/protobuf") => Wire::HttpProtobuf,
            Some("grpc") => Wire::Grpc,
            Some(other) => bail!(
                "OTLP protocol {other:?} is not supported: use `grpc` or `http/protobuf` (--otlp-protocol, OTEL_EXPORTER_OTLP_PROTOCOL)"
            ),
        };
        let traces = self.traces_endpoint.filter(|e| !e.trim().is_empty());
        let base = self.endpoint.filter(|e| !e.trim().is_empty());
        let endpoint = match (traces, base) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(b)) => match wire {
                Wire::Grpc => b.trim().to_string(),
                // OTLP/HTTP: the signal's path is appended to the base URL.
                Wire::HttpProtobuf => format!("{}/v1/traces", b.trim().trim_end_matches('/')),
            },
            (None, None) => return Ok(None),
        };
        let url = reqwest::Url::parse(&endpoint).map_err(|e| {
            anyhow!("OTLP endpoint {endpoint:?} is not a URL ({e}): give http://HOST:PORT or https://HOST:PORT")
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("OTLP endpoint {endpoint:?}: the scheme must be http or https (https for TLS)");
        }
        let headers = self
            .headers
            .unwrap_or_default()
            .iter()
            .map(|h| pair(h, "OTLP header (--otlp-header)"))
            .collect::<Result<Vec<_>>>()?;
        let mut resource = vec![(
            "service.name".to_string(),
            self.service_name
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "openbox-agent".into()),
        )];
        for a in self.resource_attributes.unwrap_or_default() {
            let (k, v) = pair(&a, "resource attribute (--resource-attribute)")?;
            // service.name has its own setting, which wins.
            if k != "service.name" {
                resource.push((k, v));
            }
        }
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            if !resource.iter().any(|(k, _)| k == "host.name") {
                resource.push(("host.name".into(), host.trim().to_string()));
            }
        }
        let queue_size = self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        if queue_size == 0 {
            bail!("the OTLP queue size (--otlp-queue-size) must be at least 1");
        }
        Ok(Some(OtlpConfig {
            endpoint,
            wire,
            headers,
            resource,
            ca_file: self.ca_file,
            queue_size,
        }))
    }
}

/// `key=value`, the value percent-decoded (as `OTEL_EXPORTER_OTLP_HEADERS` and
/// `OTEL_RESOURCE_ATTRIBUTES` write them).
fn pair(text: &str, what: &str) -> Result<(String, String)> {
    let (k, v) = text
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| anyhow!("{what} {text:?}: write it as key=value"))?;
    Ok((k.trim().to_string(), percent_decode(v.trim())))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied(), b.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The resource attributes particular to a span (its process, its container); the
/// configured ones are added at export. Spans of equal resources go in one group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resource(pub Vec<KeyValue>);

impl Resource {
    pub fn new(attributes: Vec<KeyValue>) -> Resource {
        Resource(attributes)
    }

    fn key(&self) -> String {
        self.0
            .iter()
            .map(|kv| format!("{}={}\u{1}", kv.key, kv.value))
            .collect()
    }
}

/// The instrumentation scope of every exported span.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("openbox-agent")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// What export came to, for the summary and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OtlpStats {
    /// Spans the collector accepted.
    pub spans_exported: u64,
    /// Spans dropped because the queue was full (the collector is slow or unreachable).
    pub spans_dropped_queue_full: u64,
    /// Spans dropped because their export failed (refused, unreachable, timed out).
    pub spans_dropped_export_failed: u64,
    /// Export requests that failed.
    pub export_failures: u64,
    /// Spans waiting now.
    pub spans_queued: u64,
}

impl OtlpStats {
    pub fn spans_dropped(&self) -> u64 {
        self.spans_dropped_queue_full + self.spans_dropped_export_failed
    }
}

#[derive(Debug, Default)]
struct Counts {
    exported: AtomicU64,
    queue_full: AtomicU64,
    failed: AtomicU64,
    failures: AtomicU64,
    queued: AtomicU64,
    /// The last export failed (the next success is logged).
    failing: AtomicBool,
}

struct Item {
    resource: Resource,
    span: SpanData,
}

/// The sending end: cheap to clone, never waits.
#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Item>,
    counts: Arc<Counts>,
}

/// Ends export: [`Done::finish`] sends what is queued (within a bound) and stops.
pub struct Done {
    task: tokio::task::JoinHandle<()>,
    counts: Arc<Counts>,
    closing: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    /// Builds the exporter and starts the export task (inside a tokio runtime). The
    /// collector is not contacted yet: an unreachable one shows in the counts.
    pub fn start(cfg: &OtlpConfig) -> Result<(Exporter, Done)> {
        let inner = build(cfg)?;
        let base: Vec<KeyValue> = cfg
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let counts = Arc::new(Counts::default());
        let closing = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(export_loop(
            inner,
            base,
            rx,
            counts.clone(),
            closing.clone(),
        ));
        crate::logging::announce(format_args!(
            "exporting spans over OTLP ({}) to {}",
            match cfg.wire {
                Wire::Grpc => "gRPC",
                Wire::HttpProtobuf => "HTTP/protobuf",
            },
            cfg.endpoint
        ));
        Ok((
            Exporter {
                tx,
                counts: counts.clone(),
            },
            Done {
                task,
                counts,
                closing,
            },
        ))
    }

    /// Queues a span; a full queue drops it (counted).
    pub fn send(&self, resource: Resource, span: SpanData) {
        match self.tx.try_send(Item { resource, span }) {
            Ok(()) => {
                self.counts.queued.fetch_add(1, Ordering::Relaxed);
            }
            // Full, or closed at exit.
            Err(_) => {
                if self.counts.queue_full.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!("the OTLP export queue is full (the collector is slow or unreachable): spans are dropped and counted (otlp spans_dropped_queue_full)");
                }
            }
        }
    }

    pub fn stats(&self) -> OtlpStats {
        self.counts.stats()
    }
}

impl Counts {
    fn stats(&self) -> OtlpStats {
        OtlpStats {
            spans_exported: self.exported.load(Ordering::Relaxed),
            spans_dropped_queue_full: self.queue_full.load(Ordering::Relaxed),
            spans_dropped_export_failed: self.failed.load(Ordering::Relaxed),
            export_failures: self.failures.load(Ordering::Relaxed),
            spans_queued: self.queued.load(Ordering::Relaxed),
        }
    }
}

impl Done {
    /// Exports what is queued, waiting at most [`FLUSH_AT_EXIT`]; what is left is
    /// counted as dropped, and so is whatever is sent afterwards.
    pub async fn finish(mut self) -> OtlpStats {
        self.closing.notify_one();
        if tokio::time::timeout(FLUSH_AT_EXIT, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            // Cancelled at its next poll: then its queue is gone, and later sends fail.
            let _ = (&mut self.task).await;
            let left = self.counts.queued.swap(0, Ordering::Relaxed);
            self.counts.failed.fetch_add(left, Ordering::Relaxed);
            if left > 0 {
                tracing::warn!(
                    spans = left,
                    "the OTLP collector did not take the last spans before exit: dropped"
                );
            }
        }
        self.counts.stats()
    }
}

fn build(cfg: &OtlpConfig) -> Result<opentelemetry_otlp::SpanExporter> {
    let ca = match &cfg.ca_file {
        Some(path) => Some(std::fs::read(path).with_context(|| {
            format!(
                "reading the OTLP collector's CA file {} (--otlp-ca-file)",
                path.display()
            )
        })?),
        None => None,
    };
    let retry = RetryPolicy::recommended().with_max_retries(2);
    let built = match cfg.wire {
        Wire::Grpc => {
            let mut headers = ::http::HeaderMap::new();
            for (k, v) in &cfg.headers {
                let name = ::http::HeaderName::try_from(k.to_ascii_lowercase())
                    .map_err(|e| anyhow!("OTLP header name {k:?}: {e}"))?;
                let value = ::http::HeaderValue::try_from(v.as_str())
                    .map_err(|e| anyhow!("OTLP header {k:?}: {e}"))?;
                headers.insert(name, value);
            }
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_protocol(Protocol::Grpc)
                .with_metadata(MetadataMap::from_headers(headers))
                .with_retry_policy(retry);
            if cfg.endpoint.starts_with("https:") {
                let mut tls = ClientTlsConfig::new().with_native_roots();
                if let Some(pem) = &ca {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                b = b.with_tls_config(tls);
            }
            b.build()
        }
        Wire::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(cfg.endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(http::Client::new(ca.as_deref())?)
            .with_headers(cfg.headers.iter().cloned().collect())
            .with_retry_policy(retry)
            .build(),
    };
    built.map_err(|e| anyhow!("setting up OTLP export to {}: {e}", cfg.endpoint))
}

async fn export_loop(
    mut inner: opentelemetry_otlp::SpanExporter,
    base: Vec<KeyValue>,
    mut rx: mpsc::Receiver<Item>,
    counts: Arc<Counts>,
    closing: Arc<tokio::sync::Notify>,
) {
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH_SIZE);
    loop {
        let first = tokio::select! {
            first = rx.recv() => first,
            _ = closing.notified() => None,
        };
        let Some(first) = first else {
            // The end: what is queued now goes out, in full batches.
            rx.close();
            while let Some(item) = rx.recv().await {
                batch.push(item);
                if batch.len() == BATCH_SIZE {
                    export(&mut inner, &base, std::mem::take(&mut batch), &counts).await;
                }
            }
            if !batch.is_empty() {
                export(&mut inner, &base, std::mem::take(&mut batch), &counts).await;
            }
            break;
        };
        batch.push(first);
        let deadline = tokio::time::sleep(BATCH_DELAY);
        tokio::pin!(deadline);
        let mut closed = false;
        while batch.len() < BATCH_SIZE {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => batch.push(item),
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = &mut deadline => break,
            }
        }
        export(&mut inner, &base, std::mem::take(&mut batch), &counts).await;
        if closed {
            break;
        }
    }
    let _ = inner.shutdown();
}

/// One batch, one request per distinct resource.
async fn export(
    inner: &mut opentelemetry_otlp::SpanExporter,
    base: &[KeyValue],
    batch: Vec<Item>,
    counts: &Counts,
) {
    let mut groups: BTreeMap<String, (Resource, Vec<SpanData>)> = BTreeMap::new();
    for Item { resource, span } in batch {
        groups
            .entry(resource.key())
            .or_insert_with(|| (resource, Vec::new()))
            .1
            .push(span);
    }
    for (_, (resource, spans)) in groups {
        let n = spans.len() as u64;
        let attrs = base.iter().cloned().chain(resource.0);
        inner.set_resource(
            &opentelemetry_sdk::Resource::builder_empty()
                .with_attributes(attrs)
                .build(),
        );
        let result = tokio::time::timeout(EXPORT_DEADLINE, inner.export(spans)).await;
        counts.queued.fetch_sub(n, Ordering::Relaxed);
        match result {
            Ok(Ok(())) => {
                counts.exported.fetch_add(n, Ordering::Relaxed);
                if counts.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("OTLP export works again");
                }
            }
            failed => {
                counts.failed.fetch_add(n, Ordering::Relaxed);
                counts.failures.fetch_add(1, Ordering::Relaxed);
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {EXPORT_DEADLINE:?}"),
                };
                if !counts.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(spans = n, "OTLP export failed: {why}; spans are dropped and counted until it works again");
                } else {
                    tracing::debug!(spans = n, "OTLP export failed: {why}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    /// A collector that takes connections and never answers: the worst a network can do.
    #[tokio::test]
    async fn an_unreachable_collector_never_holds_up_the_sender_and_every_drop_is_counted() {
        let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = blackhole.local_addr().unwrap().port();
        let cfg = OtlpConfig {
            endpoint: format!("http://127.0.0.1:{port}/v1/traces"),
            wire: Wire::HttpProtobuf,
            headers: Vec::new(),
            resource: vec![("service.name".into(), "test".into())],
            ca_file: None,
            queue_size: 16,
        };
        let (exporter, done) = Exporter::start(&cfg).unwrap();
        let now = SystemTime::now();
        // `send` never waits: on this single-threaded runtime the export task cannot
        // even run until the loop is over.
        for i in 0..1000u64 {
            let span = crate::export::tree::command_span(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                &format!("{:016x}", i + 1),
                "cmd",
                1,
                now,
                now,
                None,
            );
            exporter.send(Resource::default(), span);
        }
        let s = exporter.stats();
        assert_eq!((s.spans_queued, s.spans_dropped_queue_full), (16, 984));
        assert_eq!(s.spans_exported, 0);
        let s = done.finish().await;
        assert_eq!(s.spans_exported, 0);
        assert_eq!(s.spans_queued, 0);
        assert_eq!(s.spans_dropped(), 1000, "{s:?}");
        // After the end, a span is dropped and counted too.
        exporter.send(
            Resource::default(),
            crate::export::tree::command_span(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "00000000000003e9",
                "cmd",
                1,
                now,
                now,
                None,
            ),
        );
        assert_eq!(exporter.stats().spans_dropped(), 1001);
        drop(blackhole);
    }

    fn settings(endpoint: &str) -> OtlpSettings {
        OtlpSettings {
            endpoint: Some(endpoint.into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_http_endpoint_gets_the_traces_path_the_grpc_one_does_not() {
        let c = settings("http://collector:4318/")
            .resolve()
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.wire, Wire::HttpProtobuf);
        let c = OtlpSettings {
            protocol: Some("grpc".into()),
            ..settings("https://collector:4317")
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.wire),
            ("https://collector:4317", Wire::Grpc)
        );
        let c = OtlpSettings {
            traces_endpoint: Some("http://c:4318/custom".into()),
            ..settings("http://collector:4318")
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://c:4318/custom");
        assert!(OtlpSettings::default().resolve().unwrap().is_none());
    }

    #[test]
    fn bad_settings_say_what_to_write() {
        let e = OtlpSettings {
            protocol: Some("http/json".into()),
            ..settings("http://c:4318")
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.contains("`grpc` or `http/protobuf`"), "{e}");
        let e = settings("collector:4318")
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("http or https"), "{e}");
        let e = OtlpSettings {
            headers: Some(vec!["novalue".into()]),
            ..settings("http://c:4318")
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn resource_attributes_are_percent_decoded_and_service_name_has_its_own_setting() {
        let c = OtlpSettings {
            service_name: Some("agents".into()),
            resource_attributes: Some(vec![
                "deployment.environment=prod%20eu".into(),
                "service.name=ignored".into(),
            ]),
            ..settings("http://c:4318")
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!(c.resource[0], ("service.name".into(), "agents".into()));
        assert!(c
            .resource
            .contains(&("deployment.environment".into(), "prod eu".into())));
        assert!(!c.resource.iter().any(|(_, v)| v == "ignored"));
    }
}
