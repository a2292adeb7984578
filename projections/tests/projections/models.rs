//! Read-model behaviour: write-back states, billing holds and their reasons, identity
//! review, integration completeness and its headline.

use std::collections::BTreeMap;

use chartline_domain::encounter::{
    AppointmentType, AssignedCode, CheckedIn, CodesAssigned, CodingOutcome, ConsultationEnded,
    ConsultationStarted, EncounterEvent, Modality, NoteAuthor, NoteDrafted, NoteSigned, NoteType,
    PatientLocation, PatientStatus, Payer, Scheduled, ServiceKind, Site, SoapSections, VisitType,
    WriteBackArtifact, WriteBackFailed, WriteBackRequested, WriteBackSucceeded,
};
use chartline_domain::encounter::{DriftKind, EhrDriftDetected};
use chartline_domain::patient::{
    Demographics, Identifier, MatchCandidate, MatchGrade, MatchResolution, PatientEvent, Sex,
};
use chartline_domain::rpm::{ObservationAck, Reading, RpmEvent};
use chartline_projections::cache::Row;
use chartline_projections::models::billing_queue::BillingItemRow;
use chartline_projections::models::ehr_writeback::WriteBackRow;
use chartline_projections::models::encounter_view::EncounterViewRow;
use chartline_projections::models::identity_review::IdentityReviewRow;
use chartline_projections::models::integration_completeness::{CompletenessRow, headline};
use chartline_projections::{Cell, ProjectionRunner, ReadDb};
use chartline_proto::{Actor, ActorKind, StreamId};
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use uuid::Uuid;

use crate::harness::{Backend, append, fresh, rows};

crate::on_both_backends!(read_models_follow_an_encounter_from_schedule_to_write_back);

fn t(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 2, 15, 0, 0).unwrap() + Duration::minutes(minutes)
}

fn service() -> Actor {
    Actor::new(ActorKind::Service, "svc")
}

fn staff() -> Actor {
    Actor::new(ActorKind::Staff, "ops-1")
}

fn clinician() -> Actor {
    Actor::new(ActorKind::Clinician, "dr-1")
}

fn scheduled(encounter_id: Uuid, patient_id: Uuid) -> EncounterEvent {
    EncounterEvent::Scheduled(Scheduled {
        encounter_id,
        patient_id,
        practitioner_id: "dr-1".into(),
        visit_type: VisitType {
            service: ServiceKind::EMVisit,
            patient_status: PatientStatus::Established,
            level: Some(3),
            appointment_type: AppointmentType::Followup,
        },
        planned_modality: Modality::Video,
        window_start: t(0),
        window_end: t(30),
        patient_location: PatientLocation::Home,
        payer: Payer::Medicare,
        site: Site::PhysicianOffice,
        at: t(-60),
    })
}

fn conducted(author: NoteAuthor) -> Vec<EncounterEvent> {
    vec![
        EncounterEvent::CheckedIn(CheckedIn { at: t(-2) }),
        EncounterEvent::ConsultationStarted(ConsultationStarted {
            modality: Modality::Video,
            at: t(0),
        }),
        EncounterEvent::ConsultationEnded(ConsultationEnded {
            duration_seconds: 900,
            video_seconds: 900,
            audio_only_seconds: 0,
            modality_used: Modality::Video,
            at: t(15),
        }),
        EncounterEvent::NoteDrafted(NoteDrafted {
            author,
            note_type: NoteType::ProgressNote,
            sections: SoapSections {
                subjective: "s".into(),
                objective: "o".into(),
                assessment: "a".into(),
                plan: "p".into(),
            },
            at: t(16),
        }),
    ]
}

fn billable() -> EncounterEvent {
    EncounterEvent::CodesAssigned(CodesAssigned {
        outcome: CodingOutcome::Billable {
            codes: vec![AssignedCode {
                code: "99213".into(),
                modifiers: vec![],
                pos: "10".into(),
                units: 1,
            }],
        },
        policy_version: 3,
        rule_trace: vec![],
        at: t(17),
    })
}

fn signed() -> EncounterEvent {
    EncounterEvent::NoteSigned(NoteSigned {
        practitioner_id: "dr-1".into(),
        ai_assisted: false,
        at: t(20),
    })
}

fn text(cell: &Cell) -> String {
    match cell {
        Cell::Text(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn by_key(
    db: &ReadDb,
    spec: &'static chartline_projections::db::TableSpec,
    key: &[&str],
) -> BTreeMap<String, BTreeMap<&'static str, Cell>> {
    rows(db, spec)
        .await
        .into_iter()
        .map(|r| {
            (
                key.iter()
                    .map(|k| text(&r[k]))
                    .collect::<Vec<_>>()
                    .join("/"),
                r,
            )
        })
        .collect()
}

async fn read_models_follow_an_encounter_from_schedule_to_write_back(backend: Backend) {
    let (store, db, _guard) = fresh(backend).await;
    let mut runner = ProjectionRunner::new(store.clone(), db.clone())
        .await
        .unwrap();
    let patient_id = Uuid::now_v7();
    let patient = StreamId::for_aggregate("patient", patient_id);
    append(
        &store,
        &patient,
        vec![
            (
                service(),
                PatientEvent::Registered {
                    patient_id,
                    demographics: Demographics {
                        given_name: "Synthetic".into(),
                        family_name: "Person".into(),
                        birth_date: NaiveDate::from_ymd_opt(1960, 2, 2).unwrap(),
                        sex: Sex::Male,
                        address_line: None,
                        city: None,
                        state: None,
                        postal_code: None,
                        phone: None,
                        email: None,
                        time_zone: None,
                    },
                    at: t(-100),
                },
            ),
            (
                service(),
                PatientEvent::MatchReviewRequested {
                    candidates: vec![
                        MatchCandidate {
                            candidate_patient_id: Some(Uuid::now_v7()),
                            identifier: None,
                            score: 0.70,
                            grade: MatchGrade::Possible,
                        },
                        MatchCandidate {
                            candidate_patient_id: Some(Uuid::now_v7()),
                            identifier: None,
                            score: 0.85,
                            grade: MatchGrade::Probable,
                        },
                    ],
                    at: t(-99),
                },
            ),
        ],
    )
    .await;
    // Encounter 1: AI draft, codes picked by staff, write-backs with failures.
    let first = Uuid::now_v7();
    let first_stream = StreamId::for_aggregate("encounter", first);
    let mut events = vec![(
        Actor::new(ActorKind::Staff, "scheduler"),
        scheduled(first, patient_id),
    )];
    for event in conducted(NoteAuthor::AiScribe {
        vendor: "synthetic".into(),
        model_id: "m1".into(),
    }) {
        events.push((service(), event));
    }
    events.push((staff(), billable()));
    append(&store, &first_stream, events).await;
    runner.catch_up().await.unwrap();

    let items = by_key(&db, BillingItemRow::TABLE, &["item_id"]).await;
    let item = &items[&format!("encounter:{first}")];
    assert_eq!(text(&item["status"]), "held");
    let reasons: Vec<String> = serde_json::from_str(&text(&item["reasons"])).unwrap();
    assert_eq!(reasons, ["unsigned note", "identity under review"]);
    assert_eq!(text(&item["status_since"]), "2026-02-02T15:15:00.000000Z");
    let reviews = by_key(&db, IdentityReviewRow::TABLE, &["patient_id"]).await;
    let review = &reviews[&patient_id.to_string()];
    assert_eq!(text(&review["status"]), "open");
    assert_eq!(review["candidate_count"], Cell::Int(2));
    assert_eq!(review["top_score"], Cell::Real(0.85));
    assert_eq!(text(&review["top_grade"]), "probable");

    append(
        &store,
        &patient,
        vec![(
            staff(),
            PatientEvent::MatchResolved {
                resolution: MatchResolution::ConfirmLink {
                    identifier: Identifier {
                        system: "urn:synthetic:mrn".into(),
                        value: "MRN1".into(),
                    },
                },
                reviewer_id: "ops-1".into(),
                at: t(18),
            },
        )],
    )
    .await;
    let appointment = WriteBackArtifact::Appointment;
    let document = WriteBackArtifact::DocumentReference;
    append(
        &store,
        &first_stream,
        vec![
            (clinician(), signed()),
            (
                service(),
                EncounterEvent::WriteBackRequested(WriteBackRequested {
                    artifact: appointment.clone(),
                    at: t(21),
                }),
            ),
            (
                service(),
                EncounterEvent::WriteBackFailed(WriteBackFailed {
                    artifact: appointment.clone(),
                    status: Some(503),
                    message: "EHR unavailable".into(),
                    retryable: true,
                    attempt: 1,
                    at: t(22),
                }),
            ),
            (
                service(),
                EncounterEvent::WriteBackRequested(WriteBackRequested {
                    artifact: document.clone(),
                    at: t(23),
                }),
            ),
            (
                service(),
                EncounterEvent::WriteBackFailed(WriteBackFailed {
                    artifact: document.clone(),
                    status: Some(400),
                    message: "invalid resource".into(),
                    retryable: false,
                    attempt: 1,
                    at: t(24),
                }),
            ),
        ],
    )
    .await;
    runner.catch_up().await.unwrap();
    let write_backs = by_key(&db, WriteBackRow::TABLE, &["encounter_id", "artifact"]).await;
    let appointment_row = &write_backs[&format!("{first}/appointment")];
    assert_eq!(text(&appointment_row["state"]), "failed");
    assert_eq!(appointment_row["attempts"], Cell::Int(1));
    assert_eq!(
        text(&appointment_row["next_retry_at"]),
        "2026-02-02T15:22:30.000000Z"
    );
    assert_eq!(text(&appointment_row["last_error"]), "EHR unavailable");
    assert_eq!(
        text(&write_backs[&format!("{first}/document_reference")]["state"]),
        "dead"
    );
    assert_eq!(
        text(&write_backs[&format!("{first}/encounter")]["state"]),
        "pending"
    );
    assert_eq!(
        text(&write_backs[&format!("{first}/charge_item")]["state"]),
        "pending"
    );
    let items = by_key(&db, BillingItemRow::TABLE, &["item_id"]).await;
    assert_eq!(
        text(&items[&format!("encounter:{first}")]["status"]),
        "ready"
    );
    assert_eq!(
        text(&items[&format!("encounter:{first}")]["codes"]),
        "99213@10 x1"
    );
    let reviews = by_key(&db, IdentityReviewRow::TABLE, &["patient_id"]).await;
    assert_eq!(
        text(&reviews[&patient_id.to_string()]["resolution"]),
        "confirm_link"
    );

    // A human re-sends the appointment; it is acknowledged.
    append(
        &store,
        &first_stream,
        vec![
            (
                staff(),
                EncounterEvent::WriteBackRequested(WriteBackRequested {
                    artifact: appointment.clone(),
                    at: t(30),
                }),
            ),
            (
                service(),
                EncounterEvent::WriteBackSucceeded(WriteBackSucceeded {
                    artifact: appointment.clone(),
                    ehr_resource_id: "Appointment/77".into(),
                    ehr_version: "2".into(),
                    at: t(31),
                }),
            ),
        ],
    )
    .await;

    // Encounter 2: everything automatic.
    let second = Uuid::now_v7();
    let mut events = vec![(service(), scheduled(second, patient_id))];
    for event in conducted(NoteAuthor::Clinician {
        practitioner_id: "dr-1".into(),
    }) {
        events.push((clinician(), event));
    }
    events.push((clinician(), signed()));
    events.push((service(), billable()));
    for artifact in [
        WriteBackArtifact::Appointment,
        WriteBackArtifact::Encounter,
        WriteBackArtifact::DocumentReference,
        WriteBackArtifact::ChargeItem,
    ] {
        events.push((
            service(),
            EncounterEvent::WriteBackRequested(WriteBackRequested {
                artifact: artifact.clone(),
                at: t(40),
            }),
        ));
        events.push((
            service(),
            EncounterEvent::WriteBackSucceeded(WriteBackSucceeded {
                artifact,
                ehr_resource_id: "x/1".into(),
                ehr_version: "1".into(),
                at: t(41),
            }),
        ));
    }
    append(
        &store,
        &StreamId::for_aggregate("encounter", second),
        events,
    )
    .await;
    runner.catch_up().await.unwrap();

    let write_backs = by_key(&db, WriteBackRow::TABLE, &["encounter_id", "artifact"]).await;
    let appointment_row = &write_backs[&format!("{first}/appointment")];
    assert_eq!(text(&appointment_row["state"]), "acknowledged");
    assert_eq!(text(&appointment_row["ehr_resource_id"]), "Appointment/77");
    assert_eq!(text(&appointment_row["ehr_version"]), "2");
    assert_eq!(appointment_row["attempts"], Cell::Int(2));

    let completeness = by_key(&db, CompletenessRow::TABLE, &["encounter_id"]).await;
    let manual = &completeness[&first.to_string()];
    assert_eq!(manual["manual_code_picks"], Cell::Int(1));
    assert_eq!(manual["manual_retries"], Cell::Int(1));
    assert_eq!(manual["manual_touches"], Cell::Int(2));
    assert_eq!(manual["fully_automated"], Cell::Int(0));
    let automatic = &completeness[&second.to_string()];
    assert_eq!(automatic["manual_touches"], Cell::Int(0));
    assert_eq!(automatic["required_artifacts"], Cell::Int(4));
    assert_eq!(automatic["acknowledged_automatically"], Cell::Int(4));
    assert_eq!(automatic["fully_automated"], Cell::Int(1));

    let figures = headline(&db, None).await.unwrap();
    assert_eq!(figures.encounters, 2);
    assert_eq!(figures.fully_automated, 1);
    assert_eq!(figures.percent_fully_automated, 50.0);
    assert_eq!(figures.manual_touches_per_encounter, 1.0);

    let view = by_key(&db, EncounterViewRow::TABLE, &["encounter_id"]).await;
    assert_eq!(
        text(&view[&first.to_string()]["status"]),
        "consultation_ended"
    );
    assert_eq!(text(&view[&first.to_string()]["note_status"]), "signed");
    assert_eq!(view[&first.to_string()]["note_ai_assisted"], Cell::Int(1));

    // Reconciliation finds the acknowledged appointment changed in the EHR: drifted,
    // with the finding; a re-write clears it.
    let drift = |found: &str, at| {
        EncounterEvent::EhrDriftDetected(EhrDriftDetected {
            artifact: WriteBackArtifact::Appointment,
            kind: DriftKind::StatusChanged,
            ehr_resource_id: "Appointment/77".into(),
            ehr_version: "2".into(),
            resource: "Appointment/77".into(),
            expected: "status fulfilled".into(),
            found: found.into(),
            detected_at: at,
            at: t(41),
        })
    };
    append(
        &store,
        &first_stream,
        vec![
            (service(), drift("status cancelled", t(50))),
            (service(), drift("status noshow", t(51))),
        ],
    )
    .await;
    runner.catch_up().await.unwrap();
    let write_backs = by_key(&db, WriteBackRow::TABLE, &["encounter_id", "artifact"]).await;
    let drifted = &write_backs[&format!("{first}/appointment")];
    assert_eq!(text(&drifted["state"]), "drifted");
    assert_eq!(drifted["open_drift"], Cell::Int(2));
    let findings: serde_json::Value = serde_json::from_str(&text(&drifted["drift"])).unwrap();
    assert_eq!(findings[0]["kind"], "status_changed");
    assert_eq!(findings[1]["found"], "status noshow");
    append(
        &store,
        &first_stream,
        vec![
            (
                service(),
                EncounterEvent::WriteBackRequested(WriteBackRequested {
                    artifact: WriteBackArtifact::Appointment,
                    at: t(52),
                }),
            ),
            (
                service(),
                EncounterEvent::WriteBackSucceeded(WriteBackSucceeded {
                    artifact: WriteBackArtifact::Appointment,
                    ehr_resource_id: "Appointment/77".into(),
                    ehr_version: "4".into(),
                    at: t(52),
                }),
            ),
        ],
    )
    .await;

    // RPM: each readings batch is an Observation artifact of the enrolment.
    let enrollment = Uuid::now_v7();
    let (acknowledged_batch, failed_batch) = (Uuid::now_v7(), Uuid::now_v7());
    let reading = Reading {
        code: "8867-4".into(),
        value: 72.0,
        unit: "/min".into(),
        effective_at: t(60),
        device_id: "synthetic-hr-1".into(),
    };
    append(
        &store,
        &StreamId::for_aggregate("rpm", enrollment),
        vec![
            (
                service(),
                RpmEvent::Enrolled {
                    enrollment_id: enrollment,
                    patient_id,
                    device_id: "synthetic-hr-1".into(),
                    period_start: NaiveDate::from_ymd_opt(2026, 2, 1).unwrap(),
                    time_zone: "America/New_York".into(),
                    thresholds: vec![],
                    at: t(59),
                },
            ),
            (
                service(),
                RpmEvent::ReadingsRecorded {
                    batch_id: acknowledged_batch,
                    readings: vec![reading.clone(), reading.clone()],
                    at: t(61),
                },
            ),
            (
                service(),
                RpmEvent::ReadingsRecorded {
                    batch_id: failed_batch,
                    readings: vec![reading],
                    at: t(62),
                },
            ),
            (
                service(),
                RpmEvent::ObservationsWrittenBack {
                    batch_id: acknowledged_batch,
                    observations: vec![
                        ObservationAck {
                            ehr_resource_id: "Observation/o1".into(),
                            ehr_version: "1".into(),
                        },
                        ObservationAck {
                            ehr_resource_id: "Observation/o2".into(),
                            ehr_version: "1".into(),
                        },
                    ],
                    at: t(62),
                },
            ),
            (
                service(),
                RpmEvent::ObservationWriteBackFailed {
                    batch_id: failed_batch,
                    status: Some(422),
                    message: "unknown code".into(),
                    retryable: false,
                    attempt: 1,
                    at: t(62),
                },
            ),
        ],
    )
    .await;
    runner.catch_up().await.unwrap();
    let write_backs = by_key(&db, WriteBackRow::TABLE, &["encounter_id", "artifact"]).await;
    let rewritten = &write_backs[&format!("{first}/appointment")];
    assert_eq!(text(&rewritten["state"]), "acknowledged");
    assert_eq!(rewritten["open_drift"], Cell::Int(0));
    assert_eq!(rewritten["drift"], Cell::Null);
    let batch = &write_backs[&format!("{enrollment}/observations:{acknowledged_batch}")];
    assert_eq!(text(&batch["state"]), "acknowledged");
    assert_eq!(text(&batch["resource_type"]), "Observation");
    assert_eq!(text(&batch["ehr_resource_id"]), "Observation/o1");
    let dead = &write_backs[&format!("{enrollment}/observations:{failed_batch}")];
    assert_eq!(text(&dead["state"]), "dead");
    assert_eq!(text(&dead["last_error"]), "unknown code");
}
