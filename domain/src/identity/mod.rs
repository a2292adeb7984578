//! Patient identity matching (being built).
