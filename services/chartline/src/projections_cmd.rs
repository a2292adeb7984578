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
    }
}
