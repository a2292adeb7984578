//! Durable checkpoints for reactors and the relay, kept as events in the event store
//! itself (stream `checkpoint-<consumer>` of the `system` tenant), the way EventStoreDB
//! keeps persistent-subscription checkpoints. Works unchanged over SQLite, PostgreSQL
//! and the NATS store client, so a reactor needs no second database.
//!
//! A checkpoint may lag what was processed (it is saved every so often); consumers are
//! idempotent, so re-processing after a crash is harmless.

use chartline_proto::{Actor, ActorKind, Metadata, NewEvent, StreamId, TenantId};
use serde_json::json;
use uuid::Uuid;

use crate::store::{Direction, EventStore, ExpectedVersion, StoreError};

/// The tenant that owns system streams (policy, checkpoints).
pub const SYSTEM_TENANT: &str = "system";

pub fn system_tenant() -> TenantId {
    TenantId::parse(SYSTEM_TENANT).expect("static tenant id")
}

/// Category of checkpoint streams; consumers skip it.
pub const CHECKPOINT_CATEGORY: &str = "checkpoint";

#[derive(Clone)]
pub struct Checkpoint<S: EventStore> {
    store: S,
    stream: StreamId,
    consumer: String,
}

impl<S: EventStore> Checkpoint<S> {
    pub fn new(store: S, consumer: &str) -> Self {
        Checkpoint {
            stream: StreamId::parse(&format!("{CHECKPOINT_CATEGORY}-{consumer}"))
                .expect("consumer names are slugs"),
            store,
            consumer: consumer.to_string(),
        }
    }

    /// Last saved position (0 when never saved).
    pub async fn load(&self) -> Result<u64, StoreError> {
        let tenant = system_tenant();
        self.store.ensure_tenant(&tenant).await?;
        let last = self
            .store
            .read_stream(&tenant, &self.stream, u64::MAX, Direction::Backwards, 1)
            .await?;
        Ok(last
            .first()
            .and_then(|e| e.data["position"].as_u64())
            .unwrap_or(0))
    }

    pub async fn save(&self, position: u64) -> Result<(), StoreError> {
        let tenant = system_tenant();
        let event = NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "CheckpointAdvanced".into(),
            schema_version: 1,
            data: json!({ "position": position }),
            metadata: Metadata {
                tenant: tenant.clone(),
                actor: Actor::new(ActorKind::Service, self.consumer.clone()),
                correlation_id: Uuid::now_v7(),
                causation_id: None,
                source: self.consumer.clone(),
                occurred_at: chrono::Utc::now(),
                contains_phi: false,
            },
        };
        self.store
            .append(&tenant, &self.stream, ExpectedVersion::Any, vec![event])
            .await
            .map(|_| ())
    }
}
