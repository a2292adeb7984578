//! Encounter tests (filled below).
