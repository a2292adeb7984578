//! The Chartline API: axum + async-graphql on one port.
//!
//! Routes: `/graphql` (POST queries and mutations; GET upgrades to WebSocket
//! subscriptions with the `graphql-transport-ws` protocol, authenticated in
//! `connection_init`), `/graphiql` (and `/`), `/dashboard`, `/metrics` (Prometheus text),
//! `/healthz`, `/readyz`.
//!
//! Security: bearer JWT (tenant, subject, roles) on every request; resolvers scope every
//! read to the token's tenant; PHI fields need a PHI role and every PHI read is recorded
//! (see [`phi`]); depth and complexity limits; a request body limit; a per-request
//! timeout; errors carry a code in `extensions.code` and no internals.
//!
//! Shape (zero2prod's `startup.rs`): [`Api::build`] binds (port 0 in tests) and
//! [`Api::run_until_stopped`] serves until a shutdown future resolves.

#![forbid(unsafe_code)]

pub mod auth;
pub mod live;
pub mod phi;
pub mod schema;
pub mod views;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::{Data, ServerError};
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLResponse, GraphQLWebSocket};
use axum::Router;
use axum::extract::ws::{CloseFrame, Message};
use axum::extract::{DefaultBodyLimit, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use chartline_infra::EventStore;
use chartline_infra::bus::Bus;
use chartline_infra::store::AnyStore;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;

pub use auth::{Claims, Role, Secret};
use schema::{ApiState, ChartlineSchema, MutationRoot, PhiReads, Query, SubscriptionRoot};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Query nesting and cost limits: bombs are refused before any resolver runs.
pub const MAX_DEPTH: usize = 12;
pub const MAX_COMPLEXITY: usize = 2_000;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Prefix of the reason a WebSocket is closed with when `connection_init` is refused.
const FORBIDDEN: &str = "Forbidden";

pub struct ApiConfig {
    pub listen: String,
    pub secret: Secret,
    pub store: AnyStore,
    pub bus: Bus,
    pub root: String,
    /// Read models (projections); list queries need them.
    pub read_db: Option<chartline_projections::db::ReadDb>,
    /// The compliance map `complianceMap` shows (the deployment's, as loaded by `serve`).
    pub compliance_map: chartline_domain::compliance::ComplianceMap,
}

#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    unauthenticated: AtomicU64,
    errors: AtomicU64,
    phi_reads: AtomicU64,
}

#[derive(Clone)]
struct AppState {
    schema: ChartlineSchema,
    secret: Secret,
    store: AnyStore,
    metrics: Arc<Metrics>,
    live: Arc<live::Live>,
}

pub fn build_schema(state: ApiState) -> ChartlineSchema {
    async_graphql::Schema::build(Query::default(), MutationRoot, SubscriptionRoot)
        .data(state)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .finish()
}

/// The SDL of the public contract (committed as `services/api/schema.graphql`).
pub fn sdl() -> String {
    async_graphql::Schema::build(Query::default(), MutationRoot, SubscriptionRoot)
        .finish()
        .sdl()
}

pub struct Api {
    listener: TcpListener,
    router: Router,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn now_seconds() -> i64 {
    chrono::Utc::now().timestamp()
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({
            "errors": [{"message": message, "extensions": {"code": code}}]
        })),
    )
        .into_response()
}

async fn graphql_post(
    State(app): State<AppState>,
    headers: HeaderMap,
    request: GraphQLRequest,
) -> Response {
    app.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let claims = match auth::bearer(header)
        .and_then(|token| auth::verify(&app.secret, token, now_seconds()))
    {
        Ok(claims) => claims,
        Err(error) => {
            app.metrics.unauthenticated.fetch_add(1, Ordering::Relaxed);
            return error_response(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                &error.to_string(),
            );
        }
    };
    let reads = Arc::new(PhiReads::default());
    let request = request.into_inner();
    let operation = request.operation_name.clone();
    let request = request.data(claims.clone()).data(reads.clone());
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, app.schema.execute(request)).await {
        Ok(response) => response,
        Err(_) => {
            async_graphql::Response::from_errors(vec![ServerError::new("request timed out", None)])
        }
    };
    if !response.errors.is_empty() {
        app.metrics.errors.fetch_add(1, Ordering::Relaxed);
    }
    let reads: Vec<_> = std::mem::take(&mut *reads.0.lock().expect("PHI log lock"));
    if !reads.is_empty() {
        app.metrics
            .phi_reads
            .fetch_add(reads.len() as u64, Ordering::Relaxed);
        if let Err(error) = phi::record(&app.store, &claims, operation.as_deref(), reads).await {
            // PHI was read but could not be logged: refuse to hand it out.
            tracing::error!(%error, "PHI access could not be recorded; response withheld");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the audit log is unavailable; retry",
            );
        }
    }
    GraphQLResponse::from(response).into_response()
}

async fn graphql_ws(
    State(app): State<AppState>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let secret = app.secret.clone();
            // async-graphql closes a refused `connection_init` with 1002; the
            // graphql-transport-ws spec says 4403 Forbidden, which standard clients
            // (graphql-ws) treat as final instead of reconnecting.
            let (sink, stream) = socket.split();
            let sink = sink.with(|message: Message| async move {
                Ok::<_, axum::Error>(match message {
                    Message::Close(Some(frame))
                        if frame.code == 1002 && frame.reason.starts_with(FORBIDDEN) =>
                    {
                        Message::Close(Some(CloseFrame {
                            code: 4403,
                            reason: frame.reason,
                        }))
                    }
                    other => other,
                })
            });
            GraphQLWebSocket::new_with_pair(sink, stream, app.schema.clone(), protocol)
                .on_connection_init(move |payload| async move {
                    let token = payload
                        .get("Authorization")
                        .or_else(|| payload.get("authorization"))
                        .and_then(|v| v.as_str())
                        .map(|v| v.trim_start_matches("Bearer ").to_string())
                        .or_else(|| {
                            payload
                                .get("token")
                                .and_then(|v| v.as_str())
                                .map(str::to_owned)
                        })
                        .ok_or_else(|| {
                            async_graphql::Error::new(format!(
                                "{FORBIDDEN}: connection_init needs an Authorization bearer token"
                            ))
                        })?;
                    let claims = auth::verify(&secret, &token, now_seconds())
                        .map_err(|e| async_graphql::Error::new(format!("{FORBIDDEN}: {e}")))?;
                    let mut data = Data::default();
                    data.insert(claims);
                    Ok(data)
                })
                .serve()
                .await
        })
}

/// Refuses bodies over [`MAX_BODY_BYTES`] before any parsing (also chunked ones).
async fn limit_body(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES) {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BAD_USER_INPUT",
            "request body too large",
        );
    }
    match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
        Err(_) => error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BAD_USER_INPUT",
            "request body too large",
        ),
    }
}

async fn readyz(State(app): State<AppState>) -> Response {
    match app.store.head_position().await {
        Ok(head) => (StatusCode::OK, format!("ready: store head {head}\n")).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: event store unreachable\n",
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    let head = app.store.head_position().await.unwrap_or(0);
    let m = &app.metrics;
    let body = format!(
        "# TYPE chartline_graphql_requests_total counter\nchartline_graphql_requests_total {}\n\
         # TYPE chartline_graphql_unauthenticated_total counter\nchartline_graphql_unauthenticated_total {}\n\
         # TYPE chartline_graphql_errors_total counter\nchartline_graphql_errors_total {}\n\
         # TYPE chartline_phi_reads_total counter\nchartline_phi_reads_total {}\n\
         # TYPE chartline_store_head_position gauge\nchartline_store_head_position {head}\n\
         # TYPE chartline_live_published_total counter\nchartline_live_published_total {}\n\
         # TYPE chartline_live_gate_wait_seconds gauge\nchartline_live_gate_wait_seconds {}\n",
        m.requests.load(Ordering::Relaxed),
        m.unauthenticated.load(Ordering::Relaxed),
        m.errors.load(Ordering::Relaxed),
        m.phi_reads.load(Ordering::Relaxed),
        app.live.published.load(Ordering::Relaxed),
        app.live.gate_wait_micros.load(Ordering::Relaxed) as f64 / 1e6,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

impl Api {
    pub async fn build(config: ApiConfig) -> anyhow::Result<Api> {
        let live = live::Live::new();
        let tasks = live
            .start(config.store.clone(), config.read_db.clone())
            .await?;
        let schema = build_schema(ApiState {
            store: config.store.clone(),
            bus: config.bus,
            root: config.root,
            live: live.clone(),
            read_db: config.read_db,
            compliance_map: Arc::new(config.compliance_map),
        });
        let app = AppState {
            schema,
            secret: config.secret,
            store: config.store,
            metrics: Arc::default(),
            live,
        };
        let router = Router::new()
            .route("/graphql", get(graphql_ws).post(graphql_post))
            .route("/", get(|| async { Html(include_str!("graphiql.html")) }))
            .route(
                "/graphiql",
                get(|| async { Html(include_str!("graphiql.html")) }),
            )
            .route(
                "/dashboard",
                get(|| async { Html(include_str!("dashboard.html")) }),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .layer(axum::middleware::from_fn(limit_body))
            .with_state(app);
        let listener = TcpListener::bind(&config.listen).await?;
        Ok(Api {
            listener,
            router,
            tasks,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let result = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        for task in &self.tasks {
            task.abort();
        }
        Ok(result?)
    }
}
