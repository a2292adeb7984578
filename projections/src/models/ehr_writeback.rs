//! `ehr_writeback`: per encounter and per FHIR artifact, where its write-back to the
//! EHR stands.
//!
//! States: `pending` (the artifact is due — its source fact exists — but nobody asked
//! the connector yet), `sent` (WriteBackRequested), `acknowledged` (WriteBackSucceeded:
//! EHR id + version), `failed` (WriteBackFailed, retryable, with attempts, last error
//! and the next retry time), `dead` (not retryable, or [`MAX_ATTEMPTS`] reached: a human
//! must act), `blocked` (PhiTransferBlocked: the compliance map refused to send PHI to
//! the EHR — no BAA in effect; `last_error` says why; nothing was sent). Artifacts
//! become due on: Scheduled → Appointment; ConsultationStarted →
//! Encounter; NoteDrafted → DocumentReference; FollowUpTaskCreated → Task;
//! a billable CodesAssigned/CodesRevised → ChargeItem.
//!
//! Drift: EhrDriftDetected (the reconciliation job found that the EHR no longer holds
//! what was acknowledged) turns an `acknowledged` row `drifted`; `open_drift` counts the
//! findings and `drift` lists them (JSON: kind, resource, expected, found, detected_at).
//! The next WriteBackSucceeded clears them, as the domain does.
//!
//! RPM: every ReadingsRecorded batch is an Observation artifact — row `encounter_id` =
//! the enrolment id, `artifact` = `observations:<batch_id>` — acknowledged by
//! ObservationsWrittenBack (the first Observation's id and version) or failed/dead by
//! ObservationWriteBackFailed.

use chartline_domain::encounter::{CodingOutcome, EncounterEvent, WriteBackArtifact};
use chartline_domain::rpm::RpmEvent;
use chrono::{DateTime, Duration, Utc};
use futures::future::BoxFuture;

use super::artifact_key;
use crate::cache::{CacheControl, Row, RowCache};
use crate::db::{TableSpec, Tx};
use crate::engine::Projection;
use crate::error::ProjectionError;
use crate::event::Event;

/// Attempts after which a retryable failure is considered dead.
pub const MAX_ATTEMPTS: i64 = 8;

/// Delay before retry `attempt + 1`: 30 s doubling, at most one hour.
pub fn retry_delay(attempt: i64) -> Duration {
    let exponent = (attempt.max(1) - 1).min(7) as u32;
    Duration::seconds((30 * 2i64.pow(exponent)).min(3_600))
}

crate::read_model_row! {
    /// One artifact of one encounter. `artifact` is `appointment`, `encounter`,
    /// `document_reference`, `task:<uuid>` or `charge_item`.
    pub struct WriteBackRow in "ehr_writeback" {
        key { encounter_id: String, artifact: String }
        columns {
            tenant: String,
            resource_type: String,
            task_id: Option<String>,
            state: String,
            attempts: i64,
            ehr_resource_id: Option<String>,
            ehr_version: Option<String>,
            last_status: Option<i64>,
            last_error: Option<String>,
            next_retry_at: Option<DateTime<Utc>>,
            due_since: DateTime<Utc>,
            requested_at: Option<DateTime<Utc>>,
            acknowledged_at: Option<DateTime<Utc>>,
            open_drift: i64,
            drift: Option<String>,
            drift_detected_at: Option<DateTime<Utc>>,
            updated_at: DateTime<Utc>,
            last_position: i64,
        }
        indexes ["state"]
    }
}

#[derive(Default)]
pub struct EhrWriteBack {
    rows: RowCache<WriteBackRow>,
}

impl Projection for EhrWriteBack {
    fn name(&self) -> &'static str {
        "ehr_writeback"
    }

    fn tables(&self) -> Vec<&'static TableSpec> {
        vec![WriteBackRow::TABLE]
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

impl EhrWriteBack {
    async fn row<'s>(
        &'s mut self,
        tx: &mut Tx,
        event: Event<'_>,
        artifact: &WriteBackArtifact,
        at: DateTime<Utc>,
    ) -> Result<Option<&'s mut WriteBackRow>, ProjectionError> {
        self.keyed_row(tx, event, artifact_key(artifact), at).await
    }

    /// The row of `(artifact id, FHIR resource type, task id)` on the event's stream,
    /// unless the event was already applied to it.
    async fn keyed_row<'s>(
        &'s mut self,
        tx: &mut Tx,
        event: Event<'_>,
        (artifact_id, resource_type, task_id): (String, &'static str, Option<String>),
        at: DateTime<Utc>,
    ) -> Result<Option<&'s mut WriteBackRow>, ProjectionError> {
        let key = (event.aggregate_id(), artifact_id);
        let row = self
            .rows
            .get_or_insert_with(tx, &key, || WriteBackRow {
                encounter_id: key.0.clone(),
                artifact: key.1.clone(),
                tenant: event.tenant(),
                resource_type: resource_type.into(),
                task_id,
                state: "pending".into(),
                attempts: 0,
                ehr_resource_id: None,
                ehr_version: None,
                last_status: None,
                last_error: None,
                next_retry_at: None,
                due_since: at,
                requested_at: None,
                acknowledged_at: None,
                open_drift: 0,
                drift: None,
                drift_detected_at: None,
                updated_at: at,
                last_position: 0,
            })
            .await?;
        let position = event.envelope.global_position as i64;
        if row.last_position >= position {
            return Ok(None);
        }
        row.last_position = position;
        Ok(Some(row))
    }

    /// RPM Observation batches: one row per `ReadingsRecorded` batch.
    async fn apply_rpm(
        &mut self,
        tx: &mut Tx,
        event: Event<'_>,
        domain: &RpmEvent,
    ) -> Result<(), ProjectionError> {
        let batch_key =
            |batch_id: &uuid::Uuid| (format!("observations:{batch_id}"), "Observation", None);
        match domain {
            RpmEvent::ReadingsRecorded { batch_id, at, .. } => {
                self.keyed_row(tx, event, batch_key(batch_id), *at).await?;
            }
            RpmEvent::ObservationsWrittenBack {
                batch_id,
                observations,
                at,
            } => {
                if let Some(row) = self.keyed_row(tx, event, batch_key(batch_id), *at).await? {
                    row.state = "acknowledged".into();
                    row.attempts += 1;
                    row.ehr_resource_id = observations.first().map(|o| o.ehr_resource_id.clone());
                    row.ehr_version = observations.first().map(|o| o.ehr_version.clone());
                    row.last_error = None;
                    row.last_status = None;
                    row.next_retry_at = None;
                    row.acknowledged_at = Some(*at);
                    row.updated_at = *at;
                }
            }
            RpmEvent::ObservationWriteBackFailed {
                batch_id,
                status,
                message,
                retryable,
                attempt,
                at,
            } => {
                if let Some(row) = self.keyed_row(tx, event, batch_key(batch_id), *at).await? {
                    row.attempts = i64::from(*attempt);
                    row.last_status = status.map(i64::from);
                    row.last_error = Some(message.clone());
                    row.updated_at = *at;
                    if !retryable || row.attempts >= MAX_ATTEMPTS {
                        row.state = "dead".into();
                        row.next_retry_at = None;
                    } else {
                        row.state = "failed".into();
                        row.next_retry_at = Some(*at + retry_delay(row.attempts));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn apply_event(&mut self, tx: &mut Tx, event: Event<'_>) -> Result<(), ProjectionError> {
        if let Some(rpm) = event.rpm()? {
            return self.apply_rpm(tx, event, rpm).await;
        }
        let Some(domain) = event.encounter()? else {
            return Ok(());
        };
        use EncounterEvent as E;
        let at = domain.at();
        let due = match domain {
            E::Scheduled(_) => Some(WriteBackArtifact::Appointment),
            E::ConsultationStarted(_) => Some(WriteBackArtifact::Encounter),
            E::NoteDrafted(_) => Some(WriteBackArtifact::DocumentReference),
            E::FollowUpTaskCreated(e) => Some(WriteBackArtifact::Task { task_id: e.task_id }),
            E::CodesAssigned(e) | E::CodesRevised(e)
                if matches!(e.outcome, CodingOutcome::Billable { .. }) =>
            {
                Some(WriteBackArtifact::ChargeItem)
            }
            _ => None,
        };
        if let Some(artifact) = due {
            // Creating the row is the whole effect; an existing row keeps its state.
            self.row(tx, event, &artifact, at).await?;
            return Ok(());
        }
        match domain {
            E::WriteBackRequested(e) => {
                if let Some(row) = self.row(tx, event, &e.artifact, at).await? {
                    row.state = "sent".into();
                    row.requested_at = Some(e.at);
                    row.next_retry_at = None;
                    row.updated_at = e.at;
                }
            }
            E::WriteBackSucceeded(e) => {
                if let Some(row) = self.row(tx, event, &e.artifact, at).await? {
                    row.state = "acknowledged".into();
                    row.attempts += 1;
                    row.ehr_resource_id = Some(e.ehr_resource_id.clone());
                    row.ehr_version = Some(e.ehr_version.clone());
                    row.last_error = None;
                    row.last_status = None;
                    row.next_retry_at = None;
                    row.acknowledged_at = Some(e.at);
                    row.updated_at = e.at;
                    // A successful (re-)write resolves open drift.
                    row.open_drift = 0;
                    row.drift = None;
                    row.drift_detected_at = None;
                }
            }
            E::EhrDriftDetected(e) => {
                if let Some(row) = self.row(tx, event, &e.artifact, at).await? {
                    let mut findings: Vec<serde_json::Value> = row
                        .drift
                        .as_deref()
                        .and_then(|text| serde_json::from_str(text).ok())
                        .unwrap_or_default();
                    findings.push(serde_json::json!({
                        "kind": super::tag(&e.kind),
                        "resource": e.resource,
                        "expected": e.expected,
                        "found": e.found,
                        "detected_at": e.detected_at,
                    }));
                    row.open_drift = findings.len() as i64;
                    row.drift = Some(serde_json::Value::Array(findings).to_string());
                    row.drift_detected_at = Some(e.detected_at);
                    if row.state == "acknowledged" {
                        row.state = "drifted".into();
                    }
                    row.updated_at = e.at;
                }
            }
            E::WriteBackFailed(e) => {
                if let Some(row) = self.row(tx, event, &e.artifact, at).await? {
                    row.attempts = i64::from(e.attempt);
                    row.last_status = e.status.map(i64::from);
                    row.last_error = Some(e.message.clone());
                    row.updated_at = e.at;
                    if !e.retryable || row.attempts >= MAX_ATTEMPTS {
                        row.state = "dead".into();
                        row.next_retry_at = None;
                    } else {
                        row.state = "failed".into();
                        row.next_retry_at = Some(e.at + retry_delay(row.attempts));
                    }
                }
            }
            E::PhiTransferBlocked(e) => {
                // Nothing was sent: no attempt counted, no retry scheduled; a person
                // must fix the BAA coverage (compliance map) and replay.
                if let Some(row) = self.row(tx, event, &e.artifact, at).await? {
                    row.state = "blocked".into();
                    row.last_status = None;
                    row.last_error = Some(format!(
                        "PHI transfer to {} blocked: {}",
                        e.component, e.reason
                    ));
                    row.next_retry_at = None;
                    row.updated_at = e.at;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
