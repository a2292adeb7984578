//! Chartline wire and storage contracts.
//!
//! API boundary: everything in this crate is seen by other systems — the event envelope
//! stored and published, command and reply messages, NATS subjects, schema versions and
//! upcasters, JSON Schemas under `proto/schemas/`. Change it deliberately.
//!
//! Architecture invariant: no IO here either; `proto` depends on `domain` only, and
//! owns how domain values look on the wire (the domain does not know about envelopes).

#![forbid(unsafe_code)]

pub mod billing_policy;
pub mod codec;
pub mod commands;
pub mod compliance_map;
pub mod envelope;
pub mod hash;
pub mod ids;
pub mod jcs;
pub mod schemas;
pub mod subjects;
pub mod time;

pub use envelope::{Actor, ActorKind, EventEnvelope, Metadata, NewEvent};
pub use ids::{StreamId, TenantId};
