//! `chartline bench store`: event store throughput, latency and memory, measured against
//! the raw PostgreSQL commit rate in the same run.
//!
//! Every backend starts on a fresh database (a new SQLite file under `target/bench/`, a
//! new PostgreSQL database, a store service on its own NATS subject root). The physical
//! limit is `pgbench` with a custom script — one single-row insert per transaction into
//! an events-shaped table — against a throw-away database; each store figure is reported
//! as a ratio to the matching raw figure. The targets come from issue 3; a figure
//! without a target is informational. See docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chartline_infra::store::nats::{NatsEventStore, serve};
use chartline_infra::store::postgres::PostgresStore;
use chartline_infra::store::sqlite::SqliteStore;
use chartline_infra::{EventStore, ExpectedVersion, ReadScope};
use chartline_proto::{Actor, ActorKind, Metadata, NewEvent, StreamId, TenantId};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use uuid::Uuid;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Event store throughput and latency on SQLite, PostgreSQL and the NATS store service.
    Store(StoreBenchArgs),
    /// Commands/s and latency through the command path, embedded and distributed.
    Commands(crate::bench_commands::CommandBenchArgs),
    /// GraphQL API queries/s, audit replay latency and subscription fan-out.
    Api(crate::bench_api::ApiBenchArgs),
    /// EHR write-back against the sandbox: encounters/s acknowledged, NoteSigned latency.
    Ehr(crate::bench_ehr::EhrBenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Sqlite,
    Postgres,
    Nats,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Nats => "nats",
        }
    }
}

#[derive(Args)]
pub struct StoreBenchArgs {
    /// Backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,nats")]
    backends: Vec<Backend>,
    /// Events per 1-event-batch scenario (1 writer and 8 writers).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Events per 10-event-batch scenario.
    #[arg(long, default_value_t = 100_000)]
    batch_events: usize,
    /// Size of the global log `read_all` pages through (loaded first in big batches).
    #[arg(long, default_value_t = 1_000_000)]
    read_events: u64,
    /// Page size of `read_all`.
    #[arg(long, default_value_t = 5_000)]
    read_page: usize,
    /// Seconds per pgbench run (3 runs); 0 skips pgbench.
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u64,
    /// PostgreSQL server used to create throw-away databases (any existing database).
    #[arg(
        long,
        env = "CHARTLINE_BENCH_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pg_url: String,
    #[arg(
        long,
        env = "CHARTLINE_BENCH_NATS",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/store.json")]
    out: PathBuf,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        BenchCommand::Store(args) => run_store(args).await,
        BenchCommand::Commands(args) => crate::bench_commands::run(args).await,
        BenchCommand::Api(args) => crate::bench_api::run(args).await,
        BenchCommand::Ehr(args) => crate::bench_ehr::run(args).await,
    }
}

// ---------------------------------------------------------------------------------------
// Figures and targets

#[derive(Serialize, Clone)]
struct Figure {
    /// Stable key, e.g. `postgres.append.1w.1e`.
    name: String,
    backend: String,
    description: String,
    value: f64,
    unit: String,
    /// Human-readable target from issue 3, if any.
    target: Option<String>,
    /// `>=` or `<` against `target_value`.
    target_op: Option<&'static str>,
    target_value: Option<f64>,
    /// None when the figure has no target.
    pass: Option<bool>,
    /// The store figure divided by the matching raw pgbench figure.
    ratio_to_raw: Option<f64>,
    raw_reference: Option<String>,
}

impl Figure {
    fn new(name: &str, backend: &str, description: &str, value: f64, unit: &str) -> Self {
        Figure {
            name: name.into(),
            backend: backend.into(),
            description: description.into(),
            value,
            unit: unit.into(),
            target: None,
            target_op: None,
            target_value: None,
            pass: None,
            ratio_to_raw: None,
            raw_reference: None,
        }
    }

    fn at_least(mut self, target_value: f64, text: impl Into<String>) -> Self {
        self.target = Some(text.into());
        self.target_op = Some(">=");
        self.target_value = Some(target_value);
        self.pass = Some(self.value >= target_value);
        self
    }

    fn below(mut self, target_value: f64, text: impl Into<String>) -> Self {
        self.target = Some(text.into());
        self.target_op = Some("<");
        self.target_value = Some(target_value);
        self.pass = Some(self.value < target_value);
        self
    }

    fn versus(mut self, raw: Option<(f64, &str)>) -> Self {
        if let Some((raw_value, reference)) = raw
            && raw_value > 0.0
        {
            self.ratio_to_raw = Some(self.value / raw_value);
            self.raw_reference = Some(reference.into());
        }
        self
    }
}

/// Raw PostgreSQL limits measured with pgbench.
#[derive(Serialize, Clone, Copy, Default)]
struct RawLimits {
    single_row_1_client_tps: f64,
    single_row_8_clients_tps: f64,
    ten_rows_1_client_rows_per_s: f64,
}

// ---------------------------------------------------------------------------------------
// Memory sampling

#[derive(Serialize, Clone)]
struct RssSample {
    at_s: f64,
    phase: String,
    rss_kib: u64,
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)
                    .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
                    .and_then(|kib| kib.parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Samples VmRSS every 100 ms, labelled with the phase running at the time.
#[derive(Clone)]
struct RssSampler {
    phase: Arc<Mutex<String>>,
    samples: Arc<Mutex<Vec<RssSample>>>,
}

impl RssSampler {
    fn start() -> Self {
        let sampler = RssSampler {
            phase: Arc::new(Mutex::new("start".into())),
            samples: Arc::new(Mutex::new(Vec::new())),
        };
        let background = sampler.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                background.sample(started);
            }
        });
        sampler
    }

    fn sample(&self, started: Instant) {
        let phase = self.phase.lock().expect("phase lock").clone();
        self.samples.lock().expect("samples lock").push(RssSample {
            at_s: started.elapsed().as_secs_f64(),
            phase,
            rss_kib: proc_status_kib("VmRSS"),
        });
    }

    fn enter(&self, phase: impl Into<String>) {
        *self.phase.lock().expect("phase lock") = phase.into();
    }

    fn phase_range_kib(&self, phase: &str) -> Option<(u64, u64)> {
        let samples = self.samples.lock().expect("samples lock");
        let values: Vec<u64> = samples
            .iter()
            .filter(|s| s.phase == phase)
            .map(|s| s.rss_kib)
            .collect();
        Some((*values.iter().min()?, *values.iter().max()?))
    }

    fn snapshot(&self) -> Vec<RssSample> {
        self.samples.lock().expect("samples lock").clone()
    }
}

// ---------------------------------------------------------------------------------------
// Workload

const TENANT: &str = "default";
const WARMUP_APPENDS: usize = 300;
const LOAD_BATCH: usize = 2_500;
const LOAD_WRITERS: usize = 4;

fn bench_event(tenant: &TenantId, n: usize) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "BenchmarkRecorded".into(),
        schema_version: 1,
        data: serde_json::json!({
            "n": n,
            "patient": "pat-0001",
            "note": "vital signs recorded during a telehealth visit",
            "values": { "systolic": 120, "diastolic": 80, "pulse": 64 },
        }),
        metadata: Metadata {
            tenant: tenant.clone(),
            actor: Actor::new(ActorKind::System, "chartline-bench"),
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            source: "bench".into(),
            occurred_at: chrono::Utc::now(),
            contains_phi: false,
        },
    }
}

fn fresh_stream(label: &str, writer: usize) -> anyhow::Result<StreamId> {
    let id = format!("bench-{label}-{writer}-{}", Uuid::new_v4().simple());
    StreamId::parse(&id).map_err(|e| anyhow::anyhow!("stream id {id}: {e}"))
}

struct AppendOutcome {
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl AppendOutcome {
    fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, quantile: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies.len() as f64 * quantile).ceil() as usize)
            .clamp(1, self.latencies.len())
            - 1;
        self.latencies[index].as_secs_f64() * 1_000.0
    }
}

/// `writers` tasks, each on its own stream, append `total_events` in batches of `batch`
/// with exact expected versions. Latency is recorded per append.
async fn append_scenario<S: EventStore>(
    store: &S,
    label: &str,
    writers: usize,
    batch: usize,
    total_events: usize,
) -> anyhow::Result<AppendOutcome> {
    let appends_per_writer = (total_events / writers / batch).max(1);
    let tenant = TenantId::parse(TENANT)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let store = store.clone();
        let tenant = tenant.clone();
        let stream = fresh_stream(label, writer)?;
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(appends_per_writer);
            let mut expected = ExpectedVersion::NoStream;
            for append in 0..appends_per_writer {
                let events = (0..batch)
                    .map(|i| bench_event(&tenant, append * batch + i))
                    .collect();
                let sent = Instant::now();
                let result = store.append(&tenant, &stream, expected, events).await?;
                latencies.push(sent.elapsed());
                expected = ExpectedVersion::Exact(result.last_version);
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(appends_per_writer * writers);
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined.context("writer task panicked")??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(AppendOutcome {
        events: appends_per_writer * writers * batch,
        elapsed,
        latencies,
    })
}

/// Fills the log to `target` events with big concurrent batches; returns events/s.
async fn load_log<S: EventStore>(store: &S, target: u64) -> anyhow::Result<(u64, f64)> {
    let head = store.head_position().await?;
    let missing = target.saturating_sub(head) as usize;
    if missing == 0 {
        return Ok((0, f64::NAN));
    }
    let outcome = append_scenario(
        store,
        "load",
        LOAD_WRITERS,
        LOAD_BATCH,
        missing.div_ceil(LOAD_WRITERS * LOAD_BATCH) * LOAD_WRITERS * LOAD_BATCH,
    )
    .await?;
    Ok((outcome.events as u64, outcome.events_per_second()))
}

struct ReadOutcome {
    events: u64,
    elapsed: Duration,
}

async fn read_everything<S: EventStore>(store: &S, page: usize) -> anyhow::Result<ReadOutcome> {
    let started = Instant::now();
    let mut after = 0;
    let mut events = 0;
    loop {
        let batch = store.read_all(&ReadScope::AllTenants, after, page).await?;
        let Some(last) = batch.last() else { break };
        anyhow::ensure!(
            last.global_position == after + batch.len() as u64,
            "read_all returned a gap after position {after}"
        );
        after = last.global_position;
        events += batch.len() as u64;
    }
    Ok(ReadOutcome {
        events,
        elapsed: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------
// Fresh databases

fn database_url(admin_url: &str, database: &str) -> String {
    let (base, query) = admin_url
        .split_once('?')
        .map_or((admin_url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

async fn create_database(admin_url: &str, prefix: &str) -> anyhow::Result<(String, String)> {
    let name = format!("{prefix}_{}", Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(admin_url)
        .await
        .with_context(|| format!("PostgreSQL must be running at {admin_url} (make services)"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .context("CREATE DATABASE")?;
    pool.close().await;
    Ok((database_url(admin_url, &name), name))
}

async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(admin_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    }
}

// ---------------------------------------------------------------------------------------
// pgbench: the physical limit

const PGBENCH_TABLE: &str = "CREATE TABLE events (
    global_position BIGINT PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    stream_version BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (stream_id, stream_version)
)";

/// One insert statement of `rows` rows shaped like a stored event (same columns,
/// indexes and the same data and metadata bytes as the store benchmark's events).
fn pgbench_script(rows: usize) -> String {
    let tenant = TenantId::parse(TENANT).expect("valid tenant");
    let event = bench_event(&tenant, 1);
    let metadata = serde_json::to_string(&event.metadata).expect("metadata serializes");
    format!(
        "INSERT INTO events (global_position, event_id, tenant_id, stream_id, stream_version, event_type, \
         schema_version, data, metadata, recorded_at, prev_hash, hash) \
         SELECT p, CAST(gen_random_uuid() AS text), 'default', 'bench-raw-' || p, 1, 'BenchmarkRecorded', 1, \
         {}, {}, {}, repeat('0', 64), md5(CAST(p AS text)) || md5(CAST(p AS text)) \
         FROM (SELECT nextval('positions') AS p FROM generate_series(1, {rows})) AS numbered;\n",
        pgbench_literal(&event.data.to_string()),
        pgbench_literal(&metadata),
        pgbench_literal("2026-11-01T00:00:00.000000Z"),
    )
}

/// A PostgreSQL escape-string literal without any `:` (pgbench reads `:name` as one of its
/// variables, even inside quotes) and without `::` casts.
fn pgbench_literal(text: &str) -> String {
    let mut literal = String::from("E'");
    for c in text.chars() {
        match c {
            ':' => literal.push_str("\\x3a"),
            '\'' => literal.push_str("''"),
            '\\' => literal.push_str("\\\\"),
            other => literal.push(other),
        }
    }
    literal.push('\'');
    literal
}

fn find_pgbench() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("pgbench"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("bin/pgbench"))
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.into_iter().find(|p| p.is_file())
}

async fn pgbench_tps(
    pgbench: &Path,
    url: &str,
    script: &Path,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    let output = tokio::process::Command::new(pgbench)
        .args(["-n", "-M", "prepared", "-c", &clients.to_string()])
        .args([
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .arg("-f")
        .arg(script)
        .arg(url)
        .output()
        .await
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("tps = ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|tps| tps.parse().ok())
        })
        .with_context(|| format!("no tps line in pgbench output: {stdout}"))
}

async fn measure_raw(args: &StoreBenchArgs, scratch: &Path) -> anyhow::Result<Option<RawLimits>> {
    if args.pgbench_seconds == 0 {
        return Ok(None);
    }
    let Some(pgbench) = find_pgbench() else {
        eprintln!("pgbench not found (PATH, /usr/lib/postgresql/*/bin): raw limits skipped");
        return Ok(None);
    };
    let (url, name) = create_database(&args.pg_url, "chartline_bench_raw").await?;
    let result = async {
        let pool = sqlx::PgPool::connect(&url).await?;
        sqlx::query(PGBENCH_TABLE).execute(&pool).await?;
        sqlx::query("CREATE INDEX events_by_tenant ON events (tenant_id, global_position)")
            .execute(&pool)
            .await?;
        sqlx::query("CREATE SEQUENCE positions")
            .execute(&pool)
            .await?;
        pool.close().await;
        let single = scratch.join("pgbench_single_row.sql");
        let ten = scratch.join("pgbench_ten_rows.sql");
        std::fs::write(&single, pgbench_script(1))?;
        std::fs::write(&ten, pgbench_script(10))?;
        let seconds = args.pgbench_seconds;
        eprintln!("pgbench: single-row inserts, 1 client, {seconds} s");
        let single_1 = pgbench_tps(&pgbench, &url, &single, 1, seconds).await?;
        eprintln!("pgbench: single-row inserts, 8 clients, {seconds} s");
        let single_8 = pgbench_tps(&pgbench, &url, &single, 8, seconds).await?;
        eprintln!("pgbench: 10-row inserts, 1 client, {seconds} s");
        let ten_1 = pgbench_tps(&pgbench, &url, &ten, 1, seconds).await?;
        anyhow::Ok(RawLimits {
            single_row_1_client_tps: single_1,
            single_row_8_clients_tps: single_8,
            ten_rows_1_client_rows_per_s: ten_1 * 10.0,
        })
    }
    .await;
    drop_database(&args.pg_url, &name).await;
    result.map(Some)
}

// ---------------------------------------------------------------------------------------
// One backend

struct BackendResults {
    append_1w_1e: AppendOutcome,
    append_1w_10e: AppendOutcome,
    append_8w_1e: AppendOutcome,
    append_8w_10e: AppendOutcome,
    load: Option<(u64, f64)>,
    read: Option<ReadOutcome>,
}

/// The median of sequential request/reply exchanges with an echo responder on
/// `server`'s connection: what NATS alone adds to every round through the store service.
async fn bare_round_trip(
    server: &async_nats::Client,
    client: &async_nats::Client,
    subject: &str,
) -> anyhow::Result<Duration> {
    use futures::StreamExt;
    const WARMUP: usize = 300;
    const SAMPLES: usize = 3_000;
    let mut requests = server.subscribe(subject.to_string()).await?;
    let responder = server.clone();
    let echo = tokio::spawn(async move {
        let reply = vec![b'r'; 64];
        while let Some(message) = requests.next().await {
            if let Some(to) = message.reply {
                let _ = responder.publish(to, reply.clone().into()).await;
            }
        }
    });
    server.flush().await?;
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..WARMUP + SAMPLES {
        let payload = vec![b'q'; 700].into();
        let started = Instant::now();
        client
            .request(subject.to_string(), payload)
            .await
            .context("bare NATS request/reply")?;
        if i >= WARMUP {
            samples.push(started.elapsed());
        }
    }
    echo.abort();
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}

async fn measure_backend<S: EventStore>(
    store: &S,
    backend: Backend,
    args: &StoreBenchArgs,
    rss: &RssSampler,
    with_read: bool,
    checkpoint: Option<&sqlx::PgPool>,
) -> anyhow::Result<BackendResults> {
    let name = backend.name();
    rss.enter(format!("{name}.warmup"));
    append_scenario(store, "warmup", 1, 1, WARMUP_APPENDS).await?;
    append_scenario(store, "warmup8", 8, 1, WARMUP_APPENDS).await?;

    let phase = |label: &str| {
        eprintln!("{name}: {label}");
        rss.enter(format!("{name}.{label}"));
    };
    phase("append 1 writer x 1 event");
    let append_1w_1e = append_scenario(store, "w1e1", 1, 1, args.events).await?;
    phase("append 1 writer x 10 events");
    let append_1w_10e = append_scenario(store, "w1e10", 1, 10, args.batch_events).await?;
    phase("append 8 writers x 1 event");
    let append_8w_1e = append_scenario(store, "w8e1", 8, 1, args.events * 2).await?;
    phase("append 8 writers x 10 events");
    let append_8w_10e = append_scenario(store, "w8e10", 8, 10, args.batch_events).await?;
    let (load, read) = if with_read {
        phase("load");
        let load = load_log(store, args.read_events).await?;
        // The load leaves about a gigabyte of dirty pages that PostgreSQL writes back
        // over the next minutes (checkpoint_completion_target): flushed here, so that
        // read_all measures reading, not the tail of the load's write-back.
        if let Some(pool) = checkpoint {
            phase("checkpoint");
            sqlx::query("CHECKPOINT").execute(pool).await?;
        }
        phase("read_all");
        let read = read_everything(store, args.read_page).await?;
        (Some(load), Some(read))
    } else {
        (None, None)
    };
    rss.enter(format!("{name}.done"));
    Ok(BackendResults {
        append_1w_1e,
        append_1w_10e,
        append_8w_1e,
        append_8w_10e,
        load,
        read,
    })
}

fn backend_figures(
    backend: Backend,
    results: &BackendResults,
    raw: Option<RawLimits>,
    figures: &mut Vec<Figure>,
) {
    let name = backend.name();
    let raw1 = raw.map(|r| {
        (
            r.single_row_1_client_tps,
            "pgbench single-row insert, 1 client",
        )
    });
    let raw8 = raw.map(|r| {
        (
            r.single_row_8_clients_tps,
            "pgbench single-row insert, 8 clients",
        )
    });
    let raw10 = raw.map(|r| {
        (
            r.ten_rows_1_client_rows_per_s,
            "pgbench 10-row insert, 1 client (rows/s)",
        )
    });
    let key = |suffix: &str| format!("{name}.{suffix}");

    let mut f = Figure::new(
        &key("append.1w.1e"),
        name,
        "1 writer, 1-event appends",
        results.append_1w_1e.events_per_second(),
        "events/s",
    )
    .versus(raw1);
    f = match backend {
        Backend::Postgres => {
            let limit = raw.map_or(5_400.0, |r| r.single_row_1_client_tps);
            f.at_least(
                0.75 * limit,
                format!(">= 75% of raw single-row commits ({:.0}/s)", 0.75 * limit),
            )
        }
        Backend::Sqlite => f.at_least(15_000.0, ">= 15,000 events/s"),
        Backend::Nats => f,
    };
    figures.push(f);

    let mut f = Figure::new(
        &key("append.1w.10e"),
        name,
        "1 writer, 10-event batches",
        results.append_1w_10e.events_per_second(),
        "events/s",
    )
    .versus(raw10);
    f = match backend {
        Backend::Postgres => f.at_least(30_000.0, ">= 30,000 events/s"),
        Backend::Sqlite => f.at_least(100_000.0, ">= 100,000 events/s"),
        Backend::Nats => f,
    };
    figures.push(f);

    let mut f = Figure::new(
        &key("append.8w.1e"),
        name,
        "8 writers on distinct streams, 1-event appends",
        results.append_8w_1e.events_per_second(),
        "events/s",
    )
    .versus(raw8);
    if backend == Backend::Postgres {
        f = f.at_least(20_000.0, ">= 20,000 events/s");
    }
    figures.push(f);

    figures.push(
        Figure::new(
            &key("append.8w.10e"),
            name,
            "8 writers on distinct streams, 10-event batches",
            results.append_8w_10e.events_per_second(),
            "events/s",
        )
        .versus(raw10),
    );

    let p50 = results.append_1w_1e.percentile_ms(0.50);
    let p99 = results.append_1w_1e.percentile_ms(0.99);
    figures.push(Figure::new(
        &key("latency.1w.1e.p50"),
        name,
        "single-event append latency, 1 writer, median",
        p50,
        "ms",
    ));
    let mut f = Figure::new(
        &key("latency.1w.1e.p99"),
        name,
        "single-event append latency, 1 writer, 99th percentile",
        p99,
        "ms",
    );
    if backend == Backend::Postgres {
        f = f.below(2.0, "< 2 ms");
    }
    figures.push(f);

    if let Some((events, rate)) = results.load
        && events > 0
    {
        figures.push(Figure::new(
            &key("load.4w.2500e"),
            name,
            "bulk load before read_all: 4 writers, 2,500-event batches",
            rate,
            "events/s",
        ));
    }
    if let Some(read) = &results.read {
        let rate = read.events as f64 / read.elapsed.as_secs_f64();
        let mut f = Figure::new(
            &key("read_all"),
            name,
            "read_all over the whole log (events read / s)",
            rate,
            "events/s",
        )
        .versus(raw1);
        f = match backend {
            Backend::Postgres => f.at_least(250_000.0, ">= 250,000 events/s"),
            Backend::Sqlite => f.at_least(500_000.0, ">= 500,000 events/s"),
            Backend::Nats => f,
        };
        figures.push(f);
        figures.push(Figure::new(
            &key("read_all.events"),
            name,
            "events in the log read by read_all",
            read.events as f64,
            "events",
        ));
    }
}

// ---------------------------------------------------------------------------------------
// The run

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    started_at: String,
    duration_s: f64,
    settings: Settings,
    raw_postgres: Option<RawLimits>,
    figures: Vec<Figure>,
    rss_samples: Vec<RssSample>,
}

#[derive(Serialize)]
struct Settings {
    backends: Vec<Backend>,
    events: usize,
    batch_events: usize,
    read_events: u64,
    read_page: usize,
    pgbench_seconds: u64,
    release_build: bool,
}

async fn run_store(args: StoreBenchArgs) -> anyhow::Result<std::process::ExitCode> {
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; benchmark figures are only meaningful with --release");
    }
    let started_at = chrono::Utc::now();
    let started = Instant::now();
    let scratch = args
        .out
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let rss = RssSampler::start();

    rss.enter("pgbench");
    let raw = measure_raw(&args, &scratch).await?;
    let mut figures = Vec::new();
    if let Some(raw) = raw {
        let reference = |name: &str, description: &str, value: f64, unit: &str| {
            Figure::new(
                &format!("raw_postgres.{name}"),
                "pgbench",
                description,
                value,
                unit,
            )
        };
        figures.push(reference(
            "single_row.1c",
            "raw commit rate: one single-row insert per transaction, 1 client",
            raw.single_row_1_client_tps,
            "rows/s",
        ));
        figures.push(reference(
            "single_row.8c",
            "raw commit rate: one single-row insert per transaction, 8 clients",
            raw.single_row_8_clients_tps,
            "rows/s",
        ));
        figures.push(reference(
            "ten_rows.1c",
            "raw: one 10-row insert per transaction, 1 client",
            raw.ten_rows_1_client_rows_per_s,
            "rows/s",
        ));
    }

    let mut postgres_8w_1e = None;
    let mut nats_8w_1e = None;
    let mut nats_rtt = None;
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::Nats] {
        if !args.backends.contains(&backend) {
            continue;
        }
        let results = match backend {
            Backend::Sqlite => {
                let dir = scratch.join(format!("sqlite_{}", Uuid::new_v4().simple()));
                let url = format!("sqlite://{}", dir.join("events.db").display());
                let store = SqliteStore::open(&url).await?;
                let results = measure_backend(&store, backend, &args, &rss, true, None).await;
                drop(store);
                let _ = std::fs::remove_dir_all(&dir);
                results?
            }
            Backend::Postgres => {
                let (url, name) = create_database(&args.pg_url, "chartline_bench").await?;
                let results = async {
                    let store = PostgresStore::open(&url).await?;
                    let results =
                        measure_backend(&store, backend, &args, &rss, true, Some(store.pool()))
                            .await;
                    store.pool().close().await;
                    results
                }
                .await;
                drop_database(&args.pg_url, &name).await;
                let results = results?;
                postgres_8w_1e = Some(results.append_8w_1e.events_per_second());
                results
            }
            Backend::Nats => {
                let (url, name) = create_database(&args.pg_url, "chartline_bench_nats").await?;
                let results = async {
                    let backing = PostgresStore::open(&url).await?;
                    let server = NatsEventStore::connect(&args.nats_url).await?;
                    let root = format!("chartline-bench{}", Uuid::new_v4().simple());
                    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                    let service = tokio::spawn(serve(
                        server.client().clone(),
                        backing.clone(),
                        root.clone(),
                        async {
                            let _ = stopped.await;
                        },
                    ));
                    let client = NatsEventStore::connect(&args.nats_url)
                        .await?
                        .with_root(root.clone());
                    let mut ready = false;
                    for _ in 0..100 {
                        if client.head_position().await.is_ok() {
                            ready = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    anyhow::ensure!(ready, "the in-process store service did not answer");
                    rss.enter("nats.rtt");
                    nats_rtt = Some(
                        bare_round_trip(server.client(), client.client(), &format!("{root}.rtt"))
                            .await?,
                    );
                    let results = measure_backend(&client, backend, &args, &rss, false, None).await;
                    let _ = stop.send(());
                    let _ = service.await;
                    backing.pool().close().await;
                    results
                }
                .await;
                drop_database(&args.pg_url, &name).await;
                let results = results?;
                nats_8w_1e = Some(results.append_8w_1e.events_per_second());
                results
            }
        };
        let first_new = figures.len();
        backend_figures(backend, &results, raw, &mut figures);
        // Partial results as soon as a backend is done (a long run stays informative).
        print_table(&figures[first_new..]);
    }

    if let (Some(direct), Some(through_nats)) = (postgres_8w_1e, nats_8w_1e) {
        figures.push(
            Figure::new(
                "nats.append.8w.1e.vs_postgres",
                "nats",
                "store service over NATS (PostgreSQL behind it), 8 writers, 1-event appends, as % of direct PostgreSQL",
                100.0 * through_nats / direct,
                "%",
            )
            .at_least(70.0, ">= 70% of direct PostgreSQL"),
        );
    }
    if let Some(rtt) = nats_rtt {
        figures.push(Figure::new(
            "nats.rtt.bare",
            "nats",
            "bare NATS request/reply in this run (700-byte request, 64-byte reply, an echo on the store service's connection), median",
            rtt.as_secs_f64() * 1e6,
            "µs",
        ));
        if let (Some(direct), Some(through_nats)) = (postgres_8w_1e, nats_8w_1e) {
            // 8 closed-loop writers make one round of 8 appends at a time: through NATS
            // each round is the direct round plus at least one request/reply.
            let direct_round = 8.0 / direct;
            let nats_round = 8.0 / through_nats;
            let rtt = rtt.as_secs_f64();
            figures.push(Figure::new(
                "nats.append.8w.1e.ceiling_vs_postgres",
                "nats",
                "the most 8 writers can reach through NATS, as % of direct PostgreSQL, were everything but the bare round trip free: direct round / (direct round + bare round trip)",
                100.0 * direct_round / (direct_round + rtt),
                "%",
            ));
            figures.push(Figure::new(
                "nats.append.8w.1e.round_overhead",
                "nats",
                "a round of 8 appends through NATS minus the direct round and the bare round trip (client gathering, JSON, the service's hand-offs)",
                (nats_round - direct_round - rtt) * 1e6,
                "µs",
            ));
        }
    }

    rss.enter("end");
    let peak_kib = proc_status_kib("VmHWM");
    figures.push(Figure::new(
        "process.peak_rss",
        "process",
        "peak resident set size of the benchmark process (VmHWM)",
        peak_kib as f64 / 1024.0,
        "MiB",
    ));
    for backend in &args.backends {
        let phase = format!("{}.read_all", backend.name());
        if let Some((low, high)) = rss.phase_range_kib(&phase) {
            figures.push(
                Figure::new(
                    &format!("{}.read_all.rss_growth", backend.name()),
                    backend.name(),
                    "VmRSS growth while read_all pages through the whole log (max - min of 100 ms samples)",
                    (high - low) as f64 / 1024.0,
                    "MiB",
                )
                .below(64.0, "flat: < 64 MiB growth"),
            );
        }
    }

    print_table(&figures);
    let report = Report {
        benchmark: "store",
        started_at: started_at.to_rfc3339(),
        duration_s: started.elapsed().as_secs_f64(),
        settings: Settings {
            backends: args.backends.clone(),
            events: args.events,
            batch_events: args.batch_events,
            read_events: args.read_events,
            read_page: args.read_page,
            pgbench_seconds: args.pgbench_seconds,
            release_build: !cfg!(debug_assertions),
        },
        raw_postgres: raw,
        figures,
        rss_samples: rss.snapshot(),
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("\nwrote {}", args.out.display());
    Ok(std::process::ExitCode::SUCCESS)
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "-".into()
    } else if value.abs() >= 100.0 {
        let whole = value.round() as i64;
        let digits = whole.abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if whole < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else {
        format!("{value:.2}")
    }
}

fn print_table(figures: &[Figure]) {
    println!(
        "\n{:<34} {:>12} {:<9} {:>8}  {:<44} result",
        "figure", "value", "unit", "vs raw", "target"
    );
    println!("{}", "-".repeat(120));
    for f in figures {
        println!(
            "{:<34} {:>12} {:<9} {:>8}  {:<44} {}",
            f.name,
            format_value(f.value),
            f.unit,
            f.ratio_to_raw
                .map_or_else(String::new, |r| format!("{:.0}%", r * 100.0)),
            f.target.as_deref().unwrap_or(""),
            match f.pass {
                Some(true) => "pass",
                Some(false) => "MISS",
                None => "",
            }
        );
    }
}
