//! SMART Backend Services authorization (the client-credentials grant with a signed JWT
//! client assertion, `private_key_jwt`), so the connector can authenticate to a real EHR
//! without a human in the loop.
//!
//! Flow (SMART App Launch 2.x, "Backend Services"): build a JWT whose header carries
//! `alg` (RS384 or ES384) and `kid`, and whose claims are `iss` = `sub` = client id,
//! `aud` = the token endpoint URL, `exp` at most five minutes ahead and a unique `jti`;
//! sign it with the client's private key; `POST` it to the token endpoint as
//! `grant_type=client_credentials&scope=…&client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer&client_assertion=<jwt>`;
//! use the returned access token as a bearer token until shortly before it expires.
//!
//! Signing uses `ring` (already in the tree through rustls; STACK.md: no aws-lc). Keys
//! come from a PKCS#8 file (PEM or DER; a PKCS#1 RSA PEM also works).
//!
//! Concurrency: [`SmartAuth::access_token`] serves the cached token to every caller;
//! when it is missing or about to expire, one caller refreshes under an async mutex and
//! the others wait for that refresh instead of starting their own. A token the EHR
//! refuses with 401 is dropped with [`SmartAuth::invalidate`] (only if it is still the
//! cached one, so a burst of 401s causes one refresh, not one each).
//!
//! Secrets: the private key and access tokens never print — [`SigningKey`] and
//! [`SmartConfig`] show only the algorithm and key id, tokens are [`Secret`]s, and no
//! error message carries either.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::client::Secret;

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The longest assertion lifetime SMART allows (`exp` ≤ now + 5 minutes).
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// JWS algorithms SMART Backend Services requires servers to support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-384 (RSA key, ≥ 2048 bits).
    Rs384,
    /// ECDSA on P-384 with SHA-384 (fixed-size r‖s signature, as JWS wants).
    Es384,
}

impl SigningAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::Rs384 => "RS384",
            SigningAlgorithm::Es384 => "ES384",
        }
    }
}

impl std::str::FromStr for SigningAlgorithm {
    type Err = SmartError;
    fn from_str(text: &str) -> Result<Self, SmartError> {
        match text.trim().to_ascii_uppercase().as_str() {
            "RS384" => Ok(SigningAlgorithm::Rs384),
            "ES384" => Ok(SigningAlgorithm::Es384),
            other => Err(SmartError::Key(format!(
                "unsupported signing algorithm {other:?}; use RS384 or ES384"
            ))),
        }
    }
}

impl std::fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why SMART authorization failed, and what a caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmartError {
    /// The key file or algorithm is unusable: fix the configuration (start-up error).
    #[error("SMART signing key: {0}")]
    Key(String),
    /// The token endpoint refused the client (`invalid_client`, `invalid_scope`, …): a
    /// wrong key, client id, audience, clock or scope. Retrying unchanged fails the same
    /// way; the write is dead until the registration or configuration is fixed.
    #[error("SMART token endpoint refused the client (HTTP {status}): {error}: {description}")]
    Rejected {
        status: u16,
        error: String,
        description: String,
    },
    /// The token endpoint is unreachable or failing (5xx, 429, timeout): retry later.
    #[error("SMART token endpoint unavailable: {0}")]
    Unavailable(String),
    /// The token endpoint answered 2xx with something that is not a token response.
    #[error("SMART token response unusable: {0}")]
    InvalidResponse(String),
}

impl SmartError {
    /// Whether retrying later may succeed without a configuration change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SmartError::Unavailable(_))
    }

    /// The HTTP status the token endpoint answered, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            SmartError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

enum KeyMaterial {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A client's private signing key. `Debug` shows the algorithm and key id only.
pub struct SigningKey {
    algorithm: SigningAlgorithm,
    kid: String,
    material: KeyMaterial,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field("private_key", &"***")
            .finish()
    }
}

/// The DER bytes inside a PEM file (`-----BEGIN <label>-----`), or the input itself
/// when it is not PEM. Returns the label too.
fn pem_or_der(bytes: &[u8]) -> Result<(Option<String>, Vec<u8>), SmartError> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok((None, bytes.to_vec()));
    };
    let Some(start) = text.find("-----BEGIN ") else {
        return Ok((None, bytes.to_vec()));
    };
    let rest = &text[start + "-----BEGIN ".len()..];
    let label_end = rest
        .find("-----")
        .ok_or_else(|| SmartError::Key("malformed PEM header".into()))?;
    let label = rest[..label_end].to_string();
    let body_start = label_end + 5;
    let end_marker = format!("-----END {label}-----");
    let body_end = rest
        .find(&end_marker)
        .ok_or_else(|| SmartError::Key(format!("PEM block {label} has no END line")))?;
    let body: String = rest[body_start..body_end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = STANDARD
        .decode(body)
        .map_err(|_| SmartError::Key(format!("PEM block {label} is not valid base64")))?;
    Ok((Some(label), der))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// Parses a private key (PKCS#8 PEM or DER; PKCS#1 `RSA PRIVATE KEY` PEM). With
    /// `algorithm` unset, the key type decides (EC P-384 → ES384, RSA → RS384). With
    /// `kid` unset, the key id is the RFC 7638 JWK thumbprint of the public key.
    pub fn from_bytes(
        bytes: &[u8],
        algorithm: Option<SigningAlgorithm>,
        kid: Option<String>,
    ) -> Result<SigningKey, SmartError> {
        let (label, der) = pem_or_der(bytes)?;
        if label.as_deref() == Some("EC PRIVATE KEY") {
            return Err(SmartError::Key(
                "SEC1 EC keys are not supported; convert with `openssl pkcs8 -topk8 -nocrypt`"
                    .into(),
            ));
        }
        let rng = SystemRandom::new();
        let try_ec = || {
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &der, &rng)
                .map(KeyMaterial::Ec)
        };
        let try_rsa = || {
            if label.as_deref() == Some("RSA PRIVATE KEY") {
                RsaKeyPair::from_der(&der)
            } else {
                RsaKeyPair::from_pkcs8(&der)
            }
            .map(KeyMaterial::Rsa)
        };
        let material = match algorithm {
            Some(SigningAlgorithm::Es384) => try_ec()
                .map_err(|e| SmartError::Key(format!("not a PKCS#8 P-384 EC private key ({e})")))?,
            Some(SigningAlgorithm::Rs384) => try_rsa().map_err(|e| {
                SmartError::Key(format!("not a PKCS#8 RSA private key of 2048+ bits ({e})"))
            })?,
            None => try_ec().or_else(|_| try_rsa()).map_err(|_| {
                SmartError::Key("neither a PKCS#8 P-384 EC key nor an RSA key of 2048+ bits".into())
            })?,
        };
        let algorithm = match material {
            KeyMaterial::Ec(_) => SigningAlgorithm::Es384,
            KeyMaterial::Rsa(_) => SigningAlgorithm::Rs384,
        };
        let mut key = SigningKey {
            algorithm,
            kid: String::new(),
            material,
            rng,
        };
        key.kid = kid.unwrap_or_else(|| key.thumbprint());
        Ok(key)
    }

    /// Reads the key from a file (see [`SigningKey::from_bytes`]).
    pub fn load(
        path: &std::path::Path,
        algorithm: Option<SigningAlgorithm>,
        kid: Option<String>,
    ) -> Result<SigningKey, SmartError> {
        let bytes = std::fs::read(path)
            .map_err(|e| SmartError::Key(format!("reading {}: {e}", path.display())))?;
        SigningKey::from_bytes(&bytes, algorithm, kid)
    }

    /// A fresh P-384 key (tests, the embedded sandbox client). Returns the key and its
    /// PKCS#8 DER so it can be written to a file.
    pub fn generate_es384(kid: Option<String>) -> Result<(SigningKey, Vec<u8>), SmartError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
            .map_err(|_| SmartError::Key("generating a P-384 key failed".into()))?;
        let der = pkcs8.as_ref().to_vec();
        Ok((
            SigningKey::from_bytes(&der, Some(SigningAlgorithm::Es384), kid)?,
            der,
        ))
    }

    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (what the client registers with the EHR, e.g. in a JWKS).
    pub fn public_jwk(&self) -> Value {
        let mut jwk = self.public_members();
        jwk["alg"] = json!(self.algorithm.as_str());
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk
    }

    /// The required members only, in RFC 7638 order.
    fn public_members(&self) -> Value {
        match &self.material {
            KeyMaterial::Ec(pair) => {
                // Uncompressed point: 0x04 ‖ x ‖ y (48 bytes each on P-384).
                let point = pair.public_key().as_ref();
                json!({"crv": "P-384", "kty": "EC", "x": b64(&point[1..49]), "y": b64(&point[49..97])})
            }
            KeyMaterial::Rsa(pair) => {
                let components: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
                json!({"e": b64(&components.e), "kty": "RSA", "n": b64(&components.n)})
            }
        }
    }

    /// RFC 7638 JWK thumbprint (SHA-256, base64url).
    fn thumbprint(&self) -> String {
        // serde_json without preserve_order sorts keys, which is the RFC's order; build
        // the string by hand anyway so a workspace feature change cannot alter it.
        let members = self.public_members();
        let object = members.as_object().expect("jwk object");
        let mut names: Vec<&String> = object.keys().collect();
        names.sort();
        let canonical = format!(
            "{{{}}}",
            names
                .iter()
                .map(|name| format!("\"{name}\":{}", object[name.as_str()]))
                .collect::<Vec<_>>()
                .join(",")
        );
        b64(&Sha256::digest(canonical.as_bytes()))
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SmartError> {
        match &self.material {
            KeyMaterial::Ec(pair) => pair
                .sign(&self.rng, message)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| SmartError::Key("ES384 signing failed".into())),
            KeyMaterial::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &signature::RSA_PKCS1_SHA384,
                    &self.rng,
                    message,
                    &mut signature,
                )
                .map_err(|_| SmartError::Key("RS384 signing failed".into()))?;
                Ok(signature)
            }
        }
    }
}

/// Claims of one client assertion. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionClaims {
    pub client_id: String,
    pub audience: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub jti: String,
}

impl AssertionClaims {
    /// Claims for an assertion made now that lives `lifetime` (capped at five minutes).
    pub fn new(client_id: &str, audience: &str, lifetime: Duration) -> AssertionClaims {
        let now = unix_now();
        AssertionClaims {
            client_id: client_id.to_string(),
            audience: audience.to_string(),
            issued_at: now,
            expires_at: now + lifetime.min(MAX_ASSERTION_LIFETIME).as_secs() as i64,
            jti: uuid::Uuid::new_v4().to_string(),
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A signed compact JWS client assertion (pure apart from the signature's randomness).
pub fn client_assertion(key: &SigningKey, claims: &AssertionClaims) -> Result<String, SmartError> {
    let header = json!({"alg": key.algorithm.as_str(), "kid": key.kid, "typ": "JWT"});
    let payload = json!({
        "iss": claims.client_id,
        "sub": claims.client_id,
        "aud": claims.audience,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
        "jti": claims.jti,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let signature = key.sign(signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", b64(&signature)))
}

/// `application/x-www-form-urlencoded` of the pairs.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    let encode = |text: &str| {
        let mut out = String::with_capacity(text.len());
        for byte in text.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                out.push(byte as char);
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
        out
    };
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A token endpoint's answer.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    pub access_token: Secret,
    pub expires_in: Duration,
    pub scope: Option<String>,
}

/// One client-credentials request with a prepared assertion. Typed errors: a 4xx is
/// [`SmartError::Rejected`] (with the OAuth `error` and description), a 5xx, 429 or
/// transport failure [`SmartError::Unavailable`].
pub async fn request_token(
    http: &reqwest::Client,
    token_url: &str,
    scope: &str,
    assertion: &str,
) -> Result<TokenResponse, SmartError> {
    let body = form_encode(&[
        ("grant_type", "client_credentials"),
        ("scope", scope),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion),
    ]);
    let response = http
        .post(token_url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| SmartError::Unavailable(format!("POST {token_url}: {e}")))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| SmartError::Unavailable(format!("POST {token_url}: reading the body: {e}")))?;
    let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        return Err(SmartError::Unavailable(format!(
            "POST {token_url}: HTTP {}",
            status.as_u16()
        )));
    }
    if !status.is_success() {
        return Err(SmartError::Rejected {
            status: status.as_u16(),
            error: parsed["error"].as_str().unwrap_or("unknown").to_string(),
            description: parsed["error_description"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(200).collect()),
        });
    }
    let access_token = parsed["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| SmartError::InvalidResponse("no access_token".into()))?;
    if !parsed["token_type"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return Err(SmartError::InvalidResponse(
            "token_type is not bearer".into(),
        ));
    }
    let expires_in = parsed["expires_in"]
        .as_u64()
        .ok_or_else(|| SmartError::InvalidResponse("no expires_in".into()))?;
    Ok(TokenResponse {
        access_token: Secret::new(access_token),
        expires_in: Duration::from_secs(expires_in),
        scope: parsed["scope"].as_str().map(str::to_string),
    })
}

/// The token endpoint a FHIR server advertises in `/.well-known/smart-configuration`.
pub async fn discover_token_endpoint(
    fhir_base_url: &str,
    timeout: Duration,
) -> Result<String, SmartError> {
    crate::client::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| SmartError::Unavailable(format!("building the HTTP client: {e}")))?;
    let url = format!(
        "{}/.well-known/smart-configuration",
        fhir_base_url.trim_end_matches('/')
    );
    let response = http
        .get(&url)
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| SmartError::Unavailable(format!("GET {url}: {e}")))?;
    if !response.status().is_success() {
        return Err(SmartError::Unavailable(format!(
            "GET {url}: HTTP {}",
            response.status().as_u16()
        )));
    }
    let body: Value = response
        .json()
        .await
        .map_err(|e| SmartError::InvalidResponse(format!("GET {url}: {e}")))?;
    body["token_endpoint"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| SmartError::InvalidResponse(format!("{url} names no token_endpoint")))
}

/// Settings of one SMART Backend Services client. `Debug` never shows the key.
#[derive(Clone)]
pub struct SmartConfig {
    pub client_id: String,
    /// The authorization server's token endpoint.
    pub token_url: String,
    /// e.g. `system/Appointment.cu system/Encounter.cu …` or `system/*.cruds`.
    pub scope: String,
    pub key: std::sync::Arc<SigningKey>,
    /// The assertion's `aud`; the token URL when unset (what SMART specifies).
    pub audience: Option<String>,
    /// Refresh when less than this is left (halved for tokens shorter than twice it).
    pub refresh_margin: Duration,
    /// Lifetime of each assertion (capped at [`MAX_ASSERTION_LIFETIME`]).
    pub assertion_lifetime: Duration,
    pub timeout: Duration,
}

impl SmartConfig {
    pub fn new(
        client_id: impl Into<String>,
        token_url: impl Into<String>,
        scope: impl Into<String>,
        key: SigningKey,
    ) -> SmartConfig {
        SmartConfig {
            client_id: client_id.into(),
            token_url: token_url.into(),
            scope: scope.into(),
            key: std::sync::Arc::new(key),
            audience: None,
            refresh_margin: Duration::from_secs(60),
            assertion_lifetime: Duration::from_secs(240),
            timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for SmartConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartConfig")
            .field("client_id", &self.client_id)
            .field("token_url", &self.token_url)
            .field("scope", &self.scope)
            .field("key", &self.key)
            .field("audience", &self.audience)
            .field("refresh_margin", &self.refresh_margin)
            .finish()
    }
}

struct CachedToken {
    token: Secret,
    refresh_at: Instant,
    expires_at: Instant,
}

/// A SMART Backend Services client: hands out a cached access token, refreshing it
/// before expiry; concurrent callers share one refresh.
pub struct SmartAuth {
    config: SmartConfig,
    http: reqwest::Client,
    cached: Mutex<Option<CachedToken>>,
    refresh: tokio::sync::Mutex<()>,
    fetched: AtomicU64,
}

impl std::fmt::Debug for SmartAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartAuth")
            .field("config", &self.config)
            .field("tokens_fetched", &self.tokens_fetched())
            .finish()
    }
}

impl SmartAuth {
    pub fn new(config: SmartConfig) -> Result<SmartAuth, SmartError> {
        crate::client::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| SmartError::Key(format!("building the HTTP client: {e}")))?;
        Ok(SmartAuth {
            config,
            http,
            cached: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
            fetched: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &SmartConfig {
        &self.config
    }

    /// How many tokens this client obtained from the token endpoint.
    pub fn tokens_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    fn fresh(&self) -> Option<Secret> {
        let cached = self.cached.lock().expect("token cache");
        cached
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// A valid access token: the cached one unless it is within the refresh margin of
    /// expiry; otherwise one caller fetches a new one while the others wait for it.
    pub async fn access_token(&self) -> Result<Secret, SmartError> {
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let _refreshing = self.refresh.lock().await;
        // Someone else may have refreshed while we waited.
        if let Some(token) = self.fresh() {
            return Ok(token);
        }
        let audience = self
            .config
            .audience
            .as_deref()
            .unwrap_or(&self.config.token_url);
        let claims = AssertionClaims::new(
            &self.config.client_id,
            audience,
            self.config.assertion_lifetime,
        );
        let assertion = client_assertion(&self.config.key, &claims)?;
        let requested_at = Instant::now();
        let response = request_token(
            &self.http,
            &self.config.token_url,
            &self.config.scope,
            &assertion,
        )
        .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                // A token that may still be valid is better than none on an outage.
                if error.is_retryable() {
                    let cached = self.cached.lock().expect("token cache");
                    if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.expires_at) {
                        tracing::warn!(%error, "SMART token refresh failed; using the current token until it expires");
                        return Ok(c.token.clone());
                    }
                }
                return Err(error);
            }
        };
        self.fetched.fetch_add(1, Ordering::Relaxed);
        let margin = self.config.refresh_margin.min(response.expires_in / 2);
        let expires_at = requested_at + response.expires_in;
        let token = response.access_token.clone();
        *self.cached.lock().expect("token cache") = Some(CachedToken {
            token: response.access_token,
            refresh_at: expires_at - margin,
            expires_at,
        });
        tracing::debug!(client_id = %self.config.client_id, expires_in = ?response.expires_in, "SMART access token obtained");
        Ok(token)
    }

    /// Drops `rejected` from the cache if it is still the cached token (the EHR said
    /// 401 to it: expired early or revoked). The next [`SmartAuth::access_token`]
    /// fetches a new one; a burst of 401s for one token causes one refresh.
    pub fn invalidate(&self, rejected: &Secret) {
        let mut cached = self.cached.lock().expect("token cache");
        if cached
            .as_ref()
            .is_some_and(|c| c.token.expose() == rejected.expose())
        {
            *cached = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_part(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn an_es384_assertion_has_the_smart_header_and_claims_and_verifies() {
        let (key, _) = SigningKey::generate_es384(None).unwrap();
        let claims = AssertionClaims::new(
            "client-1",
            "https://ehr.example/token",
            Duration::from_secs(3600),
        );
        let jwt = client_assertion(&key, &claims).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode_part(parts[0]);
        assert_eq!(header["alg"], "ES384");
        assert_eq!(header["kid"], key.kid());
        let payload = decode_part(parts[1]);
        assert_eq!(payload["iss"], "client-1");
        assert_eq!(payload["sub"], "client-1");
        assert_eq!(payload["aud"], "https://ehr.example/token");
        // Capped at five minutes even when asked for an hour.
        let lifetime = payload["exp"].as_i64().unwrap() - payload["iat"].as_i64().unwrap();
        assert_eq!(lifetime, 300);
        let point = key.public_jwk();
        let mut public = vec![4u8];
        public.extend(
            URL_SAFE_NO_PAD
                .decode(point["x"].as_str().unwrap())
                .unwrap(),
        );
        public.extend(
            URL_SAFE_NO_PAD
                .decode(point["y"].as_str().unwrap())
                .unwrap(),
        );
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let verifier =
            signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, &public);
        let signing_input = format!("{}.{}", parts[0], parts[1]);
        verifier
            .verify(signing_input.as_bytes(), &signature)
            .unwrap();
        assert!(
            verifier.verify(b"something else", &signature).is_err(),
            "the check can fail"
        );
        // Every assertion gets its own jti.
        let again = AssertionClaims::new("client-1", "aud", Duration::from_secs(60));
        assert_ne!(again.jti, claims.jti);
    }

    #[test]
    fn keys_and_configs_never_print_the_private_key() {
        let (key, der) = SigningKey::generate_es384(Some("kid-1".into())).unwrap();
        let config = SmartConfig::new("client-1", "https://ehr/token", "system/*.cruds", key);
        let printed = format!("{config:?} {:?}", SmartAuth::new(config.clone()).unwrap());
        assert!(printed.contains("kid-1") && printed.contains("client-1"));
        let der_b64 = STANDARD.encode(&der);
        assert!(!printed.contains(&der_b64[..40]));
        assert!(!printed.contains(&b64(&der)[..40]));
        assert!(printed.contains("***"));
    }

    #[test]
    fn pem_pkcs8_is_read_and_the_algorithm_must_match_the_key() {
        let (_, der) = SigningKey::generate_es384(None).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(&der)
        );
        let key = SigningKey::from_bytes(pem.as_bytes(), None, None).unwrap();
        assert_eq!(key.algorithm(), SigningAlgorithm::Es384);
        assert!(matches!(
            SigningKey::from_bytes(pem.as_bytes(), Some(SigningAlgorithm::Rs384), None),
            Err(SmartError::Key(_))
        ));
        assert!(matches!(
            "HS256".parse::<SigningAlgorithm>(),
            Err(SmartError::Key(_))
        ));
    }

    #[test]
    fn form_encoding_escapes_reserved_characters() {
        assert_eq!(
            form_encode(&[("scope", "system/*.rs a"), ("t", "urn:x")]),
            "scope=system%2F%2A.rs%20a&t=urn%3Ax"
        );
    }
}
