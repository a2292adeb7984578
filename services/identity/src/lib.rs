//! Identity service: patient registration and identity resolution. Nothing reaches an EHR
//! chart while a patient is pending or under review (the encounter write-back gate).
//! Commands on `chartline.cmd.<tenant>.identity.<command>`.

#![forbid(unsafe_code)]

use chartline_domain::patient::Patient;
use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::command::{ServiceSpec, serve_commands};

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "identity",
    commands: &[
        "register",
        "link_identifier",
        "request_match_review",
        "resolve_match",
        "confirm_new_patient",
        "merge",
    ],
    target_field: "patient_id",
};

/// Serves the commands until `shutdown` resolves; drains in-flight commands.
pub async fn run<S: EventStore>(
    bus: Bus,
    store: S,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), BusError> {
    serve_commands::<Patient, S>(SPEC, bus, store, root, shutdown).await
}
