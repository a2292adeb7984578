//! # Sandbox EHR — a stand-in, NOT a real EHR
//!
//! A vendor EHR (Epic, Oracle Health, athena, …) cannot exist on this machine, so this
//! module provides a small FHIR R4 HTTP endpoint with its own SQLite storage that does
//! what the connector uses, and misbehaves on demand the way real servers do. It is for
//! tests, demos and benchmarks. It validates nothing beyond `resourceType`, implements no
//! terminology, profiles or authorization model, and must never hold real patient data.
//!
//! Supported: `POST /{type}` (create; conditional create with `If-None-Exist`: 0 matches
//! → 201, 1 → 200 with the existing resource, >1 → 412), `GET /{type}/{id}`,
//! `PUT /{type}/{id}` (with `If-Match: W/"n"`: stale → 412), `DELETE /{type}/{id}`,
//! `GET /{type}?identifier=…`
//! and `?_tag=…` (searchset Bundle), `GET /{type}/{id}/_history[/{vid}]`, `POST /`
//! (transaction Bundle of creates/conditional creates/updates), `GET /metadata`, an
//! optional static bearer token, and an optional SMART Backend Services token endpoint
//! ([`smart`]: `POST /auth/token`, `/.well-known/smart-configuration`).
//!
//! Fault injection (`POST /_faults`, seeded RNG so a run is reproducible):
//! `{"error_rate":0.3,"kinds":["500","429","timeout","drop"],"seed":7,"race":false}`.
//! `500`/`503`/`429` (with `Retry-After`) fail *before* the write; `timeout` (the
//! response is held for `timeout_ms`) and `drop` (the body is cut off) happen *after* the
//! write was applied — the nasty case, where the client cannot know. `race: true` makes
//! conditional create check-then-insert without a lock and with a pause in between, the
//! way real servers do it (hapi-fhir #3141, medplum #4878), so concurrent creates of one
//! identifier produce duplicates. `GET /_stats` counts resources and duplicates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
pub mod smart;
mod storage;

use smart::{SandboxSmart, SmartServer};
use storage::{Storage, StorageError};

/// Fault injection settings (`POST /_faults`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Probability that a FHIR request gets a fault.
    pub error_rate: f64,
    /// Fault kinds to pick from uniformly: "500", "503", "429", "timeout", "drop".
    pub kinds: Vec<String>,
    pub seed: u64,
    /// Simulate the conditional-create race of real servers.
    pub race: bool,
    /// How long a `timeout` fault holds the response.
    pub timeout_ms: u64,
    /// `Retry-After` seconds sent with 429.
    pub retry_after_seconds: u64,
    /// Extra latency on every FHIR request.
    pub latency_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_rate: 0.0,
            kinds: vec![],
            seed: 1,
            race: false,
            timeout_ms: 3_000,
            retry_after_seconds: 1,
            latency_ms: 0,
        }
    }
}

struct FaultState {
    faults: Faults,
    rng: u64,
    injected: BTreeMap<String, u64>,
}

impl FaultState {
    fn next(&mut self) -> f64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick(&mut self) -> Option<String> {
        if self.faults.kinds.is_empty() || self.next() >= self.faults.error_rate {
            return None;
        }
        let index = (self.next() * self.faults.kinds.len() as f64) as usize;
        let kind = self.faults.kinds[index.min(self.faults.kinds.len() - 1)].clone();
        *self.injected.entry(kind.clone()).or_default() += 1;
        Some(kind)
    }
}

#[derive(Clone)]
struct AppState {
    db: Arc<Storage>,
    /// Serializes writes (conditional create is atomic here unless `race` is on).
    write_lock: Arc<tokio::sync::Mutex<()>>,
    faults: Arc<Mutex<FaultState>>,
    token: Option<String>,
    smart: Option<Arc<SmartServer>>,
    base_url: Arc<Mutex<String>>,
}

/// Configuration of a sandbox instance.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// `sqlite://PATH` or `sqlite::memory:`.
    pub database_url: String,
    /// When set, every FHIR request needs `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// When set, the SMART token endpoint runs and FHIR requests need an access token
    /// it issued (or the static bearer token, if one is set too).
    pub smart: Option<SandboxSmart>,
}

/// A bound, not yet serving sandbox (STYLE.md: `build` binds; port 0 in tests).
pub struct SandboxEhr {
    listener: tokio::net::TcpListener,
    router: Router,
    address: SocketAddr,
}

impl SandboxEhr {
    pub async fn build(listen: &str, config: SandboxConfig) -> Result<SandboxEhr, String> {
        let db = Arc::new(Storage::open(&config.database_url)?);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("binding {listen}: {e}"))?;
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        let state = AppState {
            db,
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
            faults: Arc::new(Mutex::new(FaultState {
                faults: Faults::default(),
                rng: 1,
                injected: BTreeMap::new(),
            })),
            token: config.bearer_token,
            smart: config.smart.map(|smart| Arc::new(SmartServer::new(smart))),
            base_url: Arc::new(Mutex::new(format!("http://{address}"))),
        };
        let fhir = Router::new()
            .route("/", post(transaction))
            .route("/metadata", get(metadata))
            .route("/{rtype}", post(create).get(search))
            .route("/{rtype}/{id}", get(read).put(update).delete(delete))
            .route("/{rtype}/{id}/_history", get(history))
            .route("/{rtype}/{id}/_history/{vid}", get(read_version))
            .layer(middleware::from_fn_with_state(state.clone(), fhir_guard));
        let router = Router::new()
            .route(
                "/_faults",
                get(get_faults).post(set_faults).delete(clear_faults),
            )
            .route("/_stats", get(stats))
            .route("/.well-known/smart-configuration", get(smart_configuration))
            .route(smart::TOKEN_PATH, post(smart_token))
            .route("/_smart/revoke", post(smart_revoke))
            .route("/_smart/stats", get(smart_stats))
            .merge(fhir)
            .with_state(state);
        Ok(SandboxEhr {
            listener,
            router,
            address,
        })
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The SMART token endpoint (served when SMART is configured).
    pub fn token_url(&self) -> String {
        format!("{}{}", self.base_url(), smart::TOKEN_PATH)
    }

    /// The FHIR base URL clients use.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), std::io::Error> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

fn outcome(status: StatusCode, code: &str, diagnostics: impl Into<String>) -> Response {
    let body = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics.into()}],
    });
    (status, fhir_json(&body)).into_response()
}

fn fhir_json(body: &Value) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
}

fn internal(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "sandbox EHR storage error");
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        "internal storage error",
    )
}

/// Auth, latency and fault injection for FHIR routes.
async fn fhir_guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.token.is_some() || state.smart.is_some() {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let authorized = given.is_some_and(|given| {
            state.token.as_deref() == Some(given)
                || state
                    .smart
                    .as_ref()
                    .is_some_and(|smart| smart.accepts(given))
        });
        if !authorized {
            return outcome(
                StatusCode::UNAUTHORIZED,
                "login",
                "a valid bearer token is required",
            );
        }
    }
    let (fault, faults) = {
        let mut guard = state.faults.lock().expect("fault lock");
        (guard.pick(), guard.faults.clone())
    };
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    match fault.as_deref() {
        Some("500") => outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "injected fault: 500",
        ),
        Some("503") => outcome(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "injected fault: 503",
        ),
        Some("429") => {
            let mut response = outcome(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                "injected fault: 429",
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&faults.retry_after_seconds.to_string()).expect("digits"),
            );
            response
        }
        Some("timeout") => {
            let response = next.run(request).await;
            tokio::time::sleep(Duration::from_millis(faults.timeout_ms)).await;
            response
        }
        Some("drop") => {
            let response = next.run(request).await;
            let (mut parts, _) = response.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            let broken = futures::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other(
                    "injected fault: connection dropped",
                ))
            });
            Response::from_parts(parts, Body::from_stream(broken))
        }
        _ => next.run(request).await,
    }
}

fn smart_not_configured() -> Response {
    outcome(
        StatusCode::NOT_FOUND,
        "not-supported",
        "SMART is not configured on this sandbox",
    )
}

async fn smart_configuration(State(state): State<AppState>) -> Response {
    let base = state.base_url.lock().expect("base url").clone();
    match &state.smart {
        Some(smart) => smart.well_known(&base),
        None => smart_not_configured(),
    }
}

async fn smart_token(State(state): State<AppState>, body: Bytes) -> Response {
    let base = state.base_url.lock().expect("base url").clone();
    match &state.smart {
        Some(smart) => smart.token(&base, body),
        None => smart_not_configured(),
    }
}

async fn smart_revoke(State(state): State<AppState>) -> Response {
    match &state.smart {
        Some(smart) => smart.revoke_all(),
        None => smart_not_configured(),
    }
}

async fn smart_stats(State(state): State<AppState>) -> Response {
    match &state.smart {
        Some(smart) => smart.stats(),
        None => smart_not_configured(),
    }
}

async fn get_faults(State(state): State<AppState>) -> Response {
    let guard = state.faults.lock().expect("fault lock");
    axum::Json(json!({"faults": guard.faults, "injected": guard.injected})).into_response()
}

async fn set_faults(
    State(state): State<AppState>,
    axum::Json(faults): axum::Json<Faults>,
) -> Response {
    let mut guard = state.faults.lock().expect("fault lock");
    guard.rng = faults.seed;
    guard.faults = faults;
    axum::Json(json!({"faults": guard.faults})).into_response()
}

async fn clear_faults(State(state): State<AppState>) -> Response {
    let mut guard = state.faults.lock().expect("fault lock");
    guard.faults = Faults::default();
    StatusCode::NO_CONTENT.into_response()
}

async fn stats(State(state): State<AppState>) -> Response {
    match state.db.stats() {
        Ok(body) => axum::Json(body).into_response(),
        Err(error) => internal(error),
    }
}

async fn metadata(State(state): State<AppState>) -> Response {
    let base = state.base_url.lock().expect("base url").clone();
    let types = [
        "Appointment",
        "Encounter",
        "DocumentReference",
        "Composition",
        "Provenance",
        "Task",
        "ChargeItem",
        "Observation",
    ];
    let resources: Vec<Value> = types
        .iter()
        .map(|t| {
            json!({
                "type": t,
                "interaction": [{"code": "create"}, {"code": "read"}, {"code": "update"}, {"code": "search-type"}, {"code": "history-instance"}, {"code": "vread"}],
                "versioning": "versioned-update",
                "conditionalCreate": true,
                "searchParam": [{"name": "identifier", "type": "token"}, {"name": "_tag", "type": "token"}],
            })
        })
        .collect();
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-01",
        "kind": "instance",
        "software": {"name": "Chartline sandbox EHR (a stand-in for a vendor EHR; not a real EHR)"},
        "implementation": {"description": "Chartline sandbox EHR", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{"mode": "server", "resource": resources, "interaction": [{"code": "transaction"}]}],
    });
    (StatusCode::OK, fhir_json(&body)).into_response()
}

/// Parses `identifier=system|value` / `_tag=system|value` (percent-decoded).
fn parse_condition(condition: &str) -> Option<(String, String, String)> {
    let (param, token) = condition.split_once('=')?;
    let token = percent_decode(token);
    let (system, value) = token.split_once('|')?;
    Some((percent_decode(param), system.to_string(), value.to_string()))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
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
}

fn with_version_headers(status: StatusCode, rtype: &str, resource: &Value, body: bool) -> Response {
    let id = resource["id"].as_str().unwrap_or_default();
    let version = resource["meta"]["versionId"].as_str().unwrap_or("1");
    let mut response = if body {
        (status, fhir_json(resource)).into_response()
    } else {
        status.into_response()
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("{rtype}/{id}/_history/{version}")) {
        headers.insert(header::LOCATION, value);
    }
    response
}

fn wants_minimal(headers: &HeaderMap) -> bool {
    headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("return=minimal"))
}

enum CreateOutcome {
    Created(Value),
    Exists(Value),
    Ambiguous(usize),
}

async fn create_resource(
    state: &AppState,
    rtype: &str,
    resource: Value,
    condition: Option<&str>,
) -> Result<Result<CreateOutcome, Response>, StorageError> {
    if resource["resourceType"].as_str() != Some(rtype) {
        return Ok(Err(outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("resourceType must be {rtype}"),
        )));
    }
    let race = state.faults.lock().expect("fault lock").faults.race;
    let _guard = if race {
        None
    } else {
        Some(state.write_lock.lock().await)
    };
    if let Some(condition) = condition {
        let Some((param, system, value)) = parse_condition(condition) else {
            return Ok(Err(outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("unsupported If-None-Exist condition {condition:?}"),
            )));
        };
        let ids = state.db.find_ids(rtype, &param, &system, &value)?;
        match ids.as_slice() {
            [] => {}
            [id] => {
                let existing = state.db.load(rtype, id)?.unwrap_or(Value::Null);
                return Ok(Ok(CreateOutcome::Exists(existing)));
            }
            many => return Ok(Ok(CreateOutcome::Ambiguous(many.len()))),
        }
        if race {
            // Check-then-insert with a gap, as real servers do.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let stored = state.db.store_version(rtype, &id, 1, resource)?;
    Ok(Ok(CreateOutcome::Created(stored)))
}

async fn create(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(resource) = serde_json::from_slice::<Value>(&body) else {
        return outcome(StatusCode::BAD_REQUEST, "structure", "the body is not JSON");
    };
    let condition = headers
        .get("if-none-exist")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match create_resource(&state, &rtype, resource, condition.as_deref()).await {
        Err(error) => internal(error),
        Ok(Err(response)) => response,
        Ok(Ok(CreateOutcome::Created(stored))) => with_version_headers(
            StatusCode::CREATED,
            &rtype,
            &stored,
            !wants_minimal(&headers),
        ),
        Ok(Ok(CreateOutcome::Exists(existing))) => {
            with_version_headers(StatusCode::OK, &rtype, &existing, !wants_minimal(&headers))
        }
        Ok(Ok(CreateOutcome::Ambiguous(n))) => outcome(
            StatusCode::PRECONDITION_FAILED,
            "duplicate",
            format!("{n} resources match the If-None-Exist condition"),
        ),
    }
}

/// `DELETE /{type}/{id}`: removes the current version and its search keys (history
/// keeps the earlier versions), as a clinician or an interface would in a real EHR.
/// Tests use it to change the EHR behind the connector's back (reconciliation).
async fn delete(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
) -> Response {
    let _guard = state.write_lock.lock().await;
    let result = state.db.delete(&rtype, &id);
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => internal(error),
    }
}

async fn read(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
) -> Response {
    match state.db.load(&rtype, &id) {
        Ok(Some(resource)) => with_version_headers(StatusCode::OK, &rtype, &resource, true),
        Ok(None) => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{rtype}/{id} is not known"),
        ),
        Err(error) => internal(error),
    }
}

async fn update(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(resource) = serde_json::from_slice::<Value>(&body) else {
        return outcome(StatusCode::BAD_REQUEST, "structure", "the body is not JSON");
    };
    if resource["resourceType"].as_str() != Some(rtype.as_str())
        || resource["id"].as_str() != Some(id.as_str())
    {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "resourceType and id must match the URL",
        );
    }
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string());
    let _guard = state.write_lock.lock().await;
    let result = (|| -> Result<Response, StorageError> {
        let current = state.db.current_version(&rtype, &id)?;
        if let Some(expected) = &if_match
            && current.map(|v| v.to_string()).as_deref() != Some(expected.as_str())
        {
            return Ok(outcome(
                StatusCode::PRECONDITION_FAILED,
                "conflict",
                format!(
                    "version conflict: If-Match {expected}, current {}",
                    current.map_or("none".into(), |v| v.to_string())
                ),
            ));
        }
        let version = current.unwrap_or(0) + 1;
        let stored = state.db.store_version(&rtype, &id, version, resource)?;
        let status = if current.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(with_version_headers(
            status,
            &rtype,
            &stored,
            !wants_minimal(&headers),
        ))
    })();
    result.unwrap_or_else(internal)
}

fn bundle(kind: &str, base: &str, resources: Vec<(String, Value)>) -> Value {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|(url, resource)| json!({"fullUrl": format!("{base}/{url}"), "resource": resource, "search": {"mode": "match"}}))
        .collect();
    json!({"resourceType": "Bundle", "type": kind, "total": entries.len(), "entry": entries})
}

async fn search(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let base = state.base_url.lock().expect("base url").clone();
    let result = (|| -> Result<Response, StorageError> {
        let mut ids: Option<Vec<String>> = None;
        for (param, token) in &params {
            if param != "identifier" && param != "_tag" {
                continue;
            }
            let Some((system, value)) = token.split_once('|') else {
                return Ok(outcome(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "token search needs system|value",
                ));
            };
            let found = state.db.find_ids(&rtype, param, system, value)?;
            ids = Some(match ids {
                None => found,
                Some(previous) => previous
                    .into_iter()
                    .filter(|id| found.contains(id))
                    .collect(),
            });
        }
        let ids = match ids {
            Some(ids) => ids,
            None => state.db.list_ids(&rtype)?,
        };
        let mut resources = Vec::new();
        for id in ids {
            if let Some(resource) = state.db.load(&rtype, &id)? {
                resources.push((format!("{rtype}/{id}"), resource));
            }
        }
        Ok((
            StatusCode::OK,
            fhir_json(&bundle("searchset", &base, resources)),
        )
            .into_response())
    })();
    result.unwrap_or_else(internal)
}

async fn history(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
) -> Response {
    let base = state.base_url.lock().expect("base url").clone();
    match state.db.history(&rtype, &id) {
        Ok(rows) if rows.is_empty() => outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{rtype}/{id} is not known"),
        ),
        Ok(rows) => {
            let versions = rows
                .into_iter()
                .map(|(version, body)| (format!("{rtype}/{id}/_history/{version}"), body))
                .collect();
            let mut body = bundle("history", &base, versions);
            for entry in body["entry"].as_array_mut().into_iter().flatten() {
                entry.as_object_mut().expect("entry").remove("search");
            }
            (StatusCode::OK, fhir_json(&body)).into_response()
        }
        Err(error) => internal(error),
    }
}

async fn read_version(
    State(state): State<AppState>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
) -> Response {
    let Ok(version) = vid.parse::<i64>() else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such version");
    };
    match state.db.read_version(&rtype, &id, version) {
        Ok(Some(body)) => with_version_headers(StatusCode::OK, &rtype, &body, true),
        Ok(None) => outcome(StatusCode::NOT_FOUND, "not-found", "no such version"),
        Err(error) => internal(error),
    }
}

/// `POST /` with a transaction Bundle: entries are processed in order (POST with optional
/// `ifNoneExist`, PUT with optional `ifMatch`). Unlike a real server this is not
/// all-or-nothing on a storage error mid-way; entries are checked up front.
async fn transaction(State(state): State<AppState>, body: Bytes) -> Response {
    let Ok(bundle) = serde_json::from_slice::<Value>(&body) else {
        return outcome(StatusCode::BAD_REQUEST, "structure", "the body is not JSON");
    };
    if bundle["resourceType"] != "Bundle"
        || !matches!(bundle["type"].as_str(), Some("transaction" | "batch"))
    {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "expected a transaction or batch Bundle",
        );
    }
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    for (index, entry) in entries.iter().enumerate() {
        let method = entry["request"]["method"].as_str();
        if !matches!(method, Some("POST")) || entry["resource"]["resourceType"].as_str().is_none() {
            return outcome(
                StatusCode::BAD_REQUEST,
                "not-supported",
                format!("entry {index}: only POST (create / conditional create) is supported"),
            );
        }
    }
    let mut responses = Vec::new();
    for entry in entries {
        let rtype = entry["resource"]["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let condition = entry["request"]["ifNoneExist"].as_str();
        match create_resource(&state, &rtype, entry["resource"].clone(), condition).await {
            Err(error) => return internal(error),
            Ok(Err(response)) => return response,
            Ok(Ok(CreateOutcome::Created(stored) | CreateOutcome::Exists(stored))) => {
                let created = stored["meta"]["versionId"] == "1";
                responses.push(json!({"response": {
                    "status": if created { "201 Created" } else { "200 OK" },
                    "location": format!("{rtype}/{}/_history/{}", stored["id"].as_str().unwrap_or_default(), stored["meta"]["versionId"].as_str().unwrap_or("1")),
                    "etag": format!("W/\"{}\"", stored["meta"]["versionId"].as_str().unwrap_or("1")),
                }}));
            }
            Ok(Ok(CreateOutcome::Ambiguous(n))) => {
                return outcome(
                    StatusCode::PRECONDITION_FAILED,
                    "duplicate",
                    format!(
                        "{rtype}: {n} resources match {}",
                        condition.unwrap_or_default()
                    ),
                );
            }
        }
    }
    let body =
        json!({"resourceType": "Bundle", "type": "transaction-response", "entry": responses});
    (StatusCode::OK, fhir_json(&body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_with_and_without_percent_encoding() {
        assert_eq!(
            parse_condition("identifier=urn:chartline:a:task|42"),
            Some((
                "identifier".into(),
                "urn:chartline:a:task".into(),
                "42".into()
            ))
        );
        assert_eq!(
            parse_condition("identifier=urn%3Achartline%3Aa%3Atask%7C42"),
            Some((
                "identifier".into(),
                "urn:chartline:a:task".into(),
                "42".into()
            ))
        );
    }

    #[test]
    fn fault_rng_is_reproducible_and_near_the_rate() {
        let faults = Faults {
            error_rate: 0.3,
            kinds: vec!["500".into(), "drop".into()],
            ..Faults::default()
        };
        let run = || {
            let mut state = FaultState {
                faults: faults.clone(),
                rng: 42,
                injected: BTreeMap::new(),
            };
            (0..10_000).map(|_| state.pick()).collect::<Vec<_>>()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        let hits = a.iter().filter(|f| f.is_some()).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
    }
}
