//! The compliance gate in the connector over real HTTP: PHI goes to an EHR whose BAA is
//! in effect; with the BAA expired nothing is sent, `PhiTransferBlocked` is recorded
//! once (a re-run records nothing) and the `ehr_writeback` read model shows `blocked`
//! with the reason.

use std::sync::Arc;

use chartline::scenario;
use chartline_domain::encounter::WriteBackArtifact;
use chartline_ehr_connector::{Job, JobOutcome};
use chartline_infra::store::read_whole_stream;
use chartline_projections::cache::Row;
use chartline_projections::models::ehr_writeback::WriteBackRow;
use chartline_projections::{ProjectionRunner, ReadDb};
use chartline_proto::StreamId;
use chartline_proto::compliance_map::parse_compliance_map;
use chrono::{TimeZone, Utc};
use serde_json::json;

use crate::connector::{Harness, tenant};

fn map_with_baa_through(last_day: &str) -> Arc<chartline_domain::compliance::ComplianceMap> {
    Arc::new(
        parse_compliance_map(&format!(
            r#"
[[component]]
id = "test-ehr"
name = "Test EHR (sandbox)"
kind = "ehr"
handles_phi = true
baa = {{ effective_from = "2020-01-01", effective_to = "{last_day}" }}

[[flow]]
from = "ehr-connector"
to = "test-ehr"
data = ["encounter_record", "clinical_documentation", "billing"]
"#
        ))
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phi_goes_only_to_a_covered_ehr_and_an_expired_baa_blocks_once_visibly() {
    let app = Harness::start(None).await;
    let day = Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap();
    let visit = scenario::synthetic_visit(11, 3_000, day);
    app.register_patient(visit.patient_id, true).await;
    app.run_visit(&visit).await;
    let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
    let job = Job {
        tenant: tenant(),
        stream: stream.clone(),
        artifact: WriteBackArtifact::Appointment,
        replay: None,
    };
    let blocked_events = || async {
        read_whole_stream(&app.runtime.store, &tenant(), &stream)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.event_type == "PhiTransferBlocked")
            .count()
    };

    // The BAA ended in 2021: refused, nothing sent, recorded once.
    let lapsed = app
        .connector(app.client(None, false), "ehr-compliance-lapsed")
        .with_compliance(map_with_baa_through("2021-12-31"), "test-ehr");
    for _ in 0..2 {
        match lapsed.process(&job).await {
            JobOutcome::Blocked { component, reason } => {
                assert_eq!(component, "test-ehr");
                assert!(reason.contains("expired after 2021-12-31"), "{reason}");
            }
            other => panic!("expected Blocked, got {other:?}"),
        }
    }
    assert_eq!(app.sandbox_stats().await["resources"], json!({}));
    assert_eq!(blocked_events().await, 1, "a re-run records nothing new");
    let stream_events = read_whole_stream(&app.runtime.store, &tenant(), &stream)
        .await
        .unwrap();
    assert!(
        stream_events
            .iter()
            .all(|e| e.event_type != "WriteBackRequested"),
        "nothing was requested while blocked"
    );

    // The read model shows it.
    let db = ReadDb::open(&app.runtime.store_url).await.unwrap();
    let mut runner = ProjectionRunner::new(app.runtime.store.clone(), db.clone())
        .await
        .unwrap();
    runner.catch_up().await.unwrap();
    let rows = format!(
        "{:?}",
        db.dump(WriteBackRow::TABLE, WriteBackRow::TABLE.name)
            .await
            .unwrap()
            .into_iter()
            .filter(
                |row| format!("{row:?}").contains(&visit.encounter_id.to_string())
                    && format!("{row:?}").contains("\"appointment\"")
            )
            .collect::<Vec<_>>()
    );
    assert!(rows.contains("\"blocked\""), "{rows}");
    assert!(
        rows.contains("PHI transfer to test-ehr blocked: its BAA expired after 2021-12-31"),
        "{rows}"
    );

    // Covered (a renewed BAA): the same artifact is sent and acknowledged.
    let covered = app
        .connector(app.client(None, false), "ehr-compliance-covered")
        .with_compliance(map_with_baa_through("2999-12-31"), "test-ehr");
    assert!(
        matches!(covered.process(&job).await, JobOutcome::Acknowledged { .. }),
        "a covered EHR gets the write"
    );
    assert_eq!(
        app.sandbox_stats().await["resources"]["Appointment"],
        json!(1)
    );
    runner.catch_up().await.unwrap();
    let rows = format!(
        "{:?}",
        db.dump(WriteBackRow::TABLE, WriteBackRow::TABLE.name)
            .await
            .unwrap()
            .into_iter()
            .filter(
                |row| format!("{row:?}").contains(&visit.encounter_id.to_string())
                    && format!("{row:?}").contains("\"appointment\"")
            )
            .collect::<Vec<_>>()
    );
    assert!(rows.contains("\"acknowledged\""), "{rows}");
    assert_eq!(blocked_events().await, 1);
    app.shutdown().await;
}
