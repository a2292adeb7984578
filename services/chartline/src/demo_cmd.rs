//! `chartline demo`: a synthetic clinic day driven through the real command path on
//! the embedded default (what `make run` runs), then a summary read back from the store,
//! then it keeps serving until Ctrl-C (`--exit` stops after the summary).
//!
//! Reproducible: `--seed` and `--encounters` fix every id and command id, so running the
//! same day again against the same store is a retry — nothing is duplicated.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use chartline::scenario::{self, Visit};
use chartline::serve_cmd::{self, ServeArgs};
use chartline_ehr_connector::SandboxEhr;
use chartline_ehr_connector::sandbox::{Faults, SandboxConfig};
use chartline_infra::store::read_whole_stream;
use chartline_infra::{EventStore, ReadScope};
use chartline_proto::commands::{CommandReply, RejectionCode};
use chartline_proto::{Actor, ActorKind, StreamId, TenantId};
use chrono::{TimeZone, Utc};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
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
    /// Share of the sandbox EHR's FHIR requests that fail (5xx, 429, timeouts, dropped
    /// connections); the connector retries them. 0 turns faults off.
    #[arg(long, default_value_t = 0.1)]
    pub ehr_fault_rate: f64,
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
        match send(runtime, tenant, step).await {
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
    let (stop, stopped) = watch::channel(false);
    // The sandbox EHR: a stand-in for a vendor EHR (docs/ehr.md), in this process, with
    // its SQLite file next to the store's, and faults injected on demand.
    let sandbox = SandboxEhr::build(
        "127.0.0.1:0",
        SandboxConfig {
            database_url: serve_cmd::sandbox_database(&store_url),
            bearer_token: None,
            smart: None,
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let ehr_url = sandbox.base_url();
    // The sandbox stops after the services: a connector finishing its in-flight work on
    // shutdown must still find the EHR it is writing to (else that work is recorded as
    // a failed write-back that a live EHR would have acknowledged).
    let (stop_sandbox, mut sandbox_stopped) = watch::channel(false);
    let mut sandbox = Some(tokio::spawn(sandbox.run_until_stopped(async move {
        let _ = sandbox_stopped.changed().await;
    })));
    chartline_ehr_connector::client::install_crypto_provider();
    let http = reqwest::Client::new();
    if args.ehr_fault_rate > 0.0 {
        let faults = Faults {
            error_rate: args.ehr_fault_rate.min(0.9),
            kinds: ["500", "503", "429", "timeout", "drop"]
                .map(String::from)
                .to_vec(),
            seed: args.seed,
            timeout_ms: 400,
            retry_after_seconds: 1,
            ..Faults::default()
        };
        http.post(format!("{ehr_url}/_faults"))
            .json(&faults)
            .send()
            .await?
            .error_for_status()?;
    }
    let serve = ServeArgs {
        listen: args.listen.clone(),
        ehr_url: Some(ehr_url.clone()),
        ehr_component: Some("sandbox-ehr".into()),
        ..ServeArgs::embedded(&[TENANT])
    };
    let selected = serve.selected()?;
    let runtime = serve_cmd::connect(&serve, &store_url, &selected).await?;
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
        match send(&runtime, &tenant, &step).await {
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
    let bar = ProgressBar::new(args.encounters).with_style(ProgressStyle::with_template(
        "  encounters {bar:30} {pos}/{len} ({per_sec}, ETA {eta})",
    )?);
    while let Some(result) = runs.join_next().await {
        commands += u64::from(result??);
        bar.inc(1);
    }
    bar.finish();
    // RPM patients: a month of home readings each, through the same command path.
    let rpm = rpm_month(&runtime, &tenant, &visits, args.seed).await?;
    commands += rpm.commands;
    let drive_seconds = started.elapsed().as_secs_f64();

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
    // Let the EHR connector and the projections settle: nothing in flight to the EHR,
    // the connector's checkpoint (a low watermark: it never passes an unfinished job)
    // at the tenant's last event, and every projection at the head; or 120 s. A row
    // still `pending` then waits for its patient's identity review, not for the
    // connector.
    let read_db = chartline_projections::db::ReadDb::open(&store_url).await?;
    let settle_deadline = Instant::now() + std::time::Duration::from_secs(120);
    let connector_checkpoint = chartline_infra::checkpoint::Checkpoint::new(
        runtime.store.clone(),
        chartline_ehr_connector::reactor::REACTOR_NAME,
    );
    let mut tenant_head = 0;
    let mut previous = BTreeMap::new();
    loop {
        tenant_head = each_tenant_page(&runtime.store, &tenant, tenant_head, |_| {}).await?;
        let connector_done = connector_checkpoint.load().await? >= tenant_head;
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
        if (lag == 0 && in_flight == 0 && connector_done && states == previous)
            || Instant::now() > settle_deadline
        {
            break;
        }
        previous = states;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // The sandbox EHR stops with the services: read what it injected first.
    let injected: BTreeMap<String, u64> = http
        .get(format!("{ehr_url}/_faults"))
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?["injected"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    // With --exit the summary is the final word: stop every service first (each finishes
    // its in-flight work, such as a write-back whose EHR answer is on its way, and saves
    // its checkpoint), then bring the read models to the head once. The numbers below
    // are then exactly what the store and the read models hold when the process exits;
    // a settled log can still change behind a summary read from a running system.
    if args.exit {
        let _ = stop.send(true);
        while tasks.join_next().await.is_some() {}
        let _ = stop_sandbox.send(true);
        if let Some(sandbox) = sandbox.take() {
            let _ = sandbox.await;
        }
        chartline_projections::engine::ProjectionRunner::new(
            runtime.store.clone(),
            read_db.clone(),
        )
        .await?
        .catch_up()
        .await?;
    }

    // Everything below is read back from the store and the read models.
    let mut identity: BTreeMap<String, u64> = BTreeMap::new();
    let mut acknowledged = 0u64;
    let mut rpm_alerts = 0u64;
    let mut rpm_readings = 0u64;
    let mut tenant_events = 0u64;
    each_tenant_page(&runtime.store, &tenant, 0, |page| {
        tenant_events += page.len() as u64;
        for event in page {
            match event.event_type.as_str() {
                "IdentifierLinked" | "NewPatientConfirmed" | "MatchReviewRequested"
                    if event.metadata.actor.id == "identity-matcher" =>
                {
                    *identity.entry(event.event_type.clone()).or_default() += 1;
                }
                "WriteBackSucceeded" => acknowledged += 1,
                "ThresholdBreached" => rpm_alerts += 1,
                "ReadingsRecorded" => {
                    rpm_readings += event.data["readings"].as_array().map_or(0, Vec::len) as u64;
                }
                _ => {}
            }
        }
    })
    .await?;
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
    let rpm_billing = count_by(
        &read_db,
        "SELECT kind || ' ' || status || COALESCE(' ' || codes, ''), COUNT(*) FROM billing_queue \
         WHERE tenant = ? AND kind LIKE 'rpm%' GROUP BY 1",
        TENANT,
    )
    .await?;
    let headline =
        chartline_projections::models::integration_completeness::headline(&read_db, Some(TENANT))
            .await?;
    // Reactors keep saving their checkpoints (events on the system tenant) for a moment
    // after the work settles: report the lag once the projections have had up to 5 s to
    // apply what was appended last, as an operator would read it.
    let mut projection_lag = u64::MAX;
    let lag_deadline = Instant::now() + std::time::Duration::from_secs(5);
    while projection_lag > 0 && Instant::now() < lag_deadline {
        if projection_lag != u64::MAX {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        projection_lag = chartline_projections::engine::status(&runtime.store, &read_db)
            .await?
            .iter()
            .map(|s| s.lag_events)
            .max()
            .unwrap_or(0);
    }
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
        "  EHR faults injected     {} (retried by the connector: {})",
        injected.values().sum::<u64>(),
        fmt_counts(&injected)
    );
    println!(
        "  RPM                     {} patients enrolled, {rpm_readings} readings, {rpm_alerts} threshold alerts",
        rpm.enrolled
    );
    println!("  RPM billing             {}", fmt_counts(&rpm_billing));
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
            "ehr_faults_injected": injected,
            "rpm_enrolled": rpm.enrolled,
            "rpm_readings": rpm_readings,
            "rpm_alerts": rpm_alerts,
            "rpm_billing": rpm_billing,
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
    let _ = stop_sandbox.send(true);
    if let Some(sandbox) = sandbox.take() {
        let _ = sandbox.await;
    }
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

/// Hands the tenant's events after `after` to `visit`, a page at a time; returns the
/// last position read (`after` when there was nothing new).
async fn each_tenant_page(
    store: &impl EventStore,
    tenant: &TenantId,
    mut after: u64,
    mut visit: impl FnMut(&[chartline_proto::EventEnvelope]),
) -> anyhow::Result<u64> {
    loop {
        let page = store
            .read_all(&ReadScope::Tenant(tenant.clone()), after, 5_000)
            .await?;
        let Some(last) = page.last() else {
            return Ok(after);
        };
        after = last.global_position;
        visit(&page);
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

struct RpmMonth {
    enrolled: u64,
    commands: u64,
}

/// Every 8th completed visit's patient is on remote monitoring: enrolled on 1 February
/// with a blood-pressure alert band, one cuff reading (systolic + diastolic) a day on 1,
/// 9 or 16–25 days of the 30-day device period (so 99454, 99445 and a held period all
/// appear), management time logged for half of them. The readings of a month arrive in
/// one burst, as from a device syncing its backlog. Deterministic ids: re-running the
/// day is a retry.
async fn rpm_month(
    runtime: &serve_cmd::Runtime,
    tenant: &TenantId,
    visits: &[(Visit, Fate)],
    seed: u64,
) -> anyhow::Result<RpmMonth> {
    let patients: Vec<uuid::Uuid> = visits
        .iter()
        .enumerate()
        .filter(|(index, (_, fate))| *fate == Fate::Completed && index % 8 == 3 && index % 15 != 14)
        .map(|(_, (visit, _))| visit.patient_id)
        .collect();
    let period_start = Utc
        .with_ymd_and_hms(2026, 2, 1, 12, 0, 0)
        .single()
        .context("RPM period")?;
    let coordinator = Actor::new(ActorKind::Staff, "rpm-coordinator");
    let mut commands = 0u64;
    for (k, patient) in patients.iter().enumerate() {
        let (own, _) = patient.as_u64_pair();
        let enrollment = uuid::Uuid::from_u64_pair(own, 0x52504D);
        let device = format!("cuff-{:04}", own % 10_000);
        let device_actor = Actor::new(ActorKind::Device, device.clone());
        let mut steps = vec![scenario::Step {
            service: "rpm",
            command: "enroll",
            actor: coordinator.clone(),
            payload: json!({
                "enrollment_id": enrollment, "patient_id": patient, "device_id": device,
                "period_start": "2026-02-01", "time_zone": "America/Chicago",
                "thresholds": [{"code": "8480-6", "low": 90.0, "high": 160.0}],
                "at": period_start.to_rfc3339(),
            }),
            command_id: uuid::Uuid::from_u64_pair(own, 0x5250_4D01),
        }];
        // Days with readings decide the device-supply code: ≥ 16 → 99454; 2–15 → 99445
        // (CY 2026); a single day → held.
        let days = match k % 4 {
            3 => 1,
            2 => 9,
            _ => 16 + (k as u64 % 10),
        };
        for day in 0..days {
            let taken =
                period_start + chrono::Duration::days(day as i64) + chrono::Duration::hours(2);
            let noise = (own ^ seed ^ day.wrapping_mul(0x9E37)) % 40;
            // About one reading in twelve is out of band (an alert).
            let systolic = if noise % 12 == 5 {
                168.0
            } else {
                112.0 + noise as f64
            };
            let reading = |code: &str, value: f64| {
                json!({"code": code, "value": value, "unit": "mm[Hg]",
                       "effective_at": taken.to_rfc3339(), "device_id": device})
            };
            steps.push(scenario::Step {
                service: "rpm",
                command: "record_readings",
                actor: device_actor.clone(),
                payload: json!({
                    "enrollment_id": enrollment,
                    "batch_id": uuid::Uuid::from_u64_pair(own, 0x5250_0000 + day),
                    "readings": [reading("8480-6", systolic), reading("8462-4", 72.0 + (noise % 14) as f64)],
                    "at": (taken + chrono::Duration::minutes(5)).to_rfc3339(),
                }),
                command_id: uuid::Uuid::from_u64_pair(own, 0x5250_1000 + day),
            });
        }
        if k % 2 == 0 {
            steps.push(scenario::Step {
                service: "rpm",
                command: "log_management_time",
                actor: Actor::new(ActorKind::Clinician, "dr-synthetic-1"),
                payload: json!({
                    "enrollment_id": enrollment, "clinician_id": "dr-synthetic-1",
                    "minutes": 24, "interactive_communication": true,
                    "at": (period_start + chrono::Duration::days(27)).to_rfc3339(),
                }),
                command_id: uuid::Uuid::from_u64_pair(own, 0x5250_2000),
            });
        }
        for step in &steps {
            match send(runtime, tenant, step).await {
                CommandReply::Accepted { .. } => commands += 1,
                CommandReply::Rejected { code, message } => {
                    anyhow::bail!("rpm {} rejected ({code:?}): {message}", step.command)
                }
            }
        }
    }
    Ok(RpmMonth {
        enrolled: patients.len() as u64,
        commands,
    })
}

/// Sends a command as a careful client does: a `conflict` (writers kept racing on the
/// stream) or `unavailable` reply is retried with the same command id, so a retry can
/// never apply twice.
async fn send(
    runtime: &serve_cmd::Runtime,
    tenant: &TenantId,
    step: &scenario::Step,
) -> CommandReply {
    let mut delay = std::time::Duration::from_millis(20);
    let mut attempt = 0;
    loop {
        let reply = scenario::send(&runtime.bus, &runtime.root, tenant, step).await;
        attempt += 1;
        match &reply {
            CommandReply::Rejected {
                code: RejectionCode::Conflict | RejectionCode::Unavailable,
                ..
            } if attempt < 8 => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            _ => return reply,
        }
    }
}
