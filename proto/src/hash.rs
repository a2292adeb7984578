//! The per-stream hash chain that lets auditors verify a history was not tampered with.
//!
//! `hash = SHA-256(prev_hash ‖ canonical bytes)` where the canonical bytes are the
//! RFC 8785 (JSON Canonicalization Scheme) serialization of the event's identity and
//! content: event id, stream id, version, type, schema version, data, metadata and
//! record time. The global position is deliberately outside the hash: it is assigned
//! at commit and carries no meaning of its own; the stream version orders the chain.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::envelope::{EventEnvelope, Metadata};
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
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// RFC 8785 canonical bytes of the hashed part of an event.
pub fn canonical_bytes(input: &HashInput<'_>) -> Vec<u8> {
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
    serde_json_canonicalizer::to_vec(&value).expect("a serde_json::Value always canonicalizes")
}

pub fn chain_hash(prev_hash: &str, input: &HashInput<'_>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(canonical_bytes(input));
    hex::encode(hasher.finalize())
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
