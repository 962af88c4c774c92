//! SDK 2.0's identities besides the OpenBox DID (`openbox-core-protocol.md` §1.3), done
//! the way `openbox-temporal-sdk-python` 2.0.0 does them through its base SDK
//! (`openbox_core.identity_okta`, `bootstrap`, `workload_identity`, `client`):
//!
//! - **Okta AI Agent** (API v2 routes): every request carries `X-OpenBox-Agent-Assertion`,
//!   a compact RS256 JWS over sorted-key compact JSON, `typ` `openbox-agent-proof+jwt`,
//!   claims binding it to the API key, the method, the path and the body's SHA-256, valid
//!   60 s, with a fresh `jti`. The identity's ids come from the operator (the explicit
//!   set) or, with the key alone, from `GET /api/v2/auth/bootstrap`: the key's RFC 7638
//!   thumbprint must equal the one Core names, or nothing is sent.
//! - **Workload** (API v3 routes): `GET /api/v3/auth/bootstrap` names a token endpoint
//!   and a client; an OAuth2 `client_credentials` grant with a `private_key_jwt` client
//!   assertion gets an access token, sent as `X-OpenBox-Workload-Token` next to the API
//!   key. A 404, or a 409 `workload_identity_unavailable`, means Core has no v3 for this
//!   agent: requests go to the v1 routes unsigned, and the bootstrap is asked again
//!   after 60 s. Tokens are kept at most 300 s and renewed 30 s before they expire.
//!
//! Keys are PKCS8 PEM RSA keys of at least 2048 bits, read from a file or the
//! environment the operator controls (never from a worker or workflow history). Errors
//! never show key bytes.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use ring::{
    rand::{SecureRandom, SystemRandom},
    rsa::PublicKeyComponents,
    signature::{RsaKeyPair, RSA_PKCS1_SHA256},
};
use rustls_pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
use serde_json::{json, Value};

use super::signing::{sha256_hex, DidSigner};

pub const HEADER_ASSERTION: &str = "X-OpenBox-Agent-Assertion";
pub const HEADER_WORKLOAD_TOKEN: &str = "X-OpenBox-Workload-Token";
pub const OKTA_BOOTSTRAP_PATH: &str = "/api/v2/auth/bootstrap";
pub const WORKLOAD_BOOTSTRAP_PATH: &str = "/api/v3/auth/bootstrap";
const ASSERTION_TYP: &str = "openbox-agent-proof+jwt";
/// `exp - iat` of every assertion, Core's ceiling.
const ASSERTION_LIFETIME_SECS: u64 = 60;
const MIN_RSA_BITS: usize = 2048;
/// After Core said it has no v3 for this agent, ask again this much later.
pub const WORKLOAD_RETRY_AFTER: Duration = Duration::from_secs(60);
const TOKEN_REFRESH_SKEW: Duration = Duration::from_secs(30);
const TOKEN_MAX_CACHE: Duration = Duration::from_secs(300);

/// The operator's identity; at most one mode is active.
pub enum Identity {
    Did(DidSigner),
    Okta { key: RsaKey, ids: Option<OktaIds> },
    Workload { key: RsaKey },
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Did(s) => s.fmt(f),
            Identity::Okta { ids, .. } => f
                .debug_struct("Okta")
                .field("ids", ids)
                .finish_non_exhaustive(),
            Identity::Workload { .. } => f.debug_struct("Workload").finish_non_exhaustive(),
        }
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Identity::Did(a), Identity::Did(b)) => a == b,
            (Identity::Okta { key: a, ids: x }, Identity::Okta { key: b, ids: y }) => {
                a.thumbprint() == b.thumbprint() && x == y
            }
            (Identity::Workload { key: a }, Identity::Workload { key: b }) => {
                a.thumbprint() == b.thumbprint()
            }
            _ => false,
        }
    }
}

impl Identity {
    pub fn did(&self) -> Option<&str> {
        match self {
            Identity::Did(s) => Some(s.did()),
            _ => None,
        }
    }

    /// Which mode, in the words of the error messages.
    pub fn describe(&self) -> String {
        match self {
            Identity::Did(s) => format!("agent_did {}", s.did()),
            Identity::Okta { ids: Some(ids), .. } => {
                format!(
                    "Okta AI agent {} (key id {})",
                    ids.okta_agent_id, ids.key_id
                )
            }
            Identity::Okta { ids: None, .. } => "Okta AI agent (bootstrap mode)".to_owned(),
            Identity::Workload { .. } => "workload identity".to_owned(),
        }
    }

    /// Okta and workload: a 401/403 is an authentication failure in every policy, never
    /// a fallback ALLOW nor "still pending" (§1.3).
    pub fn refusal_is_hard(&self) -> bool {
        !matches!(self, Identity::Did(_))
    }
}

/// The ids an Okta assertion names (the explicit set, or what bootstrap returned).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OktaIds {
    pub openbox_agent_id: String,
    pub organization_id: String,
    pub deployment_id: String,
    pub okta_agent_id: String,
    pub key_id: String,
    pub audience: String,
}

/// A loaded RSA private key. The PEM is not kept.
pub struct RsaKey {
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl RsaKey {
    /// `label` names the setting in errors (`okta_agent_private_key`, …).
    pub fn from_pem(pem: &str, label: &str) -> Result<RsaKey, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.trim().as_bytes()).map_err(|_| {
            format!(
                "{label} is not a PKCS8 PEM private key (a -----BEGIN PRIVATE KEY----- block; \
                 convert a PKCS1 key with `openssl pkcs8 -topk8 -nocrypt`; key bytes not shown)"
            )
        })?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| {
            format!(
                "{label} is not a usable RSA private key ({e}; an RSA key of at least \
                 {MIN_RSA_BITS} bits is needed; key bytes not shown)"
            )
        })?;
        let bits = key.public().modulus_len() * 8;
        if bits < MIN_RSA_BITS {
            return Err(format!(
                "{label}: the RSA modulus is {bits} bits, at least {MIN_RSA_BITS} are needed"
            ));
        }
        Ok(RsaKey {
            key,
            rng: SystemRandom::new(),
        })
    }

    /// RFC 7638 SHA-256 thumbprint of the public half (base64url, unpadded).
    pub fn thumbprint(&self) -> String {
        let parts: PublicKeyComponents<Vec<u8>> = self.key.public().into();
        let unsigned = |v: &[u8]| {
            let start = v
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(v.len().saturating_sub(1));
            b64url(&v[start..])
        };
        let canonical = format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            unsigned(&parts.e),
            unsigned(&parts.n)
        );
        b64url(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }

    /// A compact RS256 JWS of `header` and `claims`, each sorted-key compact JSON (as the
    /// SDK writes them, so the bytes match for the same inputs).
    fn jws(&self, header: &BTreeMap<&str, Value>, claims: &BTreeMap<&str, Value>) -> String {
        // Serializing a map of JSON values cannot fail.
        let h = b64url(&serde_json::to_vec(header).unwrap_or_default());
        let c = b64url(&serde_json::to_vec(claims).unwrap_or_default());
        let input = format!("{h}.{c}");
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        // Signing with a loaded key and a sized buffer fails only if the system's random
        // source does; Core then refuses the request, which says so.
        let _ = self
            .key
            .sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig);
        format!("{input}.{}", b64url(&sig))
    }

    /// 24 random bytes, base64url: a JWT id (Core refuses one it has seen).
    fn jti(&self) -> String {
        let mut b = [0u8; 24];
        let _ = self.rng.fill(&mut b);
        b64url(&b)
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `X-OpenBox-Agent-Assertion` for one request: `path` includes `/api/v2`, `body` is the
/// exact bytes sent (empty for a GET).
pub fn okta_assertion(
    key: &RsaKey,
    ids: &OktaIds,
    api_key: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    okta_assertion_at(key, ids, api_key, method, path, body, unix_now(), key.jti())
}

#[expect(
    clippy::too_many_arguments,
    reason = "the claims' inputs, with the clock and jti injectable for tests"
)]
fn okta_assertion_at(
    key: &RsaKey,
    ids: &OktaIds,
    api_key: &str,
    method: &str,
    path: &str,
    body: &[u8],
    iat: u64,
    jti: String,
) -> String {
    let header = BTreeMap::from([
        ("alg", json!("RS256")),
        ("kid", json!(ids.key_id)),
        ("typ", json!(ASSERTION_TYP)),
    ]);
    let claims = BTreeMap::from([
        ("iss", json!(ids.okta_agent_id)),
        ("sub", json!(ids.okta_agent_id)),
        ("aud", json!(ids.audience)),
        ("obx_deployment_id", json!(ids.deployment_id)),
        ("obx_organization_id", json!(ids.organization_id)),
        ("obx_agent_id", json!(ids.openbox_agent_id)),
        ("obx_api_key_sha256", json!(sha256_hex(api_key.as_bytes()))),
        ("iat", json!(iat)),
        ("exp", json!(iat + ASSERTION_LIFETIME_SECS)),
        ("jti", json!(jti)),
        ("htm", json!(method.to_uppercase())),
        ("htu", json!(path)),
        ("body_sha256", json!(sha256_hex(body))),
    ]);
    key.jws(&header, &claims)
}

fn text<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{what} is invalid: {key:?} must be a non-empty string"))
}

/// The ids of a `GET /api/v2/auth/bootstrap` answer, after checking that `key` is the
/// credential Core selected for this agent (§1.1).
pub fn okta_ids_from_bootstrap(doc: &Value, key: &RsaKey) -> Result<OktaIds, String> {
    const WHAT: &str = "Core's Okta identity bootstrap answer";
    if doc.get("bootstrap_version") != Some(&json!(1)) {
        return Err(format!(
            "{WHAT} has bootstrap_version {}, this agent supports 1: upgrade the agent to match Core",
            doc.get("bootstrap_version").unwrap_or(&Value::Null)
        ));
    }
    let method = text(doc, "identity_method", WHAT)?;
    if method != "okta_ai_agent" {
        return Err(format!(
            "this OpenBox agent's identity method in Core is {method:?}, not \"okta_ai_agent\": \
             select an Okta credential for it in OpenBox, or configure the matching identity"
        ));
    }
    let okta = doc
        .get("okta")
        .filter(|o| o.is_object())
        .ok_or_else(|| format!("{WHAT} is invalid: \"okta\" must be an object"))?;
    let alg = text(okta, "algorithm", WHAT)?;
    if !alg.eq_ignore_ascii_case("RS256") {
        return Err(format!(
            "the agent's Okta credential uses {alg:?}; only RS256 is supported"
        ));
    }
    if text(okta, "public_jwk_thumbprint", WHAT)? != key.thumbprint() {
        return Err(
            "the configured Okta private key does not match the selected Okta credential for this \
             OpenBox agent: export the private key of the selected credential, or rotate the \
             agent credential"
                .to_owned(),
        );
    }
    Ok(OktaIds {
        openbox_agent_id: text(doc, "openbox_agent_id", WHAT)?.to_owned(),
        organization_id: text(doc, "organization_id", WHAT)?.to_owned(),
        deployment_id: text(doc, "deployment_id", WHAT)?.to_owned(),
        okta_agent_id: text(okta, "external_agent_id", WHAT)?.to_owned(),
        key_id: text(okta, "credential_kid", WHAT)?.to_owned(),
        audience: text(doc, "assertion_audience", WHAT)?.to_owned(),
    })
}

/// What `GET /api/v3/auth/bootstrap` says about the agent's service account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadDoc {
    pub token_endpoint: String,
    pub client_id: String,
    pub kid: String,
}

/// `None` when Core has no v3 for this agent (404, or 409 `workload_identity_unavailable`).
pub fn workload_doc(status: u16, body: &[u8]) -> Result<Option<WorkloadDoc>, BootstrapError> {
    const WHAT: &str = "Core's workload identity bootstrap answer";
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match status {
        404 => return Ok(None),
        409 if super::client::reason_code(body).as_deref()
            == Some("workload_identity_unavailable") =>
        {
            return Ok(None)
        }
        401 | 403 => {
            return Err(BootstrapError::Refused(format!(
                "Core refused the workload identity bootstrap (HTTP {status}{})",
                reason_suffix(body)
            )))
        }
        200 => {}
        s => {
            return Err(BootstrapError::Unavailable(format!(
                "the workload identity bootstrap failed (HTTP {s})"
            )))
        }
    }
    let bad = |m: String| BootstrapError::Refused(m);
    if v.get("bootstrap_version") != Some(&json!(3)) || v.get("contract_version") != Some(&json!(3))
    {
        return Err(bad(format!(
            "{WHAT} has an unsupported bootstrap or contract version (this agent supports 3): \
             upgrade the agent to match Core"
        )));
    }
    let issuer = text(&v, "issuer", WHAT).map_err(bad)?.trim_end_matches('/');
    let token_endpoint = text(&v, "token_endpoint", WHAT).map_err(bad)?;
    for (name, url) in [("issuer", issuer), ("token_endpoint", token_endpoint)] {
        let parsed = reqwest::Url::parse(url)
            .map_err(|_| bad(format!("{WHAT} is invalid: {name} is not an absolute URL")))?;
        let local = matches!(
            parsed.host_str(),
            Some("localhost" | "127.0.0.1" | "[::1]" | "::1")
        );
        if !(parsed.scheme() == "https" || parsed.scheme() == "http" && local)
            || parsed.query().is_some()
            || parsed.fragment().is_some()
        {
            return Err(bad(format!(
                "{WHAT} is invalid: {name} must be an https URL without query or fragment"
            )));
        }
    }
    if token_endpoint != format!("{issuer}/protocol/openid-connect/token") {
        return Err(bad(format!(
            "{WHAT} is invalid: token_endpoint {token_endpoint:?} does not belong to issuer {issuer:?}"
        )));
    }
    Ok(Some(WorkloadDoc {
        token_endpoint: token_endpoint.to_owned(),
        client_id: text(&v, "client_id", WHAT).map_err(bad)?.to_owned(),
        kid: text(&v, "kid", WHAT).map_err(bad)?.to_owned(),
    }))
}

fn reason_suffix(body: &[u8]) -> String {
    super::client::reason_code(body)
        .map(|r| format!(", {r}"))
        .unwrap_or_default()
}

/// A failure to get an identity's credentials before a request.
#[derive(Clone, Debug, PartialEq)]
pub enum BootstrapError {
    /// Core (or the token endpoint) could not be asked or did not answer: try later.
    Unavailable(String),
    /// Core answered no, or something that cannot be used: a hard error.
    Refused(String),
}

/// The form of the token request: an OAuth2 `client_credentials` grant authenticated by
/// an RS256 `private_key_jwt` client assertion (RFC 7523).
pub fn workload_token_form(key: &RsaKey, doc: &WorkloadDoc) -> String {
    let iat = unix_now();
    let header = BTreeMap::from([
        ("alg", json!("RS256")),
        ("kid", json!(doc.kid)),
        ("typ", json!("JWT")),
    ]);
    let claims = BTreeMap::from([
        ("aud", json!(doc.token_endpoint)),
        ("exp", json!(iat + ASSERTION_LIFETIME_SECS)),
        ("iat", json!(iat)),
        ("iss", json!(doc.client_id)),
        ("jti", json!(key.jti())),
        ("sub", json!(doc.client_id)),
    ]);
    let assertion = key.jws(&header, &claims);
    [
        ("grant_type", "client_credentials"),
        ("client_id", doc.client_id.as_str()),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.as_str()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", form_encode(v)))
    .collect::<Vec<_>>()
    .join("&")
}

/// `application/x-www-form-urlencoded` as Python's `urlencode` writes it.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// An access token and until when it may be used (bounded to 300 s).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadToken {
    pub value: String,
    pub expires_at: Instant,
}

impl WorkloadToken {
    pub fn is_fresh(&self, now: Instant) -> bool {
        now + TOKEN_REFRESH_SKEW < self.expires_at
    }
}

pub fn workload_token(
    status: u16,
    body: &[u8],
    now: Instant,
) -> Result<WorkloadToken, BootstrapError> {
    const WHAT: &str = "the workload token endpoint's answer";
    match status {
        400 | 401 | 403 => {
            return Err(BootstrapError::Refused(format!(
                "the workload token exchange was refused (HTTP {status}{}): check that the \
                 workload private key is the one registered for the service account",
                reason_suffix(body)
            )))
        }
        200 => {}
        s => {
            return Err(BootstrapError::Unavailable(format!(
                "the workload token exchange failed (HTTP {s})"
            )))
        }
    }
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let bad = |m: &str| BootstrapError::Refused(format!("{WHAT} is invalid: {m}"));
    let value = text(&v, "access_token", WHAT).map_err(BootstrapError::Refused)?;
    if !v
        .get("token_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return Err(bad("token_type must be Bearer"));
    }
    let expires_in = v
        .get("expires_in")
        .filter(|e| !e.is_boolean())
        .and_then(Value::as_f64)
        .filter(|e| *e > TOKEN_REFRESH_SKEW.as_secs_f64())
        .ok_or_else(|| bad("expires_in is missing or too short"))?;
    Ok(WorkloadToken {
        value: value.to_owned(),
        expires_at: now + Duration::from_secs_f64(expires_in).min(TOKEN_MAX_CACHE),
    })
}

/// A workload client's state between requests.
#[derive(Debug, Default)]
pub struct WorkloadState {
    pub doc: Option<WorkloadDoc>,
    pub token: Option<WorkloadToken>,
    /// Core said it has no v3 for this agent; ask again after this.
    pub unavailable_until: Option<Instant>,
}

/// What a workload client does next, given its state at `now`.
#[derive(Debug, PartialEq)]
pub enum WorkloadStep {
    /// Use this token on the v3 routes.
    Use(String),
    /// No v3 for now: the v1 routes, unsigned.
    Legacy,
    /// Exchange a new token with the known service account.
    Refresh,
    /// Ask Core for the service account first.
    Bootstrap,
}

impl WorkloadState {
    pub fn next_step(&self, now: Instant) -> WorkloadStep {
        if let Some(t) = self.token.as_ref().filter(|t| t.is_fresh(now)) {
            return WorkloadStep::Use(t.value.clone());
        }
        if self.unavailable_until.is_some_and(|u| u > now) {
            return WorkloadStep::Legacy;
        }
        if self.doc.is_some() {
            WorkloadStep::Refresh
        } else {
            WorkloadStep::Bootstrap
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2048-bit test key made for this test run by openssl (none is committed). A
    /// directory of its own: two tests sharing one (named for the process) removed it
    /// under each other, and one of them was skipped.
    fn test_key() -> Option<(RsaKey, String)> {
        let dir = openbox_testkit::TempDir::new("rsa");
        let (_, pem) = openbox_testkit::rsa_key(dir.path(), "key").ok()?;
        Some((RsaKey::from_pem(&pem, "test key").unwrap(), pem))
    }

    fn ids() -> OktaIds {
        OktaIds {
            openbox_agent_id: "agent-1".into(),
            organization_id: "org-1".into(),
            deployment_id: "dep-1".into(),
            okta_agent_id: "wlp-okta-1".into(),
            key_id: "kid-1".into(),
            audience: "https://core.example/agents".into(),
        }
    }

    fn segment(jws: &str, i: usize) -> Value {
        let part = jws.split('.').nth(i).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_okta_assertion_has_the_sdks_header_and_claims_and_verifies_with_the_public_key() {
        let Some((key, _)) = test_key() else {
            eprintln!("skipped: openssl cannot make a test key");
            return;
        };
        let body = br#"{"a":1}"#;
        let jws = okta_assertion_at(
            &key,
            &ids(),
            "obx_test_k",
            "post",
            "/api/v2/governance/evaluate",
            body,
            1_700_000_000,
            "j".repeat(32),
        );
        let header_text = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jws.split('.').next().unwrap())
            .unwrap();
        // Sorted keys, compact: the bytes the SDK would sign.
        assert_eq!(
            header_text,
            br#"{"alg":"RS256","kid":"kid-1","typ":"openbox-agent-proof+jwt"}"#
        );
        let c = segment(&jws, 1);
        assert_eq!(c["iss"], "wlp-okta-1");
        assert_eq!(c["sub"], "wlp-okta-1");
        assert_eq!(c["aud"], "https://core.example/agents");
        assert_eq!(c["obx_api_key_sha256"], sha256_hex(b"obx_test_k"));
        assert_eq!(
            (c["iat"].as_u64(), c["exp"].as_u64()),
            (Some(1_700_000_000), Some(1_700_000_060))
        );
        assert_eq!(c["htm"], "POST");
        assert_eq!(c["htu"], "/api/v2/governance/evaluate");
        assert_eq!(c["body_sha256"], sha256_hex(body));
        let (input, sig) = jws.rsplit_once('.').unwrap();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        let parts: PublicKeyComponents<Vec<u8>> = key.key.public().into();
        parts
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &sig,
            )
            .unwrap();
        assert!(parts
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                b"tampered",
                &sig
            )
            .is_err());
        // A fresh jti each time.
        let a = segment(&okta_assertion(&key, &ids(), "k", "GET", "/p", b""), 1);
        let b = segment(&okta_assertion(&key, &ids(), "k", "GET", "/p", b""), 1);
        assert_ne!(a["jti"], b["jti"]);
        assert_eq!(a["jti"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn bootstrap_answers_are_checked_and_the_key_must_be_the_selected_credential() {
        let Some((key, _)) = test_key() else {
            eprintln!("skipped: openssl cannot make a test key");
            return;
        };
        let doc = |thumb: &str| {
            json!({"bootstrap_version": 1, "identity_method": "okta_ai_agent",
                   "openbox_agent_id": "agent-1", "organization_id": "org-1", "deployment_id": "dep-1",
                   "assertion_audience": "https://core.example/agents",
                   "okta": {"external_agent_id": "wlp-okta-1", "credential_kid": "kid-1",
                            "algorithm": "RS256", "public_jwk_thumbprint": thumb}})
        };
        assert_eq!(
            okta_ids_from_bootstrap(&doc(&key.thumbprint()), &key),
            Ok(ids())
        );
        let e = okta_ids_from_bootstrap(&doc("AAAA"), &key).unwrap_err();
        assert!(
            e.contains("does not match the selected Okta credential"),
            "{e}"
        );
        let mut v2 = doc(&key.thumbprint());
        v2["bootstrap_version"] = json!(2);
        assert!(okta_ids_from_bootstrap(&v2, &key)
            .unwrap_err()
            .contains("upgrade"));
    }

    #[test]
    fn bad_keys_say_what_is_wrong_without_showing_the_key() {
        let e = RsaKey::from_pem("not a key", "okta_agent_private_key")
            .err()
            .unwrap();
        assert!(
            e.starts_with("okta_agent_private_key is not a PKCS8 PEM"),
            "{e}"
        );
    }

    #[test]
    fn workload_bootstrap_404_and_409_mean_no_v3_and_other_refusals_are_hard() {
        assert_eq!(workload_doc(404, b""), Ok(None));
        assert_eq!(
            workload_doc(409, br#"{"reason_code":"workload_identity_unavailable"}"#),
            Ok(None)
        );
        assert!(matches!(
            workload_doc(409, b"{}"),
            Err(BootstrapError::Unavailable(_))
        ));
        assert!(matches!(
            workload_doc(401, b"{}"),
            Err(BootstrapError::Refused(_))
        ));
        assert!(matches!(
            workload_doc(503, b""),
            Err(BootstrapError::Unavailable(_))
        ));
        let ok = json!({"bootstrap_version": 3, "contract_version": 3,
            "issuer": "http://127.0.0.1:9/realms/x",
            "token_endpoint": "http://127.0.0.1:9/realms/x/protocol/openid-connect/token",
            "audience": "a", "client_id": "c", "kid": "k"});
        let doc = workload_doc(200, ok.to_string().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(doc.client_id, "c");
        let mut elsewhere = ok.clone();
        elsewhere["token_endpoint"] =
            json!("http://127.0.0.1:9/other/protocol/openid-connect/token");
        assert!(matches!(
            workload_doc(200, elsewhere.to_string().as_bytes()),
            Err(BootstrapError::Refused(_))
        ));
        let mut plain = ok;
        plain["issuer"] = json!("http://core.example/realms/x");
        plain["token_endpoint"] =
            json!("http://core.example/realms/x/protocol/openid-connect/token");
        assert!(workload_doc(200, plain.to_string().as_bytes()).is_err());
    }

    #[test]
    fn workload_tokens_are_kept_at_most_300_s_and_renewed_30_s_early_and_no_v3_is_asked_again_after_60_s(
    ) {
        let t0 = Instant::now();
        let tok = workload_token(
            200,
            br#"{"access_token":"tok","token_type":"bearer","expires_in":3600}"#,
            t0,
        )
        .unwrap();
        assert_eq!(tok.expires_at, t0 + Duration::from_secs(300));
        assert!(tok.is_fresh(t0 + Duration::from_secs(269)));
        assert!(!tok.is_fresh(t0 + Duration::from_secs(270)));
        assert!(matches!(
            workload_token(
                200,
                br#"{"access_token":"t","token_type":"bearer","expires_in":30}"#,
                t0
            ),
            Err(BootstrapError::Refused(_))
        ));
        assert!(matches!(
            workload_token(401, b"", t0),
            Err(BootstrapError::Refused(_))
        ));

        let mut s = WorkloadState::default();
        assert_eq!(s.next_step(t0), WorkloadStep::Bootstrap);
        s.unavailable_until = Some(t0 + WORKLOAD_RETRY_AFTER);
        assert_eq!(
            s.next_step(t0 + Duration::from_secs(59)),
            WorkloadStep::Legacy
        );
        assert_eq!(
            s.next_step(t0 + Duration::from_secs(60)),
            WorkloadStep::Bootstrap
        );
        s.doc = Some(WorkloadDoc {
            token_endpoint: "e".into(),
            client_id: "c".into(),
            kid: "k".into(),
        });
        s.unavailable_until = None;
        s.token = Some(tok);
        assert_eq!(s.next_step(t0), WorkloadStep::Use("tok".into()));
        assert_eq!(
            s.next_step(t0 + Duration::from_secs(280)),
            WorkloadStep::Refresh
        );
    }

    #[test]
    fn the_token_form_is_url_encoded_like_pythons_urlencode() {
        assert_eq!(form_encode("a b/c:d"), "a+b%2Fc%3Ad");
        assert_eq!(form_encode("x.y-z_~"), "x.y-z_~");
    }
}
