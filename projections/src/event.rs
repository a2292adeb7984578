//! Events as projections see them: the envelope plus its domain event, decoded once per
//! batch and shared by every projection.

use chartline_domain::encounter::EncounterEvent;
use chartline_domain::patient::PatientEvent;
use chartline_domain::rpm::RpmEvent;
use chartline_infra::{RawEvent, StoreError};
use chartline_proto::EventEnvelope;
use chartline_proto::codec::{DomainEvent, current_schema_version};
use serde::de::value::MapDeserializer;
use serde_json::Value;

use crate::error::ProjectionError;

/// The domain event inside an envelope.
#[derive(Debug, Clone)]
pub enum Domain {
    Encounter(EncounterEvent),
    Patient(PatientEvent),
    Rpm(RpmEvent),
    /// A category no read model uses (synthetic load, billing policy, …).
    Other,
    /// A known category whose payload does not decode: poison for the projections that
    /// read this category.
    Undecodable(String),
}

/// One event handed to a projection.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub envelope: &'a EventEnvelope,
    pub domain: &'a Domain,
}

impl Event<'_> {
    /// The aggregate id part of the stream id (`encounter-<uuid>` → `<uuid>`).
    pub fn aggregate_id(&self) -> String {
        self.envelope.stream_id.id_part().to_string()
    }

    pub fn tenant(&self) -> String {
        self.envelope.metadata.tenant.as_str().to_string()
    }

    /// The encounter event, `None` for other categories, an error when undecodable.
    pub fn encounter(&self) -> Result<Option<&EncounterEvent>, ProjectionError> {
        match self.domain {
            Domain::Encounter(event) => Ok(Some(event)),
            Domain::Undecodable(error) if self.envelope.category() == "encounter" => {
                Err(ProjectionError::handler(error))
            }
            _ => Ok(None),
        }
    }

    pub fn patient(&self) -> Result<Option<&PatientEvent>, ProjectionError> {
        match self.domain {
            Domain::Patient(event) => Ok(Some(event)),
            Domain::Undecodable(error) if self.envelope.category() == "patient" => {
                Err(ProjectionError::handler(error))
            }
            _ => Ok(None),
        }
    }

    pub fn rpm(&self) -> Result<Option<&RpmEvent>, ProjectionError> {
        match self.domain {
            Domain::Rpm(event) => Ok(Some(event)),
            Domain::Undecodable(error) if self.envelope.category() == "rpm" => {
                Err(ProjectionError::handler(error))
            }
            _ => Ok(None),
        }
    }
}

/// Decodes an envelope's domain event. Envelopes from the store are already upcast; the
/// fast path deserializes straight from the borrowed JSON without copying it.
pub fn decode(envelope: &EventEnvelope) -> Domain {
    by_category(envelope, Payload::InEnvelope).unwrap_or(Domain::Other)
}

/// [`decode`] for an event read with `read_all_raw`, whose payload is still the stored
/// JSON text: the domain event is deserialized straight from the text, with no
/// `serde_json::Value` built and freed in between. For a category a read model decodes
/// (encounter, patient, rpm) the envelope's `data` stays `Null`: handlers read the typed
/// event. Any other category gets its `data` parsed, so a projection of its own still
/// sees the payload. A payload that is not JSON is a store error, as in `read_all`.
pub fn decode_raw(raw: RawEvent) -> Result<(EventEnvelope, Domain), ProjectionError> {
    let RawEvent { mut envelope, data } = raw;
    if let Some(domain) = by_category(&envelope, Payload::Text(&data)) {
        return Ok((envelope, domain));
    }
    envelope.data = serde_json::from_str(&data).map_err(|error| {
        StoreError::Corrupt(format!(
            "event at position {}: data: {error}",
            envelope.global_position
        ))
    })?;
    Ok((envelope, Domain::Other))
}

/// Where a payload is: the envelope's `data`, or the stored text beside it.
#[derive(Clone, Copy)]
enum Payload<'a> {
    InEnvelope,
    Text(&'a str),
}

/// The domain event of a category a read model decodes; `None` for other categories.
fn by_category(envelope: &EventEnvelope, payload: Payload<'_>) -> Option<Domain> {
    let result = match envelope.category() {
        "encounter" => decode_payload::<EncounterEvent>(envelope, payload).map(Domain::Encounter),
        "patient" => decode_payload::<PatientEvent>(envelope, payload).map(Domain::Patient),
        "rpm" => decode_payload::<RpmEvent>(envelope, payload).map(Domain::Rpm),
        _ => return None,
    };
    Some(result.unwrap_or_else(|error| {
        Domain::Undecodable(format!(
            "{} v{} does not decode: {error}",
            envelope.event_type, envelope.schema_version
        ))
    }))
}

fn decode_payload<E: DomainEvent>(
    envelope: &EventEnvelope,
    payload: Payload<'_>,
) -> Result<E, String> {
    match payload {
        Payload::InEnvelope => decode_as(envelope),
        Payload::Text(data) => decode_text(envelope, data),
    }
}

fn decode_text<E: DomainEvent>(envelope: &EventEnvelope, data: &str) -> Result<E, String> {
    if envelope.schema_version != current_schema_version(E::CATEGORY, &envelope.event_type) {
        let mut parsed = envelope.clone();
        parsed.data = serde_json::from_str(data).map_err(|e| e.to_string())?;
        return decode_as::<E>(&parsed);
    }
    // The domain enums are adjacently tagged ({"type": …, "data": …}); with the tag
    // first, serde reads the payload in one streaming pass.
    let tag = serde_json::to_string(&envelope.event_type).map_err(|e| e.to_string())?;
    let mut text = String::with_capacity(tag.len() + data.len() + 18);
    text.push_str("{\"type\":");
    text.push_str(&tag);
    text.push_str(",\"data\":");
    text.push_str(data);
    text.push('}');
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

fn decode_as<E: DomainEvent>(envelope: &EventEnvelope) -> Result<E, String> {
    if envelope.schema_version != current_schema_version(E::CATEGORY, &envelope.event_type) {
        return chartline_proto::codec::decode::<E>(envelope).map_err(|e| e.to_string());
    }
    let tag = Value::String(envelope.event_type.clone());
    let entries = [("type", &tag), ("data", &envelope.data)];
    let deserializer: MapDeserializer<'_, _, serde_json::Error> =
        MapDeserializer::new(entries.into_iter());
    E::deserialize(deserializer).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chartline_domain::encounter::{CheckedIn, EncounterEvent};
    use chartline_proto::codec::encode;
    use chartline_proto::{Actor, Metadata, StreamId, TenantId};
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;

    fn envelope(event_type: &str, data: Value) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::now_v7(),
            stream_id: StreamId::for_aggregate("encounter", Uuid::now_v7()),
            stream_version: 1,
            global_position: 1,
            event_type: event_type.into(),
            schema_version: 1,
            data,
            metadata: Metadata {
                tenant: TenantId::parse("default").unwrap(),
                actor: Actor::system(),
                correlation_id: Uuid::now_v7(),
                causation_id: None,
                source: "test".into(),
                occurred_at: Utc::now(),
                contains_phi: false,
            },
            recorded_at: Utc::now(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn fast_path_decodes_what_the_codec_encodes() {
        let event = EncounterEvent::CheckedIn(CheckedIn {
            at: Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).unwrap(),
        });
        let encoded = encode(&event);
        let decoded = decode(&envelope(encoded.event_type, encoded.data));
        assert!(matches!(decoded, Domain::Encounter(e) if e == event));
    }

    fn raw(event_type: &str, data: Value) -> RawEvent {
        RawEvent::from_envelope(envelope(event_type, data))
    }

    #[test]
    fn the_raw_path_decodes_what_the_value_path_decodes() {
        let at = Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).unwrap();
        let event = EncounterEvent::CheckedIn(CheckedIn { at });
        let encoded = encode(&event);
        let (header, decoded) = decode_raw(raw(encoded.event_type, encoded.data)).unwrap();
        assert!(matches!(decoded, Domain::Encounter(e) if e == event));
        assert_eq!(header.event_type, "CheckedIn");
        // The same verdicts as the value path on payloads that do not decode.
        for (event_type, data) in [
            ("CheckedIn", serde_json::json!({"at": 5})),
            ("NoSuchEvent", serde_json::json!({})),
            ("CheckedIn", serde_json::json!([1, 2])),
        ] {
            let by_value = decode(&envelope(event_type, data.clone()));
            let (_, by_text) = decode_raw(raw(event_type, data)).unwrap();
            assert!(matches!(by_value, Domain::Undecodable(_)), "{by_value:?}");
            assert!(matches!(by_text, Domain::Undecodable(_)), "{by_text:?}");
        }
    }

    #[test]
    fn the_raw_path_upcasts_an_old_schema_through_the_codec() {
        let mut old = raw(
            "NoteDrafted",
            serde_json::json!({
                "author": {"kind": "clinician", "practitioner_id": "dr-1"},
                "note_type": "consult_note",
                "body": "S: cough for three days. A: viral URI.",
                "at": "2026-01-05T10:00:00Z",
            }),
        );
        old.envelope.schema_version = 1;
        let by_value = decode(&{
            let mut envelope = old.envelope.clone();
            envelope.data = serde_json::from_str(&old.data).unwrap();
            envelope
        });
        let (_, by_text) = decode_raw(old).unwrap();
        let (Domain::Encounter(a), Domain::Encounter(b)) = (&by_value, &by_text) else {
            panic!("both decode: {by_value:?} / {by_text:?}");
        };
        assert_eq!(a, b);
    }

    #[test]
    fn other_categories_keep_their_payload_and_bad_json_is_a_store_error() {
        let mut marker = raw("Marked", serde_json::json!({"poison": true}));
        marker.envelope.stream_id = StreamId::for_aggregate("marker", Uuid::now_v7());
        let (header, domain) = decode_raw(marker.clone()).unwrap();
        assert!(matches!(domain, Domain::Other));
        assert_eq!(header.data["poison"], true);
        marker.data = "{not json".into();
        assert!(matches!(
            decode_raw(marker),
            Err(ProjectionError::Store(StoreError::Corrupt(_)))
        ));
    }

    #[test]
    fn a_bad_payload_is_undecodable_not_a_panic() {
        let decoded = decode(&envelope("CheckedIn", serde_json::json!({"at": 5})));
        assert!(matches!(decoded, Domain::Undecodable(_)));
        let unknown = decode(&envelope("NoSuchEvent", serde_json::json!({})));
        assert!(matches!(unknown, Domain::Undecodable(_)));
    }
}
