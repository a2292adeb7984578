//! RPM service: device enrolment, batched readings (LOINC + UCUM), threshold alerts, and
//! clinician management time. Commands on `chartline.cmd.<tenant>.rpm.<command>`.

#![forbid(unsafe_code)]

use chartline_domain::rpm::RpmEnrollment;
use chartline_infra::EventStore;
use chartline_infra::bus::{Bus, BusError};
use chartline_infra::command::{ServiceSpec, serve_commands};

pub const SPEC: ServiceSpec = ServiceSpec {
    name: "rpm",
    commands: &["enroll", "record_readings", "log_management_time"],
    target_field: "enrollment_id",
};

/// Serves the commands until `shutdown` resolves; drains in-flight commands.
pub async fn run<S: EventStore>(
    bus: Bus,
    store: S,
    root: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), BusError> {
    serve_commands::<RpmEnrollment, S>(SPEC, bus, store, root, shutdown).await
}
