//! `chartline bench ehr`: EHR write-back against the sandbox EHR on loopback (issue 8,
//! "Performance"). Two runs, each on a fresh embedded deployment (SQLite store,
//! in-process bus, every service) and a fresh sandbox:
//!
//! - **catch-up**: `--encounters` visits are driven through the command path with no
//!   connector running, then the connector starts from checkpoint 0 and the clock runs
//!   until every due artifact of every encounter has its outcome event ("fully
//!   acknowledged"). Target ≥ 200 encounters/s.
//! - **live**: the connector runs while `--live-encounters` visits are driven (25 at a
//!   time); per encounter, the store `recorded_at` of `NoteSigned` to that of the
//!   DocumentReference `WriteBackSucceeded` after it. Target p99 < 500 ms.
//!
//! Both runs check that the sandbox saw no duplicate and that nothing failed.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chartline::scenario::{self, Visit};
use chartline::serve_cmd::{self, Runtime, ServeArgs};
use chartline_domain::encounter::EncounterEvent;
use chartline_ehr_connector::fhir::{EncounterRecord, artifact_made_due, due_artifacts};
use chartline_ehr_connector::{
    Auth, Connector, EhrEndpoint, FhirClient, SandboxConfig, SandboxEhr,
};
use chartline_infra::store::read_whole_stream;
use chartline_proto::codec::decode;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, StreamId, TenantId};
use chrono::{TimeZone, Utc};
use clap::Args;
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

use crate::bench_commands::{figure, report};

#[derive(Args)]
pub struct EhrBenchArgs {
    /// Encounters queued before the connector starts (catch-up throughput run; large
    /// enough that the run lasts seconds, not the connector's first second).
    #[arg(long, default_value_t = 1000)]
    encounters: u64,
    /// Encounters driven while the connector runs (latency run).
    #[arg(long, default_value_t = 100)]
    live_encounters: u64,
    /// Connector concurrency (jobs in flight); default: what `serve` uses.
    #[arg(long, default_value_t = chartline_ehr_connector::reactor::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/ehr.json")]
    out: String,
}

const TENANT: &str = "bench";

fn tenant() -> TenantId {
    TenantId::parse(TENANT).expect("tenant id")
}

struct Stand {
    runtime: Runtime,
    sandbox_url: String,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<(String, anyhow::Result<()>)>,
    dir: std::path::PathBuf,
    http: reqwest::Client,
}

fn stop_future(receiver: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut receiver = receiver.clone();
    async move {
        while !*receiver.borrow() {
            if receiver.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Stand {
    async fn start() -> anyhow::Result<Stand> {
        chartline_ehr_connector::client::install_crypto_provider();
        let dir =
            std::env::temp_dir().join(format!("chartline_ehr_bench_{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut args = ServeArgs::embedded(&[TENANT]);
        args.only = [
            "scheduling",
            "consultation",
            "documentation",
            "billing",
            "identity",
            "rpm",
        ]
        .map(String::from)
        .to_vec();
        let selected = args.selected()?;
        let url = format!("sqlite://{}/events.db", dir.display());
        let runtime = serve_cmd::connect(&args, &url, &selected).await?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = serve_cmd::start(&args, &runtime, &selected, &stopped).await?;
        let sandbox = SandboxEhr::build(
            "127.0.0.1:0",
            SandboxConfig {
                database_url: format!("sqlite://{}/sandbox.db", dir.display()),
                bearer_token: None,
                smart: None,
            },
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let sandbox_url = sandbox.base_url();
        let shutdown = stop_future(&stopped);
        tasks.spawn(async move {
            let result = sandbox.run_until_stopped(shutdown).await;
            ("sandbox".to_string(), result.map_err(anyhow::Error::from))
        });
        Ok(Stand {
            runtime,
            sandbox_url,
            stop,
            tasks,
            dir,
            http: reqwest::Client::new(),
        })
    }

    fn connector(&self, name: &str) -> anyhow::Result<Connector<chartline_infra::AnyStore>> {
        let client = FhirClient::new(EhrEndpoint {
            base_url: self.sandbox_url.clone(),
            auth: Auth::None,
            timeout: Duration::from_secs(10),
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Connector::named(self.runtime.store.clone(), client, name))
    }

    fn run_connector(
        &self,
        connector: Connector<chartline_infra::AnyStore>,
        concurrency: usize,
    ) -> (
        watch::Sender<bool>,
        tokio::task::JoinHandle<Result<(), String>>,
    ) {
        let (stop, stopped) = watch::channel(false);
        let wake = self.runtime.store.head_watch();
        let handle = tokio::spawn(connector.run(wake, concurrency, stop_future(&stopped)));
        (stop, handle)
    }

    async fn send(&self, step: &scenario::Step) -> anyhow::Result<()> {
        let reply = scenario::send(&self.runtime.bus, &self.runtime.root, &tenant(), step).await;
        anyhow::ensure!(
            matches!(reply, CommandReply::Accepted { .. }),
            "{}: {reply:?}",
            step.command
        );
        Ok(())
    }

    async fn register_patient(&self, patient_id: Uuid) -> anyhow::Result<()> {
        let desk = Actor::new(ActorKind::Staff, "registration-desk");
        let mut id = *patient_id.as_bytes();
        id[0] ^= 0x5A;
        self.send(&scenario::Step {
            service: "identity",
            command: "register",
            actor: desk.clone(),
            payload: json!({
                "patient_id": patient_id,
                "demographics": {
                    "given_name": "Synthetic",
                    "family_name": format!("Patient{}", &patient_id.simple().to_string()[..6]),
                    "birth_date": "1961-04-12", "sex": "female",
                },
                "at": "2026-01-05T10:00:00Z",
            }),
            command_id: Uuid::from_bytes(id),
        })
        .await?;
        id[1] ^= 0x5A;
        self.send(&scenario::Step {
            service: "identity",
            command: "confirm_new_patient",
            actor: desk,
            payload: json!({"patient_id": patient_id, "at": "2026-01-05T10:01:00Z"}),
            command_id: Uuid::from_bytes(id),
        })
        .await
    }

    async fn history(
        &self,
        encounter_id: Uuid,
    ) -> anyhow::Result<Vec<chartline_proto::EventEnvelope>> {
        let stream = StreamId::for_aggregate("encounter", encounter_id);
        Ok(read_whole_stream(&self.runtime.store, &tenant(), &stream).await?)
    }

    /// Drives one visit through the command path until its follow-up task exists.
    async fn run_visit(&self, visit: &Visit) -> anyhow::Result<()> {
        self.register_patient(visit.patient_id).await?;
        for step in scenario::steps_until_signed(visit) {
            self.send(&step).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let history = self.history(visit.encounter_id).await?;
            if history.iter().any(|e| e.event_type == "CodesAssigned") {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: never coded",
                visit.encounter_id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for step in scenario::steps_after_coding(visit) {
            self.send(&step).await?;
        }
        Ok(())
    }

    async fn run_visits(&self, visits: &[Visit]) -> anyhow::Result<()> {
        for chunk in visits.chunks(25) {
            for result in futures::future::join_all(chunk.iter().map(|v| self.run_visit(v))).await {
                result?;
            }
        }
        Ok(())
    }

    /// `Some(failed)` when every due artifact has an outcome after its last due-making
    /// event (`failed` = how many of those are failures); `None` while one is missing.
    async fn settled(&self, encounter_id: Uuid) -> anyhow::Result<Option<usize>> {
        let history = self.history(encounter_id).await?;
        let events: Vec<EncounterEvent> = history
            .iter()
            .map(decode)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let record = EncounterRecord::from_events(TENANT, &events);
        let mut failed = 0;
        for artifact in due_artifacts(&record.state) {
            let mut outcome = None;
            for event in &events {
                if artifact_made_due(event).as_ref() == Some(&artifact) {
                    outcome = None;
                }
                match event {
                    EncounterEvent::WriteBackSucceeded(e) if e.artifact == artifact => {
                        outcome = Some(true);
                    }
                    EncounterEvent::WriteBackFailed(e) if e.artifact == artifact => {
                        outcome = Some(false);
                    }
                    _ => {}
                }
            }
            match outcome {
                None => return Ok(None),
                Some(false) => failed += 1,
                Some(true) => {}
            }
        }
        Ok(Some(failed))
    }

    /// Waits until every encounter is settled; returns the number of failed artifacts.
    async fn wait_settled(&self, encounters: &[Uuid], limit: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + limit;
        let mut pending: BTreeSet<Uuid> = encounters.iter().copied().collect();
        let mut failed = 0;
        loop {
            let mut done = Vec::new();
            for encounter in &pending {
                match self.settled(*encounter).await? {
                    Some(count) => {
                        failed += count;
                        done.push(*encounter);
                    }
                    // Encounters settle roughly in order: stop at the first open one.
                    None => break,
                }
            }
            for encounter in done {
                pending.remove(&encounter);
            }
            if pending.is_empty() {
                return Ok(failed);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} encounters not settled within {limit:?}",
                pending.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn sandbox_stats(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/_stats", self.sandbox_url))
            .send()
            .await?
            .json()
            .await?)
    }

    async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn visits(from: u64, count: u64) -> Vec<Visit> {
    let day = Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap();
    (from..from + count)
        .map(|index| scenario::synthetic_visit(17, index, day))
        .collect()
}

struct CatchUp {
    encounters_per_second: f64,
    seconds: f64,
    failed: usize,
    duplicates: Value,
    requests: Value,
}

async fn catch_up(args: &EhrBenchArgs) -> anyhow::Result<CatchUp> {
    let stand = Stand::start().await?;
    let visits = visits(10_000, args.encounters);
    stand
        .run_visits(&visits)
        .await
        .context("driving the visits")?;
    let encounters: Vec<Uuid> = visits.iter().map(|v| v.encounter_id).collect();
    let started = Instant::now();
    let (stop, handle) =
        stand.run_connector(stand.connector("ehr-bench-catch-up")?, args.concurrency);
    let failed = stand
        .wait_settled(&encounters, Duration::from_secs(600))
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    handle.await?.map_err(anyhow::Error::msg)?;
    let failed = failed?;
    let stats = stand.sandbox_stats().await?;
    stand.shutdown().await;
    Ok(CatchUp {
        encounters_per_second: encounters.len() as f64 / seconds,
        seconds,
        failed,
        duplicates: stats["duplicates"].clone(),
        requests: stats,
    })
}

struct Live {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    failed: usize,
    duplicates: Value,
}

async fn live(args: &EhrBenchArgs) -> anyhow::Result<Live> {
    let stand = Stand::start().await?;
    let (stop, handle) = stand.run_connector(stand.connector("ehr-bench-live")?, args.concurrency);
    let visits = visits(20_000, args.live_encounters);
    stand
        .run_visits(&visits)
        .await
        .context("driving the visits")?;
    let encounters: Vec<Uuid> = visits.iter().map(|v| v.encounter_id).collect();
    let failed = stand
        .wait_settled(&encounters, Duration::from_secs(600))
        .await?;
    let _ = stop.send(true);
    handle.await?.map_err(anyhow::Error::msg)?;
    let mut latencies = Vec::new();
    for encounter in &encounters {
        let history = stand.history(*encounter).await?;
        let signed = history
            .iter()
            .find(|e| e.event_type == "NoteSigned")
            .context("no NoteSigned")?;
        let acknowledged = history
            .iter()
            .filter(|e| e.stream_version > signed.stream_version)
            .find(|e| {
                e.event_type == "WriteBackSucceeded"
                    && e.data["artifact"]["resource"] == "document_reference"
            })
            .with_context(|| {
                format!("{encounter}: no DocumentReference outcome after NoteSigned")
            })?;
        latencies.push(Duration::from_millis(
            (acknowledged.recorded_at - signed.recorded_at)
                .num_milliseconds()
                .max(0) as u64,
        ));
    }
    latencies.sort_unstable();
    let stats = stand.sandbox_stats().await?;
    stand.shutdown().await;
    Ok(Live {
        p50_ms: crate::bench_commands::percentile(&latencies, 0.50),
        p99_ms: crate::bench_commands::percentile(&latencies, 0.99),
        max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1_000.0),
        failed,
        duplicates: stats["duplicates"].clone(),
    })
}

pub async fn run(args: EhrBenchArgs) -> anyhow::Result<ExitCode> {
    let catch_up = catch_up(&args).await.context("catch-up run")?;
    eprintln!("catch-up: sandbox {}", catch_up.requests);
    let live = live(&args).await.context("live run")?;
    let clean = |duplicates: &Value| duplicates.as_array().is_some_and(Vec::is_empty);
    let figures = vec![
        figure(
            "catch_up.encounters_per_second",
            &format!(
                "encounters fully acknowledged per second, connector started on {} queued encounters ({} jobs in flight)",
                args.encounters, args.concurrency
            ),
            catch_up.encounters_per_second,
            "encounters/s",
            Some((">=", 200.0)),
        ),
        figure(
            "catch_up.seconds",
            "connector start to the last outcome event",
            catch_up.seconds,
            "s",
            None,
        ),
        figure(
            "catch_up.failed_artifacts",
            "artifacts recorded as failed (no faults injected)",
            catch_up.failed as f64,
            "artifacts",
            Some(("<", 1.0)),
        ),
        figure(
            "live.note_signed_to_document_reference.p50",
            &format!(
                "NoteSigned -> DocumentReference WriteBackSucceeded (store recorded_at), connector live, {} encounters driven 25 at a time",
                args.live_encounters
            ),
            live.p50_ms,
            "ms",
            None,
        ),
        figure(
            "live.note_signed_to_document_reference.p99",
            "as above, p99",
            live.p99_ms,
            "ms",
            Some(("<", 500.0)),
        ),
        figure(
            "live.note_signed_to_document_reference.max",
            "as above, maximum",
            live.max_ms,
            "ms",
            None,
        ),
        figure(
            "live.failed_artifacts",
            "artifacts recorded as failed (no faults injected)",
            live.failed as f64,
            "artifacts",
            Some(("<", 1.0)),
        ),
        figure(
            "sandbox.duplicates",
            "resources the sandbox holds more than once for one identifier (both runs)",
            (!clean(&catch_up.duplicates)) as u8 as f64 + (!clean(&live.duplicates)) as u8 as f64,
            "runs with duplicates",
            Some(("<", 1.0)),
        ),
    ];
    report("ehr", &figures, &args.out)?;
    Ok(ExitCode::SUCCESS)
}
