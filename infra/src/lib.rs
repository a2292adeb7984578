//! Chartline infrastructure: the event store backends (SQLite, PostgreSQL), the store
//! served over NATS and its client, and the catch-up/live subscription.
//!
//! Architecture invariant: no business rules here. Infra moves and stores events; what
//! an event means is decided in `domain`, how it looks on the wire in `proto`.

#![forbid(unsafe_code)]

pub mod bus;
pub mod checkpoint;
pub mod command;
pub mod migrations;
pub mod relay;
pub mod store;

pub use store::{
    AnyStore, AppendResult, Direction, EventStore, ExpectedVersion, RawEvent, ReadScope,
    StoreError, StoreStats, VerifyReport,
};
