//! PostgreSQL event store: the production backend.
//!
//! Writes go through the shared single writer (group commit). Each group transaction
//! first takes `pg_advisory_xact_lock(WRITE_LOCK_KEY)`: across every process writing
//! to the database exactly one transaction writes at a time, it assigns positions as
//! `max + 1 …`, and PostgreSQL releases the lock only after the commit is visible — so
//! the next writer's positions are always higher than everything visible, and a reader
//! paging by position can never skip an event that commits later. Default durability
//! (fsync, synchronous_commit on) is left as configured on the server.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chartline_proto::{EventEnvelope, StreamId, TenantId};
use chrono::Utc;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use super::writer::{
    AppendRequest, BatchCommitter, EventRow, FromEventRow, Loaded, Plan, Speculation, StoredEvent,
    StreamRow, StreamUpdate, WriteCache, Writer, envelope_from_columns, keys, plan_loaded,
};
use super::{
    AppendResult, DEFAULT_MAX_EVENT_BYTES, Direction, EventStore, ExpectedVersion, MAX_READ_LIMIT,
    RawEvent, ReadScope, StoreError, StoreStats, VerifyReport, upcast_page, verify_grouped,
};

/// Advisory lock key of the event store's single active writer ("chartlin" in ASCII).
pub const WRITE_LOCK_KEY: i64 = 0x6368_6172_746c_696e;

fn migrator() -> Migrator {
    crate::migrations::migrator(&[
        (
            1,
            "event store",
            include_str!("../../migrations/postgres/0001_event_store.sql"),
        ),
        (
            2,
            "append group",
            include_str!("../../migrations/postgres/0002_append_group.sql"),
        ),
        (
            3,
            "stream registry",
            include_str!("../../migrations/postgres/0003_stream_registry.sql"),
        ),
    ])
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    writer: Writer,
    max_event_bytes: usize,
}

struct PostgresCommitter {
    options: PgConnectOptions,
    /// The writer's own connection, outside the pool: a pooled connection is pinged
    /// when it is acquired and again when it is returned, two round trips more than the
    /// group's own statement. Opened by the first group; dropped after any error whose
    /// effect on the session is unknown, and opened again by the next group.
    connection: tokio::sync::Mutex<Option<PgConnection>>,
    /// Only the writer task touches it (one group at a time); never held across an await.
    cache: Mutex<WriteCache>,
}

/// A group's writes as ONE statement, so a speculated append costs one round trip and
/// one implicit transaction: the write lock, the events, the registry rows of the
/// streams it creates (only when it creates any: an empty insert into `streams` still
/// costs about 5 % of the statement), and the notification that wakes live subscribers
/// in other processes (`LISTEN chartline_events`). Every insert reads from `write_lock`,
/// so the lock is held before the first row is written. A unique violation fails the
/// whole statement and means "what the writer assumed is stale" (see `WriteCache`).
macro_rules! append_statement {
    ($registry:literal, $notify:literal) => {
        concat!(
            "WITH write_lock AS (SELECT pg_advisory_xact_lock($1)), \
             appended AS (INSERT INTO events (global_position, event_id, tenant_id, stream_id, \
             stream_version, event_type, schema_version, data, metadata, recorded_at, prev_hash, hash) \
             SELECT e.* FROM write_lock, UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::text[], $8::int[], $9::text[], $10::text[], $11::text[], $12::text[], \
             $13::text[]) AS e)",
            $registry,
            " SELECT pg_notify('chartline_events', ",
            $notify,
            ")"
        )
    };
}

/// [`append_statement!`] for a group that appends to existing streams only.
const APPEND_EVENTS: &str = append_statement!("", "$14");

/// [`append_statement!`] for a group that creates streams.
const APPEND_EVENTS_AND_STREAMS: &str = append_statement!(
    ", registered AS (INSERT INTO streams (stream_id, tenant_id, category) \
     SELECT s.* FROM write_lock, UNNEST($14::text[], $15::text[], $16::text[]) AS s)",
    "$17"
);

/// `application_name` of the writer's session, so operators can find it in
/// `pg_stat_activity`.
pub const WRITER_APPLICATION_NAME: &str = "chartline-store-writer";

/// Longest the writer waits for its own connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// True when a failed speculative commit only means "the cache was stale": a position,
/// stream version, stream or event id the plan assumed free already exists.
fn is_stale_speculation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl PostgresStore {
    /// Connects to a `postgres://` URL and runs migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StoreError::InvalidInput(format!("bad PostgreSQL URL: {e}"))
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        migrator()
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        let head: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0)::bigint FROM events")
                .fetch_one(&pool)
                .await?;
        let writer = Writer::spawn(
            PostgresCommitter {
                options: options.application_name(WRITER_APPLICATION_NAME),
                connection: tokio::sync::Mutex::new(None),
                cache: Mutex::new(WriteCache::default()),
            },
            head as u64,
        );
        Ok(PostgresStore {
            pool,
            writer,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        })
    }

    pub fn with_max_event_bytes(mut self, limit: usize) -> Self {
        self.max_event_bytes = limit;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn head_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writer.head()
    }
}

impl PostgresStore {
    /// The global log after `after_position`, as stored (not upcast).
    ///
    /// Rows are decoded as they arrive, not after the last one, so the server produces
    /// and sends the rest of the page on the other core meanwhile. With `fetch_all` the
    /// two took turns: about 10 ms of server work, then 12-20 ms of decoding per
    /// 5,000-event page. (Handing chunks of rows to a decoding helper thread as well was
    /// slower: the server needs that core.)
    async fn read_log<T: FromEventRow>(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        use futures::TryStreamExt;
        let limit = limit.min(MAX_READ_LIMIT);
        let query = match scope {
            ReadScope::AllTenants => sqlx::query(super::sql::READ_ALL)
                .bind(after_position as i64)
                .bind(limit as i64),
            ReadScope::Tenant(tenant) => sqlx::query(super::sql::READ_ALL_OF_TENANT)
                .bind(tenant.as_str())
                .bind(after_position as i64)
                .bind(limit as i64),
        };
        let mut rows = query.fetch(&self.pool);
        // Not `limit`: a live tail asks for thousands of events and usually gets none.
        let mut events = Vec::with_capacity(limit.min(1024));
        while let Some(row) = rows.try_next().await? {
            events.push(row_to_envelope(&row)?);
        }
        Ok(events)
    }
}

fn row_to_envelope<T: FromEventRow>(row: &sqlx::postgres::PgRow) -> Result<T, StoreError> {
    // By index, in super::sql's column order (read_all decodes millions of rows; a
    // column-name lookup per column per row is wasted work). Unchecked: the query and
    // the column types are this crate's own (migrations/postgres), and sqlx's per-value
    // type-compatibility check was about 8 % of a read's client work. Decoding still
    // checks every value (widths, UTF-8), so a mismatch is an error, never a wrong value.
    envelope_from_columns(
        row.try_get_unchecked(0)?,
        row.try_get_unchecked(1)?,
        row.try_get_unchecked(2)?,
        row.try_get_unchecked(3)?,
        row.try_get_unchecked(4)?,
        i64::from(row.try_get_unchecked::<i32, _>(5)?),
        row.try_get_unchecked(6)?,
        row.try_get_unchecked(7)?,
        row.try_get_unchecked(8)?,
        row.try_get_unchecked(9)?,
        row.try_get_unchecked(10)?,
    )
}

impl BatchCommitter for PostgresCommitter {
    async fn commit_batch(
        &self,
        batch: &[AppendRequest],
    ) -> Result<Vec<Result<AppendResult, StoreError>>, StoreError> {
        let mut slot = self.connection.lock().await;
        let connection = match slot.as_mut() {
            Some(connection) => connection,
            None => slot.insert(self.connect().await?),
        };
        let outcome = self.commit_on(connection, batch).await;
        if outcome.is_err() {
            // The transaction rolled back or the session broke: start from a new one.
            *slot = None;
            self.cache.lock().expect("write cache lock").forget();
        }
        outcome
    }
}

type LoadedCommit = (Plan, u64, HashSet<String>, HashMap<String, StreamRow>);

impl PostgresCommitter {
    async fn connect(&self) -> Result<PgConnection, StoreError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&self.options)).await
        {
            Ok(connection) => Ok(connection?),
            Err(_) => Err(StoreError::Unavailable(format!(
                "PostgreSQL did not accept the writer's connection within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }

    /// Commits a group on the writer's connection: the plan made from the cache when it
    /// can be, else (or when the cache proved stale) the plan made from loaded state.
    async fn commit_on(
        &self,
        connection: &mut PgConnection,
        batch: &[AppendRequest],
    ) -> Result<Vec<Result<AppendResult, StoreError>>, StoreError> {
        let speculation = self
            .cache
            .lock()
            .expect("write cache lock")
            .speculate(batch, Utc::now());
        if let Some(speculation) = speculation {
            // The fast path: one statement in one implicit transaction, proved by its
            // unique constraints (`WriteCache`).
            match append_group(&mut *connection, &speculation.plan).await {
                Ok(()) => {
                    let Speculation { plan, head } = speculation;
                    self.cache
                        .lock()
                        .expect("write cache lock")
                        .committed(&plan, head, None);
                    return Ok(plan.replies);
                }
                // Someone else wrote, or ids were already stored: decide from loaded state.
                Err(error) if is_stale_speculation(&error) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let (plan, head, tenants, streams) = self.commit_loaded(connection, batch).await?;
        self.cache.lock().expect("write cache lock").committed(
            &plan,
            head,
            Some((tenants, streams)),
        );
        Ok(plan.replies)
    }

    /// The loading path: lock, load everything the group touches, plan, write, commit.
    /// Returns the plan, the head before it and the loaded tenants and streams.
    async fn commit_loaded(
        &self,
        connection: &mut PgConnection,
        batch: &[AppendRequest],
    ) -> Result<LoadedCommit, StoreError> {
        let (tenants, streams, event_ids) = keys(batch);
        let mut tx = connection.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        // READ COMMITTED: this statement's snapshot starts after the lock was granted,
        // so it sees every earlier writer's commit.
        let next_position: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0)::bigint + 1 FROM events")
                .fetch_one(&mut *tx)
                .await?;
        let known_tenants: HashSet<String> =
            sqlx::query_scalar("SELECT tenant_id FROM tenants WHERE tenant_id = ANY($1)")
                .bind(&tenants)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let mut stream_rows = HashMap::new();
        // The registry says who owns a stream; its newest event, its version and hash.
        for row in sqlx::query(
            "SELECT s.stream_id, s.tenant_id, e.stream_version AS version, e.hash AS last_hash \
             FROM streams s CROSS JOIN LATERAL (SELECT stream_version, hash FROM events \
             WHERE events.stream_id = s.stream_id ORDER BY stream_version DESC LIMIT 1) e \
             WHERE s.stream_id = ANY($1)",
        )
        .bind(&streams)
        .fetch_all(&mut *tx)
        .await?
        {
            stream_rows.insert(
                row.try_get::<String, _>("stream_id")?,
                StreamRow {
                    tenant: row.try_get("tenant_id")?,
                    version: row.try_get::<i64, _>("version")? as u64,
                    last_hash: row.try_get("last_hash")?,
                },
            );
        }
        let mut existing = HashMap::new();
        for row in sqlx::query(
            "SELECT event_id, stream_id, stream_version, global_position, event_type, schema_version, data, metadata \
             FROM events WHERE event_id = ANY($1)",
        )
        .bind(&event_ids)
        .fetch_all(&mut *tx)
        .await?
        {
            let id: String = row.try_get("event_id")?;
            let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("event {id}: {e}"));
            existing.insert(
                Uuid::parse_str(&id).map_err(|e| corrupt(&e))?,
                StoredEvent {
                    stream_id: row.try_get("stream_id")?,
                    stream_version: row.try_get::<i64, _>("stream_version")? as u64,
                    global_position: row.try_get::<i64, _>("global_position")? as u64,
                    event_type: row.try_get("event_type")?,
                    schema_version: row.try_get::<i32, _>("schema_version")? as u32,
                    data: serde_json::from_str(row.try_get("data")?).map_err(|e| corrupt(&e))?,
                    metadata: serde_json::from_str(row.try_get("metadata")?).map_err(|e| corrupt(&e))?,
                },
            );
        }

        let (planned, loaded_tenants, loaded_streams) = plan_loaded(
            batch,
            Loaded {
                known_tenants,
                streams: stream_rows,
                existing,
                next_position: next_position as u64,
            },
        );

        if !planned.rows.is_empty() {
            append_group(&mut *tx, &planned).await?;
        }
        tx.commit().await?;
        Ok((
            planned,
            next_position as u64 - 1,
            loaded_tenants,
            loaded_streams,
        ))
    }
}

/// Writes a plan's events and new streams with [`APPEND_EVENTS`] or
/// [`APPEND_EVENTS_AND_STREAMS`].
async fn append_group<'e, E>(executor: E, plan: &Plan) -> Result<(), sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let rows = &plan.rows;
    let text = |column: fn(&EventRow) -> &str| rows.iter().map(column).collect::<Vec<_>>();
    let number =
        |column: fn(&EventRow) -> u64| rows.iter().map(|r| column(r) as i64).collect::<Vec<_>>();
    let created: Vec<_> = plan.streams.iter().filter(|s| s.created).collect();
    let statement = if created.is_empty() {
        APPEND_EVENTS
    } else {
        APPEND_EVENTS_AND_STREAMS
    };
    let mut query = sqlx::query(statement)
        .bind(WRITE_LOCK_KEY)
        .bind(number(|r| r.global_position))
        .bind(text(|r| &r.event_id))
        .bind(text(|r| &r.tenant))
        .bind(text(|r| &r.stream_id))
        .bind(number(|r| r.stream_version))
        .bind(text(|r| &r.event_type))
        .bind(
            rows.iter()
                .map(|r| r.schema_version as i32)
                .collect::<Vec<_>>(),
        )
        .bind(text(|r| &*r.data))
        .bind(text(|r| &*r.metadata))
        .bind(text(|r| &r.recorded_at))
        .bind(text(|r| &r.prev_hash))
        .bind(text(|r| &r.hash));
    if !created.is_empty() {
        let column =
            |field: fn(&StreamUpdate) -> &str| created.iter().map(|s| field(s)).collect::<Vec<_>>();
        query = query
            .bind(column(|s| &s.stream_id))
            .bind(column(|s| &s.tenant))
            .bind(column(|s| &s.category));
    }
    query
        .bind(rows.last().map_or(0, |r| r.global_position).to_string())
        .execute(executor)
        .await?;
    Ok(())
}

impl EventStore for PostgresStore {
    async fn append(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<chartline_proto::NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.writer
            .append(tenant, stream, expected, events, self.max_event_bytes)
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
        let limit = limit.min(MAX_READ_LIMIT) as i64;
        let rows = sqlx::query(super::sql::read_stream(direction))
            .bind(stream.as_str())
            .bind(tenant.as_str())
            .bind(from_version.min(i64::MAX as u64) as i64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        upcast_page(rows.iter().map(row_to_envelope).collect::<Result<_, _>>()?)
    }

    async fn read_all(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        upcast_page(self.read_log(scope, after_position, limit).await?)
    }

    async fn read_all_raw(
        &self,
        scope: &ReadScope,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<RawEvent>, StoreError> {
        upcast_page(self.read_log(scope, after_position, limit).await?)
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let head: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0)::bigint FROM events")
                .fetch_one(&self.pool)
                .await?;
        Ok(head as u64)
    }

    async fn verify_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<VerifyReport, StoreError> {
        let rows = sqlx::query(super::sql::STREAM_OF_TENANT)
            .bind(stream.as_str())
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
        let events = rows
            .iter()
            .map(row_to_envelope)
            .collect::<Result<Vec<_>, _>>()?;
        let mut report = VerifyReport::default();
        verify_grouped(&events, &mut report);
        Ok(report)
    }

    async fn verify_all(&self, scope: &ReadScope) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let streams: Vec<(String, String)> = sqlx::query_as(super::sql::STREAMS_IN_LOG)
            .fetch_all(&self.pool)
            .await?;
        for (stream_id, tenant) in streams {
            if !scope.allows(&tenant) {
                continue;
            }
            let rows = sqlx::query(super::sql::STREAM)
                .bind(&stream_id)
                .fetch_all(&self.pool)
                .await?;
            let events = rows
                .iter()
                .map(row_to_envelope)
                .collect::<Result<Vec<_>, _>>()?;
            verify_grouped(&events, &mut report);
        }
        if matches!(scope, ReadScope::AllTenants) {
            report.missing_positions = super::sql::missing_positions!(&self.pool).await?;
        }
        Ok(report)
    }

    async fn ensure_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(tenant.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let (events, head): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(MAX(global_position), 0)::bigint FROM events",
        )
        .fetch_one(&self.pool)
        .await?;
        let streams: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM streams")
            .fetch_one(&self.pool)
            .await?;
        let tenants: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tenants")
            .fetch_one(&self.pool)
            .await?;
        Ok(StoreStats {
            backend: "postgres".into(),
            events: events as u64,
            streams: streams as u64,
            tenants: tenants as u64,
            head_position: head as u64,
        })
    }
}
