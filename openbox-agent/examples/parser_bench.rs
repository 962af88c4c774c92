//! Parser throughput on recorded traffic: replays `openbox-agent trace --raw --json`
//! captures (connections and their data records) through protocol detection, the
//! parsers and the span builder, on one core, and prints MB/s and spans/s.
//!
//! `parser_bench [--seconds S] FILE.jsonl...` (one capture per protocol; the file name
//! is the label). Run by `cargo xtask bench`.

use std::time::{Duration, Instant};

use openbox_agent::{
    capture::{clock::Clock, event::Addr},
    conn::{Direction, Record},
    span::{SpanBuilder, SpanConfig},
};
use serde_json::Value;

fn die(msg: &str) -> ! {
    eprintln!("parser_bench: {msg}");
    std::process::exit(2)
}

fn addr(v: &Value) -> Option<Addr> {
    v.as_str().and_then(|s| s.parse().ok()).map(Addr::Inet)
}

/// The records of a raw capture that the span builder consumes.
fn load(path: &str) -> Vec<Record> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        let conn = v["conn"].as_str().map(str::to_string);
        match v["type"].as_str() {
            Some(t @ ("connect" | "accept")) => out.push(Record::Connect {
                ts: u("ts"),
                accept: t == "accept",
                pid: u("pid") as u32,
                tid: u("tid") as u32,
                fd: v["fd"].as_i64().unwrap_or(-1) as i32,
                conn: conn.unwrap_or_default(),
                peer: addr(&v["peer"]),
                local: addr(&v["local"]),
                attr: Default::default(),
            }),
            Some("data") => out.push(Record::Data {
                ts: u("ts"),
                pid: u("pid") as u32,
                tid: u("tid") as u32,
                fd: v["fd"].as_i64().unwrap_or(-1) as i32,
                conn,
                peer: addr(&v["peer"]),
                tls: v["tls"].as_bool().unwrap_or(false),
                direction: if v["direction"] == "egress" {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                via: "replay",
                seq: u("seq"),
                truncated: u("truncated"),
                data: base64::engine::general_purpose::STANDARD
                    .decode(v["data_b64"].as_str().unwrap_or(""))
                    .unwrap_or_default(),
                attr: Default::default(),
                from_file: v["from_file"].as_str().map(str::to_string),
                midstream: v["midstream"].as_bool().unwrap_or(false),
            }),
            Some("close") => out.push(Record::Close {
                ts: u("ts"),
                pid: u("pid") as u32,
                fd: v["fd"].as_i64().unwrap_or(-1) as i32,
                conn: conn.unwrap_or_default(),
                peer: addr(&v["peer"]),
                bytes_sent: u("bytes_sent"),
                bytes_received: u("bytes_received"),
                tls: v["tls"].as_bool().unwrap_or(false),
            }),
            _ => {}
        }
    }
    out
}

fn main() {
    let mut seconds = 2.0f64;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| die("--seconds needs a number"))
            }
            _ => files.push(a),
        }
    }
    if files.is_empty() {
        die("usage: parser_bench [--seconds S] FILE.jsonl...");
    }
    println!(
        "{:<12} {:>10} {:>8} {:>12} {:>12}",
        "capture", "bytes", "spans", "MB/s", "spans/s"
    );
    for path in &files {
        let records = load(path);
        let bytes: usize = records
            .iter()
            .map(|r| {
                if let Record::Data { data, .. } = r {
                    data.len()
                } else {
                    0
                }
            })
            .sum();
        let label = std::path::Path::new(path)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        // Runs of about 0.2 s; the median run is reported.
        let mut rates = Vec::new();
        let mut spans_per_pass = 0;
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < deadline || rates.len() < 3 {
            let start = Instant::now();
            let mut passes = 0u64;
            while start.elapsed() < Duration::from_millis(200) {
                let mut builder = SpanBuilder::new(SpanConfig::default(), Clock::new());
                let mut spans = Vec::new();
                for r in &records {
                    builder.handle(r, &mut spans);
                }
                builder.finish(u64::MAX / 2, &mut spans);
                spans_per_pass = spans.len();
                std::hint::black_box(&spans);
                passes += 1;
            }
            rates.push(passes as f64 / start.elapsed().as_secs_f64());
        }
        rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let passes_per_s = rates[rates.len() / 2];
        println!(
            "{label:<12} {bytes:>10} {spans_per_pass:>8} {:>12.1} {:>12.0}",
            passes_per_s * bytes as f64 / 1e6,
            passes_per_s * spans_per_pass as f64
        );
    }
}
