//! Request signing with the agent's identity (`openbox-core-protocol.md` §1.3, SDK 2.0).
//!
//! The OpenBox DID mode: `agent_did` (`did:aip:<uuid>`) and an Ed25519 key given as the
//! base64 of its raw 32-byte seed. Every request to Core — the start-up validate, evaluate
//! and approval, whichever conventions the worker follows — carries five `X-OpenBox-*`
//! headers: the DID, a Python-`isoformat` UTC timestamp, a 24-byte random nonce
//! (base64url, unpadded), the body's SHA-256 (hex) and the Ed25519 signature (padded
//! base64) over `METHOD\npath\ntimestamp\nnonce\nsha256`.
//!
//! The identity is the operator's: it comes from the agent's flags, environment or
//! config file, never from a worker (a hook's settings cannot name a key, and nothing is
//! read from workflow history). SDK 2.0's other modes (Okta AI Agent on API v2 routes,
//! workload identity on v3) are refused at start-up with an error saying so.

use std::{fmt, time::SystemTime};

use base64::Engine;
use ring::{
    rand::{SecureRandom, SystemRandom},
    signature::{Ed25519KeyPair, KeyPair},
};

use super::clock;

pub const HEADER_DID: &str = "X-OpenBox-Agent-DID";
pub const HEADER_TIMESTAMP: &str = "X-OpenBox-Agent-Timestamp";
pub const HEADER_NONCE: &str = "X-OpenBox-Agent-Nonce";
pub const HEADER_SIGNATURE: &str = "X-OpenBox-Agent-Signature";
pub const HEADER_BODY_SHA256: &str = "X-OpenBox-Body-SHA256";

/// A checked DID and its loaded key. The seed is not kept.
pub struct DidSigner {
    did: String,
    key: Ed25519KeyPair,
    rng: SystemRandom,
}

impl fmt::Debug for DidSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("DidSigner")
            .field("did", &self.did)
            .finish_non_exhaustive()
    }
}

impl PartialEq for DidSigner {
    fn eq(&self, other: &Self) -> bool {
        self.did == other.did && self.key.public_key().as_ref() == other.key.public_key().as_ref()
    }
}

impl DidSigner {
    /// `seed_b64` is the base64 of the raw 32-byte seed (surrounding whitespace, as in a
    /// key file ending in a newline, is ignored). The errors never show key bytes.
    pub fn new(did: &str, seed_b64: &str) -> Result<DidSigner, String> {
        check_did(did)?;
        let seed = base64::engine::general_purpose::STANDARD
            .decode(seed_b64.trim())
            .map_err(|_| {
                "the agent private key is not valid base64 (key bytes not shown)".to_owned()
            })?;
        if seed.len() != 32 {
            return Err(format!(
                "the agent private key must be the base64 of a raw 32-byte Ed25519 seed, not {} bytes \
                 (a PKCS8 or PEM key is not accepted; key bytes not shown)",
                seed.len()
            ));
        }
        let key = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| "the agent private key is not a usable Ed25519 seed".to_owned())?;
        Ok(DidSigner {
            did: did.to_owned(),
            key,
            rng: SystemRandom::new(),
        })
    }

    pub fn did(&self) -> &str {
        &self.did
    }

    /// The public key (raw 32 bytes), for Core's registration of the DID.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// The five signing headers of one request. `path` has no host and no query.
    pub fn headers(&self, method: &str, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        let timestamp = clock::python_isoformat_utc(SystemTime::now());
        let mut nonce = [0u8; 24];
        // The system's random source does not fail on Linux once booted; a zero nonce
        // would only make Core refuse the request as replayed.
        let _ = self.rng.fill(&mut nonce);
        let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(nonce);
        self.headers_at(method, path, body, timestamp, nonce)
    }

    fn headers_at(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        timestamp: String,
        nonce: String,
    ) -> Vec<(&'static str, String)> {
        let sha = sha256_hex(body);
        let canonical = canonical_string(method, path, &timestamp, &nonce, &sha);
        let signature = base64::engine::general_purpose::STANDARD
            .encode(self.key.sign(canonical.as_bytes()).as_ref());
        vec![
            (HEADER_DID, self.did.clone()),
            (HEADER_TIMESTAMP, timestamp),
            (HEADER_NONCE, nonce),
            (HEADER_SIGNATURE, signature),
            (HEADER_BODY_SHA256, sha),
        ]
    }
}

/// The string Core verifies: the five parts joined with `\n`, no trailing newline.
pub fn canonical_string(
    method: &str,
    path: &str,
    timestamp: &str,
    nonce: &str,
    sha: &str,
) -> String {
    [&method.to_uppercase(), path, timestamp, nonce, sha].join("\n")
}

pub fn sha256_hex(body: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `did:aip:<uuid>`, the UUID in its usual hyphenated form or as 32 hex digits.
fn check_did(did: &str) -> Result<(), String> {
    let wrong = || {
        format!(
            "agent_did must look like did:aip:<uuid> (e.g. did:aip:0f8e2c1a-6b7d-4e3f-9a21-5c4d3b2a1f00), not {:?}",
            did.chars().take(48).collect::<String>()
        )
    };
    let uuid = did.strip_prefix("did:aip:").ok_or_else(wrong)?;
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uuid.split('-').collect();
    let ok = match groups.as_slice() {
        [one] => one.len() == 32 && hex(one),
        [a, b, c, d, e] => {
            [a.len(), b.len(), c.len(), d.len(), e.len()] == [8, 4, 4, 4, 12]
                && groups.iter().all(|g| hex(g))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(wrong())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:aip:0f8e2c1a-6b7d-4e3f-9a21-5c4d3b2a1f00";

    fn seed_b64(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn headers_sign_the_canonical_string_and_verify_with_the_public_key() {
        let s = DidSigner::new(DID, &format!("{}\n", seed_b64(7))).unwrap();
        let body = br#"{"a":1}"#;
        let h = s.headers_at(
            "post",
            "/api/v1/governance/evaluate",
            body,
            "2026-09-21T10:00:00.123456+00:00".into(),
            "n".repeat(32),
        );
        let get = |name: &str| h.iter().find(|(k, _)| *k == name).unwrap().1.clone();
        assert_eq!(get(HEADER_DID), DID);
        assert_eq!(get(HEADER_BODY_SHA256), sha256_hex(body));
        let canonical = format!(
            "POST\n/api/v1/governance/evaluate\n2026-09-21T10:00:00.123456+00:00\n{}\n{}",
            "n".repeat(32),
            sha256_hex(body)
        );
        let sig = base64::engine::general_purpose::STANDARD
            .decode(get(HEADER_SIGNATURE))
            .unwrap();
        let public =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, s.public_key());
        public.verify(canonical.as_bytes(), &sig).unwrap();
        assert!(public.verify(b"tampered", &sig).is_err());
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn fresh_headers_have_a_new_32_character_nonce_each_time() {
        let s = DidSigner::new(DID, &seed_b64(1)).unwrap();
        let nonce =
            |h: Vec<(&str, String)>| h.into_iter().find(|(k, _)| *k == HEADER_NONCE).unwrap().1;
        let (a, b) = (
            nonce(s.headers("GET", "/p", b"")),
            nonce(s.headers("GET", "/p", b"")),
        );
        assert_eq!(a.len(), 32);
        assert!(!a.contains('=') && !a.contains('+') && !a.contains('/'));
        assert_ne!(a, b);
    }

    #[test]
    fn bad_dids_and_keys_say_what_is_wrong_without_showing_the_key() {
        let e = DidSigner::new("did:web:x", &seed_b64(1)).unwrap_err();
        assert!(e.contains("did:aip:<uuid>"), "{e}");
        assert!(DidSigner::new("did:aip:0f8e2c1a6b7d4e3f9a215c4d3b2a1f00", &seed_b64(1)).is_ok());
        assert!(DidSigner::new("did:aip:0f8e2c1a-6b7d", &seed_b64(1)).is_err());
        let e = DidSigner::new(DID, "not base64!!").unwrap_err();
        assert!(e.contains("not valid base64"), "{e}");
        let short = base64::engine::general_purpose::STANDARD.encode([9u8; 16]);
        let e = DidSigner::new(DID, &short).unwrap_err();
        assert!(e.contains("not 16 bytes") && !e.contains(&short), "{e}");
        let s = DidSigner::new(DID, &seed_b64(3)).unwrap();
        assert!(!format!("{s:?}").contains(&seed_b64(3)));
    }
}
