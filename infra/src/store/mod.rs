//! The event store: the contract every backend keeps, and the write path they share.
//!
//! Backends: [`sqlite::SqliteStore`] (embedded default), [`postgres::PostgresStore`]
//! (production), [`nats::NatsEventStore`] (a client of the store service over NATS).
//! One conformance suite (`infra/tests/conformance`) runs against all three.
//!
//! ## Write path: one active writer, group commit
//! Every append goes through a single writer per process ([`writer`]): a task that drains
//! concurrent requests into one database transaction (on SQLite a lone request finds the
//! writer connection free and commits on the caller's thread through the same planner and
//! cache, which is the same single writer without the hand-off). Across processes the transaction
//! takes a global lock first (`pg_advisory_xact_lock` on PostgreSQL, `BEGIN IMMEDIATE`
//! on SQLite), so exactly one transaction writes at a time, it assigns global positions
//! as `max + 1 …` under that lock, and the next one can only start after it committed
//! and became visible. Hence:
//! - positions are gap-free and commit-ordered: a reader paging by position never skips
//!   an event that commits later with a lower position (none can), and each stream's
//!   events come out in version order;
//! - concurrent appends share one commit (group commit) while each request keeps its own
//!   expected-version check and its own result: a conflicting request is answered with
//!   its error and left out of the transaction, never aborting the others.
//!
//! This is the single-writer design of KurrentDB, chosen over transaction-id ordering
//! (`pg_snapshot_xmin`), which has the trap that a batch whose transaction got its id
//! early can order a stream's version 2 before another transaction's version 1.

pub mod any;
pub mod nats;
pub mod postgres;
mod sql;
pub mod sqlite;
mod writer;

use std::future::Future;

use chartline_proto::hash::ChainBreak;
use chartline_proto::{EventEnvelope, NewEvent, StreamId, TenantId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use any::{AnyStore, DEFAULT_STORE_URL, Subscription};

/// Default largest accepted event (data + metadata as JSON), configurable per store.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Largest batch one append may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Largest page a read returns.
pub const MAX_READ_LIMIT: usize = 10_000;

/// The optimistic-concurrency expectation of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "version", rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be exactly at this version (≥ 1).
    Exact(u64),
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl std::str::FromStr for ExpectedVersion {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "any" => Ok(ExpectedVersion::Any),
            "none" | "no-stream" | "no_stream" => Ok(ExpectedVersion::NoStream),
            number => match number.parse::<u64>() {
                Ok(0) => Ok(ExpectedVersion::NoStream),
                Ok(v) => Ok(ExpectedVersion::Exact(v)),
                Err(_) => Err(format!("expected version {value:?} is not any|none|N")),
            },
        }
    }
}

/// Where an accepted append landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    pub stream_id: StreamId,
    /// Stream version of the first and last event of the batch.
    pub first_version: u64,
    pub last_version: u64,
    /// Global positions of the first and last event of the batch.
    pub first_position: u64,
    pub last_position: u64,
    /// True when every event id was already stored: nothing new was written and these
    /// are the original positions.
    pub deduplicated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Forwards,
    Backwards,
}

/// Whose events a global read returns. `AllTenants` is for system components only
/// (projections, the relay); every user-facing read is tenant-scoped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scope", content = "tenant", rename_all = "snake_case")]
pub enum ReadScope {
    Tenant(TenantId),
    AllTenants,
}

impl ReadScope {
    fn allows(&self, tenant: &str) -> bool {
        match self {
            ReadScope::Tenant(t) => t.as_str() == tenant,
            ReadScope::AllTenants => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub backend: String,
    pub events: u64,
    pub streams: u64,
    pub tenants: u64,
    pub head_position: u64,
}

/// Result of verifying hash chains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub streams_checked: u64,
    pub events_checked: u64,
    /// The first broken link of each broken stream.
    pub breaks: Vec<ChainBreak>,
    /// Runs of positions missing from the global log (`verify_all` over all tenants,
    /// the first [`MAX_REPORTED_GAPS`]). The log is gap-free by construction, so a gap
    /// means events were deleted — which a stream's hash chain cannot show when they
    /// were its newest, or a whole stream.
    #[serde(default)]
    pub missing_positions: Vec<PositionGap>,
}

/// Positions `first..=last` are absent from the global log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionGap {
    pub first: u64,
    pub last: u64,
}

/// Most gaps one `verify_all` report lists.
pub const MAX_REPORTED_GAPS: usize = 100;

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty() && self.missing_positions.is_empty()
    }
}

/// Turns (position, next stored position) pairs — each the start of a gap — into gaps,
/// with a leading gap when the log does not start at 1.
pub(crate) fn position_gaps(first_stored: Option<u64>, jumps: &[(u64, u64)]) -> Vec<PositionGap> {
    let leading = first_stored
        .filter(|&first| first > 1)
        .map(|first| PositionGap {
            first: 1,
            last: first - 1,
        });
    leading
        .into_iter()
        .chain(jumps.iter().map(|&(before, next)| PositionGap {
            first: before + 1,
            last: next - 1,
        }))
        .take(MAX_REPORTED_GAPS)
        .collect()
}

/// Why a store operation failed. Each variant says what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "detail", rename_all = "snake_case")]
pub enum StoreError {
    /// Optimistic concurrency: another writer got there first. Re-read the stream,
    /// re-decide, append again (HTTP 409).
    #[error("wrong expected version for {stream}: expected {expected}, actual {}", actual.map_or("no stream".to_string(), |v| v.to_string()))]
    Conflict {
        stream: StreamId,
        expected: ExpectedVersion,
        actual: Option<u64>,
    },
    /// Bad input (HTTP 400): fix the request; nothing was stored.
    #[error("invalid append: {0}")]
    InvalidInput(String),
    #[error("an append needs at least one event")]
    EmptyBatch,
    #[error("event {event_id} is {size} bytes; the limit is {limit}")]
    EventTooLarge {
        event_id: Uuid,
        size: usize,
        limit: usize,
    },
    /// The tenant is not registered (HTTP 404/403): register it first.
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
    /// The stream belongs to another tenant (HTTP 403). Not retryable.
    #[error("stream {0} is not accessible to this tenant")]
    ForeignStream(StreamId),
    /// An event id already stored with different content (HTTP 409, not retryable):
    /// event ids are idempotency keys and must not be reused.
    #[error("event id {0} was already used for a different event")]
    EventIdReused(Uuid),
    /// Part of the batch was stored before and part not: a client bug (HTTP 400).
    #[error("batch mixes already-stored event ids with new ones (first stored: {0})")]
    PartiallyStoredBatch(Uuid),
    /// Database or bus unreachable, timeout. Nothing was applied by this call, or the
    /// outcome is unknown: retry with the same event ids (appends are idempotent).
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back (corruption or a newer schema): alert.
    #[error("stored event unreadable: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(error.to_string())
            }
            _ => StoreError::Unavailable(error.to_string()),
        }
    }
}

/// An event of the global log with its payload as JSON text ([`EventStore::read_all_raw`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    /// Everything but the payload: `envelope.data` is `Null`.
    pub envelope: EventEnvelope,
    /// The payload, at `envelope.schema_version` (current: raw reads are upcast too).
    pub data: String,
}

impl RawEvent {
    /// Moves an envelope's payload out into text.
    pub fn from_envelope(mut envelope: EventEnvelope) -> Self {
        let data = std::mem::take(&mut envelope.data).to_string();
        RawEvent { envelope, data }
    }
}

/// The store contract. Every backend implements it with identical semantics; the
/// conformance suite proves it.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Appends a batch atomically. See [`ExpectedVersion`] and [`StoreError`].
    /// Idempotent by event id: re-sending stored events returns their original positions.
    fn append(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendResult, StoreError>> + Send;

    /// Reads a stream from `from_version` (inclusive) in the given direction; upcast.
    /// A stream of another tenant reads as empty.
    fn read_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventEnvelope>, StoreError>> + Send;

    /// Reads the global log after `after_position` (exclusive), in position order; upcast.
    fn read_all(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventEnvelope>, StoreError>> + Send;

    /// [`EventStore::read_all`] for a consumer that decodes payloads into its own types
    /// (the projection engine): the same events, upcast, each payload as JSON text
    /// instead of a `serde_json::Value`, which saves building and freeing a value tree
    /// per event. Backends that store text hand it over as stored; this default
    /// serializes what `read_all` returns.
    fn read_all_raw(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RawEvent>, StoreError>> + Send {
        async move {
            let events = self.read_all(scope, after_position, limit).await?;
            Ok(events.into_iter().map(RawEvent::from_envelope).collect())
        }
    }

    /// Highest committed global position (0 when empty).
    fn head_position(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Recomputes one stream's hash chain from the stored bytes.
    fn verify_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> impl Future<Output = Result<VerifyReport, StoreError>> + Send;

    /// Recomputes every stream's chain in scope.
    fn verify_all(
        &self,
        scope: &ReadScope,
    ) -> impl Future<Output = Result<VerifyReport, StoreError>> + Send;

    /// Registers a tenant (idempotent).
    fn ensure_tenant(
        &self,
        tenant: &TenantId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn stats(&self) -> impl Future<Output = Result<StoreStats, StoreError>> + Send;
}

/// Pages through a stream to its end (for loading an aggregate).
pub async fn read_whole_stream<S: EventStore>(
    store: &S,
    tenant: &TenantId,
    stream: &StreamId,
) -> Result<Vec<EventEnvelope>, StoreError> {
    read_stream_tail(store, tenant, stream, 1).await
}

/// A stream from version `from` (inclusive) to its end, page by page (a caller that holds
/// versions 1…from−1 reads only what follows them).
pub async fn read_stream_tail<S: EventStore>(
    store: &S,
    tenant: &TenantId,
    stream: &StreamId,
    from: u64,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let mut events = Vec::new();
    let mut from = from.max(1);
    loop {
        let page = store
            .read_stream(tenant, stream, from, Direction::Forwards, MAX_READ_LIMIT)
            .await?;
        let done = page.len() < MAX_READ_LIMIT;
        if let Some(last) = page.last() {
            from = last.stream_version + 1;
        }
        events.extend(page);
        if done {
            return Ok(events);
        }
    }
}

/// Checks what can be checked without the database: batch shape, sizes, tenant match,
/// event type shape. Nothing is stored when this fails.
pub(crate) fn validate_append(
    tenant: &TenantId,
    events: &[NewEvent],
    max_event_bytes: usize,
) -> Result<(), StoreError> {
    validate_events(tenant, events)?;
    for event in events {
        check_event_size(event, serialized_size(event), max_event_bytes)?;
    }
    Ok(())
}

/// `EventTooLarge` when an event's serialized data and metadata (`size` bytes) exceed
/// the limit.
pub(crate) fn check_event_size(
    event: &NewEvent,
    size: usize,
    limit: usize,
) -> Result<(), StoreError> {
    if size > limit {
        return Err(StoreError::EventTooLarge {
            event_id: event.event_id,
            size,
            limit,
        });
    }
    Ok(())
}

/// [`validate_append`] without the size check, for the writer, which checks sizes on
/// the texts it stores ([`writer::prepare`]) instead of serializing twice.
pub(crate) fn validate_events(tenant: &TenantId, events: &[NewEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Err(StoreError::EmptyBatch);
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(StoreError::InvalidInput(format!(
            "a batch holds at most {MAX_BATCH_EVENTS} events, got {}",
            events.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for event in events {
        if !seen.insert(event.event_id) {
            return Err(StoreError::InvalidInput(format!(
                "event id {} appears twice in one batch",
                event.event_id
            )));
        }
        if event.metadata.tenant != *tenant {
            return Err(StoreError::InvalidInput(format!(
                "event {} carries tenant {} but is appended for {tenant}",
                event.event_id, event.metadata.tenant
            )));
        }
        let type_ok = event
            .event_type
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
            && event.event_type.len() <= 64
            && event
                .event_type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !type_ok {
            return Err(StoreError::InvalidInput(format!(
                "event type {:?} must be 1-64 chars of A-Z, a-z, 0-9, '_' starting with a letter",
                event.event_type
            )));
        }
        if event.schema_version == 0 {
            return Err(StoreError::InvalidInput(format!(
                "event {} has schema_version 0; versions start at 1",
                event.event_id
            )));
        }
    }
    Ok(())
}

fn serialized_size(event: &NewEvent) -> usize {
    /// Counts bytes instead of collecting them (sizes are checked for every event).
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, &event.data)
        .and_then(|()| serde_json::to_writer(&mut count, &event.metadata))
    {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// Verifies chains of events given in (stream, version) order, grouping by stream.
pub(crate) fn verify_grouped(events: &[EventEnvelope], report: &mut VerifyReport) {
    let mut start = 0;
    while start < events.len() {
        let stream = &events[start].stream_id;
        let end = events[start..]
            .iter()
            .position(|e| &e.stream_id != stream)
            .map_or(events.len(), |offset| start + offset);
        report.streams_checked += 1;
        report.events_checked += (end - start) as u64;
        if let Err(broken) = chartline_proto::hash::verify_chain(&events[start..end]) {
            report.breaks.push(broken);
        }
        start = end;
    }
}

/// Upcasts a page read from storage (envelopes or raw events, see
/// [`writer::FromEventRow::upcast`]); a stored event the codec cannot bring to the
/// current schema is reported as corrupt rather than skipped.
pub(crate) fn upcast_page<T: writer::FromEventRow>(events: Vec<T>) -> Result<Vec<T>, StoreError> {
    events.into_iter().map(T::upcast).collect()
}

#[cfg(test)]
mod tests {
    use super::{MAX_REPORTED_GAPS, PositionGap, position_gaps};

    fn gap(first: u64, last: u64) -> PositionGap {
        PositionGap { first, last }
    }

    #[test]
    fn gaps_include_a_missing_start_and_stop_at_the_report_limit() {
        assert_eq!(position_gaps(Some(1), &[]), vec![]);
        assert_eq!(position_gaps(None, &[]), vec![]);
        assert_eq!(
            position_gaps(Some(3), &[(5, 9), (9, 11)]),
            vec![gap(1, 2), gap(6, 8), gap(10, 10)]
        );
        let many: Vec<(u64, u64)> = (0..200).map(|i| (i * 10 + 1, i * 10 + 3)).collect();
        let gaps = position_gaps(Some(2), &many);
        assert_eq!(gaps.len(), MAX_REPORTED_GAPS);
        assert_eq!(gaps[0], gap(1, 1));
        assert_eq!(gaps[1], gap(2, 2));
    }
}
