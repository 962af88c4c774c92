//! Test helpers: a throwaway directory, and a tiny in-process HTTP(S) server with canned,
//! switchable answers so timeouts, bad bodies and closed connections are real.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use openbox_testkit::TempDir;
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    task::{JoinHandle, JoinSet},
};

use crate::span::{Span, Status};

/// A finished span named `name` with these attributes (an object), made by no one in
/// particular: for tests of what reads spans (the local policy, governance events).
pub fn span(name: &str, attributes: Value) -> Span {
    Span {
        span_id: "00000000000000a1".into(),
        trace_id: "0".repeat(32),
        parent_span_id: None,
        name: name.into(),
        kind: "CLIENT",
        start_time: 1_000,
        end_time: 2_000,
        duration_ns: Some(1_000),
        attributes: match attributes {
            Value::Object(m) => m,
            _ => Default::default(),
        },
        status: Status {
            code: Default::default(),
            description: None,
        },
        events: Vec::new(),
        activity_id: None,
        request_body: None,
        response_body: None,
        request_headers: None,
        response_headers: None,
        pid: 0,
        tid: 0,
        attr: Default::default(),
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One canned answer.
#[derive(Clone, Debug)]
pub struct Canned {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    delay: Duration,
    close: bool,
}

impl Canned {
    pub fn json(status: u16, v: Value) -> Canned {
        Canned::text(status, &v.to_string()).header("Content-Type", "application/json")
    }

    pub fn text(status: u16, body: &str) -> Canned {
        Canned {
            status,
            body: body.as_bytes().to_vec(),
            headers: vec![],
            delay: Duration::ZERO,
            close: false,
        }
    }

    /// Close the connection without answering.
    pub fn close() -> Canned {
        Canned {
            close: true,
            ..Canned::text(0, "")
        }
    }

    pub fn delayed(mut self, d: Duration) -> Canned {
        self.delay = d;
        self
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn header(mut self, k: &str, v: &str) -> Canned {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = Arc<Mutex<Box<dyn Fn(&Request) -> Canned + Send + Sync>>>;

pub struct FakeHttp {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    handler: Handler,
    task: JoinHandle<()>,
}

impl FakeHttp {
    pub async fn start(handler: impl Fn(&Request) -> Canned + Send + Sync + 'static) -> FakeHttp {
        FakeHttp::start_at(0, handler).await
    }

    /// `start` on a given port of 127.0.0.1 (0: any free one), e.g. a Core that comes up
    /// where the agent already looks for it.
    pub async fn start_at(
        port: u16,
        handler: impl Fn(&Request) -> Canned + Send + Sync + 'static,
    ) -> FakeHttp {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(Mutex::new(Box::new(handler)));
        let (reqs, h) = (requests.clone(), handler.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve(stream, reqs.clone(), h.clone()));
            }
        });
        FakeHttp {
            port,
            requests,
            handler,
            task,
        }
    }

    pub fn set_handler(&self, handler: impl Fn(&Request) -> Canned + Send + Sync + 'static) {
        *self.handler.lock().unwrap() = Box::new(handler);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Bodies of the evaluate requests, parsed.
    pub fn evaluated(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.path.ends_with("/evaluate"))
            .map(Request::json)
            .collect()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    reqs: Arc<Mutex<Vec<Request>>>,
    handler: Handler,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_owned();
        let path = first.next().unwrap_or("").to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        let req = Request {
            method,
            path,
            headers,
            body,
        };
        reqs.lock().unwrap().push(req.clone());
        let canned = (handler.lock().unwrap())(&req);
        if !canned.delay.is_zero() {
            tokio::time::sleep(canned.delay).await;
        }
        if canned.close {
            return;
        }
        let mut out = format!(
            "HTTP/1.1 {} Canned\r\nContent-Length: {}\r\n",
            canned.status,
            canned.body.len()
        );
        for (k, v) in &canned.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&canned.body);
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
        let _ = stream.flush().await;
    }
}

/// An HTTPS server with a fresh self-signed certificate for `localhost`, answering
/// `{"verdict":"allow"}` to every request.
pub struct TlsFake {
    pub port: u16,
    pub ca_file: PathBuf,
    _dir: TempDir,
    task: JoinHandle<()>,
}

impl TlsFake {
    pub async fn start() -> TlsFake {
        use tokio_rustls::rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
        };
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = TempDir::new("tls");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, certified.cert.pem()).unwrap();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(Mutex::new(Box::new(|_: &Request| {
            Canned::json(200, serde_json::json!({"verdict": "allow"}))
        })));
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (acceptor, reqs, h) = (acceptor.clone(), requests.clone(), handler.clone());
                conns.spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve(tls, reqs, h).await;
                    }
                });
            }
        });
        TlsFake {
            port,
            ca_file,
            _dir: dir,
            task,
        }
    }
}

impl Drop for TlsFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}
