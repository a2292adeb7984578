//! Patient identity matching: is this registration a patient we already know?
//!
//! Why it exists: a mismatch writes clinical data into the wrong chart, or splits one
//! patient over two charts; both are clinical risks that are hard to detect later.
//! This module is the pure engine the identity service and the `chartline identity`
//! CLI run: normalize ([`normalize`], [`record`]), block and compare ([`compare`]),
//! score with Fellegi–Sunter estimated on the data ([`model`]), and grade the result
//! certain / probable / possible / certainly-not ([`index`]); [`live`] keeps a
//! tenant's index up to date one registration at a time for the identity service. [`synthetic`] makes
//! evaluation data with known truth. No IO, no threads, no clock.
//!
//! Typical use (the identity service):
//!
//! ```
//! use chartline_domain::identity::{MatchIndex, MatchOutcome, PatientRecord};
//! let known = vec![PatientRecord {
//!     record_id: "K1".into(),
//!     given_name: "Margaret".into(),
//!     family_name: "O'Brien".into(),
//!     birth_date: chrono::NaiveDate::from_ymd_opt(1954, 3, 9),
//!     ..PatientRecord::default()
//! }];
//! let index = MatchIndex::build(known).expect("fits the index");
//! let incoming = PatientRecord {
//!     record_id: "intake-7".into(),
//!     given_name: "Peggy".into(),
//!     family_name: "OBRIEN".into(),
//!     birth_date: chrono::NaiveDate::from_ymd_opt(1954, 3, 9),
//!     ..PatientRecord::default()
//! };
//! match index.outcome(&incoming) {
//!     MatchOutcome::Link(candidate) => println!("link to {}", candidate.record_id),
//!     MatchOutcome::Review(candidates) => println!("{} candidates to review", candidates.len()),
//!     MatchOutcome::New => println!("new patient"),
//! }
//! ```

pub mod compare;
pub mod index;
pub mod live;
pub mod model;
pub mod normalize;
pub mod prng;
pub mod record;
pub mod synthetic;

pub use compare::{ComparisonVector, Field};
pub use index::{
    BatchResult, FieldComparison, MatchConfig, MatchIndex, MatchIndexError, MatchOutcome,
    ScoredCandidate, ScoredPair, decide_outcome,
};
pub use live::{LiveMatcher, RefitPolicy};
pub use model::{EmReport, GradeThresholds, MatchModel, ThresholdError};
pub use normalize::NormalizeError;
pub use record::{NormalizedRecord, PatientRecord};
