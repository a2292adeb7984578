//! The FHIR R4 HTTP client the connector writes with: idempotent upsert by business key,
//! retry classes, bounded exponential backoff with jitter, and a per-EHR circuit breaker.
//!
//! One write = conditional create (`POST` with `If-None-Exist`, `Prefer:
//! return=representation`): 201 created; 200 means the key already exists — if the
//! stored content differs, a version-aware update follows (`PUT` with
//! `If-Match: W/"n"`). Conditional create is not race-safe on real servers, so callers
//! must serialize writes per business key (the reactor does); this client never writes
//! one key from two tasks at once by itself.
//!
//! Retry classes (DOMAIN.md, medplum #9738): 5xx, 429 (honouring `Retry-After`), 408,
//! a 412 on update (someone else changed it: re-read), timeouts and connection or body
//! errors are retried; any other 4xx is *dead* — recorded with the server's
//! OperationOutcome text and replayable after a fix. It works against any FHIR R4 server.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio::time::Instant;

use crate::fhir::BusinessKey;
use crate::smart::{SmartAuth, SmartError};

/// How the connector reaches one EHR.
#[derive(Clone, Debug)]
pub struct EhrEndpoint {
    /// FHIR base URL, e.g. `http://127.0.0.1:8090/fhir` (no trailing slash needed).
    pub base_url: String,
    /// How requests are authorized.
    pub auth: Auth,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// How FHIR requests are authorized. `Debug` never shows a secret.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// No `Authorization` header.
    #[default]
    None,
    /// A static bearer token.
    Bearer(Secret),
    /// SMART Backend Services: a cached access token from the client-credentials grant
    /// with a signed JWT assertion, refreshed before expiry and once after a 401.
    SmartBackend(Arc<SmartAuth>),
}

impl Auth {
    /// `Bearer` when a token is given, otherwise `None`.
    pub fn bearer(token: Option<impl Into<String>>) -> Auth {
        token.map_or(Auth::None, |token| Auth::Bearer(Secret::new(token)))
    }
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Bounded exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Upper bound on an honoured `Retry-After`.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

/// Where a written resource lives in the EHR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub resource_type: String,
    pub id: String,
    pub version: String,
    /// False when the EHR already held identical content (nothing was changed).
    pub changed: bool,
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptError {
    /// Worth retrying (5xx, 429, timeouts, connection errors, a version race).
    Retryable {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Retrying unchanged fails the same way (other 4xx): record it as dead.
    Dead {
        status: Option<u16>,
        message: String,
    },
}

/// The final outcome of a write that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    pub status: Option<u16>,
    pub message: String,
    /// True when retries were exhausted on a retryable error (a later replay may work).
    pub retryable: bool,
    pub attempts: u32,
}

/// A consecutive-failure circuit breaker for one EHR: after `threshold` retryable
/// failures in a row, every writer waits `cooldown` before the next attempt; one
/// success closes it.
pub struct CircuitBreaker {
    consecutive_failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    threshold: u32,
    cooldown: Duration,
    pub trips: AtomicU64,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> CircuitBreaker {
        CircuitBreaker {
            consecutive_failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
            threshold,
            cooldown,
            trips: AtomicU64::new(0),
        }
    }

    async fn wait_until_closed(&self) {
        let until = *self.open_until.lock().expect("breaker lock");
        if let Some(until) = until
            && until > Instant::now()
        {
            tokio::time::sleep_until(until).await;
        }
    }

    fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    fn record_failure(&self) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.threshold {
            let mut open = self.open_until.lock().expect("breaker lock");
            let now = Instant::now();
            if open.is_none_or(|until| until <= now) {
                *open = Some(now + self.cooldown);
                self.trips.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(failures, "EHR circuit breaker open");
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.open_until
            .lock()
            .expect("breaker lock")
            .is_some_and(|until| until > Instant::now())
    }
}

/// Counters for reports and benchmarks.
#[derive(Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub created: AtomicU64,
    pub updated: AtomicU64,
    pub unchanged: AtomicU64,
}

pub struct FhirClient {
    http: reqwest::Client,
    endpoint: EhrEndpoint,
    pub retry: RetryPolicy,
    pub breaker: CircuitBreaker,
    pub stats: ClientStats,
    jitter: AtomicU64,
}

/// Installs the ring crypto provider for rustls once per process (async-nats brings
/// ring; reqwest is built without aws-lc — STACK.md). Safe to call repeatedly.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn etag_version(headers: &HeaderMap) -> Option<String> {
    let etag = headers.get(reqwest::header::ETAG)?.to_str().ok()?;
    Some(etag.trim_start_matches("W/").trim_matches('"').to_string())
}

/// Text of an OperationOutcome (diagnostics or details), or the raw body.
pub fn operation_outcome_text(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let issues = parsed
        .as_ref()
        .and_then(|v| v["issue"].as_array())
        .map(|issues| {
            issues
                .iter()
                .filter_map(|issue| {
                    issue["diagnostics"]
                        .as_str()
                        .or_else(|| issue["details"]["text"].as_str())
                        .map(str::to_string)
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|text| !text.is_empty());
    issues.unwrap_or_else(|| body.chars().take(500).collect())
}

fn classify(status: StatusCode, headers: &HeaderMap, body: &str, what: &str) -> AttemptError {
    let message = format!(
        "{what}: HTTP {}: {}",
        status.as_u16(),
        operation_outcome_text(body)
    );
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        AttemptError::Retryable {
            status: Some(status.as_u16()),
            message,
            retry_after,
        }
    } else {
        AttemptError::Dead {
            status: Some(status.as_u16()),
            message,
        }
    }
}

fn transport(error: reqwest::Error, what: &str) -> AttemptError {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connection refused or reset"
    } else {
        "transport error"
    };
    AttemptError::Retryable {
        status: None,
        message: format!("{what}: {kind}: {error}"),
        retry_after: None,
    }
}

/// Content of a resource without the server-managed parts, for comparison.
fn content(resource: &Value) -> Value {
    let mut copy = resource.clone();
    if let Some(object) = copy.as_object_mut() {
        object.remove("id");
        if let Some(meta) = object.get_mut("meta").and_then(Value::as_object_mut) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
            meta.remove("source");
            if meta.is_empty() {
                object.remove("meta");
            }
        }
    }
    copy
}

impl FhirClient {
    pub fn new(endpoint: EhrEndpoint) -> Result<FhirClient, reqwest::Error> {
        install_crypto_provider();
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("application/fhir+json"),
        );
        let http = reqwest::Client::builder()
            .timeout(endpoint.timeout)
            .default_headers(headers)
            .pool_max_idle_per_host(64)
            .build()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9, |d| d.as_nanos() as u64);
        Ok(FhirClient {
            http,
            endpoint,
            retry: RetryPolicy::default(),
            breaker: CircuitBreaker::new(20, Duration::from_secs(2)),
            stats: ClientStats::default(),
            jitter: AtomicU64::new(seed | 1),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> FhirClient {
        self.retry = retry;
        self
    }

    pub fn base_url(&self) -> &str {
        self.endpoint.base_url.trim_end_matches('/')
    }

    /// The bearer token for the next attempt: the static one, or the current SMART
    /// access token (fetched or refreshed as needed). A token endpoint failure is an
    /// attempt error: retryable when the endpoint is unavailable, dead when it refused
    /// the client.
    async fn token(&self) -> Result<Option<Secret>, AttemptError> {
        match &self.endpoint.auth {
            Auth::None => Ok(None),
            Auth::Bearer(token) => Ok(Some(token.clone())),
            Auth::SmartBackend(smart) => smart.access_token().await.map(Some).map_err(|error| {
                let message = format!("authorizing: {error}");
                match error {
                    SmartError::Unavailable(_) => AttemptError::Retryable {
                        status: None,
                        message,
                        retry_after: None,
                    },
                    other => AttemptError::Dead {
                        status: other.status(),
                        message,
                    },
                }
            }),
        }
    }

    /// After a 401 to a SMART access token: drop it so the next attempt fetches a new
    /// one. Returns whether a retry with a fresh token makes sense.
    fn refresh_after_unauthorized(&self, error: &AttemptError, token: Option<&Secret>) -> bool {
        match (&self.endpoint.auth, error, token) {
            (
                Auth::SmartBackend(smart),
                AttemptError::Dead {
                    status: Some(401), ..
                },
                Some(token),
            ) => {
                smart.invalidate(token);
                true
            }
            _ => false,
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        url: &str,
        token: Option<&Secret>,
    ) -> reqwest::RequestBuilder {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let builder = self.http.request(method, url);
        match token {
            Some(token) => builder.bearer_auth(token.expose()),
            None => builder,
        }
    }

    /// Full jitter: uniform in [0, min(max, base·2^attempt)].
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .retry
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.retry.max_delay);
        let mut x = self
            .jitter
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let fraction = (x >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(fraction)
    }

    /// Writes one resource idempotently by its business key, retrying per the policy.
    pub async fn upsert(&self, resource: &Value) -> Result<Written, WriteFailure> {
        let Some(key) = BusinessKey::of(resource) else {
            return Err(WriteFailure {
                status: None,
                message: "the resource carries no business key".into(),
                retryable: false,
                attempts: 0,
            });
        };
        let mut attempt = 0;
        let mut refreshed_after_401 = false;
        loop {
            attempt += 1;
            self.breaker.wait_until_closed().await;
            let result = match self.token().await {
                Ok(token) => {
                    let result = self.upsert_once(&key, resource, token.as_ref()).await;
                    // An expired or revoked SMART token: refresh once and retry at once.
                    if let Err(error) = &result
                        && !refreshed_after_401
                        && self.refresh_after_unauthorized(error, token.as_ref())
                    {
                        refreshed_after_401 = true;
                        attempt -= 1;
                        continue;
                    }
                    result
                }
                Err(error) => Err(error),
            };
            match result {
                Ok(written) => {
                    self.breaker.record_success();
                    return Ok(written);
                }
                Err(AttemptError::Dead { status, message }) => {
                    self.breaker.record_success(); // the EHR answered; it is up
                    return Err(WriteFailure {
                        status,
                        message,
                        retryable: false,
                        attempts: attempt,
                    });
                }
                Err(AttemptError::Retryable {
                    status,
                    message,
                    retry_after,
                }) => {
                    self.breaker.record_failure();
                    if attempt >= self.retry.max_attempts {
                        return Err(WriteFailure {
                            status,
                            message: format!("gave up after {attempt} attempts: {message}"),
                            retryable: true,
                            attempts: attempt,
                        });
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    let mut delay = self.backoff(attempt);
                    if let Some(after) = retry_after {
                        delay = delay.max(after.min(self.retry.max_retry_after));
                    }
                    tracing::debug!(%message, ?delay, attempt, "EHR write will be retried");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn upsert_once(
        &self,
        key: &BusinessKey,
        resource: &Value,
        token: Option<&Secret>,
    ) -> Result<Written, AttemptError> {
        let url = format!("{}/{}", self.base_url(), key.resource_type);
        let what = format!("create {} {}", key.resource_type, key.condition());
        let response = self
            .request(reqwest::Method::POST, &url, token)
            .header("Content-Type", "application/fhir+json")
            .header("If-None-Exist", key.condition())
            .header("Prefer", "return=representation")
            .body(resource.to_string())
            .send()
            .await
            .map_err(|e| transport(e, &what))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.map_err(|e| transport(e, &what))?;
        match status {
            StatusCode::CREATED => {
                self.stats.created.fetch_add(1, Ordering::Relaxed);
                let stored: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let id = stored["id"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| location_id(&headers))
                    .ok_or_else(|| AttemptError::Dead {
                        status: Some(201),
                        message: format!("{what}: the server returned no id"),
                    })?;
                let version = etag_version(&headers)
                    .or_else(|| stored["meta"]["versionId"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "1".into());
                Ok(Written {
                    resource_type: key.resource_type.clone(),
                    id,
                    version,
                    changed: true,
                })
            }
            StatusCode::OK => {
                let existing: Value = match serde_json::from_str::<Value>(&body) {
                    Ok(value) if value["id"].is_string() => value,
                    _ => self.find(key, token).await?,
                };
                self.update_if_changed(key, resource, existing, token).await
            }
            StatusCode::PRECONDITION_FAILED => Err(AttemptError::Dead {
                status: Some(412),
                message: format!(
                    "{what}: more than one {} matches {} in the EHR (duplicates exist; resolve them there): {}",
                    key.resource_type,
                    key.condition(),
                    operation_outcome_text(&body)
                ),
            }),
            other => Err(classify(other, &headers, &body, &what)),
        }
    }

    /// Searches by business key; exactly one match expected.
    async fn find(&self, key: &BusinessKey, token: Option<&Secret>) -> Result<Value, AttemptError> {
        let what = format!("search {} {}", key.resource_type, key.condition());
        let url = format!("{}/{}", self.base_url(), key.resource_type);
        let response = self
            .request(reqwest::Method::GET, &search_url(&url, key), token)
            .send()
            .await
            .map_err(|e| transport(e, &what))?;
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response.text().await.map_err(|e| transport(e, &what))?;
        if status != StatusCode::OK {
            return Err(classify(status, &headers, &body, &what));
        }
        let bundle: Value = serde_json::from_str(&body).map_err(|e| AttemptError::Retryable {
            status: Some(200),
            message: format!("{what}: unreadable Bundle: {e}"),
            retry_after: None,
        })?;
        let matches: Vec<&Value> = bundle["entry"]
            .as_array()
            .map(|entries| entries.iter().map(|e| &e["resource"]).collect())
            .unwrap_or_default();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(AttemptError::Retryable {
                status: Some(200),
                message: format!("{what}: the resource the server said exists was not found"),
                retry_after: None,
            }),
            many => Err(AttemptError::Dead {
                status: Some(412),
                message: format!(
                    "{what}: {} resources match (duplicates exist in the EHR)",
                    many.len()
                ),
            }),
        }
    }

    async fn update_if_changed(
        &self,
        key: &BusinessKey,
        resource: &Value,
        existing: Value,
        token: Option<&Secret>,
    ) -> Result<Written, AttemptError> {
        let id = existing["id"].as_str().unwrap_or_default().to_string();
        let version = existing["meta"]["versionId"]
            .as_str()
            .unwrap_or("1")
            .to_string();
        if content(&existing) == content(resource) {
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            return Ok(Written {
                resource_type: key.resource_type.clone(),
                id,
                version,
                changed: false,
            });
        }
        let what = format!(
            "update {}/{id} (If-Match W/\"{version}\")",
            key.resource_type
        );
        let mut body = resource.clone();
        body["id"] = Value::String(id.clone());
        let url = format!("{}/{}/{}", self.base_url(), key.resource_type, id);
        let response = self
            .request(reqwest::Method::PUT, &url, token)
            .header("Content-Type", "application/fhir+json")
            .header("If-Match", format!("W/\"{version}\""))
            .header("Prefer", "return=minimal")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| transport(e, &what))?;
        let (status, headers) = (response.status(), response.headers().clone());
        let text = response.text().await.map_err(|e| transport(e, &what))?;
        match status {
            StatusCode::OK | StatusCode::CREATED => {
                self.stats.updated.fetch_add(1, Ordering::Relaxed);
                let stored: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let version = etag_version(&headers)
                    .or_else(|| stored["meta"]["versionId"].as_str().map(str::to_string))
                    .unwrap_or_default();
                Ok(Written {
                    resource_type: key.resource_type.clone(),
                    id,
                    version,
                    changed: true,
                })
            }
            // Someone changed it since we read it: re-read and try again.
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => {
                Err(AttemptError::Retryable {
                    status: Some(status.as_u16()),
                    message: format!(
                        "{what}: version conflict: {}",
                        operation_outcome_text(&text)
                    ),
                    retry_after: None,
                })
            }
            other => Err(classify(other, &headers, &text, &what)),
        }
    }

    /// Every resource the EHR holds for a business key (tests, reconciliation).
    pub async fn search(&self, key: &BusinessKey) -> Result<Vec<Value>, String> {
        let url = format!("{}/{}", self.base_url(), key.resource_type);
        let mut refreshed_after_401 = false;
        let response = loop {
            let token = self.token().await.map_err(|e| format!("{e:?}"))?;
            let response = self
                .request(reqwest::Method::GET, &search_url(&url, key), token.as_ref())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let unauthorized = AttemptError::Dead {
                status: Some(response.status().as_u16()),
                message: String::new(),
            };
            if response.status() == StatusCode::UNAUTHORIZED
                && !refreshed_after_401
                && self.refresh_after_unauthorized(&unauthorized, token.as_ref())
            {
                refreshed_after_401 = true;
                continue;
            }
            break response;
        };
        // An error answer is not an empty result: reconciliation must never read a 5xx as
        // "the resource is gone".
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!(
                "search {} {}: HTTP {}: {}",
                key.resource_type,
                key.condition(),
                status.as_u16(),
                operation_outcome_text(&body)
            ));
        }
        let bundle: Value = response.json().await.map_err(|e| e.to_string())?;
        if bundle["resourceType"] != "Bundle" {
            return Err(format!(
                "search {} {}: the answer is not a Bundle",
                key.resource_type,
                key.condition()
            ));
        }
        Ok(bundle["entry"]
            .as_array()
            .map(|entries| entries.iter().map(|e| e["resource"].clone()).collect())
            .unwrap_or_default())
    }
}

/// `…/Type?param=system%7Cvalue` with the token percent-encoded.
fn search_url(type_url: &str, key: &BusinessKey) -> String {
    let token = format!("{}|{}", key.system, key.value);
    let mut encoded = String::with_capacity(token.len() * 2);
    for byte in token.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("{type_url}?{}={encoded}", key.search_param)
}

fn location_id(headers: &HeaderMap) -> Option<String> {
    let location = headers.get(reqwest::header::LOCATION)?.to_str().ok()?;
    let path = location.split("/_history").next()?;
    path.rsplit('/').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classes_follow_the_status() {
        let headers = HeaderMap::new();
        for status in [500, 502, 503, 504, 429, 408] {
            assert!(matches!(
                classify(StatusCode::from_u16(status).unwrap(), &headers, "", "x"),
                AttemptError::Retryable { .. }
            ));
        }
        for status in [400, 401, 403, 404, 409, 422] {
            assert!(matches!(
                classify(StatusCode::from_u16(status).unwrap(), &headers, "", "x"),
                AttemptError::Dead { .. }
            ));
        }
        let mut headers = HeaderMap::new();
        headers.insert("Retry-After", HeaderValue::from_static("3"));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &headers, "", "x"),
            AttemptError::Retryable {
                status: Some(429),
                message: "x: HTTP 429: ".into(),
                retry_after: Some(Duration::from_secs(3)),
            }
        );
    }

    #[test]
    fn operation_outcome_text_reads_diagnostics() {
        let body = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"Appointment.status is required"}]}"#;
        assert_eq!(
            operation_outcome_text(body),
            "Appointment.status is required"
        );
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", Secret::new("abc")), "Secret(***)");
    }
}
