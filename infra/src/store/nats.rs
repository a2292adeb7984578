//! The event store as a service over NATS request/reply, and its client.
//!
//! Subjects: `chartline.store.<tenant>.<operation>`; the tenant token `_all` (not a
//! valid tenant id) addresses system-wide reads (projections, relay). Bodies and replies
//! are JSON; a reply is `{"ok": …}` or `{"err": StoreError}`. Service instances share
//! the subjects through the queue group `chartline-store`; every instance writes through
//! the same database lock, so any number of them is safe.
//!
//! Client calls have bounded timeouts. A timeout leaves the outcome of an append
//! unknown, which is why it maps to `Unavailable` and why retrying is safe: appends are
//! idempotent by event id.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use chartline_proto::{EventEnvelope, NewEvent, StreamId, TenantId, subjects};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    AppendResult, Direction, EventStore, ExpectedVersion, MAX_READ_LIMIT, ReadScope, StoreError,
    StoreStats, VerifyReport,
};

/// Queue group shared by store service instances.
pub const QUEUE_GROUP: &str = "chartline-store";
/// Subject token for system-wide scope.
pub const ALL_TENANTS: &str = "_all";
/// Replies stay under NATS' default 1 MiB max payload.
const MAX_REPLY_BYTES: usize = 900 * 1024;

#[derive(Serialize, Deserialize)]
struct AppendBody {
    stream_id: StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
}

#[derive(Serialize, Deserialize)]
struct ReadStreamBody {
    stream_id: StreamId,
    from_version: u64,
    direction: Direction,
    limit: usize,
}

#[derive(Serialize, Deserialize)]
struct ReadAllBody {
    after_position: u64,
    limit: usize,
}

#[derive(Serialize, Deserialize)]
struct StreamBody {
    stream_id: StreamId,
}

/// A page of a read; `truncated` when the reply size cap cut it short of `limit`
/// (the client then continues), so a short page without it means "end reached".
#[derive(Serialize, Deserialize)]
struct Page {
    events: Vec<EventEnvelope>,
    truncated: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply<T> {
    Ok(T),
    Err(StoreError),
}

/// Serves a store over NATS until `shutdown` resolves; in-flight requests finish.
///
/// `root` is the subject root (`chartline` in production; tests isolate themselves with
/// their own root).
pub async fn serve<S: EventStore>(
    client: async_nats::Client,
    store: S,
    root: String,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), StoreError> {
    let mut subscription = client
        .queue_subscribe(format!("{root}.store.*.*"), QUEUE_GROUP.to_string())
        .await
        .map_err(|e| StoreError::Unavailable(format!("subscribe failed: {e}")))?;
    // Bounded concurrency: enough to fill group commits, bounded memory under load.
    let permits = std::sync::Arc::new(Semaphore::new(512));
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            message = subscription.next() => match message {
                Some(message) => message,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let store = store.clone();
        let client = client.clone();
        let root = root.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(reply_to) = message.reply.clone() else {
                return;
            };
            let body = handle(&store, &root, &message.subject, &message.payload).await;
            if let Err(error) = client.publish(reply_to, body.into()).await {
                tracing::warn!(%error, "store service could not send a reply");
            }
        });
    }
    let _ = subscription.unsubscribe().await;
    // Wait for in-flight handlers.
    let _ = permits.acquire_many(512).await;
    let _ = client.flush().await;
    Ok(())
}

fn encode<T: Serialize>(reply: Reply<T>) -> Vec<u8> {
    serde_json::to_vec(&reply).expect("replies serialize")
}

fn parse_body<T: DeserializeOwned>(payload: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(payload)
        .map_err(|e| StoreError::InvalidInput(format!("request body: {e}")))
}

/// Caps a page at the reply size limit.
fn page_reply(mut events: Vec<EventEnvelope>) -> Vec<u8> {
    let mut truncated = false;
    loop {
        let bytes = encode(Reply::Ok(Page {
            events: std::mem::take(&mut events),
            truncated,
        }));
        if bytes.len() <= MAX_REPLY_BYTES {
            return bytes;
        }
        let page: Reply<Page> = serde_json::from_slice(&bytes).expect("just encoded");
        let Reply::Ok(mut page) = page else {
            unreachable!()
        };
        if page.events.len() <= 1 {
            return encode::<Page>(Reply::Err(StoreError::Corrupt(
                "a single event exceeds the NATS reply size".into(),
            )));
        }
        page.events.truncate(page.events.len() / 2);
        events = page.events;
        truncated = true;
    }
}

async fn handle<S: EventStore>(store: &S, root: &str, subject: &str, payload: &[u8]) -> Vec<u8> {
    let tokens: Vec<&str> = subject
        .strip_prefix(root)
        .and_then(|rest| rest.strip_prefix(".store."))
        .map(|rest| rest.split('.').collect())
        .unwrap_or_default();
    let [tenant_token, operation] = tokens.as_slice() else {
        return encode::<()>(Reply::Err(StoreError::InvalidInput(format!(
            "bad subject {subject}"
        ))));
    };
    let scope = if *tenant_token == ALL_TENANTS {
        ReadScope::AllTenants
    } else {
        match TenantId::parse(tenant_token) {
            Ok(tenant) => ReadScope::Tenant(tenant),
            Err(e) => return encode::<()>(Reply::Err(StoreError::InvalidInput(e.to_string()))),
        }
    };
    let tenant = match &scope {
        ReadScope::Tenant(tenant) => Some(tenant.clone()),
        ReadScope::AllTenants => None,
    };
    let need_tenant = || {
        tenant
            .clone()
            .ok_or_else(|| StoreError::InvalidInput(format!("{operation} needs a tenant")))
    };
    fn reply<T: Serialize>(result: Result<T, StoreError>) -> Vec<u8> {
        encode(match result {
            Ok(value) => Reply::Ok(value),
            Err(error) => Reply::Err(error),
        })
    }
    match *operation {
        "append" => reply(
            async {
                let tenant = need_tenant()?;
                let body: AppendBody = parse_body(payload)?;
                store
                    .append(&tenant, &body.stream_id, body.expected, body.events)
                    .await
            }
            .await,
        ),
        "read_stream" => {
            let result = async {
                let tenant = need_tenant()?;
                let body: ReadStreamBody = parse_body(payload)?;
                store
                    .read_stream(
                        &tenant,
                        &body.stream_id,
                        body.from_version,
                        body.direction,
                        body.limit,
                    )
                    .await
            }
            .await;
            match result {
                Ok(events) => page_reply(events),
                Err(error) => encode::<Page>(Reply::Err(error)),
            }
        }
        "read_all" => {
            let result = async {
                let body: ReadAllBody = parse_body(payload)?;
                store
                    .read_all(&scope, body.after_position, body.limit)
                    .await
            }
            .await;
            match result {
                Ok(events) => page_reply(events),
                Err(error) => encode::<Page>(Reply::Err(error)),
            }
        }
        "head" => reply(store.head_position().await),
        "verify_stream" => reply(
            async {
                let tenant = need_tenant()?;
                let body: StreamBody = parse_body(payload)?;
                store.verify_stream(&tenant, &body.stream_id).await
            }
            .await,
        ),
        "verify_all" => reply(store.verify_all(&scope).await),
        "ensure_tenant" => reply(
            async {
                let tenant = need_tenant()?;
                store.ensure_tenant(&tenant).await
            }
            .await,
        ),
        "stats" => reply(store.stats().await),
        other => encode::<()>(Reply::Err(StoreError::InvalidInput(format!(
            "unknown store operation {other}"
        )))),
    }
}

/// An [`EventStore`] that talks to the store service over NATS.
#[derive(Clone)]
pub struct NatsEventStore {
    client: async_nats::Client,
    timeout: Duration,
    root: String,
}

impl NatsEventStore {
    pub fn new(client: async_nats::Client) -> Self {
        NatsEventStore {
            client,
            timeout: Duration::from_secs(5),
            root: subjects::ROOT.to_string(),
        }
    }

    /// Connects to `nats://host:port`; fails fast when NATS is unreachable.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(3))
            .retry_on_initial_connect()
            .name("chartline-store-client")
            .connect(url)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to NATS at {url}: {e}"))
            })?;
        Ok(NatsEventStore::new(client))
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Subject root of the store service to talk to (see [`serve`]).
    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        tenant_token: &str,
        operation: &str,
        body: &B,
    ) -> Result<T, StoreError> {
        let subject = format!("{}.store.{tenant_token}.{operation}", self.root);
        let payload =
            serde_json::to_vec(body).map_err(|e| StoreError::InvalidInput(e.to_string()))?;
        let max_payload = self.client.server_info().max_payload;
        if max_payload > 0 && payload.len() > max_payload {
            return Err(StoreError::InvalidInput(format!(
                "request of {} bytes exceeds the NATS max payload of {max_payload} bytes; split the batch",
                payload.len()
            )));
        }
        let request = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(self.timeout));
        let message = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => {
                    StoreError::Unavailable("no event store service is answering on NATS".into())
                }
                RequestErrorKind::TimedOut => StoreError::Unavailable(format!(
                    "event store did not answer within {:?}; outcome unknown, retry with the same event ids",
                    self.timeout
                )),
                _ => StoreError::Unavailable(format!("NATS request failed: {e}")),
            })?;
        match serde_json::from_slice::<Reply<T>>(&message.payload) {
            Ok(Reply::Ok(value)) => Ok(value),
            Ok(Reply::Err(error)) => Err(error),
            Err(e) => Err(StoreError::Unavailable(format!(
                "unreadable store reply: {e}"
            ))),
        }
    }

    fn tenant_token(scope: &ReadScope) -> &str {
        match scope {
            ReadScope::Tenant(tenant) => tenant.as_str(),
            ReadScope::AllTenants => ALL_TENANTS,
        }
    }
}

impl EventStore for NatsEventStore {
    async fn append(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        // Same checks as the service, before anything travels.
        super::validate_append(tenant, &events, super::DEFAULT_MAX_EVENT_BYTES)?;
        self.call(
            tenant.as_str(),
            "append",
            &AppendBody {
                stream_id: stream.clone(),
                expected,
                events,
            },
        )
        .await
    }

    async fn read_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let limit = limit.min(MAX_READ_LIMIT);
        let mut events: Vec<EventEnvelope> = Vec::new();
        let mut from = from_version;
        loop {
            let page: Page = self
                .call(
                    tenant.as_str(),
                    "read_stream",
                    &ReadStreamBody {
                        stream_id: stream.clone(),
                        from_version: from,
                        direction,
                        limit: limit - events.len(),
                    },
                )
                .await?;
            let truncated = page.truncated;
            events.extend(page.events);
            match (truncated, events.last()) {
                (true, Some(last)) if events.len() < limit => {
                    from = match direction {
                        Direction::Forwards => last.stream_version + 1,
                        Direction::Backwards => last.stream_version.saturating_sub(1),
                    };
                }
                _ => return Ok(events),
            }
        }
    }

    async fn read_all(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let limit = limit.min(MAX_READ_LIMIT);
        let mut events: Vec<EventEnvelope> = Vec::new();
        let mut after = after_position;
        loop {
            let page: Page = self
                .call(
                    Self::tenant_token(scope),
                    "read_all",
                    &ReadAllBody {
                        after_position: after,
                        limit: limit - events.len(),
                    },
                )
                .await?;
            let truncated = page.truncated;
            events.extend(page.events);
            match (truncated, events.last()) {
                (true, Some(last)) if events.len() < limit => after = last.global_position,
                _ => return Ok(events),
            }
        }
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        self.call(ALL_TENANTS, "head", &()).await
    }

    async fn verify_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<VerifyReport, StoreError> {
        self.call(
            tenant.as_str(),
            "verify_stream",
            &StreamBody {
                stream_id: stream.clone(),
            },
        )
        .await
    }

    async fn verify_all(&self, scope: &ReadScope) -> Result<VerifyReport, StoreError> {
        self.call(Self::tenant_token(scope), "verify_all", &())
            .await
    }

    async fn ensure_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        self.call(tenant.as_str(), "ensure_tenant", &()).await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.call(ALL_TENANTS, "stats", &()).await
    }
}
