//! The connector against the sandbox EHR over real HTTP on loopback, with the embedded
//! deployment (SQLite store, in-process bus, every service) driving encounters through
//! the command path.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chartline::scenario::{self, Visit};
use chartline::serve_cmd::{self, Runtime, ServeArgs};
use chartline_domain::encounter::{EncounterEvent, WriteBackArtifact};
use chartline_ehr_connector::client::RetryPolicy;
use chartline_ehr_connector::fhir::{
    BusinessKey, EncounterRecord, artifact_made_due, artifact_name, due_artifacts, resources_for,
};
use chartline_ehr_connector::{
    Auth, Connector, EhrEndpoint, FhirClient, Job, JobOutcome, SandboxConfig, SandboxEhr, Secret,
};
use chartline_infra::store::read_whole_stream;
use chartline_infra::{AnyStore, EventStore};
use chartline_proto::codec::decode;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, StreamId, TenantId};
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

pub fn tenant() -> TenantId {
    TenantId::parse("clinic-a").unwrap()
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

pub struct Harness {
    pub runtime: Runtime,
    pub sandbox_url: String,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    tasks: tokio::task::JoinSet<(String, anyhow::Result<()>)>,
    dir: std::path::PathBuf,
    http: reqwest::Client,
}

pub struct RunningConnector {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Result<(), String>>,
}

impl RunningConnector {
    /// Graceful stop (drains in-flight jobs, saves the checkpoint).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.handle.await.unwrap().unwrap();
    }

    /// A crash: the task is dropped mid-flight; the checkpoint lags what was done.
    pub fn kill(self) {
        self.handle.abort();
    }
}

impl Harness {
    pub async fn start(token: Option<&str>) -> Harness {
        chartline_ehr_connector::client::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("chartline_ehr_{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = ServeArgs::embedded(&["clinic-a"]);
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
        let selected = args.selected().unwrap();
        let url = format!("sqlite://{}/events.db", dir.display());
        let runtime = serve_cmd::connect(&args, &url, &selected).await.unwrap();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = serve_cmd::start(&args, &runtime, &selected, &stopped)
            .await
            .unwrap();
        let sandbox = SandboxEhr::build(
            "127.0.0.1:0",
            SandboxConfig {
                database_url: format!("sqlite://{}/sandbox.db", dir.display()),
                bearer_token: token.map(str::to_string),
                smart: None,
            },
        )
        .await
        .unwrap();
        let sandbox_url = sandbox.base_url();
        let shutdown = stop_future(&stopped);
        tasks.spawn(async move {
            let result = sandbox.run_until_stopped(shutdown).await;
            ("sandbox".to_string(), result.map_err(anyhow::Error::from))
        });
        Harness {
            runtime,
            sandbox_url,
            stop,
            stopped,
            tasks,
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn client(&self, token: Option<&str>, fast: bool) -> FhirClient {
        let client = FhirClient::new(EhrEndpoint {
            base_url: self.sandbox_url.clone(),
            auth: token.map_or(Auth::None, |token| Auth::Bearer(Secret::new(token))),
            timeout: Duration::from_millis(if fast { 1_000 } else { 10_000 }),
        })
        .unwrap();
        if fast {
            client.with_retry(RetryPolicy {
                max_attempts: 12,
                base_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(800),
                max_retry_after: Duration::from_secs(2),
            })
        } else {
            client
        }
    }

    pub fn connector(&self, client: FhirClient, name: &str) -> Connector<AnyStore> {
        Connector::named(self.runtime.store.clone(), client, name)
    }

    pub fn run_connector(&self, connector: Connector<AnyStore>) -> RunningConnector {
        let (stop, stopped) = watch::channel(false);
        let wake = self.runtime.store.head_watch();
        let shutdown = stop_future(&stopped);
        let handle = tokio::spawn(connector.run(wake, 32, shutdown));
        RunningConnector { stop, handle }
    }

    pub async fn set_faults(&self, faults: Value) {
        let response = self
            .http
            .post(format!("{}/_faults", self.sandbox_url))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }

    pub async fn sandbox_stats(&self) -> Value {
        self.http
            .get(format!("{}/_stats", self.sandbox_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn send(&self, service: &'static str, command: &'static str, payload: Value) {
        let step = scenario::Step {
            service,
            command,
            actor: Actor::new(ActorKind::Staff, "registration-desk"),
            payload,
            command_id: Uuid::now_v7(),
        };
        let reply = scenario::send(&self.runtime.bus, &self.runtime.root, &tenant(), &step).await;
        assert!(
            matches!(reply, CommandReply::Accepted { .. }),
            "{command}: {reply:?}"
        );
    }

    pub async fn register_patient(&self, patient_id: Uuid, confirm: bool) {
        self.send(
            "identity",
            "register",
            json!({
                "patient_id": patient_id,
                "demographics": {
                    "given_name": "Synthetic", "family_name": format!("Patient{}", &patient_id.simple().to_string()[..6]),
                    "birth_date": "1961-04-12", "sex": "female",
                },
                "at": "2026-01-05T10:00:00Z",
            }),
        )
        .await;
        if confirm {
            self.send(
                "identity",
                "confirm_new_patient",
                json!({"patient_id": patient_id, "at": "2026-01-05T10:01:00Z"}),
            )
            .await;
        }
    }

    /// Runs a visit through the command path until its follow-up task exists.
    pub async fn run_visit(&self, visit: &Visit) {
        for step in scenario::steps_until_signed(visit) {
            let reply =
                scenario::send(&self.runtime.bus, &self.runtime.root, &tenant(), &step).await;
            assert!(
                matches!(reply, CommandReply::Accepted { .. }),
                "{}: {reply:?}",
                step.command
            );
        }
        let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
        wait_until(Duration::from_secs(60), || async {
            read_whole_stream(&self.runtime.store, &tenant(), &stream)
                .await
                .unwrap()
                .iter()
                .any(|e| e.event_type == "CodesAssigned")
        })
        .await;
        for step in scenario::steps_after_coding(visit) {
            let reply =
                scenario::send(&self.runtime.bus, &self.runtime.root, &tenant(), &step).await;
            assert!(
                matches!(reply, CommandReply::Accepted { .. }),
                "{}: {reply:?}",
                step.command
            );
        }
    }

    /// Per due artifact: the last outcome after its last due-making event, if any.
    pub async fn settled(&self, encounter_id: Uuid) -> BTreeMap<String, Option<Value>> {
        let stream = StreamId::for_aggregate("encounter", encounter_id);
        let history = read_whole_stream(&self.runtime.store, &tenant(), &stream)
            .await
            .unwrap();
        let events: Vec<EncounterEvent> = history.iter().map(|e| decode(e).unwrap()).collect();
        let record = EncounterRecord::from_events("clinic-a", &events);
        let mut result = BTreeMap::new();
        for artifact in due_artifacts(&record.state) {
            let mut due = 0;
            let mut outcome = None;
            for (envelope, event) in history.iter().zip(&events) {
                if artifact_made_due(event).as_ref() == Some(&artifact) {
                    due = envelope.stream_version;
                    outcome = None;
                }
                match event {
                    EncounterEvent::WriteBackSucceeded(e) if e.artifact == artifact => {
                        outcome = (envelope.stream_version > due).then(|| envelope.data.clone());
                    }
                    EncounterEvent::WriteBackFailed(e) if e.artifact == artifact => {
                        outcome = (envelope.stream_version > due).then(|| envelope.data.clone());
                    }
                    _ => {}
                }
            }
            result.insert(artifact_name(&artifact), outcome);
        }
        result
    }

    pub async fn all_settled(&self, encounters: &[Uuid]) -> bool {
        for encounter in encounters {
            if self.settled(*encounter).await.values().any(Option::is_none) {
                return false;
            }
        }
        true
    }

    /// Business keys of every resource an encounter's artifacts map to.
    pub async fn keys(&self, encounter_id: Uuid) -> Vec<BusinessKey> {
        let stream = StreamId::for_aggregate("encounter", encounter_id);
        let history = read_whole_stream(&self.runtime.store, &tenant(), &stream)
            .await
            .unwrap();
        let events: Vec<EncounterEvent> = history.iter().map(|e| decode(e).unwrap()).collect();
        let record = EncounterRecord::from_events("clinic-a", &events);
        due_artifacts(&record.state)
            .iter()
            .flat_map(|a| resources_for(&record, a))
            .map(|r| BusinessKey::of(&r).unwrap())
            .collect()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        drop(self.stopped);
        while let Some(done) = self.tasks.join_next().await {
            let (name, result) = done.unwrap();
            assert!(result.is_ok(), "{name} failed: {:?}", result.err());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn wait_until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached within {limit:?}");
}

fn visit(index: u64) -> Visit {
    let day = Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap();
    scenario::synthetic_visit(11, index, day)
}

async fn count_encounter_events(store: &AnyStore, encounters: &[Uuid]) -> usize {
    let mut total = 0;
    for encounter in encounters {
        let stream = StreamId::for_aggregate("encounter", *encounter);
        total += read_whole_stream(store, &tenant(), &stream)
            .await
            .unwrap()
            .len();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_30_percent_faults_200_encounters_end_acknowledged_or_dead_with_zero_duplicates() {
    let app = Harness::start(None).await;
    app.set_faults(json!({
        "error_rate": 0.3, "kinds": ["500", "503", "429", "timeout", "drop"], "seed": 7,
        "timeout_ms": 1500, "retry_after_seconds": 1,
    }))
    .await;
    let mut connector =
        Some(app.run_connector(app.connector(app.client(None, true), "ehr-fault-test")));
    let visits: Vec<Visit> = (0..200).map(visit).collect();
    let encounters: Vec<Uuid> = visits.iter().map(|v| v.encounter_id).collect();
    for (chunk_index, chunk) in visits.chunks(25).enumerate() {
        futures::future::join_all(chunk.iter().map(|v| async {
            app.register_patient(v.patient_id, true).await;
            app.run_visit(v).await;
        }))
        .await;
        if chunk_index == 3 {
            // Crash the connector mid-run (jobs in flight, checkpoint behind) and start
            // another one from its checkpoint.
            connector.take().expect("running").kill();
            connector =
                Some(app.run_connector(app.connector(app.client(None, true), "ehr-fault-test")));
        }
    }
    let running = connector.expect("the restarted connector");
    wait_until(Duration::from_secs(240), || app.all_settled(&encounters)).await;
    let mut acknowledged = 0;
    let mut dead = 0;
    for encounter in &encounters {
        for (artifact, outcome) in app.settled(*encounter).await {
            let outcome = outcome.unwrap();
            if outcome.get("ehr_resource_id").is_some() {
                acknowledged += 1;
            } else {
                dead += 1;
                assert!(
                    !outcome["message"].as_str().unwrap_or_default().is_empty(),
                    "{artifact}: dead without a reason: {outcome}"
                );
            }
        }
    }
    running.stop().await;
    let stats = app.sandbox_stats().await;
    assert_eq!(stats["duplicates"], json!([]), "{stats:#}");
    let faults: Value = app
        .http
        .get(format!("{}/_faults", app.sandbox_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let injected: u64 = faults["injected"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(injected > 100, "faults were not injected: {faults}");
    eprintln!("injected faults: {}", faults["injected"]);
    // Spot-check by identifier search: exactly one resource per business key.
    let checker = app.client(None, false);
    app.set_faults(json!({})).await;
    for encounter in encounters.iter().step_by(20) {
        for key in app.keys(*encounter).await {
            let found = checker.search(&key).await.unwrap();
            assert!(found.len() <= 1, "{key:?}: {} resources", found.len());
        }
    }
    eprintln!(
        "fault run: {acknowledged} artifacts acknowledged, {dead} dead with a reason; sandbox {stats}"
    );
    assert!(acknowledged > 0);

    // Re-run from checkpoint 0 (a fresh checkpoint name): nothing new is sent or recorded.
    let events_before = count_encounter_events(&app.runtime.store, &encounters).await;
    let versions_before = stats["versions"].clone();
    let replay = app.run_connector(app.connector(app.client(None, false), "ehr-replay-from-zero"));
    let head = app.runtime.store.head_position().await.unwrap();
    wait_until(Duration::from_secs(120), || async {
        chartline_infra::checkpoint::Checkpoint::new(
            app.runtime.store.clone(),
            "ehr-replay-from-zero",
        )
        .load()
        .await
        .unwrap()
            >= head.saturating_sub(250)
    })
    .await;
    replay.stop().await;
    assert_eq!(
        count_encounter_events(&app.runtime.store, &encounters).await,
        events_before,
        "a replay from 0 recorded something new"
    );
    let after = app.sandbox_stats().await;
    assert_eq!(after["duplicates"], json!([]));
    assert_eq!(
        after["versions"], versions_before,
        "a replay from 0 wrote to the EHR"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_in_review_gets_nothing_sent_and_after_resolution_everything_once() {
    let app = Harness::start(None).await;
    let running = app.run_connector(app.connector(app.client(None, false), "ehr-review-test"));
    let visit = visit(1_000);
    app.register_patient(visit.patient_id, false).await;
    app.send(
        "identity",
        "request_match_review",
        json!({
            "patient_id": visit.patient_id,
            "candidates": [{"candidate_patient_id": Uuid::now_v7(), "identifier": null, "score": 0.71, "grade": "probable"}],
            "at": "2026-01-05T10:02:00Z",
        }),
    )
    .await;
    app.run_visit(&visit).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = app.sandbox_stats().await;
    assert_eq!(
        stats["resources"],
        json!({}),
        "sent while in review: {stats}"
    );
    let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
    let events = read_whole_stream(&app.runtime.store, &tenant(), &stream)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .all(|e| !e.event_type.starts_with("WriteBack")),
        "recorded a write-back while in review"
    );
    app.send(
        "identity",
        "resolve_match",
        json!({
            "patient_id": visit.patient_id,
            "resolution": {"resolution": "not_a_match"},
            "reviewer_id": "reviewer-1",
            "at": "2026-03-10T09:00:00Z",
        }),
    )
    .await;
    wait_until(Duration::from_secs(60), || {
        app.all_settled(std::slice::from_ref(&visit.encounter_id))
    })
    .await;
    let settled = app.settled(visit.encounter_id).await;
    assert!(
        settled
            .values()
            .all(|o| o.as_ref().unwrap().get("ehr_resource_id").is_some()),
        "{settled:?}"
    );
    let checker = app.client(None, false);
    for key in app.keys(visit.encounter_id).await {
        assert_eq!(checker.search(&key).await.unwrap().len(), 1, "{key:?}");
    }
    running.stop().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_of_one_key_are_serialized_where_the_server_races() {
    let app = Harness::start(None).await;
    app.set_faults(json!({"race": true})).await;
    // The sandbox really races: unserialized conditional creates make duplicates.
    let raw = reqwest::Client::new();
    let resource = json!({"resourceType": "Task", "status": "requested", "intent": "order",
        "identifier": [{"system": "urn:chartline:clinic-a:task", "value": "race-control"}]});
    let creates = (0..6).map(|_| {
        raw.post(format!("{}/Task", app.sandbox_url))
            .header(
                "If-None-Exist",
                "identifier=urn:chartline:clinic-a:task|race-control",
            )
            .body(resource.to_string())
            .send()
    });
    for response in futures::future::join_all(creates).await {
        assert!(response.unwrap().status().is_success());
    }
    let stats = app.sandbox_stats().await;
    assert_eq!(stats["duplicates"].as_array().unwrap().len(), 1, "{stats}");

    // The connector serializes per business key: the same job 8 times at once → one resource.
    let visit = visit(2_000);
    app.register_patient(visit.patient_id, true).await;
    app.run_visit(&visit).await;
    let connector = app.connector(app.client(None, false), "ehr-race-test");
    let job = Job {
        tenant: tenant(),
        stream: StreamId::for_aggregate("encounter", visit.encounter_id),
        artifact: WriteBackArtifact::DocumentReference,
        replay: None,
    };
    let outcomes = futures::future::join_all((0..8).map(|i| {
        let (connector, mut job) = (connector.clone(), job.clone());
        job.replay = (i % 2 == 1).then(chartline_ehr_connector::Replay::fresh); // half of them force a fresh write
        async move { connector.process(&job).await }
    }))
    .await;
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, JobOutcome::Acknowledged { .. })),
        "{outcomes:?}"
    );
    let stats = app.sandbox_stats().await;
    assert_eq!(
        stats["duplicates"].as_array().unwrap().len(),
        1,
        "only the raw control may have duplicates: {stats}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_is_dead_with_its_reason_and_replayable_after_the_fix() {
    let app = Harness::start(Some("sandbox-secret")).await;
    let visit = visit(3_000);
    app.register_patient(visit.patient_id, true).await;
    app.run_visit(&visit).await;
    // Misconfigured: no token → 401 → dead (not retryable), with the server's reason.
    let wrong = app.connector(app.client(None, false), "ehr-dead-test");
    let job = Job {
        tenant: tenant(),
        stream: StreamId::for_aggregate("encounter", visit.encounter_id),
        artifact: WriteBackArtifact::Appointment,
        replay: None,
    };
    match wrong.process(&job).await {
        JobOutcome::Failed {
            status: Some(401),
            message,
            retryable: false,
        } => assert!(message.contains("bearer token"), "{message}"),
        other => panic!("expected a dead 401, got {other:?}"),
    }
    assert_eq!(
        wrong
            .client()
            .stats
            .retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Dead stays dead on redelivery…
    assert_eq!(wrong.process(&job).await, JobOutcome::UpToDate);
    // …until replayed after the fix (the static bearer token).
    let fixed = app.connector(app.client(Some("sandbox-secret"), false), "ehr-dead-test");
    let outcome = fixed
        .retry_write_back(
            &tenant(),
            visit.encounter_id,
            WriteBackArtifact::Appointment,
        )
        .await;
    assert!(
        matches!(outcome, JobOutcome::Acknowledged { .. }),
        "{outcome:?}"
    );
    let settled = app.settled(visit.encounter_id).await;
    assert!(
        settled["appointment"]
            .as_ref()
            .unwrap()
            .get("ehr_resource_id")
            .is_some()
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_back_throughput_against_the_sandbox() {
    let app = Harness::start(None).await;
    let visits: Vec<Visit> = (5_000..5_100).map(visit).collect();
    for chunk in visits.chunks(25) {
        futures::future::join_all(chunk.iter().map(|v| async {
            app.register_patient(v.patient_id, true).await;
            app.run_visit(v).await;
        }))
        .await;
    }
    let encounters: Vec<Uuid> = visits.iter().map(|v| v.encounter_id).collect();
    let started = Instant::now();
    let running = app.run_connector(app.connector(app.client(None, false), "ehr-throughput"));
    wait_until(Duration::from_secs(240), || app.all_settled(&encounters)).await;
    let elapsed = started.elapsed();
    running.stop().await;
    let stats = app.sandbox_stats().await;
    assert_eq!(stats["duplicates"], json!([]));
    eprintln!(
        "write-back throughput: {} encounters fully acknowledged in {:.2} s = {:.1} encounters/s ({} build, shared 2-core machine); sandbox {stats}",
        encounters.len(),
        elapsed.as_secs_f64(),
        encounters.len() as f64 / elapsed.as_secs_f64(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_change_is_a_version_aware_update_with_history() {
    let app = Harness::start(None).await;
    let visit = visit(4_000);
    app.register_patient(visit.patient_id, true).await;
    let steps = scenario::steps_until_signed(&visit);
    let send = |index: usize| {
        let step = steps[index].clone();
        let runtime = &app.runtime;
        async move {
            let reply = scenario::send(&runtime.bus, &runtime.root, &tenant(), &step).await;
            assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
        }
    };
    send(0).await; // scheduled
    let connector = app.connector(app.client(None, false), "ehr-update-test");
    let job = Job {
        tenant: tenant(),
        stream: StreamId::for_aggregate("encounter", visit.encounter_id),
        artifact: WriteBackArtifact::Appointment,
        replay: None,
    };
    let JobOutcome::Acknowledged { resource, version } = connector.process(&job).await else {
        panic!("the booked appointment was not written");
    };
    assert_eq!(version, "1");
    assert_eq!(connector.process(&job).await, JobOutcome::UpToDate);
    send(1).await; // checked in
    let second = connector.process(&job).await;
    assert_eq!(
        second,
        JobOutcome::Acknowledged {
            resource: resource.clone(),
            version: "2".into()
        }
    );
    let history: Value = app
        .http
        .get(format!("{}/{resource}/_history", app.sandbox_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<&str> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["arrived", "booked"]);
    // A stale If-Match is refused by the server (what makes concurrent updates safe).
    let mut stale = history["entry"][1]["resource"].clone();
    stale["status"] = json!("noshow");
    let response = app
        .http
        .put(format!("{}/{resource}", app.sandbox_url))
        .header("If-Match", "W/\"1\"")
        .body(stale.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 412);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn note_signed_to_document_reference_acknowledged_latency_while_live() {
    let app = Harness::start(None).await;
    let running = app.run_connector(app.connector(app.client(None, false), "ehr-latency"));
    let visits: Vec<Visit> = (6_000..6_100).map(visit).collect();
    for chunk in visits.chunks(25) {
        futures::future::join_all(chunk.iter().map(|v| async {
            app.register_patient(v.patient_id, true).await;
            app.run_visit(v).await;
        }))
        .await;
    }
    let encounters: Vec<Uuid> = visits.iter().map(|v| v.encounter_id).collect();
    wait_until(Duration::from_secs(240), || app.all_settled(&encounters)).await;
    running.stop().await;
    // From the commit of NoteSigned to the commit of the DocumentReference outcome that
    // follows it (both `recorded_at`, stamped by the store).
    let mut latencies = Vec::new();
    for encounter in &encounters {
        let stream = StreamId::for_aggregate("encounter", *encounter);
        let history = read_whole_stream(&app.runtime.store, &tenant(), &stream)
            .await
            .unwrap();
        let signed = history
            .iter()
            .find(|e| e.event_type == "NoteSigned")
            .unwrap();
        let acknowledged = history
            .iter()
            .filter(|e| e.stream_version > signed.stream_version)
            .find(|e| {
                e.event_type == "WriteBackSucceeded"
                    && e.data["artifact"]["resource"] == "document_reference"
            })
            .unwrap_or_else(|| panic!("{stream}: no DocumentReference outcome after NoteSigned"));
        latencies.push((acknowledged.recorded_at - signed.recorded_at).num_milliseconds());
    }
    latencies.sort_unstable();
    let percentile = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).max(1) - 1];
    eprintln!(
        "NoteSigned -> DocumentReference acknowledged ({} build, {} live encounters): p50 {} ms, p99 {} ms, max {} ms",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        latencies.len(),
        percentile(0.5),
        percentile(0.99),
        latencies.last().unwrap()
    );
    assert_eq!(app.sandbox_stats().await["duplicates"], json!([]));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_readings_export_as_vital_signs_observations() {
    let app = Harness::start(None).await;
    let (patient, enrollment, batch) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    app.send(
        "rpm",
        "enroll",
        json!({
            "enrollment_id": enrollment, "patient_id": patient, "device_id": "synthetic-cuff-1",
            "period_start": "2026-03-01", "time_zone": "America/Chicago", "thresholds": [],
            "at": "2026-03-01T12:00:00Z",
        }),
    )
    .await;
    app.send(
        "rpm",
        "record_readings",
        json!({
            "enrollment_id": enrollment, "batch_id": batch,
            "readings": [
                {"code": "8480-6", "value": 131.0, "unit": "mm[Hg]", "effective_at": "2026-03-02T08:00:00Z", "device_id": "synthetic-cuff-1"},
                {"code": "59408-5", "value": 96.0, "unit": "%", "effective_at": "2026-03-02T08:00:00Z", "device_id": "synthetic-oximeter-1"},
            ],
            "at": "2026-03-02T08:05:00Z",
        }),
    )
    .await;
    let observations = chartline_ehr_connector::reactor::patient_rpm_observations(
        &app.runtime.store,
        &tenant(),
        patient,
    )
    .await
    .unwrap();
    assert_eq!(observations.len(), 2);
    assert_eq!(observations[0]["code"]["coding"][0]["code"], "8480-6");
    assert_eq!(observations[0]["valueQuantity"]["code"], "mm[Hg]");
    assert_eq!(
        observations[1]["code"]["coding"].as_array().unwrap().len(),
        2,
        "SpO2 carries both LOINC codes"
    );
    assert_eq!(
        observations[1]["identifier"][0]["value"],
        format!("{batch}-1")
    );
    // Another patient's export is empty.
    assert!(
        chartline_ehr_connector::reactor::patient_rpm_observations(
            &app.runtime.store,
            &tenant(),
            Uuid::now_v7()
        )
        .await
        .unwrap()
        .is_empty()
    );
    app.shutdown().await;
}
