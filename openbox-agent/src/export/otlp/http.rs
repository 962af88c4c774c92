//! The HTTP/protobuf exporter's client: the agent's own reqwest (the one the Core
//! client uses, rustls with the ring provider, the system roots plus an optional CA), so
//! OTLP over HTTP adds no second HTTP stack. `opentelemetry-http` 0.33 implements its
//! client trait only for reqwest 0.13, which would build beside our 0.12.

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};

/// Most response bytes read from the collector (its answer is a small protobuf).
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Client(reqwest::Client);

impl Client {
    pub fn new(ca_pem: Option<&[u8]>) -> Result<Client> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            // A collector that redirects is misconfigured; following could leak headers.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                anyhow!("the OTLP collector's CA file (--otlp-ca-file) is not a PEM bundle: {e}")
            })?;
            if certs.is_empty() {
                return Err(anyhow!(
                    "the OTLP collector's CA file (--otlp-ca-file) holds no certificate"
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| anyhow!("setting up the OTLP HTTP client: {e}"))?;
        Ok(Client(client))
    }
}

#[async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut req = self
            .0
            .request(parts.method, parts.uri.to_string())
            .body(body);
        for (name, value) in &parts.headers {
            req = req.header(name, value);
        }
        let mut resp = req.send().await?;
        let mut out = Response::builder().status(resp.status().as_u16());
        for (name, value) in resp.headers() {
            out = out.header(name.as_str(), value.as_bytes());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err("the OTLP collector's answer is larger than 1 MiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(out.body(Bytes::from(body))?)
    }
}
