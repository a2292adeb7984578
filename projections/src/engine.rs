//! The projection engine: checkpointed, exactly-once application of the global log to
//! read models, dead letters, blue-green rebuilds.
//!
//! ## Guarantees
//! - **Exactly-once effect.** A batch's read-model rows and the projection's checkpoint
//!   are written in one database transaction. A crash anywhere loses the whole batch or
//!   nothing; the next run resumes after the committed checkpoint.
//! - **Many writers are safe.** Every batch first locks the projection's state row
//!   (`FOR UPDATE` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite) and checks the `revision`
//!   it last saw; if someone else (another runner, a `retry`, a rebuild swap) wrote in
//!   between, the runner drops its caches and resumes from the stored checkpoint.
//! - **No silent stall.** A handler error quarantines the event in
//!   `projection_dead_letters` (projection, event id, position, error, time). Policy
//!   [`DeadLetterPolicy::Skip`] moves the checkpoint past it and goes on;
//!   [`DeadLetterPolicy::Stop`] stops that projection (status `stopped`, with the
//!   reason) until `retry` applies the event. Database and store failures are not
//!   poison: the batch is rolled back and retried with backoff.
//! - **Blue-green rebuild.** A rebuild replays from position 0 into the next
//!   generation's tables (`<table>__g<N+1>`) while the live generation keeps serving
//!   through the views `<table>`. The swap transaction locks the state row, brings the
//!   shadow up to at least the live checkpoint, repoints the views and moves the
//!   checkpoint — atomically, so readers and the live runner never see a gap.

use std::future::Future;
use std::time::{Duration, Instant};

use chartline_infra::{AnyStore, EventStore, ReadScope};
use chartline_proto::EventEnvelope;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::Serialize;
use uuid::Uuid;

use crate::cache::CacheControl;
use crate::db::{Backend, Cell, Kind, ReadDb, TableSpec, Tx, format_time};
use crate::error::ProjectionError;
use crate::event::{Domain, Event, decode, decode_raw};

/// A read model fed by the global log.
pub trait Projection: Send {
    /// Stable name: the key of its checkpoint and dead letters. Never rename.
    fn name(&self) -> &'static str;
    /// The tables it owns (each gets a view under its logical name).
    fn tables(&self) -> Vec<&'static TableSpec>;
    /// Its row caches, so the engine can reset, flush, commit and roll them back.
    fn caches(&mut self) -> Vec<&mut dyn CacheControl>;
    /// Applies one event. Must be deterministic and idempotent with respect to the
    /// event's content; read and write rows only through the caches. An `Err` that
    /// [`ProjectionError::is_poison`] quarantines the event; any other error aborts the
    /// batch for a retry.
    fn apply<'a>(
        &'a mut self,
        tx: &'a mut Tx,
        event: Event<'a>,
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;
}

/// Makes a fresh instance of a projection (rebuilds and retries need their own).
pub type ProjectionFactory = std::sync::Arc<dyn Fn() -> Box<dyn Projection> + Send + Sync>;

/// What to do after quarantining a poison event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterPolicy {
    /// Stop this projection at the event (others go on) until `retry` applies it.
    Stop,
    /// Move past the event and continue; `retry` can apply it later.
    Skip,
}

impl std::str::FromStr for DeadLetterPolicy {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "stop" => Ok(DeadLetterPolicy::Stop),
            "skip" => Ok(DeadLetterPolicy::Skip),
            other => Err(format!("dead-letter policy {other:?} is not stop|skip")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Events read and applied per transaction.
    pub batch_size: usize,
    pub policy: DeadLetterPolicy,
    /// How often a caught-up runner looks for events appended by other processes.
    pub poll_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            batch_size: 5_000,
            policy: DeadLetterPolicy::Skip,
            poll_interval: Duration::from_millis(100),
        }
    }
}

/// One projection's row in `projection_status`, as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub generation: i64,
    pub checkpoint: u64,
    pub head: u64,
    pub lag_events: u64,
    pub lag_seconds: f64,
    /// Events per second over the recent batches (0 when idle for a minute).
    pub rate_events_per_sec: f64,
    pub status: String,
    pub stopped_reason: Option<String>,
    pub dead_letters_open: u64,
    pub events_applied: u64,
    pub updated_at: String,
    /// `(generation, position)` of a rebuild in progress.
    pub rebuilding: Option<(i64, u64)>,
}

/// A quarantined event.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub projection: String,
    pub event_id: String,
    pub global_position: u64,
    pub stream_id: String,
    pub event_type: String,
    pub error: String,
    pub attempts: i64,
    pub status: String,
    pub failed_at: String,
    pub resolved_at: Option<String>,
}

/// Progress of a rebuild, reported after every batch.
#[derive(Debug, Clone, Copy)]
pub struct RebuildProgress {
    pub position: u64,
    pub head: u64,
    pub events_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub projection: String,
    pub generation: i64,
    pub position: u64,
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CatchUpReport {
    /// Events read from the log (each applied by every running projection).
    pub events: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryOutcome {
    pub projection: String,
    pub event_id: String,
    pub global_position: u64,
    /// The projection had stopped at this event and runs again.
    pub resumed: bool,
}

// ----------------------------------------------------------------------------------
// State row
// ----------------------------------------------------------------------------------

struct StateRow {
    generation: i64,
    position: u64,
    revision: i64,
    status: String,
    shadow_generation: Option<i64>,
    shadow_position: Option<u64>,
}

const STATE_COLUMNS: &str =
    "active_generation, position, revision, status, shadow_generation, shadow_position";
const STATE_KINDS: [Kind; 6] = [
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Text,
    Kind::Int,
    Kind::Int,
];

async fn lock_state(tx: &mut Tx, name: &str) -> Result<StateRow, ProjectionError> {
    let lock = match tx.backend() {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    };
    let rows = tx
        .query(
            &format!("SELECT {STATE_COLUMNS} FROM projection_state WHERE projection = ?{lock}"),
            &[Cell::Text(name.into())],
            &STATE_KINDS,
        )
        .await?;
    state_row(rows, name)
}

/// The state row as last committed, without locking it (no write transaction): enough
/// to notice stops, resumes and swaps; every batch re-checks under the lock.
async fn read_state(db: &ReadDb, name: &str) -> Result<StateRow, ProjectionError> {
    let rows = db
        .fetch(
            &format!("SELECT {STATE_COLUMNS} FROM projection_state WHERE projection = ?"),
            &[Cell::Text(name.into())],
            &STATE_KINDS,
        )
        .await?;
    state_row(rows, name)
}

fn state_row(rows: Vec<Vec<Cell>>, name: &str) -> Result<StateRow, ProjectionError> {
    let row = rows
        .into_iter()
        .next()
        .ok_or_else(|| ProjectionError::Config(format!("projection {name} is not registered")))?;
    let int = |cell: &Cell| match cell {
        Cell::Int(v) => Some(*v),
        _ => None,
    };
    Ok(StateRow {
        generation: int(&row[0]).unwrap_or(1),
        position: int(&row[1]).unwrap_or(0) as u64,
        revision: int(&row[2]).unwrap_or(0),
        status: match &row[3] {
            Cell::Text(s) => s.clone(),
            _ => "running".into(),
        },
        shadow_generation: int(&row[4]),
        shadow_position: int(&row[5]).map(|v| v as u64),
    })
}

fn now_text() -> String {
    format_time(Utc::now())
}

async fn create_generation(
    tx: &mut Tx,
    tables: &[&'static TableSpec],
    generation: i64,
) -> Result<(), ProjectionError> {
    let backend = tx.backend();
    for spec in tables {
        for statement in backend.create_table(spec, &spec.physical(generation)) {
            tx.execute(&statement, &[]).await?;
        }
    }
    Ok(())
}

async fn drop_generation(
    tx: &mut Tx,
    tables: &[&'static TableSpec],
    generation: i64,
) -> Result<(), ProjectionError> {
    for spec in tables {
        tx.execute(
            &format!("DROP TABLE IF EXISTS {}", spec.physical(generation)),
            &[],
        )
        .await?;
    }
    Ok(())
}

async fn point_views(
    tx: &mut Tx,
    tables: &[&'static TableSpec],
    generation: i64,
) -> Result<(), ProjectionError> {
    for spec in tables {
        tx.execute(&format!("DROP VIEW IF EXISTS {}", spec.name), &[])
            .await?;
        tx.execute(
            &format!(
                "CREATE VIEW {} AS SELECT * FROM {}",
                spec.name,
                spec.physical(generation)
            ),
            &[],
        )
        .await?;
    }
    Ok(())
}

/// Serializes DDL of concurrent registrations on PostgreSQL (SQLite's `BEGIN
/// IMMEDIATE` already does).
async fn ddl_lock(tx: &mut Tx) -> Result<(), ProjectionError> {
    if tx.backend() == Backend::Postgres {
        tx.execute("SELECT pg_advisory_xact_lock(774411)", &[])
            .await?;
    }
    Ok(())
}

// ----------------------------------------------------------------------------------
// Worker: one projection instance bound to one generation
// ----------------------------------------------------------------------------------

struct Worker {
    name: &'static str,
    projection: Box<dyn Projection>,
    backend: Backend,
    generation: i64,
    position: u64,
    /// Last state revision this worker saw; -1 forces a resync.
    revision: i64,
    stopped: bool,
    last_commit: Instant,
    rate: f64,
}

impl Worker {
    fn new(projection: Box<dyn Projection>, backend: Backend) -> Self {
        Worker {
            name: projection.name(),
            projection,
            backend,
            generation: 0,
            position: 0,
            revision: -1,
            stopped: false,
            last_commit: Instant::now(),
            rate: 0.0,
        }
    }

    fn reset(&mut self, generation: i64, position: u64, revision: i64, empty: bool) {
        self.generation = generation;
        self.position = position;
        self.revision = revision;
        let backend = self.backend;
        for cache in self.projection.caches() {
            cache.reset(backend, generation, empty);
        }
    }

    fn rollback(&mut self) {
        for cache in self.projection.caches() {
            cache.rollback();
        }
    }

    fn commit(&mut self) {
        for cache in self.projection.caches() {
            cache.commit();
        }
    }

    async fn flush(&mut self, tx: &mut Tx) -> Result<(), ProjectionError> {
        for cache in self.projection.caches() {
            cache.flush(tx).await?;
        }
        Ok(())
    }

    /// Converts every cache's changed rows to cells (see [`crate::cache::RowCache::prepare`]).
    fn prepare(&mut self) {
        for cache in self.projection.caches() {
            cache.prepare();
        }
    }

    /// Applies `events` to the caches, reading through `tx`; nothing is written.
    /// `Ok(Some((i, error)))`: event `i` is poison. On any error the batch's changes
    /// are dropped.
    async fn apply_events(
        &mut self,
        tx: &mut Tx,
        events: &[Event<'_>],
    ) -> Result<Option<(usize, ProjectionError)>, ProjectionError> {
        for (index, event) in events.iter().enumerate() {
            match self.projection.apply(tx, *event).await {
                Ok(()) => {}
                Err(error) if error.is_poison() => {
                    self.rollback();
                    return Ok(Some((index, error)));
                }
                Err(error) => {
                    self.rollback();
                    return Err(error);
                }
            }
        }
        Ok(None)
    }

    /// Applies `events` inside `tx` without committing. `Ok(Some((i, error)))`: event
    /// `i` is poison (the caller rolls back). Rows are flushed on success.
    async fn attempt(
        &mut self,
        tx: &mut Tx,
        events: &[Event<'_>],
    ) -> Result<Option<(usize, ProjectionError)>, ProjectionError> {
        if let Some(poison) = self.apply_events(tx, events).await? {
            return Ok(Some(poison));
        }
        if let Err(error) = self.flush(tx).await {
            self.rollback();
            return Err(error);
        }
        Ok(None)
    }

    fn note_rate(&mut self, events: usize) -> f64 {
        let elapsed = self.last_commit.elapsed().as_secs_f64().max(1e-6);
        let instant = events as f64 / elapsed;
        self.rate = if self.rate == 0.0 || elapsed > 60.0 {
            instant
        } else {
            0.7 * self.rate + 0.3 * instant
        };
        self.last_commit = Instant::now();
        self.rate
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    Live,
    Shadow,
}

enum Attempted {
    Committed,
    Poison(usize, ProjectionError),
    /// The stored state does not match this worker (another writer, a swap): resync.
    Resync,
    Stopped,
}

/// One batch of one projection: apply, then one transaction that locks the state row,
/// checks it, writes the rows and the checkpoint, and commits. `backlog`: more events
/// follow this page (a catch-up or a rebuild), so the commit need not wait for the
/// PostgreSQL WAL flush (see [`Tx::relax_durability`]).
///
/// On SQLite, which has one writer, the events are applied (and the rows converted)
/// before the write transaction, reading through a snapshot of their own
/// ([`ReadDb::begin_read`]), so projections apply in parallel and queue only to write.
/// That is safe because every writer of a projection's tables moves its `revision`
/// (live lane) or is the one rebuild that owns the shadow generation (shadow lane):
/// if the state row checked under the write lock is the one this worker last
/// committed, nobody wrote in between, and what the batch read is still current.
async fn commit_batch(
    db: &ReadDb,
    worker: &mut Worker,
    lane: Lane,
    events: &[Event<'_>],
    backlog: bool,
) -> Result<Attempted, ProjectionError> {
    // Pages are in log order: skip what this worker already applied, without a copy.
    let events =
        &events[events.partition_point(|e| e.envelope.global_position <= worker.position)..];
    let Some(first) = events.first() else {
        return Ok(Attempted::Committed);
    };
    if first.envelope.global_position != worker.position + 1 {
        return Ok(Attempted::Resync);
    }
    let applied_early = db.backend() == Backend::Sqlite;
    if applied_early {
        let mut read = db.begin_read().await?;
        let applied = worker.apply_events(&mut read, events).await;
        read.rollback().await?;
        if let Some((index, error)) = applied? {
            return Ok(Attempted::Poison(index, error));
        }
        worker.prepare();
    }
    let result = write_batch(db, worker, lane, events, backlog, applied_early).await;
    if !matches!(result, Ok(Attempted::Committed)) {
        worker.rollback();
    }
    result
}

/// The transaction of [`commit_batch`]; `applied`: the caches already hold the batch.
async fn write_batch(
    db: &ReadDb,
    worker: &mut Worker,
    lane: Lane,
    events: &[Event<'_>],
    backlog: bool,
    applied: bool,
) -> Result<Attempted, ProjectionError> {
    let mut tx = db.begin().await?;
    if backlog {
        tx.relax_durability().await?;
    }
    let state = lock_state(&mut tx, worker.name).await?;
    match lane {
        Lane::Live => {
            if state.status == "stopped" {
                worker.stopped = true;
                tx.rollback().await?;
                return Ok(Attempted::Stopped);
            }
            if state.generation != worker.generation || state.revision != worker.revision {
                worker.reset(state.generation, state.position, state.revision, false);
                tx.rollback().await?;
                return Ok(Attempted::Resync);
            }
        }
        Lane::Shadow => {
            if state.shadow_generation != Some(worker.generation)
                || state.shadow_position != Some(worker.position)
            {
                tx.rollback().await?;
                return Err(ProjectionError::Rejected(format!(
                    "rebuild of {} was superseded by another rebuild",
                    worker.name
                )));
            }
        }
    }
    let last = events.last().expect("a non-empty batch").envelope;
    if applied {
        worker.flush(&mut tx).await?;
    } else if let Some((index, error)) = worker.attempt(&mut tx, events).await? {
        tx.rollback().await?;
        return Ok(Attempted::Poison(index, error));
    }
    let position = last.global_position;
    match lane {
        Lane::Live => {
            let rate = worker.note_rate(events.len());
            tx.run(
                "UPDATE projection_state SET position = ?, revision = revision + 1, \
                 events_applied = events_applied + ?, checkpoint_recorded_at = ?, \
                 rate_events_per_sec = ?, updated_at = ? WHERE projection = ?",
                &[
                    Cell::Int(position as i64),
                    Cell::Int(events.len() as i64),
                    Cell::Text(format_time(last.recorded_at)),
                    Cell::Real(rate),
                    Cell::Text(now_text()),
                    Cell::Text(worker.name.into()),
                ],
            )
            .await?;
        }
        Lane::Shadow => {
            tx.run(
                "UPDATE projection_state SET shadow_position = ? WHERE projection = ?",
                &[Cell::Int(position as i64), Cell::Text(worker.name.into())],
            )
            .await?;
        }
    }
    if let Err(error) = tx.commit().await {
        worker.rollback();
        worker.revision = -1;
        return Err(error);
    }
    worker.commit();
    worker.position = position;
    if lane == Lane::Live {
        worker.revision = state.revision + 1;
    }
    Ok(Attempted::Committed)
}

/// Records a poison event; with `Skip` also moves the checkpoint past it, with `Stop`
/// marks the projection stopped (live lane).
async fn quarantine(
    db: &ReadDb,
    worker: &mut Worker,
    lane: Lane,
    event: &EventEnvelope,
    error: &ProjectionError,
    policy: DeadLetterPolicy,
) -> Result<(), ProjectionError> {
    tracing::warn!(
        projection = worker.name,
        event_id = %event.event_id,
        position = event.global_position,
        %error,
        "poison event quarantined"
    );
    let mut tx = db.begin().await?;
    let state = lock_state(&mut tx, worker.name).await?;
    record_dead_letter(&mut tx, worker.name, event, &error.to_string()).await?;
    match (lane, policy) {
        (Lane::Live, DeadLetterPolicy::Skip) => {
            if state.revision != worker.revision || state.position != worker.position {
                tx.rollback().await?;
                worker.revision = -1;
                return Ok(());
            }
            tx.run(
                "UPDATE projection_state SET position = ?, revision = revision + 1, \
                 checkpoint_recorded_at = ?, updated_at = ? WHERE projection = ?",
                &[
                    Cell::Int(event.global_position as i64),
                    Cell::Text(format_time(event.recorded_at)),
                    Cell::Text(now_text()),
                    Cell::Text(worker.name.into()),
                ],
            )
            .await?;
            tx.commit().await?;
            worker.position = event.global_position;
            worker.revision = state.revision + 1;
        }
        (Lane::Live, DeadLetterPolicy::Stop) => {
            tx.run(
                "UPDATE projection_state SET status = 'stopped', stopped_reason = ?, \
                 revision = revision + 1, updated_at = ? WHERE projection = ?",
                &[
                    Cell::Text(format!(
                        "poison event {} at position {}: {error}",
                        event.event_id, event.global_position
                    )),
                    Cell::Text(now_text()),
                    Cell::Text(worker.name.into()),
                ],
            )
            .await?;
            tx.commit().await?;
            worker.stopped = true;
            worker.revision = state.revision + 1;
        }
        (Lane::Shadow, DeadLetterPolicy::Skip) => {
            tx.run(
                "UPDATE projection_state SET shadow_position = ? WHERE projection = ?",
                &[
                    Cell::Int(event.global_position as i64),
                    Cell::Text(worker.name.into()),
                ],
            )
            .await?;
            tx.commit().await?;
            worker.position = event.global_position;
        }
        (Lane::Shadow, DeadLetterPolicy::Stop) => {
            tx.commit().await?;
            worker.stopped = true;
        }
    }
    Ok(())
}

async fn record_dead_letter(
    tx: &mut Tx,
    name: &str,
    event: &EventEnvelope,
    error: &str,
) -> Result<(), ProjectionError> {
    tx.run(
        "INSERT INTO projection_dead_letters (projection, event_id, global_position, stream_id, \
         event_type, error, attempts, status, failed_at, resolved_at) \
         VALUES (?, ?, ?, ?, ?, ?, 1, 'open', ?, NULL) \
         ON CONFLICT (projection, event_id) DO UPDATE SET error = excluded.error, \
         attempts = projection_dead_letters.attempts + 1, status = 'open', \
         failed_at = excluded.failed_at, resolved_at = NULL",
        &[
            Cell::Text(name.into()),
            Cell::Text(event.event_id.to_string()),
            Cell::Int(event.global_position as i64),
            Cell::Text(event.stream_id.to_string()),
            Cell::Text(event.event_type.clone()),
            Cell::Text(error.into()),
            Cell::Text(now_text()),
        ],
    )
    .await?;
    Ok(())
}

/// Applies a page to one worker, quarantining poison events per `policy`.
async fn process_page(
    db: &ReadDb,
    worker: &mut Worker,
    lane: Lane,
    events: &[Event<'_>],
    policy: DeadLetterPolicy,
    backlog: bool,
) -> Result<(), ProjectionError> {
    let mut start = 0;
    let mut end = events.len();
    let mut resyncs = 0;
    while start < events.len() && !worker.stopped {
        match commit_batch(db, worker, lane, &events[start..end], backlog).await? {
            Attempted::Committed => {
                start = end;
                end = events.len();
            }
            Attempted::Poison(0, error) => {
                let event = events[start..end]
                    .iter()
                    .find(|e| e.envelope.global_position > worker.position)
                    .map(|e| e.envelope)
                    .expect("a poison event is in the batch");
                quarantine(db, worker, lane, event, &error, policy).await?;
                start = events
                    .iter()
                    .position(|e| e.envelope.global_position > worker.position)
                    .unwrap_or(events.len());
                end = events.len();
            }
            Attempted::Poison(index, _) => {
                // Commit what precedes the poison event first, then quarantine it.
                let first = events[start..end]
                    .iter()
                    .position(|e| e.envelope.global_position > worker.position)
                    .map_or(start, |offset| start + offset);
                end = first + index;
            }
            Attempted::Resync => {
                resyncs += 1;
                if resyncs > 3 {
                    // The stored checkpoint is outside this page: the caller re-reads.
                    return Ok(());
                }
                start = events
                    .iter()
                    .position(|e| e.envelope.global_position > worker.position)
                    .unwrap_or(events.len());
                end = events.len();
            }
            Attempted::Stopped => return Ok(()),
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------
// Runner
// ----------------------------------------------------------------------------------

struct Slot {
    factory: ProjectionFactory,
    worker: Worker,
}

/// Runs a set of projections over one store into one read-model database.
pub struct ProjectionRunner {
    store: AnyStore,
    db: ReadDb,
    slots: Vec<Slot>,
    config: RunnerConfig,
    /// Lowest committed checkpoint of the running projections, published after every
    /// page (the live-lag benchmark and tests wait on it).
    checkpoint: tokio::sync::watch::Sender<u64>,
}

impl ProjectionRunner {
    /// The standard read models with the default configuration.
    pub async fn new(store: AnyStore, db: ReadDb) -> Result<Self, ProjectionError> {
        Self::with_projections(
            store,
            db,
            crate::models::standard_projections(),
            RunnerConfig::default(),
        )
        .await
    }

    /// Registers `factories` (state rows, tables, views) and loads their checkpoints.
    pub async fn with_projections(
        store: AnyStore,
        db: ReadDb,
        factories: Vec<ProjectionFactory>,
        config: RunnerConfig,
    ) -> Result<Self, ProjectionError> {
        let mut slots = Vec::new();
        for factory in factories {
            let projection = factory();
            register(&db, projection.name(), &projection.tables()).await?;
            slots.push(Slot {
                worker: Worker::new(projection, db.backend()),
                factory,
            });
        }
        let mut runner = ProjectionRunner {
            store,
            db,
            slots,
            config,
            checkpoint: tokio::sync::watch::channel(0).0,
        };
        runner.refresh().await?;
        Ok(runner)
    }

    pub fn db(&self) -> &ReadDb {
        &self.db
    }

    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// The lowest checkpoint of the running projections, updated after each page is
    /// committed by all of them.
    pub fn checkpoint_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.checkpoint.subscribe()
    }

    fn publish_checkpoint(&self) {
        if let Some(lowest) = self
            .slots
            .iter()
            .filter(|s| !s.worker.stopped)
            .map(|s| s.worker.position)
            .min()
        {
            self.checkpoint.send_if_modified(|current| {
                let changed = *current != lowest;
                *current = lowest;
                changed
            });
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.worker.name).collect()
    }

    /// Re-reads every state row: picks up stops, resumes and swaps made elsewhere.
    async fn refresh(&mut self) -> Result<(), ProjectionError> {
        for slot in &mut self.slots {
            // A plain read: on SQLite a locking read is a `BEGIN IMMEDIATE` that waits
            // for the store's writer, and `run_until` refreshes on every wake-up.
            let state = read_state(&self.db, slot.worker.name).await?;
            slot.worker.stopped = state.status == "stopped";
            if state.generation != slot.worker.generation || state.revision != slot.worker.revision
            {
                // The key-set shortcut is only valid for tables known to be empty.
                let empty = state.position == 0
                    && tables_empty(&self.db, &slot.worker.projection.tables(), state.generation)
                        .await?;
                slot.worker
                    .reset(state.generation, state.position, state.revision, empty);
            }
        }
        Ok(())
    }

    /// Processes every running projection up to the head of the log, then returns.
    pub async fn catch_up(&mut self) -> Result<CatchUpReport, ProjectionError> {
        self.catch_up_until(&mut || false).await
    }

    async fn catch_up_until(
        &mut self,
        should_stop: &mut (dyn FnMut() -> bool + Send),
    ) -> Result<CatchUpReport, ProjectionError> {
        let started = Instant::now();
        let mut report = CatchUpReport::default();
        if let Err(error) = self.refresh().await {
            self.invalidate();
            return Err(error);
        }
        let mut reader = PageReader::new(self.store.clone(), self.config.batch_size);
        while let Some(from) = self
            .slots
            .iter()
            .filter(|s| !s.worker.stopped)
            .map(|s| s.worker.position)
            .min()
        {
            let (page, full) = reader.page_after(from).await?;
            if page.0.is_empty() {
                break;
            }
            report.events += page.0.len() as u64;
            let result = self.apply_to_all(std::sync::Arc::new(page), full).await;
            if let Err(error) = result {
                self.invalidate();
                return Err(error);
            }
            self.publish_checkpoint();
            if should_stop() {
                break;
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Applies a page to every running projection, each on its own task, so they use
    /// every core (on SQLite they apply in parallel and queue only to write, see
    /// [`commit_batch`]). While a task runs, its slot holds a fresh instance that
    /// forces a resync, so a panicking task costs a resync, not a wrong read model.
    async fn apply_to_all(
        &mut self,
        page: std::sync::Arc<Page>,
        backlog: bool,
    ) -> Result<(), ProjectionError> {
        let policy = self.config.policy;
        let backend = self.db.backend();
        let mut tasks = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.worker.stopped {
                continue;
            }
            let placeholder = Worker::new((slot.factory)(), backend);
            let mut worker = std::mem::replace(&mut slot.worker, placeholder);
            let db = self.db.clone();
            let page = page.clone();
            let task = tokio::spawn(async move {
                let events = page_events(&page);
                let result =
                    process_page(&db, &mut worker, Lane::Live, &events, policy, backlog).await;
                (worker, result)
            });
            tasks.push((index, task));
        }
        let mut outcome = Ok(());
        for (index, task) in tasks {
            let result = match task.await {
                Ok((worker, result)) => {
                    self.slots[index].worker = worker;
                    result
                }
                Err(error) => Err(ProjectionError::Config(format!(
                    "projection task {} failed: {error}",
                    self.slots[index].worker.name
                ))),
            };
            if outcome.is_ok() {
                outcome = result;
            }
        }
        drop_off_the_path(page);
        outcome
    }

    /// After an error nothing in memory is trusted: resync from the database.
    fn invalidate(&mut self) {
        for slot in &mut self.slots {
            slot.worker.rollback();
            slot.worker.revision = -1;
        }
    }

    /// Catches up, then follows the log live until `shutdown` completes. Failures of
    /// the store or the database are logged and retried with backoff (1 s … 30 s);
    /// poison events follow the dead-letter policy. Stops between batches, never in
    /// the middle of one.
    pub async fn run_until(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        tokio::pin!(shutdown);
        let mut wake = self.store.head_watch();
        let mut backoff = Duration::from_secs(1);
        let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        loop {
            let flag = stop_flag.clone();
            let result = {
                let mut should_stop = || flag.load(std::sync::atomic::Ordering::Relaxed);
                let catch_up = self.catch_up_until(&mut should_stop);
                tokio::pin!(catch_up);
                loop {
                    tokio::select! {
                        result = &mut catch_up => break result,
                        () = &mut shutdown, if !stop_flag.load(std::sync::atomic::Ordering::Relaxed) => {
                            stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            };
            if stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(());
            }
            match result {
                Ok(_) => backoff = Duration::from_secs(1),
                Err(error) => {
                    tracing::error!(%error, retry_in = ?backoff, "projection runner failed; retrying");
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
            let poll = self.config.poll_interval;
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = wait_for_commit(&mut wake, poll) => {}
            }
        }
    }

    /// Status of every registered projection.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        status(&self.store, &self.db).await
    }

    pub async fn dead_letters(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<DeadLetter>, ProjectionError> {
        dead_letters(&self.db, name).await
    }

    fn slot(&self, name: &str) -> Result<&Slot, ProjectionError> {
        self.slots
            .iter()
            .find(|s| s.worker.name == name)
            .ok_or_else(|| {
                ProjectionError::Config(format!(
                    "unknown projection {name:?}; known: {}",
                    self.names().join(", ")
                ))
            })
    }

    /// Replays the whole log into a new generation of `name`'s tables, then swaps it in
    /// atomically. The live generation serves (and may be advanced by a live runner)
    /// throughout. `progress` is called after every batch.
    pub async fn rebuild(
        &mut self,
        name: &str,
        mut progress: impl FnMut(RebuildProgress) + Send,
    ) -> Result<RebuildReport, ProjectionError> {
        let factory = self.slot(name)?.factory.clone();
        let mut worker = Worker::new(factory(), self.db.backend());
        let tables = worker.projection.tables();
        let started = Instant::now();

        // 1. A fresh shadow generation.
        let mut tx = self.db.begin().await?;
        ddl_lock(&mut tx).await?;
        let state = lock_state(&mut tx, worker.name).await?;
        if let Some(old_shadow) = state.shadow_generation {
            drop_generation(&mut tx, &tables, old_shadow).await?;
        }
        let generation = state.generation.max(state.shadow_generation.unwrap_or(0)) + 1;
        drop_generation(&mut tx, &tables, generation).await?;
        create_generation(&mut tx, &tables, generation).await?;
        tx.run(
            "UPDATE projection_state SET shadow_generation = ?, shadow_position = 0, \
             shadow_started_at = ? WHERE projection = ?",
            &[
                Cell::Int(generation),
                Cell::Text(now_text()),
                Cell::Text(worker.name.into()),
            ],
        )
        .await?;
        tx.commit().await?;
        worker.reset(generation, 0, 0, true);

        // 2. Replay into the shadow.
        let result = self
            .replay_shadow(&mut worker, &mut progress, started)
            .await;
        let result = match result {
            Ok(()) => self.swap(&mut worker, &tables).await,
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            // Leave the live generation untouched; discard the shadow.
            let _ = self.abandon_shadow(worker.name, &tables, generation).await;
            return Err(error);
        }
        let seconds = started.elapsed().as_secs_f64();
        self.refresh().await?;
        Ok(RebuildReport {
            projection: worker.name.into(),
            generation,
            position: worker.position,
            events: worker.position,
            seconds,
            events_per_sec: worker.position as f64 / seconds.max(1e-9),
        })
    }

    async fn replay_shadow(
        &mut self,
        worker: &mut Worker,
        progress: &mut (dyn FnMut(RebuildProgress) + Send),
        started: Instant,
    ) -> Result<(), ProjectionError> {
        let policy = self.config.policy;
        let mut head = self.store.head_position().await?;
        let mut reader = PageReader::new(self.store.clone(), self.config.batch_size);
        loop {
            let (page, _) = reader.page_after(worker.position).await?;
            let Some(last) = page.0.last().map(|e| e.global_position) else {
                return Ok(());
            };
            let events = page_events(&page);
            let result = process_page(&self.db, worker, Lane::Shadow, &events, policy, true).await;
            drop(events);
            drop_off_the_path(page);
            result?;
            if worker.stopped {
                return Err(ProjectionError::Rejected(format!(
                    "rebuild of {} stopped at a poison event after position {} (policy stop); \
                     see `chartline projections dead-letters {}`",
                    worker.name, worker.position, worker.name
                )));
            }
            head = head.max(last);
            progress(RebuildProgress {
                position: worker.position,
                head,
                events_per_sec: worker.position as f64 / started.elapsed().as_secs_f64().max(1e-9),
            });
        }
    }

    /// The atomic blue-green swap (see the module docs).
    async fn swap(
        &mut self,
        worker: &mut Worker,
        tables: &[&'static TableSpec],
    ) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin().await?;
        ddl_lock(&mut tx).await?;
        let state = lock_state(&mut tx, worker.name).await?;
        if state.shadow_generation != Some(worker.generation) {
            tx.rollback().await?;
            return Err(ProjectionError::Rejected(format!(
                "rebuild of {} was superseded by another rebuild",
                worker.name
            )));
        }
        // Bring the shadow to at least the live checkpoint inside the locked swap, so
        // readers never see the read model go back in time.
        let mut last_recorded: Option<DateTime<Utc>> = None;
        while worker.position < state.position {
            let page =
                read_page(self.store.clone(), worker.position, self.config.batch_size).await?;
            if page.0.is_empty() {
                break;
            }
            let events = page_events(&page);
            for event in &events {
                match worker.projection.apply(&mut tx, *event).await {
                    Ok(()) => {}
                    Err(error) if error.is_poison() => {
                        // The live lane already dead-lettered it (or will): skip here too.
                        record_dead_letter(
                            &mut tx,
                            worker.name,
                            event.envelope,
                            &error.to_string(),
                        )
                        .await?;
                    }
                    Err(error) => {
                        worker.rollback();
                        return Err(error);
                    }
                }
            }
            worker.flush(&mut tx).await?;
            worker.position = page.0.last().map_or(worker.position, |e| e.global_position);
            last_recorded = page.0.last().map(|e| e.recorded_at);
        }
        point_views(&mut tx, tables, worker.generation).await?;
        drop_generation(&mut tx, tables, state.generation).await?;
        let recorded = match last_recorded {
            Some(t) => Some(format_time(t)),
            None => self.recorded_at(worker.position).await?,
        };
        tx.run(
            "UPDATE projection_state SET active_generation = ?, position = ?, \
             revision = revision + 1, status = 'running', stopped_reason = NULL, \
             checkpoint_recorded_at = ?, updated_at = ?, shadow_generation = NULL, \
             shadow_position = NULL WHERE projection = ?",
            &[
                Cell::Int(worker.generation),
                Cell::Int(worker.position as i64),
                recorded.map_or(Cell::Null, Cell::Text),
                Cell::Text(now_text()),
                Cell::Text(worker.name.into()),
            ],
        )
        .await?;
        // Dead letters the rebuild did not hit again were applied by it.
        tx.run(
            "UPDATE projection_dead_letters SET status = 'resolved', resolved_at = ? \
             WHERE projection = ? AND status = 'open' AND global_position <= ? \
             AND failed_at < (SELECT shadow_started_at FROM projection_state WHERE projection = ?)",
            &[
                Cell::Text(now_text()),
                Cell::Text(worker.name.into()),
                Cell::Int(worker.position as i64),
                Cell::Text(worker.name.into()),
            ],
        )
        .await?;
        tx.commit().await?;
        worker.commit();
        Ok(())
    }

    async fn recorded_at(&self, position: u64) -> Result<Option<String>, ProjectionError> {
        if position == 0 {
            return Ok(None);
        }
        let page = self
            .store
            .read_all(&ReadScope::AllTenants, position - 1, 1)
            .await?;
        Ok(page.first().map(|e| format_time(e.recorded_at)))
    }

    async fn abandon_shadow(
        &self,
        name: &str,
        tables: &[&'static TableSpec],
        generation: i64,
    ) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin().await?;
        ddl_lock(&mut tx).await?;
        let state = lock_state(&mut tx, name).await?;
        if state.shadow_generation == Some(generation) {
            drop_generation(&mut tx, tables, generation).await?;
            tx.run(
                "UPDATE projection_state SET shadow_generation = NULL, shadow_position = NULL \
                 WHERE projection = ?",
                &[Cell::Text(name.into())],
            )
            .await?;
        }
        tx.commit().await
    }

    /// Applies a quarantined event once (after a fix). If the projection had stopped at
    /// it, the checkpoint moves past it and the projection runs again. Applying the
    /// same dead letter twice is rejected: the letter is resolved in the same
    /// transaction as the rows it changed.
    pub async fn retry(
        &mut self,
        name: &str,
        event_id: Uuid,
    ) -> Result<RetryOutcome, ProjectionError> {
        let factory = self.slot(name)?.factory.clone();
        let letters = self
            .db
            .fetch(
                "SELECT global_position, status FROM projection_dead_letters \
                 WHERE projection = ? AND event_id = ?",
                &[Cell::Text(name.into()), Cell::Text(event_id.to_string())],
                &[Kind::Int, Kind::Text],
            )
            .await?;
        let Some(letter) = letters.into_iter().next() else {
            return Err(ProjectionError::Rejected(format!(
                "no dead letter for event {event_id} in projection {name}"
            )));
        };
        let position = match letter[0] {
            Cell::Int(p) => p as u64,
            _ => 0,
        };
        if letter[1] != Cell::Text("open".into()) {
            return Err(ProjectionError::Rejected(format!(
                "dead letter {event_id} of {name} was already applied"
            )));
        }
        let page = self
            .store
            .read_all(&ReadScope::AllTenants, position.saturating_sub(1), 1)
            .await?;
        let Some(envelope) = page.into_iter().next().filter(|e| e.event_id == event_id) else {
            return Err(ProjectionError::Rejected(format!(
                "event {event_id} is not at position {position} in the store"
            )));
        };
        let domain = decode(&envelope);
        let event = Event {
            envelope: &envelope,
            domain: &domain,
        };
        let mut worker = Worker::new(factory(), self.db.backend());
        let mut tx = self.db.begin().await?;
        let state = lock_state(&mut tx, name).await?;
        worker.reset(state.generation, state.position, state.revision, false);
        let stopped_here = state.status == "stopped" && state.position + 1 == position;
        if !stopped_here && position > state.position {
            tx.rollback().await?;
            return Err(ProjectionError::Rejected(format!(
                "{name} has not reached position {position} yet (checkpoint {}); it will apply \
                 the event when it gets there",
                state.position
            )));
        }
        // Re-check under the lock: a concurrent retry may have applied it.
        let open = tx
            .query(
                "SELECT status FROM projection_dead_letters WHERE projection = ? AND event_id = ?",
                &[Cell::Text(name.into()), Cell::Text(event_id.to_string())],
                &[Kind::Text],
            )
            .await?;
        if open.first().map(|r| &r[0]) != Some(&Cell::Text("open".into())) {
            tx.rollback().await?;
            return Err(ProjectionError::Rejected(format!(
                "dead letter {event_id} of {name} was already applied"
            )));
        }
        if let Some((_, error)) = worker.attempt(&mut tx, &[event]).await? {
            tx.rollback().await?;
            let mut tx = self.db.begin().await?;
            lock_state(&mut tx, name).await?;
            record_dead_letter(&mut tx, name, &envelope, &error.to_string()).await?;
            tx.commit().await?;
            return Err(error);
        }
        tx.run(
            "UPDATE projection_dead_letters SET status = 'resolved', resolved_at = ? \
             WHERE projection = ? AND event_id = ?",
            &[
                Cell::Text(now_text()),
                Cell::Text(name.into()),
                Cell::Text(event_id.to_string()),
            ],
        )
        .await?;
        if stopped_here {
            tx.run(
                "UPDATE projection_state SET position = ?, revision = revision + 1, \
                 status = 'running', stopped_reason = NULL, events_applied = events_applied + 1, \
                 checkpoint_recorded_at = ?, updated_at = ? WHERE projection = ?",
                &[
                    Cell::Int(position as i64),
                    Cell::Text(format_time(envelope.recorded_at)),
                    Cell::Text(now_text()),
                    Cell::Text(name.into()),
                ],
            )
            .await?;
        } else {
            tx.run(
                "UPDATE projection_state SET revision = revision + 1, updated_at = ? \
                 WHERE projection = ?",
                &[Cell::Text(now_text()), Cell::Text(name.into())],
            )
            .await?;
        }
        tx.commit().await?;
        self.refresh().await?;
        Ok(RetryOutcome {
            projection: name.into(),
            event_id: event_id.to_string(),
            global_position: position,
            resumed: stopped_here,
        })
    }
}

/// A page of the log and its decoded domain events.
type Page = (Vec<EventEnvelope>, Vec<Domain>);

/// Frees an applied page on the blocking pool. Freeing 10,000 envelopes and their
/// JSON takes tens of milliseconds, during which the next page could not start: in a
/// profile of the rebuild both runtime threads sat idle for a quarter of each page
/// while the engine's own thread freed the previous one.
fn drop_off_the_path<T: Send + 'static>(page: T) {
    tokio::task::spawn_blocking(move || drop(page));
}

/// The events of a page, for the handlers.
fn page_events(page: &Page) -> Vec<Event<'_>> {
    page.0
        .iter()
        .zip(&page.1)
        .map(|(envelope, domain)| Event { envelope, domain })
        .collect()
}

/// Reads the log page by page for catch-up and rebuild: when a page is full, the next
/// one is read and decoded by a task while the caller applies this one, so reading
/// and decoding overlap with applying on a second core.
struct PageReader {
    store: AnyStore,
    limit: usize,
    ahead: Option<(u64, tokio::task::JoinHandle<Result<Page, ProjectionError>>)>,
}

impl PageReader {
    fn new(store: AnyStore, limit: usize) -> Self {
        PageReader {
            store,
            limit,
            ahead: None,
        }
    }

    /// The page after position `from` (empty at the head) and whether it was full.
    async fn page_after(&mut self, from: u64) -> Result<(Page, bool), ProjectionError> {
        let page = match self.ahead.take() {
            Some((at, handle)) if at == from => handle
                .await
                .map_err(|e| ProjectionError::Config(format!("read task failed: {e}")))??,
            _ => read_page(self.store.clone(), from, self.limit).await?,
        };
        let full = page.0.len() == self.limit;
        if let Some(last) = page.0.last().map(|e| e.global_position).filter(|_| full) {
            let next = read_page(self.store.clone(), last, self.limit);
            self.ahead = Some((last, tokio::spawn(next)));
        }
        Ok((page, full))
    }
}

/// Reads and decodes the page after `after` (payloads straight from their stored text,
/// see [`decode_raw`]).
async fn read_page(store: AnyStore, after: u64, limit: usize) -> Result<Page, ProjectionError> {
    let page = store
        .read_all_raw(
            &ReadScope::AllTenants,
            after,
            limit.min(chartline_infra::store::MAX_READ_LIMIT),
        )
        .await?;
    let mut envelopes = Vec::with_capacity(page.len());
    let mut domains = Vec::with_capacity(page.len());
    for raw in page {
        let (envelope, domain) = decode_raw(raw)?;
        envelopes.push(envelope);
        domains.push(domain);
    }
    Ok((envelopes, domains))
}

async fn wait_for_commit(wake: &mut Option<tokio::sync::watch::Receiver<u64>>, poll: Duration) {
    match wake {
        Some(wake) => {
            let _ = tokio::time::timeout(poll, wake.changed()).await;
        }
        None => tokio::time::sleep(poll).await,
    }
}

async fn tables_empty(
    db: &ReadDb,
    tables: &[&'static TableSpec],
    generation: i64,
) -> Result<bool, ProjectionError> {
    for spec in tables {
        let rows = db
            .fetch(
                &format!(
                    "SELECT CAST(1 AS BIGINT) FROM {} LIMIT 1",
                    spec.physical(generation)
                ),
                &[],
                &[Kind::Int],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Creates the state row, the active generation's tables and the views (idempotent).
async fn register(
    db: &ReadDb,
    name: &str,
    tables: &[&'static TableSpec],
) -> Result<(), ProjectionError> {
    let mut tx = db.begin().await?;
    ddl_lock(&mut tx).await?;
    tx.run(
        "INSERT INTO projection_state (projection, active_generation, position, revision, status, \
         stopped_reason, events_applied, checkpoint_recorded_at, rate_events_per_sec, updated_at, \
         shadow_generation, shadow_position, shadow_started_at) \
         VALUES (?, 1, 0, 0, 'running', NULL, 0, NULL, 0, ?, NULL, NULL, NULL) \
         ON CONFLICT (projection) DO NOTHING",
        &[Cell::Text(name.into()), Cell::Text(now_text())],
    )
    .await?;
    let state = lock_state(&mut tx, name).await?;
    create_generation(&mut tx, tables, state.generation).await?;
    let backend = tx.backend();
    for spec in tables {
        let exists = match backend {
            Backend::Sqlite => {
                tx.query(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'view' AND name = ?",
                    &[Cell::Text(spec.name.into())],
                    &[Kind::Int],
                )
                .await?
            }
            Backend::Postgres => {
                tx.query(
                    "SELECT COUNT(*) FROM pg_views WHERE schemaname = current_schema() AND viewname = ?",
                    &[Cell::Text(spec.name.into())],
                    &[Kind::Int],
                )
                .await?
            }
        };
        if exists.first().map(|r| &r[0]) != Some(&Cell::Int(1)) {
            point_views(&mut tx, &[*spec], state.generation).await?;
        }
    }
    tx.commit().await
}

/// Status of every projection registered in `db` (no runner needed).
pub async fn status(
    store: &AnyStore,
    db: &ReadDb,
) -> Result<Vec<ProjectionStatus>, ProjectionError> {
    let head = store.head_position().await?;
    let head_time = if head > 0 {
        store
            .read_all(&ReadScope::AllTenants, head - 1, 1)
            .await?
            .first()
            .map(|e| e.recorded_at)
    } else {
        None
    };
    let rows = db
        .fetch(
            "SELECT s.projection, s.active_generation, s.position, s.status, s.stopped_reason, \
             s.events_applied, s.checkpoint_recorded_at, s.rate_events_per_sec, s.updated_at, \
             s.shadow_generation, s.shadow_position, \
             (SELECT COUNT(*) FROM projection_dead_letters d \
              WHERE d.projection = s.projection AND d.status = 'open') \
             FROM projection_state s ORDER BY s.projection",
            &[],
            &[
                Kind::Text,
                Kind::Int,
                Kind::Int,
                Kind::Text,
                Kind::Text,
                Kind::Int,
                Kind::Text,
                Kind::Real,
                Kind::Text,
                Kind::Int,
                Kind::Int,
                Kind::Int,
            ],
        )
        .await?;
    let now = Utc::now();
    Ok(rows
        .into_iter()
        .map(|row| {
            let text = |c: &Cell| match c {
                Cell::Text(s) => Some(s.clone()),
                _ => None,
            };
            let int = |c: &Cell| match c {
                Cell::Int(v) => Some(*v),
                _ => None,
            };
            let checkpoint = int(&row[2]).unwrap_or(0) as u64;
            let lag_events = head.saturating_sub(checkpoint);
            let checkpoint_time = text(&row[6])
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc));
            let lag_seconds = match (lag_events, head_time, checkpoint_time) {
                (0, _, _) => 0.0,
                (_, Some(head_time), Some(at)) => {
                    (head_time - at).num_milliseconds().max(0) as f64 / 1000.0
                }
                (_, Some(head_time), None) => {
                    (now - head_time).num_milliseconds().max(0) as f64 / 1000.0
                }
                _ => 0.0,
            };
            let updated_at = text(&row[8]).unwrap_or_default();
            let idle = DateTime::parse_from_rfc3339(&updated_at)
                .map(|t| (now - t.with_timezone(&Utc)).num_seconds() > 60)
                .unwrap_or(true);
            ProjectionStatus {
                name: text(&row[0]).unwrap_or_default(),
                generation: int(&row[1]).unwrap_or(1),
                checkpoint,
                head,
                lag_events,
                lag_seconds,
                rate_events_per_sec: if idle {
                    0.0
                } else {
                    match row[7] {
                        Cell::Real(r) => r,
                        _ => 0.0,
                    }
                },
                status: text(&row[3]).unwrap_or_default(),
                stopped_reason: text(&row[4]),
                dead_letters_open: int(&row[11]).unwrap_or(0) as u64,
                events_applied: int(&row[5]).unwrap_or(0) as u64,
                updated_at,
                rebuilding: int(&row[9]).map(|g| (g, int(&row[10]).unwrap_or(0) as u64)),
            }
        })
        .collect())
}

/// Dead letters, newest first; all projections when `name` is `None`.
pub async fn dead_letters(
    db: &ReadDb,
    name: Option<&str>,
) -> Result<Vec<DeadLetter>, ProjectionError> {
    let (filter, binds) = match name {
        Some(name) => ("WHERE projection = ?", vec![Cell::Text(name.into())]),
        None => ("", vec![]),
    };
    let rows = db
        .fetch(
            &format!(
                "SELECT projection, event_id, global_position, stream_id, event_type, error, \
                 attempts, status, failed_at, resolved_at FROM projection_dead_letters {filter} \
                 ORDER BY global_position DESC, projection"
            ),
            &binds,
            &[
                Kind::Text,
                Kind::Text,
                Kind::Int,
                Kind::Text,
                Kind::Text,
                Kind::Text,
                Kind::Int,
                Kind::Text,
                Kind::Text,
                Kind::Text,
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let text = |c: &Cell| match c {
                Cell::Text(s) => s.clone(),
                _ => String::new(),
            };
            let int = |c: &Cell| match c {
                Cell::Int(v) => *v,
                _ => 0,
            };
            DeadLetter {
                projection: text(&row[0]),
                event_id: text(&row[1]),
                global_position: int(&row[2]) as u64,
                stream_id: text(&row[3]),
                event_type: text(&row[4]),
                error: text(&row[5]),
                attempts: int(&row[6]),
                status: text(&row[7]),
                failed_at: text(&row[8]),
                resolved_at: match &row[9] {
                    Cell::Text(s) => Some(s.clone()),
                    _ => None,
                },
            }
        })
        .collect())
}
