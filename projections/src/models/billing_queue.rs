//! `billing_queue`: what can be billed, what is held and why, what was released.
//!
//! Items: one per encounter (`encounter:<id>`), one per RPM 30-day device period
//! (`rpm-supply:<enrollment>:<period index>`) and one per RPM calendar month of
//! management time (`rpm-mgmt:<enrollment>:<YYYY-MM>`).
//!
//! Status: `open` (encounter scheduled, not yet conducted), `held` (with `reasons`, a
//! JSON array: `unsigned note`, `not coded`, `coding hold: …` from a Hold coding
//! outcome, `identity under review` / `identity unresolved (…)` / `patient merged`,
//! RPM thresholds not met), `ready`, `released` (ChargeReleased), `not_billable`,
//! `cancelled`. `status_since` is when the item entered its status (event time), so
//! aging = now − status_since.
//!
//! Patient identity comes from patient streams; the model keeps its own copy
//! (`billing_patient`) and re-evaluates a patient's open items when it changes. RPM
//! days are counted in the patient's time zone (`billing_rpm_day`), as in
//! `rpm_timeseries`.

use std::collections::BTreeMap;

use chartline_domain::encounter::{CodingOutcome, EncounterEvent};
use chartline_domain::patient::{MatchResolution, PatientEvent};
use chartline_domain::rpm::RpmEvent;
use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;

use super::calendar::{
    local_date, management_eligibility, month_of, parse_zone, period_bounds, period_index,
    supply_eligibility,
};
use super::encounter_view::format_codes;
use crate::cache::{CacheControl, Row, RowCache};
use crate::db::{Cell, TableSpec, Tx};
use crate::engine::Projection;
use crate::error::ProjectionError;
use crate::event::Event;

crate::read_model_row! {
    /// One billable item. See the module docs for statuses and reasons.
    pub struct BillingItemRow in "billing_queue" {
        key { item_id: String }
        columns {
            tenant: String,
            kind: String,
            encounter_id: Option<String>,
            enrollment_id: Option<String>,
            patient_id: Option<String>,
            service_period: Option<String>,
            status: String,
            reasons: String,
            codes: Option<String>,
            policy_version: Option<i64>,
            consultation_ended: bool,
            note_signed: bool,
            coding_outcome: Option<String>,
            coding_reasons: Option<String>,
            days_with_readings: Option<i64>,
            management_minutes: Option<i64>,
            interactive_communication: Option<bool>,
            identity_status: String,
            status_since: DateTime<Utc>,
            updated_at: DateTime<Utc>,
            last_position: i64,
        }
        indexes ["patient_id", "status"]
    }
}

crate::read_model_row! {
    /// The identity status of a patient as billing needs it.
    pub struct BillingPatientRow in "billing_patient" {
        key { patient_id: String }
        columns {
            identity_status: String,
            last_position: i64,
        }
        indexes []
    }
}

crate::read_model_row! {
    pub struct BillingRpmEnrollmentRow in "billing_rpm_enrollment" {
        key { enrollment_id: String }
        columns {
            patient_id: String,
            period_start: NaiveDate,
            time_zone: String,
            last_position: i64,
        }
        indexes []
    }
}

crate::read_model_row! {
    pub struct BillingRpmDayRow in "billing_rpm_day" {
        key { enrollment_id: String, local_date: NaiveDate }
        columns {
            last_position: i64,
        }
        indexes []
    }
}

fn identity_reason(status: &str) -> Option<String> {
    match status {
        "linked" | "confirmed_new" => None,
        "under_review" => Some("identity under review".into()),
        "merged" => Some("patient merged".into()),
        other => Some(format!("identity unresolved ({other})")),
    }
}

/// Recomputes status and reasons; moves `status_since` when the status changes.
fn evaluate(row: &mut BillingItemRow, at: DateTime<Utc>) {
    let mut reasons: Vec<String> = Vec::new();
    let status = match row.kind.as_str() {
        "encounter" => {
            let coding_reasons: Vec<String> = row
                .coding_reasons
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or_default();
            if row.status == "released" {
                "released"
            } else if row.status == "cancelled" {
                "cancelled"
            } else if !row.consultation_ended {
                "open"
            } else if row.coding_outcome.as_deref() == Some("not_billable") {
                reasons = coding_reasons;
                "not_billable"
            } else {
                if !row.note_signed {
                    reasons.push("unsigned note".into());
                }
                match row.coding_outcome.as_deref() {
                    None => reasons.push("not coded".into()),
                    Some("hold") => {
                        reasons.extend(coding_reasons.iter().map(|r| format!("coding hold: {r}")))
                    }
                    _ => {}
                }
                reasons.extend(identity_reason(&row.identity_status));
                if reasons.is_empty() { "ready" } else { "held" }
            }
        }
        "rpm_device_supply" => {
            match supply_eligibility(
                row.days_with_readings.unwrap_or(0),
                row.service_period
                    .as_deref()
                    .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
                    .unwrap_or_default(),
            ) {
                Ok(code) => row.codes = Some(code.into()),
                Err(reason) => {
                    row.codes = None;
                    reasons.push(reason);
                }
            }
            reasons.extend(identity_reason(&row.identity_status));
            if reasons.is_empty() { "ready" } else { "held" }
        }
        _ => {
            let month_start = row
                .service_period
                .as_deref()
                .and_then(|m| NaiveDate::parse_from_str(&format!("{m}-01"), "%Y-%m-%d").ok())
                .unwrap_or_default();
            match management_eligibility(
                row.management_minutes.unwrap_or(0),
                row.interactive_communication.unwrap_or(false),
                month_start,
            ) {
                Ok(codes) => row.codes = Some(codes.join(",")),
                Err(reason) => {
                    row.codes = None;
                    reasons.push(reason);
                }
            }
            reasons.extend(identity_reason(&row.identity_status));
            if reasons.is_empty() { "ready" } else { "held" }
        }
    };
    if row.status != status {
        row.status = status.into();
        row.status_since = at;
    }
    row.reasons = serde_json::json!(reasons).to_string();
    row.updated_at = at;
}

#[derive(Default)]
pub struct BillingQueue {
    items: RowCache<BillingItemRow>,
    patients: RowCache<BillingPatientRow>,
    enrollments: RowCache<BillingRpmEnrollmentRow>,
    days: RowCache<BillingRpmDayRow>,
}

impl Projection for BillingQueue {
    fn name(&self) -> &'static str {
        "billing_queue"
    }

    fn tables(&self) -> Vec<&'static TableSpec> {
        vec![
            BillingItemRow::TABLE,
            BillingPatientRow::TABLE,
            BillingRpmEnrollmentRow::TABLE,
            BillingRpmDayRow::TABLE,
        ]
    }

    fn caches(&mut self) -> Vec<&mut dyn CacheControl> {
        vec![
            &mut self.items,
            &mut self.patients,
            &mut self.enrollments,
            &mut self.days,
        ]
    }

    fn apply<'a>(
        &'a mut self,
        tx: &'a mut Tx,
        event: Event<'a>,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(self.apply_event(tx, event))
    }
}

impl BillingQueue {
    async fn apply_event(&mut self, tx: &mut Tx, event: Event<'_>) -> Result<(), ProjectionError> {
        if let Some(domain) = event.encounter()? {
            return self.on_encounter(tx, event, domain).await;
        }
        if let Some(domain) = event.patient()? {
            return self.on_patient(tx, event, domain).await;
        }
        if let Some(domain) = event.rpm()? {
            return self.on_rpm(tx, event, domain).await;
        }
        Ok(())
    }

    async fn identity_of(
        &mut self,
        tx: &mut Tx,
        patient_id: &str,
    ) -> Result<String, ProjectionError> {
        Ok(self
            .patients
            .get(tx, &(patient_id.to_string(),))
            .await?
            .map_or_else(|| "unknown".to_string(), |p| p.identity_status.clone()))
    }

    fn new_item(
        event: Event<'_>,
        item_id: String,
        kind: &str,
        at: DateTime<Utc>,
    ) -> BillingItemRow {
        BillingItemRow {
            item_id,
            tenant: event.tenant(),
            kind: kind.into(),
            encounter_id: None,
            enrollment_id: None,
            patient_id: None,
            service_period: None,
            status: "open".into(),
            reasons: "[]".into(),
            codes: None,
            policy_version: None,
            consultation_ended: false,
            note_signed: false,
            coding_outcome: None,
            coding_reasons: None,
            days_with_readings: None,
            management_minutes: None,
            interactive_communication: None,
            identity_status: "unknown".into(),
            status_since: at,
            updated_at: at,
            last_position: 0,
        }
    }

    async fn on_encounter(
        &mut self,
        tx: &mut Tx,
        event: Event<'_>,
        domain: &EncounterEvent,
    ) -> Result<(), ProjectionError> {
        use EncounterEvent as E;
        let position = event.envelope.global_position as i64;
        let encounter_id = event.aggregate_id();
        let key = (format!("encounter:{encounter_id}"),);
        let at = domain.at();
        let identity = match domain {
            E::Scheduled(e) => Some(self.identity_of(tx, &e.patient_id.to_string()).await?),
            _ => None,
        };
        let row = if let E::Scheduled(e) = domain {
            let row = self
                .items
                .get_or_insert_with(tx, &key, || {
                    let mut row = Self::new_item(event, key.0.clone(), "encounter", at);
                    row.encounter_id = Some(encounter_id.clone());
                    row.patient_id = Some(e.patient_id.to_string());
                    row.service_period = Some(e.window_start.date_naive().to_string());
                    row
                })
                .await?;
            if let Some(identity) = identity
                && row.last_position < position
            {
                row.identity_status = identity;
            }
            row
        } else {
            match self.items.get_mut(tx, &key).await? {
                Some(row) => row,
                None => return Ok(()),
            }
        };
        if row.last_position >= position {
            return Ok(());
        }
        row.last_position = position;
        match domain {
            E::Cancelled(_) | E::NoShow(_) if row.status != "released" => {
                row.status = "cancelled".into();
                row.status_since = at;
            }
            E::ConsultationEnded(_) => row.consultation_ended = true,
            E::NoteSigned(_) => row.note_signed = true,
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
            E::ChargeReleased(e) => {
                row.codes = Some(format_codes(&e.codes));
                row.policy_version = Some(e.policy_version as i64);
                row.status = "released".into();
                row.status_since = at;
            }
            _ => {}
        }
        evaluate(row, at);
        Ok(())
    }

    async fn on_patient(
        &mut self,
        tx: &mut Tx,
        event: Event<'_>,
        domain: &PatientEvent,
    ) -> Result<(), ProjectionError> {
        use PatientEvent as P;
        let status = match domain {
            P::Registered { .. } => "pending_match",
            P::IdentifierLinked { .. } => "linked",
            P::MatchReviewRequested { .. } => "under_review",
            P::MatchResolved {
                resolution: MatchResolution::ConfirmLink { .. },
                ..
            } => "linked",
            P::MatchResolved {
                resolution: MatchResolution::NotAMatch,
                ..
            } => "confirmed_new",
            P::NewPatientConfirmed { .. } => "confirmed_new",
            P::Merged { .. } => "merged",
        };
        let position = event.envelope.global_position as i64;
        let patient_id = event.aggregate_id();
        let patient = self
            .patients
            .get_or_insert_with(tx, &(patient_id.clone(),), || BillingPatientRow {
                patient_id: patient_id.clone(),
                identity_status: status.into(),
                last_position: 0,
            })
            .await?;
        if patient.last_position >= position {
            return Ok(());
        }
        patient.last_position = position;
        patient.identity_status = status.into();
        let keys = self
            .items
            .keys_where(tx, "patient_id", Cell::Text(patient_id.clone()), |row| {
                row.patient_id.as_deref() == Some(patient_id.as_str())
            })
            .await?;
        for key in keys {
            if let Some(row) = self.items.get_mut(tx, &key).await?
                && row.last_position < position
                && !matches!(row.status.as_str(), "released" | "cancelled")
            {
                row.last_position = position;
                row.identity_status = status.into();
                evaluate(row, domain.at());
            }
        }
        Ok(())
    }

    async fn on_rpm(
        &mut self,
        tx: &mut Tx,
        event: Event<'_>,
        domain: &RpmEvent,
    ) -> Result<(), ProjectionError> {
        let position = event.envelope.global_position as i64;
        let enrollment_id = event.aggregate_id();
        let key = (enrollment_id.clone(),);
        if let RpmEvent::Enrolled {
            patient_id,
            period_start,
            time_zone,
            ..
        } = domain
        {
            parse_zone(time_zone)?;
            let row = self
                .enrollments
                .get_or_insert_with(tx, &key, || BillingRpmEnrollmentRow {
                    enrollment_id: enrollment_id.clone(),
                    patient_id: patient_id.to_string(),
                    period_start: *period_start,
                    time_zone: time_zone.clone(),
                    last_position: 0,
                })
                .await?;
            row.last_position = row.last_position.max(position);
            return Ok(());
        }
        let Some(enrollment) = self.enrollments.get(tx, &key).await? else {
            return Err(ProjectionError::handler(format!(
                "{} on {} before Enrolled",
                event.envelope.event_type, event.envelope.stream_id
            )));
        };
        let patient_id = enrollment.patient_id.clone();
        let period_start = enrollment.period_start;
        let zone = parse_zone(&enrollment.time_zone)?;
        match domain {
            RpmEvent::ReadingsRecorded { readings, at, .. } => {
                let mut new_days: BTreeMap<i64, i64> = BTreeMap::new();
                let dates: std::collections::BTreeSet<NaiveDate> = readings
                    .iter()
                    .map(|r| local_date(r.effective_at, zone))
                    .collect();
                for date in dates {
                    let day = self
                        .days
                        .get_or_insert_with(tx, &(enrollment_id.clone(), date), || {
                            BillingRpmDayRow {
                                enrollment_id: enrollment_id.clone(),
                                local_date: date,
                                last_position: 0,
                            }
                        })
                        .await?;
                    // A day counts once, when it first gets a reading.
                    if day.last_position == 0 {
                        day.last_position = position;
                        *new_days
                            .entry(period_index(period_start, date))
                            .or_default() += 1;
                    }
                }
                let identity = self.identity_of(tx, &patient_id).await?;
                for (index, added) in new_days {
                    let (start, _) = period_bounds(period_start, index);
                    let item_key = (format!("rpm-supply:{enrollment_id}:{index}"),);
                    let row = self
                        .items
                        .get_or_insert_with(tx, &item_key, || {
                            let mut row =
                                Self::new_item(event, item_key.0.clone(), "rpm_device_supply", *at);
                            row.enrollment_id = Some(enrollment_id.clone());
                            row.patient_id = Some(patient_id.clone());
                            row.service_period = Some(start.to_string());
                            row.days_with_readings = Some(0);
                            row.identity_status = identity.clone();
                            row
                        })
                        .await?;
                    if row.last_position >= position {
                        continue;
                    }
                    row.last_position = position;
                    row.days_with_readings = Some(row.days_with_readings.unwrap_or(0) + added);
                    evaluate(row, *at);
                }
            }
            RpmEvent::ManagementTimeLogged {
                minutes,
                interactive_communication,
                at,
                ..
            } => {
                let month = month_of(local_date(*at, zone));
                let identity = self.identity_of(tx, &patient_id).await?;
                let item_key = (format!("rpm-mgmt:{enrollment_id}:{month}"),);
                let row = self
                    .items
                    .get_or_insert_with(tx, &item_key, || {
                        let mut row =
                            Self::new_item(event, item_key.0.clone(), "rpm_management", *at);
                        row.enrollment_id = Some(enrollment_id.clone());
                        row.patient_id = Some(patient_id.clone());
                        row.service_period = Some(month.clone());
                        row.management_minutes = Some(0);
                        row.interactive_communication = Some(false);
                        row.identity_status = identity.clone();
                        row
                    })
                    .await?;
                if row.last_position >= position {
                    return Ok(());
                }
                row.last_position = position;
                row.management_minutes =
                    Some(row.management_minutes.unwrap_or(0) + i64::from(*minutes));
                row.interactive_communication = Some(
                    row.interactive_communication.unwrap_or(false) || *interactive_communication,
                );
                evaluate(row, *at);
            }
            RpmEvent::ThresholdBreached { .. }
            | RpmEvent::Enrolled { .. }
            | RpmEvent::ObservationsWrittenBack { .. }
            | RpmEvent::ObservationWriteBackFailed { .. } => {}
        }
        Ok(())
    }
}
