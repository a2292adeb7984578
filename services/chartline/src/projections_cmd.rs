//! `chartline projections …`: run, inspect and repair the read models.
//!
//! Read models live in the event store's database by default; `--read-store URL` puts
//! them in another database (e.g. a replica-fed PostgreSQL, or a separate SQLite file).
//! Exit codes: 0 ok; 1 unavailable/internal; 2 bad input (unknown projection, bad id,
//! nothing to retry); 5 a retried event failed again.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chartline_infra::AnyStore;
use chartline_projections::models::integration_completeness::headline;
use chartline_projections::{
    DeadLetterPolicy, ProjectionError, ProjectionRunner, ReadDb, RunnerConfig,
    models::standard_projections,
};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

const EXIT_BAD_INPUT: u8 = 2;
const EXIT_STILL_FAILING: u8 = 5;

#[derive(Args, Clone)]
pub struct ProjectionArgs {
    /// Read-model database (sqlite://PATH or postgres://…); default: the event store's.
    #[arg(long = "read-store", env = "CHARTLINE_READ_STORE_URL", global = true)]
    pub read_store: Option<String>,
    /// What a poison event does to its projection: skip (quarantine, go on) or stop.
    #[arg(long, default_value = "skip", global = true)]
    pub policy: DeadLetterPolicy,
    /// Events per transaction.
    #[arg(long, default_value_t = 5_000, global = true)]
    pub batch_size: usize,
}

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Name, checkpoint, lag, rate and dead letters of every projection.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Catch up, then follow the log live until Ctrl-C (or exit when caught up).
    Run {
        /// Exit once every projection has reached the head of the log.
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Rebuild one projection from position 0 into shadow tables, then swap it in.
    Rebuild { name: String },
    /// Quarantined events, newest first.
    DeadLetters {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Apply a quarantined event once more (after a fix).
    Retry { name: String, event_id: String },
    /// The headline: manual touches per encounter and % of encounters fully automated.
    Headline {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Benchmark (issue 5): rebuild rate of all read models, live lag at a paced append
    /// rate and RSS during the rebuild, each backend on a fresh database.
    Bench(ProjectionBenchArgs),
}

#[derive(Args, Clone)]
pub struct ProjectionBenchArgs {
    /// Backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<String>,
    /// Synthetic events in the log before the rebuild.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Paced append rate of the live-lag run (events/s).
    #[arg(long, default_value_t = 500.0)]
    live_rate: f64,
    /// Seconds of the live-lag run.
    #[arg(long, default_value_t = 20.0)]
    live_seconds: f64,
    /// PostgreSQL server used to create a throw-away database (any existing database).
    #[arg(
        long,
        env = "CHARTLINE_BENCH_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pg_url: String,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/projections.json")]
    out: String,
}

fn failure(error: &ProjectionError) -> ExitCode {
    eprintln!("error: {error}");
    match error {
        ProjectionError::Config(_) | ProjectionError::Rejected(_) => ExitCode::from(EXIT_BAD_INPUT),
        ProjectionError::Handler(_) => ExitCode::from(EXIT_STILL_FAILING),
        _ => ExitCode::FAILURE,
    }
}

pub async fn run(
    store: crate::store_cmd::StoreArgs,
    args: ProjectionArgs,
    command: ProjectionsCommand,
) -> anyhow::Result<ExitCode> {
    if let ProjectionsCommand::Bench(bench) = command {
        return run_bench(bench).await;
    }
    let read_url = match &args.read_store {
        Some(url) => url.clone(),
        None if store.url.starts_with("nats://") => {
            eprintln!("error: with a nats:// store give the read-model database with --read-store");
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
        None => store.url.clone(),
    };
    let event_store = AnyStore::open(&store.url)
        .await
        .with_context(|| format!("opening event store {}", store.url))?;
    let read_db = ReadDb::open(&read_url)
        .await
        .with_context(|| format!("opening read-model database {read_url}"))?;
    let config = RunnerConfig {
        batch_size: args.batch_size.max(1),
        policy: args.policy,
        ..RunnerConfig::default()
    };
    let runner = |event_store: AnyStore, read_db: ReadDb| async move {
        ProjectionRunner::with_projections(event_store, read_db, standard_projections(), config)
            .await
    };
    match command {
        ProjectionsCommand::Status { json } => {
            // Registers the projections so a fresh database lists them all.
            let runner = match runner(event_store, read_db).await {
                Ok(runner) => runner,
                Err(error) => return Ok(failure(&error)),
            };
            let statuses = match runner.status().await {
                Ok(statuses) => statuses,
                Err(error) => return Ok(failure(&error)),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else {
                println!(
                    "{:<26} {:>4} {:>11} {:>10} {:>9} {:>10} {:<9} {:>5}",
                    "PROJECTION", "GEN", "CHECKPOINT", "LAG", "LAG(s)", "RATE/s", "STATUS", "DEAD"
                );
                for s in &statuses {
                    let status = match s.rebuilding {
                        Some((generation, position)) => {
                            format!("{} (rebuilding g{generation} at {position})", s.status)
                        }
                        None => s.status.clone(),
                    };
                    println!(
                        "{:<26} {:>4} {:>11} {:>10} {:>9.1} {:>10.0} {:<9} {:>5}",
                        s.name,
                        s.generation,
                        s.checkpoint,
                        s.lag_events,
                        s.lag_seconds,
                        s.rate_events_per_sec,
                        status,
                        s.dead_letters_open
                    );
                    if let Some(reason) = &s.stopped_reason {
                        println!("    stopped: {reason}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Run { until_caught_up } => {
            let mut runner = match runner(event_store, read_db).await {
                Ok(runner) => runner,
                Err(error) => return Ok(failure(&error)),
            };
            if until_caught_up {
                let report = loop {
                    match runner.catch_up().await {
                        Ok(report) => break report,
                        Err(error) if !matches!(error, ProjectionError::Config(_)) => {
                            eprintln!("error: {error}; retrying in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(error) => return Ok(failure(&error)),
                    }
                };
                eprintln!(
                    "caught up: {} events in {:.2} s",
                    report.events, report.seconds
                );
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("projections running; Ctrl-C to stop");
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            if let Err(error) = runner.run_until(shutdown).await {
                return Ok(failure(&error));
            }
            eprintln!("projections stopped");
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Rebuild { name } => {
            let mut runner = match runner(event_store, read_db).await {
                Ok(runner) => runner,
                Err(error) => return Ok(failure(&error)),
            };
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40.cyan/blue}] {human_pos}/{human_len} events  {per_sec}  ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("rebuilding {name}"));
            let progress_bar = bar.clone();
            let result = runner
                .rebuild(&name, move |progress| {
                    progress_bar.set_length(progress.head);
                    progress_bar.set_position(progress.position);
                })
                .await;
            bar.finish_and_clear();
            match result {
                Ok(report) => {
                    println!(
                        "rebuilt {} as generation {}: {} events in {:.2} s ({:.0} events/s), swapped in at position {}",
                        report.projection,
                        report.generation,
                        report.events,
                        report.seconds,
                        report.events_per_sec,
                        report.position
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => Ok(failure(&error)),
            }
        }
        ProjectionsCommand::DeadLetters { name, json } => {
            let letters = match chartline_projections::dead_letters(&read_db, name.as_deref()).await
            {
                Ok(letters) => letters,
                Err(error) => return Ok(failure(&error)),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                println!("no dead letters");
            } else {
                for letter in &letters {
                    println!(
                        "{:<26} {:<9} pos {:>9}  {}  {} {}  attempts {}  failed {}\n    {}",
                        letter.projection,
                        letter.status,
                        letter.global_position,
                        letter.event_id,
                        letter.stream_id,
                        letter.event_type,
                        letter.attempts,
                        letter.failed_at,
                        letter.error
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Retry { name, event_id } => {
            let Ok(event_id) = Uuid::parse_str(&event_id) else {
                eprintln!("error: {event_id:?} is not an event id (UUID)");
                return Ok(ExitCode::from(EXIT_BAD_INPUT));
            };
            let mut runner = match runner(event_store, read_db).await {
                Ok(runner) => runner,
                Err(error) => return Ok(failure(&error)),
            };
            match runner.retry(&name, event_id).await {
                Ok(outcome) => {
                    println!(
                        "applied event {} (position {}) to {}{}",
                        outcome.event_id,
                        outcome.global_position,
                        outcome.projection,
                        if outcome.resumed {
                            "; the projection runs again"
                        } else {
                            ""
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => Ok(failure(&error)),
            }
        }
        ProjectionsCommand::Headline { tenant } => {
            match headline(&read_db, tenant.as_deref()).await {
                Ok(headline) => {
                    println!("{}", serde_json::to_string_pretty(&headline)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => Ok(failure(&error)),
            }
        }
        // Handled before the store is opened (the bench makes its own databases).
        ProjectionsCommand::Bench(bench) => run_bench(bench).await,
    }
}

/// One backend of the projections benchmark: fill, rebuild, follow live.
async fn bench_backend(
    args: &ProjectionBenchArgs,
    url: &str,
    figures: &mut Vec<serde_json::Value>,
    backend: &str,
) -> anyhow::Result<()> {
    use chartline_infra::EventStore;
    use chartline_projections::bench;
    let figure = crate::bench_commands::figure;
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let store = AnyStore::open(url).await?;
    let head = store.head_position().await?;
    let started = std::time::Instant::now();
    let written = bench::append_synthetic(&store, head, args.events.saturating_sub(head)).await?;
    eprintln!(
        "{backend}: appended {written} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rebuild = bench::rebuild_benchmark(store.clone(), ReadDb::open(url).await?).await?;
    eprintln!(
        "{backend}: rebuilt {} events in {:.1} s = {:.0} events/s",
        rebuild.events, rebuild.seconds, rebuild.events_per_sec
    );
    let goal = if backend == "sqlite" {
        100_000.0
    } else {
        50_000.0
    };
    figures.push(figure(
        &format!("{backend}.rebuild"),
        &format!(
            "all six read models built from position 0 over {} events (read models in the store's database)",
            rebuild.events
        ),
        rebuild.events_per_sec,
        "events/s",
        Some((">=", goal)),
    ));
    figures.push(figure(
        &format!("{backend}.rebuild.peak_rss"),
        "peak VmRSS sampled every 100 ms during the rebuild",
        mib(rebuild.rss.peak_bytes as f64),
        "MiB",
        None,
    ));
    figures.push(figure(
        &format!("{backend}.rebuild.rss_growth"),
        "peak VmRSS of the rebuild's second half minus its first half (flat: < 64 MiB)",
        mib(rebuild.rss.growth_bytes as f64),
        "MiB",
        Some(("<", 64.0)),
    ));
    let live = bench::live_lag_benchmark(
        store.clone(),
        ReadDb::open(url).await?,
        args.live_rate,
        args.live_seconds,
    )
    .await?;
    eprintln!(
        "{backend}: live {} events at {:.0}/s: lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        live.events, live.events_per_sec, live.p50_ms, live.p99_ms, live.max_ms
    );
    figures.push(figure(
        &format!("{backend}.live.rate"),
        "achieved paced append rate of the live-lag run (5 writers, 1 event per append)",
        live.events_per_sec,
        "events/s",
        None,
    ));
    figures.push(figure(
        &format!("{backend}.live.lag_p50"),
        "append acknowledged -> all six checkpoints committed past it, p50",
        live.p50_ms,
        "ms",
        None,
    ));
    figures.push(figure(
        &format!("{backend}.live.lag_p99"),
        "append acknowledged -> all six checkpoints committed past it, p99",
        live.p99_ms,
        "ms",
        Some(("<", 100.0)),
    ));
    Ok(())
}

async fn run_bench(args: ProjectionBenchArgs) -> anyhow::Result<ExitCode> {
    let mut figures = Vec::new();
    for backend in &args.backends {
        match backend.as_str() {
            "sqlite" => {
                let dir = std::path::Path::new("target/bench")
                    .join(format!("projections-{}", Uuid::new_v4().simple()));
                let url = format!("sqlite://{}/events.db", dir.display());
                let result = bench_backend(&args, &url, &mut figures, "sqlite").await;
                let _ = std::fs::remove_dir_all(&dir);
                result?;
            }
            "postgres" => {
                let name = format!("chartline_pbench_{}", Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&args.pg_url)
                    .await
                    .context("PostgreSQL for the projections bench")?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await?;
                let base = args
                    .pg_url
                    .rsplit_once('/')
                    .map_or(args.pg_url.as_str(), |(b, _)| b);
                let url = format!("{base}/{name}");
                let result = bench_backend(&args, &url, &mut figures, "postgres").await;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
                result?;
            }
            other => anyhow::bail!("unknown backend {other}: sqlite or postgres"),
        }
    }
    if let Some(hwm) = chartline_projections::bench::vm_hwm_bytes() {
        figures.push(crate::bench_commands::figure(
            "process.peak_rss",
            "VmHWM of the benchmark process (includes filling the log)",
            hwm as f64 / (1024.0 * 1024.0),
            "MiB",
            None,
        ));
    }
    crate::bench_commands::report("projections", &figures, &args.out)?;
    Ok(ExitCode::SUCCESS)
}
