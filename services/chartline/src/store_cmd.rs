//! `chartline store …`: operator commands on the event store (append, read, verify,
//! stats, tenants, bulk load). Exit codes: 0 ok; 1 unavailable/internal; 2 bad input;
//! 3 optimistic-concurrency conflict; 4 broken hash chain.

use std::process::ExitCode;

use anyhow::Context;
use chartline_infra::store::DEFAULT_STORE_URL;
use chartline_infra::{AnyStore, Direction, EventStore, ExpectedVersion, ReadScope, StoreError};
use chartline_proto::{Actor, ActorKind, EventEnvelope, Metadata, NewEvent, StreamId, TenantId};
use clap::{Args, Subcommand};
use uuid::Uuid;

pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_CONFLICT: u8 = 3;
pub const EXIT_CHAIN_BROKEN: u8 = 4;

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Event store: sqlite://PATH (embedded default), postgres://…, or nats://… (the store service).
    #[arg(long = "store", env = "CHARTLINE_STORE_URL", default_value = DEFAULT_STORE_URL, global = true)]
    pub url: String,
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Append one event to a stream.
    Append {
        #[arg(long)]
        stream: String,
        /// any | none | N (the stream version you expect before appending)
        #[arg(long, default_value = "any")]
        expected: String,
        #[arg(long = "type")]
        event_type: String,
        /// Event data as JSON.
        #[arg(long)]
        data: String,
        #[arg(long)]
        event_id: Option<Uuid>,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, default_value_t = 1)]
        schema_version: u32,
    },
    /// Read a stream (--stream) or the global log (--all).
    Read {
        #[arg(long, conflicts_with = "all")]
        stream: Option<String>,
        #[arg(long)]
        all: bool,
        /// With --all: start after this global position.
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 1_000)]
        limit: usize,
        /// Tenant whose data to read; with --all and no --tenant, every tenant (operators only).
        #[arg(long)]
        tenant: Option<String>,
        /// One JSON envelope per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify hash chains (one stream or all); non-zero exit and the first bad event when broken.
    Verify {
        #[arg(long)]
        stream: Option<String>,
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Counts and head position.
    Stats,
    /// Register a tenant (idempotent).
    TenantAdd { tenant: String },
    /// Append N synthetic events in batches (load and crash testing).
    BulkAppend {
        #[arg(long, default_value_t = 1_000)]
        events: u64,
        #[arg(long, default_value_t = 1_000)]
        batch: u64,
        #[arg(long)]
        stream: Option<String>,
        #[arg(long, default_value = "default")]
        tenant: String,
    },
}

fn bad_input(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_BAD_INPUT)
}

/// Prints a store error and maps it to the documented exit code.
pub fn store_failure(error: &StoreError) -> ExitCode {
    match error {
        StoreError::Conflict {
            stream,
            expected,
            actual,
        } => {
            eprintln!(
                "conflict on {stream}: expected version {expected}, actual {}",
                actual.map_or("no stream".to_string(), |v| v.to_string())
            );
            ExitCode::from(EXIT_CONFLICT)
        }
        StoreError::Unavailable(_) | StoreError::Corrupt(_) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
        _ => bad_input(error),
    }
}

fn print_event(event: &EventEnvelope, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(event).expect("envelopes serialize")
        );
    } else {
        println!(
            "{:>8}  {}  v{:<4} {:<24} {}  {}",
            event.global_position,
            event.stream_id,
            event.stream_version,
            event.event_type,
            event.recorded_at.to_rfc3339(),
            event.data
        );
    }
}

fn synthetic_event(tenant: &TenantId, n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "SyntheticLoad".into(),
        schema_version: 1,
        data: serde_json::json!({ "n": n, "payload": "synthetic load event" }),
        metadata: Metadata {
            tenant: tenant.clone(),
            actor: Actor::new(ActorKind::System, "chartline-cli"),
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            source: "cli".into(),
            occurred_at: chrono::Utc::now(),
            contains_phi: false,
        },
    }
}

pub async fn run(args: StoreArgs, command: StoreCommand) -> anyhow::Result<ExitCode> {
    let store = AnyStore::open(&args.url)
        .await
        .with_context(|| format!("opening event store {}", args.url))?;
    match command {
        StoreCommand::Append {
            stream,
            expected,
            event_type,
            data,
            event_id,
            tenant,
            schema_version,
        } => {
            let stream = match StreamId::parse(&stream) {
                Ok(stream) => stream,
                Err(e) => return Ok(bad_input(e)),
            };
            let tenant = match TenantId::parse(&tenant) {
                Ok(tenant) => tenant,
                Err(e) => return Ok(bad_input(e)),
            };
            let expected: ExpectedVersion = match expected.parse() {
                Ok(expected) => expected,
                Err(e) => return Ok(bad_input(e)),
            };
            let data: serde_json::Value = match serde_json::from_str(&data) {
                Ok(data) => data,
                Err(e) => return Ok(bad_input(format!("--data is not JSON: {e}"))),
            };
            let event = NewEvent {
                event_id: event_id.unwrap_or_else(Uuid::now_v7),
                event_type,
                schema_version,
                data,
                metadata: Metadata {
                    tenant: tenant.clone(),
                    actor: Actor::new(ActorKind::Staff, whoami()),
                    correlation_id: Uuid::now_v7(),
                    causation_id: None,
                    source: "cli".into(),
                    occurred_at: chrono::Utc::now(),
                    contains_phi: false,
                },
            };
            match store.append(&tenant, &stream, expected, vec![event]).await {
                Ok(result) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&result).expect("results serialize")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => Ok(store_failure(&error)),
            }
        }
        StoreCommand::Read {
            stream,
            all,
            from,
            limit,
            tenant,
            json,
        } => {
            let tenant = match tenant.as_deref().map(TenantId::parse).transpose() {
                Ok(tenant) => tenant,
                Err(e) => return Ok(bad_input(e)),
            };
            if let Some(stream) = stream {
                let stream = match StreamId::parse(&stream) {
                    Ok(stream) => stream,
                    Err(e) => return Ok(bad_input(e)),
                };
                let tenant = tenant.unwrap_or_else(|| TenantId::parse("default").expect("valid"));
                let mut version = 1;
                loop {
                    let page = match store
                        .read_stream(&tenant, &stream, version, Direction::Forwards, limit)
                        .await
                    {
                        Ok(page) => page,
                        Err(error) => return Ok(store_failure(&error)),
                    };
                    for event in &page {
                        print_event(event, json);
                    }
                    match page.last() {
                        Some(last)
                            if page.len() == limit.min(chartline_infra::store::MAX_READ_LIMIT) =>
                        {
                            version = last.stream_version + 1
                        }
                        _ => break,
                    }
                }
            } else if all {
                let scope = tenant.map_or(ReadScope::AllTenants, ReadScope::Tenant);
                match store.read_all(&scope, from, limit).await {
                    Ok(page) => page.iter().for_each(|event| print_event(event, json)),
                    Err(error) => return Ok(store_failure(&error)),
                }
            } else {
                return Ok(bad_input("give --stream S or --all"));
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Verify { stream, tenant } => {
            let report = match stream {
                Some(stream) => {
                    let stream = match StreamId::parse(&stream) {
                        Ok(stream) => stream,
                        Err(e) => return Ok(bad_input(e)),
                    };
                    let tenant = match TenantId::parse(&tenant) {
                        Ok(tenant) => tenant,
                        Err(e) => return Ok(bad_input(e)),
                    };
                    store.verify_stream(&tenant, &stream).await
                }
                None => store.verify_all(&ReadScope::AllTenants).await,
            };
            let report = match report {
                Ok(report) => report,
                Err(error) => return Ok(store_failure(&error)),
            };
            if report.is_intact() {
                println!(
                    "chain intact: {} streams, {} events verified",
                    report.streams_checked, report.events_checked
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for broken in &report.breaks {
                    println!(
                        "BROKEN {} version {} event {}: {}",
                        broken.stream_id, broken.stream_version, broken.event_id, broken.reason
                    );
                }
                for gap in &report.missing_positions {
                    println!(
                        "MISSING positions {}..={} of the global log: events were deleted",
                        gap.first, gap.last
                    );
                }
                println!(
                    "{} of {} streams broken, {} gaps in the global log ({} events checked)",
                    report.breaks.len(),
                    report.streams_checked,
                    report.missing_positions.len(),
                    report.events_checked
                );
                Ok(ExitCode::from(EXIT_CHAIN_BROKEN))
            }
        }
        StoreCommand::Stats => match store.stats().await {
            Ok(stats) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&stats).expect("stats serialize")
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => Ok(store_failure(&error)),
        },
        StoreCommand::TenantAdd { tenant } => {
            let tenant = match TenantId::parse(&tenant) {
                Ok(tenant) => tenant,
                Err(e) => return Ok(bad_input(e)),
            };
            match store.ensure_tenant(&tenant).await {
                Ok(()) => {
                    println!("tenant {tenant} registered");
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => Ok(store_failure(&error)),
            }
        }
        StoreCommand::BulkAppend {
            events,
            batch,
            stream,
            tenant,
        } => {
            let tenant = match TenantId::parse(&tenant) {
                Ok(tenant) => tenant,
                Err(e) => return Ok(bad_input(e)),
            };
            let stream = match stream.map(|s| StreamId::parse(&s)).transpose() {
                Ok(stream) => {
                    stream.unwrap_or_else(|| StreamId::for_aggregate("load", Uuid::now_v7()))
                }
                Err(e) => return Ok(bad_input(e)),
            };
            let batch = batch.max(1);
            let mut appended = 0;
            while appended < events {
                let size = batch.min(events - appended);
                let chunk = (0..size)
                    .map(|n| synthetic_event(&tenant, appended + n))
                    .collect();
                if let Err(error) = store
                    .append(&tenant, &stream, ExpectedVersion::Any, chunk)
                    .await
                {
                    return Ok(store_failure(&error));
                }
                appended += size;
                eprintln!("appended {appended}/{events}");
            }
            println!("{stream}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}
