//! Serialization at the edge: domain events ⇄ `(event_type, schema_version, data)`,
//! with upcasting of older schema versions on read.
//!
//! The domain's event enums serialize adjacently tagged (`{"type": …, "data": …}`);
//! the envelope stores the tag as `event_type` and the content as `data`. Each event
//! type has a current schema version here; the upcaster registry turns stored older
//! versions into the current shape when read. Stored bytes are never rewritten.

use chartline_domain::encounter::EncounterEvent;
use chartline_domain::patient::PatientEvent;
use chartline_domain::rpm::RpmEvent;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::envelope::EventEnvelope;

/// A domain event enum that can be stored.
pub trait DomainEvent: Serialize + DeserializeOwned {
    const CATEGORY: &'static str;
    fn event_type(&self) -> &'static str;
    fn contains_phi(&self) -> bool;
}

impl DomainEvent for EncounterEvent {
    const CATEGORY: &'static str = "encounter";
    fn event_type(&self) -> &'static str {
        EncounterEvent::event_type(self)
    }
    fn contains_phi(&self) -> bool {
        EncounterEvent::contains_phi(self)
    }
}

impl DomainEvent for PatientEvent {
    const CATEGORY: &'static str = "patient";
    fn event_type(&self) -> &'static str {
        PatientEvent::event_type(self)
    }
    fn contains_phi(&self) -> bool {
        PatientEvent::contains_phi(self)
    }
}

impl DomainEvent for RpmEvent {
    const CATEGORY: &'static str = "rpm";
    fn event_type(&self) -> &'static str {
        RpmEvent::event_type(self)
    }
    fn contains_phi(&self) -> bool {
        RpmEvent::contains_phi(self)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error(
        "event {category}/{event_type} schema version {version} is newer than this build understands ({current})"
    )]
    FromTheFuture {
        category: String,
        event_type: String,
        version: u32,
        current: u32,
    },
    #[error("no upcaster for {category}/{event_type} from version {version}")]
    MissingUpcaster {
        category: String,
        event_type: String,
        version: u32,
    },
    #[error("upcasting {event_type} v{version}: {message}")]
    Upcast {
        event_type: String,
        version: u32,
        message: String,
    },
    #[error("event payload does not match its type: {0}")]
    Payload(String),
}

/// The current schema version of each event type. Bump it together with an upcaster
/// from the previous version.
pub fn current_schema_version(category: &str, event_type: &str) -> u32 {
    match (category, event_type) {
        ("encounter", "NoteDrafted") => 2,
        _ => 1,
    }
}

type Upcaster = fn(Value) -> Result<Value, String>;

/// `(category, event_type, from_version) → upcaster to from_version + 1`.
const UPCASTERS: &[(&str, &str, u32, Upcaster)] =
    &[("encounter", "NoteDrafted", 1, note_drafted_v1_to_v2)];

/// v1 NoteDrafted carried one free-text `body`; v2 carries SOAP sections. Legacy notes
/// commonly label their sections ("Subjective:", "S:", …): those labels are split out;
/// unlabelled text stays whole in `subjective` and `assessment`/`plan` say so explicitly
/// rather than inventing clinical content.
fn note_drafted_v1_to_v2(mut data: Value) -> Result<Value, String> {
    let object = data
        .as_object_mut()
        .ok_or_else(|| "payload is not an object".to_string())?;
    let body = object
        .remove("body")
        .and_then(|b| b.as_str().map(str::to_owned))
        .ok_or_else(|| "v1 payload has no string `body`".to_string())?;
    let sections = split_soap(&body);
    object.insert("sections".into(), sections);
    object
        .entry("note_type")
        .or_insert_with(|| json!("progress_note"));
    Ok(data)
}

fn split_soap(body: &str) -> Value {
    const LABELS: [(&str, &[&str]); 4] = [
        ("subjective", &["subjective:", "s:"]),
        ("objective", &["objective:", "o:"]),
        ("assessment", &["assessment:", "a:"]),
        ("plan", &["plan:", "p:"]),
    ];
    let mut sections: [String; 4] = Default::default();
    let mut current: Option<usize> = None;
    let mut labelled = false;
    for line in body.lines() {
        let trimmed = line.trim_start();
        let lower = trimmed.to_ascii_lowercase();
        let found = LABELS.iter().enumerate().find_map(|(index, (_, labels))| {
            labels
                .iter()
                .find(|label| lower.starts_with(*label))
                .map(|label| (index, label.len()))
        });
        let text = match found {
            Some((index, len)) => {
                current = Some(index);
                labelled = true;
                trimmed[len..].trim()
            }
            None => line.trim(),
        };
        if let Some(index) = current
            && !text.is_empty()
        {
            if !sections[index].is_empty() {
                sections[index].push('\n');
            }
            sections[index].push_str(text);
        }
    }
    if !labelled {
        return json!({
            "subjective": body.trim(),
            "objective": "",
            "assessment": "(unstructured legacy note; see subjective)",
            "plan": "(unstructured legacy note; see subjective)",
        });
    }
    json!({
        "subjective": sections[0],
        "objective": sections[1],
        "assessment": sections[2],
        "plan": sections[3],
    })
}

/// Brings `data` from `version` to the current schema version of its type.
pub fn upcast(
    category: &str,
    event_type: &str,
    mut version: u32,
    mut data: Value,
) -> Result<(u32, Value), CodecError> {
    let current = current_schema_version(category, event_type);
    if version > current {
        return Err(CodecError::FromTheFuture {
            category: category.into(),
            event_type: event_type.into(),
            version,
            current,
        });
    }
    while version < current {
        let upcaster = UPCASTERS
            .iter()
            .find(|(c, t, v, _)| *c == category && *t == event_type && *v == version)
            .map(|(_, _, _, f)| *f)
            .ok_or_else(|| CodecError::MissingUpcaster {
                category: category.into(),
                event_type: event_type.into(),
                version,
            })?;
        data = upcaster(data).map_err(|message| CodecError::Upcast {
            event_type: event_type.into(),
            version,
            message,
        })?;
        version += 1;
    }
    Ok((version, data))
}

/// Upcasts a stored envelope to the current schema (a new value; storage is untouched).
/// `hash` and `prev_hash` still describe the stored bytes, so verify the chain on raw
/// reads, not on upcast ones.
pub fn upcast_envelope(mut event: EventEnvelope) -> Result<EventEnvelope, CodecError> {
    if event.schema_version == current_schema_version(event.category(), &event.event_type) {
        return Ok(event);
    }
    let data = std::mem::take(&mut event.data);
    let (version, data) = upcast(
        event.stream_id.category(),
        &event.event_type,
        event.schema_version,
        data,
    )?;
    event.schema_version = version;
    event.data = data;
    Ok(event)
}

/// A domain event split into what the envelope stores.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub event_type: &'static str,
    pub schema_version: u32,
    pub data: Value,
    pub contains_phi: bool,
}

pub fn encode<E: DomainEvent>(event: &E) -> Encoded {
    let event_type = event.event_type();
    let mut tagged = serde_json::to_value(event).expect("domain events always serialize");
    let data = tagged
        .get_mut("data")
        .map(Value::take)
        .unwrap_or(Value::Null);
    Encoded {
        event_type,
        schema_version: current_schema_version(E::CATEGORY, event_type),
        data,
        contains_phi: event.contains_phi(),
    }
}

/// Decodes a stored event into its domain type, upcasting old versions first.
pub fn decode<E: DomainEvent>(event: &EventEnvelope) -> Result<E, CodecError> {
    let (_, data) = upcast(
        E::CATEGORY,
        &event.event_type,
        event.schema_version,
        event.data.clone(),
    )?;
    serde_json::from_value(json!({ "type": event.event_type, "data": data }))
        .map_err(|e| CodecError::Payload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chartline_domain::encounter::{NoteAuthor, NoteDrafted, NoteType, SoapSections};
    use chrono::{TimeZone, Utc};

    fn drafted() -> EncounterEvent {
        EncounterEvent::NoteDrafted(NoteDrafted {
            author: NoteAuthor::Clinician {
                practitioner_id: "dr-1".into(),
            },
            note_type: NoteType::ConsultNote,
            sections: SoapSections {
                subjective: "s".into(),
                objective: "o".into(),
                assessment: "a".into(),
                plan: "p".into(),
            },
            at: Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).unwrap(),
        })
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let event = drafted();
        let encoded = encode(&event);
        assert_eq!(encoded.event_type, "NoteDrafted");
        assert_eq!(encoded.schema_version, 2);
        assert!(encoded.contains_phi);
        let (version, data) = upcast("encounter", "NoteDrafted", 2, encoded.data).unwrap();
        assert_eq!(version, 2);
        let back: EncounterEvent =
            serde_json::from_value(json!({"type": "NoteDrafted", "data": data})).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn v1_note_with_labelled_sections_upcasts_to_soap() {
        let v1 = json!({
            "author": {"kind": "clinician", "practitioner_id": "dr-1"},
            "body": "Subjective: cough for 3 days\nObjective: afebrile\nAssessment: viral URI\nPlan: fluids, rest\nreturn if worse",
            "at": "2019-05-01T10:00:00Z"
        });
        let (version, data) = upcast("encounter", "NoteDrafted", 1, v1).unwrap();
        assert_eq!(version, 2);
        assert_eq!(data["sections"]["subjective"], "cough for 3 days");
        assert_eq!(data["sections"]["objective"], "afebrile");
        assert_eq!(data["sections"]["assessment"], "viral URI");
        assert_eq!(data["sections"]["plan"], "fluids, rest\nreturn if worse");
        assert!(data.get("body").is_none());
        let event: EncounterEvent =
            serde_json::from_value(json!({"type": "NoteDrafted", "data": data})).unwrap();
        assert!(
            matches!(event, EncounterEvent::NoteDrafted(n) if n.note_type == NoteType::ProgressNote)
        );
    }

    #[test]
    fn v1_note_without_labels_keeps_the_text_whole() {
        let v1 = json!({
            "author": {"kind": "clinician", "practitioner_id": "dr-1"},
            "body": "Patient doing well.",
            "at": "2019-05-01T10:00:00Z"
        });
        let (_, data) = upcast("encounter", "NoteDrafted", 1, v1).unwrap();
        assert_eq!(data["sections"]["subjective"], "Patient doing well.");
    }

    #[test]
    fn future_and_broken_versions_are_typed_errors() {
        assert!(matches!(
            upcast("encounter", "NoteDrafted", 3, json!({})),
            Err(CodecError::FromTheFuture { .. })
        ));
        assert!(matches!(
            upcast("encounter", "NoteDrafted", 1, json!({"no_body": 1})),
            Err(CodecError::Upcast { .. })
        ));
        assert!(matches!(
            upcast("encounter", "Scheduled", 0, json!({})),
            Err(CodecError::MissingUpcaster { .. })
        ));
    }
}
