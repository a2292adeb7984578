//! `chartline demo`: a synthetic clinic day driven through the real command path on
//! the embedded default (what `make run` runs), then a summary read back from the store,
//! then it keeps serving until Ctrl-C (`--exit` stops after the summary).
//!
//! Reproducible: `--seed` and `--encounters` fix every id and command id, so running the
//! same day again against the same store is a retry — nothing is duplicated.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use chartline::scenario::{self, Visit};
use chartline::serve_cmd::{self, ServeArgs};
use chartline_infra::store::read_whole_stream;
use chartline_infra::{EventStore, ReadScope};
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, StreamId, TenantId};
use chrono::{TimeZone, Utc};
use clap::Args;
use serde_json::json;
use tokio::sync::watch;

#[derive(Args, Clone)]
pub struct DemoArgs {
    /// Encounters in the clinic day.
    #[arg(long, default_value_t = 60)]
    pub encounters: u64,
    /// Seed of the synthetic day (same seed, same day).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Stop after printing the summary instead of serving.
    #[arg(long)]
    pub exit: bool,
    /// HTTP address of the API and dashboard while serving.
    #[arg(long, env = "CHARTLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Also write the summary as JSON to this file (tests compare it with the store).
    #[arg(long)]
    pub summary_json: Option<String>,
    /// Commands in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

const TENANT: &str = "demo-clinic";

/// What happens to one synthetic visit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Completed,
    Cancelled,
    NoShow,
}

fn fate(seed: u64, index: u64) -> Fate {
    match (seed.wrapping_mul(31) ^ index.wrapping_mul(2_654_435_761)) % 12 {
        0 => Fate::Cancelled,
        1 => Fate::NoShow,
        _ => Fate::Completed,
    }
}

async fn drive(
    runtime: &serve_cmd::Runtime,
    tenant: &TenantId,
    visit: &Visit,
    fate: Fate,
) -> anyhow::Result<u32> {
    let mut steps = scenario::steps_until_signed(visit);
    let mut sent = 0;
    if fate != Fate::Completed {
        // Schedule, then cancel or mark no-show.
        steps.truncate(1);
        let scheduler = Actor::new(ActorKind::Service, "telehealth-scheduler");
        let mut closing = steps[0].clone();
        closing.actor = scheduler;
        closing.command_id = uuid::Uuid::from_u64_pair(visit.encounter_id.as_u64_pair().0, 0xC105E);
        let at = (visit.start
            + chrono::Duration::minutes(if fate == Fate::NoShow { 15 } else { -120 }))
        .to_rfc3339();
        if fate == Fate::Cancelled {
            closing.command = "cancel";
            closing.payload = json!({"encounter_id": visit.encounter_id, "reason": "patient requested cancellation", "at": at});
        } else {
            closing.command = "mark_no_show";
            closing.payload = json!({"encounter_id": visit.encounter_id, "at": at});
        }
        steps.push(closing);
    }
    for step in &steps {
        match scenario::send(&runtime.bus, &runtime.root, tenant, step).await {
            CommandReply::Accepted { .. } => sent += 1,
            CommandReply::Rejected { code, message } => {
                anyhow::bail!(
                    "{} {} rejected ({code:?}): {message}",
                    step.service,
                    step.command
                )
            }
        }
    }
    Ok(sent)
}

pub async fn run(args: DemoArgs, store_url: String) -> anyhow::Result<ExitCode> {
    let serve = ServeArgs {
        listen: args.listen.clone(),
        // The in-process sandbox EHR: a stand-in for a vendor EHR (docs/ehr.md).
        ehr_url: Some("sandbox".into()),
        ..ServeArgs::embedded(&[TENANT])
    };
    let selected = serve.selected()?;
    let runtime = serve_cmd::connect(&serve, &store_url, &selected).await?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = serve_cmd::start(&serve, &runtime, &selected, &stopped).await?;
    let tenant = TenantId::parse(TENANT)?;
    let day = Utc
        .with_ymd_and_hms(2026, 3, 2, 0, 0, 0)
        .single()
        .context("demo day")?;

    eprintln!(
        "chartline demo: {} synthetic encounters (seed {}) through the command path, store {}",
        args.encounters, args.seed, store_url
    );
    let started = Instant::now();
    let visits: Vec<(Visit, Fate)> = (0..args.encounters)
        .map(|i| {
            (
                scenario::synthetic_visit(args.seed, i, day),
                fate(args.seed, i),
            )
        })
        .collect();
    // Every visit's patient registers first (identity is resolved before anything can
    // reach a chart); every 15th patient is the twin of the one before: same birth
    // date, address, phone and surname, other given name and sex — a human must review.
    let mut twins = 0u64;
    for (index, (visit, _)) in visits.iter().enumerate() {
        let twin_of = (index % 15 == 14).then(|| visits[index - 1].0.patient_id);
        twins += u64::from(twin_of.is_some());
        let step = registration(
            visit,
            twin_of.unwrap_or(visit.patient_id),
            twin_of.is_some(),
            args.seed,
        );
        match scenario::send(&runtime.bus, &runtime.root, &tenant, &step).await {
            CommandReply::Accepted { .. } => {}
            CommandReply::Rejected { code, message } => {
                anyhow::bail!("register rejected ({code:?}): {message}")
            }
        }
    }
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut runs = tokio::task::JoinSet::new();
    for (visit, fate) in visits.clone() {
        let permit = semaphore.clone().acquire_owned().await?;
        let runtime = serve_cmd::Runtime {
            bus: runtime.bus.clone(),
            store: runtime.store.clone(),
            root: runtime.root.clone(),
            store_url: runtime.store_url.clone(),
        };
        let tenant = tenant.clone();
        runs.spawn(async move {
            let _permit = permit;
            drive(&runtime, &tenant, &visit, fate).await
        });
    }
    let mut commands = 0u64;
    let mut done = 0u64;
    while let Some(result) = runs.join_next().await {
        commands += u64::from(result??);
        done += 1;
        eprint!("\r  encounters driven {done}/{} ", args.encounters);
        let _ = std::io::stderr().flush();
    }
    let drive_seconds = started.elapsed().as_secs_f64();
    eprintln!();

    // Wait for the billing reactor to code every signed note.
    let signed: Vec<&Visit> = visits
        .iter()
        .filter(|(_, fate)| *fate == Fate::Completed)
        .map(|(visit, _)| visit)
        .collect();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut modalities: BTreeMap<String, u64> = BTreeMap::new();
    for visit in &signed {
        let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
        loop {
            let events = read_whole_stream(&runtime.store, &tenant, &stream).await?;
            if let Some(coded) = events
                .iter()
                .rev()
                .find(|e| e.event_type.starts_with("Codes"))
            {
                let outcome = coded.data["outcome"]["outcome"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                *outcomes.entry(outcome).or_default() += 1;
                if let Some(ended) = events.iter().find(|e| e.event_type == "ConsultationEnded") {
                    let modality = ended.data["modality_used"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string();
                    *modalities.entry(modality).or_default() += 1;
                }
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "billing did not code {stream} within 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // Let the EHR connector and the projections settle: nothing in flight to the EHR
    // and every projection at the head, or 120 s.
    let read_db = chartline_projections::db::ReadDb::open(&store_url).await?;
    let settle_deadline = Instant::now() + std::time::Duration::from_secs(120);
    let mut previous = BTreeMap::new();
    loop {
        let states = count_by(
            &read_db,
            "SELECT state, COUNT(*) FROM ehr_writeback WHERE tenant = ? GROUP BY state",
            TENANT,
        )
        .await?;
        let lag: u64 = chartline_projections::engine::status(&runtime.store, &read_db)
            .await?
            .iter()
            .map(|s| s.lag_events)
            .max()
            .unwrap_or(0);
        let in_flight =
            states.get("sent").copied().unwrap_or(0) + states.get("failed").copied().unwrap_or(0);
        if (lag == 0 && in_flight == 0 && states == previous) || Instant::now() > settle_deadline {
            break;
        }
        previous = states;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // Everything below is read back from the store and the read models.
    let mut identity: BTreeMap<String, u64> = BTreeMap::new();
    let mut acknowledged = 0u64;
    let mut tenant_events = 0u64;
    let mut after = 0;
    loop {
        let page = runtime
            .store
            .read_all(&ReadScope::Tenant(tenant.clone()), after, 5_000)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        tenant_events += page.len() as u64;
        for event in &page {
            match event.event_type.as_str() {
                "IdentifierLinked" | "NewPatientConfirmed" | "MatchReviewRequested"
                    if event.metadata.actor.id == "identity-matcher" =>
                {
                    *identity.entry(event.event_type.clone()).or_default() += 1;
                }
                "WriteBackSucceeded" => acknowledged += 1,
                _ => {}
            }
        }
    }
    let write_backs = count_by(
        &read_db,
        "SELECT state, COUNT(*) FROM ehr_writeback WHERE tenant = ? GROUP BY state",
        TENANT,
    )
    .await?;
    let queue = count_by(
        &read_db,
        "SELECT status, COUNT(*) FROM billing_queue WHERE tenant = ? GROUP BY status",
        TENANT,
    )
    .await?;
    let headline =
        chartline_projections::models::integration_completeness::headline(&read_db, Some(TENANT))
            .await?;
    let projection_lag: u64 = chartline_projections::engine::status(&runtime.store, &read_db)
        .await?
        .iter()
        .map(|s| s.lag_events)
        .max()
        .unwrap_or(0);
    let stats = runtime.store.stats().await?;
    let verify = runtime.store.verify_all(&ReadScope::AllTenants).await?;
    let count = |wanted: Fate| visits.iter().filter(|(_, fate)| *fate == wanted).count();

    println!("Chartline clinic day (synthetic, seed {}):", args.seed);
    println!("  encounters              {}", args.encounters);
    println!("    completed and signed  {}", count(Fate::Completed));
    println!("    cancelled             {}", count(Fate::Cancelled));
    println!("    no-show               {}", count(Fate::NoShow));
    println!(
        "  patient identity        {} (registered twins: {twins})",
        fmt_counts(&identity)
    );
    println!("  modality used           {}", fmt_counts(&modalities));
    println!("  billing decisions       {}", fmt_counts(&outcomes));
    println!("  billing queue           {}", fmt_counts(&queue));
    println!(
        "  EHR write-back          {acknowledged} artifacts acknowledged by the sandbox EHR; by state: {}",
        fmt_counts(&write_backs)
    );
    println!(
        "  integration             {:.1}% of {} encounters fully automated; {:.2} manual touches per encounter ({} manual code picks)",
        headline.percent_fully_automated,
        headline.encounters,
        headline.manual_touches_per_encounter,
        headline.manual_code_picks
    );
    println!("  projection lag          {projection_lag} events");
    println!(
        "  commands accepted       {commands} in {drive_seconds:.2} s ({:.0}/s)",
        commands as f64 / drive_seconds.max(1e-9)
    );
    println!(
        "  event store             {} events, {} streams, head position {}",
        stats.events, stats.streams, stats.head_position
    );
    println!(
        "  hash chains             {} ({} streams, {} events verified)",
        if verify.is_intact() {
            "intact"
        } else {
            "BROKEN"
        },
        verify.streams_checked,
        verify.events_checked
    );
    if let Some(path) = &args.summary_json {
        let summary = json!({
            "encounters": args.encounters,
            "completed": count(Fate::Completed),
            "cancelled": count(Fate::Cancelled),
            "no_show": count(Fate::NoShow),
            "twins": twins,
            "identity": identity,
            "modalities": modalities,
            "billing_decisions": outcomes,
            "billing_queue": queue,
            "ehr_acknowledged": acknowledged,
            "ehr_write_backs": write_backs,
            "fully_automated_percent": headline.percent_fully_automated,
            "manual_touches": headline.manual_touches,
            "manual_code_picks": headline.manual_code_picks,
            "projection_lag": projection_lag,
            "events": stats.events,
            "tenant_events": tenant_events,
            "chains_intact": verify.is_intact(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }

    if args.exit {
        let _ = stop.send(true);
        while tasks.join_next().await.is_some() {}
        return Ok(if verify.is_intact() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    println!();
    println!(
        "Serving on the embedded default (in-process bus, store {store_url}). Ctrl-C to stop."
    );
    println!("  inspect:  chartline store read --all --store {store_url}");
    println!("            chartline store verify --store {store_url}");
    tokio::select! {
        _ = serve_cmd::termination() => {}
        Some(done) = tasks.join_next() => {
            if let Ok((name, Err(error))) = done {
                eprintln!("component {name} failed: {error:#}");
            }
        }
    }
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(ExitCode::SUCCESS)
}

/// A synthetic registration. `household` seeds the shared birth date, address, phone and
/// surname (the patient's own id, or the sibling's for a twin).
fn registration(visit: &Visit, household: uuid::Uuid, twin: bool, seed: u64) -> scenario::Step {
    const GIVEN: [&str; 12] = [
        "Avery", "Blair", "Casey", "Devon", "Emery", "Finley", "Harper", "Jordan", "Kendall",
        "Logan", "Morgan", "Quinn",
    ];
    let (h, _) = household.as_u64_pair();
    let (own, _) = visit.patient_id.as_u64_pair();
    let given = GIVEN[((own ^ seed) % GIVEN.len() as u64) as usize];
    let given = if twin {
        format!("{given}ette")
    } else {
        given.to_string()
    };
    let demographics = json!({
        "given_name": given,
        "family_name": format!("Synthfam{:05}", h % 100_000),
        "birth_date": format!("19{:02}-{:02}-{:02}", 40 + h % 60, 1 + (h >> 8) % 12, 1 + (h >> 16) % 28),
        "sex": if twin { "male" } else { "female" },
        "address_line": format!("{} Synthetic Street", 1 + (h >> 24) % 9_000),
        "city": "Springfield",
        "state": "IL",
        "postal_code": format!("62{:03}", (h >> 32) % 1_000),
        "phone": format!("(217) 555-{:04}", (h >> 40) % 10_000),
        "email": null,
        "time_zone": "America/Chicago",
    });
    scenario::Step {
        service: "identity",
        command: "register",
        actor: Actor::new(ActorKind::Service, "telehealth-intake"),
        payload: json!({
            "patient_id": visit.patient_id,
            "demographics": demographics,
            "at": (visit.start - chrono::Duration::days(3)).to_rfc3339(),
        }),
        command_id: uuid::Uuid::from_u64_pair(own, 0x4E6157),
    }
}

async fn count_by(
    db: &chartline_projections::db::ReadDb,
    sql: &str,
    tenant: &str,
) -> anyhow::Result<BTreeMap<String, u64>> {
    use chartline_projections::db::{Cell, Kind};
    let rows = db
        .fetch(sql, &[Cell::Text(tenant.into())], &[Kind::Text, Kind::Int])
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| match (&row[0], &row[1]) {
            (Cell::Text(name), Cell::Int(count)) => Some((name.clone(), *count as u64)),
            _ => None,
        })
        .collect())
}

fn fmt_counts(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
