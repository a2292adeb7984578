//! The single writer shared by the SQL backends: group commit of concurrent appends.
//!
//! Callers send [`AppendRequest`]s over a channel; one task drains whatever is pending
//! (bounded), and the backend commits the whole group in one transaction. Planning —
//! idempotency, tenant ownership, expected versions, positions, hashes — is a pure
//! function ([`plan`]) over the state the backend loaded inside that transaction, so
//! both backends decide identically. Each request gets its own result: a conflicting
//! request is answered with its error and contributes no rows, the others commit.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chartline_proto::hash::{
    GENESIS_HASH, canonical_metadata, canonical_time, chain_hash_from_head, write_canonical_head,
};
use chartline_proto::{EventEnvelope, NewEvent, StreamId, TenantId};
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::{AppendResult, ExpectedVersion, RawEvent, StoreError};

pub(crate) struct AppendRequest {
    pub tenant: TenantId,
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    /// One per event, in order ([`prepare`]).
    pub prepared: Vec<PreparedEvent>,
    pub reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

/// What a caller computes for each of its events before the writer orders them: the
/// stored texts of data and metadata and the head of the hashed canonical bytes
/// ([`write_canonical_head`]). None of it depends on the group, so concurrent callers
/// serialize in parallel and the single writer only adds each event's tail and hashes.
#[derive(Debug, Clone)]
pub(crate) struct PreparedEvent {
    pub data: Arc<str>,
    /// The metadata's canonical JSON, both stored and hashed.
    pub metadata: Arc<str>,
    pub canonical_head: Vec<u8>,
}

/// Serializes a validated batch once for storing and hashing; an event whose stored
/// data and metadata exceed `max_event_bytes` is refused, naming its size.
pub(crate) fn prepare(
    events: &[NewEvent],
    max_event_bytes: usize,
) -> Result<Vec<PreparedEvent>, StoreError> {
    events
        .iter()
        .map(|event| {
            let data = serde_json::to_string(&event.data).expect("JSON values serialize");
            // Same text as serde's, members in canonical order: the same size.
            let metadata = canonical_metadata(&event.metadata);
            super::check_event_size(event, data.len() + metadata.len(), max_event_bytes)?;
            let mut canonical_head = Vec::with_capacity(data.len() + metadata.len() + 96);
            write_canonical_head(
                &mut canonical_head,
                &event.data,
                event.event_id,
                &event.event_type,
                &metadata,
            );
            Ok(PreparedEvent {
                data: data.into(),
                metadata: metadata.into(),
                canonical_head,
            })
        })
        .collect()
}

/// A stream's row as loaded inside the write transaction.
#[derive(Debug, Clone)]
pub(crate) struct StreamRow {
    pub tenant: String,
    pub version: u64,
    pub last_hash: String,
}

/// An already-stored event, loaded for the idempotency check.
#[derive(Debug, Clone)]
pub(crate) struct StoredEvent {
    pub stream_id: String,
    pub stream_version: u64,
    pub global_position: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
}

/// A row to insert into `events`.
#[derive(Debug, Clone)]
pub(crate) struct EventRow {
    pub global_position: u64,
    pub event_id: String,
    pub tenant: String,
    pub stream_id: String,
    pub stream_version: u64,
    pub event_type: String,
    pub schema_version: u32,
    /// Shared with the request's [`PreparedEvent`]: a group's texts are not copied.
    pub data: Arc<str>,
    pub metadata: Arc<str>,
    pub recorded_at: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A stream's state after a plan. Only a `created` stream is written (its row in the
/// streams registry); version and last hash are remembered by the writer's cache, and
/// the database keeps them in the stream's newest event.
#[derive(Debug, Clone)]
pub(crate) struct StreamUpdate {
    pub stream_id: String,
    pub tenant: String,
    pub category: String,
    pub version: u64,
    pub last_hash: String,
    /// The plan writes the stream's first event: the stream needs its registry row.
    pub created: bool,
}

pub(crate) struct Plan {
    pub rows: Vec<EventRow>,
    pub streams: Vec<StreamUpdate>,
    pub replies: Vec<Result<AppendResult, StoreError>>,
}

/// What the backend loaded inside the transaction for a group of requests.
pub(crate) struct Loaded {
    pub known_tenants: HashSet<String>,
    pub streams: HashMap<String, StreamRow>,
    pub existing: HashMap<Uuid, StoredEvent>,
    pub next_position: u64,
}

/// Ids the backend must load for a group: tenants, streams and event ids.
pub(crate) fn keys(batch: &[AppendRequest]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut tenants: Vec<String> = batch.iter().map(|r| r.tenant.to_string()).collect();
    tenants.sort();
    tenants.dedup();
    let mut streams: Vec<String> = batch.iter().map(|r| r.stream.to_string()).collect();
    streams.sort();
    streams.dedup();
    let events = batch
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.event_id.to_string()))
        .collect();
    (tenants, streams, events)
}

fn same_content(stored: &StoredEvent, stream: &StreamId, event: &NewEvent) -> bool {
    stored.stream_id == stream.as_str()
        && stored.event_type == event.event_type
        && stored.schema_version == event.schema_version
        && stored.data == event.data
        && serde_json::to_value(&event.metadata).is_ok_and(|m| m == stored.metadata)
}

/// What an event id of a request is to the store.
enum Known {
    /// Not stored, not planned: to be written.
    New,
    /// Already stored or planned with the same content, at (version, position).
    Same(u64, u64),
    /// The id is taken by different content.
    Different,
}

/// Decides every request of a group against the loaded state. Pure.
pub(crate) fn plan(
    batch: &[AppendRequest],
    mut loaded: Loaded,
    recorded_at: DateTime<Utc>,
) -> Plan {
    let recorded_at_text = canonical_time(recorded_at);
    let mut rows = Vec::new();
    // Streams the plan writes to, in first-touch order, and whether the plan creates them.
    let mut touched: Vec<(String, bool)> = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    let mut next_position = loaded.next_position;

    // Events planned earlier in this group, by id: (request index, event index, version,
    // position). A duplicate later in the group is answered as a retry, not stored twice,
    // and is compared with the planned event itself (no copy of its data is kept).
    let mut planned_ids: HashMap<Uuid, (usize, usize, u64, u64)> = HashMap::new();

    for (request_index, request) in batch.iter().enumerate() {
        let reply = (|| {
            let stream_key = request.stream.as_str();
            // Idempotency first: a retried append must get its original result even if
            // the stream moved on since.
            let known: Vec<Known> = request
                .events
                .iter()
                .map(|event| {
                    if let Some(stored) = loaded.existing.get(&event.event_id) {
                        return if same_content(stored, &request.stream, event) {
                            Known::Same(stored.stream_version, stored.global_position)
                        } else {
                            Known::Different
                        };
                    }
                    match planned_ids.get(&event.event_id) {
                        Some(&(r, i, version, position)) => {
                            if batch[r].stream == request.stream && batch[r].events[i] == *event {
                                Known::Same(version, position)
                            } else {
                                Known::Different
                            }
                        }
                        None => Known::New,
                    }
                })
                .collect();
            if let Some(index) = known.iter().position(|k| !matches!(k, Known::New)) {
                if known.iter().any(|k| matches!(k, Known::New)) {
                    return Err(StoreError::PartiallyStoredBatch(
                        request.events[index].event_id,
                    ));
                }
                if let Some(reused) = known.iter().position(|k| matches!(k, Known::Different)) {
                    return Err(StoreError::EventIdReused(request.events[reused].event_id));
                }
                let position_of = |k: &Known| match *k {
                    Known::Same(version, position) => (version, position),
                    _ => unreachable!("every event is known and the same"),
                };
                let (first_version, first_position) = position_of(&known[0]);
                let (last_version, last_position) = position_of(&known[known.len() - 1]);
                return Ok(AppendResult {
                    stream_id: request.stream.clone(),
                    first_version,
                    last_version,
                    first_position,
                    last_position,
                    deduplicated: true,
                });
            }
            if !loaded.known_tenants.contains(request.tenant.as_str()) {
                return Err(StoreError::UnknownTenant(request.tenant.to_string()));
            }
            let current = loaded.streams.get(stream_key);
            if let Some(row) = current
                && row.tenant != request.tenant.as_str()
            {
                return Err(StoreError::ForeignStream(request.stream.clone()));
            }
            let actual = current.map(|row| row.version);
            let ok = match request.expected {
                ExpectedVersion::Any => true,
                ExpectedVersion::NoStream => actual.is_none(),
                ExpectedVersion::Exact(v) => actual == Some(v),
            };
            if !ok {
                return Err(StoreError::Conflict {
                    stream: request.stream.clone(),
                    expected: request.expected,
                    actual,
                });
            }
            let mut version = actual.unwrap_or(0);
            let mut prev_hash =
                current.map_or_else(|| GENESIS_HASH.to_owned(), |r| r.last_hash.clone());
            let first_position = next_position;
            let first_version = version + 1;
            for (event, prepared) in request.events.iter().zip(&request.prepared) {
                version += 1;
                let hash = chain_hash_from_head(
                    &prev_hash,
                    &prepared.canonical_head,
                    &recorded_at_text,
                    event.schema_version,
                    &request.stream,
                    version,
                );
                rows.push(EventRow {
                    global_position: next_position,
                    event_id: event.event_id.to_string(),
                    tenant: request.tenant.to_string(),
                    stream_id: stream_key.to_owned(),
                    stream_version: version,
                    event_type: event.event_type.clone(),
                    schema_version: event.schema_version,
                    data: Arc::clone(&prepared.data),
                    metadata: Arc::clone(&prepared.metadata),
                    recorded_at: recorded_at_text.clone(),
                    prev_hash: std::mem::replace(&mut prev_hash, hash.clone()),
                    hash,
                });
                next_position += 1;
            }
            loaded.streams.insert(
                stream_key.to_owned(),
                StreamRow {
                    tenant: request.tenant.to_string(),
                    version,
                    last_hash: prev_hash,
                },
            );
            if !touched.iter().any(|(s, _)| s == stream_key) {
                touched.push((stream_key.to_owned(), first_version == 1));
            }
            for (offset, event) in request.events.iter().enumerate() {
                planned_ids.insert(
                    event.event_id,
                    (
                        request_index,
                        offset,
                        first_version + offset as u64,
                        first_position + offset as u64,
                    ),
                );
            }
            Ok(AppendResult {
                stream_id: request.stream.clone(),
                first_version,
                last_version: version,
                first_position,
                last_position: next_position - 1,
                deduplicated: false,
            })
        })();
        replies.push(reply);
    }

    let streams = touched
        .into_iter()
        .map(|(stream_id, created)| {
            let row = &loaded.streams[&stream_id];
            let category = stream_id
                .split_once('-')
                .map_or(stream_id.as_str(), |(c, _)| c)
                .to_owned();
            StreamUpdate {
                tenant: row.tenant.clone(),
                version: row.version,
                last_hash: row.last_hash.clone(),
                category,
                stream_id,
                created,
            }
        })
        .collect();
    Plan {
        rows,
        streams,
        replies,
    }
}

/// Plans a group from state loaded inside the transaction, now; also returns the loaded
/// tenants and streams, which refresh the writer's cache once the plan commits.
pub(crate) fn plan_loaded(
    batch: &[AppendRequest],
    loaded: Loaded,
) -> (Plan, HashSet<String>, HashMap<String, StreamRow>) {
    let tenants = loaded.known_tenants.clone();
    let streams = loaded.streams.clone();
    (plan(batch, loaded, Utc::now()), tenants, streams)
}

/// What the single writer remembers between groups so that the common case — new events
/// appended to streams this writer already knows — can be planned without reading the
/// database first.
///
/// The cache is a *speculation*, never trusted on its own: a backend commits a plan made
/// from it only in a transaction whose unique constraints prove it still holds. The
/// cache never runs ahead of the database (it learns only what committed), so if any
/// other writer appended since, the first position the plan assumed free is taken; a
/// stream that moved on has the assumed next version taken; a stream assumed new has its
/// registry row and version 1 taken; a stored event id is taken. Any of these fails the
/// whole transaction — another process wrote, a stream was evicted, a retry re-sends
/// stored ids — and the group is planned again from state loaded inside a transaction,
/// exactly as without the cache. Conflicts, idempotent replays and unknown tenants are therefore
/// always decided from loaded state, never from the cache.
#[derive(Default)]
pub(crate) struct WriteCache {
    /// Highest committed position as last seen by this writer; `None` when unknown.
    head: Option<u64>,
    tenants: HashSet<String>,
    /// Streams known to exist with their state; a stream absent here is speculated new.
    streams: HashMap<String, StreamRow>,
}

/// Bound on cached streams; when exceeded the stream cache starts over (a miss costs one
/// fallback to the loading path, never a wrong answer).
const MAX_CACHED_STREAMS: usize = 100_000;

/// A plan made from the cache.
pub(crate) struct Speculation {
    pub plan: Plan,
    /// Head position assumed (positions start at `head + 1`).
    pub head: u64,
}

impl WriteCache {
    /// Plans `batch` from the cache when it can be: the head and every tenant are known
    /// and every request turns out to be a plain new append. `None` means "load".
    pub fn speculate(
        &self,
        batch: &[AppendRequest],
        recorded_at: DateTime<Utc>,
    ) -> Option<Speculation> {
        let head = self.head?;
        if !batch
            .iter()
            .all(|r| self.tenants.contains(r.tenant.as_str()))
        {
            return None;
        }
        // A stream absent from the cache is assumed new.
        let mut streams = HashMap::with_capacity(batch.len());
        for request in batch {
            let key = request.stream.as_str();
            if !streams.contains_key(key)
                && let Some(row) = self.streams.get(key)
            {
                streams.insert(key.to_owned(), row.clone());
            }
        }
        let known_tenants = batch.iter().map(|r| r.tenant.to_string()).collect();
        let plan = plan(
            batch,
            Loaded {
                known_tenants,
                streams,
                existing: HashMap::new(),
                next_position: head + 1,
            },
            recorded_at,
        );
        let clean = plan
            .replies
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| !r.deduplicated));
        clean.then_some(Speculation { plan, head })
    }

    /// Records a committed plan. `loaded` is the pre-state the plan was made from when it
    /// was loaded from the database (it then also refreshes the cache).
    pub fn committed(
        &mut self,
        plan: &Plan,
        head_before: u64,
        loaded: Option<(HashSet<String>, HashMap<String, StreamRow>)>,
    ) {
        if let Some((tenants, streams)) = loaded {
            self.tenants.extend(tenants);
            if self.streams.len() + streams.len() > MAX_CACHED_STREAMS {
                self.streams.clear();
            }
            self.streams.extend(streams);
        }
        if self.streams.len() + plan.streams.len() > MAX_CACHED_STREAMS {
            self.streams.clear();
        }
        for update in &plan.streams {
            self.streams.insert(
                update.stream_id.clone(),
                StreamRow {
                    tenant: update.tenant.clone(),
                    version: update.version,
                    last_hash: update.last_hash.clone(),
                },
            );
        }
        self.head = Some(plan.rows.last().map_or(head_before, |r| r.global_position));
    }

    /// Forgets everything (after an error whose effect on the database is unknown).
    pub fn forget(&mut self) {
        *self = WriteCache::default();
    }
}

/// One result per request of a group, or an error for the whole group (nothing written).
pub(crate) type GroupOutcome = Result<Vec<Result<AppendResult, StoreError>>, StoreError>;

/// A backend that can commit a group of appends in one transaction.
pub(crate) trait BatchCommitter: Send + Sync + 'static {
    /// Runs one write transaction for the group; returns one result per request, or an
    /// error for the whole group when the transaction itself failed (nothing written).
    fn commit_batch(&self, batch: &[AppendRequest]) -> impl Future<Output = GroupOutcome> + Send;

    /// Commits a lone request synchronously on the caller's thread when that costs no
    /// waiting (SQLite: the writer connection is free and the group is small); `None`
    /// sends it to the writer task. Only for backends whose commit does not await: a
    /// synchronous commit cannot be cancelled half-way by a dropped caller.
    fn try_commit_now(&self, _batch: &[AppendRequest]) -> Option<GroupOutcome> {
        None
    }
}

type InlineCommit = dyn Fn(&[AppendRequest]) -> Option<GroupOutcome> + Send + Sync;

/// Handle to the writer task.
#[derive(Clone)]
pub(crate) struct Writer {
    sender: mpsc::Sender<AppendRequest>,
    head: watch::Receiver<u64>,
    head_tx: std::sync::Arc<watch::Sender<u64>>,
    inline: std::sync::Arc<InlineCommit>,
    /// Set while the writer task holds requests and waits for more to join their group:
    /// a caller then queues behind them instead of committing on its own thread.
    gathering: std::sync::Arc<AtomicBool>,
}

/// Publishes the highest position a group committed (wakes live subscribers).
fn publish_head(head_tx: &watch::Sender<u64>, results: &[Result<AppendResult, StoreError>]) {
    let head = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| !r.deduplicated)
        .map(|r| r.last_position)
        .max();
    if let Some(head) = head {
        head_tx.send_if_modified(|current| {
            let newer = head > *current;
            if newer {
                *current = head;
            }
            newer
        });
    }
}

/// Most events one group transaction carries (keeps transactions short).
const MAX_GROUP_EVENTS: usize = 5_000;
/// Longest a group waits for the requests it expects (the timer's resolution is 1 ms,
/// so this is the shortest bounded wait tokio offers).
const GROUP_WAIT: Duration = Duration::from_millis(1);
/// Transient failures of a whole group are retried this many times before callers see
/// `Unavailable` (the transaction rolled back, so retrying is safe).
const GROUP_RETRIES: u32 = 5;

impl Writer {
    pub fn spawn<C: BatchCommitter>(committer: C, initial_head: u64) -> Self {
        let (sender, mut receiver) = mpsc::channel::<AppendRequest>(4_096);
        let (head_tx, head) = watch::channel(initial_head);
        let head_tx = std::sync::Arc::new(head_tx);
        let committer = std::sync::Arc::new(committer);
        let inline: std::sync::Arc<InlineCommit> = {
            let committer = std::sync::Arc::clone(&committer);
            std::sync::Arc::new(move |batch: &[AppendRequest]| committer.try_commit_now(batch))
        };
        let task_head_tx = std::sync::Arc::clone(&head_tx);
        let gathering = std::sync::Arc::new(AtomicBool::new(false));
        let task_gathering = std::sync::Arc::clone(&gathering);
        tokio::spawn(async move {
            let head_tx = task_head_tx;
            let gathering = task_gathering;
            // Requests the next group should hold: the callers the last group answered
            // (they tend to come back together) plus those that queued while it committed.
            let mut expected = 1;
            while let Some(first) = receiver.recv().await {
                let mut events = first.events.len();
                let mut batch = vec![first];
                let drain =
                    |batch: &mut Vec<AppendRequest>,
                     events: &mut usize,
                     receiver: &mut mpsc::Receiver<AppendRequest>| {
                        while *events < MAX_GROUP_EVENTS {
                            match receiver.try_recv() {
                                Ok(next) => {
                                    *events += next.events.len();
                                    batch.push(next);
                                }
                                Err(_) => break,
                            }
                        }
                    };
                drain(&mut batch, &mut events, &mut receiver);
                gathering.store(true, Ordering::Release);
                // Adaptive group commit: wait, bounded, for the requests this group expects.
                // In-process callers just answered are woken but not yet run; waiting on
                // the queue lets them run and enqueue into this group instead of each
                // paying a commit of its own. Callers farther away (a client of the store
                // service over NATS) need a round trip: without the wait they split into
                // two cohorts that take turns, each arriving while the other commits. A
                // group that falls short lowers the next expectation, so callers that do
                // not come back cost it once; a lone writer (expected 1) never waits.
                if batch.len() < expected && events < MAX_GROUP_EVENTS {
                    let deadline = tokio::time::sleep(GROUP_WAIT);
                    tokio::pin!(deadline);
                    while batch.len() < expected && events < MAX_GROUP_EVENTS {
                        tokio::select! {
                            biased;
                            next = receiver.recv() => match next {
                                Some(next) => {
                                    events += next.events.len();
                                    batch.push(next);
                                }
                                None => break,
                            },
                            _ = &mut deadline => break,
                        }
                        drain(&mut batch, &mut events, &mut receiver);
                    }
                }
                gathering.store(false, Ordering::Release);
                let mut attempt = 0;
                let outcome = loop {
                    match committer.commit_batch(&batch).await {
                        Ok(results) => break Ok(results),
                        Err(error) if error.is_retryable() && attempt < GROUP_RETRIES => {
                            attempt += 1;
                            tracing::warn!(%error, attempt, "event store group commit failed; retrying");
                            tokio::time::sleep(Duration::from_millis(20 * 2u64.pow(attempt))).await;
                        }
                        Err(error) => break Err(error),
                    }
                };
                expected = (batch.len() + receiver.len()).max(1);
                match outcome {
                    Ok(results) => {
                        publish_head(&head_tx, &results);
                        for (request, result) in batch.into_iter().zip(results) {
                            let _ = request.reply.send(result);
                        }
                    }
                    Err(error) => {
                        for request in batch {
                            let _ = request.reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        });
        Writer {
            sender,
            head,
            head_tx,
            inline,
            gathering,
        }
    }

    pub async fn append(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        max_event_bytes: usize,
    ) -> Result<AppendResult, StoreError> {
        // On the caller's task: concurrent callers validate and serialize in parallel.
        super::validate_events(tenant, &events)?;
        let prepared = prepare(&events, max_event_bytes)?;
        let (reply, response) = oneshot::channel();
        let request = AppendRequest {
            tenant: tenant.clone(),
            stream: stream.clone(),
            expected,
            events,
            prepared,
            reply,
        };
        // Nobody queued for the writer task nor waiting in it: commit on this thread if
        // the backend can without waiting, saving two task hand-offs. A group failure (nothing written)
        // goes on to the task, which retries transient ones.
        if self.sender.capacity() == self.sender.max_capacity()
            && !self.gathering.load(Ordering::Acquire)
            && let Some(Ok(mut results)) = (self.inline)(std::slice::from_ref(&request))
        {
            publish_head(&self.head_tx, &results);
            return results.pop().expect("one result per request");
        }
        self.sender
            .send(request)
            .await
            .map_err(|_| StoreError::Unavailable("event store writer stopped".into()))?;
        response
            .await
            .map_err(|_| StoreError::Unavailable("event store writer stopped".into()))?
    }

    /// Watch of the highest position this process committed (wakes live subscribers).
    pub fn head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }
}

/// What a read builds from a stored row: an [`EventEnvelope`] with its payload parsed,
/// or a [`RawEvent`] that keeps the payload as its stored text.
pub(crate) trait FromEventRow: Sized + Send + 'static {
    /// The payload as this read keeps it, made from the stored text.
    type Payload;
    fn payload(data: &str) -> Result<Self::Payload, serde_json::Error>;
    /// `envelope.data` is `Null` here.
    fn assemble(envelope: EventEnvelope, payload: Self::Payload) -> Self;
    /// Brings the event to its type's current schema (the stored bytes stay as they are);
    /// an event the codec cannot upcast is `Corrupt`.
    fn upcast(self) -> Result<Self, StoreError>;
}

fn not_upcast(id: Uuid, error: &dyn std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("event {id}: {error}"))
}

impl FromEventRow for EventEnvelope {
    type Payload = serde_json::Value;
    fn payload(data: &str) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(data)
    }
    fn assemble(mut envelope: EventEnvelope, payload: serde_json::Value) -> Self {
        envelope.data = payload;
        envelope
    }
    fn upcast(self) -> Result<Self, StoreError> {
        let id = self.event_id;
        chartline_proto::codec::upcast_envelope(self).map_err(|e| not_upcast(id, &e))
    }
}

impl FromEventRow for RawEvent {
    type Payload = String;
    fn payload(data: &str) -> Result<String, serde_json::Error> {
        Ok(data.to_owned())
    }
    fn assemble(envelope: EventEnvelope, data: String) -> Self {
        RawEvent { envelope, data }
    }
    /// Only a payload below its current schema (rare) is parsed, upcast and written back
    /// as text.
    fn upcast(self) -> Result<Self, StoreError> {
        let RawEvent { mut envelope, data } = self;
        let current = chartline_proto::codec::current_schema_version(
            envelope.category(),
            &envelope.event_type,
        );
        if envelope.schema_version == current {
            return Ok(RawEvent { envelope, data });
        }
        let id = envelope.event_id;
        envelope.data = serde_json::from_str(&data).map_err(|e| not_upcast(id, &e))?;
        Ok(RawEvent::from_envelope(envelope.upcast()?))
    }
}

/// Builds an envelope (or a [`RawEvent`]) from a stored row's columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn envelope_from_columns<T: FromEventRow>(
    global_position: i64,
    event_id: &str,
    stream_id: &str,
    stream_version: i64,
    event_type: String,
    schema_version: i64,
    data: &str,
    metadata: &str,
    recorded_at: &str,
    prev_hash: String,
    hash: String,
) -> Result<T, StoreError> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Corrupt(format!("event at position {global_position}: {what}: {e}"))
    };
    let payload = T::payload(data).map_err(|e| corrupt("data", &e))?;
    let envelope = EventEnvelope {
        event_id: Uuid::parse_str(event_id).map_err(|e| corrupt("event_id", &e))?,
        stream_id: StreamId::parse(stream_id).map_err(|e| corrupt("stream_id", &e))?,
        stream_version: stream_version as u64,
        global_position: global_position as u64,
        event_type,
        schema_version: schema_version as u32,
        data: serde_json::Value::Null,
        metadata: serde_json::from_str(metadata).map_err(|e| corrupt("metadata", &e))?,
        recorded_at: chartline_proto::time::parse_utc(recorded_at)
            .map_err(|e| corrupt("recorded_at", &e))?,
        prev_hash,
        hash,
    };
    Ok(T::assemble(envelope, payload))
}

#[cfg(test)]
mod tests {
    use chartline_proto::{Actor, ActorKind, Metadata};

    use super::*;

    fn request(stream: &str, events: Vec<NewEvent>) -> AppendRequest {
        AppendRequest {
            tenant: TenantId::parse("clinic-a").unwrap(),
            stream: StreamId::parse(stream).unwrap(),
            expected: ExpectedVersion::Any,
            prepared: prepare(&events, usize::MAX).unwrap(),
            events,
            reply: oneshot::channel().0,
        }
    }

    fn event(n: u64) -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "Noted".into(),
            schema_version: 1,
            data: serde_json::json!({ "n": n }),
            metadata: Metadata {
                tenant: TenantId::parse("clinic-a").unwrap(),
                actor: Actor::new(ActorKind::System, "test"),
                correlation_id: Uuid::now_v7(),
                causation_id: None,
                source: "test".into(),
                occurred_at: Utc::now(),
                contains_phi: false,
            },
        }
    }

    fn empty_store() -> Loaded {
        Loaded {
            known_tenants: ["clinic-a".to_owned()].into(),
            streams: HashMap::new(),
            existing: HashMap::new(),
            next_position: 1,
        }
    }

    /// `prepare` checks sizes on the stored texts (canonical metadata); the NATS client
    /// checks them before sending on serde's text (`validate_append`). The two must
    /// agree, or an event could pass one limit and fail the other.
    #[test]
    fn prepared_sizes_equal_the_clients_size_check() {
        let mut odd = event(7);
        odd.metadata.actor = Actor::new(ActorKind::Clinician, "dr \"é\"\u{1f600}\n\u{1}");
        odd.metadata.causation_id = Some(Uuid::now_v7());
        odd.metadata.source = "tab\there".into();
        odd.data = serde_json::json!({ "text": "a\u{2028}b", "x": 1.5e300, "n": -3 });
        for event in [event(1), odd] {
            let prepared = prepare(std::slice::from_ref(&event), usize::MAX).unwrap();
            let size = prepared[0].data.len() + prepared[0].metadata.len();
            assert_eq!(size, crate::store::serialized_size(&event));
            let limit = size - 1;
            assert!(matches!(
                prepare(std::slice::from_ref(&event), limit),
                Err(StoreError::EventTooLarge { size: s, limit: l, .. }) if s == size && l == limit
            ));
        }
    }

    /// Concurrent retries of one append can land in the same group: the repeat is
    /// answered with the first one's positions and stores nothing; a reused id with other
    /// content, or a batch mixing planned and new ids, is refused — as against stored ids.
    #[test]
    fn duplicates_within_one_group_are_retries_not_new_rows() {
        let (a, b) = (event(1), event(2));
        let mut changed = a.clone();
        changed.data = serde_json::json!({ "n": 99 });
        let batch = [
            request("note-1", vec![a.clone(), b.clone()]),
            request("note-1", vec![a.clone(), b.clone()]),
            request("note-1", vec![changed]),
            request("note-1", vec![b.clone(), event(3)]),
            request("note-2", vec![a.clone(), b]),
        ];
        let plan = plan(&batch, empty_store(), Utc::now());
        assert_eq!(plan.rows.len(), 2, "only the first request writes rows");
        let first = plan.replies[0].as_ref().unwrap();
        let retry = plan.replies[1].as_ref().unwrap();
        assert!(!first.deduplicated && retry.deduplicated);
        assert_eq!(
            (
                retry.first_position,
                retry.last_position,
                retry.last_version
            ),
            (
                first.first_position,
                first.last_position,
                first.last_version
            )
        );
        assert_eq!(plan.replies[2], Err(StoreError::EventIdReused(a.event_id)));
        assert!(matches!(
            plan.replies[3],
            Err(StoreError::PartiallyStoredBatch(_))
        ));
        assert_eq!(
            plan.replies[4],
            Err(StoreError::EventIdReused(a.event_id)),
            "the same ids on another stream are other content"
        );
    }
}
