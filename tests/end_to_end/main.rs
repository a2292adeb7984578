//! Cross-service end-to-end tests on the embedded default: every service of
//! `chartline serve` in this process, the in-process bus, a real SQLite file. The same
//! scenario runs distributed (each service its own OS process on NATS + PostgreSQL) in
//! `services/chartline/tests/distributed.rs`, which compares the two event sequences.

mod api;
mod embedded;
mod identity;
mod live;
