//! Chartline wire and storage contracts (API boundary).

#![forbid(unsafe_code)]

pub mod billing_policy;
