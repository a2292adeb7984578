//! The patient identity aggregate: a telehealth registration that must be matched to
//! the right EHR chart before anything is written to a chart.
//!
//! The matching itself (normalization, Fellegi–Sunter scores) is computed by the
//! identity service and arrives here as a command carrying its outcome; this aggregate
//! keeps the invariants: no write-back while the identity is pending or in review, a
//! merged record takes no further commands, a review is resolved once.

use chrono::{DateTime, NaiveDate, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::Aggregate;

/// Where a patient's identity stands. Only `Linked` and `ConfirmedNew` allow writes to a
/// chart; every other state holds write-back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdentityStatus {
    /// Never registered (an encounter that references an unknown patient).
    #[default]
    Unknown,
    /// Registered; matching has not produced an outcome yet.
    PendingMatch,
    /// Linked to an EHR chart by a certain match or a human confirmation.
    Linked,
    /// Probable/possible match waiting for a human.
    UnderReview,
    /// Certainly not a known patient: a new chart is created.
    ConfirmedNew,
    /// Merged into another patient record; use that one.
    Merged,
}

impl IdentityStatus {
    pub fn allows_chart_writes(self) -> bool {
        matches!(self, IdentityStatus::Linked | IdentityStatus::ConfirmedNew)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    Female,
    Male,
    Other,
    Unknown,
}

/// Demographics as received at intake (synthetic in every test and demo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Demographics {
    pub given_name: String,
    pub family_name: String,
    pub birth_date: NaiveDate,
    pub sex: Sex,
    pub address_line: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    /// IANA time zone of the patient (RPM days are counted in it), e.g. America/Chicago.
    pub time_zone: Option<String>,
}

/// A patient identifier with its assigning authority's system (an MRN alone is
/// meaningless without the system that issued it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Identifier {
    pub system: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MatchGrade {
    Certain,
    Probable,
    Possible,
    CertainlyNot,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MatchCandidate {
    pub candidate_patient_id: Option<Uuid>,
    pub identifier: Option<Identifier>,
    pub score: f64,
    pub grade: MatchGrade,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "resolution", rename_all = "snake_case")]
pub enum MatchResolution {
    /// The reviewer confirms the candidate chart: link this identifier.
    ConfirmLink { identifier: Identifier },
    /// Not any of the candidates: a new chart.
    NotAMatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum PatientCommand {
    Register {
        patient_id: Uuid,
        demographics: Demographics,
        at: DateTime<Utc>,
    },
    LinkIdentifier {
        identifier: Identifier,
        /// The matcher's score when linked automatically; `None` for a human link.
        match_score: Option<f64>,
        at: DateTime<Utc>,
    },
    RequestMatchReview {
        candidates: Vec<MatchCandidate>,
        at: DateTime<Utc>,
    },
    ResolveMatch {
        resolution: MatchResolution,
        reviewer_id: String,
        at: DateTime<Utc>,
    },
    ConfirmNewPatient {
        at: DateTime<Utc>,
    },
    Merge {
        into_patient_id: Uuid,
        reviewer_id: String,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum PatientEvent {
    Registered {
        patient_id: Uuid,
        demographics: Demographics,
        at: DateTime<Utc>,
    },
    IdentifierLinked {
        identifier: Identifier,
        match_score: Option<f64>,
        at: DateTime<Utc>,
    },
    MatchReviewRequested {
        candidates: Vec<MatchCandidate>,
        at: DateTime<Utc>,
    },
    MatchResolved {
        resolution: MatchResolution,
        reviewer_id: String,
        at: DateTime<Utc>,
    },
    NewPatientConfirmed {
        at: DateTime<Utc>,
    },
    Merged {
        into_patient_id: Uuid,
        reviewer_id: String,
        at: DateTime<Utc>,
    },
}

impl PatientEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            PatientEvent::Registered { .. } => "Registered",
            PatientEvent::IdentifierLinked { .. } => "IdentifierLinked",
            PatientEvent::MatchReviewRequested { .. } => "MatchReviewRequested",
            PatientEvent::MatchResolved { .. } => "MatchResolved",
            PatientEvent::NewPatientConfirmed { .. } => "NewPatientConfirmed",
            PatientEvent::Merged { .. } => "Merged",
        }
    }

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            PatientEvent::Registered { at, .. }
            | PatientEvent::IdentifierLinked { at, .. }
            | PatientEvent::MatchReviewRequested { at, .. }
            | PatientEvent::MatchResolved { at, .. }
            | PatientEvent::NewPatientConfirmed { at }
            | PatientEvent::Merged { at, .. } => *at,
        }
    }

    /// Demographics and identifiers are PHI.
    pub fn contains_phi(&self) -> bool {
        matches!(
            self,
            PatientEvent::Registered { .. }
                | PatientEvent::IdentifierLinked { .. }
                | PatientEvent::MatchReviewRequested { .. }
                | PatientEvent::MatchResolved { .. }
        )
    }
}

impl PatientCommand {
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            PatientCommand::Register { at, .. }
            | PatientCommand::LinkIdentifier { at, .. }
            | PatientCommand::RequestMatchReview { at, .. }
            | PatientCommand::ResolveMatch { at, .. }
            | PatientCommand::ConfirmNewPatient { at }
            | PatientCommand::Merge { at, .. } => *at,
        }
    }
}

/// Why a patient command was rejected (client errors: change the command, don't retry).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatientError {
    #[error("the patient is not registered")]
    NotRegistered,
    #[error("the patient is already registered")]
    AlreadyRegistered,
    #[error("the patient was merged into {0}; send commands to that record")]
    Merged(Uuid),
    #[error("a required field is empty: {0}")]
    EmptyField(&'static str),
    #[error("birth date {0} is in the future")]
    BirthDateInFuture(NaiveDate),
    #[error("identifier {0:?} is already linked")]
    IdentifierAlreadyLinked(Identifier),
    #[error("identity is {0:?}; this command needs a pending review")]
    NoReviewOpen(IdentityStatus),
    #[error("a review is open; resolve it before linking or confirming")]
    ReviewOpen,
    #[error("a review needs at least one candidate")]
    NoCandidates,
    #[error("candidate score {0} is not a probability")]
    InvalidScore(f64),
    #[error("cannot merge a patient into itself")]
    MergeIntoSelf,
    #[error("time went backwards: {at} is before the last recorded event at {last}")]
    TimeWentBackwards {
        at: DateTime<Utc>,
        last: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Patient {
    pub patient_id: Option<Uuid>,
    pub demographics: Option<Demographics>,
    pub status: IdentityStatus,
    pub identifiers: Vec<Identifier>,
    pub open_review: Vec<MatchCandidate>,
    pub merged_into: Option<Uuid>,
    pub last_event_at: Option<DateTime<Utc>>,
    pub version: u64,
}

fn validate_identifier(identifier: &Identifier) -> Result<(), PatientError> {
    if identifier.system.trim().is_empty() {
        return Err(PatientError::EmptyField("identifier.system"));
    }
    if identifier.value.trim().is_empty() {
        return Err(PatientError::EmptyField("identifier.value"));
    }
    Ok(())
}

impl Aggregate for Patient {
    const CATEGORY: &'static str = "patient";
    type Command = PatientCommand;
    type Event = PatientEvent;
    type Error = PatientError;

    fn decide(&self, command: &PatientCommand) -> Result<Vec<PatientEvent>, PatientError> {
        use PatientCommand as C;
        use PatientEvent as E;
        if let Some(last) = self.last_event_at
            && command.at() < last
        {
            return Err(PatientError::TimeWentBackwards {
                at: command.at(),
                last,
            });
        }
        if let Some(into) = self.merged_into {
            return Err(PatientError::Merged(into));
        }
        if !matches!(command, C::Register { .. }) && self.patient_id.is_none() {
            return Err(PatientError::NotRegistered);
        }
        match command {
            C::Register {
                patient_id,
                demographics,
                at,
            } => {
                if self.patient_id.is_some() {
                    return Err(PatientError::AlreadyRegistered);
                }
                if demographics.given_name.trim().is_empty() {
                    return Err(PatientError::EmptyField("given_name"));
                }
                if demographics.family_name.trim().is_empty() {
                    return Err(PatientError::EmptyField("family_name"));
                }
                if demographics.birth_date > at.date_naive() {
                    return Err(PatientError::BirthDateInFuture(demographics.birth_date));
                }
                Ok(vec![E::Registered {
                    patient_id: *patient_id,
                    demographics: demographics.clone(),
                    at: *at,
                }])
            }
            C::LinkIdentifier {
                identifier,
                match_score,
                at,
            } => {
                validate_identifier(identifier)?;
                if self.status == IdentityStatus::UnderReview {
                    return Err(PatientError::ReviewOpen);
                }
                if self.identifiers.contains(identifier) {
                    return Err(PatientError::IdentifierAlreadyLinked(identifier.clone()));
                }
                if let Some(score) = match_score
                    && !(0.0..=1.0).contains(score)
                {
                    return Err(PatientError::InvalidScore(*score));
                }
                Ok(vec![E::IdentifierLinked {
                    identifier: identifier.clone(),
                    match_score: *match_score,
                    at: *at,
                }])
            }
            C::RequestMatchReview { candidates, at } => {
                if candidates.is_empty() {
                    return Err(PatientError::NoCandidates);
                }
                if let Some(bad) = candidates
                    .iter()
                    .find(|c| !(0.0..=1.0).contains(&c.score) || c.score.is_nan())
                {
                    return Err(PatientError::InvalidScore(bad.score));
                }
                if self.status == IdentityStatus::UnderReview {
                    return Err(PatientError::ReviewOpen);
                }
                Ok(vec![E::MatchReviewRequested {
                    candidates: candidates.clone(),
                    at: *at,
                }])
            }
            C::ResolveMatch {
                resolution,
                reviewer_id,
                at,
            } => {
                if self.status != IdentityStatus::UnderReview {
                    return Err(PatientError::NoReviewOpen(self.status));
                }
                if reviewer_id.trim().is_empty() {
                    return Err(PatientError::EmptyField("reviewer_id"));
                }
                if let MatchResolution::ConfirmLink { identifier } = resolution {
                    validate_identifier(identifier)?;
                }
                Ok(vec![E::MatchResolved {
                    resolution: resolution.clone(),
                    reviewer_id: reviewer_id.clone(),
                    at: *at,
                }])
            }
            C::ConfirmNewPatient { at } => match self.status {
                IdentityStatus::PendingMatch => Ok(vec![E::NewPatientConfirmed { at: *at }]),
                IdentityStatus::UnderReview => Err(PatientError::ReviewOpen),
                other => Err(PatientError::NoReviewOpen(other)),
            },
            C::Merge {
                into_patient_id,
                reviewer_id,
                at,
            } => {
                if Some(*into_patient_id) == self.patient_id {
                    return Err(PatientError::MergeIntoSelf);
                }
                if reviewer_id.trim().is_empty() {
                    return Err(PatientError::EmptyField("reviewer_id"));
                }
                Ok(vec![E::Merged {
                    into_patient_id: *into_patient_id,
                    reviewer_id: reviewer_id.clone(),
                    at: *at,
                }])
            }
        }
    }

    fn apply(&mut self, event: &PatientEvent) {
        use PatientEvent as E;
        self.version += 1;
        self.last_event_at = Some(event.at());
        match event {
            E::Registered {
                patient_id,
                demographics,
                ..
            } => {
                self.patient_id = Some(*patient_id);
                self.demographics = Some(demographics.clone());
                self.status = IdentityStatus::PendingMatch;
            }
            E::IdentifierLinked { identifier, .. } => {
                self.identifiers.push(identifier.clone());
                self.status = IdentityStatus::Linked;
            }
            E::MatchReviewRequested { candidates, .. } => {
                self.open_review = candidates.clone();
                self.status = IdentityStatus::UnderReview;
            }
            E::MatchResolved { resolution, .. } => {
                self.open_review.clear();
                match resolution {
                    MatchResolution::ConfirmLink { identifier } => {
                        if !self.identifiers.contains(identifier) {
                            self.identifiers.push(identifier.clone());
                        }
                        self.status = IdentityStatus::Linked;
                    }
                    MatchResolution::NotAMatch => self.status = IdentityStatus::ConfirmedNew,
                }
            }
            E::NewPatientConfirmed { .. } => self.status = IdentityStatus::ConfirmedNew,
            E::Merged {
                into_patient_id, ..
            } => {
                self.open_review.clear();
                self.merged_into = Some(*into_patient_id);
                self.status = IdentityStatus::Merged;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use chrono::TimeZone;

    fn t(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, minute, 0).unwrap()
    }

    fn pid() -> Uuid {
        Uuid::from_u128(0x51)
    }

    fn demographics() -> Demographics {
        Demographics {
            given_name: "Testa".into(),
            family_name: "Synthetic".into(),
            birth_date: NaiveDate::from_ymd_opt(1961, 4, 12).unwrap(),
            sex: Sex::Female,
            address_line: Some("1 Example St".into()),
            city: Some("Springfield".into()),
            state: Some("IL".into()),
            postal_code: Some("62701".into()),
            phone: None,
            email: None,
            time_zone: Some("America/Chicago".into()),
        }
    }

    fn registered() -> PatientEvent {
        PatientEvent::Registered {
            patient_id: pid(),
            demographics: demographics(),
            at: t(0),
        }
    }

    fn mrn() -> Identifier {
        Identifier {
            system: "urn:oid:2.16.840.1.113883.3.9999".into(),
            value: "MRN-0001".into(),
        }
    }

    fn review() -> PatientEvent {
        PatientEvent::MatchReviewRequested {
            candidates: vec![MatchCandidate {
                candidate_patient_id: None,
                identifier: Some(mrn()),
                score: 0.8,
                grade: MatchGrade::Probable,
            }],
            at: t(1),
        }
    }

    #[test]
    fn register_accepts_and_rejects() {
        given::<Patient>(vec![])
            .when(PatientCommand::Register {
                patient_id: pid(),
                demographics: demographics(),
                at: t(0),
            })
            .then(vec![registered()]);
        given::<Patient>(vec![registered()])
            .when(PatientCommand::Register {
                patient_id: pid(),
                demographics: demographics(),
                at: t(1),
            })
            .then_err(PatientError::AlreadyRegistered);
        let mut future = demographics();
        future.birth_date = NaiveDate::from_ymd_opt(2030, 1, 1).unwrap();
        given::<Patient>(vec![])
            .when(PatientCommand::Register {
                patient_id: pid(),
                demographics: future.clone(),
                at: t(0),
            })
            .then_err(PatientError::BirthDateInFuture(future.birth_date));
        let mut blank = demographics();
        blank.family_name = "  ".into();
        given::<Patient>(vec![])
            .when(PatientCommand::Register {
                patient_id: pid(),
                demographics: blank,
                at: t(0),
            })
            .then_err(PatientError::EmptyField("family_name"));
    }

    #[test]
    fn link_identifier_accepts_and_rejects() {
        let state = given::<Patient>(vec![registered()])
            .when(PatientCommand::LinkIdentifier {
                identifier: mrn(),
                match_score: Some(0.999),
                at: t(1),
            })
            .then_ok(|events| assert_eq!(events.len(), 1));
        assert!(state.status.allows_chart_writes());
        given::<Patient>(vec![])
            .when(PatientCommand::LinkIdentifier {
                identifier: mrn(),
                match_score: None,
                at: t(1),
            })
            .then_err(PatientError::NotRegistered);
        given::<Patient>(vec![registered(), review()])
            .when(PatientCommand::LinkIdentifier {
                identifier: mrn(),
                match_score: None,
                at: t(2),
            })
            .then_err(PatientError::ReviewOpen);
    }

    #[test]
    fn review_blocks_chart_writes_until_resolved() {
        let state = given::<Patient>(vec![registered()])
            .when(PatientCommand::RequestMatchReview {
                candidates: match review() {
                    PatientEvent::MatchReviewRequested { candidates, .. } => candidates,
                    _ => unreachable!(),
                },
                at: t(1),
            })
            .then_ok(|_| {});
        assert!(!state.status.allows_chart_writes());
        let resolved = given::<Patient>(vec![registered(), review()])
            .when(PatientCommand::ResolveMatch {
                resolution: MatchResolution::ConfirmLink { identifier: mrn() },
                reviewer_id: "staff-7".into(),
                at: t(2),
            })
            .then_ok(|_| {});
        assert_eq!(resolved.status, IdentityStatus::Linked);
        given::<Patient>(vec![registered()])
            .when(PatientCommand::RequestMatchReview {
                candidates: vec![],
                at: t(1),
            })
            .then_err(PatientError::NoCandidates);
        given::<Patient>(vec![registered()])
            .when(PatientCommand::ResolveMatch {
                resolution: MatchResolution::NotAMatch,
                reviewer_id: "staff-7".into(),
                at: t(2),
            })
            .then_err(PatientError::NoReviewOpen(IdentityStatus::PendingMatch));
    }

    #[test]
    fn confirm_new_and_merge() {
        let state = given::<Patient>(vec![registered()])
            .when(PatientCommand::ConfirmNewPatient { at: t(1) })
            .then(vec![PatientEvent::NewPatientConfirmed { at: t(1) }]);
        assert_eq!(state.status, IdentityStatus::ConfirmedNew);
        given::<Patient>(vec![registered(), review()])
            .when(PatientCommand::ConfirmNewPatient { at: t(2) })
            .then_err(PatientError::ReviewOpen);
        let other = Uuid::from_u128(0x52);
        let merged = PatientEvent::Merged {
            into_patient_id: other,
            reviewer_id: "staff-7".into(),
            at: t(2),
        };
        given::<Patient>(vec![registered(), review()])
            .when(PatientCommand::Merge {
                into_patient_id: other,
                reviewer_id: "staff-7".into(),
                at: t(2),
            })
            .then(vec![merged.clone()]);
        given::<Patient>(vec![registered(), merged])
            .when(PatientCommand::ConfirmNewPatient { at: t(3) })
            .then_err(PatientError::Merged(other));
        given::<Patient>(vec![registered()])
            .when(PatientCommand::Merge {
                into_patient_id: pid(),
                reviewer_id: "staff-7".into(),
                at: t(2),
            })
            .then_err(PatientError::MergeIntoSelf);
    }

    #[test]
    fn time_never_goes_backwards() {
        given::<Patient>(vec![registered(), review()])
            .when(PatientCommand::ConfirmNewPatient { at: t(0) })
            .then_err(PatientError::TimeWentBackwards {
                at: t(0),
                last: t(1),
            });
    }
}
