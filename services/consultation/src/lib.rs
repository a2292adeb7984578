//! Consultation service: what the video platform reports during the visit — session started,
//! modality changed (video → audio-only fallback and back, with the reason), ended.
//! Commands arrive on `chartline.cmd.<tenant>.consultation.<command>`.

#![forbid(unsafe_code)]

use chartline_domain::encounter::Encounter;
use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::command::{ServiceSpec, serve_commands};

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "consultation",
    commands: &["start_consultation", "change_modality", "end_consultation"],
    target_field: "encounter_id",
};

/// Serves the commands until `shutdown` resolves; drains in-flight commands.
pub async fn run<S: EventStore>(
    bus: Bus,
    store: S,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), BusError> {
    serve_commands::<Encounter, S>(SPEC, bus, store, root, shutdown).await
}
