//! The OpenBox Core client for API v1 routes (protocol §1): `GET /api/v1/auth/validate`,
//! `POST /api/v1/governance/evaluate`, `POST /api/v1/governance/approval`, with
//! `Authorization: Bearer <key>` and `Content-Type: application/json`, one timeout per call
//! (`governance_timeout`). TLS is rustls (ring) trusting the system roots plus an optional
//! extra PEM CA file. Redirects are not followed (httpx does not follow them either; a 3xx
//! counts as "no verdict").
//!
//! Calls never fail: they return a [`CoreOutcome`] that says what happened, and
//! [`apply_fail_policy`] turns an evaluate outcome into a verdict (or none) per §6.

use std::{path::Path, sync::Arc, time::Duration};

use serde_json::Value;

use super::{
    config::FailPolicy,
    conventions::{Conventions, SDK_V2_BASE_IDENTIFIER, SDK_V2_IDENTIFIER},
    identity::{self, BootstrapError, Identity, OktaIds, RsaKey, WorkloadState, WorkloadStep},
    verdict::{EvaluateResponse, Verdict},
};

/// Our own product token, in every User-Agent.
const AGENT_PRODUCT: &str = concat!("openbox-agent/", env!("CARGO_PKG_VERSION"));

pub const VALIDATE_PATH: &str = "/api/v1/auth/validate";
pub const EVALUATE_PATH: &str = "/api/v1/governance/evaluate";
pub const APPROVAL_PATH: &str = "/api/v1/governance/approval";

/// What one Core call came to.
#[derive(Clone, Debug, PartialEq)]
pub enum CoreOutcome<T> {
    /// A 2xx answer whose body is a JSON object.
    Ok(T),
    /// A 2xx/3xx answer whose body is not a JSON object: no verdict, continue (§6).
    NonJson { status: u16 },
    /// HTTP status ≥ 400; `body` is the first 512 bytes of the answer, for logs.
    HttpError { status: u16, body: String },
    /// No complete answer within `governance_timeout`.
    Timeout,
    /// Connection refused, DNS, TLS or I/O failure.
    Network(String),
    /// Okta or workload identity (§1.3): Core refused the identity (401/403), or it could
    /// not be set up (bootstrap, token exchange). A hard error in every policy: never a
    /// fallback ALLOW, never "still pending".
    AuthRefused(String),
}

impl<T> CoreOutcome<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> CoreOutcome<U> {
        match self {
            CoreOutcome::Ok(t) => CoreOutcome::Ok(f(t)),
            CoreOutcome::NonJson { status } => CoreOutcome::NonJson { status },
            CoreOutcome::HttpError { status, body } => CoreOutcome::HttpError { status, body },
            CoreOutcome::Timeout => CoreOutcome::Timeout,
            CoreOutcome::Network(e) => CoreOutcome::Network(e),
            CoreOutcome::AuthRefused(e) => CoreOutcome::AuthRefused(e),
        }
    }

    /// Core took the event (any 2xx/3xx answer).
    pub fn accepted(&self) -> bool {
        matches!(self, CoreOutcome::Ok(_) | CoreOutcome::NonJson { .. })
    }

    /// Trying the same request again may succeed: timeout, network, 5xx, 408, 429.
    /// Other 4xx answers are permanent (a spooled event is not retried forever).
    pub fn retryable(&self) -> bool {
        match self {
            CoreOutcome::Timeout | CoreOutcome::Network(_) => true,
            CoreOutcome::HttpError { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }

    /// The §6 error text after `Governance API error: `.
    pub fn error_text(&self) -> Option<String> {
        match self {
            CoreOutcome::HttpError { status, .. } => Some(format!("HTTP {status}")),
            CoreOutcome::Timeout => Some("timed out".to_owned()),
            CoreOutcome::Network(e) | CoreOutcome::AuthRefused(e) => Some(e.clone()),
            _ => None,
        }
    }
}

/// §6 for activity events: the verdict to act on, or `None` for "no verdict, continue
/// without redaction". fail_open: failures give `None`. fail_closed: network error,
/// timeout and HTTP ≥ 400 give a synthetic HALT `Governance API error: …`. A non-JSON
/// 2xx/3xx answer gives `None` in both.
pub fn apply_fail_policy(
    outcome: &CoreOutcome<EvaluateResponse>,
    policy: FailPolicy,
) -> Option<EvaluateResponse> {
    match outcome {
        CoreOutcome::Ok(r) => Some(r.clone()),
        CoreOutcome::NonJson { .. } => None,
        // Callers turn this into an authentication error first; should one not, it stops
        // the activity rather than letting it through.
        CoreOutcome::AuthRefused(e) => Some(EvaluateResponse::synthetic(Verdict::Halt, e.clone())),
        failure => match policy {
            FailPolicy::FailOpen => None,
            FailPolicy::FailClosed => Some(EvaluateResponse::synthetic(
                Verdict::Halt,
                format!(
                    "Governance API error: {}",
                    failure.error_text().unwrap_or_default()
                ),
            )),
        },
    }
}

/// When to try Core again after failures in a row: exponential backoff with full jitter.
/// The n-th wait (n = failures before it, from 0) is uniform in `[0, min(cap, base·2ⁿ)]`,
/// so agents on many nodes that lost Core at the same moment spread their retries instead
/// of hitting a recovering Core in lockstep, and the load stays about half the
/// unjittered schedule's.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// `cap` below `base` is taken as `base`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff::with_rng(base, cap, fastrand::Rng::new())
    }

    fn with_rng(base: Duration, cap: Duration, rng: fastrand::Rng) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
            rng,
        }
    }

    /// The longest the next wait can be: `min(cap, base·2ⁿ)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before the next try, after one more failure in a row.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// Core answered: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the extra CA file {path}: {source}")]
    CaFileRead {
        path: String,
        source: std::io::Error,
    },
    #[error("the extra CA file {path} holds no usable PEM certificate: {reason}")]
    CaFileInvalid { path: String, reason: String },
    #[error("cannot set up the HTTP client for OpenBox Core: {0}")]
    Build(String),
}

/// Start-up validation failures (§1.4): the daemon must refuse to start on either.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error(
        "OpenBox Core at {url} refused the API key (HTTP {status} from {VALIDATE_PATH}): set a valid key with \
         OPENBOX_API_KEY, --openbox-api-key or governance.openbox_api_key (keys look like obx_live_… or \
         obx_test_…; they are issued in the OpenBox dashboard)"
    )]
    KeyRefused { url: String, status: u16 },
    #[error(
        "OpenBox Core at {url} refused this agent's signed identity (HTTP {status}, {reason}, from {VALIDATE_PATH}): \
         check that agent_did {did} is registered in OpenBox with the public key of the agent's private key \
         (OPENBOX_AGENT_PRIVATE_KEY_FILE / governance.agent_private_key_file), and that this host's clock is right \
         (Core allows ±300 s)"
    )]
    SignatureRefused {
        url: String,
        status: u16,
        reason: String,
        did: String,
    },
    #[error(
        "OpenBox Core at {url} refused this agent's identity: {reason} — check the Okta or workload identity \
         settings (okta_agent_private_key_file and the Okta ids, or workload_private_key_file) against the \
         agent's registration in OpenBox, and that this host's clock is right"
    )]
    IdentityRefused { url: String, reason: String },
    #[error(
        "cannot reach OpenBox Core at {url}: {reason} — check openbox_url and that Core is reachable from this \
         host, or unset the URL to run on the embedded local policy"
    )]
    Unreachable {
        url: String,
        reason: String,
        /// Network error, timeout or 5xx: Core may answer later, so the agent starts and
        /// validates again then. Other statuses mean a wrong URL: start-up stops.
        outage: bool,
    },
}

impl ValidateError {
    /// True when Core could not answer (an outage), not when it answered no.
    pub fn is_outage(&self) -> bool {
        matches!(self, ValidateError::Unreachable { outage: true, .. })
    }
}

/// An async client for one Core base URL. Cheap to clone (shares the connection pool).
#[derive(Clone, Debug)]
pub struct CoreClient {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
    timeout: Duration,
    /// Signs every request when the operator configured an identity (§1.3).
    identity: Option<Arc<Identity>>,
    /// What the identity learnt from Core (Okta bootstrap, workload token); shared by
    /// clones, as the connection pool is.
    auth: Arc<AuthState>,
    /// The conventions of calls that belong to no worker (the start-up validate) and of
    /// [`CoreClient::evaluate`]/[`CoreClient::approval`].
    conventions: Conventions,
}

impl CoreClient {
    /// `base_url` as normalized by the config (no trailing `/`).
    pub fn new(
        base_url: &str,
        api_key: &str,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_native_certs(true)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .user_agent(AGENT_PRODUCT);
        if let Some(path) = ca_file {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| ClientError::CaFileRead {
                path: shown.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ClientError::CaFileInvalid {
                    path: shown.clone(),
                    reason: e.to_string(),
                }
            })?;
            if certs.is_empty() {
                return Err(ClientError::CaFileInvalid {
                    path: shown,
                    reason: "no CERTIFICATE block".into(),
                });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Build(error_chain(&e)))?;
        Ok(CoreClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            timeout,
            identity: None,
            auth: Arc::default(),
            conventions: Conventions::V1,
        })
    }

    /// Signs every request as `identity`; `conventions` for calls of no worker.
    pub fn with_identity(
        mut self,
        identity: Option<Arc<Identity>>,
        conventions: Conventions,
    ) -> CoreClient {
        self.auth = Arc::default();
        if let Some(Identity::Okta { ids: Some(ids), .. }) = identity.as_deref() {
            let _ = self.auth.okta.set(ids.clone());
        }
        self.identity = identity;
        self.conventions = conventions;
        self
    }

    /// The route version and identity headers of one request (§1.1: chosen by the
    /// identity, never retried on another version). `v1_path` is the API v1 path.
    async fn route(
        &self,
        method: &str,
        v1_path: &str,
        body: &[u8],
    ) -> Result<(String, Vec<(&'static str, String)>), BootstrapError> {
        match self.identity.as_deref() {
            None => Ok((v1_path.to_owned(), Vec::new())),
            Some(Identity::Did(signer)) => {
                Ok((v1_path.to_owned(), signer.headers(method, v1_path, body)))
            }
            Some(Identity::Okta { key, .. }) => {
                let ids = self
                    .auth
                    .okta
                    .get_or_try_init(|| self.okta_bootstrap(key))
                    .await?;
                let path = v1_path.replacen("/api/v1/", "/api/v2/", 1);
                let assertion =
                    identity::okta_assertion(key, ids, &self.api_key, method, &path, body);
                Ok((path, vec![(identity::HEADER_ASSERTION, assertion)]))
            }
            Some(Identity::Workload { key }) => Ok(match self.workload_token(key).await? {
                Some(token) => (
                    v1_path.replacen("/api/v1/", "/api/v3/", 1),
                    vec![(identity::HEADER_WORKLOAD_TOKEN, token)],
                ),
                // Core has no v3 for this agent (yet): the v1 routes, as SDK 2.0 does.
                None => (v1_path.to_owned(), Vec::new()),
            }),
        }
    }

    /// A GET of one of SDK 2.0's bootstrap routes, with its headers (API key only).
    async fn bootstrap_get(&self, path: &str) -> Result<(u16, Vec<u8>), BootstrapError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(&self.api_key)
            .timeout(self.timeout)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::USER_AGENT,
                format!("OpenBox-SDK/{SDK_V2_IDENTIFIER} ({AGENT_PRODUCT})"),
            )
            .header("X-OpenBox-SDK-Version", SDK_V2_IDENTIFIER)
            .send()
            .await
            .map_err(|e| {
                BootstrapError::Unavailable(format!(
                    "cannot reach OpenBox Core for {path}: {}",
                    error_chain(&e)
                ))
            })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default().to_vec();
        Ok((status, body))
    }

    /// Okta bootstrap mode: the identity's ids from Core, once the key is known to be
    /// the credential Core selected.
    async fn okta_bootstrap(&self, key: &RsaKey) -> Result<OktaIds, BootstrapError> {
        let (status, body) = self.bootstrap_get(identity::OKTA_BOOTSTRAP_PATH).await?;
        match status {
            200 => {
                let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let ids =
                    identity::okta_ids_from_bootstrap(&doc, key).map_err(BootstrapError::Refused)?;
                tracing::info!(agent = %ids.openbox_agent_id, kid = %ids.key_id, "Okta identity bootstrap: the key matches the agent's selected credential");
                Ok(ids)
            }
            404 => Err(BootstrapError::Refused(
                "this Core does not support Okta identity bootstrap (HTTP 404 from /api/v2/auth/bootstrap): \
                 upgrade Core, or configure the complete explicit Okta identity (openbox_agent_id, \
                 organization_id, deployment_id, okta_agent_id, okta_agent_key_id, agent_proof_audience)"
                    .to_owned(),
            )),
            s if s >= 500 => Err(BootstrapError::Unavailable(format!(
                "the Okta identity bootstrap failed (HTTP {s})"
            ))),
            s => Err(BootstrapError::Refused(format!(
                "the Okta identity bootstrap was refused (HTTP {s}{})",
                reason_code(&body).map(|r| format!(", {r}")).unwrap_or_default()
            ))),
        }
    }

    /// Workload mode: a fresh access token, or `None` while Core has no v3 for the agent.
    async fn workload_token(&self, key: &RsaKey) -> Result<Option<String>, BootstrapError> {
        let mut state = self.auth.workload.lock().await;
        loop {
            let doc = match state.next_step(std::time::Instant::now()) {
                WorkloadStep::Use(token) => return Ok(Some(token)),
                WorkloadStep::Legacy => return Ok(None),
                WorkloadStep::Refresh => match &state.doc {
                    Some(doc) => doc.clone(),
                    None => unreachable!("next_step refreshes only with a document"),
                },
                WorkloadStep::Bootstrap => {
                    let (status, body) = self
                        .bootstrap_get(identity::WORKLOAD_BOOTSTRAP_PATH)
                        .await?;
                    match identity::workload_doc(status, &body)? {
                        Some(doc) => doc,
                        None => {
                            tracing::info!(status, "OpenBox Core has no workload identity (v3) for this agent: using the v1 routes, asking again in 60 s");
                            state.unavailable_until =
                                Some(std::time::Instant::now() + identity::WORKLOAD_RETRY_AFTER);
                            return Ok(None);
                        }
                    }
                }
            };
            let form = identity::workload_token_form(key, &doc);
            let resp = self
                .http
                .post(&doc.token_endpoint)
                .timeout(self.timeout)
                .header(reqwest::header::ACCEPT, "application/json")
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(form)
                .send()
                .await
                .map_err(|e| {
                    BootstrapError::Unavailable(format!(
                        "cannot reach the workload token endpoint {}: {}",
                        doc.token_endpoint,
                        error_chain(&e)
                    ))
                })?;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap_or_default();
            let token = identity::workload_token(status, &body, std::time::Instant::now())?;
            state.doc = Some(doc);
            state.token = Some(token);
            state.unavailable_until = None;
        }
    }

    /// A request with the headers of `conventions` (§1.2) and, with an identity, on its
    /// route with its headers (§1.3), signed over exactly `body`. `sender` says which of
    /// SDK 2.0's clients the request is SDK 2.0's from (its headers name it).
    async fn request(
        &self,
        method: reqwest::Method,
        v1_path: &str,
        body: Vec<u8>,
        conventions: Conventions,
        sender: Sender,
    ) -> Result<reqwest::RequestBuilder, BootstrapError> {
        let is_get = method == reqwest::Method::GET;
        let (path, identity_headers) = self.route(method.as_str(), v1_path, &body).await?;
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base_url))
            .bearer_auth(&self.api_key)
            .timeout(self.timeout);
        match conventions {
            Conventions::V1 => {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
            Conventions::V2 => {
                // SDK 2.0 sends POST bodies as raw bytes without a Content-Type; only
                // its validate GET names one.
                if is_get {
                    req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
                }
                let sdk = match (sender, self.identity.as_deref()) {
                    (Sender::HookRuntime, Some(Identity::Okta { .. })) | (Sender::Sdk, _) => {
                        SDK_V2_IDENTIFIER
                    }
                    (Sender::HookRuntime, _) => SDK_V2_BASE_IDENTIFIER,
                };
                req = req
                    .header(
                        reqwest::header::USER_AGENT,
                        format!("OpenBox-SDK/{sdk} ({AGENT_PRODUCT})"),
                    )
                    .header("X-OpenBox-SDK-Version", sdk);
            }
        }
        for (name, value) in identity_headers {
            req = req.header(name, value);
        }
        Ok(if is_get { req } else { req.body(body) })
    }

    /// Core's 401/403 to a request of an Okta or workload identity, as the hard error it
    /// is; `None` in the other modes (there it is an HTTP error like any other).
    fn hard_refusal(&self, status: u16, body: &[u8]) -> Option<String> {
        let identity = self.identity.as_deref().filter(|i| i.refusal_is_hard())?;
        matches!(status, 401 | 403).then(|| {
            format!(
                "OpenBox Core refused the {} (HTTP {status}{})",
                identity.describe(),
                reason_code(body)
                    .map(|r| format!(", {r}"))
                    .unwrap_or_default()
            )
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET /api/v1/auth/validate`: 200 → ok; 401/403 → the key was refused; anything else
    /// → Core unreachable, an outage for network errors, timeouts and 5xx.
    pub async fn validate(&self) -> Result<(), ValidateError> {
        let unreachable = |reason: String, outage: bool| ValidateError::Unreachable {
            url: self.base_url.clone(),
            reason,
            outage,
        };
        let req = match self
            .request(
                reqwest::Method::GET,
                VALIDATE_PATH,
                Vec::new(),
                self.conventions,
                Sender::Sdk,
            )
            .await
        {
            Ok(r) => r,
            Err(BootstrapError::Unavailable(reason)) => return Err(unreachable(reason, true)),
            Err(BootstrapError::Refused(reason)) => {
                return Err(ValidateError::IdentityRefused {
                    url: self.base_url.clone(),
                    reason,
                })
            }
        };
        match req.send().await {
            Ok(resp) => match resp.status().as_u16() {
                200 => Ok(()),
                status @ (401 | 403) => {
                    let body = resp.bytes().await.unwrap_or_default();
                    if let Some(reason) = self.hard_refusal(status, &body) {
                        return Err(ValidateError::IdentityRefused {
                            url: self.base_url.clone(),
                            reason,
                        });
                    }
                    let did = self.identity.as_deref().and_then(Identity::did);
                    match (reason_code(&body), did) {
                        (Some(reason), Some(did)) => Err(ValidateError::SignatureRefused {
                            url: self.base_url.clone(),
                            status,
                            reason,
                            did: did.to_owned(),
                        }),
                        _ => Err(ValidateError::KeyRefused {
                            url: self.base_url.clone(),
                            status,
                        }),
                    }
                }
                status => Err(unreachable(
                    format!("HTTP {status} from {VALIDATE_PATH}"),
                    status >= 500,
                )),
            },
            Err(e) if e.is_timeout() => Err(unreachable(
                format!(
                    "no answer within {:.1} s (governance_timeout)",
                    self.timeout.as_secs_f64()
                ),
                true,
            )),
            Err(e) => Err(unreachable(error_chain(&e), true)),
        }
    }

    /// `POST /api/v1/governance/evaluate` with the encoded event (see `events::encode`).
    pub async fn evaluate(&self, body: Vec<u8>) -> CoreOutcome<EvaluateResponse> {
        self.evaluate_with(self.conventions, body).await
    }

    /// [`CoreClient::evaluate`] with a worker's conventions.
    pub async fn evaluate_with(
        &self,
        conventions: Conventions,
        body: Vec<u8>,
    ) -> CoreOutcome<EvaluateResponse> {
        self.evaluate_raw_with(conventions, body)
            .await
            .map(verdict_of)
    }

    /// `POST /api/v1/governance/evaluate` with an already encoded body (a spooled event).
    pub async fn evaluate_raw(&self, body: Vec<u8>) -> CoreOutcome<Value> {
        self.evaluate_raw_with(self.conventions, body).await
    }

    pub async fn evaluate_raw_with(
        &self,
        conventions: Conventions,
        body: Vec<u8>,
    ) -> CoreOutcome<Value> {
        self.post_json(EVALUATE_PATH, body, conventions, Sender::Sdk)
            .await
    }

    /// A spooled event, sent as it was first meant to be: a hook event (its body says
    /// `hook_trigger: true`) from SDK 2.0's hook runtime client, the rest from the SDK's.
    pub async fn evaluate_spooled(
        &self,
        conventions: Conventions,
        body: Vec<u8>,
    ) -> CoreOutcome<Value> {
        #[derive(serde::Deserialize)]
        struct HookFlag {
            #[serde(default)]
            hook_trigger: bool,
        }
        let hook = serde_json::from_slice::<HookFlag>(&body).is_ok_and(|f| f.hook_trigger);
        let sender = if hook {
            Sender::HookRuntime
        } else {
            Sender::Sdk
        };
        self.post_json(EVALUATE_PATH, body, conventions, sender)
            .await
    }

    /// [`CoreClient::evaluate_with`] for a hook event (§3.2), which SDK 2.0 sends from
    /// its hook runtime's client: under 2.0 its headers name that client.
    pub async fn evaluate_hook_with(
        &self,
        conventions: Conventions,
        body: Vec<u8>,
    ) -> CoreOutcome<EvaluateResponse> {
        self.post_json(EVALUATE_PATH, body, conventions, Sender::HookRuntime)
            .await
            .map(verdict_of)
    }

    /// `POST /api/v1/governance/approval` with `{workflow_id, run_id, activity_id}`.
    pub async fn approval(
        &self,
        workflow_id: &str,
        run_id: &str,
        activity_id: &str,
    ) -> CoreOutcome<Value> {
        self.approval_with(self.conventions, workflow_id, run_id, activity_id)
            .await
    }

    /// [`CoreClient::approval`] with a worker's conventions.
    pub async fn approval_with(
        &self,
        conventions: Conventions,
        workflow_id: &str,
        run_id: &str,
        activity_id: &str,
    ) -> CoreOutcome<Value> {
        // Keys in the SDK's order, each value encoded as the conventions say.
        let mut body = b"{\"workflow_id\":".to_vec();
        body.extend(conventions.encode(&workflow_id));
        body.extend_from_slice(b",\"run_id\":");
        body.extend(conventions.encode(&run_id));
        body.extend_from_slice(b",\"activity_id\":");
        body.extend(conventions.encode(&activity_id));
        body.push(b'}');
        self.post_json(APPROVAL_PATH, body, conventions, Sender::Sdk)
            .await
    }

    async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
        conventions: Conventions,
        sender: Sender,
    ) -> CoreOutcome<Value> {
        let sent = match self
            .request(reqwest::Method::POST, path, body, conventions, sender)
            .await
        {
            Ok(req) => req.send().await,
            Err(BootstrapError::Unavailable(e)) => return CoreOutcome::Network(e),
            Err(BootstrapError::Refused(e)) => return CoreOutcome::AuthRefused(e),
        };
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return CoreOutcome::Timeout,
            Err(e) => return CoreOutcome::Network(error_chain(&e)),
        };
        let status = resp.status().as_u16();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) if e.is_timeout() => return CoreOutcome::Timeout,
            Err(e) => return CoreOutcome::Network(error_chain(&e)),
        };
        if let Some(refused) = self.hard_refusal(status, &bytes) {
            return CoreOutcome::AuthRefused(refused);
        }
        if status >= 400 {
            let shown = &bytes[..bytes.len().min(512)];
            return CoreOutcome::HttpError {
                status,
                body: String::from_utf8_lossy(shown).into_owned(),
            };
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v @ Value::Object(_)) if status < 300 => CoreOutcome::Ok(v),
            _ => CoreOutcome::NonJson { status },
        }
    }
}

/// An evaluate answer: `post_json` only returns Ok for JSON objects, which always parse.
fn verdict_of(v: Value) -> EvaluateResponse {
    EvaluateResponse::from_value(&v)
        .unwrap_or_else(|| EvaluateResponse::synthetic(Verdict::Allow, ""))
}

/// Which of SDK 2.0's two Core clients sends a request: the SDK's own (lifecycle events,
/// approvals, validate), named `openbox-temporal-python-v2.0.0`, or its hook runtime's
/// (hook events), which names the base library unless the worker has an Okta identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    Sdk,
    HookRuntime,
}

/// The machine reason Core gives for a 401/403 in a JSON body (§1.3): `reason_code`,
/// `code` or `reason`.
pub fn reason_code(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    ["reason_code", "code", "reason"]
        .iter()
        .find_map(|k| v.get(k).and_then(Value::as_str).map(str::to_owned))
}

/// What an identity learnt from Core at run time.
#[derive(Debug, Default)]
struct AuthState {
    /// Okta: the explicit ids, or the bootstrap's once it succeeded.
    okta: tokio::sync::OnceCell<OktaIds>,
    workload: tokio::sync::Mutex<WorkloadState>,
}

/// An error with its causes, e.g. `error sending request: … : Connection refused (os error 111)`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::governance::testutil::{Canned, FakeHttp};

    fn body(event: Value) -> Vec<u8> {
        serde_json::to_vec(&event).unwrap()
    }

    fn client(server: &FakeHttp, timeout_ms: u64) -> CoreClient {
        CoreClient::new(
            &server.base_url(),
            "obx_test_key",
            Duration::from_millis(timeout_ms),
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn evaluate_sends_bearer_json_and_parses_the_verdict() {
        let server =
            FakeHttp::start(|_| Canned::json(200, json!({"verdict": "block", "reason": "r"})))
                .await;
        let wf = crate::governance::events::WorkflowInfo {
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "T".into(),
            task_queue: "q".into(),
            multi_agent_session_id: None,
        };
        let event = crate::governance::events::workflow_started(&wf, std::time::UNIX_EPOCH);
        let out = client(&server, 2000)
            .evaluate(crate::governance::events::encode(&event))
            .await;
        let CoreOutcome::Ok(r) = out else {
            panic!("{out:?}")
        };
        assert_eq!(r.verdict, Verdict::Block);
        let req = &server.requests()[0];
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, EVALUATE_PATH);
        assert_eq!(req.header("authorization"), Some("Bearer obx_test_key"));
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(
            req.body,
            br#"{"source":"workflow-telemetry","event_type":"WorkflowStarted","workflow_id":"w","run_id":"r","workflow_type":"T","task_queue":"q","timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
    }

    /// Under 2.0 a hook event names SDK 2.0's base library, sent at once or from the
    /// spool; other events name SDK 2.0 (§1.2).
    #[tokio::test]
    async fn hook_events_name_the_base_library_under_2_0_also_from_the_spool() {
        let server = FakeHttp::start(|_| Canned::json(200, json!({"verdict": "allow"}))).await;
        let c = client(&server, 2000);
        let hook = body(json!({"event_type": "ActivityStarted", "hook_trigger": true}));
        let lifecycle = body(json!({"event_type": "ActivityStarted"}));
        let v2 = Conventions::V2;
        assert!(matches!(
            c.evaluate_hook_with(v2, hook.clone()).await,
            CoreOutcome::Ok(_)
        ));
        assert!(matches!(
            c.evaluate_spooled(v2, hook).await,
            CoreOutcome::Ok(_)
        ));
        assert!(matches!(
            c.evaluate_spooled(v2, lifecycle.clone()).await,
            CoreOutcome::Ok(_)
        ));
        assert!(matches!(
            c.evaluate_with(v2, lifecycle).await,
            CoreOutcome::Ok(_)
        ));
        let versions: Vec<String> = server
            .requests()
            .iter()
            .map(|r| {
                let v = r.header("x-openbox-sdk-version").unwrap_or_default();
                let ua = r.header("user-agent").unwrap_or_default();
                assert!(
                    ua.starts_with(&format!("OpenBox-SDK/{v} (")),
                    "{ua} for {v}"
                );
                v.to_owned()
            })
            .collect();
        assert_eq!(
            versions,
            [
                SDK_V2_BASE_IDENTIFIER,
                SDK_V2_BASE_IDENTIFIER,
                SDK_V2_IDENTIFIER,
                SDK_V2_IDENTIFIER
            ]
        );
    }

    #[tokio::test]
    async fn outcomes_distinguish_non_json_http_errors_timeouts_and_network_errors() {
        let server = FakeHttp::start(|req| match req.path.as_str() {
            "/api/v1/governance/evaluate" => Canned::text(200, "not json"),
            _ => Canned::text(500, "boom"),
        })
        .await;
        let c = client(&server, 2000);
        assert_eq!(
            c.evaluate(body(json!({}))).await,
            CoreOutcome::NonJson { status: 200 }
        );
        let out = c.approval("w", "r", "a").await;
        assert_eq!(
            out,
            CoreOutcome::HttpError {
                status: 500,
                body: "boom".into()
            }
        );
        assert_eq!(
            server.requests()[1].body,
            br#"{"workflow_id":"w","run_id":"r","activity_id":"a"}"#
        );

        let slow =
            FakeHttp::start(|_| Canned::json(200, json!({})).delayed(Duration::from_millis(1500)))
                .await;
        assert_eq!(
            client(&slow, 200).evaluate(body(json!({}))).await,
            CoreOutcome::Timeout
        );

        let arr = FakeHttp::start(|_| Canned::json(200, json!(["allow"]))).await;
        assert_eq!(
            client(&arr, 2000).evaluate(body(json!({}))).await,
            CoreOutcome::NonJson { status: 200 }
        );
        let redirect =
            FakeHttp::start(|_| Canned::text(302, "").header("Location", "http://127.0.0.1:1/x"))
                .await;
        assert_eq!(
            client(&redirect, 2000).evaluate(body(json!({}))).await,
            CoreOutcome::NonJson { status: 302 }
        );

        let closed = FakeHttp::start(|_| Canned::close()).await;
        assert!(matches!(
            client(&closed, 2000).evaluate(body(json!({}))).await,
            CoreOutcome::Network(_)
        ));
        let port = closed.port();
        drop(closed);
        let refused = CoreClient::new(
            &format!("http://127.0.0.1:{port}"),
            "k",
            Duration::from_secs(2),
            None,
        )
        .unwrap();
        let out = refused.evaluate(body(json!({}))).await;
        // Refused, or reset if the aborted listener is not closed yet.
        assert!(matches!(out, CoreOutcome::Network(_)), "{out:?}");
        assert!(out.retryable());
    }

    #[test]
    fn fail_policy_table() {
        let ok = CoreOutcome::Ok(EvaluateResponse::synthetic(Verdict::Block, "x"));
        type Case = (
            CoreOutcome<EvaluateResponse>,
            Option<Verdict>,
            Option<Verdict>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                ok.clone(),
                Some(Verdict::Block),
                Some(Verdict::Block),
                Some("x"),
            ),
            (CoreOutcome::NonJson { status: 200 }, None, None, None),
            (CoreOutcome::NonJson { status: 204 }, None, None, None),
            (
                CoreOutcome::HttpError {
                    status: 500,
                    body: String::new(),
                },
                None,
                Some(Verdict::Halt),
                Some("Governance API error: HTTP 500"),
            ),
            (
                CoreOutcome::HttpError {
                    status: 403,
                    body: String::new(),
                },
                None,
                Some(Verdict::Halt),
                Some("Governance API error: HTTP 403"),
            ),
            (
                CoreOutcome::Timeout,
                None,
                Some(Verdict::Halt),
                Some("Governance API error: timed out"),
            ),
            (
                CoreOutcome::Network("connection refused".into()),
                None,
                Some(Verdict::Halt),
                Some("Governance API error: connection refused"),
            ),
        ];
        for (outcome, open, closed, reason) in cases {
            assert_eq!(
                apply_fail_policy(&outcome, FailPolicy::FailOpen).map(|r| r.verdict),
                open,
                "{outcome:?}"
            );
            let c = apply_fail_policy(&outcome, FailPolicy::FailClosed);
            assert_eq!(c.as_ref().map(|r| r.verdict), closed, "{outcome:?}");
            assert_eq!(c.and_then(|r| r.reason).as_deref(), reason);
        }
    }

    #[test]
    fn backoff_ceilings_double_from_the_base_up_to_the_cap() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(500), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(b.ceiling().as_millis());
            b.next_wait();
        }
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        for _ in 0..100 {
            b.next_wait();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30), "no overflow");
        b.reset();
        assert_eq!(b.ceiling(), ms(500));
        assert_eq!(Backoff::new(ms(500), ms(100)).ceiling(), ms(500));
    }

    #[test]
    fn backoff_waits_are_uniform_between_zero_and_the_ceiling() {
        let ms = Duration::from_millis;
        let mut b = Backoff::with_rng(ms(100), ms(1600), fastrand::Rng::with_seed(7));
        // The fifth wait in a row and on are capped at 1.6 s: sample them.
        for _ in 0..4 {
            assert!(b.next_wait() <= b.ceiling());
        }
        let waits: Vec<Duration> = (0..2000).map(|_| b.next_wait()).collect();
        assert!(waits.iter().all(|w| *w <= ms(1600)), "never above the cap");
        let low = waits.iter().filter(|w| **w < ms(160)).count();
        let high = waits.iter().filter(|w| **w > ms(1440)).count();
        // Each tenth of the range holds ~200 of 2000 uniform samples.
        assert!(
            (120..=280).contains(&low),
            "{low} waits in the lowest tenth"
        );
        assert!(
            (120..=280).contains(&high),
            "{high} waits in the highest tenth"
        );
        let mean = waits.iter().sum::<Duration>() / 2000;
        assert!(
            mean > ms(720) && mean < ms(880),
            "mean {mean:?}, expected ~800 ms"
        );
    }

    #[test]
    fn two_agents_failing_together_do_not_retry_in_lockstep() {
        let ms = Duration::from_millis;
        let mut a = Backoff::new(ms(500), Duration::from_secs(30));
        let mut b = Backoff::new(ms(500), Duration::from_secs(30));
        let same = (0..10).filter(|_| a.next_wait() == b.next_wait()).count();
        assert_eq!(same, 0, "independent draws at nanosecond resolution");
    }

    #[test]
    fn retryable_outcomes_are_transient_failures_only() {
        let e = |status| CoreOutcome::<Value>::HttpError {
            status,
            body: String::new(),
        };
        assert!(
            e(500).retryable() && e(503).retryable() && e(429).retryable() && e(408).retryable()
        );
        assert!(!e(400).retryable() && !e(401).retryable() && !e(404).retryable());
        assert!(CoreOutcome::<Value>::Timeout.retryable());
        assert!(!CoreOutcome::Ok(json!({})).retryable());
        assert!(CoreOutcome::<Value>::NonJson { status: 200 }.accepted());
    }

    #[tokio::test]
    async fn validate_accepts_200_and_explains_refused_keys_and_unreachable_core() {
        let server = FakeHttp::start(|req| {
            if req.header("authorization") == Some("Bearer obx_test_key") {
                Canned::json(200, json!({"valid": true}))
            } else {
                Canned::json(401, json!({"detail": "bad key"}))
            }
        })
        .await;
        client(&server, 2000).validate().await.unwrap();
        let req = &server.requests()[0];
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("GET", VALIDATE_PATH)
        );
        assert_eq!(req.header("content-type"), Some("application/json"));

        let bad = CoreClient::new(
            &server.base_url(),
            "obx_test_wrong",
            Duration::from_secs(2),
            None,
        )
        .unwrap();
        let err = bad.validate().await.unwrap_err().to_string();
        assert!(err.contains("refused the API key (HTTP 401"), "{err}");
        assert!(err.contains("OPENBOX_API_KEY"), "{err}");

        let forbidden = FakeHttp::start(|_| Canned::text(403, "")).await;
        assert!(matches!(
            client(&forbidden, 2000).validate().await,
            Err(ValidateError::KeyRefused { status: 403, .. })
        ));
        let broken = FakeHttp::start(|_| Canned::text(500, "")).await;
        let err = client(&broken, 2000).validate().await.unwrap_err();
        assert!(err.is_outage(), "a 5xx is an outage: {err}");
        assert!(err.to_string().contains("HTTP 500"), "{err}");
        let wrong_path = FakeHttp::start(|_| Canned::text(404, "")).await;
        let err = client(&wrong_path, 2000).validate().await.unwrap_err();
        assert!(
            matches!(err, ValidateError::Unreachable { outage: false, .. }),
            "a 404 is a wrong URL, not an outage: {err}"
        );
        let slow =
            FakeHttp::start(|_| Canned::text(200, "").delayed(Duration::from_millis(1500))).await;
        let err = client(&slow, 200).validate().await.unwrap_err().to_string();
        assert!(err.contains("no answer within 0.2 s"), "{err}");
    }

    #[tokio::test]
    async fn https_core_with_a_self_signed_certificate_needs_the_extra_ca_file() {
        let tls = crate::governance::testutil::TlsFake::start().await;
        let base = format!("https://localhost:{}", tls.port);
        let trusting = CoreClient::new(
            &base,
            "obx_test_key",
            Duration::from_secs(5),
            Some(&tls.ca_file),
        )
        .unwrap();
        trusting.validate().await.unwrap();
        let CoreOutcome::Ok(r) = trusting
            .evaluate(body(json!({"event_type": "ActivityStarted"})))
            .await
        else {
            panic!()
        };
        assert_eq!(r.verdict, Verdict::Allow);

        let plain = CoreClient::new(&base, "obx_test_key", Duration::from_secs(5), None).unwrap();
        let err = plain.validate().await.unwrap_err().to_string();
        assert!(err.to_lowercase().contains("certificate"), "{err}");

        let dir = crate::governance::testutil::TempDir::new("ca");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = CoreClient::new(&base, "k", Duration::from_secs(1), Some(&junk))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("junk.pem holds no usable PEM certificate"),
            "{err}"
        );
        let err = CoreClient::new(
            &base,
            "k",
            Duration::from_secs(1),
            Some(&dir.path().join("missing.pem")),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot read the extra CA file"), "{err}");
    }
}
