//! The event store as a service over NATS request/reply, and its client.
//!
//! Subjects: `chartline.store.<tenant>.<operation>`; the tenant token `_all` (not a
//! valid tenant id) addresses system-wide reads (projections, relay). Bodies and replies
//! are JSON; a reply is `{"ok": …}` or `{"err": StoreError}`. Service instances share
//! the subjects through the queue group `chartline-store`; every instance writes through
//! the same database lock, so any number of them is safe.
//!
//! Concurrent appends from one client process travel together: while an append is in
//! flight, the next ones are gathered (scheduler yields, at most 100 µs) and sent as one
//! `append_many` request whose reply carries one result per append, so each caller
//! still gets its own conflict or error. The service hands them to the store at once,
//! where they join one group commit. A lone writer sends plain `append` requests.
//!
//! Client calls have bounded timeouts. A timeout leaves the outcome of an append
//! unknown, which is why it maps to `Unavailable` and why retrying is safe: appends are
//! idempotent by event id.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use chartline_proto::{EventEnvelope, NewEvent, StreamId, TenantId, subjects};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

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
/// Most appends one `append_many` request carries (the service rejects more).
const MAX_APPENDS_PER_REQUEST: usize = 256;
/// Scheduler yields without a new append after which a client batch is sent.
const BATCH_YIELDS: u32 = 2;
/// Longest a batch waits for the callers the last reply answered to come back.
const BATCH_WAIT: Duration = Duration::from_micros(100);

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

impl<T> From<Result<T, StoreError>> for Reply<T> {
    fn from(result: Result<T, StoreError>) -> Self {
        match result {
            Ok(value) => Reply::Ok(value),
            Err(error) => Reply::Err(error),
        }
    }
}

impl<T> Reply<T> {
    fn into_result(self) -> Result<T, StoreError> {
        match self {
            Reply::Ok(value) => Ok(value),
            Reply::Err(error) => Err(error),
        }
    }
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
        encode(Reply::from(result))
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
        "append_many" => reply(
            async {
                let tenant = need_tenant()?;
                let bodies: Vec<AppendBody> = parse_body(payload)?;
                if bodies.len() > MAX_APPENDS_PER_REQUEST {
                    return Err(StoreError::InvalidInput(format!(
                        "{} appends in one request; at most {MAX_APPENDS_PER_REQUEST}",
                        bodies.len()
                    )));
                }
                // All enter the store's writer queue in this one poll, so they share a
                // group commit; each keeps its own result.
                let tenant = &tenant;
                let results =
                    futures::future::join_all(bodies.into_iter().map(|body| async move {
                        store
                            .append(tenant, &body.stream_id, body.expected, body.events)
                            .await
                    }))
                    .await;
                Ok(results.into_iter().map(Reply::from).collect::<Vec<_>>())
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
    batcher: Arc<Batcher>,
}

/// Gathers a client's concurrent appends into `append_many` requests.
#[derive(Default)]
struct Batcher {
    /// Appends of this client awaiting their reply.
    in_flight: AtomicUsize,
    /// The gathering task, started by the first append that finds another in flight.
    queue: std::sync::OnceLock<mpsc::UnboundedSender<PendingAppend>>,
    /// Callers answered by a batch reply that have not appended again yet: callers
    /// answered together tend to come back together, so a batch waits for them.
    /// Shared with the gathering task, which must not hold the queue's sender (the task
    /// ends when the last clone of the store drops it).
    returning: Arc<AtomicUsize>,
}

/// An append waiting for a batch: its tenant, its serialized body, its caller.
struct PendingAppend {
    tenant: String,
    body: Vec<u8>,
    reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

/// Counts an append as in flight until dropped (also when its caller gives up).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl NatsEventStore {
    pub fn new(client: async_nats::Client) -> Self {
        NatsEventStore {
            client,
            timeout: Duration::from_secs(5),
            root: subjects::ROOT.to_string(),
            batcher: Arc::default(),
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
        // Batches are sent with the settings of the store that gathers them.
        self.batcher = Arc::default();
        self
    }

    /// Subject root of the store service to talk to (see [`serve`]).
    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self.batcher = Arc::default();
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
        let payload = self.payload(body)?;
        request(
            &self.client,
            &self.root,
            self.timeout,
            tenant_token,
            operation,
            payload,
        )
        .await
    }

    /// A request body, refused before it travels when NATS could not carry it.
    fn payload<B: Serialize>(&self, body: &B) -> Result<Vec<u8>, StoreError> {
        let payload =
            serde_json::to_vec(body).map_err(|e| StoreError::InvalidInput(e.to_string()))?;
        let max_payload = self.client.server_info().max_payload;
        if max_payload > 0 && payload.len() > max_payload {
            return Err(StoreError::InvalidInput(format!(
                "request of {} bytes exceeds the NATS max payload of {max_payload} bytes; split the batch",
                payload.len()
            )));
        }
        Ok(payload)
    }

    /// The gathering task's queue, started on first use.
    fn batch_queue(&self) -> &mpsc::UnboundedSender<PendingAppend> {
        self.batcher.queue.get_or_init(|| {
            let (queue, pending) = mpsc::unbounded_channel();
            tokio::spawn(gather_appends(
                self.client.clone(),
                self.root.clone(),
                self.timeout,
                Arc::clone(&self.batcher.returning),
                pending,
            ));
            queue
        })
    }

    fn tenant_token(scope: &ReadScope) -> &str {
        match scope {
            ReadScope::Tenant(tenant) => tenant.as_str(),
            ReadScope::AllTenants => ALL_TENANTS,
        }
    }
}

/// One request/reply exchange with the store service.
async fn request<T: DeserializeOwned>(
    client: &async_nats::Client,
    root: &str,
    timeout: Duration,
    tenant_token: &str,
    operation: &str,
    payload: Vec<u8>,
) -> Result<T, StoreError> {
    let subject = format!("{root}.store.{tenant_token}.{operation}");
    let request = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(timeout));
    let message = client
        .send_request(subject, request)
        .await
        .map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => {
                StoreError::Unavailable("no event store service is answering on NATS".into())
            }
            RequestErrorKind::TimedOut => StoreError::Unavailable(format!(
                "event store did not answer within {timeout:?}; outcome unknown, retry with the same event ids"
            )),
            _ => StoreError::Unavailable(format!("NATS request failed: {e}")),
        })?;
    serde_json::from_slice::<Reply<T>>(&message.payload)
        .map_err(|e| StoreError::Unavailable(format!("unreadable store reply: {e}")))?
        .into_result()
}

/// The client's gathering task: takes the appends waiting, lets the callers a reply
/// answered come back (briefly, by yielding: they were woken together and are
/// serializing their next append), and sends what it holds as one request per tenant,
/// without waiting for the reply before gathering again.
async fn gather_appends(
    client: async_nats::Client,
    root: String,
    timeout: Duration,
    returning: Arc<AtomicUsize>,
    mut pending: mpsc::UnboundedReceiver<PendingAppend>,
) {
    while let Some(first) = pending.recv().await {
        let mut gathered = vec![first];
        let started = std::time::Instant::now();
        let mut idle_yields = 0;
        loop {
            let before = gathered.len();
            while let Ok(next) = pending.try_recv() {
                gathered.push(next);
            }
            if gathered.len() == before {
                idle_yields += 1;
            }
            if gathered.len() >= MAX_APPENDS_PER_REQUEST {
                break;
            }
            if idle_yields > BATCH_YIELDS && returning.load(Ordering::Acquire) == 0 {
                break;
            }
            if started.elapsed() >= BATCH_WAIT {
                // Those still out are not coming back soon: stop expecting them.
                returning.store(0, Ordering::Release);
                break;
            }
            tokio::task::yield_now().await;
        }
        let max_payload = client.server_info().max_payload;
        for batch in split_batches(gathered, max_payload) {
            tokio::spawn(send_batch(
                client.clone(),
                root.clone(),
                timeout,
                Arc::clone(&returning),
                batch,
            ));
        }
    }
}

/// Groups appends by tenant, in arrival order, into requests NATS can carry.
fn split_batches(gathered: Vec<PendingAppend>, max_payload: usize) -> Vec<Vec<PendingAppend>> {
    let limit = if max_payload == 0 {
        usize::MAX
    } else {
        max_payload
    };
    let mut batches: Vec<(usize, Vec<PendingAppend>)> = Vec::new();
    let mut open: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for append in gathered {
        // `[`, `]` and a comma per body.
        let size = append.body.len() + 1;
        let fitting = open.get(&append.tenant).copied().filter(|&index| {
            let (bytes, batch) = &batches[index];
            batch.len() < MAX_APPENDS_PER_REQUEST && bytes + size <= limit
        });
        match fitting {
            Some(index) => {
                batches[index].0 += size;
                batches[index].1.push(append);
            }
            None => {
                open.insert(append.tenant.clone(), batches.len());
                batches.push((1 + size, vec![append]));
            }
        }
    }
    batches.into_iter().map(|(_, batch)| batch).collect()
}

/// Sends one batch (a lone append as a plain `append`) and answers each of its callers.
async fn send_batch(
    client: async_nats::Client,
    root: String,
    timeout: Duration,
    returning: Arc<AtomicUsize>,
    batch: Vec<PendingAppend>,
) {
    let tenant = batch[0].tenant.clone();
    if batch.len() == 1 {
        let PendingAppend { body, reply, .. } = batch.into_iter().next().expect("one append");
        let result = request(&client, &root, timeout, &tenant, "append", body).await;
        let _ = reply.send(result);
        return;
    }
    let mut payload = Vec::with_capacity(batch.iter().map(|a| a.body.len() + 1).sum::<usize>() + 1);
    payload.push(b'[');
    let mut replies = Vec::with_capacity(batch.len());
    for (index, append) in batch.into_iter().enumerate() {
        if index > 0 {
            payload.push(b',');
        }
        payload.extend_from_slice(&append.body);
        replies.push(append.reply);
    }
    payload.push(b']');
    let results: Result<Vec<Reply<AppendResult>>, StoreError> =
        request(&client, &root, timeout, &tenant, "append_many", payload).await;
    match results {
        Ok(results) if results.len() == replies.len() => {
            returning.fetch_add(replies.len(), Ordering::AcqRel);
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result.into_result());
            }
        }
        Ok(results) => {
            let error = StoreError::Unavailable(format!(
                "the store answered {} of {} appends; outcome unknown, retry with the same event ids",
                results.len(),
                replies.len()
            ));
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
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
        let body = self.payload(&AppendBody {
            stream_id: stream.clone(),
            expected,
            events,
        })?;
        let others = self.batcher.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(&self.batcher.in_flight);
        let returning = &self.batcher.returning;
        // Alone, and not one of several callers a batch answered (the others are about
        // to come back): nothing to gather, no hand-off.
        if others == 0 && returning.load(Ordering::Acquire) == 0 {
            return request(
                &self.client,
                &self.root,
                self.timeout,
                tenant.as_str(),
                "append",
                body,
            )
            .await;
        }
        let (reply, result) = oneshot::channel();
        self.batch_queue()
            .send(PendingAppend {
                tenant: tenant.as_str().to_owned(),
                body,
                reply,
            })
            .map_err(|_| StoreError::Unavailable("the NATS append batcher stopped".into()))?;
        // Back, and queued: only now may the gatherer stop waiting for this caller.
        let _ = returning.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        result
            .await
            .map_err(|_| StoreError::Unavailable("the NATS append batcher stopped".into()))?
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(tenant: &str, bytes: usize) -> PendingAppend {
        PendingAppend {
            tenant: tenant.into(),
            body: vec![b'x'; bytes],
            reply: oneshot::channel().0,
        }
    }

    fn shape(batches: &[Vec<PendingAppend>]) -> Vec<(String, Vec<usize>)> {
        batches
            .iter()
            .map(|batch| {
                (
                    batch[0].tenant.clone(),
                    batch.iter().map(|a| a.body.len()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn batches_group_by_tenant_in_arrival_order() {
        let gathered = vec![
            pending("a", 1),
            pending("b", 2),
            pending("a", 3),
            pending("b", 4),
            pending("a", 5),
        ];
        let batches = split_batches(gathered, 1024);
        assert_eq!(
            shape(&batches),
            vec![("a".into(), vec![1, 3, 5]), ("b".into(), vec![2, 4])]
        );
    }

    #[test]
    fn a_batch_stays_under_the_max_payload_with_its_brackets_and_commas() {
        // `[` + 30 + `,` + 30 + `,` + 30 + `]` = 94 bytes: three fit, a fourth does not.
        let gathered = (0..4).map(|_| pending("a", 30)).collect();
        let batches = split_batches(gathered, 94);
        assert_eq!(
            shape(&batches),
            vec![("a".into(), vec![30, 30, 30]), ("a".into(), vec![30])]
        );
        let payload = |batch: &Vec<PendingAppend>| {
            2 + batch.iter().map(|a| a.body.len()).sum::<usize>() + batch.len() - 1
        };
        assert!(batches.iter().all(|batch| payload(batch) <= 94));
        // 0 means the server announced no limit.
        assert_eq!(
            split_batches((0..4).map(|_| pending("a", 30)).collect(), 0).len(),
            1
        );
    }

    #[test]
    fn a_batch_carries_at_most_the_appends_the_service_accepts() {
        let gathered = (0..MAX_APPENDS_PER_REQUEST + 3)
            .map(|_| pending("a", 1))
            .collect();
        let sizes: Vec<usize> = split_batches(gathered, 0).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![MAX_APPENDS_PER_REQUEST, 3]);
    }
}
