//! Billing rules (being built).
