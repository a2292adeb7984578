//! SQLite event store: the embedded default (a file under `./data/`, WAL mode).
//!
//! Writes go through the shared single writer; each group runs in `BEGIN IMMEDIATE`,
//! which also serializes writers from other processes on the same file. Durability:
//! `synchronous=NORMAL` in WAL mode by default — a committed append survives a process
//! crash (kill -9); an OS crash or power loss may lose the last transactions. Use
//! `?synchronous=full` in the URL for power-loss durability at a higher cost per commit.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chartline_proto::{EventEnvelope, StreamId, TenantId};
use chrono::Utc;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row, SqlSafeStr, SqlitePool};
use uuid::Uuid;

use super::writer::{
    AppendRequest, BatchCommitter, EventRow, Loaded, Plan, Speculation, StoredEvent, StreamRow,
    StreamUpdate, WriteCache, Writer, envelope_from_columns, is_stale_speculation, keys, plan,
};
use super::{
    AppendResult, DEFAULT_MAX_EVENT_BYTES, Direction, EventStore, ExpectedVersion, MAX_READ_LIMIT,
    ReadScope, StoreError, StoreStats, VerifyReport, upcast_page, validate_append, verify_grouped,
};

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "event store".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/0001_event_store.sql").into_sql_str(),
        false,
    )])
}

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: Writer,
    max_event_bytes: usize,
}

struct SqliteCommitter {
    pool: SqlitePool,
    /// Only the writer task touches it (one group at a time); never held across an await.
    cache: Mutex<WriteCache>,
}

impl SqliteStore {
    /// Opens (creating if missing) the store at a `sqlite://path[?synchronous=full]` URL
    /// or a plain path, and runs migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let (path, query) = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:")
            .split_once('?')
            .map_or(
                (
                    url.trim_start_matches("sqlite://")
                        .trim_start_matches("sqlite:"),
                    "",
                ),
                |(p, q)| (p, q),
            );
        let synchronous = if query.contains("synchronous=full") {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        };
        let memory = path == ":memory:" || path.is_empty();
        if !memory && let Some(parent) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let options = SqliteConnectOptions::from_str(if memory {
            "sqlite::memory:"
        } else {
            "sqlite://"
        })
        .map_err(|e| StoreError::InvalidInput(e.to_string()))?;
        let options = if memory {
            options
        } else {
            options.filename(path)
        }
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            // An in-memory database exists once per connection: keep exactly one.
            .max_connections(if memory { 1 } else { 4 })
            .min_connections(if memory { 1 } else { 0 })
            .idle_timeout(if memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if memory {
                None
            } else {
                Some(Duration::from_secs(3600))
            })
            .connect_with(options)
            .await?;
        migrator()
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) FROM events")
            .fetch_one(&pool)
            .await?;
        let writer = Writer::spawn(
            SqliteCommitter {
                pool: pool.clone(),
                cache: Mutex::new(WriteCache::default()),
            },
            head as u64,
        );
        Ok(SqliteStore {
            pool,
            writer,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        })
    }

    pub fn with_max_event_bytes(mut self, limit: usize) -> Self {
        self.max_event_bytes = limit;
        self
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Watch of the head position committed by this process.
    pub fn head_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writer.head()
    }

    async fn raw_events_of(
        &self,
        sql: &'static str,
        binds: &[&str],
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut query = sqlx::query(sql);
        for bind in binds {
            query = query.bind(*bind);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(row_to_envelope).collect()
    }
}

fn row_to_envelope(row: &sqlx::sqlite::SqliteRow) -> Result<EventEnvelope, StoreError> {
    // By index, in super::sql's column order (read_all decodes millions of rows; a
    // column-name lookup per column per row is wasted work).
    envelope_from_columns(
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
        row.try_get(7)?,
        row.try_get(8)?,
        row.try_get(9)?,
        row.try_get(10)?,
    )
}

fn placeholders(count: usize) -> String {
    vec!["?"; count].join(",")
}

impl BatchCommitter for SqliteCommitter {
    async fn commit_batch(
        &self,
        batch: &[AppendRequest],
    ) -> Result<Vec<Result<AppendResult, StoreError>>, StoreError> {
        let speculation = self
            .cache
            .lock()
            .expect("write cache lock")
            .speculate(batch, Utc::now());
        if let Some(speculation) = speculation {
            match self.commit_speculation(&speculation).await {
                Ok(()) => {
                    let Speculation { plan, head, .. } = speculation;
                    self.cache
                        .lock()
                        .expect("write cache lock")
                        .committed(&plan, head, None);
                    return Ok(plan.replies);
                }
                // Another process wrote, or ids were already stored: decide from loaded state.
                Err(error) if is_stale_speculation(&error, "") => {}
                Err(error) => {
                    self.cache.lock().expect("write cache lock").forget();
                    return Err(error.into());
                }
            }
        }
        match self.commit_loaded(batch).await {
            Ok((plan, head, tenants, streams)) => {
                self.cache.lock().expect("write cache lock").committed(
                    &plan,
                    head,
                    Some((tenants, streams)),
                );
                Ok(plan.replies)
            }
            Err(error) => {
                self.cache.lock().expect("write cache lock").forget();
                Err(error)
            }
        }
    }
}

type LoadedCommit = (Plan, u64, HashSet<String>, HashMap<String, StreamRow>);

/// 12 columns a row; SQLite allows 32,766 bound parameters per statement.
async fn insert_rows(
    tx: &mut sqlx::SqliteConnection,
    rows: &[EventRow],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(2_000) {
        let mut sql = String::from(
            "INSERT INTO events (global_position, event_id, tenant_id, stream_id, stream_version, event_type, \
             schema_version, data, metadata, recorded_at, prev_hash, hash) VALUES ",
        );
        sql.push_str(&vec!["(?,?,?,?,?,?,?,?,?,?,?,?)"; chunk.len()].join(","));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in chunk {
            query = query
                .bind(row.global_position as i64)
                .bind(&row.event_id)
                .bind(&row.tenant)
                .bind(&row.stream_id)
                .bind(row.stream_version as i64)
                .bind(&row.event_type)
                .bind(i64::from(row.schema_version))
                .bind(&row.data)
                .bind(&row.metadata)
                .bind(&row.recorded_at)
                .bind(&row.prev_hash)
                .bind(&row.hash);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

async fn upsert_streams(
    tx: &mut sqlx::SqliteConnection,
    streams: &[StreamUpdate],
) -> Result<(), sqlx::Error> {
    for chunk in streams.chunks(1_000) {
        let mut sql = String::from(
            "INSERT INTO streams (stream_id, tenant_id, category, version, last_hash) VALUES ",
        );
        sql.push_str(&vec!["(?,?,?,?,?)"; chunk.len()].join(","));
        sql.push_str(
            " ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, last_hash = excluded.last_hash",
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for update in chunk {
            query = query
                .bind(&update.stream_id)
                .bind(&update.tenant)
                .bind(&update.category)
                .bind(update.version as i64)
                .bind(&update.last_hash);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

impl SqliteCommitter {
    /// The fast path: the plan made from the cache, written in one `BEGIN IMMEDIATE`
    /// transaction with no reads. The speculation is proved by the unique constraints: the
    /// cache never runs ahead of the database, so if another process wrote, the first
    /// assumed-free position or stream version (or a reused event id) already exists and
    /// the insert fails; the transaction rolls back and the group is planned from loaded
    /// state.
    async fn commit_speculation(&self, speculation: &Speculation) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_rows(&mut tx, &speculation.plan.rows).await?;
        upsert_streams(&mut tx, &speculation.plan.streams).await?;
        tx.commit().await
    }

    /// The loading path: lock, load everything the group touches, plan, write, commit.
    /// Returns the plan, the head before it and the loaded tenants and streams.
    async fn commit_loaded(&self, batch: &[AppendRequest]) -> Result<LoadedCommit, StoreError> {
        let (tenants, streams, event_ids) = keys(batch);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;

        let next_position: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) + 1 FROM events")
                .fetch_one(&mut *tx)
                .await?;

        let mut known_tenants = HashSet::new();
        for chunk in tenants.chunks(500) {
            let sql = format!(
                "SELECT tenant_id FROM tenants WHERE tenant_id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql));
            for tenant in chunk {
                query = query.bind(tenant);
            }
            known_tenants.extend(query.fetch_all(&mut *tx).await?);
        }

        let mut stream_rows = HashMap::new();
        for chunk in streams.chunks(500) {
            let sql = format!(
                "SELECT stream_id, tenant_id, version, last_hash FROM streams WHERE stream_id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for stream in chunk {
                query = query.bind(stream);
            }
            for row in query.fetch_all(&mut *tx).await? {
                stream_rows.insert(
                    row.try_get::<String, _>("stream_id")?,
                    StreamRow {
                        tenant: row.try_get("tenant_id")?,
                        version: row.try_get::<i64, _>("version")? as u64,
                        last_hash: row.try_get("last_hash")?,
                    },
                );
            }
        }

        let mut existing = HashMap::new();
        for chunk in event_ids.chunks(500) {
            let sql = format!(
                "SELECT event_id, stream_id, stream_version, global_position, event_type, schema_version, data, metadata \
                 FROM events WHERE event_id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id);
            }
            for row in query.fetch_all(&mut *tx).await? {
                let id: String = row.try_get("event_id")?;
                let corrupt =
                    |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("event {id}: {e}"));
                existing.insert(
                    Uuid::parse_str(&id).map_err(|e| corrupt(&e))?,
                    StoredEvent {
                        stream_id: row.try_get("stream_id")?,
                        stream_version: row.try_get::<i64, _>("stream_version")? as u64,
                        global_position: row.try_get::<i64, _>("global_position")? as u64,
                        event_type: row.try_get("event_type")?,
                        schema_version: row.try_get::<i64, _>("schema_version")? as u32,
                        data: serde_json::from_str(row.try_get("data")?)
                            .map_err(|e| corrupt(&e))?,
                        metadata: serde_json::from_str(row.try_get("metadata")?)
                            .map_err(|e| corrupt(&e))?,
                    },
                );
            }
        }

        let loaded_tenants = known_tenants.clone();
        let loaded_streams = stream_rows.clone();
        let planned = plan(
            batch,
            Loaded {
                known_tenants,
                streams: stream_rows,
                existing,
                next_position: next_position as u64,
            },
            Utc::now(),
        );

        insert_rows(&mut tx, &planned.rows).await?;
        upsert_streams(&mut tx, &planned.streams).await?;
        tx.commit().await?;
        Ok((
            planned,
            next_position as u64 - 1,
            loaded_tenants,
            loaded_streams,
        ))
    }
}

impl EventStore for SqliteStore {
    async fn append(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<chartline_proto::NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(tenant, &events, self.max_event_bytes)?;
        self.writer.append(tenant, stream, expected, events).await
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
        let limit = limit.min(MAX_READ_LIMIT) as i64;
        let rows = match scope {
            ReadScope::AllTenants => {
                sqlx::query(super::sql::READ_ALL)
                    .bind(after_position as i64)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            ReadScope::Tenant(tenant) => {
                sqlx::query(super::sql::READ_ALL_OF_TENANT)
                    .bind(tenant.as_str())
                    .bind(after_position as i64)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        upcast_page(rows.iter().map(row_to_envelope).collect::<Result<_, _>>()?)
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(global_position), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(head as u64)
    }

    async fn verify_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<VerifyReport, StoreError> {
        let events = self
            .raw_events_of(
                super::sql::STREAM_OF_TENANT,
                &[stream.as_str(), tenant.as_str()],
            )
            .await?;
        let mut report = VerifyReport {
            streams_checked: 0,
            events_checked: 0,
            breaks: vec![],
        };
        verify_grouped(&events, &mut report);
        Ok(report)
    }

    async fn verify_all(&self, scope: &ReadScope) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            streams_checked: 0,
            events_checked: 0,
            breaks: vec![],
        };
        // Stream by stream, so memory stays bounded by the largest stream.
        let stream_ids: Vec<(String, String)> =
            sqlx::query_as("SELECT stream_id, tenant_id FROM streams ORDER BY stream_id")
                .fetch_all(&self.pool)
                .await?;
        for (stream_id, tenant) in stream_ids {
            if !scope.allows(&tenant) {
                continue;
            }
            let events = self
                .raw_events_of(super::sql::STREAM, &[&stream_id])
                .await?;
            verify_grouped(&events, &mut report);
        }
        Ok(report)
    }

    async fn ensure_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tenants (tenant_id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(chartline_proto::hash::canonical_time(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let (events, head): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(MAX(global_position), 0) FROM events")
                .fetch_one(&self.pool)
                .await?;
        let streams: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM streams")
            .fetch_one(&self.pool)
            .await?;
        let tenants: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tenants")
            .fetch_one(&self.pool)
            .await?;
        Ok(StoreStats {
            backend: "sqlite".into(),
            events: events as u64,
            streams: streams as u64,
            tenants: tenants as u64,
            head_position: head as u64,
        })
    }
}
