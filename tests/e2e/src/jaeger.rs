//! Jaeger (v2) as the OTLP backend of the export tests: OTLP receivers over gRPC and
//! HTTP, in-memory storage, and the query API the tests read traces back from.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use openbox_testkit::{env_path, free_port, Proc};
use serde_json::Value;

use crate::START_TIMEOUT;

pub struct Jaeger {
    _proc: Proc,
    pub otlp_grpc: u16,
    pub otlp_http: u16,
    pub query: u16,
}

/// One span as the query API gives it back.
#[derive(Clone, Debug)]
pub struct TraceSpan {
    pub span_id: String,
    pub trace_id: String,
    /// The `CHILD_OF` reference's span.
    pub parent: Option<String>,
    pub name: String,
    pub service: String,
    pub tags: BTreeMap<String, Value>,
    /// `FOLLOWS_FROM` references and links to other traces: (trace id, span id).
    pub links: Vec<(String, String)>,
    /// The resource's (process's) attributes.
    pub process: BTreeMap<String, Value>,
}

impl TraceSpan {
    pub fn tag(&self, key: &str) -> Option<&Value> {
        self.tags.get(key)
    }

    pub fn tag_str(&self, key: &str) -> &str {
        self.tags.get(key).and_then(Value::as_str).unwrap_or("")
    }
}

impl Jaeger {
    /// Starts `jaeger --config` with every port chosen free, and waits until it is
    /// healthy.
    pub fn start(logs: &Path) -> Jaeger {
        let bin = env_path("OPENBOX_JAEGER_BIN");
        let (otlp_grpc, otlp_http, query, query_grpc, health) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let config = format!(
            r#"service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
        );
        let path = logs.join("jaeger.yaml");
        fs::write(&path, config).expect("writing the Jaeger config");
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&path);
        let mut proc = Proc::spawn("jaeger", cmd, logs);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "Jaeger exited ({status}) before it was healthy\nstderr: {}",
                    proc.stderr_tail()
                );
            }
            let healthy = get(health, "/status").is_ok_and(|(code, _)| code == 200);
            // The query API answers once storage is up.
            if healthy && get(query, "/api/services").is_ok_and(|(code, _)| code == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Jaeger was not healthy within {START_TIMEOUT:?}\nstderr: {}",
                proc.stderr_tail()
            );
            thread::sleep(Duration::from_millis(200));
        }
        Jaeger {
            _proc: proc,
            otlp_grpc,
            otlp_http,
            query,
        }
    }

    /// The trace's spans as the query API holds them now (none when it has no such
    /// trace).
    pub fn trace(&self, trace_id: &str) -> Vec<TraceSpan> {
        let (code, body) = get(self.query, &format!("/api/traces/{trace_id}"))
            .unwrap_or_else(|e| panic!("querying Jaeger for trace {trace_id}: {e}"));
        if code == 404 {
            return Vec::new();
        }
        assert_eq!(
            code, 200,
            "Jaeger answered {code} for trace {trace_id}: {body}"
        );
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Jaeger's answer is not JSON ({e}): {body}"));
        let mut out = Vec::new();
        for t in v["data"].as_array().into_iter().flatten() {
            let processes = &t["processes"];
            for s in t["spans"].as_array().into_iter().flatten() {
                let refs = s["references"].as_array().cloned().unwrap_or_default();
                let str_of = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
                let parent = refs
                    .iter()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .map(|r| str_of(r, "spanID"));
                let links = refs
                    .iter()
                    .filter(|r| r["refType"] != "CHILD_OF")
                    .map(|r| (str_of(r, "traceID"), str_of(r, "spanID")))
                    .collect();
                let process = &processes[s["processID"].as_str().unwrap_or("")];
                out.push(TraceSpan {
                    span_id: str_of(s, "spanID"),
                    trace_id: str_of(s, "traceID"),
                    parent,
                    name: str_of(s, "operationName"),
                    service: str_of(process, "serviceName"),
                    tags: tags(&s["tags"]),
                    links,
                    process: tags(&process["tags"]),
                });
            }
        }
        out
    }

    /// Polls the trace until `done` holds for its spans (the collector batches and
    /// stores asynchronously), or fails the test with what it held.
    pub fn wait_trace(
        &self,
        trace_id: &str,
        what: &str,
        done: impl Fn(&[TraceSpan]) -> bool,
    ) -> Vec<TraceSpan> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                return spans;
            }
            if Instant::now() > deadline {
                panic!(
                    "Jaeger's trace {trace_id} does not hold {what} after 60 s; it holds {} spans:\n{}",
                    spans.len(),
                    show(&spans)
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

/// One line per span: name, ids, parent, service.
pub fn show(spans: &[TraceSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} [{}] span {} parent {:?} ({})",
                s.name, s.service, s.span_id, s.parent, s.trace_id
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tags(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| Some((t["key"].as_str()?.to_string(), t["value"].clone())))
        .collect()
}

/// `GET path` over HTTP/1.0 (no chunked answer): (status, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {out}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head}")))?;
    Ok((code, body.to_string()))
}
