//! The sandbox EHR's SMART Backend Services authorization server — a stand-in, like the
//! sandbox itself, for the token endpoint of a vendor EHR.
//!
//! Clients are registered with their public key(s) as JWKs (EC P-384 for ES384, RSA for
//! RS384). `POST /auth/token` takes the client-credentials grant with a JWT client
//! assertion and checks what a real server checks: `grant_type`, `client_assertion_type`,
//! a `kid` the client registered, `alg` RS384/ES384 matching the key type, the signature
//! (ring), `iss` = `sub` = a registered client id, `aud` = this token endpoint's URL,
//! `exp` in the future and at most five minutes ahead, and a `jti` not seen before
//! (replay). It issues opaque access tokens with a configurable lifetime; when SMART is
//! on, FHIR requests without a live issued token get 401. `/.well-known/smart-configuration`
//! advertises the endpoint. Test controls: `POST /_smart/revoke` revokes every issued
//! token (an EHR-side revocation), `GET /_smart/stats` counts issued tokens and rejections.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use ring::signature;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::smart::{JWT_BEARER, MAX_ASSERTION_LIFETIME};

/// Path of the token endpoint under the sandbox's base URL.
pub const TOKEN_PATH: &str = "/auth/token";

/// Leeway for clock differences on `exp`.
const CLOCK_LEEWAY_SECONDS: i64 = 10;

/// One registered backend client.
#[derive(Debug, Clone)]
pub struct RegisteredClient {
    pub client_id: String,
    /// Public keys as JWKs (each needs `kid`).
    pub keys: Vec<Value>,
}

impl RegisteredClient {
    /// A client from a JWK or a JWKS (`{"keys": [...]}`) document.
    pub fn from_jwk_json(client_id: &str, text: &str) -> Result<RegisteredClient, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not a JWK/JWKS document: {e}"))?;
        let keys = match value["keys"].as_array() {
            Some(keys) => keys.clone(),
            None => vec![value],
        };
        for key in &keys {
            if key["kid"].as_str().is_none() {
                return Err("every registered JWK needs a kid".into());
            }
            match key["kty"].as_str() {
                Some("EC") if key["crv"] == "P-384" => {}
                Some("RSA") => {}
                _ => return Err("only EC P-384 and RSA JWKs are supported".into()),
            }
        }
        Ok(RegisteredClient {
            client_id: client_id.to_string(),
            keys,
        })
    }
}

/// SMART settings of a sandbox instance.
#[derive(Debug, Clone)]
pub struct SandboxSmart {
    pub clients: Vec<RegisteredClient>,
    /// Lifetime of issued access tokens (`expires_in`).
    pub token_lifetime: Duration,
}

impl Default for SandboxSmart {
    fn default() -> Self {
        SandboxSmart {
            clients: vec![],
            token_lifetime: Duration::from_secs(300),
        }
    }
}

struct Issued {
    expires_at: Instant,
}

#[derive(Default)]
struct Ledger {
    tokens: HashMap<String, Issued>,
    /// (iss, jti) → exp (unix seconds), kept until the assertion could no longer pass.
    seen_jti: HashMap<(String, String), i64>,
    issued: u64,
    revoked: u64,
    rejected: BTreeMap<String, u64>,
}

/// The running authorization server state.
pub struct SmartServer {
    config: SandboxSmart,
    ledger: Mutex<Ledger>,
    rng: ring::rand::SystemRandom,
}

fn oauth_error(status: StatusCode, error: &str, description: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": description.into()})),
    )
        .into_response()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Parses `application/x-www-form-urlencoded`.
fn form_decode(body: &[u8]) -> HashMap<String, String> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 3 <= bytes.len()
                && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
                && let Ok(byte) = u8::from_str_radix(hex, 16)
            {
                out.push(byte);
                i += 3;
                continue;
            }
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

/// Verifies a JWS signature with a public JWK.
fn verify_signature(
    jwk: &Value,
    alg: &str,
    signing_input: &[u8],
    signature_bytes: &[u8],
) -> Result<(), String> {
    let part = |name: &str| {
        jwk[name]
            .as_str()
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .ok_or_else(|| format!("registered key lacks {name}"))
    };
    match (alg, jwk["kty"].as_str()) {
        ("ES384", Some("EC")) => {
            let mut point = vec![4u8];
            point.extend(part("x")?);
            point.extend(part("y")?);
            signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(signing_input, signature_bytes)
                .map_err(|_| "signature does not verify".to_string())
        }
        ("RS384", Some("RSA")) => signature::RsaPublicKeyComponents {
            n: part("n")?,
            e: part("e")?,
        }
        .verify(
            &signature::RSA_PKCS1_2048_8192_SHA384,
            signing_input,
            signature_bytes,
        )
        .map_err(|_| "signature does not verify".to_string()),
        (alg, kty) => Err(format!(
            "alg {alg} does not fit the registered key type {kty:?}"
        )),
    }
}

impl SmartServer {
    pub fn new(config: SandboxSmart) -> SmartServer {
        SmartServer {
            config,
            ledger: Mutex::new(Ledger::default()),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// Whether `token` is a live access token this server issued.
    pub fn accepts(&self, token: &str) -> bool {
        let ledger = self.ledger.lock().expect("smart ledger");
        ledger
            .tokens
            .get(token)
            .is_some_and(|issued| Instant::now() < issued.expires_at)
    }

    pub fn well_known(&self, base_url: &str) -> Response {
        axum::Json(json!({
            "issuer": base_url,
            "token_endpoint": format!("{base_url}{TOKEN_PATH}"),
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.cu"],
            "capabilities": ["client-confidential-asymmetric"],
        }))
        .into_response()
    }

    pub fn stats(&self) -> Response {
        let ledger = self.ledger.lock().expect("smart ledger");
        let now = Instant::now();
        axum::Json(json!({
            "issued": ledger.issued,
            "active": ledger.tokens.values().filter(|t| now < t.expires_at).count(),
            "revoked": ledger.revoked,
            "rejected": ledger.rejected,
        }))
        .into_response()
    }

    pub fn revoke_all(&self) -> Response {
        let mut ledger = self.ledger.lock().expect("smart ledger");
        ledger.revoked += ledger.tokens.len() as u64;
        ledger.tokens.clear();
        StatusCode::NO_CONTENT.into_response()
    }

    /// `POST /auth/token`.
    pub fn token(&self, base_url: &str, body: Bytes) -> Response {
        let token_url = format!("{base_url}{TOKEN_PATH}");
        match self.check_request(&token_url, &body) {
            Ok(scope) => self.issue(scope),
            Err((status, error, description)) => {
                tracing::info!(%error, %description, "sandbox SMART token request refused");
                *self
                    .ledger
                    .lock()
                    .expect("smart ledger")
                    .rejected
                    .entry(error.to_string())
                    .or_default() += 1;
                oauth_error(status, error, description)
            }
        }
    }

    fn issue(&self, scope: String) -> Response {
        let mut bytes = [0u8; 32];
        if self.rng.fill(&mut bytes).is_err() {
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "no randomness",
            );
        }
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let lifetime = self.config.token_lifetime;
        {
            let mut ledger = self.ledger.lock().expect("smart ledger");
            let now = Instant::now();
            ledger.tokens.retain(|_, t| now < t.expires_at);
            ledger.tokens.insert(
                token.clone(),
                Issued {
                    expires_at: now + lifetime,
                },
            );
            ledger.issued += 1;
        }
        (
            StatusCode::OK,
            [(axum::http::header::CACHE_CONTROL, "no-store")],
            axum::Json(json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": lifetime.as_secs(),
                "scope": scope,
            })),
        )
            .into_response()
    }

    /// Every check of the request; the granted scope, or (status, OAuth error, why).
    fn check_request(
        &self,
        token_url: &str,
        body: &[u8],
    ) -> Result<String, (StatusCode, &'static str, String)> {
        let bad = StatusCode::BAD_REQUEST;
        let form = form_decode(body);
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return Err((
                bad,
                "unsupported_grant_type",
                "grant_type must be client_credentials".into(),
            ));
        }
        if form.get("client_assertion_type").map(String::as_str) != Some(JWT_BEARER) {
            return Err((
                bad,
                "invalid_request",
                format!("client_assertion_type must be {JWT_BEARER}"),
            ));
        }
        let scope = form.get("scope").cloned().unwrap_or_default();
        if scope.is_empty() || !scope.split(' ').all(|s| s.starts_with("system/")) {
            return Err((
                bad,
                "invalid_scope",
                "backend services request system/ scopes".into(),
            ));
        }
        let assertion = form.get("client_assertion").ok_or((
            bad,
            "invalid_request",
            "client_assertion is missing".to_string(),
        ))?;
        let invalid = |why: String| (StatusCode::UNAUTHORIZED, "invalid_client", why);
        let parts: Vec<&str> = assertion.split('.').collect();
        let [header_part, payload_part, signature_part] = parts.as_slice() else {
            return Err(invalid("the assertion is not a compact JWS".into()));
        };
        let decode_json = |part: &str| -> Option<Value> {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
        };
        let header = decode_json(header_part)
            .ok_or_else(|| invalid("the JWT header is unreadable".into()))?;
        let claims = decode_json(payload_part)
            .ok_or_else(|| invalid("the JWT claims are unreadable".into()))?;
        let signature_bytes = URL_SAFE_NO_PAD
            .decode(signature_part)
            .map_err(|_| invalid("the JWT signature is not base64url".into()))?;
        let alg = header["alg"].as_str().unwrap_or_default();
        if !matches!(alg, "RS384" | "ES384") {
            return Err(invalid(format!("alg {alg:?} is not RS384 or ES384")));
        }
        let kid = header["kid"]
            .as_str()
            .ok_or_else(|| invalid("the JWT header has no kid".into()))?;
        let issuer = claims["iss"].as_str().unwrap_or_default();
        if claims["sub"].as_str() != Some(issuer) {
            return Err(invalid("iss and sub must both be the client id".into()));
        }
        let client = self
            .config
            .clients
            .iter()
            .find(|c| c.client_id == issuer)
            .ok_or_else(|| invalid(format!("unknown client {issuer:?}")))?;
        let key = client
            .keys
            .iter()
            .find(|k| k["kid"].as_str() == Some(kid))
            .ok_or_else(|| invalid(format!("client {issuer:?} registered no key {kid:?}")))?;
        verify_signature(
            key,
            alg,
            format!("{header_part}.{payload_part}").as_bytes(),
            &signature_bytes,
        )
        .map_err(invalid)?;
        let audience_matches = match &claims["aud"] {
            Value::String(aud) => aud == token_url,
            Value::Array(auds) => auds.iter().any(|a| a.as_str() == Some(token_url)),
            _ => false,
        };
        if !audience_matches {
            return Err(invalid(format!("aud must be {token_url}")));
        }
        let now = unix_now();
        let exp = claims["exp"]
            .as_i64()
            .ok_or_else(|| invalid("exp is missing".into()))?;
        if exp + CLOCK_LEEWAY_SECONDS <= now {
            return Err(invalid("the assertion expired".into()));
        }
        if exp > now + MAX_ASSERTION_LIFETIME.as_secs() as i64 + CLOCK_LEEWAY_SECONDS {
            return Err(invalid(
                "exp is more than five minutes in the future".into(),
            ));
        }
        let jti = claims["jti"]
            .as_str()
            .filter(|j| !j.is_empty())
            .ok_or_else(|| invalid("jti is missing".into()))?;
        let mut ledger = self.ledger.lock().expect("smart ledger");
        ledger
            .seen_jti
            .retain(|_, expires| *expires + CLOCK_LEEWAY_SECONDS > now);
        if ledger
            .seen_jti
            .insert((issuer.to_string(), jti.to_string()), exp)
            .is_some()
        {
            return Err(invalid("jti was already used (replay)".into()));
        }
        Ok(scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_bodies_decode() {
        let form = form_decode(b"a=b%2Fc&scope=system%2F%2A.rs+x&empty=");
        assert_eq!(form["a"], "b/c");
        assert_eq!(form["scope"], "system/*.rs x");
        assert_eq!(form["empty"], "");
    }

    #[test]
    fn registration_needs_a_kid_and_a_supported_key_type() {
        assert!(RegisteredClient::from_jwk_json("c", r#"{"kty":"EC","crv":"P-384"}"#).is_err());
        assert!(
            RegisteredClient::from_jwk_json("c", r#"{"kty":"oct","kid":"k","k":"x"}"#).is_err()
        );
        let jwks = r#"{"keys":[{"kty":"EC","crv":"P-384","kid":"k","x":"a","y":"b"}]}"#;
        assert_eq!(
            RegisteredClient::from_jwk_json("c", jwks)
                .unwrap()
                .keys
                .len(),
            1
        );
    }
}
