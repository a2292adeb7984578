//! `chartline bench commands`: sustained commands/s through the real command path and
//! command latency, on the embedded path (in-process bus + SQLite) and the distributed
//! path (NATS request/reply + the store service on PostgreSQL), plus p50/p99 latency at
//! a paced 500 commands/s. Targets (issue 4): ≥ 2,000 commands/s embedded, ≥ 1,000
//! distributed, p99 < 20 ms at 500 commands/s.
//!
//! Each synthetic visit is the 7-step lifecycle (schedule … sign) sent in order; visits
//! run concurrently. The billing reactor runs too, as it would in production.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chartline::scenario;
use chartline::serve_cmd::{self, Runtime, ServeArgs};
use chartline_proto::TenantId;
use chartline_proto::commands::CommandReply;
use clap::Args;
use serde_json::json;
use tokio::sync::Mutex;

#[derive(Args)]
pub struct CommandBenchArgs {
    /// Visits (7 commands each) in the throughput run.
    #[arg(long, default_value_t = 400)]
    visits: u64,
    /// Visits in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of the paced 500 commands/s run.
    #[arg(long, default_value_t = 6)]
    paced_seconds: u64,
    /// Which paths: embedded, distributed.
    #[arg(long, value_delimiter = ',', default_value = "embedded,distributed")]
    paths: Vec<String>,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_admin: String,
    #[arg(long, default_value = "target/bench/commands.json")]
    out: String,
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1_000.0
}

struct Measured {
    commands_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    paced_p50_ms: f64,
    paced_p99_ms: f64,
    paced_rate: f64,
}

async fn drive(
    runtime: &Runtime,
    tenant: &TenantId,
    seed: u64,
    visits: u64,
    concurrency: usize,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let day =
        chrono::DateTime::parse_from_rfc3339("2026-03-02T00:00:00Z")?.with_timezone(&chrono::Utc);
    let latencies = Arc::new(Mutex::new(Vec::with_capacity((visits * 7) as usize)));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..visits {
        let permit = semaphore.clone().acquire_owned().await?;
        let (bus, root, tenant, latencies) = (
            runtime.bus.clone(),
            runtime.root.clone(),
            tenant.clone(),
            latencies.clone(),
        );
        tasks.spawn(async move {
            let _permit = permit;
            let visit = scenario::synthetic_visit(seed, index, day);
            let mut mine = Vec::with_capacity(7);
            for step in scenario::steps_until_signed(&visit) {
                let sent = Instant::now();
                let reply = scenario::send(&bus, &root, &tenant, &step).await;
                mine.push(sent.elapsed());
                if let CommandReply::Rejected { code, message } = reply {
                    anyhow::bail!("{} rejected ({code:?}): {message}", step.command);
                }
            }
            latencies.lock().await.extend(mine);
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *latencies.lock().await);
    latencies.sort();
    Ok(((visits * 7) as f64 / elapsed, latencies))
}

/// Sends schedule commands at a fixed rate; returns the latencies and the achieved rate.
async fn paced(
    runtime: &Runtime,
    tenant: &TenantId,
    seed: u64,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let day =
        chrono::DateTime::parse_from_rfc3339("2026-03-03T00:00:00Z")?.with_timezone(&chrono::Utc);
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for index in 0..total {
        ticker.tick().await;
        let (bus, root, tenant, latencies) = (
            runtime.bus.clone(),
            runtime.root.clone(),
            tenant.clone(),
            latencies.clone(),
        );
        tasks.spawn(async move {
            let visit = scenario::synthetic_visit(seed, index, day);
            let step = &scenario::steps_until_signed(&visit)[0];
            let sent = Instant::now();
            let reply = scenario::send(&bus, &root, &tenant, step).await;
            latencies.lock().await.push(sent.elapsed());
            matches!(reply, CommandReply::Accepted { .. })
        });
    }
    let mut rejected = 0;
    while let Some(done) = tasks.join_next().await {
        if !done? {
            rejected += 1;
        }
    }
    anyhow::ensure!(rejected == 0, "{rejected} paced commands were rejected");
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *latencies.lock().await);
    latencies.sort();
    Ok((achieved, latencies))
}

async fn measure(
    args: &CommandBenchArgs,
    serve: ServeArgs,
    store_url: &str,
) -> anyhow::Result<Measured> {
    let selected = serve.selected()?;
    let runtime = serve_cmd::connect(&serve, store_url, &selected).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = serve_cmd::start(&serve, &runtime, &selected, &stopped).await?;
    let tenant = TenantId::parse("bench")?;
    // Warm-up (connection pools, caches) outside the measurement.
    drive(&runtime, &tenant, 1, 20, 8).await?;
    let (commands_per_second, latencies) =
        drive(&runtime, &tenant, 2, args.visits, args.concurrency).await?;
    let (paced_rate, paced_latencies) =
        paced(&runtime, &tenant, 3, 500, args.paced_seconds).await?;
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(Measured {
        commands_per_second,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        paced_p50_ms: percentile(&paced_latencies, 0.50),
        paced_p99_ms: percentile(&paced_latencies, 0.99),
        paced_rate,
    })
}

pub(crate) fn figure(
    name: &str,
    description: &str,
    value: f64,
    unit: &str,
    target: Option<(&str, f64)>,
) -> serde_json::Value {
    let pass = target.map(|(op, goal)| {
        if op == ">=" {
            value >= goal
        } else {
            value < goal
        }
    });
    json!({
        "name": name,
        "description": description,
        "value": (value * 100.0).round() / 100.0,
        "unit": unit,
        "target": target.map(|(op, goal)| format!("{op} {goal}")),
        "pass": pass,
    })
}

pub async fn run(args: CommandBenchArgs) -> anyhow::Result<ExitCode> {
    let services = [
        "scheduling",
        "consultation",
        "documentation",
        "billing",
        "identity",
        "rpm",
    ];
    let mut figures = Vec::new();
    for path in &args.paths {
        let (measured, goal) = match path.as_str() {
            "embedded" => {
                let dir = std::env::temp_dir()
                    .join(format!("chartline_bench_{}", uuid::Uuid::new_v4().simple()));
                let mut serve = ServeArgs::embedded(&["bench"]);
                serve.only = services.iter().map(|s| s.to_string()).collect();
                let url = format!("sqlite://{}/events.db", dir.display());
                let measured = measure(&args, serve, &url).await;
                let _ = std::fs::remove_dir_all(&dir);
                (measured?, 2_000.0)
            }
            "distributed" => {
                let name = format!("chartline_bench_{}", uuid::Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&args.pg_admin)
                    .await
                    .context("PostgreSQL for the distributed bench")?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await?;
                let base = args
                    .pg_admin
                    .rsplit_once('/')
                    .map_or(args.pg_admin.as_str(), |(b, _)| b);
                let mut serve = ServeArgs::embedded(&["bench"]);
                serve.nats = Some(args.nats.clone());
                serve.subject_root = format!("chartline-bench{}", &name[16..24]);
                serve.only = std::iter::once("store")
                    .chain(services)
                    .map(|s| s.to_string())
                    .collect();
                let measured = measure(&args, serve, &format!("{base}/{name}")).await;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
                (measured?, 1_000.0)
            }
            other => anyhow::bail!("unknown path {other}: embedded or distributed"),
        };
        figures.push(figure(
            &format!("{path}.commands_per_second"),
            &format!(
                "sustained commands/s, {path} path ({} visits × 7, {} in flight)",
                args.visits, args.concurrency
            ),
            measured.commands_per_second,
            "commands/s",
            Some((">=", goal)),
        ));
        figures.push(figure(
            &format!("{path}.latency_p50"),
            "command latency p50 under full load",
            measured.p50_ms,
            "ms",
            None,
        ));
        figures.push(figure(
            &format!("{path}.latency_p99"),
            "command latency p99 under full load",
            measured.p99_ms,
            "ms",
            None,
        ));
        figures.push(figure(
            &format!("{path}.paced_rate"),
            "achieved rate of the paced run",
            measured.paced_rate,
            "commands/s",
            None,
        ));
        figures.push(figure(
            &format!("{path}.paced_p50"),
            "latency p50 at 500 commands/s",
            measured.paced_p50_ms,
            "ms",
            None,
        ));
        figures.push(figure(
            &format!("{path}.paced_p99"),
            "latency p99 at 500 commands/s",
            measured.paced_p99_ms,
            "ms",
            Some(("<", 20.0)),
        ));
    }
    report("commands", &figures, &args.out)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the figures as a table and writes them as `{"benchmark", "figures"}` JSON.
pub(crate) fn report(
    benchmark: &str,
    figures: &[serde_json::Value],
    out: &str,
) -> anyhow::Result<()> {
    println!(
        "{:<36} {:>12} {:<12} {:<10} result",
        "figure", "value", "unit", "target"
    );
    for f in figures {
        println!(
            "{:<36} {:>12} {:<12} {:<10} {}",
            f["name"].as_str().unwrap_or_default(),
            f["value"],
            f["unit"].as_str().unwrap_or_default(),
            f["target"].as_str().unwrap_or("-"),
            match f["pass"].as_bool() {
                Some(true) => "pass",
                Some(false) => "MISS",
                None => "",
            }
        );
    }
    if let Some(parent) = std::path::Path::new(out).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        out,
        serde_json::to_string_pretty(&json!({"benchmark": benchmark, "figures": figures}))?,
    )?;
    eprintln!("wrote {out}");
    Ok(())
}
