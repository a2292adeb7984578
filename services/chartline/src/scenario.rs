//! A telehealth encounter driven through the real command path, step by step, as the
//! external systems would send it: the scheduler books a virtual visit, the video
//! platform reports the session (with an audio-only fallback), an AI scribe drafts the
//! SOAP note, the clinician signs, billing codes it (the reactor), a follow-up task is
//! created. Used by `chartline demo` and by the end-to-end tests (embedded and
//! distributed run the very same steps). Synthetic data only.

use std::time::Duration;

use chartline_infra::bus::Bus;
use chartline_infra::command::send_command;
use chartline_proto::commands::{CommandReply, CommandRequest};
use chartline_proto::{Actor, ActorKind, TenantId};
use chrono::{DateTime, Duration as Minutes, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

/// One step: which service, which command, who sends it, the payload.
#[derive(Debug, Clone)]
pub struct Step {
    pub service: &'static str,
    pub command: &'static str,
    pub actor: Actor,
    pub payload: Value,
    /// Deterministic idempotency key (so a replayed scenario is a retry, not a new visit).
    pub command_id: Uuid,
}

/// The shape of one synthetic visit.
#[derive(Debug, Clone)]
pub struct Visit {
    pub encounter_id: Uuid,
    pub patient_id: Uuid,
    pub practitioner_id: String,
    pub start: DateTime<Utc>,
    pub audio_fallback: bool,
    pub ai_drafted: bool,
    pub level: u8,
    pub new_patient: bool,
    pub payer: &'static str,
    pub at_home: bool,
}

fn step(
    visit: &Visit,
    index: u32,
    service: &'static str,
    command: &'static str,
    actor: Actor,
    payload: Value,
) -> Step {
    let mut bytes = *visit.encounter_id.as_bytes();
    bytes[12..16].copy_from_slice(&index.to_be_bytes());
    Step {
        service,
        command,
        actor,
        payload,
        command_id: uuid::Builder::from_custom_bytes(bytes).into_uuid(),
    }
}

/// Steps up to and including the clinician's signature.
pub fn steps_until_signed(visit: &Visit) -> Vec<Step> {
    let e = visit.encounter_id;
    let t = |minutes: i64| (visit.start + Minutes::minutes(minutes)).to_rfc3339();
    let scheduler = Actor::new(ActorKind::Service, "telehealth-scheduler");
    let video = Actor::new(ActorKind::Service, "video-platform");
    let clinician = Actor::new(ActorKind::Clinician, visit.practitioner_id.clone());
    let mut steps = vec![
        step(
            visit,
            1,
            "scheduling",
            "schedule",
            scheduler.clone(),
            json!({
                "encounter_id": e,
                "patient_id": visit.patient_id,
                "practitioner_id": visit.practitioner_id,
                "visit_type": {
                    "service": "e_m_visit",
                    "patient_status": if visit.new_patient { "new" } else { "established" },
                    "level": visit.level,
                    "appointment_type": if visit.new_patient { "ROUTINE" } else { "FOLLOWUP" },
                },
                "planned_modality": "video",
                "window_start": t(0),
                "window_end": t(20),
                "patient_location": if visit.at_home { "home" } else { "other" },
                "payer": visit.payer,
                "site": "physician_office",
                "at": t(-24 * 60),
            }),
        ),
        step(
            visit,
            2,
            "scheduling",
            "check_in",
            scheduler,
            json!({"encounter_id": e, "at": t(-3)}),
        ),
        step(
            visit,
            3,
            "consultation",
            "start_consultation",
            video.clone(),
            json!({
                "encounter_id": e, "modality": "video", "at": t(0),
            }),
        ),
    ];
    if visit.audio_fallback {
        steps.push(step(visit, 4, "consultation", "change_modality", video.clone(), json!({
            "encounter_id": e, "to": "audio_only", "reason": "patient video stream lost (bandwidth)", "at": t(4),
        })));
    }
    steps.push(step(
        visit,
        5,
        "consultation",
        "end_consultation",
        video,
        json!({"encounter_id": e, "at": t(19)}),
    ));
    let (author_actor, author) = if visit.ai_drafted {
        (
            Actor::new(ActorKind::Ai, "synthetic-scribe/scribe-2026-01"),
            json!({"kind": "ai_scribe", "vendor": "synthetic-scribe", "model_id": "scribe-2026-01"}),
        )
    } else {
        (
            clinician.clone(),
            json!({"kind": "clinician", "practitioner_id": visit.practitioner_id}),
        )
    };
    steps.push(step(visit, 6, "documentation", "draft_note", author_actor, json!({
        "encounter_id": e,
        "author": author,
        "note_type": "progress_note",
        "sections": {
            "subjective": "Synthetic patient reports improved symptoms since last visit.",
            "objective": "Home blood pressure log reviewed; afebrile by report.",
            "assessment": "Essential hypertension, improving on current regimen.",
            "plan": "Continue current medication. Repeat home readings daily. Follow up in 3 months.",
        },
        "at": t(21),
    })));
    steps.push(step(
        visit,
        7,
        "documentation",
        "sign_note",
        clinician,
        json!({
            "encounter_id": e, "practitioner_id": visit.practitioner_id, "at": t(30),
        }),
    ));
    steps
}

/// Steps after coding.
pub fn steps_after_coding(visit: &Visit) -> Vec<Step> {
    let clinician = Actor::new(ActorKind::Clinician, visit.practitioner_id.clone());
    let mut task = *visit.encounter_id.as_bytes();
    task[0] ^= 0xFF;
    vec![step(
        visit,
        8,
        "documentation",
        "create_follow_up_task",
        clinician,
        json!({
            "encounter_id": visit.encounter_id,
            "task_id": Uuid::from_bytes(task),
            "description": "Order basic metabolic panel before next visit",
            "owner": "care-team",
            "due": (visit.start + Minutes::days(80)).to_rfc3339(),
            "at": (visit.start + Minutes::hours(48)).to_rfc3339(),
        }),
    )]
}

/// Sends one step and returns the typed reply.
pub async fn send(bus: &Bus, root: &str, tenant: &TenantId, step: &Step) -> CommandReply {
    let request = CommandRequest {
        command_id: step.command_id,
        actor: step.actor.clone(),
        correlation_id: None,
        payload: step.payload.clone(),
    };
    send_command(
        bus,
        root,
        tenant,
        step.service,
        step.command,
        &request,
        Duration::from_secs(10),
    )
    .await
}

/// A reproducible synthetic visit from a seed.
pub fn synthetic_visit(seed: u64, index: u64, day: DateTime<Utc>) -> Visit {
    let mix = |salt: u64| {
        let mut x = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
        x ^= x >> 30;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    };
    let id = |salt: u64| Uuid::from_u64_pair(mix(salt), mix(salt + 1));
    Visit {
        encounter_id: id(1),
        patient_id: id(3),
        practitioner_id: format!("dr-synthetic-{}", mix(5) % 7 + 1),
        start: day + Minutes::minutes((8 * 60 + (index as i64 % 36) * 15) % (24 * 60)),
        audio_fallback: mix(6) % 5 == 0,
        ai_drafted: mix(7) % 3 != 0,
        level: (mix(8) % 4 + 2) as u8,
        new_patient: mix(9) % 6 == 0,
        payer: if mix(10) % 4 == 0 {
            "commercial"
        } else {
            "medicare"
        },
        at_home: mix(11) % 5 != 0,
    }
}
