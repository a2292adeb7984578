//! The PHI access log: every request that read PHI appends one `PhiAccessed` event per
//! patient to that patient's `access-<uuid>` stream — hash-chained and replayable like
//! every other fact (HIPAA 164.312(b) audit controls; IHE BALP's "who read what").

use std::collections::BTreeMap;

use chartline_infra::EventStore;
use chartline_infra::store::{AnyStore, ExpectedVersion, StoreError};
use chartline_proto::{Actor, ActorKind, Metadata, NewEvent, StreamId};
use uuid::Uuid;

use crate::auth::Claims;

pub fn access_stream(patient: Uuid) -> StreamId {
    StreamId::for_aggregate("access", patient)
}

/// Records the reads of one request.
pub async fn record(
    store: &AnyStore,
    claims: &Claims,
    operation: Option<&str>,
    reads: Vec<(Uuid, String)>,
) -> Result<(), StoreError> {
    let mut by_patient: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
    for (patient, field) in reads {
        let fields = by_patient.entry(patient).or_default();
        if !fields.contains(&field) {
            fields.push(field);
        }
    }
    let correlation = Uuid::now_v7();
    for (patient, fields) in by_patient {
        let event = NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "PhiAccessed".into(),
            schema_version: 1,
            data: serde_json::json!({
                "patient_id": patient,
                "fields": fields,
                "operation": operation,
                "roles": claims.roles,
            }),
            metadata: Metadata {
                tenant: claims.tenant.clone(),
                actor: Actor::new(ActorKind::Staff, claims.sub.clone()),
                correlation_id: correlation,
                causation_id: None,
                source: "api".into(),
                occurred_at: chrono::Utc::now(),
                contains_phi: false,
            },
        };
        store
            .append(
                &claims.tenant,
                &access_stream(patient),
                ExpectedVersion::Any,
                vec![event],
            )
            .await?;
    }
    Ok(())
}
