//! The per-stream hash chain that lets auditors verify a history was not tampered with.
//!
//! `hash = SHA-256(prev_hash ‖ canonical bytes)` where the canonical bytes are the
//! RFC 8785 (JSON Canonicalization Scheme) serialization of the event's identity and
//! content: event id, stream id, version, type, schema version, data, metadata and
//! record time. The global position is deliberately outside the hash: it is assigned
//! at commit and carries no meaning of its own; the stream version orders the chain.

use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::envelope::{Actor, EventEnvelope, Metadata};
use crate::ids::StreamId;

/// `prev_hash` of the first event of every stream.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the hash covers, borrowed so the store can hash before it builds an envelope.
pub struct HashInput<'a> {
    pub event_id: Uuid,
    pub stream_id: &'a StreamId,
    pub stream_version: u64,
    pub event_type: &'a str,
    pub schema_version: u32,
    pub data: &'a serde_json::Value,
    pub metadata: &'a Metadata,
    pub recorded_at: DateTime<Utc>,
}

/// Record times are hashed at microsecond precision, the precision both storage
/// backends keep, so a value read back hashes as it did when written.
pub fn canonical_time(at: DateTime<Utc>) -> String {
    let mut out = Vec::with_capacity(27);
    crate::time::write_rfc3339(&mut out, at, SecondsFormat::Micros);
    String::from_utf8(out).expect("RFC 3339 text is ASCII")
}

/// RFC 8785 canonical bytes of the hashed part of an event: the JSON object
/// `{data, event_id, event_type, metadata, recorded_at, schema_version, stream_id,
/// stream_version}` (members in canonical order), written by [`crate::jcs`].
pub fn canonical_bytes(input: &HashInput<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write_canonical(
        &mut out,
        input,
        &canonical_metadata(input.metadata),
        &canonical_time(input.recorded_at),
    );
    out
}

/// [`canonical_bytes`] from parts the caller already has: the metadata's canonical JSON
/// ([`canonical_metadata`]) and the record time's text ([`canonical_time`]).
fn write_canonical(out: &mut Vec<u8>, input: &HashInput<'_>, metadata: &str, recorded_at: &str) {
    write_canonical_head(out, input.data, input.event_id, input.event_type, metadata);
    write_canonical_tail(
        out,
        recorded_at,
        input.schema_version,
        input.stream_id,
        input.stream_version,
    );
}

/// The first members of an event's canonical bytes (`data`, `event_id`, `event_type`,
/// `metadata`, through the name `"recorded_at":`): all that its author decides. A store
/// writes this while the caller still holds the event, off the single writer's path;
/// the writer adds the rest with [`chain_hash_from_head`] once it has ordered the event.
/// `metadata` is the metadata's canonical JSON ([`canonical_metadata`]).
pub fn write_canonical_head(
    out: &mut Vec<u8>,
    data: &serde_json::Value,
    event_id: Uuid,
    event_type: &str,
    metadata: &str,
) {
    use crate::jcs::{write_string, write_value};
    out.extend_from_slice(b"{\"data\":");
    write_value(out, data);
    out.extend_from_slice(b",\"event_id\":");
    write_uuid(out, event_id);
    out.extend_from_slice(b",\"event_type\":");
    write_string(out, event_type);
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(metadata.as_bytes());
    out.extend_from_slice(b",\"recorded_at\":");
}

/// The members after [`write_canonical_head`]: the record time and the place in the
/// stream, which the writer decides, and the schema version (next in canonical order).
fn write_canonical_tail(
    out: &mut Vec<u8>,
    recorded_at: &str,
    schema_version: u32,
    stream_id: &StreamId,
    stream_version: u64,
) {
    use crate::jcs::{write_string, write_unsigned};
    write_string(out, recorded_at);
    out.extend_from_slice(b",\"schema_version\":");
    write_unsigned(out, u64::from(schema_version));
    out.extend_from_slice(b",\"stream_id\":");
    write_string(out, stream_id.as_str());
    out.extend_from_slice(b",\"stream_version\":");
    write_unsigned(out, stream_version);
    out.push(b'}');
}

/// [`chain_hash`] from a head written by [`write_canonical_head`]: the same hash, with
/// only the tail written here.
pub fn chain_hash_from_head(
    prev_hash: &str,
    head: &[u8],
    recorded_at: &str,
    schema_version: u32,
    stream_id: &StreamId,
    stream_version: u64,
) -> String {
    let mut tail = Vec::with_capacity(128);
    write_canonical_tail(
        &mut tail,
        recorded_at,
        schema_version,
        stream_id,
        stream_version,
    );
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(head);
    hasher.update(&tail);
    hex::encode(hasher.finalize())
}

/// A UUID as a JSON string, hyphenated lower case (as serde writes it).
fn write_uuid(out: &mut Vec<u8>, id: Uuid) {
    out.push(b'"');
    out.extend_from_slice(
        id.hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.push(b'"');
}

/// The RFC 8785 canonical JSON of an event's metadata: what `serde_json::to_value`
/// then [`crate::jcs::write_value`] produce, written straight from the struct (members
/// in canonical order; every name is ASCII, so byte order is UTF-16 order). The store
/// keeps this text as the event's `metadata`, so an append serializes metadata once.
pub fn canonical_metadata(metadata: &Metadata) -> String {
    use crate::jcs::write_string;
    // Destructured so that a new field fails to compile here until it is written.
    let Metadata {
        tenant,
        actor: Actor { kind, id },
        correlation_id,
        causation_id,
        source,
        occurred_at,
        contains_phi,
    } = metadata;
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"actor\":{\"id\":");
    write_string(&mut out, id);
    out.extend_from_slice(b",\"kind\":\"");
    out.extend_from_slice(kind.as_str().as_bytes());
    out.extend_from_slice(b"\"},\"causation_id\":");
    match causation_id {
        Some(causation) => write_uuid(&mut out, *causation),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"contains_phi\":");
    out.extend_from_slice(if *contains_phi { b"true" } else { b"false" });
    out.extend_from_slice(b",\"correlation_id\":");
    write_uuid(&mut out, *correlation_id);
    out.extend_from_slice(b",\"occurred_at\":\"");
    crate::time::write_rfc3339(&mut out, *occurred_at, SecondsFormat::AutoSi);
    out.extend_from_slice(b"\",\"source\":");
    write_string(&mut out, source);
    out.extend_from_slice(b",\"tenant\":");
    write_string(&mut out, tenant.as_str());
    out.push(b'}');
    String::from_utf8(out).expect("JSON written from UTF-8 strings is UTF-8")
}

/// `SHA-256(prev_hash ‖ canonical bytes)`, hex: the hash an event stored after
/// `prev_hash` must carry.
pub fn chain_hash(prev_hash: &str, input: &HashInput<'_>) -> String {
    let mut head = Vec::with_capacity(512);
    write_canonical_head(
        &mut head,
        input.data,
        input.event_id,
        input.event_type,
        &canonical_metadata(input.metadata),
    );
    chain_hash_from_head(
        prev_hash,
        &head,
        &canonical_time(input.recorded_at),
        input.schema_version,
        input.stream_id,
        input.stream_version,
    )
}

/// Recomputes an envelope's hash from its content and the given predecessor hash.
pub fn recompute(prev_hash: &str, event: &EventEnvelope) -> String {
    chain_hash(
        prev_hash,
        &HashInput {
            event_id: event.event_id,
            stream_id: &event.stream_id,
            stream_version: event.stream_version,
            event_type: &event.event_type,
            schema_version: event.schema_version,
            data: &event.data,
            metadata: &event.metadata,
            recorded_at: event.recorded_at,
        },
    )
}

/// The first place a stream's chain breaks, if any.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainBreak {
    pub stream_id: StreamId,
    pub stream_version: u64,
    pub event_id: Uuid,
    pub reason: String,
}

/// Verifies a stream's events in version order (as stored, before any upcasting).
/// Returns the first event whose link or hash does not match.
pub fn verify_chain<'a>(
    events: impl IntoIterator<Item = &'a EventEnvelope>,
) -> Result<u64, ChainBreak> {
    let mut prev = GENESIS_HASH.to_owned();
    let mut expected_version = 1;
    for event in events {
        let broken = |reason: String| ChainBreak {
            stream_id: event.stream_id.clone(),
            stream_version: event.stream_version,
            event_id: event.event_id,
            reason,
        };
        if event.stream_version != expected_version {
            return Err(broken(format!(
                "version {} where {expected_version} was expected",
                event.stream_version
            )));
        }
        if event.prev_hash != prev {
            return Err(broken(
                "prev_hash does not link to the previous event".into(),
            ));
        }
        let computed = recompute(&prev, event);
        if computed != event.hash {
            return Err(broken(format!(
                "content does not match its hash (stored {}, computed {computed})",
                event.hash
            )));
        }
        prev = computed;
        expected_version += 1;
    }
    Ok(expected_version - 1)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::envelope::{Actor, ActorKind};
    use crate::ids::TenantId;

    /// The implementation every stored chain was hashed with before `crate::jcs`.
    fn reference_bytes(input: &HashInput<'_>) -> Vec<u8> {
        let value = json!({
            "event_id": input.event_id,
            "stream_id": input.stream_id,
            "stream_version": input.stream_version,
            "event_type": input.event_type,
            "schema_version": input.schema_version,
            "data": input.data,
            "metadata": input.metadata,
            "recorded_at": canonical_time(input.recorded_at),
        });
        serde_json_canonicalizer::to_vec(&value).expect("reference canonicalizes")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn canonical_bytes_equal_the_reference_implementation(
            data in crate::jcs::tests::any_json(),
            version in prop_oneof![1u64..1_000_000, (1u64 << 53) - 2..(1u64 << 53) + 3, 1u64..u64::MAX / 2],
            schema in 1u32..50,
            micros in 0i64..4_102_444_800_000_000,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
            phi: bool,
            causation: bool,
            kind in prop::sample::select(ActorKind::ALL.to_vec()),
            actor in "\\PC{0,12}|[\\x00-\\x1f\"\\\\\u{e9}\u{1f600}a]{0,8}",
            source in "[a-z\\-]{1,12}",
        ) {
            let metadata = Metadata {
                tenant: TenantId::parse("clinic-a").unwrap(),
                actor: Actor::new(kind, actor),
                correlation_id: Uuid::from_u128(u128::from(version) << 7),
                causation_id: causation.then(|| Uuid::from_u128(u128::from(schema))),
                source,
                occurred_at: Utc.timestamp_micros(micros).unwrap()
                    + chrono::Duration::nanoseconds(i64::from(nanos)),
                contains_phi: phi,
            };
            // The metadata text the store keeps is its canonical JSON.
            let mut via_value = Vec::new();
            crate::jcs::write_value(&mut via_value, &serde_json::to_value(&metadata).unwrap());
            let text = canonical_metadata(&metadata);
            prop_assert_eq!(text.as_bytes(), &via_value[..]);
            prop_assert_eq!(serde_json::from_str::<Metadata>(&text).unwrap(), metadata.clone());
            let stream = StreamId::parse("encounter-0f3c2a").unwrap();
            let input = HashInput {
                event_id: Uuid::from_u128(u128::from(version) * 31),
                stream_id: &stream,
                stream_version: version,
                event_type: "NoteSigned",
                schema_version: schema,
                data: &data,
                metadata: &metadata,
                recorded_at: Utc.timestamp_micros(micros / 3).unwrap(),
            };
            prop_assert_eq!(canonical_bytes(&input), reference_bytes(&input));
            // The chain hash over the reference bytes; the store's split (a head written
            // by the caller, the tail by the writer) and `chain_hash` must both give it.
            let prev = "ab".repeat(32);
            let expected = hex::encode(
                Sha256::new()
                    .chain_update(prev.as_bytes())
                    .chain_update(reference_bytes(&input))
                    .finalize(),
            );
            let mut head = Vec::new();
            write_canonical_head(&mut head, &data, input.event_id, input.event_type, &text);
            prop_assert_eq!(
                chain_hash_from_head(
                    &prev,
                    &head,
                    &canonical_time(input.recorded_at),
                    schema,
                    &stream,
                    version,
                ),
                expected.clone()
            );
            prop_assert_eq!(chain_hash(&prev, &input), expected);
        }
    }
}
