//! The EHR connector's one integration-test binary: pure mapping checks (FHIR R4
//! validity with an independent model, Bundle snapshots) and the connector against the
//! sandbox EHR over real HTTP (faults, restarts, identity gate, races, dead letters).

mod compliance;
mod connector;
mod mapping;
mod reconcile;
mod rpm;
mod smart;
