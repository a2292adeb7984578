//! The composition layer of the `chartline` binary, as a library so end-to-end tests
//! start exactly what `chartline serve` starts: [`serve_cmd`] wires bus, store and
//! services; [`scenario`] drives synthetic encounters through the command path;
//! [`compliance_cmd`] prints the compliance map.

#![forbid(unsafe_code)]

pub mod compliance_cmd;
pub mod scenario;
pub mod serve_cmd;
