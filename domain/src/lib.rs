//! The pure Chartline model.
//!
//! Every aggregate here follows one shape: a state value, a command enum and an event
//! enum; `decide(&state, &command) -> Result<Vec<Event>, Error>` is a pure function that
//! validates the command against the state and returns the facts it causes, and
//! `apply(&mut state, &event)` folds one fact into the state. IO (loading the stream,
//! appending with an expected version, calling an EHR) happens around these functions,
//! never inside them.
//!
//! Architecture invariant: this crate does no IO and knows nothing of sqlx, tokio,
//! NATS, HTTP or GraphQL. `cargo tree -p chartline-domain -e normal` is checked in CI.

#![forbid(unsafe_code)]

pub mod aggregate;
pub mod billing;
pub mod compliance;
pub mod encounter;
pub mod identity;
pub mod patient;
pub mod rpm;
pub mod testing;

pub use aggregate::Aggregate;
