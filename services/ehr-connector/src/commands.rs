//! The connector's one command, `retry_write_back`, on
//! `<root>.cmd.<tenant>.ehr.retry_write_back` — the same request/reply path and
//! envelope as every service command, so the GraphQL `retryWriteBack` mutation, `chartline
//! send` and any NATS client can replay a dead write-back after a fix.
//!
//! Payload: `{"encounter_id": UUID, "artifact": "appointment" | "encounter" |
//! "document-reference" | "charge-item" | "task:<uuid>"}`.
//!
//! Idempotent by `command_id`: it is the replay id the connector derives the replay's
//! command ids from, so a re-sent command finds its earlier `WriteBackRequested` and
//! outcome through the command path and records nothing new (the HTTP write it repeats
//! is itself an idempotent upsert). The requester is the actor of the replay's events,
//! so a human's retry counts as a manual touch in `integration_completeness`.
//!
//! Reply: `accepted` (with the stream head) when the replay ran and its outcome —
//! acknowledged, failed or blocked by the compliance map — is recorded on the encounter
//! stream; `rejected` when nothing was recorded: malformed payload, identity not
//! resolved, artifact not due, store unreachable.

use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::command::serve_requests;
use chartline_infra::store::Direction;
use chartline_proto::commands::{CommandReply, CommandRequest, RejectionCode};
use chartline_proto::{StreamId, TenantId};
use serde_json::Value;
use uuid::Uuid;

use crate::fhir::parse_artifact;
use crate::reactor::{Connector, JobOutcome};

/// The service name in command subjects.
pub const SERVICE: &str = "ehr";
pub const RETRY_WRITE_BACK: &str = "retry_write_back";

fn rejected(code: RejectionCode, message: impl Into<String>) -> CommandReply {
    CommandReply::Rejected {
        code,
        message: message.into(),
    }
}

/// Serves `retry_write_back` until `shutdown` resolves (queue group: one instance
/// handles each command; in-flight commands are drained).
pub async fn serve<S: EventStore>(
    bus: Bus,
    connector: Connector<S>,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), BusError> {
    serve_requests(bus, root, SERVICE, shutdown, move |subject, payload| {
        let connector = connector.clone();
        async move { handle(&connector, &subject, &payload).await }
    })
    .await
}

/// Handles one command message (also used directly by tests).
pub async fn handle<S: EventStore>(
    connector: &Connector<S>,
    subject: &str,
    body: &[u8],
) -> CommandReply {
    let tokens: Vec<&str> = subject.split('.').collect();
    let [.., "cmd", tenant, SERVICE, command] = tokens.as_slice() else {
        return rejected(
            RejectionCode::UnknownCommand,
            format!("bad subject {subject}"),
        );
    };
    if *command != RETRY_WRITE_BACK {
        return rejected(
            RejectionCode::UnknownCommand,
            format!("{SERVICE} has no command {command}; it takes [\"{RETRY_WRITE_BACK}\"]"),
        );
    }
    let tenant = match TenantId::parse(tenant) {
        Ok(tenant) => tenant,
        Err(error) => return rejected(RejectionCode::UnauthorizedTenant, error.to_string()),
    };
    let request: CommandRequest<Value> = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(error) => {
            return rejected(
                RejectionCode::Validation,
                format!("malformed command: {error}"),
            );
        }
    };
    let Some(encounter_id) = request.payload["encounter_id"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
    else {
        return rejected(RejectionCode::Validation, "encounter_id must be a UUID");
    };
    let Some(artifact) = request.payload["artifact"]
        .as_str()
        .and_then(parse_artifact)
    else {
        return rejected(
            RejectionCode::Validation,
            "artifact must be appointment, encounter, document-reference, charge-item or task:<uuid>",
        );
    };
    let outcome = connector
        .retry_write_back_as(
            &tenant,
            encounter_id,
            artifact,
            request.command_id,
            request.actor,
        )
        .await;
    match outcome {
        JobOutcome::Acknowledged { .. }
        | JobOutcome::Failed { .. }
        | JobOutcome::Blocked { .. }
        | JobOutcome::UpToDate => {
            let stream = StreamId::for_aggregate("encounter", encounter_id);
            match connector
                .store()
                .read_stream(&tenant, &stream, u64::MAX, Direction::Backwards, 1)
                .await
            {
                Ok(head) => CommandReply::Accepted {
                    version: head.first().map_or(0, |e| e.stream_version),
                    global_position: head.first().map_or(0, |e| e.global_position),
                    stream_id: stream,
                    event_ids: Vec::new(),
                },
                Err(error) => rejected(RejectionCode::Unavailable, error.to_string()),
            }
        }
        JobOutcome::Parked(status) => rejected(
            RejectionCode::Invariant,
            format!("the patient's identity is {status:?}: nothing may reach the chart yet"),
        ),
        JobOutcome::NotDue => rejected(
            RejectionCode::Invariant,
            "the encounter has no such artifact to write",
        ),
        JobOutcome::Error(message) => rejected(RejectionCode::Unavailable, message),
    }
}
