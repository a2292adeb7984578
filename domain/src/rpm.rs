//! Remote patient monitoring enrolment: device readings arrive in batches, out-of-range
//! values raise threshold alerts, clinician management time is logged per month.
//!
//! The monthly billing eligibility (days with readings per 30-day period, management
//! minutes per calendar month) is computed by the rpm_timeseries projection and the
//! billing rules from these events.

use chrono::{DateTime, NaiveDate, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::patient::IdentityStatus;

/// A vital sign the platform accepts, with its LOINC code and the UCUM units allowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitalSign {
    pub loinc: &'static str,
    pub display: &'static str,
    pub units: &'static [&'static str],
    /// Physiologically plausible range; outside it a reading is rejected as bad input.
    pub plausible: (f64, f64),
}

/// LOINC vital-sign codes (DOMAIN.md): BP components, heart rate, weight, SpO2, glucose.
pub const VITAL_SIGNS: &[VitalSign] = &[
    VitalSign {
        loinc: "8480-6",
        display: "Systolic blood pressure",
        units: &["mm[Hg]"],
        plausible: (40.0, 300.0),
    },
    VitalSign {
        loinc: "8462-4",
        display: "Diastolic blood pressure",
        units: &["mm[Hg]"],
        plausible: (20.0, 200.0),
    },
    VitalSign {
        loinc: "8867-4",
        display: "Heart rate",
        units: &["/min"],
        plausible: (20.0, 300.0),
    },
    VitalSign {
        loinc: "29463-7",
        display: "Body weight",
        units: &["kg", "[lb_av]"],
        plausible: (0.5, 700.0),
    },
    VitalSign {
        loinc: "59408-5",
        display: "Oxygen saturation by pulse oximetry",
        units: &["%"],
        plausible: (30.0, 100.0),
    },
    VitalSign {
        loinc: "2708-6",
        display: "Oxygen saturation in arterial blood",
        units: &["%"],
        plausible: (30.0, 100.0),
    },
    VitalSign {
        loinc: "2339-0",
        display: "Glucose [Mass/volume] in blood",
        units: &["mg/dL"],
        plausible: (10.0, 1500.0),
    },
    VitalSign {
        loinc: "41653-7",
        display: "Glucose [Mass/volume] in capillary blood by glucometer",
        units: &["mg/dL"],
        plausible: (10.0, 1500.0),
    },
];

pub fn vital_sign(loinc: &str) -> Option<&'static VitalSign> {
    VITAL_SIGNS.iter().find(|v| v.loinc == loinc)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Reading {
    pub code: String,
    pub value: f64,
    pub unit: String,
    pub effective_at: DateTime<Utc>,
    pub device_id: String,
}

/// Alert band for one code: a reading below `low` or above `high` breaches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Threshold {
    pub code: String,
    pub low: Option<f64>,
    pub high: Option<f64>,
}

/// Where the EHR keeps one reading's Observation (`Observation/<id>`, version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObservationAck {
    pub ehr_resource_id: String,
    pub ehr_version: String,
}

/// Write-back state of one readings batch (its Observations in the EHR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ObservationWriteBack {
    Acknowledged { observations: Vec<ObservationAck> },
    Failed { attempts: u32, retryable: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum RpmCommand {
    Enroll {
        enrollment_id: Uuid,
        patient_id: Uuid,
        device_id: String,
        /// First day of the first 30-day device-supply period, in the patient's time zone.
        period_start: NaiveDate,
        time_zone: String,
        thresholds: Vec<Threshold>,
        at: DateTime<Utc>,
    },
    RecordReadings {
        batch_id: Uuid,
        readings: Vec<Reading>,
        at: DateTime<Utc>,
    },
    LogManagementTime {
        clinician_id: String,
        minutes: u32,
        interactive_communication: bool,
        at: DateTime<Utc>,
    },
    /// The EHR connector wrote a batch's Observations (one per reading, in reading
    /// order). The connector passes the patient's identity status, so the decision stays
    /// pure while enforcing "nothing reaches a chart under review" (as for encounters).
    RecordObservationsWrittenBack {
        batch_id: Uuid,
        patient_identity: IdentityStatus,
        observations: Vec<ObservationAck>,
        at: DateTime<Utc>,
    },
    RecordObservationWriteBackFailed {
        batch_id: Uuid,
        status: Option<u16>,
        message: String,
        retryable: bool,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum RpmEvent {
    Enrolled {
        enrollment_id: Uuid,
        patient_id: Uuid,
        device_id: String,
        period_start: NaiveDate,
        time_zone: String,
        thresholds: Vec<Threshold>,
        at: DateTime<Utc>,
    },
    ReadingsRecorded {
        batch_id: Uuid,
        readings: Vec<Reading>,
        at: DateTime<Utc>,
    },
    ThresholdBreached {
        batch_id: Uuid,
        reading: Reading,
        threshold: Threshold,
        at: DateTime<Utc>,
    },
    ManagementTimeLogged {
        clinician_id: String,
        minutes: u32,
        interactive_communication: bool,
        at: DateTime<Utc>,
    },
    /// Every reading of the batch is in the EHR as an Observation.
    ObservationsWrittenBack {
        batch_id: Uuid,
        observations: Vec<ObservationAck>,
        at: DateTime<Utc>,
    },
    ObservationWriteBackFailed {
        batch_id: Uuid,
        status: Option<u16>,
        message: String,
        retryable: bool,
        attempt: u32,
        at: DateTime<Utc>,
    },
}

impl RpmEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            RpmEvent::Enrolled { .. } => "Enrolled",
            RpmEvent::ReadingsRecorded { .. } => "ReadingsRecorded",
            RpmEvent::ThresholdBreached { .. } => "ThresholdBreached",
            RpmEvent::ManagementTimeLogged { .. } => "ManagementTimeLogged",
            RpmEvent::ObservationsWrittenBack { .. } => "ObservationsWrittenBack",
            RpmEvent::ObservationWriteBackFailed { .. } => "ObservationWriteBackFailed",
        }
    }

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            RpmEvent::Enrolled { at, .. }
            | RpmEvent::ReadingsRecorded { at, .. }
            | RpmEvent::ThresholdBreached { at, .. }
            | RpmEvent::ManagementTimeLogged { at, .. }
            | RpmEvent::ObservationsWrittenBack { at, .. }
            | RpmEvent::ObservationWriteBackFailed { at, .. } => *at,
        }
    }

    /// Readings are clinical data about an identified patient: PHI.
    pub fn contains_phi(&self) -> bool {
        matches!(
            self,
            RpmEvent::ReadingsRecorded { .. } | RpmEvent::ThresholdBreached { .. }
        )
    }
}

impl RpmCommand {
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            RpmCommand::Enroll { at, .. }
            | RpmCommand::RecordReadings { at, .. }
            | RpmCommand::LogManagementTime { at, .. }
            | RpmCommand::RecordObservationsWrittenBack { at, .. }
            | RpmCommand::RecordObservationWriteBackFailed { at, .. } => *at,
        }
    }
}

/// Why an RPM command was rejected (client errors: fix the input, don't retry as is).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RpmError {
    #[error("the patient is not enrolled")]
    NotEnrolled,
    #[error("already enrolled")]
    AlreadyEnrolled,
    #[error("a required field is empty: {0}")]
    EmptyField(&'static str),
    #[error("an empty batch of readings")]
    EmptyBatch,
    #[error("a batch holds at most {max} readings, got {got}")]
    BatchTooLarge { max: usize, got: usize },
    #[error("reading {index}: unknown LOINC code {code}")]
    UnknownCode { index: usize, code: String },
    #[error("reading {index}: unit {unit} is not valid for {code}")]
    InvalidUnit {
        index: usize,
        code: String,
        unit: String,
    },
    #[error("reading {index}: value {value} is implausible for {code}")]
    ImplausibleValue {
        index: usize,
        code: String,
        value: f64,
    },
    #[error("reading {index}: taken at {effective_at}, after it was received at {at}")]
    ReadingInFuture {
        index: usize,
        effective_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    #[error("management time must be 1-240 minutes, got {0}")]
    InvalidMinutes(u32),
    #[error("threshold for {0} has low above high")]
    InvalidThreshold(String),
    #[error("time went backwards: {at} is before the last recorded event at {last}")]
    TimeWentBackwards {
        at: DateTime<Utc>,
        last: DateTime<Utc>,
    },
    #[error("no readings batch {0} was recorded on this enrolment")]
    UnknownBatch(Uuid),
    #[error("batch {batch_id} holds {expected} readings, but {got} Observations were acknowledged")]
    ObservationCountMismatch {
        batch_id: Uuid,
        expected: usize,
        got: usize,
    },
    #[error("the patient's identity is {0:?}; nothing is written to a chart until it is resolved")]
    IdentityNotResolved(IdentityStatus),
}

/// Largest batch accepted in one command: bounded so one event stays under the store's
/// event size limit.
pub const MAX_READINGS_PER_BATCH: usize = 2_000;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct RpmEnrollment {
    pub enrollment_id: Option<Uuid>,
    pub patient_id: Option<Uuid>,
    pub device_id: Option<String>,
    pub period_start: Option<NaiveDate>,
    pub time_zone: Option<String>,
    pub thresholds: Vec<Threshold>,
    pub batches: Vec<Uuid>,
    /// Readings per batch, in the order of `batches`.
    #[serde(default)]
    pub batch_sizes: Vec<usize>,
    /// Write-back state of each batch whose Observations the connector handled.
    #[serde(default)]
    pub observation_write_backs: Vec<(Uuid, ObservationWriteBack)>,
    pub readings: u64,
    pub breaches: u64,
    pub management_minutes: u64,
    pub last_event_at: Option<DateTime<Utc>>,
    pub version: u64,
}

impl RpmEnrollment {
    /// Readings in a recorded batch.
    fn batch_size(&self, batch_id: &Uuid) -> Result<usize, RpmError> {
        self.batches
            .iter()
            .position(|b| b == batch_id)
            .map(|index| self.batch_sizes.get(index).copied().unwrap_or_default())
            .ok_or(RpmError::UnknownBatch(*batch_id))
    }

    pub fn observation_write_back(&self, batch_id: &Uuid) -> Option<&ObservationWriteBack> {
        self.observation_write_backs
            .iter()
            .find(|(b, _)| b == batch_id)
            .map(|(_, state)| state)
    }

    fn set_observation_write_back(&mut self, batch_id: Uuid, state: ObservationWriteBack) {
        match self
            .observation_write_backs
            .iter_mut()
            .find(|(b, _)| *b == batch_id)
        {
            Some((_, existing)) => *existing = state,
            None => self.observation_write_backs.push((batch_id, state)),
        }
    }
}

fn breach(threshold: &Threshold, value: f64) -> bool {
    threshold.low.is_some_and(|low| value < low) || threshold.high.is_some_and(|high| value > high)
}

impl Aggregate for RpmEnrollment {
    const CATEGORY: &'static str = "rpm";
    type Command = RpmCommand;
    type Event = RpmEvent;
    type Error = RpmError;

    fn decide(&self, command: &RpmCommand) -> Result<Vec<RpmEvent>, RpmError> {
        if let Some(last) = self.last_event_at
            && command.at() < last
        {
            return Err(RpmError::TimeWentBackwards {
                at: command.at(),
                last,
            });
        }
        if !matches!(command, RpmCommand::Enroll { .. }) && self.enrollment_id.is_none() {
            return Err(RpmError::NotEnrolled);
        }
        match command {
            RpmCommand::Enroll {
                enrollment_id,
                patient_id,
                device_id,
                period_start,
                time_zone,
                thresholds,
                at,
            } => {
                if self.enrollment_id.is_some() {
                    return Err(RpmError::AlreadyEnrolled);
                }
                if device_id.trim().is_empty() {
                    return Err(RpmError::EmptyField("device_id"));
                }
                if time_zone.trim().is_empty() {
                    return Err(RpmError::EmptyField("time_zone"));
                }
                for threshold in thresholds {
                    if vital_sign(&threshold.code).is_none() {
                        return Err(RpmError::UnknownCode {
                            index: 0,
                            code: threshold.code.clone(),
                        });
                    }
                    if let (Some(low), Some(high)) = (threshold.low, threshold.high)
                        && low > high
                    {
                        return Err(RpmError::InvalidThreshold(threshold.code.clone()));
                    }
                }
                Ok(vec![RpmEvent::Enrolled {
                    enrollment_id: *enrollment_id,
                    patient_id: *patient_id,
                    device_id: device_id.clone(),
                    period_start: *period_start,
                    time_zone: time_zone.clone(),
                    thresholds: thresholds.clone(),
                    at: *at,
                }])
            }
            RpmCommand::RecordReadings {
                batch_id,
                readings,
                at,
            } => {
                // A device gateway that retries a batch gets no duplicate readings.
                if self.batches.contains(batch_id) {
                    return Ok(vec![]);
                }
                if readings.is_empty() {
                    return Err(RpmError::EmptyBatch);
                }
                if readings.len() > MAX_READINGS_PER_BATCH {
                    return Err(RpmError::BatchTooLarge {
                        max: MAX_READINGS_PER_BATCH,
                        got: readings.len(),
                    });
                }
                for (index, reading) in readings.iter().enumerate() {
                    let sign = vital_sign(&reading.code).ok_or_else(|| RpmError::UnknownCode {
                        index,
                        code: reading.code.clone(),
                    })?;
                    if !sign.units.contains(&reading.unit.as_str()) {
                        return Err(RpmError::InvalidUnit {
                            index,
                            code: reading.code.clone(),
                            unit: reading.unit.clone(),
                        });
                    }
                    let (low, high) = if reading.unit == "[lb_av]" {
                        (sign.plausible.0 * 2.2046, sign.plausible.1 * 2.2046)
                    } else {
                        sign.plausible
                    };
                    if !reading.value.is_finite() || reading.value < low || reading.value > high {
                        return Err(RpmError::ImplausibleValue {
                            index,
                            code: reading.code.clone(),
                            value: reading.value,
                        });
                    }
                    if reading.effective_at > *at {
                        return Err(RpmError::ReadingInFuture {
                            index,
                            effective_at: reading.effective_at,
                            at: *at,
                        });
                    }
                    if reading.device_id.trim().is_empty() {
                        return Err(RpmError::EmptyField("device_id"));
                    }
                }
                let mut events = vec![RpmEvent::ReadingsRecorded {
                    batch_id: *batch_id,
                    readings: readings.clone(),
                    at: *at,
                }];
                for reading in readings {
                    for threshold in self.thresholds.iter().filter(|t| t.code == reading.code) {
                        if breach(threshold, reading.value) {
                            events.push(RpmEvent::ThresholdBreached {
                                batch_id: *batch_id,
                                reading: reading.clone(),
                                threshold: threshold.clone(),
                                at: *at,
                            });
                        }
                    }
                }
                Ok(events)
            }
            RpmCommand::RecordObservationsWrittenBack {
                batch_id,
                patient_identity,
                observations,
                at,
            } => {
                if !patient_identity.allows_chart_writes() {
                    return Err(RpmError::IdentityNotResolved(*patient_identity));
                }
                let expected = self.batch_size(batch_id)?;
                if observations.len() != expected {
                    return Err(RpmError::ObservationCountMismatch {
                        batch_id: *batch_id,
                        expected,
                        got: observations.len(),
                    });
                }
                if observations
                    .iter()
                    .any(|o| o.ehr_resource_id.trim().is_empty())
                {
                    return Err(RpmError::EmptyField("ehr_resource_id"));
                }
                // The same acknowledgement again (a repeated job): nothing new.
                if let Some(ObservationWriteBack::Acknowledged {
                    observations: known,
                }) = self.observation_write_back(batch_id)
                    && known == observations
                {
                    return Ok(vec![]);
                }
                Ok(vec![RpmEvent::ObservationsWrittenBack {
                    batch_id: *batch_id,
                    observations: observations.clone(),
                    at: *at,
                }])
            }
            RpmCommand::RecordObservationWriteBackFailed {
                batch_id,
                status,
                message,
                retryable,
                at,
            } => {
                self.batch_size(batch_id)?;
                if message.trim().is_empty() {
                    return Err(RpmError::EmptyField("message"));
                }
                let attempt = match self.observation_write_back(batch_id) {
                    Some(ObservationWriteBack::Failed { attempts, .. }) => attempts + 1,
                    _ => 1,
                };
                Ok(vec![RpmEvent::ObservationWriteBackFailed {
                    batch_id: *batch_id,
                    status: *status,
                    message: message.clone(),
                    retryable: *retryable,
                    attempt,
                    at: *at,
                }])
            }
            RpmCommand::LogManagementTime {
                clinician_id,
                minutes,
                interactive_communication,
                at,
            } => {
                if clinician_id.trim().is_empty() {
                    return Err(RpmError::EmptyField("clinician_id"));
                }
                if !(1..=240).contains(minutes) {
                    return Err(RpmError::InvalidMinutes(*minutes));
                }
                Ok(vec![RpmEvent::ManagementTimeLogged {
                    clinician_id: clinician_id.clone(),
                    minutes: *minutes,
                    interactive_communication: *interactive_communication,
                    at: *at,
                }])
            }
        }
    }

    fn apply(&mut self, event: &RpmEvent) {
        self.version += 1;
        self.last_event_at = Some(event.at());
        match event {
            RpmEvent::Enrolled {
                enrollment_id,
                patient_id,
                device_id,
                period_start,
                time_zone,
                thresholds,
                ..
            } => {
                self.enrollment_id = Some(*enrollment_id);
                self.patient_id = Some(*patient_id);
                self.device_id = Some(device_id.clone());
                self.period_start = Some(*period_start);
                self.time_zone = Some(time_zone.clone());
                self.thresholds = thresholds.clone();
            }
            RpmEvent::ReadingsRecorded {
                batch_id, readings, ..
            } => {
                self.batches.push(*batch_id);
                self.batch_sizes.push(readings.len());
                self.readings += readings.len() as u64;
            }
            RpmEvent::ObservationsWrittenBack {
                batch_id,
                observations,
                ..
            } => self.set_observation_write_back(
                *batch_id,
                ObservationWriteBack::Acknowledged {
                    observations: observations.clone(),
                },
            ),
            RpmEvent::ObservationWriteBackFailed {
                batch_id,
                retryable,
                attempt,
                ..
            } => self.set_observation_write_back(
                *batch_id,
                ObservationWriteBack::Failed {
                    attempts: *attempt,
                    retryable: *retryable,
                },
            ),
            RpmEvent::ThresholdBreached { .. } => self.breaches += 1,
            RpmEvent::ManagementTimeLogged { minutes, .. } => {
                self.management_minutes += u64::from(*minutes)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use chrono::TimeZone;

    fn t(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, hour, 0, 0).unwrap()
    }

    fn enrolled() -> RpmEvent {
        RpmEvent::Enrolled {
            enrollment_id: Uuid::from_u128(1),
            patient_id: Uuid::from_u128(2),
            device_id: "bp-cuff-1".into(),
            period_start: NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(),
            time_zone: "America/Chicago".into(),
            thresholds: vec![Threshold {
                code: "8480-6".into(),
                low: Some(90.0),
                high: Some(160.0),
            }],
            at: t(1),
        }
    }

    fn systolic(value: f64) -> Reading {
        Reading {
            code: "8480-6".into(),
            value,
            unit: "mm[Hg]".into(),
            effective_at: t(2),
            device_id: "bp-cuff-1".into(),
        }
    }

    #[test]
    fn enroll_accepts_and_rejects() {
        let RpmEvent::Enrolled { thresholds, .. } = enrolled() else {
            unreachable!()
        };
        given::<RpmEnrollment>(vec![])
            .when(RpmCommand::Enroll {
                enrollment_id: Uuid::from_u128(1),
                patient_id: Uuid::from_u128(2),
                device_id: "bp-cuff-1".into(),
                period_start: NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(),
                time_zone: "America/Chicago".into(),
                thresholds: thresholds.clone(),
                at: t(1),
            })
            .then(vec![enrolled()]);
        given::<RpmEnrollment>(vec![enrolled()])
            .when(RpmCommand::Enroll {
                enrollment_id: Uuid::from_u128(1),
                patient_id: Uuid::from_u128(2),
                device_id: "bp-cuff-1".into(),
                period_start: NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(),
                time_zone: "America/Chicago".into(),
                thresholds,
                at: t(2),
            })
            .then_err(RpmError::AlreadyEnrolled);
    }

    #[test]
    fn readings_raise_threshold_breaches_and_dedupe_batches() {
        let batch = Uuid::from_u128(9);
        let state = given::<RpmEnrollment>(vec![enrolled()])
            .when(RpmCommand::RecordReadings {
                batch_id: batch,
                readings: vec![systolic(120.0), systolic(171.0)],
                at: t(3),
            })
            .then_ok(|events| {
                assert_eq!(events.len(), 2);
                assert!(matches!(&events[1], RpmEvent::ThresholdBreached { reading, .. } if reading.value == 171.0));
            });
        assert_eq!(state.readings, 2);
        let recorded = RpmEvent::ReadingsRecorded {
            batch_id: batch,
            readings: vec![systolic(120.0)],
            at: t(3),
        };
        given::<RpmEnrollment>(vec![enrolled(), recorded])
            .when(RpmCommand::RecordReadings {
                batch_id: batch,
                readings: vec![systolic(120.0)],
                at: t(4),
            })
            .then(vec![]);
    }

    #[test]
    fn readings_reject_bad_input() {
        let when = |readings: Vec<Reading>| {
            given::<RpmEnrollment>(vec![enrolled()]).when(RpmCommand::RecordReadings {
                batch_id: Uuid::from_u128(9),
                readings,
                at: t(3),
            })
        };
        when(vec![]).then_err(RpmError::EmptyBatch);
        let mut unknown = systolic(120.0);
        unknown.code = "0000-0".into();
        when(vec![unknown]).then_err(RpmError::UnknownCode {
            index: 0,
            code: "0000-0".into(),
        });
        let mut wrong_unit = systolic(120.0);
        wrong_unit.unit = "kg".into();
        when(vec![systolic(120.0), wrong_unit]).then_err(RpmError::InvalidUnit {
            index: 1,
            code: "8480-6".into(),
            unit: "kg".into(),
        });
        let state = RpmEnrollment::replay([enrolled()].iter());
        let nan = state.decide(&RpmCommand::RecordReadings {
            batch_id: Uuid::from_u128(9),
            readings: vec![systolic(f64::NAN)],
            at: t(3),
        });
        assert!(
            matches!(nan, Err(RpmError::ImplausibleValue { .. })),
            "{nan:?}"
        );
    }

    #[test]
    fn readings_reject_nan_and_future() {
        let when = |readings: Vec<Reading>| {
            given::<RpmEnrollment>(vec![enrolled()]).when(RpmCommand::RecordReadings {
                batch_id: Uuid::from_u128(9),
                readings,
                at: t(3),
            })
        };
        let mut future = systolic(120.0);
        future.effective_at = t(5);
        when(vec![future]).then_err(RpmError::ReadingInFuture {
            index: 0,
            effective_at: t(5),
            at: t(3),
        });
        when(vec![systolic(900.0)]).then_err(RpmError::ImplausibleValue {
            index: 0,
            code: "8480-6".into(),
            value: 900.0,
        });
        given::<RpmEnrollment>(vec![])
            .when(RpmCommand::RecordReadings {
                batch_id: Uuid::from_u128(9),
                readings: vec![systolic(120.0)],
                at: t(3),
            })
            .then_err(RpmError::NotEnrolled);
    }

    fn ack(n: u32) -> ObservationAck {
        ObservationAck {
            ehr_resource_id: format!("Observation/{n}"),
            ehr_version: "1".into(),
        }
    }

    #[test]
    fn observation_write_back_is_gated_on_identity_and_tracks_outcomes() {
        let batch = Uuid::from_u128(9);
        let recorded = RpmEvent::ReadingsRecorded {
            batch_id: batch,
            readings: vec![systolic(120.0), systolic(130.0)],
            at: t(3),
        };
        let written_at = |identity, observations: Vec<ObservationAck>, at| {
            RpmCommand::RecordObservationsWrittenBack {
                batch_id: batch,
                patient_identity: identity,
                observations,
                at,
            }
        };
        let written = |identity, observations| written_at(identity, observations, t(3));
        let acknowledged = RpmEvent::ObservationsWrittenBack {
            batch_id: batch,
            observations: vec![ack(1), ack(2)],
            at: t(3),
        };
        let state = given::<RpmEnrollment>(vec![enrolled(), recorded.clone()])
            .when(written(IdentityStatus::Linked, vec![ack(1), ack(2)]))
            .then(vec![acknowledged.clone()]);
        assert_eq!(
            state.observation_write_back(&batch),
            Some(&ObservationWriteBack::Acknowledged {
                observations: vec![ack(1), ack(2)]
            })
        );
        // Nothing reaches a chart under review.
        given::<RpmEnrollment>(vec![enrolled(), recorded.clone()])
            .when(written(IdentityStatus::UnderReview, vec![ack(1), ack(2)]))
            .then_err(RpmError::IdentityNotResolved(IdentityStatus::UnderReview));
        // One Observation per reading.
        given::<RpmEnrollment>(vec![enrolled(), recorded.clone()])
            .when(written(IdentityStatus::ConfirmedNew, vec![ack(1)]))
            .then_err(RpmError::ObservationCountMismatch {
                batch_id: batch,
                expected: 2,
                got: 1,
            });
        given::<RpmEnrollment>(vec![enrolled()])
            .when(written(IdentityStatus::Linked, vec![ack(1)]))
            .then_err(RpmError::UnknownBatch(batch));
        // The same acknowledgement again records nothing.
        given::<RpmEnrollment>(vec![enrolled(), recorded.clone(), acknowledged])
            .when(written(IdentityStatus::Linked, vec![ack(1), ack(2)]))
            .then(vec![]);
        // Failures count attempts; a later success replaces the failure.
        let failed_with = |message: &str, retryable| RpmCommand::RecordObservationWriteBackFailed {
            batch_id: batch,
            status: Some(503),
            message: message.into(),
            retryable,
            at: t(4),
        };
        let failed = |retryable| failed_with("EHR unavailable", retryable);
        let first_failure = RpmEvent::ObservationWriteBackFailed {
            batch_id: batch,
            status: Some(503),
            message: "EHR unavailable".into(),
            retryable: true,
            attempt: 1,
            at: t(4),
        };
        given::<RpmEnrollment>(vec![enrolled(), recorded.clone()])
            .when(failed(true))
            .then(vec![first_failure.clone()]);
        given::<RpmEnrollment>(vec![enrolled(), recorded.clone(), first_failure.clone()])
            .when(failed(false))
            .then_ok(|events| {
                assert!(matches!(
                    &events[0],
                    RpmEvent::ObservationWriteBackFailed {
                        attempt: 2,
                        retryable: false,
                        ..
                    }
                ))
            });
        let healed = given::<RpmEnrollment>(vec![enrolled(), recorded.clone(), first_failure])
            .when(written_at(
                IdentityStatus::Linked,
                vec![ack(1), ack(2)],
                t(4),
            ))
            .then_ok(|events| assert_eq!(events.len(), 1));
        assert!(matches!(
            healed.observation_write_back(&batch),
            Some(ObservationWriteBack::Acknowledged { .. })
        ));
        given::<RpmEnrollment>(vec![enrolled(), recorded])
            .when(failed_with(" ", true))
            .then_err(RpmError::EmptyField("message"));
    }

    #[test]
    fn management_time_accepts_and_rejects() {
        given::<RpmEnrollment>(vec![enrolled()])
            .when(RpmCommand::LogManagementTime {
                clinician_id: "dr-1".into(),
                minutes: 20,
                interactive_communication: true,
                at: t(4),
            })
            .then(vec![RpmEvent::ManagementTimeLogged {
                clinician_id: "dr-1".into(),
                minutes: 20,
                interactive_communication: true,
                at: t(4),
            }]);
        given::<RpmEnrollment>(vec![enrolled()])
            .when(RpmCommand::LogManagementTime {
                clinician_id: "dr-1".into(),
                minutes: 0,
                interactive_communication: true,
                at: t(4),
            })
            .then_err(RpmError::InvalidMinutes(0));
    }
}
