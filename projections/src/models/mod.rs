//! The read models. Each is an independent projection (own tables, own checkpoint,
//! rebuildable alone), so a model that needs a fact from another stream keeps its own
//! copy of it (e.g. `billing_queue` tracks patient identity itself).
//!
//! Idempotency rule shared by every model: each row stores `last_position`, the global
//! position of the last event applied to it, and a handler never applies an event to a
//! row whose `last_position` is at or past the event's position; every handler changes
//! each row at most once per event. Replaying a range therefore changes nothing, even
//! outside the engine's exactly-once checkpointing. Every value in a row comes from
//! events (never the wall clock), so a rebuild reproduces the rows exactly.

pub mod billing_queue;
pub mod calendar;
pub mod ehr_writeback;
pub mod encounter_view;
pub mod identity_review;
pub mod integration_completeness;
pub mod rpm_timeseries;

use std::sync::Arc;

use chartline_domain::encounter::WriteBackArtifact;
use serde::Serialize;

use crate::engine::ProjectionFactory;

/// The projections every deployment runs.
pub fn standard_projections() -> Vec<ProjectionFactory> {
    vec![
        Arc::new(|| Box::new(encounter_view::EncounterView::default())),
        Arc::new(|| Box::new(ehr_writeback::EhrWriteBack::default())),
        Arc::new(|| Box::new(billing_queue::BillingQueue::default())),
        Arc::new(|| Box::new(rpm_timeseries::RpmTimeseries::default())),
        Arc::new(|| Box::new(identity_review::IdentityReview::default())),
        Arc::new(|| Box::new(integration_completeness::IntegrationCompleteness::default())),
    ]
}

/// The snake_case serde name of a unit enum value (`Modality::AudioOnly` → `audio_only`).
pub fn tag<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// Row key, FHIR resource type and task id of a write-back artifact.
pub fn artifact_key(artifact: &WriteBackArtifact) -> (String, &'static str, Option<String>) {
    match artifact {
        WriteBackArtifact::Appointment => ("appointment".into(), "Appointment", None),
        WriteBackArtifact::Encounter => ("encounter".into(), "Encounter", None),
        WriteBackArtifact::DocumentReference => {
            ("document_reference".into(), "DocumentReference", None)
        }
        WriteBackArtifact::Task { task_id } => {
            (format!("task:{task_id}"), "Task", Some(task_id.to_string()))
        }
        WriteBackArtifact::ChargeItem => ("charge_item".into(), "ChargeItem", None),
    }
}
