//! Billing policy files (being built).
