//! The facts a billing decision depends on, and their validation.
//!
//! Scenarios arrive as JSON (the CLI, tests, operators reproducing a claim) or are
//! derived from an encounter stream. JSON is read field by field rather than through a
//! derived `Deserialize`, so every rejection names the field at fault — "unknown variant"
//! alone does not tell an operator which of five enums was wrong. The validated
//! [`Scenario`] can only hold the combinations the evaluator understands: an RPM month
//! cannot carry an E/M level, an E/M visit cannot lack one.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::encounter::{
    Encounter, Modality, PatientLocation, PatientStatus, Payer, ServiceKind, Site,
};

/// The service being billed. Wider than [`ServiceKind`]: RPM months are billed without an
/// encounter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingService {
    EMVisit,
    VirtualCheckIn,
    RpmMonth,
}

impl BillingService {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingService::EMVisit => "e_m_visit",
            BillingService::VirtualCheckIn => "virtual_check_in",
            BillingService::RpmMonth => "rpm_month",
        }
    }
}

impl From<ServiceKind> for BillingService {
    fn from(kind: ServiceKind) -> Self {
        match kind {
            ServiceKind::EMVisit => BillingService::EMVisit,
            ServiceKind::VirtualCheckIn => BillingService::VirtualCheckIn,
        }
    }
}

/// A validated billing scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub date_of_service: NaiveDate,
    pub payer: Payer,
    pub site: Site,
    pub service: ServiceFacts,
}

/// The per-service facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceFacts {
    /// A synchronous telehealth visit: E/M (with a level) or a brief virtual check-in.
    Visit {
        kind: VisitKind,
        patient_status: PatientStatus,
        modality: Modality,
        patient_location: PatientLocation,
        /// The patient could not or would not use video (the audio-only condition).
        patient_declined_video: bool,
    },
    /// One month of remote patient monitoring.
    RpmMonth(RpmMonth),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisitKind {
    /// E/M level 1–5 (new patients 2–5).
    EMVisit {
        level: u8,
    },
    VirtualCheckIn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpmMonth {
    /// First day of the 30-day device-supply period.
    pub period_start: NaiveDate,
    /// Days in that period with at least one transmitted reading (0–30).
    pub days_with_readings: u32,
    /// Treatment-management minutes in the calendar month of the date of service.
    pub management_minutes: u32,
    /// At least one real-time interactive communication with the patient that month.
    pub interactive_communication: bool,
    /// The set-up and education service has not been billed yet in this episode.
    pub setup_this_episode: bool,
}

/// The longest 30-day device period: a date of service later than this after
/// `period_start` belongs to another period.
pub const RPM_PERIOD_DAYS: i64 = 30;
/// More management minutes than a 31-day month holds is a typo, not a claim.
pub const MAX_MANAGEMENT_MINUTES: u32 = 31 * 24 * 60;

/// Why a scenario was rejected. Always a client error (HTTP 400 / CLI exit 2): fix the
/// named field and resubmit; nothing was evaluated or assigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScenarioError {
    #[error("the scenario must be a JSON object")]
    NotAnObject,
    #[error("field `{field}` is missing{}", for_service(.service))]
    MissingField {
        field: &'static str,
        service: Option<&'static str>,
    },
    #[error("field `{field}` is not a scenario field")]
    UnknownField { field: String },
    #[error("field `{field}` does not apply to {service}")]
    NotApplicable {
        field: &'static str,
        service: &'static str,
    },
    #[error("field `{field}`: {value} is not {expected}")]
    InvalidValue {
        field: &'static str,
        value: String,
        expected: String,
    },
    #[error("field `{field}`: {message}")]
    OutOfRange {
        field: &'static str,
        message: String,
    },
}

fn for_service(service: &Option<&'static str>) -> String {
    service
        .map(|s| format!(" (required for {s})"))
        .unwrap_or_default()
}

impl ScenarioError {
    /// The field at fault, if the error concerns one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ScenarioError::NotAnObject => None,
            ScenarioError::UnknownField { field } => Some(field),
            ScenarioError::MissingField { field, .. }
            | ScenarioError::NotApplicable { field, .. }
            | ScenarioError::InvalidValue { field, .. }
            | ScenarioError::OutOfRange { field, .. } => Some(field),
        }
    }
}

const VISIT_FIELDS: &[&str] = &[
    "patient_status",
    "level",
    "modality",
    "patient_location",
    "patient_declined_video",
];
const RPM_FIELDS: &[&str] = &[
    "period_start",
    "days_with_readings",
    "management_minutes",
    "interactive_communication",
    "setup_this_episode",
];
const COMMON_FIELDS: &[&str] = &["date_of_service", "payer", "service", "site"];

/// Reads fields out of one JSON object, naming the field in every error.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    service: Option<&'static str>,
}

impl Fields<'_> {
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    fn required<T>(
        &self,
        field: &'static str,
        read: impl Fn(&'static str, &Value) -> Result<T, ScenarioError>,
    ) -> Result<T, ScenarioError> {
        match self.get(field) {
            Some(value) => read(field, value),
            None => Err(ScenarioError::MissingField {
                field,
                service: self.service,
            }),
        }
    }

    fn optional<T>(
        &self,
        field: &'static str,
        read: impl Fn(&'static str, &Value) -> Result<T, ScenarioError>,
    ) -> Result<Option<T>, ScenarioError> {
        self.get(field).map(|value| read(field, value)).transpose()
    }
}

fn invalid(field: &'static str, value: &Value, expected: impl Into<String>) -> ScenarioError {
    ScenarioError::InvalidValue {
        field,
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn read_enum<T: for<'de> Deserialize<'de>>(
    expected: &'static str,
) -> impl Fn(&'static str, &Value) -> Result<T, ScenarioError> {
    move |field, value| {
        if !value.is_string() {
            return Err(invalid(field, value, expected));
        }
        serde_json::from_value(value.clone()).map_err(|_| invalid(field, value, expected))
    }
}

fn read_date(field: &'static str, value: &Value) -> Result<NaiveDate, ScenarioError> {
    value
        .as_str()
        .and_then(|text| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
        .ok_or_else(|| invalid(field, value, "a calendar date YYYY-MM-DD"))
}

fn read_bool(field: &'static str, value: &Value) -> Result<bool, ScenarioError> {
    value
        .as_bool()
        .ok_or_else(|| invalid(field, value, "true or false"))
}

fn read_count(field: &'static str, value: &Value) -> Result<u32, ScenarioError> {
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(field, value, "a whole number >= 0"))
}

impl Scenario {
    /// Validates one JSON scenario (the format in docs/billing.md).
    pub fn from_json(value: &Value) -> Result<Scenario, ScenarioError> {
        let object = value.as_object().ok_or(ScenarioError::NotAnObject)?;
        for key in object.keys() {
            let known = COMMON_FIELDS
                .iter()
                .chain(VISIT_FIELDS)
                .chain(RPM_FIELDS)
                .any(|f| f == key);
            if !known {
                return Err(ScenarioError::UnknownField { field: key.clone() });
            }
        }
        let common = Fields {
            object,
            service: None,
        };
        let service: BillingService = common.required(
            "service",
            read_enum("one of e_m_visit, virtual_check_in, rpm_month"),
        )?;
        let date_of_service = common.required("date_of_service", read_date)?;
        let payer: Payer = common.required("payer", read_enum("one of medicare, commercial"))?;
        let site: Site =
            common.required("site", read_enum("one of physician_office, fqhc, rhc"))?;
        let fields = Fields {
            object,
            service: Some(service.as_str()),
        };
        let (applicable, not_applicable) = match service {
            BillingService::RpmMonth => (RPM_FIELDS, VISIT_FIELDS),
            _ => (VISIT_FIELDS, RPM_FIELDS),
        };
        debug_assert!(!applicable.is_empty());
        for field in not_applicable {
            if fields.get(field).is_some() {
                return Err(ScenarioError::NotApplicable {
                    field,
                    service: service.as_str(),
                });
            }
        }
        let service_facts = match service {
            BillingService::EMVisit | BillingService::VirtualCheckIn => {
                let patient_status: PatientStatus =
                    fields.required("patient_status", read_enum("one of new, established"))?;
                let level = fields.optional("level", |field, value| {
                    value
                        .as_u64()
                        .and_then(|n| u8::try_from(n).ok())
                        .ok_or_else(|| invalid(field, value, "a whole number 1-5"))
                })?;
                let kind = match (service, level) {
                    (BillingService::VirtualCheckIn, Some(_)) => {
                        return Err(ScenarioError::NotApplicable {
                            field: "level",
                            service: service.as_str(),
                        });
                    }
                    (BillingService::VirtualCheckIn, None) => VisitKind::VirtualCheckIn,
                    (_, None) => {
                        return Err(ScenarioError::MissingField {
                            field: "level",
                            service: Some(service.as_str()),
                        });
                    }
                    (_, Some(level)) => VisitKind::EMVisit { level },
                };
                let modality: Modality =
                    fields.required("modality", read_enum("one of video, audio_only"))?;
                let patient_location: PatientLocation =
                    fields.required("patient_location", read_enum("one of home, other"))?;
                let patient_declined_video = fields
                    .optional("patient_declined_video", read_bool)?
                    .unwrap_or(false);
                ServiceFacts::Visit {
                    kind,
                    patient_status,
                    modality,
                    patient_location,
                    patient_declined_video,
                }
            }
            BillingService::RpmMonth => ServiceFacts::RpmMonth(RpmMonth {
                period_start: fields.required("period_start", read_date)?,
                days_with_readings: fields.required("days_with_readings", read_count)?,
                management_minutes: fields.required("management_minutes", read_count)?,
                interactive_communication: fields
                    .required("interactive_communication", read_bool)?,
                setup_this_episode: fields.required("setup_this_episode", read_bool)?,
            }),
        };
        let scenario = Scenario {
            date_of_service,
            payer,
            site,
            service: service_facts,
        };
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks ranges and cross-field consistency; [`Scenario::from_json`] and
    /// [`Scenario::from_encounter`] both call it, and the evaluator calls it again so a
    /// hand-built scenario cannot bypass it.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        match &self.service {
            ServiceFacts::Visit {
                kind: VisitKind::EMVisit { level },
                patient_status,
                ..
            } => {
                if !(1..=5).contains(level) {
                    return Err(ScenarioError::OutOfRange {
                        field: "level",
                        message: format!("E/M level {level} is not 1-5"),
                    });
                }
                if *level == 1 && *patient_status == PatientStatus::New {
                    return Err(ScenarioError::OutOfRange {
                        field: "level",
                        message: "new-patient E/M starts at level 2 (99201 was deleted in 2021)"
                            .into(),
                    });
                }
                Ok(())
            }
            ServiceFacts::Visit { .. } => Ok(()),
            ServiceFacts::RpmMonth(month) => {
                if month.days_with_readings > 30 {
                    return Err(ScenarioError::OutOfRange {
                        field: "days_with_readings",
                        message: format!(
                            "{} days do not fit a 30-day period",
                            month.days_with_readings
                        ),
                    });
                }
                if month.management_minutes > MAX_MANAGEMENT_MINUTES {
                    return Err(ScenarioError::OutOfRange {
                        field: "management_minutes",
                        message: format!(
                            "{} minutes exceed a 31-day month",
                            month.management_minutes
                        ),
                    });
                }
                if month.period_start > self.date_of_service {
                    return Err(ScenarioError::OutOfRange {
                        field: "period_start",
                        message: format!(
                            "the period starts {} after the date of service {}",
                            month.period_start, self.date_of_service
                        ),
                    });
                }
                let last_day = month.period_start + Duration::days(RPM_PERIOD_DAYS - 1);
                if self.date_of_service > last_day {
                    return Err(ScenarioError::OutOfRange {
                        field: "date_of_service",
                        message: format!(
                            "{} is outside the 30-day period {}..={last_day}",
                            self.date_of_service, month.period_start
                        ),
                    });
                }
                Ok(())
            }
        }
    }

    /// The billing scenario of an encounter whose consultation has ended: visit type,
    /// payer, site and patient location from `Scheduled`, the modality that carried most
    /// of the consultation from `ConsultationEnded`, and the date of service is the UTC
    /// date the consultation started.
    ///
    /// `patient_declined_video` is passed in because the encounter stream does not record
    /// it: the billing service takes it from the clinician's attestation.
    pub fn from_encounter(
        encounter: &Encounter,
        patient_declined_video: bool,
    ) -> Result<Scenario, ScenarioError> {
        let missing = |field| ScenarioError::MissingField {
            field,
            service: None,
        };
        let schedule = encounter.schedule.as_ref().ok_or(missing("schedule"))?;
        let started: DateTime<Utc> = encounter
            .consultation_started_at
            .ok_or(missing("consultation_started_at"))?;
        let ended = encounter
            .consultation_ended
            .as_ref()
            .ok_or(missing("consultation_ended"))?;
        let visit_type = &schedule.visit_type;
        let kind = match (visit_type.service, visit_type.level) {
            (ServiceKind::EMVisit, Some(level)) => VisitKind::EMVisit { level },
            (ServiceKind::EMVisit, None) => {
                return Err(ScenarioError::MissingField {
                    field: "level",
                    service: Some(BillingService::EMVisit.as_str()),
                });
            }
            (ServiceKind::VirtualCheckIn, _) => VisitKind::VirtualCheckIn,
        };
        let scenario = Scenario {
            date_of_service: started.date_naive(),
            payer: schedule.payer,
            site: schedule.site,
            service: ServiceFacts::Visit {
                kind,
                patient_status: visit_type.patient_status,
                modality: ended.modality_used,
                patient_location: schedule.patient_location,
                patient_declined_video,
            },
        };
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn billing_service(&self) -> BillingService {
        match self.service {
            ServiceFacts::Visit {
                kind: VisitKind::EMVisit { .. },
                ..
            } => BillingService::EMVisit,
            ServiceFacts::Visit {
                kind: VisitKind::VirtualCheckIn,
                ..
            } => BillingService::VirtualCheckIn,
            ServiceFacts::RpmMonth(_) => BillingService::RpmMonth,
        }
    }

    /// The scenario in its JSON form (the inverse of [`Scenario::from_json`]).
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        let mut put = |key: &str, value: Value| {
            object.insert(key.to_owned(), value);
        };
        fn json<T: Serialize>(value: &T) -> Value {
            // Unit enum variants always serialise to a JSON string.
            serde_json::to_value(value).unwrap_or(Value::Null)
        }
        put(
            "date_of_service",
            Value::String(self.date_of_service.to_string()),
        );
        put("payer", json(&self.payer));
        put("service", json(&self.billing_service()));
        put("site", json(&self.site));
        match &self.service {
            ServiceFacts::Visit {
                kind,
                patient_status,
                modality,
                patient_location,
                patient_declined_video,
            } => {
                put("patient_status", json(patient_status));
                if let VisitKind::EMVisit { level } = kind {
                    put("level", Value::from(*level));
                }
                put("modality", json(modality));
                put("patient_location", json(patient_location));
                put(
                    "patient_declined_video",
                    Value::Bool(*patient_declined_video),
                );
            }
            ServiceFacts::RpmMonth(month) => {
                put(
                    "period_start",
                    Value::String(month.period_start.to_string()),
                );
                put("days_with_readings", Value::from(month.days_with_readings));
                put("management_minutes", Value::from(month.management_minutes));
                put(
                    "interactive_communication",
                    Value::Bool(month.interactive_communication),
                );
                put("setup_this_episode", Value::Bool(month.setup_this_episode));
            }
        }
        Value::Object(object)
    }
}
