//! The composition layer of the `chartline` binary, as a library so end-to-end tests
//! start exactly what `chartline serve` starts: [`serve_cmd`] wires bus, store and
//! services; [`scenario`] drives synthetic encounters through the command path.

#![forbid(unsafe_code)]

pub mod scenario;
pub mod serve_cmd;
