//! The telehealth encounter: from scheduling through consultation, structured note,
//! coding, follow-up, EHR write-back and charge release.
//!
//! Scheduling, consultation, documentation, billing and the EHR connector all append to
//! one `encounter-<uuid>` stream; the invariants that keep that stream meaningful live
//! in [`Encounter::decide`]. Every command carries `at`, the time the fact happened at
//! its source; event times on a stream never go backwards.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::patient::IdentityStatus;

/// What kind of service the visit is; drives the billing codes (see the billing rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// Evaluation and management visit (CPT 99202–99215 when furnished via telehealth).
    EMVisit,
    /// Brief virtual check-in (HCPCS G2012, CPT 98016 from 2025).
    VirtualCheckIn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PatientStatus {
    New,
    Established,
}

/// HL7 v2 table 0276 appointment reason codes used for the FHIR `appointmentType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppointmentType {
    Routine,
    Followup,
    Walkin,
    Checkup,
    Emergency,
}

/// The visit type a scheduler books. Billing derives codes from it and the policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VisitType {
    pub service: ServiceKind,
    pub patient_status: PatientStatus,
    /// E/M level 1–5 (new patients 2–5: 99201 was deleted in 2021). Absent for check-ins.
    pub level: Option<u8>,
    pub appointment_type: AppointmentType,
}

impl VisitType {
    fn validate(&self) -> Result<(), EncounterError> {
        match (self.service, self.level) {
            (ServiceKind::EMVisit, None) => Err(EncounterError::InvalidVisitType(
                "an E/M visit needs a level 1-5".into(),
            )),
            (ServiceKind::EMVisit, Some(level)) if !(1..=5).contains(&level) => Err(
                EncounterError::InvalidVisitType(format!("E/M level {level} is not 1-5")),
            ),
            (ServiceKind::EMVisit, Some(1)) if self.patient_status == PatientStatus::New => {
                Err(EncounterError::InvalidVisitType(
                    "new-patient E/M starts at level 2 (99201 was deleted in 2021)".into(),
                ))
            }
            (ServiceKind::VirtualCheckIn, Some(_)) => Err(EncounterError::InvalidVisitType(
                "a virtual check-in has no E/M level".into(),
            )),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Video,
    AudioOnly,
}

/// Where the patient is during the visit (CMS POS 10 = home, 02 = elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PatientLocation {
    Home,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Payer {
    Medicare,
    Commercial,
}

/// The billing site of the practitioner (FQ modifier is RHC/FQHC only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    PhysicianOffice,
    Fqhc,
    Rhc,
}

/// A structured note: the four SOAP sections (LOINC 61150-9, 61149-1, 51848-0, 18776-5).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct SoapSections {
    pub subjective: String,
    pub objective: String,
    pub assessment: String,
    pub plan: String,
}

impl SoapSections {
    fn validate(&self) -> Result<(), EncounterError> {
        if self.subjective.trim().is_empty()
            && self.objective.trim().is_empty()
            && self.assessment.trim().is_empty()
            && self.plan.trim().is_empty()
        {
            return Err(EncounterError::EmptyNote);
        }
        if self.assessment.trim().is_empty() || self.plan.trim().is_empty() {
            return Err(EncounterError::IncompleteNote(
                "assessment and plan are required".into(),
            ));
        }
        Ok(())
    }
}

/// Who wrote a note draft. AI-drafted notes carry the model id (FHIR `AIAST` label +
/// Provenance) and only become final when a clinician signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NoteAuthor {
    Clinician { practitioner_id: String },
    AiScribe { vendor: String, model_id: String },
}

/// LOINC document types for the DocumentReference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoteType {
    /// 11488-4 Consult note.
    ConsultNote,
    /// 11506-3 Progress note.
    ProgressNote,
}

/// One assigned billing line: CPT/HCPCS code, modifiers, CMS place of service, units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AssignedCode {
    pub code: String,
    pub modifiers: Vec<String>,
    pub pos: String,
    pub units: u32,
}

/// The billing decision recorded on the encounter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CodingOutcome {
    Billable {
        codes: Vec<AssignedCode>,
    },
    /// Not billable now, but may become so (e.g. a coverage lapse that may be restored).
    Hold {
        reasons: Vec<String>,
    },
    NotBillable {
        reasons: Vec<String>,
    },
}

/// FHIR artifacts the EHR connector writes for an encounter.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(tag = "resource", rename_all = "snake_case")]
pub enum WriteBackArtifact {
    Appointment,
    Encounter,
    DocumentReference,
    Task { task_id: Uuid },
    ChargeItem,
}

/// How what the EHR holds for an acknowledged artifact differs from what was
/// acknowledged (found by the connector's reconciliation job, read back over FHIR).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// The resource is gone: deleted in the EHR, or no longer found by its identifier.
    Missing,
    /// Its `status` (or DocumentReference `docStatus`) is not what was written.
    StatusChanged,
    /// Same status, but the EHR's version moved past the acknowledged one: someone
    /// else changed it.
    VersionChanged,
    /// The clinical note is not there: the Composition is gone or the
    /// DocumentReference lost its attachment.
    NoteMissing,
    /// More than one resource carries the business identifier.
    Duplicated,
}

/// A drift that no later successful write-back has resolved yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OpenDrift {
    pub kind: DriftKind,
    pub resource: String,
    pub expected: String,
    pub found: String,
    pub detected_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WriteBackState {
    Requested,
    Succeeded,
    Failed,
    /// The compliance map refused to send PHI to the EHR (no BAA in effect): nothing
    /// was sent; a person must fix coverage, then replay.
    Blocked,
}

// ----------------------------------------------------------------------------------
// Commands
// ----------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum EncounterCommand {
    Schedule(Schedule),
    Reschedule {
        window_start: DateTime<Utc>,
        window_end: DateTime<Utc>,
        reason: String,
        at: DateTime<Utc>,
    },
    Cancel {
        reason: String,
        at: DateTime<Utc>,
    },
    MarkNoShow {
        at: DateTime<Utc>,
    },
    CheckIn {
        at: DateTime<Utc>,
    },
    StartConsultation {
        modality: Modality,
        at: DateTime<Utc>,
    },
    ChangeModality {
        to: Modality,
        reason: String,
        at: DateTime<Utc>,
    },
    EndConsultation {
        at: DateTime<Utc>,
    },
    DraftNote {
        author: NoteAuthor,
        note_type: NoteType,
        sections: SoapSections,
        at: DateTime<Utc>,
    },
    AmendNote {
        author: NoteAuthor,
        sections: SoapSections,
        at: DateTime<Utc>,
    },
    SignNote {
        practitioner_id: String,
        at: DateTime<Utc>,
    },
    AddAddendum {
        author_id: String,
        text: String,
        at: DateTime<Utc>,
    },
    AssignCodes {
        outcome: CodingOutcome,
        policy_version: u64,
        rule_trace: Vec<String>,
        at: DateTime<Utc>,
    },
    CreateFollowUpTask {
        task_id: Uuid,
        description: String,
        owner: String,
        due: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// The service loads the patient stream and passes its identity status, so the
    /// decision stays pure while enforcing "nothing reaches a chart under review".
    RequestWriteBack {
        artifact: WriteBackArtifact,
        patient_identity: IdentityStatus,
        at: DateTime<Utc>,
    },
    RecordWriteBackSucceeded {
        artifact: WriteBackArtifact,
        ehr_resource_id: String,
        ehr_version: String,
        at: DateTime<Utc>,
    },
    RecordWriteBackFailed {
        artifact: WriteBackArtifact,
        status: Option<u16>,
        message: String,
        retryable: bool,
        at: DateTime<Utc>,
    },
    /// Records that the EHR no longer holds what was acknowledged. Only against the
    /// artifact's current acknowledgement (`acknowledged_resource_id`/`_version` must be
    /// the last `WriteBackSucceeded`'s), so a read-back that raced a newer write cannot
    /// record stale drift. `at` is stream time (never later than the encounter's last
    /// fact); `detected_at` is when the EHR was read.
    DetectEhrDrift {
        artifact: WriteBackArtifact,
        acknowledged_resource_id: String,
        acknowledged_version: String,
        kind: DriftKind,
        /// The resource the finding is about (`Type/id`, or `Type?identifier=…`).
        resource: String,
        expected: String,
        found: String,
        detected_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    /// Records that the connector refused to send an artifact because the EHR is not
    /// covered for PHI at `checked_at` (compliance map: no BAA in effect, undeclared, …).
    /// The same refusal while still blocked records nothing (a re-run is idempotent).
    RecordPhiTransferBlocked {
        artifact: WriteBackArtifact,
        /// The compliance-map component id of the EHR.
        component: String,
        reason: String,
        checked_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    ReleaseCharge {
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Schedule {
    pub encounter_id: Uuid,
    pub patient_id: Uuid,
    pub practitioner_id: String,
    pub visit_type: VisitType,
    pub planned_modality: Modality,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub patient_location: PatientLocation,
    pub payer: Payer,
    pub site: Site,
    pub at: DateTime<Utc>,
}

impl EncounterCommand {
    /// When the fact the command reports happened at its source.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            EncounterCommand::Schedule(schedule) => schedule.at,
            EncounterCommand::Reschedule { at, .. }
            | EncounterCommand::Cancel { at, .. }
            | EncounterCommand::MarkNoShow { at }
            | EncounterCommand::CheckIn { at }
            | EncounterCommand::StartConsultation { at, .. }
            | EncounterCommand::ChangeModality { at, .. }
            | EncounterCommand::EndConsultation { at }
            | EncounterCommand::DraftNote { at, .. }
            | EncounterCommand::AmendNote { at, .. }
            | EncounterCommand::SignNote { at, .. }
            | EncounterCommand::AddAddendum { at, .. }
            | EncounterCommand::AssignCodes { at, .. }
            | EncounterCommand::CreateFollowUpTask { at, .. }
            | EncounterCommand::RequestWriteBack { at, .. }
            | EncounterCommand::RecordWriteBackSucceeded { at, .. }
            | EncounterCommand::RecordWriteBackFailed { at, .. }
            | EncounterCommand::DetectEhrDrift { at, .. }
            | EncounterCommand::RecordPhiTransferBlocked { at, .. }
            | EncounterCommand::ReleaseCharge { at } => *at,
        }
    }
}

// ----------------------------------------------------------------------------------
// Events
// ----------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum EncounterEvent {
    Scheduled(Scheduled),
    Rescheduled(Rescheduled),
    Cancelled(Cancelled),
    NoShow(NoShow),
    CheckedIn(CheckedIn),
    ConsultationStarted(ConsultationStarted),
    ModalityChanged(ModalityChanged),
    ConsultationEnded(ConsultationEnded),
    NoteDrafted(NoteDrafted),
    NoteAmended(NoteAmended),
    NoteSigned(NoteSigned),
    AddendumAdded(AddendumAdded),
    CodesAssigned(CodesAssigned),
    CodesRevised(CodesAssigned),
    FollowUpTaskCreated(FollowUpTaskCreated),
    WriteBackRequested(WriteBackRequested),
    WriteBackSucceeded(WriteBackSucceeded),
    WriteBackFailed(WriteBackFailed),
    EhrDriftDetected(EhrDriftDetected),
    PhiTransferBlocked(PhiTransferBlocked),
    ChargeReleased(ChargeReleased),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Scheduled {
    pub encounter_id: Uuid,
    pub patient_id: Uuid,
    pub practitioner_id: String,
    pub visit_type: VisitType,
    pub planned_modality: Modality,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub patient_location: PatientLocation,
    pub payer: Payer,
    pub site: Site,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rescheduled {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cancelled {
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NoShow {
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckedIn {
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConsultationStarted {
    pub modality: Modality,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModalityChanged {
    pub from: Modality,
    pub to: Modality,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConsultationEnded {
    pub duration_seconds: i64,
    pub video_seconds: i64,
    pub audio_only_seconds: i64,
    /// The modality that carried most of the consultation; ties go to video. This is
    /// what billing treats as "the service was furnished audio-only" or not.
    pub modality_used: Modality,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NoteDrafted {
    pub author: NoteAuthor,
    pub note_type: NoteType,
    pub sections: SoapSections,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NoteAmended {
    pub author: NoteAuthor,
    pub sections: SoapSections,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NoteSigned {
    pub practitioner_id: String,
    /// True when any draft or amendment of the signed content came from an AI scribe.
    pub ai_assisted: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AddendumAdded {
    pub addendum_number: u32,
    pub author_id: String,
    pub text: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CodesAssigned {
    pub outcome: CodingOutcome,
    pub policy_version: u64,
    pub rule_trace: Vec<String>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FollowUpTaskCreated {
    pub task_id: Uuid,
    pub description: String,
    pub owner: String,
    pub due: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteBackRequested {
    pub artifact: WriteBackArtifact,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteBackSucceeded {
    pub artifact: WriteBackArtifact,
    pub ehr_resource_id: String,
    pub ehr_version: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteBackFailed {
    pub artifact: WriteBackArtifact,
    pub status: Option<u16>,
    pub message: String,
    pub retryable: bool,
    pub attempt: u32,
    pub at: DateTime<Utc>,
}

/// PHI for an artifact was not sent: the EHR component was not covered (compliance map)
/// at `checked_at`. The write-back state is `Blocked` until a later attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PhiTransferBlocked {
    pub artifact: WriteBackArtifact,
    pub component: String,
    pub reason: String,
    pub checked_at: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

/// The EHR differs from an acknowledged write-back. Open until the artifact's next
/// `WriteBackSucceeded` (a re-write resolves it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EhrDriftDetected {
    pub artifact: WriteBackArtifact,
    pub kind: DriftKind,
    /// The acknowledgement compared against.
    pub ehr_resource_id: String,
    pub ehr_version: String,
    /// The resource the finding is about (`Type/id`, or `Type?identifier=…`).
    pub resource: String,
    pub expected: String,
    pub found: String,
    pub detected_at: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChargeReleased {
    pub codes: Vec<AssignedCode>,
    pub policy_version: u64,
    pub at: DateTime<Utc>,
}

impl EncounterEvent {
    /// The event type name stored in the envelope and used in NATS subjects.
    pub fn event_type(&self) -> &'static str {
        match self {
            EncounterEvent::Scheduled(_) => "Scheduled",
            EncounterEvent::Rescheduled(_) => "Rescheduled",
            EncounterEvent::Cancelled(_) => "Cancelled",
            EncounterEvent::NoShow(_) => "NoShow",
            EncounterEvent::CheckedIn(_) => "CheckedIn",
            EncounterEvent::ConsultationStarted(_) => "ConsultationStarted",
            EncounterEvent::ModalityChanged(_) => "ModalityChanged",
            EncounterEvent::ConsultationEnded(_) => "ConsultationEnded",
            EncounterEvent::NoteDrafted(_) => "NoteDrafted",
            EncounterEvent::NoteAmended(_) => "NoteAmended",
            EncounterEvent::NoteSigned(_) => "NoteSigned",
            EncounterEvent::AddendumAdded(_) => "AddendumAdded",
            EncounterEvent::CodesAssigned(_) => "CodesAssigned",
            EncounterEvent::CodesRevised(_) => "CodesRevised",
            EncounterEvent::FollowUpTaskCreated(_) => "FollowUpTaskCreated",
            EncounterEvent::WriteBackRequested(_) => "WriteBackRequested",
            EncounterEvent::WriteBackSucceeded(_) => "WriteBackSucceeded",
            EncounterEvent::WriteBackFailed(_) => "WriteBackFailed",
            EncounterEvent::EhrDriftDetected(_) => "EhrDriftDetected",
            EncounterEvent::PhiTransferBlocked(_) => "PhiTransferBlocked",
            EncounterEvent::ChargeReleased(_) => "ChargeReleased",
        }
    }

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            EncounterEvent::Scheduled(e) => e.at,
            EncounterEvent::Rescheduled(e) => e.at,
            EncounterEvent::Cancelled(e) => e.at,
            EncounterEvent::NoShow(e) => e.at,
            EncounterEvent::CheckedIn(e) => e.at,
            EncounterEvent::ConsultationStarted(e) => e.at,
            EncounterEvent::ModalityChanged(e) => e.at,
            EncounterEvent::ConsultationEnded(e) => e.at,
            EncounterEvent::NoteDrafted(e) => e.at,
            EncounterEvent::NoteAmended(e) => e.at,
            EncounterEvent::NoteSigned(e) => e.at,
            EncounterEvent::AddendumAdded(e) => e.at,
            EncounterEvent::CodesAssigned(e) | EncounterEvent::CodesRevised(e) => e.at,
            EncounterEvent::FollowUpTaskCreated(e) => e.at,
            EncounterEvent::WriteBackRequested(e) => e.at,
            EncounterEvent::WriteBackSucceeded(e) => e.at,
            EncounterEvent::WriteBackFailed(e) => e.at,
            EncounterEvent::EhrDriftDetected(e) => e.at,
            EncounterEvent::PhiTransferBlocked(e) => e.at,
            EncounterEvent::ChargeReleased(e) => e.at,
        }
    }

    /// Whether the payload carries protected health information (note text, clinical
    /// content). Scheduling facts reference a patient id only and are not PHI by
    /// themselves; the envelope metadata records this flag for the audit log.
    pub fn contains_phi(&self) -> bool {
        matches!(
            self,
            EncounterEvent::NoteDrafted(_)
                | EncounterEvent::NoteAmended(_)
                | EncounterEvent::AddendumAdded(_)
                | EncounterEvent::FollowUpTaskCreated(_)
        )
    }
}

// ----------------------------------------------------------------------------------
// Errors
// ----------------------------------------------------------------------------------

/// Why a command was rejected. Every variant is a client error (HTTP 4xx class): the
/// caller must change the command or wait for the encounter to reach another state;
/// retrying the same command unchanged will fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncounterError {
    #[error("the encounter does not exist; schedule it first")]
    NotScheduled,
    #[error("the encounter is already scheduled")]
    AlreadyScheduled,
    #[error("the encounter is {0} and cannot take this command")]
    InvalidState(&'static str),
    #[error("invalid visit type: {0}")]
    InvalidVisitType(String),
    #[error("the scheduled window ends before it starts")]
    InvalidWindow,
    #[error("time went backwards: {at} is before the last recorded event at {last}")]
    TimeWentBackwards {
        at: DateTime<Utc>,
        last: DateTime<Utc>,
    },
    #[error("the consultation has not started")]
    ConsultationNotStarted,
    #[error("the consultation has not ended")]
    ConsultationNotEnded,
    #[error("the consultation already started")]
    ConsultationAlreadyStarted,
    #[error("the modality is already {0:?}")]
    ModalityUnchanged(Modality),
    #[error("a note is already drafted; amend it instead")]
    NoteAlreadyDrafted,
    #[error("no note has been drafted")]
    NoNote,
    #[error("the note is empty")]
    EmptyNote,
    #[error("the note is incomplete: {0}")]
    IncompleteNote(String),
    #[error("the note is signed; only an addendum can change it")]
    NoteAlreadySigned,
    #[error("the note is not signed yet")]
    NoteNotSigned,
    #[error("a required text field is empty: {0}")]
    EmptyField(&'static str),
    #[error("the patient's identity is {0:?}; nothing is written to a chart until it is resolved")]
    IdentityNotResolved(IdentityStatus),
    #[error("no write-back of {0:?} was requested")]
    WriteBackNotRequested(WriteBackArtifact),
    #[error(
        "drift of {artifact:?} was checked against {resource_id} version {version}, which is not its current acknowledgement; read the EHR again"
    )]
    DriftAgainstStaleAcknowledgement {
        artifact: WriteBackArtifact,
        resource_id: String,
        version: String,
    },
    #[error("no drift: expected and found are both {0:?}")]
    NoDrift(String),
    #[error("the follow-up task {0} already exists")]
    DuplicateTask(Uuid),
    #[error("the follow-up task {0} does not exist on this encounter")]
    UnknownTask(Uuid),
    #[error("no codes assigned yet")]
    NoCodes,
    #[error("the coding outcome is not billable: {0}")]
    NotBillable(String),
    #[error("the charge was already released")]
    ChargeAlreadyReleased,
    #[error("a billable outcome needs at least one code")]
    NoCodesInBillableOutcome,
}

// ----------------------------------------------------------------------------------
// State
// ----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EncounterStatus {
    #[default]
    NotScheduled,
    Scheduled,
    CheckedIn,
    InConsultation,
    ConsultationEnded,
    Cancelled,
    NoShow,
}

impl EncounterStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EncounterStatus::NotScheduled => "not_scheduled",
            EncounterStatus::Scheduled => "scheduled",
            EncounterStatus::CheckedIn => "checked_in",
            EncounterStatus::InConsultation => "in_consultation",
            EncounterStatus::ConsultationEnded => "consultation_ended",
            EncounterStatus::Cancelled => "cancelled",
            EncounterStatus::NoShow => "no_show",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoteStatus {
    #[default]
    None,
    Draft,
    Signed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NoteState {
    pub note_type: NoteType,
    pub sections: SoapSections,
    pub ai_assisted: bool,
    pub last_author: NoteAuthor,
    pub signed_by: Option<String>,
    pub signed_at: Option<DateTime<Utc>>,
    pub addenda: Vec<AddendumAdded>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteBackStatus {
    pub artifact: WriteBackArtifact,
    pub state: WriteBackState,
    pub attempts: u32,
    pub ehr_resource_id: Option<String>,
    pub ehr_version: Option<String>,
    pub last_error: Option<String>,
    /// Drift found since the last successful write-back (cleared by the next one).
    #[serde(default)]
    pub drift: Vec<OpenDrift>,
}

/// The folded state of one encounter stream.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Encounter {
    pub status: EncounterStatus,
    pub schedule: Option<Scheduled>,
    pub checked_in_at: Option<DateTime<Utc>>,
    pub consultation_started_at: Option<DateTime<Utc>>,
    pub consultation_ended: Option<ConsultationEnded>,
    pub current_modality: Option<Modality>,
    /// Start of the current modality segment (for per-modality durations).
    pub modality_since: Option<DateTime<Utc>>,
    pub video_seconds: i64,
    pub audio_only_seconds: i64,
    pub modality_changes: u32,
    pub note_status: NoteStatus,
    pub note: Option<NoteState>,
    pub coding: Option<CodesAssigned>,
    pub charge_released: bool,
    pub follow_up_tasks: Vec<FollowUpTaskCreated>,
    pub write_backs: Vec<WriteBackStatus>,
    pub cancel_reason: Option<String>,
    pub last_event_at: Option<DateTime<Utc>>,
    pub version: u64,
}

impl Encounter {
    pub fn patient_id(&self) -> Option<Uuid> {
        self.schedule.as_ref().map(|s| s.patient_id)
    }

    fn write_back(&self, artifact: &WriteBackArtifact) -> Option<&WriteBackStatus> {
        self.write_backs.iter().find(|w| &w.artifact == artifact)
    }

    /// The artifact's write-back unless it is blocked (a blocked artifact was never
    /// requested since, so no outcome can be recorded for it).
    fn requested_write_back(&self, artifact: &WriteBackArtifact) -> Option<&WriteBackStatus> {
        self.write_back(artifact)
            .filter(|w| w.state != WriteBackState::Blocked)
    }

    /// The fact an artifact is written from exists (a write-back of it is meaningful).
    fn require_artifact_source(&self, artifact: &WriteBackArtifact) -> Result<(), EncounterError> {
        match artifact {
            WriteBackArtifact::Appointment => Ok(()),
            WriteBackArtifact::Encounter if self.consultation_started_at.is_none() => {
                Err(EncounterError::ConsultationNotStarted)
            }
            WriteBackArtifact::DocumentReference if self.note_status == NoteStatus::None => {
                Err(EncounterError::NoNote)
            }
            WriteBackArtifact::Task { task_id }
                if !self.follow_up_tasks.iter().any(|t| t.task_id == *task_id) =>
            {
                Err(EncounterError::UnknownTask(*task_id))
            }
            WriteBackArtifact::ChargeItem if self.coding.is_none() => Err(EncounterError::NoCodes),
            _ => Ok(()),
        }
    }

    fn require_scheduled(&self) -> Result<&Scheduled, EncounterError> {
        self.schedule.as_ref().ok_or(EncounterError::NotScheduled)
    }

    fn require_before_consultation(&self) -> Result<(), EncounterError> {
        match self.status {
            EncounterStatus::Scheduled | EncounterStatus::CheckedIn => Ok(()),
            EncounterStatus::NotScheduled => Err(EncounterError::NotScheduled),
            other => Err(EncounterError::InvalidState(other.as_str())),
        }
    }

    fn require_consultation_ended(&self) -> Result<(), EncounterError> {
        match self.status {
            EncounterStatus::ConsultationEnded => Ok(()),
            EncounterStatus::NotScheduled => Err(EncounterError::NotScheduled),
            EncounterStatus::Cancelled | EncounterStatus::NoShow => {
                Err(EncounterError::InvalidState(self.status.as_str()))
            }
            _ => Err(EncounterError::ConsultationNotEnded),
        }
    }

    fn check_time(&self, at: DateTime<Utc>) -> Result<(), EncounterError> {
        match self.last_event_at {
            Some(last) if at < last => Err(EncounterError::TimeWentBackwards { at, last }),
            _ => Ok(()),
        }
    }
}

fn non_empty(value: &str, field: &'static str) -> Result<(), EncounterError> {
    if value.trim().is_empty() {
        Err(EncounterError::EmptyField(field))
    } else {
        Ok(())
    }
}

fn validate_author(author: &NoteAuthor) -> Result<(), EncounterError> {
    match author {
        NoteAuthor::Clinician { practitioner_id } => non_empty(practitioner_id, "practitioner_id"),
        NoteAuthor::AiScribe { vendor, model_id } => {
            non_empty(vendor, "vendor")?;
            non_empty(model_id, "model_id")
        }
    }
}

impl Aggregate for Encounter {
    const CATEGORY: &'static str = "encounter";
    type Command = EncounterCommand;
    type Event = EncounterEvent;
    type Error = EncounterError;

    fn decide(&self, command: &EncounterCommand) -> Result<Vec<EncounterEvent>, EncounterError> {
        use EncounterCommand as C;
        use EncounterEvent as E;
        if !matches!(command, C::Schedule(_)) {
            self.require_scheduled()?;
        }
        self.check_time(command.at())?;
        match command {
            C::Schedule(s) => {
                if self.schedule.is_some() {
                    return Err(EncounterError::AlreadyScheduled);
                }
                non_empty(&s.practitioner_id, "practitioner_id")?;
                s.visit_type.validate()?;
                if s.window_end <= s.window_start {
                    return Err(EncounterError::InvalidWindow);
                }
                Ok(vec![E::Scheduled(Scheduled {
                    encounter_id: s.encounter_id,
                    patient_id: s.patient_id,
                    practitioner_id: s.practitioner_id.clone(),
                    visit_type: s.visit_type.clone(),
                    planned_modality: s.planned_modality,
                    window_start: s.window_start,
                    window_end: s.window_end,
                    patient_location: s.patient_location,
                    payer: s.payer,
                    site: s.site,
                    at: s.at,
                })])
            }
            C::Reschedule {
                window_start,
                window_end,
                reason,
                at,
            } => {
                self.require_before_consultation()?;
                non_empty(reason, "reason")?;
                if window_end <= window_start {
                    return Err(EncounterError::InvalidWindow);
                }
                Ok(vec![E::Rescheduled(Rescheduled {
                    window_start: *window_start,
                    window_end: *window_end,
                    reason: reason.clone(),
                    at: *at,
                })])
            }
            C::Cancel { reason, at } => {
                self.require_before_consultation()?;
                non_empty(reason, "reason")?;
                Ok(vec![E::Cancelled(Cancelled {
                    reason: reason.clone(),
                    at: *at,
                })])
            }
            C::MarkNoShow { at } => {
                self.require_before_consultation()?;
                Ok(vec![E::NoShow(NoShow { at: *at })])
            }
            C::CheckIn { at } => match self.status {
                EncounterStatus::Scheduled => Ok(vec![E::CheckedIn(CheckedIn { at: *at })]),
                other => Err(EncounterError::InvalidState(other.as_str())),
            },
            C::StartConsultation { modality, at } => match self.status {
                EncounterStatus::Scheduled | EncounterStatus::CheckedIn => {
                    Ok(vec![E::ConsultationStarted(ConsultationStarted {
                        modality: *modality,
                        at: *at,
                    })])
                }
                EncounterStatus::InConsultation | EncounterStatus::ConsultationEnded => {
                    Err(EncounterError::ConsultationAlreadyStarted)
                }
                other => Err(EncounterError::InvalidState(other.as_str())),
            },
            C::ChangeModality { to, reason, at } => {
                if self.status != EncounterStatus::InConsultation {
                    return Err(match self.status {
                        EncounterStatus::ConsultationEnded => {
                            EncounterError::InvalidState(self.status.as_str())
                        }
                        _ => EncounterError::ConsultationNotStarted,
                    });
                }
                non_empty(reason, "reason")?;
                let from = self.current_modality.unwrap_or(Modality::Video);
                if from == *to {
                    return Err(EncounterError::ModalityUnchanged(from));
                }
                Ok(vec![E::ModalityChanged(ModalityChanged {
                    from,
                    to: *to,
                    reason: reason.clone(),
                    at: *at,
                })])
            }
            C::EndConsultation { at } => {
                match self.status {
                    EncounterStatus::InConsultation => {}
                    EncounterStatus::ConsultationEnded => {
                        return Err(EncounterError::InvalidState(self.status.as_str()));
                    }
                    _ => return Err(EncounterError::ConsultationNotStarted),
                }
                let started = self
                    .consultation_started_at
                    .ok_or(EncounterError::ConsultationNotStarted)?;
                let since = self.modality_since.unwrap_or(started);
                let segment = (*at - since).num_seconds();
                let (mut video, mut audio) = (self.video_seconds, self.audio_only_seconds);
                match self.current_modality.unwrap_or(Modality::Video) {
                    Modality::Video => video += segment,
                    Modality::AudioOnly => audio += segment,
                }
                let duration = (*at - started).num_seconds();
                let modality_used = if audio > video {
                    Modality::AudioOnly
                } else {
                    Modality::Video
                };
                Ok(vec![E::ConsultationEnded(ConsultationEnded {
                    duration_seconds: duration,
                    video_seconds: video,
                    audio_only_seconds: audio,
                    modality_used,
                    at: *at,
                })])
            }
            C::DraftNote {
                author,
                note_type,
                sections,
                at,
            } => {
                match self.status {
                    EncounterStatus::InConsultation | EncounterStatus::ConsultationEnded => {}
                    EncounterStatus::Cancelled | EncounterStatus::NoShow => {
                        return Err(EncounterError::InvalidState(self.status.as_str()));
                    }
                    _ => return Err(EncounterError::ConsultationNotStarted),
                }
                match self.note_status {
                    NoteStatus::None => {}
                    NoteStatus::Draft => return Err(EncounterError::NoteAlreadyDrafted),
                    NoteStatus::Signed => return Err(EncounterError::NoteAlreadySigned),
                }
                validate_author(author)?;
                sections.validate()?;
                Ok(vec![E::NoteDrafted(NoteDrafted {
                    author: author.clone(),
                    note_type: *note_type,
                    sections: sections.clone(),
                    at: *at,
                })])
            }
            C::AmendNote {
                author,
                sections,
                at,
            } => {
                match self.note_status {
                    NoteStatus::None => return Err(EncounterError::NoNote),
                    NoteStatus::Signed => return Err(EncounterError::NoteAlreadySigned),
                    NoteStatus::Draft => {}
                }
                validate_author(author)?;
                sections.validate()?;
                Ok(vec![E::NoteAmended(NoteAmended {
                    author: author.clone(),
                    sections: sections.clone(),
                    at: *at,
                })])
            }
            C::SignNote {
                practitioner_id,
                at,
            } => {
                self.require_consultation_ended()?;
                non_empty(practitioner_id, "practitioner_id")?;
                let note = match self.note_status {
                    NoteStatus::None => return Err(EncounterError::NoNote),
                    NoteStatus::Signed => return Err(EncounterError::NoteAlreadySigned),
                    NoteStatus::Draft => self.note.as_ref().ok_or(EncounterError::NoNote)?,
                };
                Ok(vec![E::NoteSigned(NoteSigned {
                    practitioner_id: practitioner_id.clone(),
                    ai_assisted: note.ai_assisted,
                    at: *at,
                })])
            }
            C::AddAddendum {
                author_id,
                text,
                at,
            } => {
                if self.note_status != NoteStatus::Signed {
                    return Err(EncounterError::NoteNotSigned);
                }
                non_empty(author_id, "author_id")?;
                non_empty(text, "text")?;
                let number = self.note.as_ref().map_or(0, |n| n.addenda.len() as u32) + 1;
                Ok(vec![E::AddendumAdded(AddendumAdded {
                    addendum_number: number,
                    author_id: author_id.clone(),
                    text: text.clone(),
                    at: *at,
                })])
            }
            C::AssignCodes {
                outcome,
                policy_version,
                rule_trace,
                at,
            } => {
                if self.note_status != NoteStatus::Signed {
                    return Err(EncounterError::NoteNotSigned);
                }
                if self.charge_released {
                    return Err(EncounterError::ChargeAlreadyReleased);
                }
                if let CodingOutcome::Billable { codes } = outcome
                    && codes.is_empty()
                {
                    return Err(EncounterError::NoCodesInBillableOutcome);
                }
                let assigned = CodesAssigned {
                    outcome: outcome.clone(),
                    policy_version: *policy_version,
                    rule_trace: rule_trace.clone(),
                    at: *at,
                };
                match &self.coding {
                    None => Ok(vec![E::CodesAssigned(assigned)]),
                    // Re-evaluation under the same policy with the same result is a no-op:
                    // reactors may redeliver, and the stream must not grow from it.
                    Some(existing)
                        if existing.outcome == *outcome
                            && existing.policy_version == *policy_version =>
                    {
                        Ok(vec![])
                    }
                    Some(_) => Ok(vec![E::CodesRevised(assigned)]),
                }
            }
            C::CreateFollowUpTask {
                task_id,
                description,
                owner,
                due,
                at,
            } => {
                self.require_consultation_ended()?;
                non_empty(description, "description")?;
                non_empty(owner, "owner")?;
                if self.follow_up_tasks.iter().any(|t| t.task_id == *task_id) {
                    return Err(EncounterError::DuplicateTask(*task_id));
                }
                Ok(vec![E::FollowUpTaskCreated(FollowUpTaskCreated {
                    task_id: *task_id,
                    description: description.clone(),
                    owner: owner.clone(),
                    due: *due,
                    at: *at,
                })])
            }
            C::RequestWriteBack {
                artifact,
                patient_identity,
                at,
            } => {
                if !patient_identity.allows_chart_writes() {
                    return Err(EncounterError::IdentityNotResolved(*patient_identity));
                }
                self.require_artifact_source(artifact)?;
                Ok(vec![E::WriteBackRequested(WriteBackRequested {
                    artifact: artifact.clone(),
                    at: *at,
                })])
            }
            C::RecordWriteBackSucceeded {
                artifact,
                ehr_resource_id,
                ehr_version,
                at,
            } => {
                if self.requested_write_back(artifact).is_none() {
                    return Err(EncounterError::WriteBackNotRequested(artifact.clone()));
                }
                non_empty(ehr_resource_id, "ehr_resource_id")?;
                Ok(vec![E::WriteBackSucceeded(WriteBackSucceeded {
                    artifact: artifact.clone(),
                    ehr_resource_id: ehr_resource_id.clone(),
                    ehr_version: ehr_version.clone(),
                    at: *at,
                })])
            }
            C::RecordWriteBackFailed {
                artifact,
                status,
                message,
                retryable,
                at,
            } => {
                let current = self
                    .requested_write_back(artifact)
                    .ok_or_else(|| EncounterError::WriteBackNotRequested(artifact.clone()))?;
                non_empty(message, "message")?;
                Ok(vec![E::WriteBackFailed(WriteBackFailed {
                    artifact: artifact.clone(),
                    status: *status,
                    message: message.clone(),
                    retryable: *retryable,
                    attempt: current.attempts + 1,
                    at: *at,
                })])
            }
            C::DetectEhrDrift {
                artifact,
                acknowledged_resource_id,
                acknowledged_version,
                kind,
                resource,
                expected,
                found,
                detected_at,
                at,
            } => {
                let current = self
                    .write_back(artifact)
                    .ok_or_else(|| EncounterError::WriteBackNotRequested(artifact.clone()))?;
                if current.state != WriteBackState::Succeeded
                    || current.ehr_resource_id.as_ref() != Some(acknowledged_resource_id)
                    || current.ehr_version.as_ref() != Some(acknowledged_version)
                {
                    return Err(EncounterError::DriftAgainstStaleAcknowledgement {
                        artifact: artifact.clone(),
                        resource_id: acknowledged_resource_id.clone(),
                        version: acknowledged_version.clone(),
                    });
                }
                non_empty(resource, "resource")?;
                non_empty(expected, "expected")?;
                non_empty(found, "found")?;
                if expected == found {
                    return Err(EncounterError::NoDrift(found.clone()));
                }
                // The same finding still open: already recorded, nothing new.
                if current
                    .drift
                    .iter()
                    .any(|d| d.kind == *kind && &d.resource == resource && &d.found == found)
                {
                    return Ok(vec![]);
                }
                Ok(vec![E::EhrDriftDetected(EhrDriftDetected {
                    artifact: artifact.clone(),
                    kind: *kind,
                    ehr_resource_id: acknowledged_resource_id.clone(),
                    ehr_version: acknowledged_version.clone(),
                    resource: resource.clone(),
                    expected: expected.clone(),
                    found: found.clone(),
                    detected_at: *detected_at,
                    at: *at,
                })])
            }
            C::RecordPhiTransferBlocked {
                artifact,
                component,
                reason,
                checked_at,
                at,
            } => {
                self.require_artifact_source(artifact)?;
                non_empty(component, "component")?;
                non_empty(reason, "reason")?;
                // Still blocked for the same reason: already recorded, nothing new.
                if self.write_back(artifact).is_some_and(|w| {
                    w.state == WriteBackState::Blocked
                        && w.last_error.as_deref()
                            == Some(blocked_message(component, reason).as_str())
                }) {
                    return Ok(vec![]);
                }
                Ok(vec![E::PhiTransferBlocked(PhiTransferBlocked {
                    artifact: artifact.clone(),
                    component: component.clone(),
                    reason: reason.clone(),
                    checked_at: *checked_at,
                    at: *at,
                })])
            }
            C::ReleaseCharge { at } => {
                if self.charge_released {
                    return Err(EncounterError::ChargeAlreadyReleased);
                }
                let coding = self.coding.as_ref().ok_or(EncounterError::NoCodes)?;
                match &coding.outcome {
                    CodingOutcome::Billable { codes } => {
                        Ok(vec![E::ChargeReleased(ChargeReleased {
                            codes: codes.clone(),
                            policy_version: coding.policy_version,
                            at: *at,
                        })])
                    }
                    CodingOutcome::Hold { reasons } => Err(EncounterError::NotBillable(format!(
                        "held: {}",
                        reasons.join("; ")
                    ))),
                    CodingOutcome::NotBillable { reasons } => {
                        Err(EncounterError::NotBillable(reasons.join("; ")))
                    }
                }
            }
        }
    }

    fn apply(&mut self, event: &EncounterEvent) {
        use EncounterEvent as E;
        self.version += 1;
        self.last_event_at = Some(event.at());
        match event {
            E::Scheduled(e) => {
                self.status = EncounterStatus::Scheduled;
                self.schedule = Some(e.clone());
            }
            E::Rescheduled(e) => {
                if let Some(schedule) = &mut self.schedule {
                    schedule.window_start = e.window_start;
                    schedule.window_end = e.window_end;
                }
            }
            E::Cancelled(e) => {
                self.status = EncounterStatus::Cancelled;
                self.cancel_reason = Some(e.reason.clone());
            }
            E::NoShow(_) => self.status = EncounterStatus::NoShow,
            E::CheckedIn(e) => {
                self.status = EncounterStatus::CheckedIn;
                self.checked_in_at = Some(e.at);
            }
            E::ConsultationStarted(e) => {
                self.status = EncounterStatus::InConsultation;
                self.consultation_started_at = Some(e.at);
                self.current_modality = Some(e.modality);
                self.modality_since = Some(e.at);
            }
            E::ModalityChanged(e) => {
                if let Some(since) = self.modality_since {
                    let segment = (e.at - since).num_seconds();
                    match e.from {
                        Modality::Video => self.video_seconds += segment,
                        Modality::AudioOnly => self.audio_only_seconds += segment,
                    }
                }
                self.current_modality = Some(e.to);
                self.modality_since = Some(e.at);
                self.modality_changes += 1;
            }
            E::ConsultationEnded(e) => {
                self.status = EncounterStatus::ConsultationEnded;
                self.video_seconds = e.video_seconds;
                self.audio_only_seconds = e.audio_only_seconds;
                self.modality_since = None;
                self.consultation_ended = Some(e.clone());
            }
            E::NoteDrafted(e) => {
                self.note_status = NoteStatus::Draft;
                self.note = Some(NoteState {
                    note_type: e.note_type,
                    sections: e.sections.clone(),
                    ai_assisted: matches!(e.author, NoteAuthor::AiScribe { .. }),
                    last_author: e.author.clone(),
                    signed_by: None,
                    signed_at: None,
                    addenda: Vec::new(),
                });
            }
            E::NoteAmended(e) => {
                if let Some(note) = &mut self.note {
                    note.sections = e.sections.clone();
                    note.ai_assisted |= matches!(e.author, NoteAuthor::AiScribe { .. });
                    note.last_author = e.author.clone();
                }
            }
            E::NoteSigned(e) => {
                self.note_status = NoteStatus::Signed;
                if let Some(note) = &mut self.note {
                    note.signed_by = Some(e.practitioner_id.clone());
                    note.signed_at = Some(e.at);
                }
            }
            E::AddendumAdded(e) => {
                if let Some(note) = &mut self.note {
                    note.addenda.push(e.clone());
                }
            }
            E::CodesAssigned(e) | E::CodesRevised(e) => self.coding = Some(e.clone()),
            E::FollowUpTaskCreated(e) => self.follow_up_tasks.push(e.clone()),
            E::WriteBackRequested(e) => {
                match self
                    .write_backs
                    .iter_mut()
                    .find(|w| w.artifact == e.artifact)
                {
                    Some(existing) => existing.state = WriteBackState::Requested,
                    None => self.write_backs.push(WriteBackStatus {
                        artifact: e.artifact.clone(),
                        state: WriteBackState::Requested,
                        attempts: 0,
                        ehr_resource_id: None,
                        ehr_version: None,
                        last_error: None,
                        drift: Vec::new(),
                    }),
                }
            }
            E::WriteBackSucceeded(e) => {
                if let Some(w) = self
                    .write_backs
                    .iter_mut()
                    .find(|w| w.artifact == e.artifact)
                {
                    w.state = WriteBackState::Succeeded;
                    w.attempts += 1;
                    w.ehr_resource_id = Some(e.ehr_resource_id.clone());
                    w.ehr_version = Some(e.ehr_version.clone());
                    w.last_error = None;
                    // A successful (re-)write resolves every drift found before it.
                    w.drift.clear();
                }
            }
            E::WriteBackFailed(e) => {
                if let Some(w) = self
                    .write_backs
                    .iter_mut()
                    .find(|w| w.artifact == e.artifact)
                {
                    w.state = WriteBackState::Failed;
                    w.attempts = e.attempt;
                    w.last_error = Some(e.message.clone());
                }
            }
            E::EhrDriftDetected(e) => {
                if let Some(w) = self
                    .write_backs
                    .iter_mut()
                    .find(|w| w.artifact == e.artifact)
                {
                    w.drift.push(OpenDrift {
                        kind: e.kind,
                        resource: e.resource.clone(),
                        expected: e.expected.clone(),
                        found: e.found.clone(),
                        detected_at: e.detected_at,
                    });
                }
            }
            E::PhiTransferBlocked(e) => {
                let message = blocked_message(&e.component, &e.reason);
                match self
                    .write_backs
                    .iter_mut()
                    .find(|w| w.artifact == e.artifact)
                {
                    Some(w) => {
                        w.state = WriteBackState::Blocked;
                        w.last_error = Some(message);
                    }
                    None => self.write_backs.push(WriteBackStatus {
                        artifact: e.artifact.clone(),
                        state: WriteBackState::Blocked,
                        attempts: 0,
                        ehr_resource_id: None,
                        ehr_version: None,
                        last_error: Some(message),
                        drift: Vec::new(),
                    }),
                }
            }
            E::ChargeReleased(_) => self.charge_released = true,
        }
    }
}

/// The write-back state's `last_error` while blocked.
fn blocked_message(component: &str, reason: &str) -> String {
    format!("PHI transfer to {component} blocked: {reason}")
}

#[cfg(test)]
mod tests;
