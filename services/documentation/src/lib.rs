//! Documentation service: structured SOAP notes drafted by a clinician or an AI scribe,
//! amended, signed by a practitioner (AI drafts become final only then), addenda after
//! signing, follow-up tasks. Commands on `chartline.cmd.<tenant>.documentation.<command>`.

#![forbid(unsafe_code)]

use chartline_domain::encounter::Encounter;
use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::command::{ServiceSpec, serve_commands};

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "documentation",
    commands: &[
        "draft_note",
        "amend_note",
        "sign_note",
        "add_addendum",
        "create_follow_up_task",
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
