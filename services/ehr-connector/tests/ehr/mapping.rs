//! Pure mapping tests: every resource type validates against an independent FHIR R4
//! model (fhirbolt, strict mode), and Bundle snapshots for a reference video visit and
//! an audio-only one (`CHARTLINE_BLESS=1` rewrites the snapshots).

use chartline_domain::Aggregate;
use chartline_domain::encounter::{
    AppointmentType, AssignedCode, CodingOutcome, Encounter, EncounterCommand, EncounterEvent,
    Modality, NoteAuthor, NoteType, PatientLocation, PatientStatus, Payer, Schedule, ServiceKind,
    Site, SoapSections, VisitType,
};
use chartline_domain::rpm::Reading;
use chartline_ehr_connector::fhir::{
    BusinessKey, EncounterRecord, observations_for, transaction_bundle,
};
use chrono::{DateTime, Duration, TimeZone, Utc};
use fhirbolt::serde::{DeserializationConfig, DeserializationMode};
use serde_json::Value;
use uuid::Uuid;

fn t(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 15, 0, 0).unwrap() + Duration::minutes(minutes)
}

/// A reference visit folded through the domain's own decisions (no store).
pub fn reference_events(audio_fallback: bool, ai_drafted: bool) -> Vec<EncounterEvent> {
    let encounter_id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
    let patient_id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002);
    let task_id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0003);
    let mut commands = vec![
        EncounterCommand::Schedule(Schedule {
            encounter_id,
            patient_id,
            practitioner_id: "dr-synthetic-1".into(),
            visit_type: VisitType {
                service: ServiceKind::EMVisit,
                patient_status: PatientStatus::Established,
                level: Some(3),
                appointment_type: AppointmentType::Followup,
            },
            planned_modality: Modality::Video,
            window_start: t(0),
            window_end: t(20),
            patient_location: PatientLocation::Home,
            payer: Payer::Medicare,
            site: Site::PhysicianOffice,
            at: t(-24 * 60),
        }),
        EncounterCommand::CheckIn { at: t(-3) },
        EncounterCommand::StartConsultation {
            modality: Modality::Video,
            at: t(0),
        },
    ];
    if audio_fallback {
        commands.push(EncounterCommand::ChangeModality {
            to: Modality::AudioOnly,
            reason: "patient video stream lost (bandwidth)".into(),
            at: t(4),
        });
    }
    commands.push(EncounterCommand::EndConsultation { at: t(19) });
    commands.push(EncounterCommand::DraftNote {
        author: if ai_drafted {
            NoteAuthor::AiScribe {
                vendor: "synthetic-scribe".into(),
                model_id: "scribe-2026-01".into(),
            }
        } else {
            NoteAuthor::Clinician {
                practitioner_id: "dr-synthetic-1".into(),
            }
        },
        note_type: NoteType::ProgressNote,
        sections: SoapSections {
            subjective: "Synthetic patient reports improved symptoms since last visit.".into(),
            objective: "Home blood pressure log reviewed; afebrile by report.".into(),
            assessment: "Essential hypertension, improving on current regimen.".into(),
            plan: "Continue current medication. Repeat home readings daily. Follow up in 3 months."
                .into(),
        },
        at: t(21),
    });
    commands.push(EncounterCommand::SignNote {
        practitioner_id: "dr-synthetic-1".into(),
        at: t(30),
    });
    commands.push(EncounterCommand::AssignCodes {
        outcome: CodingOutcome::Billable {
            codes: vec![AssignedCode {
                code: "99213".into(),
                modifiers: if audio_fallback {
                    vec!["93".into()]
                } else {
                    vec![]
                },
                pos: "10".into(),
                units: 1,
            }],
        },
        policy_version: 9,
        rule_trace: vec!["synthetic".into()],
        at: t(31),
    });
    commands.push(EncounterCommand::CreateFollowUpTask {
        task_id,
        description: "Order basic metabolic panel before next visit".into(),
        owner: "care-team".into(),
        due: t(80 * 24 * 60),
        at: t(48 * 60),
    });
    let mut state = Encounter::default();
    let mut events = Vec::new();
    for command in &commands {
        for event in state.decide(command).expect("the reference visit is valid") {
            state.apply(&event);
            events.push(event);
        }
    }
    events
}

fn validate_r4(resource: &Value) -> Result<(), String> {
    let text = resource.to_string();
    fhirbolt::json::from_str::<fhirbolt::model::r4::Resource>(
        &text,
        Some(DeserializationConfig {
            mode: DeserializationMode::Strict,
        }),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn all_resources() -> Vec<Value> {
    let mut resources = Vec::new();
    for (audio, ai) in [(false, true), (true, false)] {
        let record = EncounterRecord::from_events("clinic-a", &reference_events(audio, ai));
        for entry in transaction_bundle(&record)["entry"].as_array().unwrap() {
            resources.push(entry["resource"].clone());
        }
    }
    let readings = [
        ("8480-6", 128.0, "mm[Hg]"),
        ("8867-4", 72.0, "/min"),
        ("29463-7", 81.4, "kg"),
        ("59408-5", 97.0, "%"),
        ("2339-0", 104.0, "mg/dL"),
    ]
    .map(|(code, value, unit)| Reading {
        code: code.into(),
        value,
        unit: unit.into(),
        effective_at: t(60),
        device_id: "synthetic-cuff-1".into(),
    });
    resources.extend(observations_for(
        "clinic-a",
        Uuid::from_u128(2),
        Uuid::from_u128(9),
        &readings,
    ));
    resources
}

#[test]
fn every_resource_type_written_validates_as_fhir_r4() {
    let resources = all_resources();
    let mut types: Vec<&str> = resources
        .iter()
        .map(|r| r["resourceType"].as_str().unwrap())
        .collect();
    types.sort();
    types.dedup();
    assert_eq!(
        types,
        [
            "Appointment",
            "ChargeItem",
            "Composition",
            "DocumentReference",
            "Encounter",
            "Observation",
            "Provenance",
            "Task"
        ]
    );
    for resource in &resources {
        if let Err(error) = validate_r4(resource) {
            panic!(
                "{} is not valid FHIR R4: {error}\n{resource:#}",
                resource["resourceType"]
            );
        }
        let key = BusinessKey::of(resource).expect("every resource carries a business key");
        assert!(key.system.starts_with("urn:chartline:clinic-a:"), "{key:?}");
        // Contained resources are referenced from the container (dom-3).
        for contained in resource["contained"].as_array().into_iter().flatten() {
            let local = format!("#{}", contained["id"].as_str().unwrap());
            assert!(resource.to_string().contains(&format!("\"{local}\"")));
        }
    }
}

#[test]
fn the_validator_rejects_broken_resources() {
    // A test that cannot fail proves nothing: show the validator catches what we check.
    let resources = all_resources();
    let appointment = resources
        .iter()
        .find(|r| r["resourceType"] == "Appointment")
        .unwrap();
    let mut missing_status = appointment.clone();
    missing_status.as_object_mut().unwrap().remove("status");
    assert!(
        validate_r4(&missing_status).is_err(),
        "a required element was missing"
    );
    let mut unknown_element = appointment.clone();
    unknown_element["virtual"] = Value::Bool(true);
    assert!(
        validate_r4(&unknown_element).is_err(),
        "R4 Appointment has no `virtual`"
    );
    let mut wrong_type = appointment.clone();
    wrong_type["minutesDuration"] = Value::String("twenty".into());
    assert!(
        validate_r4(&wrong_type).is_err(),
        "minutesDuration is a positiveInt"
    );
}

#[test]
fn ai_drafted_note_is_labelled_and_has_provenance() {
    let record = EncounterRecord::from_events("clinic-a", &reference_events(false, true));
    let bundle = transaction_bundle(&record);
    let resources: Vec<&Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let doc = resources
        .iter()
        .find(|r| r["resourceType"] == "DocumentReference")
        .unwrap();
    assert_eq!(doc["meta"]["security"][0]["code"], "AIAST");
    assert_eq!(doc["docStatus"], "final");
    assert_eq!(doc["type"]["coding"][0]["code"], "11506-3");
    let provenance = resources
        .iter()
        .find(|r| r["resourceType"] == "Provenance")
        .unwrap();
    let agents = provenance["agent"].as_array().unwrap();
    assert_eq!(agents[0]["who"]["type"], "Device");
    assert_eq!(agents[1]["who"]["identifier"]["value"], "dr-synthetic-1");
    // A clinician-drafted note has neither.
    let record = EncounterRecord::from_events("clinic-a", &reference_events(false, false));
    let bundle = transaction_bundle(&record).to_string();
    assert!(!bundle.contains("AIAST") && !bundle.contains("Provenance"));
}

fn check_snapshot(name: &str, actual: &Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.json"));
    let rendered = format!("{}\n", serde_json::to_string_pretty(actual).unwrap());
    if std::env::var("CHARTLINE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with CHARTLINE_BLESS=1",
            path.display()
        )
    });
    assert!(
        expected == rendered,
        "snapshot {name} differs; re-bless with CHARTLINE_BLESS=1 if intended.\nexpected:\n{expected}\nactual:\n{rendered}"
    );
}

#[test]
fn bundle_snapshot_of_a_reference_video_visit() {
    let record = EncounterRecord::from_events("clinic-a", &reference_events(false, true));
    check_snapshot("video_visit_bundle", &transaction_bundle(&record));
}

#[test]
fn bundle_snapshot_of_an_audio_only_visit() {
    let record = EncounterRecord::from_events("clinic-a", &reference_events(true, false));
    let bundle = transaction_bundle(&record);
    let charge = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == "ChargeItem")
        .unwrap();
    assert!(charge.to_string().contains("\"code\":\"93\""));
    check_snapshot("audio_only_visit_bundle", &bundle);
}
