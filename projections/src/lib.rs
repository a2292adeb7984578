//! Chartline projections: the engine that turns the global event log into read models,
//! and the read models themselves.
//!
//! - [`engine`]: checkpoint + rows in one transaction (exactly-once effect), batches,
//!   lag and throughput, dead letters with a stop/skip policy, blue-green rebuilds.
//! - [`db`]: the read-model database (SQLite or PostgreSQL) and SQL generation.
//! - [`cache`]: typed rows and the per-batch row cache.
//! - [`models`]: `encounter_view`, `ehr_writeback`, `billing_queue`, `rpm_timeseries`,
//!   `identity_review`, `integration_completeness`.
//! - [`bench`]: synthetic events and the rebuild benchmark.
//!
//! Architecture invariant: projections only read the log (through `EventStore`) and
//! only write their own tables; nothing here appends events.

#![forbid(unsafe_code)]

pub mod bench;
pub mod cache;
pub mod db;
pub mod engine;
pub mod error;
pub mod event;
pub mod models;

pub use db::{Cell, ReadDb};
pub use engine::{
    CatchUpReport, DeadLetter, DeadLetterPolicy, Projection, ProjectionFactory, ProjectionRunner,
    ProjectionStatus, RebuildProgress, RebuildReport, RetryOutcome, RunnerConfig, dead_letters,
    status,
};
pub use error::ProjectionError;
pub use event::{Domain, Event};
