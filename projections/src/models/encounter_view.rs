//! `encounter_view`: the current state of every encounter, for listing and filtering
//! (by patient, practitioner, status, payer, date).

use chartline_domain::encounter::{CodingOutcome, EncounterEvent, NoteAuthor};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use super::tag;
use crate::cache::{CacheControl, Row, RowCache};
use crate::db::{TableSpec, Tx};
use crate::engine::Projection;
use crate::error::ProjectionError;
use crate::event::Event;

crate::read_model_row! {
    /// One encounter. Times are RFC 3339 UTC text; `codes` is `code[-mod…]@pos xunits`
    /// joined by `, `; `coding_reasons` a JSON array.
    pub struct EncounterViewRow in "encounter_view" {
        key { encounter_id: String }
        columns {
            tenant: String,
            stream_id: String,
            patient_id: Option<String>,
            practitioner_id: Option<String>,
            status: String,
            service: Option<String>,
            patient_status: Option<String>,
            level: Option<i64>,
            appointment_type: Option<String>,
            payer: Option<String>,
            site: Option<String>,
            patient_location: Option<String>,
            planned_modality: Option<String>,
            current_modality: Option<String>,
            modality_changes: i64,
            window_start: Option<DateTime<Utc>>,
            window_end: Option<DateTime<Utc>>,
            scheduled_at: Option<DateTime<Utc>>,
            checked_in_at: Option<DateTime<Utc>>,
            consultation_started_at: Option<DateTime<Utc>>,
            consultation_ended_at: Option<DateTime<Utc>>,
            duration_seconds: Option<i64>,
            video_seconds: i64,
            audio_only_seconds: i64,
            note_status: String,
            note_type: Option<String>,
            note_ai_assisted: bool,
            note_signed_by: Option<String>,
            note_signed_at: Option<DateTime<Utc>>,
            addenda: i64,
            coding_outcome: Option<String>,
            codes: Option<String>,
            coding_reasons: Option<String>,
            policy_version: Option<i64>,
            follow_up_tasks: i64,
            charge_released: bool,
            cancel_reason: Option<String>,
            last_event_at: Option<DateTime<Utc>>,
            stream_version: i64,
            last_position: i64,
        }
        indexes ["patient_id", "practitioner_id", "status"]
    }
}

impl EncounterViewRow {
    fn new(encounter_id: String, tenant: String, stream_id: String) -> Self {
        EncounterViewRow {
            encounter_id,
            tenant,
            stream_id,
            patient_id: None,
            practitioner_id: None,
            status: "not_scheduled".into(),
            service: None,
            patient_status: None,
            level: None,
            appointment_type: None,
            payer: None,
            site: None,
            patient_location: None,
            planned_modality: None,
            current_modality: None,
            modality_changes: 0,
            window_start: None,
            window_end: None,
            scheduled_at: None,
            checked_in_at: None,
            consultation_started_at: None,
            consultation_ended_at: None,
            duration_seconds: None,
            video_seconds: 0,
            audio_only_seconds: 0,
            note_status: "none".into(),
            note_type: None,
            note_ai_assisted: false,
            note_signed_by: None,
            note_signed_at: None,
            addenda: 0,
            coding_outcome: None,
            codes: None,
            coding_reasons: None,
            policy_version: None,
            follow_up_tasks: 0,
            charge_released: false,
            cancel_reason: None,
            last_event_at: None,
            stream_version: 0,
            last_position: 0,
        }
    }
}

/// `99213-95@10 x1, …`
pub fn format_codes(codes: &[chartline_domain::encounter::AssignedCode]) -> String {
    codes
        .iter()
        .map(|c| {
            let mut text = c.code.clone();
            for modifier in &c.modifiers {
                text.push('-');
                text.push_str(modifier);
            }
            format!("{text}@{} x{}", c.pos, c.units)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Default)]
pub struct EncounterView {
    rows: RowCache<EncounterViewRow>,
}

impl Projection for EncounterView {
    fn name(&self) -> &'static str {
        "encounter_view"
    }

    fn tables(&self) -> Vec<&'static TableSpec> {
        vec![EncounterViewRow::TABLE]
    }

    fn caches(&mut self) -> Vec<&mut dyn CacheControl> {
        vec![&mut self.rows]
    }

    fn apply<'a>(
        &'a mut self,
        tx: &'a mut Tx,
        event: Event<'a>,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(self.apply_event(tx, event))
    }
}

impl EncounterView {
    async fn apply_event(&mut self, tx: &mut Tx, event: Event<'_>) -> Result<(), ProjectionError> {
        let Some(domain) = event.encounter()? else {
            return Ok(());
        };
        let position = event.envelope.global_position as i64;
        let key = (event.aggregate_id(),);
        let row = self
            .rows
            .get_or_insert_with(tx, &key, || {
                EncounterViewRow::new(
                    key.0.clone(),
                    event.tenant(),
                    event.envelope.stream_id.to_string(),
                )
            })
            .await?;
        if row.last_position >= position {
            return Ok(());
        }
        row.last_position = position;
        row.stream_version = event.envelope.stream_version as i64;
        row.last_event_at = Some(domain.at());
        use EncounterEvent as E;
        match domain {
            E::Scheduled(e) => {
                row.status = "scheduled".into();
                row.patient_id = Some(e.patient_id.to_string());
                row.practitioner_id = Some(e.practitioner_id.clone());
                row.service = Some(tag(&e.visit_type.service));
                row.patient_status = Some(tag(&e.visit_type.patient_status));
                row.level = e.visit_type.level.map(i64::from);
                row.appointment_type = Some(tag(&e.visit_type.appointment_type));
                row.payer = Some(tag(&e.payer));
                row.site = Some(tag(&e.site));
                row.patient_location = Some(tag(&e.patient_location));
                row.planned_modality = Some(tag(&e.planned_modality));
                row.window_start = Some(e.window_start);
                row.window_end = Some(e.window_end);
                row.scheduled_at = Some(e.at);
            }
            E::Rescheduled(e) => {
                row.window_start = Some(e.window_start);
                row.window_end = Some(e.window_end);
            }
            E::Cancelled(e) => {
                row.status = "cancelled".into();
                row.cancel_reason = Some(e.reason.clone());
            }
            E::NoShow(_) => row.status = "no_show".into(),
            E::CheckedIn(e) => {
                row.status = "checked_in".into();
                row.checked_in_at = Some(e.at);
            }
            E::ConsultationStarted(e) => {
                row.status = "in_consultation".into();
                row.consultation_started_at = Some(e.at);
                row.current_modality = Some(tag(&e.modality));
            }
            E::ModalityChanged(e) => {
                row.current_modality = Some(tag(&e.to));
                row.modality_changes += 1;
            }
            E::ConsultationEnded(e) => {
                row.status = "consultation_ended".into();
                row.consultation_ended_at = Some(e.at);
                row.duration_seconds = Some(e.duration_seconds);
                row.video_seconds = e.video_seconds;
                row.audio_only_seconds = e.audio_only_seconds;
                row.current_modality = Some(tag(&e.modality_used));
            }
            E::NoteDrafted(e) => {
                row.note_status = "draft".into();
                row.note_type = Some(tag(&e.note_type));
                row.note_ai_assisted = matches!(e.author, NoteAuthor::AiScribe { .. });
                row.note_signed_by = None;
                row.note_signed_at = None;
            }
            E::NoteAmended(e) => {
                row.note_ai_assisted |= matches!(e.author, NoteAuthor::AiScribe { .. });
            }
            E::NoteSigned(e) => {
                row.note_status = "signed".into();
                row.note_signed_by = Some(e.practitioner_id.clone());
                row.note_signed_at = Some(e.at);
                row.note_ai_assisted |= e.ai_assisted;
            }
            E::AddendumAdded(_) => row.addenda += 1,
            E::CodesAssigned(e) | E::CodesRevised(e) => {
                row.policy_version = Some(e.policy_version as i64);
                match &e.outcome {
                    CodingOutcome::Billable { codes } => {
                        row.coding_outcome = Some("billable".into());
                        row.codes = Some(format_codes(codes));
                        row.coding_reasons = None;
                    }
                    CodingOutcome::Hold { reasons } => {
                        row.coding_outcome = Some("hold".into());
                        row.codes = None;
                        row.coding_reasons = Some(serde_json::json!(reasons).to_string());
                    }
                    CodingOutcome::NotBillable { reasons } => {
                        row.coding_outcome = Some("not_billable".into());
                        row.codes = None;
                        row.coding_reasons = Some(serde_json::json!(reasons).to_string());
                    }
                }
            }
            E::FollowUpTaskCreated(_) => row.follow_up_tasks += 1,
            E::WriteBackRequested(_)
            | E::WriteBackSucceeded(_)
            | E::WriteBackFailed(_)
            | E::EhrDriftDetected(_)
            | E::PhiTransferBlocked(_) => {}
            E::ChargeReleased(e) => {
                row.charge_released = true;
                row.codes = Some(format_codes(&e.codes));
                row.policy_version = Some(e.policy_version as i64);
            }
        }
        Ok(())
    }
}
