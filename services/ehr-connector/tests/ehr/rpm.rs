//! RPM Observation write-back by the reactor against the sandbox over HTTP: readings
//! reach the EHR exactly once, a re-run from checkpoint 0 writes and records nothing,
//! and nothing is sent for a patient in review until the review is resolved.

use std::time::Duration;

use chartline_domain::rpm::RpmEvent;
use chartline_ehr_connector::fhir::{BusinessKey, identifier_system};
use chartline_infra::store::read_whole_stream;
use chartline_infra::{AnyStore, EventStore};
use chartline_proto::StreamId;
use chartline_proto::codec::decode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::connector::{Harness, tenant, wait_until};

async fn enroll_and_record(app: &Harness, patient: Uuid, enrollment: Uuid, batch: Uuid) {
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
                {"code": "8462-4", "value": 84.0, "unit": "mm[Hg]", "effective_at": "2026-03-02T08:00:00Z", "device_id": "synthetic-cuff-1"},
                {"code": "59408-5", "value": 96.0, "unit": "%", "effective_at": "2026-03-02T08:00:00Z", "device_id": "synthetic-oximeter-1"},
            ],
            "at": "2026-03-02T08:05:00Z",
        }),
    )
    .await;
}

async fn rpm_events(store: &AnyStore, enrollment: Uuid) -> Vec<RpmEvent> {
    let stream = StreamId::for_aggregate("rpm", enrollment);
    read_whole_stream(store, &tenant(), &stream)
        .await
        .unwrap()
        .iter()
        .map(|e| decode(e).unwrap())
        .collect()
}

fn outcomes(events: &[RpmEvent]) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                RpmEvent::ObservationsWrittenBack { .. }
                    | RpmEvent::ObservationWriteBackFailed { .. }
            )
        })
        .count()
}

fn observation_key(batch: Uuid, index: usize) -> BusinessKey {
    BusinessKey {
        resource_type: "Observation".into(),
        search_param: "identifier",
        system: identifier_system("clinic-a", "observation"),
        value: format!("{batch}-{index}"),
    }
}

async fn observations_in_ehr(app: &Harness) -> u64 {
    let stats: Value = app.sandbox_stats().await;
    stats["resources"]["Observation"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readings_reach_the_ehr_once_and_a_rerun_from_zero_writes_nothing() {
    let app = Harness::start(None).await;
    let running = app.run_connector(app.connector(app.client(None, false), "ehr-rpm-test"));
    let (patient, enrollment, batch) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    app.register_patient(patient, true).await;
    enroll_and_record(&app, patient, enrollment, batch).await;
    wait_until(Duration::from_secs(60), || async {
        outcomes(&rpm_events(&app.runtime.store, enrollment).await) > 0
    })
    .await;
    running.stop().await;
    let events = rpm_events(&app.runtime.store, enrollment).await;
    let acknowledged = events
        .iter()
        .find_map(|e| match e {
            RpmEvent::ObservationsWrittenBack {
                batch_id,
                observations,
                ..
            } if *batch_id == batch => Some(observations.clone()),
            _ => None,
        })
        .expect("the batch is acknowledged");
    assert_eq!(acknowledged.len(), 3, "one Observation per reading");
    assert_eq!(outcomes(&events), 1);
    let checker = app.client(None, false);
    for (index, ack) in acknowledged.iter().enumerate() {
        let found = checker
            .search(&observation_key(batch, index))
            .await
            .unwrap();
        assert_eq!(found.len(), 1, "reading {index}");
        assert_eq!(
            format!("Observation/{}", found[0]["id"].as_str().unwrap()),
            ack.ehr_resource_id
        );
        assert_eq!(found[0]["subject"]["identifier"]["value"], json!(patient));
    }
    assert_eq!(observations_in_ehr(&app).await, 3);

    // Re-run from checkpoint 0 (a fresh checkpoint name): no new versions, no new events.
    let versions_before = app.sandbox_stats().await["versions"].clone();
    let events_before = events.len();
    let replay = app.run_connector(app.connector(app.client(None, false), "ehr-rpm-from-zero"));
    let head = app.runtime.store.head_position().await.unwrap();
    wait_until(Duration::from_secs(60), || async {
        chartline_infra::checkpoint::Checkpoint::new(app.runtime.store.clone(), "ehr-rpm-from-zero")
            .load()
            .await
            .unwrap()
            >= head.saturating_sub(250)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    replay.stop().await;
    assert_eq!(
        rpm_events(&app.runtime.store, enrollment).await.len(),
        events_before
    );
    assert_eq!(app.sandbox_stats().await["versions"], versions_before);
    assert_eq!(app.sandbox_stats().await["duplicates"], json!([]));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_a_patient_in_review_wait_for_the_resolution() {
    let app = Harness::start(None).await;
    let running = app.run_connector(app.connector(app.client(None, false), "ehr-rpm-review"));
    let (patient, enrollment, batch) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    app.register_patient(patient, false).await;
    app.send(
        "identity",
        "request_match_review",
        json!({
            "patient_id": patient,
            "candidates": [{"candidate_patient_id": Uuid::now_v7(), "identifier": null, "score": 0.71, "grade": "probable"}],
            "at": "2026-01-05T10:02:00Z",
        }),
    )
    .await;
    enroll_and_record(&app, patient, enrollment, batch).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(observations_in_ehr(&app).await, 0, "sent while in review");
    assert_eq!(
        outcomes(&rpm_events(&app.runtime.store, enrollment).await),
        0,
        "recorded an outcome while in review"
    );
    app.send(
        "identity",
        "resolve_match",
        json!({
            "patient_id": patient,
            "resolution": {"resolution": "not_a_match"},
            "reviewer_id": "reviewer-1",
            "at": "2026-03-10T09:00:00Z",
        }),
    )
    .await;
    wait_until(Duration::from_secs(60), || async {
        outcomes(&rpm_events(&app.runtime.store, enrollment).await) > 0
    })
    .await;
    running.stop().await;
    let events = rpm_events(&app.runtime.store, enrollment).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RpmEvent::ObservationsWrittenBack { observations, .. } if observations.len() == 3)),
        "{events:?}"
    );
    assert_eq!(observations_in_ehr(&app).await, 3);
    app.shutdown().await;
}
