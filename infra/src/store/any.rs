//! Backend chosen at run time from a URL (`sqlite://…`, `postgres://…`, `nats://…`), and
//! the catch-up-then-live subscription every consumer of the global log uses.

use std::collections::VecDeque;
use std::time::Duration;

use chartline_proto::{EventEnvelope, NewEvent, StreamId, TenantId};
use tokio::sync::watch;

use super::nats::NatsEventStore;
use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{
    AppendResult, Direction, EventStore, ExpectedVersion, RawEvent, ReadScope, StoreError,
    StoreStats, VerifyReport,
};

/// Default embedded store location.
pub const DEFAULT_STORE_URL: &str = "sqlite://data/chartline.db";

#[derive(Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
    Nats(NatsEventStore),
}

impl AnyStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(AnyStore::Postgres(PostgresStore::open(url).await?))
        } else if url.starts_with("nats://") {
            Ok(AnyStore::Nats(NatsEventStore::connect(url).await?))
        } else if url.starts_with("sqlite:") || !url.contains("://") {
            Ok(AnyStore::Sqlite(SqliteStore::open(url).await?))
        } else {
            Err(StoreError::InvalidInput(format!(
                "unsupported store URL {url:?}: use sqlite://PATH, postgres://… or nats://…"
            )))
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
            AnyStore::Nats(_) => "nats",
        }
    }

    /// Wakes subscribers when this process commits (absent for the NATS client).
    pub fn head_watch(&self) -> Option<watch::Receiver<u64>> {
        match self {
            AnyStore::Sqlite(store) => Some(store.head_watch()),
            AnyStore::Postgres(store) => Some(store.head_watch()),
            AnyStore::Nats(_) => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($store) => $call.await,
            AnyStore::Postgres($store) => $call.await,
            AnyStore::Nats($store) => $call.await,
        }
    };
}

impl EventStore for AnyStore {
    async fn append(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        delegate!(self, s => s.append(tenant, stream, expected, events))
    }

    async fn read_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        delegate!(self, s => s.read_stream(tenant, stream, from_version, direction, limit))
    }

    async fn read_all(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        delegate!(self, s => s.read_all(scope, after_position, limit))
    }

    async fn read_all_raw(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<RawEvent>, StoreError> {
        delegate!(self, s => s.read_all_raw(scope, after_position, limit))
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        delegate!(self, s => s.head_position())
    }

    async fn verify_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<VerifyReport, StoreError> {
        delegate!(self, s => s.verify_stream(tenant, stream))
    }

    async fn verify_all(&self, scope: &ReadScope) -> Result<VerifyReport, StoreError> {
        delegate!(self, s => s.verify_all(scope))
    }

    async fn ensure_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        delegate!(self, s => s.ensure_tenant(tenant))
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        delegate!(self, s => s.stats())
    }
}

/// Catch-up then live over the global log. Pages by position from `after`; when it
/// reaches the head it waits for a local commit signal or polls. Because positions are
/// gap-free and commit-ordered (see the store module), the seam between catch-up and
/// live has neither gap nor duplicate: the subscription only ever asks "what is after
/// the last position I delivered".
pub struct Subscription<S: EventStore> {
    store: S,
    scope: ReadScope,
    position: u64,
    page_size: usize,
    buffer: VecDeque<EventEnvelope>,
    wake: Option<watch::Receiver<u64>>,
    poll_interval: Duration,
}

impl<S: EventStore> Subscription<S> {
    pub fn new(store: S, scope: ReadScope, after: u64) -> Self {
        Subscription {
            store,
            scope,
            position: after,
            page_size: 1_000,
            buffer: VecDeque::new(),
            wake: None,
            poll_interval: Duration::from_millis(100),
        }
    }

    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    pub fn with_wake(mut self, wake: Option<watch::Receiver<u64>>) -> Self {
        self.wake = wake;
        self
    }

    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Position of the last event delivered (the checkpoint to resume from).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Next event; waits when caught up.
    pub async fn next(&mut self) -> Result<EventEnvelope, StoreError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.position = event.global_position;
                return Ok(event);
            }
            let page = self
                .store
                .read_all(&self.scope, self.position, self.page_size)
                .await?;
            if page.is_empty() {
                match &mut self.wake {
                    Some(wake) => {
                        let _ = tokio::time::timeout(self.poll_interval, wake.changed()).await;
                    }
                    None => tokio::time::sleep(self.poll_interval).await,
                }
            } else {
                self.buffer.extend(page);
            }
        }
    }

    /// Next page of up to `page_size` events without waiting: empty when caught up.
    pub async fn next_batch(&mut self) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut page: Vec<EventEnvelope> = self.buffer.drain(..).collect();
        if page.is_empty() {
            page = self
                .store
                .read_all(&self.scope, self.position, self.page_size)
                .await?;
        }
        if let Some(last) = page.last() {
            self.position = last.global_position;
        }
        Ok(page)
    }
}
