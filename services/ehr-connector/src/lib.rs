//! EHR connector: turns the encounter lifecycle into FHIR R4 writes to an EHR, so the
//! telehealth visit completes itself in the chart — idempotently, race-safely, retried
//! and with every outcome recorded as an event.
//!
//! - [`fhir`]: pure mapping from recorded history to FHIR R4 resources and Bundles.
//! - [`client`]: the FHIR HTTP client (conditional create, If-Match update, retry
//!   classes, backoff with jitter, circuit breaker).
//! - [`smart`]: SMART Backend Services authorization (client-credentials grant with a
//!   signed JWT assertion, RS384/ES384), token cache and refresh.
//! - [`reactor`]: follows the global log from an event-sourced checkpoint and writes
//!   each artifact that becomes due, gated on patient identity.
//! - [`reconcile`]: reads back what the EHR holds for acknowledged artifacts and
//!   records `EhrDriftDetected` where it differs.
//! - [`sandbox`]: a stand-in FHIR server with SQLite storage and fault injection — a
//!   vendor EHR cannot exist here; see docs/ehr.md.
//!
//! *Architecture Invariant:* the mapping does no IO; the connector holds no state of its
//! own beyond its checkpoint stream, so a restart (or a second instance on another
//! checkpoint name) only repeats idempotent work.

#![forbid(unsafe_code)]

pub mod client;
pub mod commands;
pub mod fhir;
pub mod reactor;
pub mod reconcile;
pub mod rpm_writeback;
pub mod sandbox;
pub mod smart;
pub mod stream_time;

pub use client::{Auth, EhrEndpoint, FhirClient, RetryPolicy, Secret};
pub use reactor::{Connector, Job, JobOutcome, Replay};
pub use sandbox::{SandboxConfig, SandboxEhr};
pub use smart::{SigningAlgorithm, SigningKey, SmartAuth, SmartConfig, SmartError};
