//! Scheduling service: books the telehealth visit (a virtual visit type) and reports
//! what happens before the consultation — reschedule, cancel, check-in, no-show.
//! Commands arrive on `chartline.cmd.<tenant>.scheduling.<command>`.

#![forbid(unsafe_code)]

use chartline_domain::encounter::Encounter;
use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::command::{ServiceSpec, serve_commands};

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "scheduling",
    commands: &[
        "schedule",
        "reschedule",
        "cancel",
        "mark_no_show",
        "check_in",
    ],
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
