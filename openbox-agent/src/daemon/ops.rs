//! The operations endpoints of `run --metrics-addr`: `/metrics`, `/healthz`, `/readyz`.
//!
//! A minimal HTTP/1.1 responder on tokio rather than a web framework: the agent has no
//! HTTP server dependency (hyper is in the tree only inside the Core client), and three
//! fixed GET routes answered with `Connection: close` are all a Prometheus scraper or a
//! kubelet probe needs. Every request is read with a size and time bound, so a client
//! cannot hold the agent's memory or tasks.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

use super::status::{self, Summary};

/// Longest request head read; a probe or scrape sends a few hundred bytes.
const MAX_HEAD: usize = 8192;
/// A client that has not sent its request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A scrape asks the daemon's loop for a [`Summary`] (the loop owns the counters).
pub type ScrapeTx = mpsc::Sender<oneshot::Sender<Summary>>;

/// Ready: the kernel programs are attached and the hook socket serves. Shared by the
/// daemon (which sets it) and the endpoints (which report it).
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Binds `--metrics-addr` (HOST:PORT; port 0 picks one, reported on stderr).
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("metrics address {addr:?} (--metrics-addr, OPENBOX_METRICS_ADDR or metrics_addr): cannot listen there; give HOST:PORT with a free port, e.g. 0.0.0.0:9464")
    })
}

/// Answers the endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, ready: Arc<Readiness>, scrape: ScrapeTx) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a metrics connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (ready, scrape) = (ready.clone(), scrape.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &ready, &scrape).await {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn answer(mut stream: TcpStream, ready: &Readiness, scrape: &ScrapeTx) -> Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .context("no request within the read timeout")??;
    let (method, path) = match parse_request_line(&head) {
        Some(r) => r,
        None => {
            return respond(
                &mut stream,
                false,
                Response::text("400 Bad Request", "bad request\n"),
            )
            .await
        }
    };
    let head_only = method == "HEAD";
    let response = if method != "GET" && !head_only {
        Response::text("405 Method Not Allowed", "only GET and HEAD\n")
    } else {
        route(path, ready, scrape).await
    };
    respond(&mut stream, head_only, response).await
}

async fn route(path: &str, ready: &Readiness, scrape: &ScrapeTx) -> Response {
    match path {
        "/healthz" => Response::text("200 OK", "ok\n"),
        "/readyz" if ready.get() => Response::text("200 OK", "ready\n"),
        "/readyz" => Response::text(
            "503 Service Unavailable",
            "not ready: the kernel programs are not attached or the hook socket is not serving yet\n",
        ),
        "/metrics" => {
            let (tx, rx) = oneshot::channel();
            // Before the daemon's loop runs (programs still loading) and once it stops,
            // nobody answers: the counters do not exist yet, or no longer.
            let summary = if ready.get() && scrape.try_send(tx).is_ok() {
                rx.await.ok()
            } else {
                None
            };
            match summary {
                Some(s) => Response {
                    status: "200 OK",
                    content_type: status::CONTENT_TYPE,
                    body: s.to_prometheus(),
                },
                None => Response::text(
                    "503 Service Unavailable",
                    "not ready: no counters before the kernel programs are attached\n",
                ),
            }
        }
        _ => Response::text(
            "404 Not Found",
            "not found: the endpoints are /metrics, /healthz and /readyz\n",
        ),
    }
}

/// Reads up to the blank line ending the request head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("connection closed before the request ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            anyhow::bail!("request head longer than {MAX_HEAD} bytes");
        }
    }
}

/// `GET /path?query HTTP/1.1` → ("GET", "/path").
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

async fn respond(stream: &mut TcpStream, head_only: bool, r: Response) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(r.body.as_bytes()).await?;
    }
    stream.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_answer_before_and_after_ready_and_metrics_come_from_the_loop() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(Readiness::default());
        let (tx, mut rx) = mpsc::channel(4);
        let server = tokio::spawn(serve(listener, ready.clone(), tx));
        let req = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n");

        assert!(get(addr, &req("/healthz"))
            .await
            .starts_with("HTTP/1.1 200 OK"));
        let r = get(addr, &req("/readyz")).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");

        ready.set(true);
        assert!(get(addr, &req("/readyz?verbose"))
            .await
            .starts_with("HTTP/1.1 200 OK"));
        let loop_ = tokio::spawn(async move {
            let reply: oneshot::Sender<Summary> = rx.recv().await.unwrap();
            let mut s = Summary::default();
            s.kernel.events = 42;
            let _ = reply.send(s);
        });
        let r = get(addr, &req("/metrics")).await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.lines().any(|l| l == "openbox_events_total 42"), "{r}");
        loop_.await.unwrap();

        assert!(get(addr, &req("/nope")).await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        assert!(get(addr, "garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        server.abort();
    }
}
