//! `identity_review`: patient match reviews — open ones with their candidates and
//! scores (the human review queue), closed ones with how they were closed.
//!
//! Opened (or reopened) by MatchReviewRequested; closed by MatchResolved
//! (`confirm_link` / `not_a_match`), Merged (`merged`), IdentifierLinked
//! (`identifier_linked`) or NewPatientConfirmed (`confirmed_new`).

use chartline_domain::patient::{MatchResolution, PatientEvent};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use super::tag;
use crate::cache::{CacheControl, Row, RowCache};
use crate::db::{TableSpec, Tx};
use crate::engine::Projection;
use crate::error::ProjectionError;
use crate::event::Event;

crate::read_model_row! {
    /// One patient's review. `candidates` is a JSON array of
    /// `{candidate_patient_id, identifier, score, grade}`, best score first.
    pub struct IdentityReviewRow in "identity_review" {
        key { patient_id: String }
        columns {
            tenant: String,
            status: String,
            candidates: String,
            candidate_count: i64,
            top_score: Option<f64>,
            top_grade: Option<String>,
            requested_at: DateTime<Utc>,
            reviews: i64,
            closed_at: Option<DateTime<Utc>>,
            resolution: Option<String>,
            reviewer_id: Option<String>,
            last_position: i64,
        }
        indexes ["status"]
    }
}

#[derive(Default)]
pub struct IdentityReview {
    rows: RowCache<IdentityReviewRow>,
}

impl Projection for IdentityReview {
    fn name(&self) -> &'static str {
        "identity_review"
    }

    fn tables(&self) -> Vec<&'static TableSpec> {
        vec![IdentityReviewRow::TABLE]
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

impl IdentityReview {
    async fn apply_event(&mut self, tx: &mut Tx, event: Event<'_>) -> Result<(), ProjectionError> {
        let Some(domain) = event.patient()? else {
            return Ok(());
        };
        let position = event.envelope.global_position as i64;
        let key = (event.aggregate_id(),);
        if let PatientEvent::MatchReviewRequested { candidates, at } = domain {
            let mut sorted = candidates.clone();
            sorted.sort_by(|a, b| b.score.total_cmp(&a.score));
            let json = serde_json::to_string(&sorted)
                .map_err(|e| ProjectionError::handler(format!("candidates: {e}")))?;
            let top = sorted.first();
            let row = self
                .rows
                .get_or_insert_with(tx, &key, || IdentityReviewRow {
                    patient_id: key.0.clone(),
                    tenant: event.tenant(),
                    status: "open".into(),
                    candidates: String::new(),
                    candidate_count: 0,
                    top_score: None,
                    top_grade: None,
                    requested_at: *at,
                    reviews: 0,
                    closed_at: None,
                    resolution: None,
                    reviewer_id: None,
                    last_position: 0,
                })
                .await?;
            if row.last_position >= position {
                return Ok(());
            }
            row.last_position = position;
            row.status = "open".into();
            row.candidates = json;
            row.candidate_count = sorted.len() as i64;
            row.top_score = top.map(|c| c.score);
            row.top_grade = top.map(|c| tag(&c.grade));
            row.requested_at = *at;
            row.reviews += 1;
            row.closed_at = None;
            row.resolution = None;
            row.reviewer_id = None;
            return Ok(());
        }
        let (resolution, reviewer, at) = match domain {
            PatientEvent::MatchResolved {
                resolution,
                reviewer_id,
                at,
            } => (
                match resolution {
                    MatchResolution::ConfirmLink { .. } => "confirm_link",
                    MatchResolution::NotAMatch => "not_a_match",
                },
                Some(reviewer_id.clone()),
                *at,
            ),
            PatientEvent::Merged {
                reviewer_id, at, ..
            } => ("merged", Some(reviewer_id.clone()), *at),
            PatientEvent::IdentifierLinked { at, .. } => ("identifier_linked", None, *at),
            PatientEvent::NewPatientConfirmed { at } => ("confirmed_new", None, *at),
            _ => return Ok(()),
        };
        let Some(row) = self.rows.get_mut(tx, &key).await? else {
            return Ok(());
        };
        if row.last_position >= position || row.status != "open" {
            return Ok(());
        }
        row.last_position = position;
        row.status = "closed".into();
        row.closed_at = Some(at);
        row.resolution = Some(resolution.into());
        row.reviewer_id = reviewer;
        Ok(())
    }
}
