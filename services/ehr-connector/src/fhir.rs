//! FHIR R4 mapping: pure functions from an encounter's recorded history (and RPM
//! readings) to the FHIR resources the connector writes. No IO here, so the output for a
//! given history is byte-for-byte reproducible — that is what the snapshot tests and
//! `chartline fhir export` rely on.
//!
//! Idempotency starts here: every resource carries a deterministic business identifier
//! with system `urn:chartline:<tenant>:<kind>` and a value derived from the encounter,
//! task or RPM batch id, so the connector can use conditional create
//! (`If-None-Exist: identifier=system|value`) and a re-run finds what it wrote before.
//! Provenance has no `identifier` element in R4; it carries the same key as a
//! `meta.tag` and is written with `_tag=system|value` instead.
//!
//! References between resources are *logical* (`Reference.identifier` + `type`), never
//! server ids: the artifacts are written independently (in any order, retried
//! separately), and a logical reference stays valid whatever id the EHR assigns.

use chartline_domain::encounter::{
    AppointmentType, CodingOutcome, Encounter, EncounterEvent, EncounterStatus, Modality,
    NoteAuthor, NoteStatus, NoteType, ServiceKind, WriteBackArtifact,
};
use chartline_domain::rpm::Reading;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const LOINC: &str = "http://loinc.org";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const CPT: &str = "http://www.ama-assn.org/go/cpt";
pub const HCPCS: &str = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets";
pub const CMS_POS: &str =
    "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set";
pub const LOCATION_PHYSICAL_TYPE: &str =
    "http://terminology.hl7.org/CodeSystem/location-physical-type";
pub const V2_0276: &str = "http://terminology.hl7.org/CodeSystem/v2-0276";
pub const V3_ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
pub const V3_OBSERVATION_VALUE: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
pub const US_CORE_DOCREF_CATEGORY: &str =
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category";
pub const US_CORE_DOCREF_PROFILE: &str =
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference";
pub const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
pub const PROVENANCE_PARTICIPANT_TYPE: &str =
    "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
/// Chartline's own extensions (R4 ChargeItem has no modifier or place-of-service element).
pub const EXTENSION_BASE: &str = "https://chartline.example/fhir/StructureDefinition/";

/// Id of the contained virtual Location in Appointment and Encounter.
const VIRTUAL_LOCATION_ID: &str = "virtual";

/// The identifier system of one kind of business key for a tenant.
pub fn identifier_system(tenant: &str, kind: &str) -> String {
    format!("urn:chartline:{tenant}:{kind}")
}

fn identifier(tenant: &str, kind: &str, value: impl std::fmt::Display) -> Value {
    json!({"system": identifier_system(tenant, kind), "value": value.to_string()})
}

/// A logical reference: resolvable by business identifier on any server.
fn logical_reference(
    resource_type: &str,
    tenant: &str,
    kind: &str,
    value: impl std::fmt::Display,
) -> Value {
    json!({"type": resource_type, "identifier": identifier(tenant, kind, value)})
}

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// How a server can find a resource by its business key: the search parameter
/// (`identifier`, or `_tag` for Provenance) and `system|value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BusinessKey {
    pub resource_type: String,
    pub search_param: &'static str,
    pub system: String,
    pub value: String,
}

impl BusinessKey {
    /// `identifier=system|value`, as used in `If-None-Exist` and `ifNoneExist`.
    pub fn condition(&self) -> String {
        format!("{}={}|{}", self.search_param, self.system, self.value)
    }

    /// Reads the business key a mapped resource carries (first identifier, or the
    /// `urn:chartline:` tag for resources without an identifier element).
    pub fn of(resource: &Value) -> Option<BusinessKey> {
        let resource_type = resource["resourceType"].as_str()?.to_string();
        let from = |v: &Value, param: &'static str, code_field: &str| {
            Some(BusinessKey {
                resource_type: resource_type.clone(),
                search_param: param,
                system: v["system"].as_str()?.to_string(),
                value: v[code_field].as_str()?.to_string(),
            })
        };
        match &resource["identifier"] {
            Value::Array(list) if !list.is_empty() => from(&list[0], "identifier", "value"),
            object @ Value::Object(_) => from(object, "identifier", "value"),
            _ => resource["meta"]["tag"].as_array().and_then(|tags| {
                tags.iter()
                    .find(|t| {
                        t["system"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("urn:chartline:"))
                    })
                    .and_then(|t| from(t, "_tag", "code"))
            }),
        }
    }

    /// A stable UUID for this key (Bundle `fullUrl` = `urn:uuid:…`).
    pub fn uuid(&self) -> Uuid {
        let digest = Sha256::digest(
            format!("{}\0{}\0{}", self.resource_type, self.system, self.value).as_bytes(),
        );
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// What the mapping needs from an encounter stream: the folded state plus the facts the
/// state does not keep (which AI agents touched the note, when it was first drafted).
#[derive(Debug, Clone, Default)]
pub struct EncounterRecord {
    pub tenant: String,
    pub state: Encounter,
    /// `(vendor, model_id)` of every AI scribe that drafted or amended the note.
    pub ai_agents: Vec<(String, String)>,
    pub note_drafted_at: Option<DateTime<Utc>>,
}

impl EncounterRecord {
    pub fn from_events<'a>(
        tenant: &str,
        events: impl IntoIterator<Item = &'a EncounterEvent>,
    ) -> EncounterRecord {
        use chartline_domain::Aggregate;
        let mut record = EncounterRecord {
            tenant: tenant.to_string(),
            ..EncounterRecord::default()
        };
        for event in events {
            record.state.apply(event);
            let author = match event {
                EncounterEvent::NoteDrafted(e) => {
                    record.note_drafted_at = Some(e.at);
                    Some(&e.author)
                }
                EncounterEvent::NoteAmended(e) => Some(&e.author),
                _ => None,
            };
            if let Some(NoteAuthor::AiScribe { vendor, model_id }) = author {
                let agent = (vendor.clone(), model_id.clone());
                if !record.ai_agents.contains(&agent) {
                    record.ai_agents.push(agent);
                }
            }
        }
        record
    }

    pub fn encounter_id(&self) -> Option<Uuid> {
        self.state.schedule.as_ref().map(|s| s.encounter_id)
    }
}

/// The artifacts that are due for an encounter in its current state, in write order.
pub fn due_artifacts(state: &Encounter) -> Vec<WriteBackArtifact> {
    let mut due = Vec::new();
    if state.schedule.is_none() {
        return due;
    }
    due.push(WriteBackArtifact::Appointment);
    if state.consultation_started_at.is_some() {
        due.push(WriteBackArtifact::Encounter);
    }
    if state.note_status != NoteStatus::None {
        due.push(WriteBackArtifact::DocumentReference);
    }
    for task in &state.follow_up_tasks {
        due.push(WriteBackArtifact::Task {
            task_id: task.task_id,
        });
    }
    if state.coding.is_some() {
        due.push(WriteBackArtifact::ChargeItem);
    }
    due
}

/// Which artifact an encounter event makes due (or changes), if any.
pub fn artifact_made_due(event: &EncounterEvent) -> Option<WriteBackArtifact> {
    use EncounterEvent as E;
    match event {
        E::Scheduled(_) | E::Rescheduled(_) | E::Cancelled(_) | E::NoShow(_) | E::CheckedIn(_) => {
            Some(WriteBackArtifact::Appointment)
        }
        E::ConsultationStarted(_) | E::ModalityChanged(_) | E::ConsultationEnded(_) => {
            Some(WriteBackArtifact::Encounter)
        }
        E::NoteDrafted(_) | E::NoteAmended(_) | E::NoteSigned(_) | E::AddendumAdded(_) => {
            Some(WriteBackArtifact::DocumentReference)
        }
        E::FollowUpTaskCreated(e) => Some(WriteBackArtifact::Task { task_id: e.task_id }),
        E::CodesAssigned(_) | E::CodesRevised(_) => Some(WriteBackArtifact::ChargeItem),
        E::WriteBackRequested(_)
        | E::WriteBackSucceeded(_)
        | E::WriteBackFailed(_)
        | E::EhrDriftDetected(_)
        | E::PhiTransferBlocked(_)
        | E::ChargeReleased(_) => None,
    }
}

/// Every artifact an encounter event makes due (or changes): [`artifact_made_due`],
/// plus the Appointment on ConsultationStarted (the mapping turns it `fulfilled`).
pub fn artifacts_made_due(event: &EncounterEvent) -> Vec<WriteBackArtifact> {
    let mut artifacts: Vec<WriteBackArtifact> = artifact_made_due(event).into_iter().collect();
    if matches!(event, EncounterEvent::ConsultationStarted(_)) {
        artifacts.push(WriteBackArtifact::Appointment);
    }
    artifacts
}

/// A short stable name of an artifact (logs, command-id derivation, CLI).
pub fn artifact_name(artifact: &WriteBackArtifact) -> String {
    match artifact {
        WriteBackArtifact::Appointment => "appointment".into(),
        WriteBackArtifact::Encounter => "encounter".into(),
        WriteBackArtifact::DocumentReference => "document-reference".into(),
        WriteBackArtifact::Task { task_id } => format!("task:{task_id}"),
        WriteBackArtifact::ChargeItem => "charge-item".into(),
    }
}

/// Parses [`artifact_name`] back.
pub fn parse_artifact(name: &str) -> Option<WriteBackArtifact> {
    match name {
        "appointment" => Some(WriteBackArtifact::Appointment),
        "encounter" => Some(WriteBackArtifact::Encounter),
        "document-reference" => Some(WriteBackArtifact::DocumentReference),
        "charge-item" => Some(WriteBackArtifact::ChargeItem),
        other => other
            .strip_prefix("task:")
            .and_then(|id| id.parse().ok())
            .map(|task_id| WriteBackArtifact::Task { task_id }),
    }
}

/// The FHIR resources one artifact consists of, in write order (the first one is the
/// artifact's main resource: its EHR id and version are what the outcome records).
pub fn resources_for(record: &EncounterRecord, artifact: &WriteBackArtifact) -> Vec<Value> {
    let Some(schedule) = record.state.schedule.as_ref() else {
        return Vec::new();
    };
    let ctx = Ctx {
        record,
        tenant: &record.tenant,
        encounter_id: schedule.encounter_id,
        patient_id: schedule.patient_id,
        practitioner_id: &schedule.practitioner_id,
    };
    match artifact {
        WriteBackArtifact::Appointment => vec![ctx.appointment()],
        WriteBackArtifact::Encounter => vec![ctx.encounter()],
        WriteBackArtifact::DocumentReference => {
            let mut resources = Vec::new();
            if let Some(doc) = ctx.document_reference() {
                resources.push(doc);
            }
            if let Some(composition) = ctx.composition() {
                resources.push(composition);
            }
            if let Some(provenance) = ctx.provenance() {
                resources.push(provenance);
            }
            resources
        }
        WriteBackArtifact::Task { task_id } => ctx.task(*task_id).into_iter().collect(),
        WriteBackArtifact::ChargeItem => ctx.charge_item().into_iter().collect(),
    }
}

/// Every resource of the encounter as a FHIR `transaction` Bundle of conditional creates.
pub fn transaction_bundle(record: &EncounterRecord) -> Value {
    let resources = due_artifacts(&record.state)
        .iter()
        .flat_map(|artifact| resources_for(record, artifact))
        .collect::<Vec<_>>();
    bundle_of(&resources)
}

/// A `transaction` Bundle of conditional creates (`ifNoneExist` on the business key).
pub fn bundle_of(resources: &[Value]) -> Value {
    let entries: Vec<Value> = resources
        .iter()
        .map(|resource| {
            let key = BusinessKey::of(resource).expect("mapped resources carry a business key");
            json!({
                "fullUrl": format!("urn:uuid:{}", key.uuid()),
                "resource": resource,
                "request": {
                    "method": "POST",
                    "url": key.resource_type,
                    "ifNoneExist": key.condition(),
                },
            })
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

struct Ctx<'a> {
    record: &'a EncounterRecord,
    tenant: &'a str,
    encounter_id: Uuid,
    patient_id: Uuid,
    practitioner_id: &'a str,
}

fn virtual_location() -> Value {
    json!({
        "resourceType": "Location",
        "id": VIRTUAL_LOCATION_ID,
        "status": "active",
        "name": "Telehealth (virtual)",
        "mode": "kind",
        "physicalType": {"coding": [{
            "system": LOCATION_PHYSICAL_TYPE, "code": "vi", "display": "Virtual",
        }]},
    })
}

fn xhtml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn ai_security_label() -> Value {
    json!({"system": V3_OBSERVATION_VALUE, "code": "AIAST", "display": "AI asserted"})
}

fn note_type_coding(note_type: NoteType) -> Value {
    let (code, display) = match note_type {
        NoteType::ProgressNote => ("11506-3", "Progress note"),
        NoteType::ConsultNote => ("11488-4", "Consult note"),
    };
    json!({"coding": [{"system": LOINC, "code": code, "display": display}], "text": display})
}

fn billing_code_system(code: &str) -> &'static str {
    if code.starts_with(|c: char| c.is_ascii_digit()) {
        CPT
    } else {
        HCPCS
    }
}

impl Ctx<'_> {
    fn state(&self) -> &Encounter {
        &self.record.state
    }

    fn patient(&self) -> Value {
        logical_reference("Patient", self.tenant, "patient", self.patient_id)
    }

    fn practitioner(&self, id: &str) -> Value {
        logical_reference("Practitioner", self.tenant, "practitioner", id)
    }

    fn encounter_reference(&self) -> Value {
        logical_reference("Encounter", self.tenant, "encounter", self.encounter_id)
    }

    fn appointment(&self) -> Value {
        let state = self.state();
        let schedule = state.schedule.as_ref().expect("scheduled");
        let status = match state.status {
            EncounterStatus::NotScheduled | EncounterStatus::Scheduled => "booked",
            EncounterStatus::CheckedIn => "arrived",
            EncounterStatus::InConsultation | EncounterStatus::ConsultationEnded => "fulfilled",
            EncounterStatus::Cancelled => "cancelled",
            EncounterStatus::NoShow => "noshow",
        };
        let (code, display) = match schedule.visit_type.appointment_type {
            AppointmentType::Routine => ("ROUTINE", "Routine appointment - default if not valued"),
            AppointmentType::Followup => {
                ("FOLLOWUP", "A follow up visit from a previous appointment")
            }
            AppointmentType::Walkin => ("WALKIN", "A previously unscheduled walk-in visit"),
            AppointmentType::Checkup => {
                ("CHECKUP", "A routine check-up, such as an annual physical")
            }
            AppointmentType::Emergency => ("EMERGENCY", "Emergency appointment"),
        };
        let service = match schedule.visit_type.service {
            ServiceKind::EMVisit => "Telehealth evaluation and management visit",
            ServiceKind::VirtualCheckIn => "Brief virtual check-in",
        };
        let minutes = (schedule.window_end - schedule.window_start).num_minutes();
        let mut appointment = json!({
            "resourceType": "Appointment",
            "identifier": [identifier(self.tenant, "appointment", self.encounter_id)],
            "contained": [virtual_location()],
            "status": status,
            "serviceType": [{"text": service}],
            "appointmentType": {"coding": [{"system": V2_0276, "code": code, "display": display}]},
            "start": instant(schedule.window_start),
            "end": instant(schedule.window_end),
            "minutesDuration": minutes,
            "created": instant(schedule.at),
            "participant": [
                {"actor": self.patient(), "required": "required", "status": "accepted"},
                {"actor": self.practitioner(self.practitioner_id), "required": "required", "status": "accepted"},
                {"actor": {"reference": format!("#{VIRTUAL_LOCATION_ID}"), "display": "Telehealth (virtual)"},
                 "required": "information-only", "status": "accepted"},
            ],
        });
        if let Some(reason) = &state.cancel_reason {
            appointment["cancelationReason"] = json!({"text": reason});
        }
        appointment
    }

    fn encounter(&self) -> Value {
        let state = self.state();
        let status = match state.status {
            EncounterStatus::NotScheduled | EncounterStatus::Scheduled => "planned",
            EncounterStatus::CheckedIn => "arrived",
            EncounterStatus::InConsultation => "in-progress",
            EncounterStatus::ConsultationEnded => "finished",
            EncounterStatus::Cancelled | EncounterStatus::NoShow => "cancelled",
        };
        let mut period = json!({});
        if let Some(started) = state.consultation_started_at {
            period["start"] = json!(instant(started));
        }
        let modality_text = match (&state.consultation_ended, state.current_modality) {
            (Some(ended), _) => match ended.modality_used {
                Modality::Video => format!(
                    "Telehealth visit, audio and video (video {} min, audio-only {} min)",
                    ended.video_seconds / 60,
                    ended.audio_only_seconds / 60
                ),
                Modality::AudioOnly => format!(
                    "Telehealth visit, audio-only (video {} min, audio-only {} min)",
                    ended.video_seconds / 60,
                    ended.audio_only_seconds / 60
                ),
            },
            (None, Some(Modality::AudioOnly)) => "Telehealth visit, audio-only".to_string(),
            (None, _) => "Telehealth visit, audio and video".to_string(),
        };
        let mut encounter = json!({
            "resourceType": "Encounter",
            "identifier": [identifier(self.tenant, "encounter", self.encounter_id)],
            "contained": [virtual_location()],
            "status": status,
            "class": {"system": V3_ACT_CODE, "code": "VR", "display": "virtual"},
            "type": [{"text": modality_text}],
            "subject": self.patient(),
            "participant": [{
                "type": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "PPRF", "display": "primary performer",
                }]}],
                "individual": self.practitioner(self.practitioner_id),
            }],
            "appointment": [logical_reference("Appointment", self.tenant, "appointment", self.encounter_id)],
            "period": period,
            "location": [{"location": {"reference": format!("#{VIRTUAL_LOCATION_ID}"), "display": "Telehealth (virtual)"}}],
        });
        if let Some(ended) = &state.consultation_ended {
            encounter["period"]["end"] = json!(instant(ended.at));
            encounter["length"] = json!({
                "value": ended.duration_seconds / 60, "unit": "min", "system": UCUM, "code": "min",
            });
        }
        encounter
    }

    fn note_authors(&self) -> Vec<Value> {
        let state = self.state();
        let mut authors: Vec<Value> = self
            .record
            .ai_agents
            .iter()
            .map(|(vendor, model)| self.ai_device(vendor, model))
            .collect();
        let clinician = state
            .note
            .as_ref()
            .and_then(|n| n.signed_by.clone())
            .or_else(|| match state.note.as_ref().map(|n| &n.last_author) {
                Some(NoteAuthor::Clinician { practitioner_id }) => Some(practitioner_id.clone()),
                _ => None,
            });
        if let Some(clinician) = clinician {
            authors.push(self.practitioner(&clinician));
        }
        authors
    }

    fn ai_device(&self, vendor: &str, model: &str) -> Value {
        let mut reference =
            logical_reference("Device", self.tenant, "device", format!("{vendor}/{model}"));
        reference["display"] = json!(format!("AI scribe {vendor} model {model}"));
        reference
    }

    fn note_time(&self) -> Option<DateTime<Utc>> {
        let note = self.state().note.as_ref()?;
        note.signed_at.or(self.record.note_drafted_at)
    }

    fn note_text(&self) -> Option<String> {
        let note = self.state().note.as_ref()?;
        let s = &note.sections;
        let mut text = format!(
            "Subjective:\n{}\n\nObjective:\n{}\n\nAssessment:\n{}\n\nPlan:\n{}\n",
            s.subjective, s.objective, s.assessment, s.plan
        );
        for addendum in &note.addenda {
            text.push_str(&format!(
                "\nAddendum {} ({}, {}):\n{}\n",
                addendum.addendum_number,
                addendum.author_id,
                instant(addendum.at),
                addendum.text
            ));
        }
        Some(text)
    }

    fn meta_for_note(&self, profile: Option<&str>) -> Value {
        let mut meta = json!({});
        if let Some(profile) = profile {
            meta["profile"] = json!([profile]);
        }
        if self.state().note.as_ref().is_some_and(|n| n.ai_assisted) {
            meta["security"] = json!([ai_security_label()]);
        }
        meta
    }

    fn context_period(&self) -> Value {
        let state = self.state();
        let mut period = json!({});
        if let Some(started) = state.consultation_started_at {
            period["start"] = json!(instant(started));
        }
        if let Some(ended) = &state.consultation_ended {
            period["end"] = json!(instant(ended.at));
        }
        period
    }

    fn document_reference(&self) -> Option<Value> {
        let note = self.state().note.as_ref()?;
        let signed = self.state().note_status == NoteStatus::Signed;
        let text = self.note_text()?;
        let mut doc = json!({
            "resourceType": "DocumentReference",
            "meta": self.meta_for_note(Some(US_CORE_DOCREF_PROFILE)),
            "identifier": [identifier(self.tenant, "document-reference", self.encounter_id)],
            "status": "current",
            "docStatus": if signed { "final" } else { "preliminary" },
            "type": note_type_coding(note.note_type),
            "category": [{"coding": [{
                "system": US_CORE_DOCREF_CATEGORY, "code": "clinical-note", "display": "Clinical Note",
            }]}],
            "subject": self.patient(),
            "date": instant(self.note_time()?),
            "author": self.note_authors(),
            "description": "Telehealth visit note (SOAP)",
            "content": [{"attachment": {
                "contentType": "text/plain; charset=utf-8",
                "data": base64_encode(text.as_bytes()),
                "title": match note.note_type {
                    NoteType::ProgressNote => "Progress note",
                    NoteType::ConsultNote => "Consult note",
                },
            }}],
            "context": {
                "encounter": [self.encounter_reference()],
                "period": self.context_period(),
            },
        });
        if let Some(signer) = &note.signed_by {
            doc["authenticator"] = self.practitioner(signer);
        }
        if doc["meta"].as_object().is_some_and(|m| m.is_empty()) {
            doc.as_object_mut().expect("object").remove("meta");
        }
        Some(doc)
    }

    fn composition(&self) -> Option<Value> {
        let note = self.state().note.as_ref()?;
        let signed = self.state().note_status == NoteStatus::Signed;
        let section = |title: &str, code: &str, display: &str, text: &str| {
            json!({
                "title": title,
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                "text": {
                    "status": "generated",
                    "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>", xhtml_escape(text)),
                },
            })
        };
        let s = &note.sections;
        let mut sections = vec![
            section(
                "Subjective",
                "61150-9",
                "Subjective Narrative",
                &s.subjective,
            ),
            section("Objective", "61149-1", "Objective Narrative", &s.objective),
            section("Assessment", "51848-0", "Evaluation note", &s.assessment),
            section("Plan", "18776-5", "Plan of care note", &s.plan),
        ];
        // A section must hold text, entries or sub-sections (cmp-1): drop empty ones.
        sections.retain(|section| {
            section["text"]["div"].as_str().is_some_and(|div| {
                div.len() > "<div xmlns=\"http://www.w3.org/1999/xhtml\"></div>".len()
            })
        });
        let mut composition = json!({
            "resourceType": "Composition",
            "meta": self.meta_for_note(None),
            "identifier": identifier(self.tenant, "composition", self.encounter_id),
            "status": if signed { "final" } else { "preliminary" },
            "type": note_type_coding(note.note_type),
            "subject": self.patient(),
            "encounter": self.encounter_reference(),
            "date": instant(self.note_time()?),
            "author": self.note_authors(),
            "title": "Telehealth visit note",
            "section": sections,
        });
        if let (Some(signer), Some(at)) = (&note.signed_by, note.signed_at) {
            composition["attester"] =
                json!([{"mode": "legal", "time": instant(at), "party": self.practitioner(signer)}]);
        }
        if composition["meta"]
            .as_object()
            .is_some_and(|m| m.is_empty())
        {
            composition.as_object_mut().expect("object").remove("meta");
        }
        Some(composition)
    }

    /// For AI-assisted notes: who drafted (the AI agent) and who verified and signed.
    fn provenance(&self) -> Option<Value> {
        let note = self.state().note.as_ref()?;
        if !note.ai_assisted || self.record.ai_agents.is_empty() {
            return None;
        }
        let participant = |code: &str, display: &str| json!([{"coding": [{"system": PROVENANCE_PARTICIPANT_TYPE, "code": code, "display": display}]}]);
        let mut agents: Vec<Value> = self
            .record
            .ai_agents
            .iter()
            .map(|(vendor, model)| {
                json!({"type": participant("author", "Author"), "who": self.ai_device(vendor, model)})
            })
            .collect();
        if let Some(signer) = &note.signed_by {
            agents.push(json!({
                "type": participant("verifier", "Verifier"), "who": self.practitioner(signer),
            }));
        }
        Some(json!({
            "resourceType": "Provenance",
            "meta": {
                "tag": [{
                    "system": identifier_system(self.tenant, "provenance"),
                    "code": self.encounter_id.to_string(),
                }],
                "security": [ai_security_label()],
            },
            "target": [
                logical_reference("DocumentReference", self.tenant, "document-reference", self.encounter_id),
                logical_reference("Composition", self.tenant, "composition", self.encounter_id),
            ],
            "recorded": instant(self.note_time()?),
            "agent": agents,
        }))
    }

    fn task(&self, task_id: Uuid) -> Option<Value> {
        let task = self
            .state()
            .follow_up_tasks
            .iter()
            .find(|t| t.task_id == task_id)?;
        Some(json!({
            "resourceType": "Task",
            "identifier": [identifier(self.tenant, "task", task_id)],
            "status": "requested",
            "intent": "order",
            "description": task.description,
            "focus": self.encounter_reference(),
            "for": self.patient(),
            "encounter": self.encounter_reference(),
            "authoredOn": instant(task.at),
            "requester": self.practitioner(self.practitioner_id),
            "owner": {"identifier": identifier(self.tenant, "owner", &task.owner), "display": task.owner},
            "restriction": {"period": {"end": instant(task.due)}},
        }))
    }

    fn charge_item(&self) -> Option<Value> {
        let state = self.state();
        let coding = state.coding.as_ref()?;
        let (status, line, notes) = match &coding.outcome {
            CodingOutcome::Billable { codes } => ("billable", codes.first(), Vec::new()),
            CodingOutcome::Hold { reasons } => ("planned", None, reasons.clone()),
            CodingOutcome::NotBillable { reasons } => ("not-billable", None, reasons.clone()),
        };
        let mut extension = vec![json!({
            "url": format!("{EXTENSION_BASE}billing-policy-version"),
            "valueInteger": coding.policy_version,
        })];
        let code = match line {
            Some(line) => {
                for modifier in &line.modifiers {
                    extension.push(json!({
                        "url": format!("{EXTENSION_BASE}charge-modifier"),
                        "valueCoding": {"system": billing_code_system(modifier), "code": modifier},
                    }));
                }
                extension.push(json!({
                    "url": format!("{EXTENSION_BASE}place-of-service"),
                    "valueCoding": {"system": CMS_POS, "code": line.pos},
                }));
                json!({"coding": [{"system": billing_code_system(&line.code), "code": line.code}]})
            }
            None => json!({"text": "Telehealth visit (no billable code assigned)"}),
        };
        let mut charge = json!({
            "resourceType": "ChargeItem",
            "extension": extension,
            "identifier": [identifier(self.tenant, "charge-item", self.encounter_id)],
            "status": status,
            "code": code,
            "subject": self.patient(),
            "context": self.encounter_reference(),
            "performer": [{"actor": self.practitioner(self.practitioner_id)}],
            "enteredDate": instant(coding.at),
        });
        if let Some(started) = state.consultation_started_at {
            charge["occurrenceDateTime"] = json!(instant(started));
        }
        if let Some(line) = line {
            charge["quantity"] = json!({"value": line.units});
        }
        if !notes.is_empty() {
            charge["note"] = notes.iter().map(|n| json!({"text": n})).collect();
        }
        Some(charge)
    }
}

fn loinc_display(code: &str) -> &'static str {
    match code {
        "85354-9" => "Blood pressure panel with all children optional",
        "8480-6" => "Systolic blood pressure",
        "8462-4" => "Diastolic blood pressure",
        "8867-4" => "Heart rate",
        "29463-7" => "Body weight",
        "2708-6" => "Oxygen saturation in Arterial blood",
        "59408-5" => "Oxygen saturation in Arterial blood by Pulse oximetry",
        "2339-0" => "Glucose [Mass/volume] in Blood",
        "41653-7" => "Glucose [Mass/volume] in Capillary blood by Glucometer",
        _ => "Vital sign",
    }
}

/// RPM readings of one recorded batch as vital-signs Observations (one per reading,
/// identifier `<batch_id>-<index>`). SpO2 carries both LOINC codes US Core requires.
pub fn observations_for(
    tenant: &str,
    patient_id: Uuid,
    batch_id: Uuid,
    readings: &[Reading],
) -> Vec<Value> {
    readings
        .iter()
        .enumerate()
        .map(|(index, reading)| {
            let mut coding = vec![json!({
                "system": LOINC, "code": reading.code, "display": loinc_display(&reading.code),
            })];
            if reading.code == "59408-5" || reading.code == "2708-6" {
                let other = if reading.code == "59408-5" { "2708-6" } else { "59408-5" };
                coding.push(json!({"system": LOINC, "code": other, "display": loinc_display(other)}));
            }
            json!({
                "resourceType": "Observation",
                "identifier": [identifier(tenant, "observation", format!("{batch_id}-{index}"))],
                "status": "final",
                "category": [{"coding": [{
                    "system": OBSERVATION_CATEGORY, "code": "vital-signs", "display": "Vital Signs",
                }]}],
                "code": {"coding": coding, "text": loinc_display(&reading.code)},
                "subject": logical_reference("Patient", tenant, "patient", patient_id),
                "effectiveDateTime": instant(reading.effective_at),
                "valueQuantity": {
                    "value": reading.value, "unit": reading.unit, "system": UCUM, "code": reading.unit,
                },
                "device": logical_reference("Device", tenant, "device", &reading.device_id),
            })
        })
        .collect()
}

/// Standard base64 (RFC 4648 with padding) for `Attachment.data`.
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), expected);
        }
    }

    #[test]
    fn artifact_names_round_trip() {
        let task_id = Uuid::from_u128(7);
        for artifact in [
            WriteBackArtifact::Appointment,
            WriteBackArtifact::Encounter,
            WriteBackArtifact::DocumentReference,
            WriteBackArtifact::Task { task_id },
            WriteBackArtifact::ChargeItem,
        ] {
            assert_eq!(parse_artifact(&artifact_name(&artifact)), Some(artifact));
        }
    }
}
