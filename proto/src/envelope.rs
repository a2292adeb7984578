//! The event envelope: what every stored and published event looks like.
//!
//! API boundary: external consumers read these fields from JetStream and the GraphQL
//! audit API; storage rows map to them one to one. Changing a field is a schema change.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{StreamId, TenantId};

/// Who caused an event. Every PHI access and every write names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    Clinician,
    Staff,
    Service,
    Ai,
    Device,
    System,
}

impl ActorKind {
    pub const ALL: [ActorKind; 6] = [
        ActorKind::Clinician,
        ActorKind::Staff,
        ActorKind::Service,
        ActorKind::Ai,
        ActorKind::Device,
        ActorKind::System,
    ];

    /// The name serde writes (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Clinician => "clinician",
            ActorKind::Staff => "staff",
            ActorKind::Service => "service",
            ActorKind::Ai => "ai",
            ActorKind::Device => "device",
            ActorKind::System => "system",
        }
    }

    /// Whether this actor is a person (a "manual touch" when it does integration work).
    pub fn is_human(self) -> bool {
        matches!(self, ActorKind::Clinician | ActorKind::Staff)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Actor {
    pub kind: ActorKind,
    pub id: String,
}

impl Actor {
    pub fn new(kind: ActorKind, id: impl Into<String>) -> Self {
        Actor {
            kind,
            id: id.into(),
        }
    }

    pub fn system() -> Self {
        Actor::new(ActorKind::System, "chartline")
    }
}

/// Context recorded with every event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Metadata {
    pub tenant: TenantId,
    pub actor: Actor,
    /// Shared by every event caused, directly or not, by one external request.
    pub correlation_id: Uuid,
    /// The command or event that directly caused this event.
    pub causation_id: Option<Uuid>,
    /// The service that appended the event (scheduling, billing, …, or `cli`).
    pub source: String,
    /// When the fact happened at its source (may be earlier than `recorded_at`).
    #[serde(deserialize_with = "crate::time::deserialize_utc")]
    pub occurred_at: DateTime<Utc>,
    pub contains_phi: bool,
}

/// An event to append: everything but the positions and the hash, which the store assigns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NewEvent {
    /// UUIDv7 chosen by the writer; the idempotency key of the append.
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub data: serde_json::Value,
    pub metadata: Metadata,
}

/// A stored event as read back: positions, record time and the hash chain link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub stream_id: StreamId,
    /// 1-based, contiguous within the stream.
    pub stream_version: u64,
    /// 1-based position in the tenant-independent global log; gap-free order of commit.
    pub global_position: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub data: serde_json::Value,
    pub metadata: Metadata,
    // Read back like `metadata.occurred_at` (envelopes arrive as JSON from the store
    // service and JetStream, pages of thousands at a time).
    #[serde(deserialize_with = "crate::time::deserialize_utc")]
    pub recorded_at: DateTime<Utc>,
    /// Hex SHA-256 of the previous event of the stream (64 zeros for version 1).
    pub prev_hash: String,
    /// Hex SHA-256 over `prev_hash` and the canonical bytes of this event.
    pub hash: String,
}

impl EventEnvelope {
    pub fn category(&self) -> &str {
        self.stream_id.category()
    }
}

#[cfg(test)]
mod tests {
    use super::ActorKind;

    #[test]
    fn actor_kind_names_are_the_serde_names() {
        for kind in ActorKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind.as_str().to_owned())
            );
        }
    }
}
