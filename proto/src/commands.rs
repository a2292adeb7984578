//! Command and reply messages, as they travel over NATS request/reply and through the
//! GraphQL mutations (both use the same command path).
//!
//! API boundary: the JSON Schemas of these messages are generated into `proto/schemas/`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::Actor;
use crate::ids::StreamId;

/// A command as sent by a client: an idempotency key, who sends it, and the payload.
///
/// `command_id` is chosen by the client; re-sending the same id returns the original
/// reply and appends nothing (external telehealth platforms retry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest<T> {
    pub command_id: Uuid,
    pub actor: Actor,
    /// Defaults to `command_id` when the client does not carry one over.
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    pub payload: T,
}

/// Why a command was not applied. Each code tells the client what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    /// Malformed JSON or a body that does not match the schema: fix the request.
    Validation,
    /// The command is well-formed but the aggregate's rules refuse it in its current
    /// state (e.g. signing before the consultation ended): change the command.
    Invariant,
    /// Concurrent writers kept winning after bounded retries: retry later.
    Conflict,
    /// The token/subject tenant may not act on this stream: do not retry.
    UnauthorizedTenant,
    /// Unknown service or command name: fix the subject.
    UnknownCommand,
    /// Store or bus unreachable; nothing was applied: retry with the same command_id.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CommandReply {
    Accepted {
        stream_id: StreamId,
        /// Stream version after the command (unchanged if it caused no events).
        version: u64,
        /// Global position of the last event appended (0 if none).
        global_position: u64,
        event_ids: Vec<Uuid>,
    },
    Rejected {
        code: RejectionCode,
        message: String,
    },
}
