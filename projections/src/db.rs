//! The read-model database: SQLite or PostgreSQL behind one small interface.
//!
//! Read models are declared as [`TableSpec`]s (columns of three kinds: integer, real,
//! text) and every statement the engine runs is generated from them, so one projection
//! works unchanged on both backends. Values travel as [`Cell`]s. Timestamps are stored
//! as fixed-width RFC 3339 text (`2026-01-05T10:00:00.000000Z`) and booleans as 0/1 on
//! both backends, so rows compare equal across backends and sort correctly as text.
//!
//! SQLite write transactions start with `BEGIN IMMEDIATE` (the write lock is taken up
//! front, so two writers never deadlock on a lock upgrade); PostgreSQL transactions
//! lock the projection's state row with `SELECT … FOR UPDATE` (see the engine).
//!
//! SQLite statements run through `rusqlite` on the calling thread, as the event store's
//! do (ARCHITECTURE.md, "Two SQLite drivers"): sqlx's SQLite driver hands every
//! statement to a worker thread, and in a rebuild the engine spent about half its time
//! waiting for those hand-offs. The write lock is waited for asynchronously (busy →
//! sleep and retry), never in SQLite's busy handler, so a waiting transaction does not
//! hold a runtime thread that the lock's owner may need. sqlx still runs the migrations.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row as _};

use crate::error::ProjectionError;

/// The migrations table of the engine's own tables, distinct from the event store's.
pub const MIGRATIONS_TABLE: &str = "_chartline_projection_migrations";

/// Largest number of bound values in one statement (SQLite allows 32,766, PostgreSQL 65,535).
const MAX_BINDS: usize = 30_000;

/// Rows per SQLite upsert statement: a batch's rows are written with statements of these few
/// sizes only (largest first), so each table has at most four distinct upsert
/// statements, prepared once per connection and then reused from the statement cache.
/// (A statement sized to each batch was parsed, and on PostgreSQL planned, anew for
/// every flush.)
const UPSERT_SIZES: [usize; 4] = [256, 32, 4, 1];

/// Prepared statements kept per connection (the default of 100 is too few for six
/// projections × their tables × four upsert sizes, plus their generations).
const STATEMENT_CACHE: usize = 1_000;

/// The storage class of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Real,
    Text,
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Null => f.write_str("NULL"),
            Cell::Int(v) => write!(f, "{v}"),
            Cell::Real(v) => write!(f, "{v}"),
            Cell::Text(v) => write!(f, "{v:?}"),
        }
    }
}

/// Conversion between a Rust field and a [`Cell`].
pub trait CellValue: Sized {
    const KIND: Kind;
    fn to_cell(&self) -> Cell;
    fn from_cell(cell: Cell) -> Result<Self, String>;
}

impl CellValue for String {
    const KIND: Kind = Kind::Text;
    fn to_cell(&self) -> Cell {
        Cell::Text(self.clone())
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        match cell {
            Cell::Text(v) => Ok(v),
            other => Err(format!("expected text, found {other}")),
        }
    }
}

impl CellValue for i64 {
    const KIND: Kind = Kind::Int;
    fn to_cell(&self) -> Cell {
        Cell::Int(*self)
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        match cell {
            Cell::Int(v) => Ok(v),
            other => Err(format!("expected integer, found {other}")),
        }
    }
}

impl CellValue for bool {
    const KIND: Kind = Kind::Int;
    fn to_cell(&self) -> Cell {
        Cell::Int(i64::from(*self))
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        i64::from_cell(cell).map(|v| v != 0)
    }
}

impl CellValue for f64 {
    const KIND: Kind = Kind::Real;
    fn to_cell(&self) -> Cell {
        Cell::Real(*self)
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        match cell {
            Cell::Real(v) => Ok(v),
            Cell::Int(v) => Ok(v as f64),
            other => Err(format!("expected real, found {other}")),
        }
    }
}

impl CellValue for DateTime<Utc> {
    const KIND: Kind = Kind::Text;
    fn to_cell(&self) -> Cell {
        Cell::Text(format_time(*self))
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        let text = String::from_cell(cell)?;
        chartline_proto::time::parse_utc(&text).map_err(|e| format!("bad timestamp {text:?}: {e}"))
    }
}

impl CellValue for NaiveDate {
    const KIND: Kind = Kind::Text;
    fn to_cell(&self) -> Cell {
        Cell::Text(format_date(*self))
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        let text = String::from_cell(cell)?;
        NaiveDate::parse_from_str(&text, "%Y-%m-%d").map_err(|e| format!("bad date {text:?}: {e}"))
    }
}

impl<T: CellValue> CellValue for Option<T> {
    const KIND: Kind = T::KIND;
    fn to_cell(&self) -> Cell {
        self.as_ref().map_or(Cell::Null, T::to_cell)
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        match cell {
            Cell::Null => Ok(None),
            other => T::from_cell(other).map(Some),
        }
    }
}

/// The one timestamp format of every read model (sorts as text): RFC 3339 with
/// microseconds and `Z`, as `to_rfc3339_opts(SecondsFormat::Micros, true)` writes it.
/// Written by hand for years 0–9999 (chrono's general formatter was a tenth of the
/// cost of converting rows in a rebuild); chrono writes the others.
pub fn format_time(time: DateTime<Utc>) -> String {
    use chrono::Timelike;
    let (date, clock) = (time.date_naive(), time.time());
    let Some(mut text) = date_digits(date) else {
        return time.to_rfc3339_opts(SecondsFormat::Micros, true);
    };
    // A leap second's nanoseconds run past 999,999,999: leave those to chrono.
    let micros = clock.nanosecond() / 1_000;
    if micros >= 1_000_000 {
        return time.to_rfc3339_opts(SecondsFormat::Micros, true);
    }
    text.reserve(17);
    text.push('T');
    push_digits(&mut text, clock.hour(), 2);
    text.push(':');
    push_digits(&mut text, clock.minute(), 2);
    text.push(':');
    push_digits(&mut text, clock.second(), 2);
    text.push('.');
    push_digits(&mut text, micros, 6);
    text.push('Z');
    text
}

/// A date as `YYYY-MM-DD` (chrono's `%Y-%m-%d`).
pub fn format_date(date: NaiveDate) -> String {
    date_digits(date).unwrap_or_else(|| date.format("%Y-%m-%d").to_string())
}

fn date_digits(date: NaiveDate) -> Option<String> {
    use chrono::Datelike;
    let year = u32::try_from(date.year()).ok().filter(|y| *y <= 9999)?;
    let mut text = String::with_capacity(27);
    push_digits(&mut text, year, 4);
    text.push('-');
    push_digits(&mut text, date.month(), 2);
    text.push('-');
    push_digits(&mut text, date.day(), 2);
    Some(text)
}

/// Appends `value` as exactly `width` decimal digits (zero-padded; `value` fits).
fn push_digits(text: &mut String, value: u32, width: u32) {
    let mut divisor = 10u32.pow(width - 1);
    while divisor > 0 {
        text.push(char::from(b'0' + (value / divisor % 10) as u8));
        divisor /= 10;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
}

/// A read-model table: the first `key` columns form the primary key.
#[derive(Debug)]
pub struct TableSpec {
    /// The logical name readers use (a view over the active generation's table).
    pub name: &'static str,
    pub columns: &'static [Column],
    pub key: usize,
    /// Single-column secondary indexes.
    pub indexes: &'static [&'static str],
}

impl TableSpec {
    /// The physical table of one generation (blue-green: `encounter_view__g2`).
    pub fn physical(&self, generation: i64) -> String {
        format!("{}__g{generation}", self.name)
    }

    pub fn kinds(&self) -> Vec<Kind> {
        self.columns.iter().map(|c| c.kind).collect()
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_list(&self) -> String {
        self.columns[..self.key]
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    fn type_name(self, kind: Kind) -> &'static str {
        match (self, kind) {
            (Backend::Sqlite, Kind::Int) => "INTEGER",
            (Backend::Sqlite, Kind::Real) => "REAL",
            (Backend::Sqlite, Kind::Text) => "TEXT",
            (Backend::Postgres, Kind::Int) => "BIGINT",
            (Backend::Postgres, Kind::Real) => "DOUBLE PRECISION",
            (Backend::Postgres, Kind::Text) => "TEXT",
        }
    }

    /// Whether a batch's new rows (keys the table cannot have) are written apart from the
    /// others, with [`Tx::insert_rows`]: on PostgreSQL an upsert's speculative insertion
    /// costs about 40 % more per new row; SQLite's upsert costs what its insert does, so
    /// one key-ordered pass writes every row.
    pub fn inserts_apart(self) -> bool {
        matches!(self, Backend::Postgres)
    }

    /// Rewrites `?` placeholders into `$1, $2, …` for PostgreSQL. Generated SQL never
    /// has a `?` inside a literal.
    pub fn placeholders(self, sql: &str) -> String {
        match self {
            Backend::Sqlite => sql.to_string(),
            Backend::Postgres => {
                let mut out = String::with_capacity(sql.len() + 16);
                let mut n = 0;
                for ch in sql.chars() {
                    if ch == '?' {
                        n += 1;
                        out.push('$');
                        out.push_str(&n.to_string());
                    } else {
                        out.push(ch);
                    }
                }
                out
            }
        }
    }

    /// `CREATE TABLE` + indexes of one physical table.
    pub fn create_table(self, spec: &TableSpec, physical: &str) -> Vec<String> {
        // Text compares bytewise on both backends: SQLite's default, and `COLLATE "C"` on
        // PostgreSQL, whose database default (even C.UTF-8) goes through strcoll for every
        // key comparison of every index insert, about 6% of the server's rebuild work.
        let collate = |kind| match (self, kind) {
            (Backend::Postgres, Kind::Text) => " COLLATE \"C\"",
            _ => "",
        };
        let columns = spec
            .columns
            .iter()
            .map(|c| format!("{} {}{}", c.name, self.type_name(c.kind), collate(c.kind)))
            .collect::<Vec<_>>()
            .join(", ");
        let without_rowid = match self {
            Backend::Sqlite => " WITHOUT ROWID",
            Backend::Postgres => "",
        };
        let mut statements = vec![format!(
            "CREATE TABLE IF NOT EXISTS {physical} ({columns}, PRIMARY KEY ({})){without_rowid}",
            spec.key_list()
        )];
        for index in spec.indexes {
            statements.push(format!(
                "CREATE INDEX IF NOT EXISTS {physical}_by_{index} ON {physical} ({index})"
            ));
        }
        statements
    }

    /// Upsert of `rows` rows: `INSERT … ON CONFLICT (key) DO UPDATE SET …` (same syntax
    /// on both backends).
    pub fn upsert(self, spec: &TableSpec, physical: &str, rows: usize) -> String {
        let one = format!("({})", vec!["?"; spec.columns.len()].join(","));
        let values = vec![one.as_str(); rows].join(",");
        self.placeholders(&format!(
            "INSERT INTO {physical} ({}) VALUES {values} {}",
            spec.column_list(),
            Self::on_conflict(spec)
        ))
    }

    /// PostgreSQL's upsert of any number of rows with one array per column:
    /// `INSERT … SELECT UNNEST($1::BIGINT[]), UNNEST($2::TEXT[]), … ON CONFLICT …`.
    /// One short statement, planned once per connection, with as many binds as the
    /// table has columns: a 256-row `VALUES` list had thousands of binds, each encoded
    /// by the client and parsed and planned by the server. The arrays are unnested in
    /// the select list, where they stream in lockstep (all have one element per row);
    /// `FROM UNNEST(…)` first copies every row into a tuple store: 20,000 new rows of
    /// eight columns took 155–179 ms that way and 110–140 ms this way.
    pub fn upsert_unnest(spec: &TableSpec, physical: &str) -> String {
        format!(
            "{} {}",
            Self::insert_unnest(spec, physical),
            Self::on_conflict(spec)
        )
    }

    /// [`Backend::upsert_unnest`] without `ON CONFLICT`, for rows known to be new.
    pub fn insert_unnest(spec: &TableSpec, physical: &str) -> String {
        let arrays = spec
            .columns
            .iter()
            .enumerate()
            .map(|(index, c)| {
                format!(
                    "UNNEST(${}::{}[])",
                    index + 1,
                    Backend::Postgres.type_name(c.kind)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO {physical} ({}) SELECT {arrays}",
            spec.column_list()
        )
    }

    fn on_conflict(spec: &TableSpec) -> String {
        let updates = spec.columns[spec.key..]
            .iter()
            .map(|c| format!("{0} = excluded.{0}", c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let conflict = if updates.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {updates}")
        };
        format!("ON CONFLICT ({}) {conflict}", spec.key_list())
    }

    /// Rows per upsert statement so that the bind count stays under the limit.
    pub fn rows_per_upsert(spec: &TableSpec) -> usize {
        (MAX_BINDS / spec.columns.len()).max(1)
    }

    /// Splits `rows` rows into statement sizes from [`UPSERT_SIZES`] (each within the
    /// bind limit), largest first.
    pub fn upsert_chunks(spec: &TableSpec, mut rows: usize) -> Vec<usize> {
        let limit = Self::rows_per_upsert(spec);
        let mut chunks = Vec::new();
        for size in UPSERT_SIZES {
            let size = size.min(limit);
            while rows >= size {
                chunks.push(size);
                rows -= size;
            }
        }
        chunks
    }

    pub fn select_by_key(self, spec: &TableSpec, physical: &str) -> String {
        let condition = spec.columns[..spec.key]
            .iter()
            .map(|c| format!("{} = ?", c.name))
            .collect::<Vec<_>>()
            .join(" AND ");
        self.placeholders(&format!(
            "SELECT {} FROM {physical} WHERE {condition}",
            spec.column_list()
        ))
    }

    pub fn select_where(self, spec: &TableSpec, physical: &str, column: &str) -> String {
        self.placeholders(&format!(
            "SELECT {} FROM {physical} WHERE {column} = ?",
            spec.column_list()
        ))
    }

    pub fn select_all_ordered(self, spec: &TableSpec, table: &str) -> String {
        format!(
            "SELECT {} FROM {table} ORDER BY {}",
            spec.column_list(),
            spec.key_list()
        )
    }
}

/// A connection pool to the read-model database.
#[derive(Clone, Debug)]
pub enum ReadDb {
    Sqlite(Arc<SqliteReadDb>),
    Postgres(PgPool),
}

/// Idle SQLite connections kept for reuse: one per concurrently applying projection
/// (each reads through its own connection), with room to spare. A connection dropped
/// for lack of room loses its prepared statements.
const SQLITE_IDLE: usize = 12;

/// How long a SQLite transaction waits for the write lock (and a statement for a
/// transient lock) before it fails with `SQLITE_BUSY`.
const SQLITE_BUSY_LIMIT: Duration = Duration::from_secs(30);

/// The SQLite read-model database: a file and its idle `rusqlite` connections.
#[derive(Debug)]
pub struct SqliteReadDb {
    path: String,
    idle: Mutex<Vec<rusqlite::Connection>>,
    /// Write transactions of this process queue here, first come first served, before
    /// they ask SQLite for the write lock: projections applying in parallel then wait
    /// in order instead of polling the lock with sleeps. Other processes (and the
    /// event store's writer on the same file) still meet the asynchronous retry below.
    write_gate: Arc<tokio::sync::Mutex<()>>,
    /// The connection write transactions use, kept apart from the readers': a
    /// connection's page cache is discarded whenever another connection has written
    /// the file since its last transaction, so the writer keeps a warm cache only if
    /// it is always the same connection.
    writer: Mutex<Option<rusqlite::Connection>>,
}

impl SqliteReadDb {
    fn connect(&self) -> Result<rusqlite::Connection, rusqlite::Error> {
        let connection = rusqlite::Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(SQLITE_BUSY_LIMIT)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "cache_size", -65_536)?;
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(connection)
    }

    fn take(&self) -> Result<rusqlite::Connection, rusqlite::Error> {
        let idle = self.idle.lock().expect("idle connections").pop();
        match idle {
            Some(connection) => Ok(connection),
            None => self.connect(),
        }
    }

    /// Returns a connection that is outside any transaction (`writer`: the one write
    /// transactions use).
    fn give(&self, connection: rusqlite::Connection, writer: bool) {
        if !connection.is_autocommit() {
            return; // closing it rolls back whatever is open
        }
        if writer {
            *self.writer.lock().expect("writer connection") = Some(connection);
            return;
        }
        let mut idle = self.idle.lock().expect("idle connections");
        if idle.len() < SQLITE_IDLE {
            idle.push(connection);
        }
    }

    /// `BEGIN IMMEDIATE`, waiting for the write lock asynchronously.
    async fn begin(self: &Arc<Self>) -> Result<Tx, ProjectionError> {
        let gate = self.write_gate.clone().lock_owned().await;
        let writer = self.writer.lock().expect("writer connection").take();
        let connection = match writer {
            Some(connection) => connection,
            None => self.connect()?,
        };
        connection.busy_timeout(Duration::ZERO)?;
        let started = Instant::now();
        let mut pause = Duration::from_micros(500);
        loop {
            match connection.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => break,
                Err(error) if is_busy(&error) && started.elapsed() < SQLITE_BUSY_LIMIT => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(error) => return Err(error.into()),
            }
        }
        connection.busy_timeout(SQLITE_BUSY_LIMIT)?;
        Ok(Tx::Sqlite(SqliteTx {
            connection: Some(connection),
            db: self.clone(),
            gate: Some(gate),
        }))
    }

    /// A deferred `BEGIN`: its first read fixes a snapshot, and it never takes the
    /// write lock (writing through it is an error, see [`Tx::execute`]).
    fn begin_read(self: &Arc<Self>) -> Result<Tx, ProjectionError> {
        let connection = self.take()?;
        connection.execute_batch("BEGIN DEFERRED")?;
        Ok(Tx::Sqlite(SqliteTx {
            connection: Some(connection),
            db: self.clone(),
            gate: None,
        }))
    }

    fn fetch(
        &self,
        sql: &str,
        binds: &[Cell],
        kinds: &[Kind],
    ) -> Result<Vec<Vec<Cell>>, ProjectionError> {
        let connection = self.take()?;
        let rows = sqlite_fetch(&connection, sql, binds, kinds);
        self.give(connection, false);
        rows
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// An open SQLite transaction; dropped unfinished, it rolls back.
pub struct SqliteTx {
    connection: Option<rusqlite::Connection>,
    db: Arc<SqliteReadDb>,
    /// Held by a write transaction until it ends; `None` for a read transaction.
    gate: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl SqliteTx {
    fn connection(&self) -> &rusqlite::Connection {
        self.connection.as_ref().expect("an open transaction")
    }

    /// The connection, for a statement that writes.
    fn writer(&self) -> Result<&rusqlite::Connection, ProjectionError> {
        if self.gate.is_none() {
            return Err(ProjectionError::Config(
                "a write statement in a read-only transaction (see ReadDb::begin_read)".into(),
            ));
        }
        Ok(self.connection())
    }

    fn finish(mut self, statement: &str) -> Result<(), ProjectionError> {
        let connection = self.connection.take().expect("an open transaction");
        let result = connection.execute_batch(statement);
        if result.is_err() && !connection.is_autocommit() {
            let _ = connection.execute_batch("ROLLBACK");
        }
        self.db.give(connection, self.gate.is_some());
        Ok(result?)
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take()
            && connection.execute_batch("ROLLBACK").is_ok()
        {
            self.db.give(connection, self.gate.is_some());
        }
    }
}

/// Runs an `UNNEST` statement over `rows`, one array per column.
async fn pg_unnest(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    sql: String,
    spec: &TableSpec,
    physical: &str,
    rows: &[Vec<Cell>],
) -> Result<(), ProjectionError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (index, column) in spec.columns.iter().enumerate() {
        let cells = rows.iter().map(|row| &row[index]);
        query = bind_pg_array(query, cells, column.kind).map_err(|message| {
            ProjectionError::CorruptRow {
                table: physical.to_string(),
                message: format!("column {}: {message}", column.name),
            }
        })?;
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

impl rusqlite::ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Cell::Null => ValueRef::Null,
            Cell::Int(v) => ValueRef::Integer(*v),
            Cell::Real(v) => ValueRef::Real(*v),
            Cell::Text(v) => ValueRef::Text(v.as_bytes()),
        }))
    }
}

/// Runs a statement, stepping through any rows it returns; the number of rows changed.
fn sqlite_execute(
    connection: &rusqlite::Connection,
    sql: &str,
    binds: impl IntoIterator<Item = impl rusqlite::ToSql>,
) -> Result<u64, rusqlite::Error> {
    let mut statement = connection.prepare_cached(sql)?;
    let mut rows = statement.query(rusqlite::params_from_iter(binds))?;
    while rows.next()?.is_some() {}
    Ok(connection.changes())
}

fn sqlite_fetch(
    connection: &rusqlite::Connection,
    sql: &str,
    binds: &[Cell],
    kinds: &[Kind],
) -> Result<Vec<Vec<Cell>>, ProjectionError> {
    let mut statement = connection.prepare_cached(sql)?;
    let mut rows = statement.query(rusqlite::params_from_iter(binds))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode_sqlite(row, kinds)?);
    }
    Ok(out)
}

fn engine_migrator(backend: Backend) -> Migrator {
    let sql = match backend {
        Backend::Sqlite => include_str!("../migrations/sqlite/0001_projection_engine.sql"),
        Backend::Postgres => include_str!("../migrations/postgres/0001_projection_engine.sql"),
    };
    let mut migrator = chartline_infra::migrations::migrator(&[(1, "projection engine", sql)]);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

impl ReadDb {
    /// Opens the read-model database (`sqlite://PATH` or `postgres://…`) and runs the
    /// engine's migrations. For SQLite the file may be the event store's own file: the
    /// projection tables are separate tables in it.
    pub async fn open(url: &str) -> Result<Self, ProjectionError> {
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| ProjectionError::Config(e.to_string()))?
                .statement_cache_capacity(STATEMENT_CACHE);
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await?;
            ReadDb::Postgres(pool)
        } else if url.starts_with("sqlite:") || !url.contains("://") {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            if path.is_empty() || path == ":memory:" {
                return Err(ProjectionError::Config(
                    "read models need a database file; an in-memory SQLite store cannot be shared"
                        .into(),
                ));
            }
            if let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| {
                    ProjectionError::Config(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            // The engine's migrations run through sqlx; every other statement through
            // rusqlite (see the module docs).
            let options = SqliteConnectOptions::from_str("sqlite://")
                .map_err(|e| ProjectionError::Config(e.to_string()))?
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_LIMIT);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await?;
            let migrated = engine_migrator(Backend::Sqlite).run(&pool).await;
            pool.close().await;
            migrated.map_err(|e| {
                ProjectionError::Config(format!("projection migrations failed: {e}"))
            })?;
            return Ok(ReadDb::Sqlite(Arc::new(SqliteReadDb {
                path: path.to_string(),
                idle: Mutex::new(Vec::new()),
                write_gate: Arc::new(tokio::sync::Mutex::new(())),
                writer: Mutex::new(None),
            })));
        } else {
            return Err(ProjectionError::Config(format!(
                "unsupported read-store URL {url:?}: use sqlite://PATH or postgres://…"
            )));
        };
        if let ReadDb::Postgres(pool) = &db {
            engine_migrator(Backend::Postgres)
                .run(pool)
                .await
                .map_err(|e| {
                    ProjectionError::Config(format!("projection migrations failed: {e}"))
                })?;
        }
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        match self {
            ReadDb::Sqlite(_) => Backend::Sqlite,
            ReadDb::Postgres(_) => Backend::Postgres,
        }
    }

    /// Begins a write transaction (SQLite: `BEGIN IMMEDIATE`).
    pub async fn begin(&self) -> Result<Tx, ProjectionError> {
        Ok(match self {
            ReadDb::Sqlite(db) => db.begin().await?,
            ReadDb::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    /// Begins a transaction that only reads. On SQLite it runs beside the one writer
    /// (WAL), so several projections can apply their batches at once and queue only
    /// to write them; on PostgreSQL it is an ordinary transaction.
    pub async fn begin_read(&self) -> Result<Tx, ProjectionError> {
        Ok(match self {
            ReadDb::Sqlite(db) => db.begin_read()?,
            ReadDb::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    /// Runs a query outside any transaction and decodes every row by `kinds`.
    pub async fn fetch(
        &self,
        sql: &str,
        binds: &[Cell],
        kinds: &[Kind],
    ) -> Result<Vec<Vec<Cell>>, ProjectionError> {
        let sql = self.backend().placeholders(sql);
        match self {
            ReadDb::Sqlite(db) => db.fetch(&sql, binds, kinds),
            ReadDb::Postgres(pool) => {
                let rows = bind_pg(sqlx::query(AssertSqlSafe(sql)), binds)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(|r| decode_pg(r, kinds)).collect()
            }
        }
    }

    /// Every row of a table or view, in primary-key order (for comparisons and dumps).
    pub async fn dump(
        &self,
        spec: &TableSpec,
        table: &str,
    ) -> Result<Vec<Vec<Cell>>, ProjectionError> {
        let sql = self.backend().select_all_ordered(spec, table);
        self.fetch(&sql, &[], &spec.kinds()).await
    }

    pub async fn close(&self) {
        match self {
            ReadDb::Sqlite(db) => {
                db.idle.lock().expect("idle connections").clear();
                db.writer.lock().expect("writer connection").take();
            }
            ReadDb::Postgres(pool) => pool.close().await,
        }
    }
}

/// An open write transaction on the read-model database.
pub enum Tx {
    Sqlite(SqliteTx),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Tx {
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    /// Lets this transaction's commit return before its WAL record is flushed to disk
    /// (PostgreSQL `synchronous_commit = off`; SQLite in WAL mode with
    /// `synchronous = NORMAL` already commits without a sync). Safe for projection
    /// batches: the rows and the checkpoint are one transaction, so a server crash
    /// can only lose whole batches, which the runner applies again from the older
    /// checkpoint. Used for catch-up and rebuild batches, not the live tail.
    pub async fn relax_durability(&mut self) -> Result<(), ProjectionError> {
        if let Tx::Postgres(tx) = self {
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Executes a statement already in the backend's placeholder style.
    pub async fn execute(&mut self, sql: &str, binds: &[Cell]) -> Result<u64, ProjectionError> {
        Ok(match self {
            Tx::Sqlite(tx) => sqlite_execute(tx.writer()?, sql, binds)?,
            Tx::Postgres(tx) => bind_pg(sqlx::query(AssertSqlSafe(sql.to_string())), binds)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        })
    }

    /// Like [`Tx::execute`] but with `?` placeholders rewritten for the backend.
    pub async fn run(&mut self, sql: &str, binds: &[Cell]) -> Result<u64, ProjectionError> {
        let sql = self.backend().placeholders(sql);
        self.execute(&sql, binds).await
    }

    /// Fetches rows (SQL already in the backend's placeholder style).
    pub async fn fetch(
        &mut self,
        sql: &str,
        binds: &[Cell],
        kinds: &[Kind],
    ) -> Result<Vec<Vec<Cell>>, ProjectionError> {
        match self {
            Tx::Sqlite(tx) => sqlite_fetch(tx.connection(), sql, binds, kinds),
            Tx::Postgres(tx) => {
                let rows = bind_pg(sqlx::query(AssertSqlSafe(sql.to_string())), binds)
                    .fetch_all(&mut **tx)
                    .await?;
                rows.iter().map(|r| decode_pg(r, kinds)).collect()
            }
        }
    }

    /// Like [`Tx::fetch`] with `?` placeholders rewritten for the backend.
    pub async fn query(
        &mut self,
        sql: &str,
        binds: &[Cell],
        kinds: &[Kind],
    ) -> Result<Vec<Vec<Cell>>, ProjectionError> {
        let sql = self.backend().placeholders(sql);
        self.fetch(&sql, binds, kinds).await
    }

    /// Upserts rows (each a full row in column order; keys distinct). SQLite: with
    /// statements of a few fixed sizes. PostgreSQL: with one statement of column
    /// arrays ([`Backend::upsert_unnest`]). `statements` caches the generated SQL per
    /// size (reset it when `physical` changes).
    pub async fn upsert_rows(
        &mut self,
        spec: &TableSpec,
        physical: &str,
        rows: &[Vec<Cell>],
        statements: &mut Vec<(usize, String)>,
    ) -> Result<(), ProjectionError> {
        let backend = self.backend();
        let mut statement = |size: usize| match statements.iter().find(|(n, _)| *n == size) {
            Some((_, sql)) => sql.clone(),
            None => {
                let sql = match backend {
                    Backend::Sqlite => backend.upsert(spec, physical, size),
                    Backend::Postgres => Backend::upsert_unnest(spec, physical),
                };
                statements.push((size, sql.clone()));
                sql
            }
        };
        match self {
            Tx::Sqlite(tx) => {
                let mut offset = 0;
                for size in Backend::upsert_chunks(spec, rows.len()) {
                    let chunk = &rows[offset..offset + size];
                    offset += size;
                    sqlite_execute(tx.writer()?, &statement(size), chunk.iter().flatten())?;
                }
            }
            Tx::Postgres(tx) => pg_unnest(tx, statement(0), spec, physical, rows).await?,
        }
        Ok(())
    }

    /// Inserts rows the table does not have: on PostgreSQL without `ON CONFLICT` (a key
    /// that exists is a constraint error), elsewhere as [`Tx::upsert_rows`] does
    /// (`statements` is its statement cache). See [`Backend::inserts_apart`].
    pub async fn insert_rows(
        &mut self,
        spec: &TableSpec,
        physical: &str,
        rows: &[Vec<Cell>],
        statements: &mut Vec<(usize, String)>,
    ) -> Result<(), ProjectionError> {
        match self {
            Tx::Sqlite(_) => self.upsert_rows(spec, physical, rows, statements).await,
            Tx::Postgres(tx) => {
                let sql = Backend::insert_unnest(spec, physical);
                pg_unnest(tx, sql, spec, physical, rows).await
            }
        }
    }

    pub async fn commit(self) -> Result<(), ProjectionError> {
        match self {
            Tx::Sqlite(tx) => tx.finish("COMMIT")?,
            Tx::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), ProjectionError> {
        match self {
            Tx::Sqlite(tx) => tx.finish("ROLLBACK")?,
            Tx::Postgres(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Binds one column of many rows as a PostgreSQL array of the column's type.
fn bind_pg_array<'q>(
    query: PgQuery<'q>,
    cells: impl Iterator<Item = &'q Cell>,
    kind: Kind,
) -> Result<PgQuery<'q>, String> {
    Ok(match kind {
        Kind::Int => query.bind(column(cells, kind, |cell| match cell {
            Cell::Int(v) => Some(*v),
            _ => None,
        })?),
        Kind::Real => query.bind(column(cells, kind, |cell| match cell {
            Cell::Int(v) => Some(*v as f64),
            Cell::Real(v) => Some(*v),
            _ => None,
        })?),
        Kind::Text => query.bind(column(cells, kind, |cell| match cell {
            Cell::Text(v) => Some(v.as_str()),
            _ => None,
        })?),
    })
}

/// One column's values (`None` for NULL); `value` gives a non-NULL cell's value, or
/// `None` when the cell is not of the column's kind.
fn column<'q, T>(
    cells: impl Iterator<Item = &'q Cell>,
    kind: Kind,
    value: impl Fn(&'q Cell) -> Option<T>,
) -> Result<Vec<Option<T>>, String> {
    cells
        .map(|cell| match cell {
            Cell::Null => Ok(None),
            other => value(other)
                .map(Some)
                .ok_or_else(|| format!("{other} is not a {kind:?} value")),
        })
        .collect()
}

fn bind_pg<'q>(mut query: PgQuery<'q>, binds: &'q [Cell]) -> PgQuery<'q> {
    for cell in binds {
        query = match cell {
            Cell::Null => query.bind(None::<String>),
            Cell::Int(v) => query.bind(*v),
            Cell::Real(v) => query.bind(*v),
            Cell::Text(v) => query.bind(v.as_str()),
        };
    }
    query
}

fn decode_sqlite(row: &rusqlite::Row<'_>, kinds: &[Kind]) -> Result<Vec<Cell>, ProjectionError> {
    use rusqlite::types::{Type, ValueRef};
    kinds
        .iter()
        .enumerate()
        .map(|(index, kind)| {
            let value = row.get_ref(index)?;
            let mismatch = |found: Type| {
                ProjectionError::from(rusqlite::Error::InvalidColumnType(
                    index,
                    format!("{kind:?} column"),
                    found,
                ))
            };
            Ok(match (kind, value) {
                (_, ValueRef::Null) => Cell::Null,
                (Kind::Int, ValueRef::Integer(v)) => Cell::Int(v),
                (Kind::Real, ValueRef::Real(v)) => Cell::Real(v),
                (Kind::Real, ValueRef::Integer(v)) => Cell::Real(v as f64),
                (Kind::Text, ValueRef::Text(bytes)) => Cell::Text(
                    std::str::from_utf8(bytes)
                        .map_err(|e| ProjectionError::from(rusqlite::Error::Utf8Error(index, e)))?
                        .to_string(),
                ),
                (_, other) => return Err(mismatch(other.data_type())),
            })
        })
        .collect()
}

fn decode_pg(row: &PgRow, kinds: &[Kind]) -> Result<Vec<Cell>, ProjectionError> {
    kinds
        .iter()
        .enumerate()
        .map(|(index, kind)| {
            Ok(match kind {
                Kind::Int => row
                    .try_get::<Option<i64>, _>(index)?
                    .map_or(Cell::Null, Cell::Int),
                Kind::Real => row
                    .try_get::<Option<f64>, _>(index)?
                    .map_or(Cell::Null, Cell::Real),
                Kind::Text => row
                    .try_get::<Option<String>, _>(index)?
                    .map_or(Cell::Null, Cell::Text),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration as Span, NaiveDateTime, TimeZone};

    #[test]
    fn hand_written_timestamps_and_dates_match_chrono() {
        let mut cases: Vec<DateTime<Utc>> = vec![
            Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
                + Span::nanoseconds(999_999_999),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 15, 12, 30, 0).unwrap(),
            Utc.with_ymd_and_hms(999, 2, 3, 4, 5, 6).unwrap() + Span::nanoseconds(1_500),
            // A leap second (chrono writes it as second 60).
            NaiveDateTime::new(
                NaiveDate::from_ymd_opt(2016, 12, 31).unwrap(),
                chrono::NaiveTime::from_hms_nano_opt(23, 59, 59, 1_234_567_890).unwrap(),
            )
            .and_utc(),
        ];
        // A deterministic spread over four centuries, down to the nanosecond.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let seconds = (seed >> 11) % (400 * 366 * 86_400);
            let nanos = (seed % 1_000_000_000) as i64;
            cases.push(
                Utc.with_ymd_and_hms(1800, 1, 1, 0, 0, 0).unwrap()
                    + Span::seconds(seconds as i64)
                    + Span::nanoseconds(nanos),
            );
        }
        for time in cases {
            assert_eq!(
                format_time(time),
                time.to_rfc3339_opts(SecondsFormat::Micros, true),
                "{time:?}"
            );
            let date = time.date_naive();
            assert_eq!(format_date(date), date.format("%Y-%m-%d").to_string());
        }
    }
}
