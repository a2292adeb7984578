//! `integration_completeness`: per encounter, which required artifacts reached the EHR
//! automatically and how many manual touches it took — the number Chartline exists to
//! drive to zero — plus the headline query over it.
//!
//! A **manual touch** is an event whose `metadata.actor.kind` is `clinician` or `staff`
//! and that exists only because integration did not do its job:
//! - `CodesAssigned` / `CodesRevised` by a human: a manual code pick;
//! - `WriteBackRequested` by a human: a manual (re)send of an artifact;
//! - `WriteBackSucceeded` by a human: the artifact was keyed into the EHR by hand and
//!   recorded;
//! - `NoteDrafted` / `NoteAmended` by a human who is not the encounter's practitioner
//!   (`actor.id` ≠ `practitioner_id` of Scheduled; staff always qualify): a manual note
//!   transfer.
//!
//! Not touches: clinical work (a clinician drafting, amending or signing their own
//! note, addenda, follow-up tasks), scheduling and check-in, charge release.
//!
//! Required artifacts: Appointment (Scheduled), Encounter (ConsultationStarted),
//! DocumentReference (NoteSigned), each Task (FollowUpTaskCreated), ChargeItem (billable
//! CodesAssigned/CodesRevised). An artifact counts as acknowledged automatically when
//! its WriteBackSucceeded came from a non-human actor and no human requested it.
//! An encounter is **fully automated** when every required artifact is acknowledged
//! automatically and it has no manual touch.

use std::collections::BTreeMap;

use chartline_domain::encounter::{CodingOutcome, EncounterEvent, WriteBackArtifact};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::artifact_key;
use crate::cache::{CacheControl, Row, RowCache};
use crate::db::{Cell, CellValue, Kind, ReadDb, TableSpec, Tx};
use crate::engine::Projection;
use crate::error::ProjectionError;
use crate::event::Event;

crate::read_model_row! {
    /// One encounter. `artifacts` is a JSON object `artifact → {acknowledged, manual}`.
    pub struct CompletenessRow in "integration_completeness" {
        key { encounter_id: String }
        columns {
            tenant: String,
            practitioner_id: Option<String>,
            consultation_ended: bool,
            cancelled: bool,
            required_artifacts: i64,
            acknowledged: i64,
            acknowledged_automatically: i64,
            manual_touches: i64,
            manual_code_picks: i64,
            manual_retries: i64,
            manual_acknowledgements: i64,
            manual_note_transfers: i64,
            fully_automated: bool,
            artifacts: Artifacts,
            last_manual_touch_at: Option<DateTime<Utc>>,
            last_position: i64,
        }
        indexes []
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ArtifactProgress {
    acknowledged: bool,
    manual: bool,
}

/// The `artifacts` column: kept parsed in the row cache and written as its JSON text
/// only when the row is written, not parsed and re-serialized for every event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Artifacts(BTreeMap<String, ArtifactProgress>);

impl CellValue for Artifacts {
    const KIND: Kind = Kind::Text;
    fn to_cell(&self) -> Cell {
        Cell::Text(serde_json::to_string(&self.0).expect("a map of flags serializes"))
    }
    fn from_cell(cell: Cell) -> Result<Self, String> {
        let text = String::from_cell(cell)?;
        serde_json::from_str(&text)
            .map(Artifacts)
            .map_err(|e| format!("bad artifacts {text:?}: {e}"))
    }
}

#[derive(Default)]
pub struct IntegrationCompleteness {
    rows: RowCache<CompletenessRow>,
}

impl Projection for IntegrationCompleteness {
    fn name(&self) -> &'static str {
        "integration_completeness"
    }

    fn tables(&self) -> Vec<&'static TableSpec> {
        vec![CompletenessRow::TABLE]
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

impl IntegrationCompleteness {
    async fn apply_event(&mut self, tx: &mut Tx, event: Event<'_>) -> Result<(), ProjectionError> {
        let Some(domain) = event.encounter()? else {
            return Ok(());
        };
        let position = event.envelope.global_position as i64;
        let key = (event.aggregate_id(),);
        let row = self
            .rows
            .get_or_insert_with(tx, &key, || CompletenessRow {
                encounter_id: key.0.clone(),
                tenant: event.tenant(),
                practitioner_id: None,
                consultation_ended: false,
                cancelled: false,
                required_artifacts: 0,
                acknowledged: 0,
                acknowledged_automatically: 0,
                manual_touches: 0,
                manual_code_picks: 0,
                manual_retries: 0,
                manual_acknowledgements: 0,
                manual_note_transfers: 0,
                fully_automated: false,
                artifacts: Artifacts::default(),
                last_manual_touch_at: None,
                last_position: 0,
            })
            .await?;
        if row.last_position >= position {
            return Ok(());
        }
        row.last_position = position;
        let actor = &event.envelope.metadata.actor;
        let human = actor.kind.is_human();
        let artifacts = &mut row.artifacts.0;
        let mut touched = false;
        use EncounterEvent as E;
        let require = |artifacts: &mut BTreeMap<String, ArtifactProgress>,
                       artifact: &WriteBackArtifact| {
            artifacts.entry(artifact_key(artifact).0).or_default();
        };
        match domain {
            E::Scheduled(e) => {
                row.practitioner_id = Some(e.practitioner_id.clone());
                require(artifacts, &WriteBackArtifact::Appointment);
            }
            E::Cancelled(_) | E::NoShow(_) => row.cancelled = true,
            E::ConsultationStarted(_) => require(artifacts, &WriteBackArtifact::Encounter),
            E::ConsultationEnded(_) => row.consultation_ended = true,
            E::NoteSigned(_) => require(artifacts, &WriteBackArtifact::DocumentReference),
            E::FollowUpTaskCreated(e) => {
                require(artifacts, &WriteBackArtifact::Task { task_id: e.task_id })
            }
            E::CodesAssigned(e) | E::CodesRevised(e) => {
                if human {
                    row.manual_code_picks += 1;
                    touched = true;
                }
                if matches!(e.outcome, CodingOutcome::Billable { .. }) {
                    require(artifacts, &WriteBackArtifact::ChargeItem);
                }
            }
            E::NoteDrafted(_) | E::NoteAmended(_)
                if human && row.practitioner_id.as_deref() != Some(actor.id.as_str()) =>
            {
                row.manual_note_transfers += 1;
                touched = true;
            }
            E::WriteBackRequested(e) if human => {
                row.manual_retries += 1;
                touched = true;
                artifacts
                    .entry(artifact_key(&e.artifact).0)
                    .or_default()
                    .manual = true;
            }
            E::WriteBackSucceeded(e) => {
                let progress = artifacts.entry(artifact_key(&e.artifact).0).or_default();
                progress.acknowledged = true;
                if human {
                    progress.manual = true;
                    row.manual_acknowledgements += 1;
                    touched = true;
                }
            }
            _ => {}
        }
        if touched {
            row.last_manual_touch_at = Some(domain.at());
        }
        row.manual_touches = row.manual_code_picks
            + row.manual_retries
            + row.manual_acknowledgements
            + row.manual_note_transfers;
        row.required_artifacts = artifacts.len() as i64;
        row.acknowledged = artifacts.values().filter(|a| a.acknowledged).count() as i64;
        row.acknowledged_automatically = artifacts
            .values()
            .filter(|a| a.acknowledged && !a.manual)
            .count() as i64;
        row.fully_automated = row.required_artifacts > 0
            && row.acknowledged_automatically == row.required_artifacts
            && row.manual_touches == 0;
        Ok(())
    }
}

/// The headline: over encounters whose consultation ended and that were not cancelled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Headline {
    pub encounters: i64,
    pub fully_automated: i64,
    pub percent_fully_automated: f64,
    pub manual_touches: i64,
    pub manual_touches_per_encounter: f64,
    pub manual_code_picks: i64,
    pub manual_retries: i64,
    pub manual_acknowledgements: i64,
    pub manual_note_transfers: i64,
}

/// Manual touches per encounter and % fully automated, optionally for one tenant.
pub async fn headline(db: &ReadDb, tenant: Option<&str>) -> Result<Headline, ProjectionError> {
    let (filter, binds) = match tenant {
        Some(t) => (" AND tenant = ?", vec![Cell::Text(t.into())]),
        None => ("", vec![]),
    };
    let rows = db
        .fetch(
            &format!(
                "SELECT COUNT(*), CAST(COALESCE(SUM(fully_automated), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(manual_touches), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(manual_code_picks), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(manual_retries), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(manual_acknowledgements), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(manual_note_transfers), 0) AS BIGINT) \
                 FROM integration_completeness \
                 WHERE consultation_ended = 1 AND cancelled = 0{filter}"
            ),
            &binds,
            &[Kind::Int; 7],
        )
        .await?;
    let values: Vec<i64> = rows
        .first()
        .map(|r| {
            r.iter()
                .map(|c| match c {
                    Cell::Int(v) => *v,
                    _ => 0,
                })
                .collect()
        })
        .unwrap_or_else(|| vec![0; 7]);
    let encounters = values[0];
    let ratio = |n: i64| {
        if encounters == 0 {
            0.0
        } else {
            n as f64 / encounters as f64
        }
    };
    Ok(Headline {
        encounters,
        fully_automated: values[1],
        percent_fully_automated: 100.0 * ratio(values[1]),
        manual_touches: values[2],
        manual_touches_per_encounter: ratio(values[2]),
        manual_code_picks: values[3],
        manual_retries: values[4],
        manual_acknowledgements: values[5],
        manual_note_transfers: values[6],
    })
}
