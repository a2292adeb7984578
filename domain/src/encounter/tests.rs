//! Encounter decisions: the accept and the reject path of every command
//! (Given/When/Then), and property tests over arbitrary command sequences.

use super::*;
use crate::testing::given;
use chrono::{Duration, TimeZone};
use proptest::prelude::*;

fn t(minute: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 14, 0, 0).unwrap() + Duration::minutes(minute)
}

fn schedule_cmd() -> Schedule {
    Schedule {
        encounter_id: Uuid::from_u128(0xE1),
        patient_id: Uuid::from_u128(0x51),
        practitioner_id: "dr-synthetic-1".into(),
        visit_type: VisitType {
            service: ServiceKind::EMVisit,
            patient_status: PatientStatus::Established,
            level: Some(3),
            appointment_type: AppointmentType::Followup,
        },
        planned_modality: Modality::Video,
        window_start: t(60),
        window_end: t(80),
        patient_location: PatientLocation::Home,
        payer: Payer::Medicare,
        site: Site::PhysicianOffice,
        at: t(0),
    }
}

fn scheduled() -> EncounterEvent {
    let s = schedule_cmd();
    EncounterEvent::Scheduled(Scheduled {
        encounter_id: s.encounter_id,
        patient_id: s.patient_id,
        practitioner_id: s.practitioner_id,
        visit_type: s.visit_type,
        planned_modality: s.planned_modality,
        window_start: s.window_start,
        window_end: s.window_end,
        patient_location: s.patient_location,
        payer: s.payer,
        site: s.site,
        at: s.at,
    })
}

fn checked_in() -> EncounterEvent {
    EncounterEvent::CheckedIn(CheckedIn { at: t(55) })
}

fn started() -> EncounterEvent {
    EncounterEvent::ConsultationStarted(ConsultationStarted {
        modality: Modality::Video,
        at: t(60),
    })
}

fn ended() -> EncounterEvent {
    EncounterEvent::ConsultationEnded(ConsultationEnded {
        duration_seconds: 1200,
        video_seconds: 1200,
        audio_only_seconds: 0,
        modality_used: Modality::Video,
        at: t(80),
    })
}

fn soap() -> SoapSections {
    SoapSections {
        subjective: "Synthetic patient reports stable symptoms.".into(),
        objective: "Home BP 128/82.".into(),
        assessment: "Hypertension, controlled.".into(),
        plan: "Continue current medication; recheck in 3 months.".into(),
    }
}

fn ai_author() -> NoteAuthor {
    NoteAuthor::AiScribe {
        vendor: "synthetic-scribe".into(),
        model_id: "scribe-2026-01".into(),
    }
}

fn drafted() -> EncounterEvent {
    EncounterEvent::NoteDrafted(NoteDrafted {
        author: ai_author(),
        note_type: NoteType::ProgressNote,
        sections: soap(),
        at: t(82),
    })
}

fn signed() -> EncounterEvent {
    EncounterEvent::NoteSigned(NoteSigned {
        practitioner_id: "dr-synthetic-1".into(),
        ai_assisted: true,
        at: t(90),
    })
}

fn billable() -> CodingOutcome {
    CodingOutcome::Billable {
        codes: vec![AssignedCode {
            code: "99213".into(),
            modifiers: vec![],
            pos: "10".into(),
            units: 1,
        }],
    }
}

fn coded() -> EncounterEvent {
    EncounterEvent::CodesAssigned(CodesAssigned {
        outcome: billable(),
        policy_version: 3,
        rule_trace: vec!["medicare.e_m.established".into()],
        at: t(91),
    })
}

fn through_signed() -> Vec<EncounterEvent> {
    vec![
        scheduled(),
        checked_in(),
        started(),
        ended(),
        drafted(),
        signed(),
    ]
}

#[test]
fn schedule_accepts_a_virtual_visit_and_rejects_bad_input() {
    given::<Encounter>(vec![])
        .when(EncounterCommand::Schedule(schedule_cmd()))
        .then(vec![scheduled()]);
    given::<Encounter>(vec![scheduled()])
        .when(EncounterCommand::Schedule(schedule_cmd()))
        .then_err(EncounterError::AlreadyScheduled);
    let mut backwards = schedule_cmd();
    backwards.window_end = backwards.window_start;
    given::<Encounter>(vec![])
        .when(EncounterCommand::Schedule(backwards))
        .then_err(EncounterError::InvalidWindow);
    let mut bad_level = schedule_cmd();
    bad_level.visit_type.level = Some(6);
    given::<Encounter>(vec![])
        .when(EncounterCommand::Schedule(bad_level))
        .then_err(EncounterError::InvalidVisitType(
            "E/M level 6 is not 1-5".into(),
        ));
    let mut new_level_one = schedule_cmd();
    new_level_one.visit_type.patient_status = PatientStatus::New;
    new_level_one.visit_type.level = Some(1);
    given::<Encounter>(vec![])
        .when(EncounterCommand::Schedule(new_level_one))
        .then_err(EncounterError::InvalidVisitType(
            "new-patient E/M starts at level 2 (99201 was deleted in 2021)".into(),
        ));
}

#[test]
fn reschedule_cancel_and_no_show() {
    let reschedule = |at| EncounterCommand::Reschedule {
        window_start: t(120),
        window_end: t(140),
        reason: "patient request".into(),
        at,
    };
    let state = given::<Encounter>(vec![scheduled()])
        .when(reschedule(t(10)))
        .then_ok(|events| assert_eq!(events.len(), 1));
    assert_eq!(state.schedule.unwrap().window_start, t(120));
    given::<Encounter>(vec![])
        .when(reschedule(t(10)))
        .then_err(EncounterError::NotScheduled);
    given::<Encounter>(vec![scheduled(), checked_in(), started()])
        .when(reschedule(t(70)))
        .then_err(EncounterError::InvalidState("in_consultation"));

    let cancelled = EncounterEvent::Cancelled(Cancelled {
        reason: "patient unwell".into(),
        at: t(10),
    });
    given::<Encounter>(vec![scheduled()])
        .when(EncounterCommand::Cancel {
            reason: "patient unwell".into(),
            at: t(10),
        })
        .then(vec![cancelled.clone()]);
    given::<Encounter>(vec![scheduled()])
        .when(EncounterCommand::Cancel {
            reason: " ".into(),
            at: t(10),
        })
        .then_err(EncounterError::EmptyField("reason"));
    given::<Encounter>(vec![scheduled(), cancelled.clone()])
        .when(EncounterCommand::CheckIn { at: t(55) })
        .then_err(EncounterError::InvalidState("cancelled"));

    given::<Encounter>(vec![scheduled()])
        .when(EncounterCommand::MarkNoShow { at: t(75) })
        .then(vec![EncounterEvent::NoShow(NoShow { at: t(75) })]);
    given::<Encounter>(vec![scheduled(), cancelled])
        .when(EncounterCommand::MarkNoShow { at: t(75) })
        .then_err(EncounterError::InvalidState("cancelled"));
}

#[test]
fn check_in_accepts_once() {
    given::<Encounter>(vec![scheduled()])
        .when(EncounterCommand::CheckIn { at: t(55) })
        .then(vec![checked_in()]);
    given::<Encounter>(vec![scheduled(), checked_in()])
        .when(EncounterCommand::CheckIn { at: t(56) })
        .then_err(EncounterError::InvalidState("checked_in"));
    given::<Encounter>(vec![])
        .when(EncounterCommand::CheckIn { at: t(55) })
        .then_err(EncounterError::NotScheduled);
}

#[test]
fn consultation_start_modality_fallback_and_end() {
    given::<Encounter>(vec![scheduled(), checked_in()])
        .when(EncounterCommand::StartConsultation {
            modality: Modality::Video,
            at: t(60),
        })
        .then(vec![started()]);
    given::<Encounter>(vec![scheduled(), checked_in(), started()])
        .when(EncounterCommand::StartConsultation {
            modality: Modality::Video,
            at: t(61),
        })
        .then_err(EncounterError::ConsultationAlreadyStarted);

    // Video for 5 minutes, audio-only fallback for 15: audio-only carried the visit.
    let fallback = EncounterEvent::ModalityChanged(ModalityChanged {
        from: Modality::Video,
        to: Modality::AudioOnly,
        reason: "patient bandwidth".into(),
        at: t(65),
    });
    given::<Encounter>(vec![scheduled(), checked_in(), started()])
        .when(EncounterCommand::ChangeModality {
            to: Modality::AudioOnly,
            reason: "patient bandwidth".into(),
            at: t(65),
        })
        .then(vec![fallback.clone()]);
    given::<Encounter>(vec![scheduled(), checked_in(), started(), fallback.clone()])
        .when(EncounterCommand::ChangeModality {
            to: Modality::AudioOnly,
            reason: "again".into(),
            at: t(66),
        })
        .then_err(EncounterError::ModalityUnchanged(Modality::AudioOnly));
    given::<Encounter>(vec![scheduled(), checked_in()])
        .when(EncounterCommand::ChangeModality {
            to: Modality::AudioOnly,
            reason: "x".into(),
            at: t(61),
        })
        .then_err(EncounterError::ConsultationNotStarted);

    let state = given::<Encounter>(vec![scheduled(), checked_in(), started(), fallback])
        .when(EncounterCommand::EndConsultation { at: t(80) })
        .then(vec![EncounterEvent::ConsultationEnded(ConsultationEnded {
            duration_seconds: 1200,
            video_seconds: 300,
            audio_only_seconds: 900,
            modality_used: Modality::AudioOnly,
            at: t(80),
        })]);
    assert_eq!(state.status, EncounterStatus::ConsultationEnded);

    given::<Encounter>(vec![scheduled(), checked_in()])
        .when(EncounterCommand::EndConsultation { at: t(80) })
        .then_err(EncounterError::ConsultationNotStarted);
    given::<Encounter>(vec![scheduled(), checked_in(), started(), ended()])
        .when(EncounterCommand::EndConsultation { at: t(81) })
        .then_err(EncounterError::InvalidState("consultation_ended"));
}

#[test]
fn times_are_monotonic() {
    given::<Encounter>(vec![scheduled(), checked_in(), started()])
        .when(EncounterCommand::EndConsultation { at: t(59) })
        .then_err(EncounterError::TimeWentBackwards {
            at: t(59),
            last: t(60),
        });
}

#[test]
fn draft_and_amend_note() {
    given::<Encounter>(vec![scheduled(), checked_in(), started(), ended()])
        .when(EncounterCommand::DraftNote {
            author: ai_author(),
            note_type: NoteType::ProgressNote,
            sections: soap(),
            at: t(82),
        })
        .then(vec![drafted()]);
    given::<Encounter>(vec![scheduled(), checked_in()])
        .when(EncounterCommand::DraftNote {
            author: ai_author(),
            note_type: NoteType::ProgressNote,
            sections: soap(),
            at: t(82),
        })
        .then_err(EncounterError::ConsultationNotStarted);
    given::<Encounter>(vec![
        scheduled(),
        checked_in(),
        started(),
        ended(),
        drafted(),
    ])
    .when(EncounterCommand::DraftNote {
        author: ai_author(),
        note_type: NoteType::ProgressNote,
        sections: soap(),
        at: t(83),
    })
    .then_err(EncounterError::NoteAlreadyDrafted);
    given::<Encounter>(vec![scheduled(), checked_in(), started(), ended()])
        .when(EncounterCommand::DraftNote {
            author: ai_author(),
            note_type: NoteType::ProgressNote,
            sections: SoapSections::default(),
            at: t(82),
        })
        .then_err(EncounterError::EmptyNote);

    let clinician = NoteAuthor::Clinician {
        practitioner_id: "dr-synthetic-1".into(),
    };
    let mut edited = soap();
    edited.plan = "Increase dose; recheck in 4 weeks.".into();
    let state = given::<Encounter>(vec![
        scheduled(),
        checked_in(),
        started(),
        ended(),
        drafted(),
    ])
    .when(EncounterCommand::AmendNote {
        author: clinician.clone(),
        sections: edited.clone(),
        at: t(85),
    })
    .then_ok(|events| assert_eq!(events.len(), 1));
    let note = state.note.unwrap();
    assert_eq!(note.sections, edited);
    assert!(
        note.ai_assisted,
        "an AI draft stays AI-assisted after human edits"
    );
    given::<Encounter>(through_signed())
        .when(EncounterCommand::AmendNote {
            author: clinician.clone(),
            sections: edited.clone(),
            at: t(95),
        })
        .then_err(EncounterError::NoteAlreadySigned);
    given::<Encounter>(vec![scheduled(), checked_in(), started(), ended()])
        .when(EncounterCommand::AmendNote {
            author: clinician,
            sections: edited,
            at: t(85),
        })
        .then_err(EncounterError::NoNote);
}

#[test]
fn sign_note_needs_ended_consultation_and_happens_once() {
    let sign = |at| EncounterCommand::SignNote {
        practitioner_id: "dr-synthetic-1".into(),
        at,
    };
    given::<Encounter>(vec![
        scheduled(),
        checked_in(),
        started(),
        ended(),
        drafted(),
    ])
    .when(sign(t(90)))
    .then(vec![signed()]);
    let during = EncounterEvent::NoteDrafted(NoteDrafted {
        author: ai_author(),
        note_type: NoteType::ProgressNote,
        sections: soap(),
        at: t(70),
    });
    given::<Encounter>(vec![scheduled(), checked_in(), started(), during])
        .when(sign(t(75)))
        .then_err(EncounterError::ConsultationNotEnded);
    given::<Encounter>(through_signed())
        .when(sign(t(95)))
        .then_err(EncounterError::NoteAlreadySigned);
    given::<Encounter>(vec![scheduled(), checked_in(), started(), ended()])
        .when(sign(t(90)))
        .then_err(EncounterError::NoNote);
}

#[test]
fn addendum_only_after_signing() {
    let addendum = |at| EncounterCommand::AddAddendum {
        author_id: "dr-synthetic-1".into(),
        text: "Lab result reviewed: within range.".into(),
        at,
    };
    let state = given::<Encounter>(through_signed())
        .when(addendum(t(120)))
        .then_ok(|events| {
            assert!(
                matches!(&events[0], EncounterEvent::AddendumAdded(a) if a.addendum_number == 1)
            )
        });
    assert_eq!(state.note.unwrap().addenda.len(), 1);
    given::<Encounter>(vec![
        scheduled(),
        checked_in(),
        started(),
        ended(),
        drafted(),
    ])
    .when(addendum(t(120)))
    .then_err(EncounterError::NoteNotSigned);
}

#[test]
fn codes_only_after_signing_and_revisions_are_new_events() {
    let assign = |outcome, version, at| EncounterCommand::AssignCodes {
        outcome,
        policy_version: version,
        rule_trace: vec!["medicare.e_m.established".into()],
        at,
    };
    let mut history = through_signed();
    given::<Encounter>(history.clone())
        .when(assign(billable(), 3, t(91)))
        .then(vec![coded()]);
    given::<Encounter>(vec![
        scheduled(),
        checked_in(),
        started(),
        ended(),
        drafted(),
    ])
    .when(assign(billable(), 3, t(91)))
    .then_err(EncounterError::NoteNotSigned);
    given::<Encounter>(history.clone())
        .when(assign(CodingOutcome::Billable { codes: vec![] }, 3, t(91)))
        .then_err(EncounterError::NoCodesInBillableOutcome);
    history.push(coded());
    // Redelivered evaluation with the same policy and result: no new event.
    given::<Encounter>(history.clone())
        .when(assign(billable(), 3, t(92)))
        .then(vec![]);
    // A new policy version with a different outcome: a revision, never an edit.
    given::<Encounter>(history)
        .when(assign(
            CodingOutcome::Hold {
                reasons: vec!["coverage lapse".into()],
            },
            4,
            t(92),
        ))
        .then_ok(|events| assert!(matches!(events[0], EncounterEvent::CodesRevised(_))));
}

#[test]
fn follow_up_tasks() {
    let task = Uuid::from_u128(0x7A);
    let create = |task_id, at| EncounterCommand::CreateFollowUpTask {
        task_id,
        description: "Order lipid panel".into(),
        owner: "care-team-1".into(),
        due: t(60 * 24 * 7),
        at,
    };
    let created = EncounterEvent::FollowUpTaskCreated(FollowUpTaskCreated {
        task_id: task,
        description: "Order lipid panel".into(),
        owner: "care-team-1".into(),
        due: t(60 * 24 * 7),
        at: t(91),
    });
    given::<Encounter>(through_signed())
        .when(create(task, t(91)))
        .then(vec![created.clone()]);
    let mut history = through_signed();
    history.push(created);
    given::<Encounter>(history)
        .when(create(task, t(92)))
        .then_err(EncounterError::DuplicateTask(task));
    given::<Encounter>(vec![scheduled(), checked_in(), started()])
        .when(create(task, t(70)))
        .then_err(EncounterError::ConsultationNotEnded);
}

#[test]
fn write_back_is_gated_on_identity_and_tracks_outcomes() {
    let request = |identity, at| EncounterCommand::RequestWriteBack {
        artifact: WriteBackArtifact::DocumentReference,
        patient_identity: identity,
        at,
    };
    given::<Encounter>(through_signed())
        .when(request(IdentityStatus::UnderReview, t(92)))
        .then_err(EncounterError::IdentityNotResolved(
            IdentityStatus::UnderReview,
        ));
    given::<Encounter>(through_signed())
        .when(request(IdentityStatus::PendingMatch, t(92)))
        .then_err(EncounterError::IdentityNotResolved(
            IdentityStatus::PendingMatch,
        ));
    let requested = EncounterEvent::WriteBackRequested(WriteBackRequested {
        artifact: WriteBackArtifact::DocumentReference,
        at: t(92),
    });
    given::<Encounter>(through_signed())
        .when(request(IdentityStatus::Linked, t(92)))
        .then(vec![requested.clone()]);
    given::<Encounter>(vec![scheduled(), checked_in(), started(), ended()])
        .when(request(IdentityStatus::Linked, t(92)))
        .then_err(EncounterError::NoNote);

    let mut history = through_signed();
    history.push(requested);
    let failed_state = given::<Encounter>(history.clone())
        .when(EncounterCommand::RecordWriteBackFailed {
            artifact: WriteBackArtifact::DocumentReference,
            status: Some(503),
            message: "EHR unavailable".into(),
            retryable: true,
            at: t(93),
        })
        .then_ok(|events| {
            assert!(matches!(&events[0], EncounterEvent::WriteBackFailed(f) if f.attempt == 1))
        });
    assert_eq!(failed_state.write_backs[0].state, WriteBackState::Failed);
    let ok_state = given::<Encounter>(history)
        .when(EncounterCommand::RecordWriteBackSucceeded {
            artifact: WriteBackArtifact::DocumentReference,
            ehr_resource_id: "DocumentReference/123".into(),
            ehr_version: "1".into(),
            at: t(93),
        })
        .then_ok(|_| {});
    assert_eq!(ok_state.write_backs[0].state, WriteBackState::Succeeded);
    given::<Encounter>(through_signed())
        .when(EncounterCommand::RecordWriteBackSucceeded {
            artifact: WriteBackArtifact::ChargeItem,
            ehr_resource_id: "ChargeItem/1".into(),
            ehr_version: "1".into(),
            at: t(93),
        })
        .then_err(EncounterError::WriteBackNotRequested(
            WriteBackArtifact::ChargeItem,
        ));
    given::<Encounter>(through_signed())
        .when(EncounterCommand::RecordWriteBackFailed {
            artifact: WriteBackArtifact::Appointment,
            status: None,
            message: "timeout".into(),
            retryable: true,
            at: t(93),
        })
        .then_err(EncounterError::WriteBackNotRequested(
            WriteBackArtifact::Appointment,
        ));
}

#[test]
fn phi_transfer_blocked_is_recorded_once_and_a_later_write_back_moves_on() {
    let block = |reason: &str, at| EncounterCommand::RecordPhiTransferBlocked {
        artifact: WriteBackArtifact::DocumentReference,
        component: "ehr-a".into(),
        reason: reason.into(),
        checked_at: t(200),
        at,
    };
    let blocked = PhiTransferBlocked {
        artifact: WriteBackArtifact::DocumentReference,
        component: "ehr-a".into(),
        reason: "its BAA expired after 2026-01-31".into(),
        checked_at: t(200),
        at: t(92),
    };
    let state = given::<Encounter>(through_signed())
        .when(block("its BAA expired after 2026-01-31", t(92)))
        .then(vec![EncounterEvent::PhiTransferBlocked(blocked.clone())]);
    let status = &state.write_backs[0];
    assert_eq!(status.state, WriteBackState::Blocked);
    assert_eq!(status.attempts, 0);
    assert_eq!(
        status.last_error.as_deref(),
        Some("PHI transfer to ehr-a blocked: its BAA expired after 2026-01-31")
    );

    // The same refusal again (a re-run): nothing new. Another reason is new.
    let mut history = through_signed();
    history.push(EncounterEvent::PhiTransferBlocked(blocked));
    given::<Encounter>(history.clone())
        .when(block("its BAA expired after 2026-01-31", t(93)))
        .then(vec![]);
    given::<Encounter>(history.clone())
        .when(block("no BAA covers it", t(93)))
        .then_ok(|events| assert_eq!(events.len(), 1));

    // Coverage fixed: the write-back proceeds and the state leaves Blocked.
    let requested = given::<Encounter>(history)
        .when(EncounterCommand::RequestWriteBack {
            artifact: WriteBackArtifact::DocumentReference,
            patient_identity: IdentityStatus::Linked,
            at: t(94),
        })
        .then_ok(|_| {});
    assert_eq!(requested.write_backs[0].state, WriteBackState::Requested);

    // Rejections: nothing to write yet, empty component or reason, not scheduled.
    given::<Encounter>(vec![scheduled(), checked_in(), started(), ended()])
        .when(block("no BAA covers it", t(92)))
        .then_err(EncounterError::NoNote);
    given::<Encounter>(through_signed())
        .when(block(" ", t(92)))
        .then_err(EncounterError::EmptyField("reason"));
    given::<Encounter>(through_signed())
        .when(EncounterCommand::RecordPhiTransferBlocked {
            artifact: WriteBackArtifact::Appointment,
            component: "".into(),
            reason: "no BAA covers it".into(),
            checked_at: t(200),
            at: t(92),
        })
        .then_err(EncounterError::EmptyField("component"));
    given::<Encounter>(vec![])
        .when(block("no BAA covers it", t(92)))
        .then_err(EncounterError::NotScheduled);
}

#[test]
fn ehr_drift_is_recorded_once_against_the_current_acknowledgement_and_a_rewrite_clears_it() {
    let artifact = WriteBackArtifact::DocumentReference;
    let mut history = through_signed();
    history.push(EncounterEvent::WriteBackRequested(WriteBackRequested {
        artifact: artifact.clone(),
        at: t(92),
    }));
    history.push(EncounterEvent::WriteBackSucceeded(WriteBackSucceeded {
        artifact: artifact.clone(),
        ehr_resource_id: "DocumentReference/abc".into(),
        ehr_version: "2".into(),
        at: t(92),
    }));
    let detect_at = |version: &str, found: &str, at| EncounterCommand::DetectEhrDrift {
        artifact: WriteBackArtifact::DocumentReference,
        acknowledged_resource_id: "DocumentReference/abc".into(),
        acknowledged_version: version.into(),
        kind: DriftKind::StatusChanged,
        resource: "DocumentReference/abc".into(),
        expected: "docStatus final".into(),
        found: found.into(),
        detected_at: t(500),
        at,
    };
    let detect = |version: &str, found: &str| detect_at(version, found, t(92));
    let drift = EncounterEvent::EhrDriftDetected(EhrDriftDetected {
        artifact: artifact.clone(),
        kind: DriftKind::StatusChanged,
        ehr_resource_id: "DocumentReference/abc".into(),
        ehr_version: "2".into(),
        resource: "DocumentReference/abc".into(),
        expected: "docStatus final".into(),
        found: "docStatus preliminary".into(),
        detected_at: t(500),
        at: t(92),
    });
    // Accepted against the current acknowledgement.
    let state = given::<Encounter>(history.clone())
        .when(detect("2", "docStatus preliminary"))
        .then(vec![drift.clone()]);
    assert_eq!(state.write_backs[0].drift.len(), 1);
    assert_eq!(state.write_backs[0].drift[0].kind, DriftKind::StatusChanged);
    // The same finding again: nothing new (re-running the job on an unchanged EHR).
    let mut drifted = history.clone();
    drifted.push(drift);
    given::<Encounter>(drifted.clone())
        .when(detect("2", "docStatus preliminary"))
        .then(vec![]);
    // A different finding on the same acknowledgement is new.
    given::<Encounter>(drifted.clone())
        .when(detect("2", "docStatus entered-in-error"))
        .then_ok(|events| assert_eq!(events.len(), 1));
    // Against an older acknowledgement (the read raced a newer write): refused.
    given::<Encounter>(history.clone())
        .when(detect("1", "docStatus preliminary"))
        .then_err(EncounterError::DriftAgainstStaleAcknowledgement {
            artifact: artifact.clone(),
            resource_id: "DocumentReference/abc".into(),
            version: "1".into(),
        });
    // While a new write is in flight (requested, no outcome yet): refused too.
    let mut in_flight = history.clone();
    in_flight.push(EncounterEvent::WriteBackRequested(WriteBackRequested {
        artifact: artifact.clone(),
        at: t(93),
    }));
    given::<Encounter>(in_flight)
        .when(detect_at("2", "docStatus preliminary", t(93)))
        .then_err(EncounterError::DriftAgainstStaleAcknowledgement {
            artifact: artifact.clone(),
            resource_id: "DocumentReference/abc".into(),
            version: "2".into(),
        });
    // Never acknowledged: nothing to drift from.
    given::<Encounter>(through_signed())
        .when(detect("2", "docStatus preliminary"))
        .then_err(EncounterError::WriteBackNotRequested(artifact.clone()));
    // Expected = found is no drift.
    given::<Encounter>(history.clone())
        .when(detect("2", "docStatus final"))
        .then_err(EncounterError::NoDrift("docStatus final".into()));
    // Stream time never goes backwards.
    given::<Encounter>(history)
        .when(detect_at("2", "docStatus preliminary", t(91)))
        .then_err(EncounterError::TimeWentBackwards {
            at: t(91),
            last: t(92),
        });
    // A successful re-write resolves the drift; the same finding later is recorded anew.
    drifted.push(EncounterEvent::WriteBackRequested(WriteBackRequested {
        artifact: artifact.clone(),
        at: t(94),
    }));
    let rewritten = given::<Encounter>(drifted.clone())
        .when(EncounterCommand::RecordWriteBackSucceeded {
            artifact: artifact.clone(),
            ehr_resource_id: "DocumentReference/abc".into(),
            ehr_version: "3".into(),
            at: t(94),
        })
        .then_ok(|_| {});
    assert!(rewritten.write_backs[0].drift.is_empty());
}

#[test]
fn charge_release_needs_billable_codes_once() {
    let mut history = through_signed();
    given::<Encounter>(history.clone())
        .when(EncounterCommand::ReleaseCharge { at: t(95) })
        .then_err(EncounterError::NoCodes);
    history.push(coded());
    let released = EncounterEvent::ChargeReleased(ChargeReleased {
        codes: match billable() {
            CodingOutcome::Billable { codes } => codes,
            _ => unreachable!(),
        },
        policy_version: 3,
        at: t(95),
    });
    given::<Encounter>(history.clone())
        .when(EncounterCommand::ReleaseCharge { at: t(95) })
        .then(vec![released.clone()]);
    history.push(released);
    given::<Encounter>(history.clone())
        .when(EncounterCommand::ReleaseCharge { at: t(96) })
        .then_err(EncounterError::ChargeAlreadyReleased);
    let mut held = through_signed();
    held.push(EncounterEvent::CodesAssigned(CodesAssigned {
        outcome: CodingOutcome::Hold {
            reasons: vec!["coverage lapse".into()],
        },
        policy_version: 4,
        rule_trace: vec![],
        at: t(91),
    }));
    given::<Encounter>(held)
        .when(EncounterCommand::ReleaseCharge { at: t(95) })
        .then_err(EncounterError::NotBillable("held: coverage lapse".into()));
}

// ----------------------------------------------------------------------------------
// Property tests: arbitrary command sequences keep the invariants, and replaying the
// produced events reproduces the state exactly.
// ----------------------------------------------------------------------------------

fn arb_modality() -> impl Strategy<Value = Modality> {
    prop_oneof![Just(Modality::Video), Just(Modality::AudioOnly)]
}

fn arb_identity() -> impl Strategy<Value = IdentityStatus> {
    prop_oneof![
        Just(IdentityStatus::Linked),
        Just(IdentityStatus::UnderReview),
        Just(IdentityStatus::PendingMatch),
        Just(IdentityStatus::ConfirmedNew),
    ]
}

fn arb_artifact() -> impl Strategy<Value = WriteBackArtifact> {
    prop_oneof![
        Just(WriteBackArtifact::Appointment),
        Just(WriteBackArtifact::Encounter),
        Just(WriteBackArtifact::DocumentReference),
        Just(WriteBackArtifact::ChargeItem),
        (0u128..3).prop_map(|n| WriteBackArtifact::Task {
            task_id: Uuid::from_u128(n)
        }),
    ]
}

/// A generated command: a time step (minutes since the previous command, possibly
/// negative to exercise the monotonic-time invariant), a command kind and its inputs.
#[derive(Debug, Clone)]
struct CommandSpec {
    step: i64,
    kind: u8,
    modality: Modality,
    identity: IdentityStatus,
    artifact: WriteBackArtifact,
    task: u128,
    flag: bool,
}

fn arb_command() -> impl Strategy<Value = CommandSpec> {
    (
        -2i64..30,
        0u8..20,
        arb_modality(),
        arb_identity(),
        arb_artifact(),
        0u128..3,
        any::<bool>(),
    )
        .prop_map(
            |(step, kind, modality, identity, artifact, task, flag)| CommandSpec {
                step,
                kind,
                modality,
                identity,
                artifact,
                task,
                flag,
            },
        )
}

fn build_command(spec: &CommandSpec, at: DateTime<Utc>) -> EncounterCommand {
    let CommandSpec {
        modality,
        identity,
        artifact,
        task,
        flag,
        ..
    } = spec.clone();
    match spec.kind {
        0 => EncounterCommand::Schedule(Schedule {
            at,
            ..schedule_cmd()
        }),
        1 => EncounterCommand::Reschedule {
            window_start: at,
            window_end: at + Duration::minutes(20),
            reason: "moved".into(),
            at,
        },
        2 => EncounterCommand::Cancel {
            reason: "unwell".into(),
            at,
        },
        3 => EncounterCommand::MarkNoShow { at },
        4 => EncounterCommand::CheckIn { at },
        5 => EncounterCommand::StartConsultation { modality, at },
        6 => EncounterCommand::ChangeModality {
            to: modality,
            reason: "network".into(),
            at,
        },
        7 => EncounterCommand::EndConsultation { at },
        8 => EncounterCommand::DraftNote {
            author: if flag {
                ai_author()
            } else {
                NoteAuthor::Clinician {
                    practitioner_id: "dr-1".into(),
                }
            },
            note_type: NoteType::ProgressNote,
            sections: soap(),
            at,
        },
        9 => EncounterCommand::AmendNote {
            author: ai_author(),
            sections: soap(),
            at,
        },
        10 => EncounterCommand::SignNote {
            practitioner_id: "dr-1".into(),
            at,
        },
        11 => EncounterCommand::AddAddendum {
            author_id: "dr-1".into(),
            text: "addendum".into(),
            at,
        },
        12 => EncounterCommand::AssignCodes {
            outcome: if flag {
                billable()
            } else {
                CodingOutcome::Hold {
                    reasons: vec!["lapse".into()],
                }
            },
            policy_version: u64::from(flag),
            rule_trace: vec![],
            at,
        },
        13 => EncounterCommand::CreateFollowUpTask {
            task_id: Uuid::from_u128(task),
            description: "task".into(),
            owner: "team".into(),
            due: at,
            at,
        },
        14 => EncounterCommand::RequestWriteBack {
            artifact,
            patient_identity: identity,
            at,
        },
        15 => EncounterCommand::RecordWriteBackSucceeded {
            artifact,
            ehr_resource_id: "X/1".into(),
            ehr_version: "1".into(),
            at,
        },
        16 => EncounterCommand::RecordWriteBackFailed {
            artifact,
            status: Some(500),
            message: "boom".into(),
            retryable: flag,
            at,
        },
        17 => EncounterCommand::DetectEhrDrift {
            artifact,
            acknowledged_resource_id: "X/1".into(),
            acknowledged_version: "1".into(),
            kind: if flag {
                DriftKind::Missing
            } else {
                DriftKind::StatusChanged
            },
            resource: "X/1".into(),
            expected: "status booked".into(),
            found: if flag { "absent" } else { "status cancelled" }.into(),
            detected_at: at,
            at,
        },
        18 => EncounterCommand::RecordPhiTransferBlocked {
            artifact,
            component: "ehr-a".into(),
            reason: if flag {
                "its BAA expired after 2026-01-31"
            } else {
                "no BAA covers it"
            }
            .into(),
            checked_at: at,
            at,
        },
        _ => EncounterCommand::ReleaseCharge { at },
    }
}

/// Invariants that must hold in every reachable state.
fn check_invariants(state: &Encounter, events: &[EncounterEvent]) -> Result<(), TestCaseError> {
    // Event times never go backwards.
    for pair in events.windows(2) {
        prop_assert!(pair[0].at() <= pair[1].at(), "time went backwards");
    }
    let position = |name: &str| events.iter().position(|e| e.event_type() == name);
    let count = |name: &str| events.iter().filter(|e| e.event_type() == name).count();
    prop_assert!(count("Scheduled") <= 1);
    prop_assert!(count("NoteSigned") <= 1, "a note is signed at most once");
    prop_assert!(count("ChargeReleased") <= 1);
    prop_assert!(count("ConsultationEnded") <= 1);
    if let Some(signed) = position("NoteSigned") {
        let ended = position("ConsultationEnded");
        prop_assert!(
            ended.is_some_and(|e| e < signed),
            "signed before the consultation ended"
        );
        // No edits of a signed note except by addendum.
        prop_assert!(events[signed..].iter().all(|e| !matches!(
            e,
            EncounterEvent::NoteDrafted(_) | EncounterEvent::NoteAmended(_)
        )));
    }
    if let Some(coded) = position("CodesAssigned") {
        prop_assert!(
            position("NoteSigned").is_some_and(|s| s < coded),
            "codes before signing"
        );
    }
    if let Some(released) = position("ChargeReleased") {
        prop_assert!(events[released..].iter().all(|e| !matches!(
            e,
            EncounterEvent::CodesAssigned(_) | EncounterEvent::CodesRevised(_)
        )));
    }
    if let Some(ended) = &state.consultation_ended {
        prop_assert!(ended.duration_seconds >= 0, "negative duration");
        prop_assert!(ended.video_seconds >= 0 && ended.audio_only_seconds >= 0);
        prop_assert_eq!(
            ended.video_seconds + ended.audio_only_seconds,
            ended.duration_seconds
        );
    }
    // After cancellation or no-show only write-back bookkeeping may follow (the EHR
    // still has to learn that the appointment was cancelled).
    if let Some(closed) = events
        .iter()
        .position(|e| matches!(e, EncounterEvent::Cancelled(_) | EncounterEvent::NoShow(_)))
    {
        for later in &events[closed + 1..] {
            prop_assert!(
                later.event_type().starts_with("WriteBack")
                    || matches!(
                        later,
                        EncounterEvent::EhrDriftDetected(_) | EncounterEvent::PhiTransferBlocked(_)
                    ),
                "{} after cancellation/no-show",
                later.event_type()
            );
        }
    }
    // Nothing reaches a chart unless identity was resolved: guaranteed by decide; here we
    // check a write-back outcome is always preceded by its request.
    for (index, event) in events.iter().enumerate() {
        let artifact = match event {
            EncounterEvent::WriteBackSucceeded(e) => &e.artifact,
            EncounterEvent::WriteBackFailed(e) => &e.artifact,
            _ => continue,
        };
        prop_assert!(events[..index].iter().any(
            |e| matches!(e, EncounterEvent::WriteBackRequested(r) if &r.artifact == artifact)
        ));
    }
    // Drift is only ever recorded against the artifact's latest outcome, a success.
    for (index, event) in events.iter().enumerate() {
        let EncounterEvent::EhrDriftDetected(drift) = event else {
            continue;
        };
        let last_outcome = events[..index].iter().rev().find(|e| match e {
            EncounterEvent::WriteBackRequested(r) => r.artifact == drift.artifact,
            EncounterEvent::WriteBackSucceeded(s) => s.artifact == drift.artifact,
            EncounterEvent::WriteBackFailed(f) => f.artifact == drift.artifact,
            _ => false,
        });
        prop_assert!(
            matches!(last_outcome, Some(EncounterEvent::WriteBackSucceeded(s)) if s.ehr_version == drift.ehr_version),
            "drift not against the current acknowledgement"
        );
    }
    // Open drift in the state is exactly what was detected since the last success.
    for status in &state.write_backs {
        let since_success = events
            .iter()
            .rev()
            .take_while(|e| !matches!(e, EncounterEvent::WriteBackSucceeded(s) if s.artifact == status.artifact))
            .filter(|e| matches!(e, EncounterEvent::EhrDriftDetected(d) if d.artifact == status.artifact))
            .count();
        prop_assert_eq!(status.drift.len(), since_success);
    }
    // A blocked artifact's state says so until a later write-back event; the same
    // refusal is never recorded twice in a row.
    for status in &state.write_backs {
        let last = events.iter().rev().find(|e| match e {
            EncounterEvent::WriteBackRequested(r) => r.artifact == status.artifact,
            EncounterEvent::WriteBackSucceeded(s) => s.artifact == status.artifact,
            EncounterEvent::WriteBackFailed(f) => f.artifact == status.artifact,
            EncounterEvent::PhiTransferBlocked(b) => b.artifact == status.artifact,
            _ => false,
        });
        prop_assert_eq!(
            status.state == WriteBackState::Blocked,
            matches!(last, Some(EncounterEvent::PhiTransferBlocked(_)))
        );
    }
    let blocks: Vec<&PhiTransferBlocked> = events
        .iter()
        .filter_map(|e| match e {
            EncounterEvent::PhiTransferBlocked(b) => Some(b),
            _ => None,
        })
        .collect();
    for (index, event) in events.iter().enumerate() {
        let EncounterEvent::PhiTransferBlocked(blocked) = event else {
            continue;
        };
        let previous = events[..index].iter().rev().find(|e| match e {
            EncounterEvent::WriteBackRequested(r) => r.artifact == blocked.artifact,
            EncounterEvent::WriteBackSucceeded(s) => s.artifact == blocked.artifact,
            EncounterEvent::WriteBackFailed(f) => f.artifact == blocked.artifact,
            EncounterEvent::PhiTransferBlocked(b) => b.artifact == blocked.artifact,
            _ => false,
        });
        prop_assert!(
            !matches!(previous, Some(EncounterEvent::PhiTransferBlocked(p)) if p.reason == blocked.reason && p.component == blocked.component),
            "the same refusal recorded twice in a row ({} blocks)",
            blocks.len()
        );
    }
    prop_assert_eq!(state.version as usize, events.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_command_sequences_keep_invariants_and_replay(
        commands in proptest::collection::vec(arb_command(), 1..40)
    ) {
        let mut state = Encounter::default();
        let mut events: Vec<EncounterEvent> = Vec::new();
        let mut clock = t(0);
        for spec in &commands {
            clock += Duration::minutes(spec.step);
            let command = build_command(spec, clock);
            let before = state.clone();
            match state.decide(&command) {
                Ok(produced) => {
                    for event in &produced {
                        state.apply(event);
                    }
                    events.extend(produced);
                }
                Err(_) => prop_assert_eq!(&state, &before, "a rejected command changed state"),
            }
            check_invariants(&state, &events)?;
        }
        let replayed = Encounter::replay(events.iter());
        prop_assert_eq!(replayed, state);
    }
}
