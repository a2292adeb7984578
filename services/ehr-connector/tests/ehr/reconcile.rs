//! Reconciliation against the sandbox over HTTP: an encounter is written back and
//! acknowledged, the EHR is then changed behind the connector's back (status changed,
//! resources deleted, a version moved on), and the job records exactly the expected
//! `EhrDriftDetected` events — once: re-runs record nothing, an unchanged EHR nothing,
//! and a re-write resolves the drift.

use std::time::Duration;

use chartline::scenario;
use chartline_domain::encounter::{DriftKind, EncounterEvent, WriteBackArtifact};
use chartline_ehr_connector::JobOutcome;
use chartline_ehr_connector::fhir::BusinessKey;
use chartline_ehr_connector::reconcile::Reconciler;
use chartline_infra::AnyStore;
use chartline_infra::store::read_whole_stream;
use chartline_proto::StreamId;
use chartline_proto::codec::decode;
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::connector::{Harness, tenant, wait_until};

const WINDOW: Duration = Duration::from_secs(3_600);

async fn drift_events(store: &AnyStore, encounter_id: Uuid) -> Vec<EncounterEvent> {
    let stream = StreamId::for_aggregate("encounter", encounter_id);
    read_whole_stream(store, &tenant(), &stream)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type == "EhrDriftDetected")
        .map(|e| decode(e).unwrap())
        .collect()
}

async fn stream_length(store: &AnyStore, encounter_id: Uuid) -> usize {
    let stream = StreamId::for_aggregate("encounter", encounter_id);
    read_whole_stream(store, &tenant(), &stream)
        .await
        .unwrap()
        .len()
}

/// The one resource the EHR holds for a key.
async fn held(app: &Harness, key: &BusinessKey) -> Value {
    let found = app.client(None, false).search(key).await.unwrap();
    assert_eq!(found.len(), 1, "{key:?}");
    found[0].clone()
}

/// An out-of-band update (someone in the EHR), without If-Match.
async fn put_behind_the_back(app: &Harness, resource: &Value) {
    let url = format!(
        "{}/{}/{}",
        app.sandbox_url,
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let response = reqwest::Client::new()
        .put(url)
        .header("Content-Type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
}

async fn delete_behind_the_back(app: &Harness, resource: &Value) {
    let url = format!(
        "{}/{}/{}",
        app.sandbox_url,
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let response = reqwest::Client::new().delete(url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 204);
}

fn key_of(keys: &[BusinessKey], resource_type: &str) -> BusinessKey {
    keys.iter()
        .find(|k| k.resource_type == resource_type)
        .unwrap_or_else(|| panic!("no {resource_type} key"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_behind_the_connectors_back_is_recorded_once_and_a_rewrite_resolves_it() {
    let app = Harness::start(None).await;
    let day = Utc.with_ymd_and_hms(2026, 3, 4, 0, 0, 0).unwrap();
    let visit = scenario::synthetic_visit(23, 7_000, day);
    app.register_patient(visit.patient_id, true).await;
    let running = app.run_connector(app.connector(app.client(None, false), "ehr-reconcile-test"));
    app.run_visit(&visit).await;
    wait_until(Duration::from_secs(60), || {
        app.all_settled(std::slice::from_ref(&visit.encounter_id))
    })
    .await;
    running.stop().await;
    let store = app.runtime.store.clone();
    let connector = app.connector(app.client(None, false), "ehr-reconcile-test");
    let mut reconciler = Reconciler::new(store.clone(), connector.clone());

    // An unchanged EHR: nothing found, nothing recorded.
    let before = stream_length(&store, visit.encounter_id).await;
    let report = reconciler.run_once(WINDOW, Utc::now()).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.encounters, 1);
    assert!(report.artifacts >= 5, "{report:?}");
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    assert_eq!(stream_length(&store, visit.encounter_id).await, before);

    // Behind the connector's back: the appointment is cancelled in the EHR, the follow-up
    // Task is deleted, the note's Composition is deleted, the ChargeItem is edited
    // without a status change.
    let keys = app.keys(visit.encounter_id).await;
    let mut appointment = held(&app, &key_of(&keys, "Appointment")).await;
    let appointment_status = appointment["status"].as_str().unwrap().to_string();
    appointment["status"] = json!("cancelled");
    put_behind_the_back(&app, &appointment).await;
    let task = held(&app, &key_of(&keys, "Task")).await;
    delete_behind_the_back(&app, &task).await;
    let composition = held(&app, &key_of(&keys, "Composition")).await;
    delete_behind_the_back(&app, &composition).await;
    let mut charge = held(&app, &key_of(&keys, "ChargeItem")).await;
    charge["note"] = json!([{"text": "edited in the EHR"}]);
    put_behind_the_back(&app, &charge).await;

    let report = reconciler.run_once(WINDOW, Utc::now()).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.recorded(), 4, "{:#?}", report.drift);
    let mut recorded: Vec<(String, DriftKind, String, String)> =
        drift_events(&store, visit.encounter_id)
            .await
            .into_iter()
            .map(|event| {
                let EncounterEvent::EhrDriftDetected(drift) = event else {
                    unreachable!()
                };
                let artifact = match drift.artifact {
                    WriteBackArtifact::Task { .. } => "task".to_string(),
                    other => format!("{other:?}"),
                };
                (artifact, drift.kind, drift.expected, drift.found)
            })
            .collect();
    recorded.sort();
    let appointment_id = format!("Appointment/{}", appointment["id"].as_str().unwrap());
    let task_id = format!("Task/{}", task["id"].as_str().unwrap());
    let mut expected = vec![
        (
            "Appointment".to_string(),
            DriftKind::StatusChanged,
            format!("status {appointment_status}"),
            "status cancelled".to_string(),
        ),
        (
            "ChargeItem".to_string(),
            DriftKind::VersionChanged,
            format!("version {}", charge["meta"]["versionId"].as_str().unwrap()),
            format!(
                "version {}",
                charge["meta"]["versionId"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    + 1
            ),
        ),
        (
            "DocumentReference".to_string(),
            DriftKind::NoteMissing,
            "Composition".to_string(),
            "absent".to_string(),
        ),
        (
            "task".to_string(),
            DriftKind::Missing,
            format!(
                "{task_id} version {}",
                task["meta"]["versionId"].as_str().unwrap()
            ),
            "absent".to_string(),
        ),
    ];
    expected.sort();
    assert_eq!(recorded, expected);
    assert!(appointment_id.starts_with("Appointment/"));

    // Re-run on the unchanged (drifted) EHR: nothing new, by this job or a fresh one.
    let after_first = stream_length(&store, visit.encounter_id).await;
    let again = reconciler.run_once(WINDOW, Utc::now()).await;
    assert_eq!(again.recorded(), 0, "{:#?}", again.drift);
    assert_eq!(again.drift.len(), 4, "open drift is still reported");
    let mut fresh = Reconciler::new(store.clone(), connector.clone());
    assert_eq!(fresh.run_once(WINDOW, Utc::now()).await.recorded(), 0);
    assert_eq!(stream_length(&store, visit.encounter_id).await, after_first);

    // A re-write repairs the EHR and resolves the drift; the next run finds the
    // appointment in order and records nothing new.
    let rewritten = connector
        .retry_write_back(
            &tenant(),
            visit.encounter_id,
            WriteBackArtifact::Appointment,
        )
        .await;
    assert!(
        matches!(rewritten, JobOutcome::Acknowledged { .. }),
        "{rewritten:?}"
    );
    assert_eq!(
        held(&app, &key_of(&keys, "Appointment")).await["status"],
        json!(appointment_status)
    );
    let after_rewrite = stream_length(&store, visit.encounter_id).await;
    let report = reconciler.run_once(WINDOW, Utc::now()).await;
    assert_eq!(report.recorded(), 0, "{:#?}", report.drift);
    assert_eq!(report.drift.len(), 3, "{:#?}", report.drift);
    assert!(report.drift.iter().all(|d| d.artifact != "appointment"));
    assert_eq!(
        stream_length(&store, visit.encounter_id).await,
        after_rewrite
    );

    // A new drift on the re-written appointment is recorded once more.
    let mut appointment = held(&app, &key_of(&keys, "Appointment")).await;
    appointment["status"] = json!("noshow");
    put_behind_the_back(&app, &appointment).await;
    assert_eq!(reconciler.run_once(WINDOW, Utc::now()).await.recorded(), 1);
    assert_eq!(reconciler.run_once(WINDOW, Utc::now()).await.recorded(), 0);
    assert_eq!(drift_events(&store, visit.encounter_id).await.len(), 5);

    // Outside the window nothing is checked.
    let mut late = Reconciler::new(store.clone(), connector);
    let report = late
        .run_once(WINDOW, Utc::now() + chrono::Duration::hours(2))
        .await;
    assert_eq!(report.encounters, 0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ehr_that_answers_errors_is_not_drift() {
    let app = Harness::start(None).await;
    let day = Utc.with_ymd_and_hms(2026, 3, 4, 0, 0, 0).unwrap();
    let visit = scenario::synthetic_visit(23, 7_100, day);
    app.register_patient(visit.patient_id, true).await;
    let running = app.run_connector(app.connector(app.client(None, false), "ehr-reconcile-err"));
    app.run_visit(&visit).await;
    wait_until(Duration::from_secs(60), || {
        app.all_settled(std::slice::from_ref(&visit.encounter_id))
    })
    .await;
    running.stop().await;
    app.set_faults(json!({"error_rate": 1.0, "kinds": ["503"], "seed": 3}))
        .await;
    let connector = app.connector(app.client(None, false), "ehr-reconcile-err");
    let mut reconciler = Reconciler::new(app.runtime.store.clone(), connector);
    let report = reconciler.run_once(WINDOW, Utc::now()).await;
    assert!(!report.errors.is_empty());
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    assert!(
        drift_events(&app.runtime.store, visit.encounter_id)
            .await
            .is_empty()
    );
    app.shutdown().await;
}
