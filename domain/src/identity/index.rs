//! The match index: known patients normalized once, blocked for sub-quadratic
//! candidate search, and scored with a Fellegi–Sunter model estimated on them.
//!
//! Why it exists: it is the engine behind both the identity service (one registration
//! at a time: [`MatchIndex::match_one`] → [`decide_outcome`]) and bulk work (file
//! linkage and de-duplication: [`MatchIndex::link`], [`MatchIndex::dedupe`]). It is
//! pure: no IO, no threads, no clock; the same inputs and seed give the same output.
//!
//! Decision order for a pair:
//! 1. **Deterministic**: a shared trusted identifier (same MRN from the same assigning
//!    authority) → `Certain`, score 1 — unless the demographics say the opposite
//!    (Fellegi–Sunter below the `possible` threshold), then `Probable` for review.
//! 2. **Probabilistic**: the Fellegi–Sunter probability, graded by thresholds, then the
//!    *certainty guards*: a pair whose given names disagree (anything but exact or
//!    nickname) or whose birth dates disagree beyond a typing error can never be
//!    `Certain`, nor can one without a corroborating contact field (address, postal
//!    code, phone or email). Twins share surname, birth date, address and phone —
//!    everything but the given name —, a parent and child sharing a name differ only
//!    in birth date, namesakes share name and birth date and nothing else; all of them
//!    must go to a human, never be linked automatically.

use std::collections::HashMap;

use serde::Serialize;
use uuid::Uuid;

use super::compare::{ComparisonVector, Field, MISSING, compare_records, level};
use super::model::{EmSettings, GradeThresholds, MatchModel, PatternHistogram};
use super::normalize::soundex;
use super::prng::SplitMix64;
use super::record::{NormalizedRecord, PatientRecord};
use crate::patient::{Identifier, MatchCandidate, MatchGrade};

/// Why an index could not be built (a caller error: split the input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchIndexError {
    #[error("{0} known records exceed the index limit of {max}", max = u32::MAX)]
    TooManyRecords(usize),
}

/// Tunables. The defaults are the ones measured in `docs/identity.md`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MatchConfig {
    pub thresholds: GradeThresholds,
    /// Blocks larger than this are not searched (a placeholder value shared by
    /// thousands of records says nothing and would make matching quadratic).
    pub max_block_size: usize,
    /// Random pairs compared to estimate `u`.
    pub u_sample_pairs: usize,
    /// Known records whose candidate pairs train `m` by EM at build time.
    pub em_sample_records: usize,
    pub em: EmSettings,
    /// Below this many known records name frequencies are noise: no adjustment.
    pub term_frequency_min_records: usize,
    /// Bound on the term-frequency adjustment, in bits.
    pub term_frequency_max_bits: f64,
    /// Share of incoming registrations expected to be already-known patients; with the
    /// number of known records it sets the prior λ used by `match_one`.
    pub incoming_match_rate: f64,
    pub seed: u64,
}

impl Default for MatchConfig {
    fn default() -> Self {
        MatchConfig {
            thresholds: GradeThresholds::default(),
            max_block_size: 2_000,
            u_sample_pairs: 200_000,
            em_sample_records: 5_000,
            em: EmSettings::default(),
            term_frequency_min_records: 200,
            term_frequency_max_bits: 6.0,
            incoming_match_rate: 0.5,
            seed: 0x1D_E117,
        }
    }
}

/// One field's part in a score, for reviewers and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldComparison {
    pub field: Field,
    /// The level name, or `"missing"`.
    pub level: &'static str,
    /// `log2(m/u)`, term-frequency adjustment included; 0 when missing.
    pub weight: f64,
}

/// A known record scored against an incoming one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoredCandidate {
    /// Position of the known record in the index (stable for the index's lifetime).
    pub record_index: usize,
    pub record_id: String,
    /// Match probability in [0, 1].
    pub score: f64,
    pub grade: MatchGrade,
    /// Sum of the field weights (bits of evidence, before the prior).
    pub total_weight: f64,
    /// Linked by a shared trusted identifier rather than by weights.
    pub deterministic: bool,
    pub trace: Vec<FieldComparison>,
}

impl ScoredCandidate {
    /// The form the `Patient` aggregate records in a review request.
    pub fn to_match_candidate(
        &self,
        candidate_patient_id: Option<Uuid>,
        identifier: Option<Identifier>,
    ) -> MatchCandidate {
        MatchCandidate {
            candidate_patient_id,
            identifier,
            score: self.score,
            grade: self.grade,
        }
    }
}

/// Highest score first; equal scores by record id, so the order does not depend on
/// where a record sits in the index (insertion order vs. a rebuild's order).
fn best_first(left: &ScoredCandidate, right: &ScoredCandidate) -> std::cmp::Ordering {
    right
        .score
        .total_cmp(&left.score)
        .then_with(|| left.record_id.cmp(&right.record_id))
}

/// What to do with an incoming registration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum MatchOutcome {
    /// Exactly one certain candidate, and nothing scored above it: link to it.
    Link(ScoredCandidate),
    /// Probable/possible candidates, or several certain ones: a human decides.
    Review(Vec<ScoredCandidate>),
    /// Nothing at possible or above: a new patient.
    New,
}

/// Maps scored candidates to an outcome. Two "certain" candidates are a conflict (the
/// known set itself has a duplicate): never pick one silently, send both to review.
pub fn decide_outcome(mut candidates: Vec<ScoredCandidate>) -> MatchOutcome {
    candidates.retain(|candidate| candidate.grade != MatchGrade::CertainlyNot);
    candidates.sort_by(best_first);
    let certain = candidates
        .iter()
        .filter(|candidate| candidate.grade == MatchGrade::Certain)
        .count();
    match (certain, candidates.is_empty()) {
        (_, true) => MatchOutcome::New,
        // Link only when the one certain candidate is also the best-scored: a higher-
        // scored candidate that the twin/namesake guards held below certain means the
        // evidence points two ways, and a human must pick the chart.
        (1, false) if candidates[0].grade == MatchGrade::Certain => {
            MatchOutcome::Link(candidates.swap_remove(0))
        }
        _ => MatchOutcome::Review(candidates),
    }
}

/// A compared pair in a batch (`left` indexes the batch's incoming records, or the
/// index's records for de-duplication; `right` always indexes the index).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoredPair {
    pub left: u32,
    pub right: u32,
    pub score: f64,
    pub grade: MatchGrade,
    pub deterministic: bool,
}

#[derive(Debug, Clone)]
pub struct BatchResult {
    /// Every compared pair, certainly-not included, in left/right order.
    pub pairs: Vec<ScoredPair>,
    pub pairs_compared: u64,
    /// The model the pairs were scored with.
    pub model: MatchModel,
}

/// Blocking rules: a pair is compared when it shares at least one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockingRule {
    BirthDate = 1,
    FamilySoundexBirthYear = 2,
    Phone = 3,
    Email = 4,
    PostalCodeGivenInitial = 5,
    Identifier = 6,
}

/// FNV-1a over a rule tag and the key parts (deterministic across runs and platforms,
/// unlike `std`'s randomly seeded hasher).
fn blocking_hash(rule: BlockingRule, parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    };
    feed(rule as u8);
    for part in parts {
        part.iter().copied().for_each(&mut feed);
        feed(0xff);
    }
    hash
}

fn blocking_keys(record: &NormalizedRecord, mut emit: impl FnMut(u64)) {
    use chrono::Datelike;
    if let Some(birth_date) = record.birth_date {
        let days = birth_date.num_days_from_ce().to_le_bytes();
        emit(blocking_hash(BlockingRule::BirthDate, &[&days]));
        let surname_code = record
            .family_parts()
            .find(|part| part.len() >= 2)
            .and_then(soundex);
        if let Some(code) = surname_code {
            let year = birth_date.year().to_le_bytes();
            emit(blocking_hash(
                BlockingRule::FamilySoundexBirthYear,
                &[code.as_bytes(), &year],
            ));
        }
    }
    if let Some(phone) = &record.phone {
        emit(blocking_hash(BlockingRule::Phone, &[phone.as_bytes()]));
    }
    if let Some(email) = &record.email {
        emit(blocking_hash(BlockingRule::Email, &[email.as_bytes()]));
    }
    if let (Some(postal_code), Some(initial)) = (
        &record.postal_code,
        record.given_canonical().as_bytes().first(),
    ) {
        emit(blocking_hash(
            BlockingRule::PostalCodeGivenInitial,
            &[postal_code.as_bytes(), &[*initial]],
        ));
    }
    for identifier in record.identifiers.iter() {
        emit(blocking_hash(
            BlockingRule::Identifier,
            &[identifier.system.as_bytes(), identifier.value.as_bytes()],
        ));
    }
}

fn shares_identifier(left: &NormalizedRecord, right: &NormalizedRecord) -> bool {
    left.identifiers
        .iter()
        .any(|identifier| right.identifiers.contains(identifier))
}

struct PairScore {
    total_weight: f64,
    probability: f64,
    grade: MatchGrade,
    deterministic: bool,
}

/// The positions of `key` in a slice of blocking keys sorted by (key, record).
fn key_run(keys: &[u64], key: u64) -> std::ops::Range<usize> {
    let start = keys.partition_point(|candidate| *candidate < key);
    let length = keys[start..].partition_point(|candidate| *candidate == key);
    start..start + length
}

/// A record's blocking keys, each once.
fn distinct_blocking_keys(record: &NormalizedRecord) -> Vec<u64> {
    let mut keys = Vec::with_capacity(6);
    blocking_keys(record, |key| keys.push(key));
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The known patients, their blocking index and the model.
///
/// Built in bulk ([`MatchIndex::build_with`]) or kept up to date one record at a time
/// ([`MatchIndex::insert`], [`MatchIndex::replace`], [`MatchIndex::remove`]): the
/// identity service adds each registration instead of rebuilding. After any sequence
/// of changes the index answers exactly as one built from scratch from its live
/// records with the same model ([`MatchIndex::with_model`]): same candidates, same
/// blocks skipped as too large, same term frequencies, same λ. Only
/// [`ScoredCandidate::record_index`] differs (positions are insertion order).
#[derive(Debug, Clone)]
pub struct MatchIndex {
    /// Every record ever inserted; a removed one keeps its slot (positions are stable)
    /// but has no blocking entries and no frequency counts.
    records: Vec<NormalizedRecord>,
    removed: Vec<bool>,
    live_records: usize,
    /// Blocking keys sorted by (key, record) and, at the same positions, the record
    /// they came from: a large base merged rarely ...
    block_keys: Vec<u64>,
    block_records: Vec<u32>,
    /// ... and the recent insertions, kept sorted, merged into the base when they
    /// reach a sixteenth of it (an insertion then moves a small vector, not millions
    /// of entries).
    recent_keys: Vec<u64>,
    recent_records: Vec<u32>,
    given_frequencies: HashMap<Box<str>, u32>,
    family_frequencies: HashMap<Box<str>, u32>,
    /// `m` from EM at build time, `u` from random known pairs, λ from
    /// `incoming_match_rate` and the number of live records (updated on every change).
    model: MatchModel,
    config: MatchConfig,
}

impl MatchIndex {
    pub fn build(known: Vec<PatientRecord>) -> Result<Self, MatchIndexError> {
        Self::build_with(known, MatchConfig::default())
    }

    /// Normalizes the records as they arrive (a caller can stream a million records
    /// without holding the raw and normalized forms together), then indexes and
    /// estimates the model.
    pub fn build_with(
        known: impl IntoIterator<Item = PatientRecord>,
        config: MatchConfig,
    ) -> Result<Self, MatchIndexError> {
        let records: Vec<NormalizedRecord> =
            known.into_iter().map(|record| record.normalize()).collect();
        Self::from_normalized(records, config)
    }

    pub fn from_normalized(
        records: Vec<NormalizedRecord>,
        config: MatchConfig,
    ) -> Result<Self, MatchIndexError> {
        if u32::try_from(records.len()).is_err() {
            return Err(MatchIndexError::TooManyRecords(records.len()));
        }
        let mut given_frequencies: HashMap<Box<str>, u32> = HashMap::new();
        let mut family_frequencies: HashMap<Box<str>, u32> = HashMap::new();
        let mut entries: Vec<(u64, u32)> = Vec::with_capacity(records.len() * 5);
        for (position, record) in records.iter().enumerate() {
            if !record.given.is_empty() {
                *given_frequencies.entry(record.given.clone()).or_insert(0) += 1;
            }
            if !record.family.is_empty() {
                *family_frequencies.entry(record.family.clone()).or_insert(0) += 1;
            }
            blocking_keys(record, |key| entries.push((key, position as u32)));
        }
        entries.sort_unstable();
        entries.dedup();
        let (block_keys, block_records) = entries.into_iter().unzip();
        let count = records.len();
        let mut index = MatchIndex {
            removed: vec![false; count],
            live_records: count,
            records,
            block_keys,
            block_records,
            recent_keys: Vec::new(),
            recent_records: Vec::new(),
            given_frequencies,
            family_frequencies,
            model: MatchModel::starting_priors(),
            config,
        };
        index.estimate_model();
        Ok(index)
    }

    /// An index over `records` scored with a model estimated elsewhere (its λ is set
    /// from `incoming_match_rate` and the number of records). No estimation: this is
    /// the from-scratch counterpart of an index kept up to date by `insert`/`remove`.
    pub fn with_model(
        records: Vec<NormalizedRecord>,
        model: MatchModel,
        config: MatchConfig,
    ) -> Result<Self, MatchIndexError> {
        let mut index = MatchIndex::empty(config);
        for record in records {
            index.insert(record)?;
        }
        index.merge_recent();
        index.set_model(model);
        Ok(index)
    }

    /// No records, starting-prior model.
    pub fn empty(config: MatchConfig) -> Self {
        let mut index = MatchIndex {
            records: Vec::new(),
            removed: Vec::new(),
            live_records: 0,
            block_keys: Vec::new(),
            block_records: Vec::new(),
            recent_keys: Vec::new(),
            recent_records: Vec::new(),
            given_frequencies: HashMap::new(),
            family_frequencies: HashMap::new(),
            model: MatchModel::starting_priors(),
            config,
        };
        index.refresh_prior();
        index
    }

    /// Replaces the model (`m`, `u`); λ is set from this index's live record count.
    pub fn set_model(&mut self, model: MatchModel) {
        self.model = model;
        self.refresh_prior();
    }

    /// λ = `incoming_match_rate` ÷ live records, as `estimate_model` sets it.
    fn refresh_prior(&mut self) {
        self.model.set_prior_probability(
            self.config.incoming_match_rate / self.live_records.max(1) as f64,
        );
    }

    /// Adds a known record; returns its position. O(keys × recent insertions), plus
    /// an O(n) merge every n/16 insertions.
    pub fn insert(&mut self, record: NormalizedRecord) -> Result<usize, MatchIndexError> {
        let position = self.records.len();
        if u32::try_from(position + 1).is_err() {
            return Err(MatchIndexError::TooManyRecords(position + 1));
        }
        self.records.push(record);
        self.removed.push(false);
        self.attach(position);
        self.live_records += 1;
        self.refresh_prior();
        Ok(position)
    }

    /// Replaces the record at `position` (new identifiers, new demographics) in place.
    /// A removed position becomes live again.
    pub fn replace(&mut self, position: usize, record: NormalizedRecord) {
        if self.removed[position] {
            self.removed[position] = false;
            self.live_records += 1;
            self.refresh_prior();
        } else {
            self.detach(position);
        }
        self.records[position] = record;
        self.attach(position);
    }

    /// Takes the record at `position` out of matching (a merged chart). Its slot stays.
    pub fn remove(&mut self, position: usize) {
        if self.removed[position] {
            return;
        }
        self.detach(position);
        self.removed[position] = true;
        self.live_records -= 1;
        self.refresh_prior();
    }

    pub fn is_removed(&self, position: usize) -> bool {
        self.removed[position]
    }

    /// The live records (not removed), in position order.
    pub fn live_records(&self) -> impl Iterator<Item = &NormalizedRecord> {
        self.records
            .iter()
            .zip(&self.removed)
            .filter(|(_, removed)| !**removed)
            .map(|(record, _)| record)
    }

    /// Counts the record's names and files its blocking keys.
    fn attach(&mut self, position: usize) {
        let record = &self.records[position];
        if !record.given.is_empty() {
            *self
                .given_frequencies
                .entry(record.given.clone())
                .or_insert(0) += 1;
        }
        if !record.family.is_empty() {
            *self
                .family_frequencies
                .entry(record.family.clone())
                .or_insert(0) += 1;
        }
        let entry_record = position as u32;
        for key in distinct_blocking_keys(record) {
            let at = self
                .recent_keys
                .partition_point(|candidate| *candidate < key)
                + key_run(&self.recent_keys, key)
                    .map(|slot| self.recent_records[slot])
                    .take_while(|other| *other < entry_record)
                    .count();
            self.recent_keys.insert(at, key);
            self.recent_records.insert(at, entry_record);
        }
        if self.recent_keys.len() > 4_096.max(self.block_keys.len() / 16) {
            self.merge_recent();
        }
    }

    /// The reverse of `attach`.
    fn detach(&mut self, position: usize) {
        let record = &self.records[position];
        for (frequencies, value) in [
            (&mut self.given_frequencies, &record.given),
            (&mut self.family_frequencies, &record.family),
        ] {
            if value.is_empty() {
                continue;
            }
            if let Some(count) = frequencies.get_mut(value) {
                *count -= 1;
                if *count == 0 {
                    frequencies.remove(value);
                }
            }
        }
        let entry_record = position as u32;
        for key in distinct_blocking_keys(record) {
            for (keys, records) in [
                (&mut self.block_keys, &mut self.block_records),
                (&mut self.recent_keys, &mut self.recent_records),
            ] {
                let run = key_run(keys, key);
                if let Some(offset) = records[run.clone()]
                    .iter()
                    .position(|other| *other == entry_record)
                {
                    keys.remove(run.start + offset);
                    records.remove(run.start + offset);
                }
            }
        }
    }

    /// Merges the recent insertions into the sorted base.
    fn merge_recent(&mut self) {
        if self.recent_keys.is_empty() {
            return;
        }
        let total = self.block_keys.len() + self.recent_keys.len();
        let mut keys = Vec::with_capacity(total);
        let mut records = Vec::with_capacity(total);
        let (mut base, mut recent) = (0, 0);
        while base < self.block_keys.len() || recent < self.recent_keys.len() {
            let take_base = recent == self.recent_keys.len()
                || (base < self.block_keys.len()
                    && (self.block_keys[base], self.block_records[base])
                        <= (self.recent_keys[recent], self.recent_records[recent]));
            if take_base {
                keys.push(self.block_keys[base]);
                records.push(self.block_records[base]);
                base += 1;
            } else {
                keys.push(self.recent_keys[recent]);
                records.push(self.recent_records[recent]);
                recent += 1;
            }
        }
        self.block_keys = keys;
        self.block_records = records;
        self.recent_keys.clear();
        self.recent_records.clear();
    }

    /// `u` from random pairs, then `m` by EM on the candidate pairs of a sample of the
    /// known records against all of them. Only at construction (no removed records).
    fn estimate_model(&mut self) {
        let count = self.records.len();
        let mut rng = SplitMix64::new(self.config.seed);
        let mut random_pairs = PatternHistogram::default();
        let all_pairs = count.saturating_mul(count.saturating_sub(1)) / 2;
        if all_pairs <= self.config.u_sample_pairs {
            for left in 0..count {
                for right in left + 1..count {
                    random_pairs.add(compare_records(&self.records[left], &self.records[right]));
                }
            }
        } else {
            for _ in 0..self.config.u_sample_pairs {
                let left = rng.index(count);
                let mut right = rng.index(count - 1);
                if right >= left {
                    right += 1;
                }
                random_pairs.add(compare_records(&self.records[left], &self.records[right]));
            }
        }
        let with_u = MatchModel::starting_priors().with_u_from_random_pairs(&random_pairs);

        let mut candidate_pairs: Vec<ComparisonVector> = Vec::new();
        let mut candidates = Vec::new();
        let sample = self.config.em_sample_records.min(count);
        for step in 0..sample {
            let left = step * count / sample;
            self.candidates_into(&self.records[left], &mut candidates);
            for &right in &candidates {
                let right = right as usize;
                // Whole set: each unordered pair once. Sample: every other record.
                if (sample == count && right > left) || (sample < count && right != left) {
                    candidate_pairs
                        .push(compare_records(&self.records[left], &self.records[right]));
                }
            }
        }
        let (mut model, _) = with_u.with_m_from_em_sessions(&candidate_pairs, &self.config.em);
        model.set_prior_probability(self.config.incoming_match_rate / count.max(1) as f64);
        self.model = model;
    }

    /// The model `match_one` scores with.
    pub fn model(&self) -> &MatchModel {
        &self.model
    }

    pub fn config(&self) -> &MatchConfig {
        &self.config
    }

    /// Live records (removed ones do not count).
    pub fn len(&self) -> usize {
        self.live_records
    }

    pub fn is_empty(&self) -> bool {
        self.live_records == 0
    }

    pub fn record(&self, index: usize) -> &NormalizedRecord {
        &self.records[index]
    }

    /// Known records sharing a blocking key with `record`, ascending, without repeats.
    fn candidates_into(&self, record: &NormalizedRecord, out: &mut Vec<u32>) {
        out.clear();
        blocking_keys(record, |key| {
            let base = key_run(&self.block_keys, key);
            let recent = key_run(&self.recent_keys, key);
            if base.len() + recent.len() <= self.config.max_block_size {
                out.extend_from_slice(&self.block_records[base]);
                out.extend_from_slice(&self.recent_records[recent]);
            }
        });
        out.sort_unstable();
        out.dedup();
    }

    fn term_frequency_adjustment(
        &self,
        model: &MatchModel,
        field: Field,
        frequencies: &HashMap<Box<str>, u32>,
        value: &str,
    ) -> f64 {
        let count = self.live_records;
        if count < self.config.term_frequency_min_records {
            return 0.0;
        }
        let occurrences = frequencies.get(value).copied().unwrap_or(1).max(1);
        let frequency = f64::from(occurrences) / count as f64;
        let average_agreement = model.field(field).u[0];
        let bound = self.config.term_frequency_max_bits;
        (average_agreement / frequency).log2().clamp(-bound, bound)
    }

    /// Per-field weights of a pair under `model`, with the term-frequency adjustment
    /// on exact name agreement (a shared rare surname is stronger evidence than a
    /// shared "Smith").
    fn field_weights(
        &self,
        model: &MatchModel,
        left: &NormalizedRecord,
        vector: &ComparisonVector,
    ) -> [f64; super::compare::FIELD_COUNT] {
        let mut weights = [0.0; super::compare::FIELD_COUNT];
        for field in Field::ALL {
            let level = vector[field.index()];
            let mut weight = model.weight(field, level);
            if field == Field::GivenName && level == level::GIVEN_EXACT {
                weight += self.term_frequency_adjustment(
                    model,
                    field,
                    &self.given_frequencies,
                    &left.given,
                );
            }
            if field == Field::FamilyName && level == level::FAMILY_EXACT {
                weight += self.term_frequency_adjustment(
                    model,
                    field,
                    &self.family_frequencies,
                    &left.family,
                );
            }
            weights[field.index()] = weight;
        }
        weights
    }

    fn score_pair(
        &self,
        model: &MatchModel,
        left: &NormalizedRecord,
        right: &NormalizedRecord,
        vector: &ComparisonVector,
    ) -> PairScore {
        let total_weight: f64 = self.field_weights(model, left, vector).iter().sum();
        let probability = model.probability(total_weight);
        let thresholds = &self.config.thresholds;
        if shares_identifier(left, right) {
            let (probability, grade) = if probability >= thresholds.possible() {
                (1.0, MatchGrade::Certain)
            } else {
                (probability, MatchGrade::Probable)
            };
            return PairScore {
                total_weight,
                probability,
                grade,
                deterministic: true,
            };
        }
        let mut grade = thresholds.grade(probability);
        if grade == MatchGrade::Certain && !passes_certainty_guards(vector) {
            grade = MatchGrade::Probable;
        }
        PairScore {
            total_weight,
            probability,
            grade,
            deterministic: false,
        }
    }

    /// Scores one incoming record against the known patients: candidates graded
    /// possible or better, best first, each with its field trace.
    pub fn match_one(&self, incoming: &PatientRecord) -> Vec<ScoredCandidate> {
        self.match_normalized(&incoming.normalize())
    }

    pub fn match_normalized(&self, incoming: &NormalizedRecord) -> Vec<ScoredCandidate> {
        let mut candidates = Vec::new();
        self.candidates_into(incoming, &mut candidates);
        let mut scored: Vec<ScoredCandidate> = candidates
            .into_iter()
            .filter_map(|right| {
                let known = &self.records[right as usize];
                let vector = compare_records(incoming, known);
                let score = self.score_pair(&self.model, incoming, known, &vector);
                (score.grade != MatchGrade::CertainlyNot).then(|| {
                    let weights = self.field_weights(&self.model, incoming, &vector);
                    ScoredCandidate {
                        record_index: right as usize,
                        record_id: known.record_id.to_string(),
                        score: score.probability,
                        grade: score.grade,
                        total_weight: score.total_weight,
                        deterministic: score.deterministic,
                        trace: trace(&vector, &weights),
                    }
                })
            })
            .collect();
        scored.sort_by(best_first);
        scored
    }

    /// Decides what to do with one incoming registration.
    pub fn outcome(&self, incoming: &PatientRecord) -> MatchOutcome {
        decide_outcome(self.match_one(incoming))
    }

    /// Links a batch of incoming records to the known ones. With `reestimate`, `m` is
    /// re-fitted by EM on this batch's candidate pairs and λ becomes the estimated
    /// number of matches over all incoming × known pairs.
    pub fn link(&self, incoming: &[PatientRecord], reestimate: bool) -> BatchResult {
        let normalized: Vec<NormalizedRecord> =
            incoming.iter().map(PatientRecord::normalize).collect();
        let mut compared: Vec<(u32, u32, ComparisonVector)> = Vec::new();
        let mut candidates = Vec::new();
        for (left, record) in normalized.iter().enumerate() {
            self.candidates_into(record, &mut candidates);
            for &right in &candidates {
                let vector = compare_records(record, &self.records[right as usize]);
                compared.push((left as u32, right, vector));
            }
        }
        let all_pairs = normalized.len() as f64 * self.live_records as f64;
        let model = self.batch_model(&compared, reestimate, all_pairs);
        let pairs = compared
            .iter()
            .map(|(left, right, vector)| {
                let score = self.score_pair(
                    &model,
                    &normalized[*left as usize],
                    &self.records[*right as usize],
                    vector,
                );
                scored_pair(*left, *right, &score)
            })
            .collect();
        BatchResult {
            pairs,
            pairs_compared: compared.len() as u64,
            model,
        }
    }

    /// Finds duplicates among the known records themselves (each pair once,
    /// `left < right`).
    pub fn dedupe(&self, reestimate: bool) -> BatchResult {
        let mut compared: Vec<(u32, u32, ComparisonVector)> = Vec::new();
        let mut candidates = Vec::new();
        for (left, record) in self.records.iter().enumerate() {
            if self.removed[left] {
                continue;
            }
            self.candidates_into(record, &mut candidates);
            for &right in candidates.iter().filter(|right| **right as usize > left) {
                let vector = compare_records(record, &self.records[right as usize]);
                compared.push((left as u32, right, vector));
            }
        }
        let count = self.live_records as f64;
        let model = self.batch_model(&compared, reestimate, count * (count - 1.0) / 2.0);
        let pairs = compared
            .iter()
            .map(|(left, right, vector)| {
                let score = self.score_pair(
                    &model,
                    &self.records[*left as usize],
                    &self.records[*right as usize],
                    vector,
                );
                scored_pair(*left, *right, &score)
            })
            .collect();
        BatchResult {
            pairs,
            pairs_compared: compared.len() as u64,
            model,
        }
    }

    fn batch_model(
        &self,
        compared: &[(u32, u32, ComparisonVector)],
        reestimate: bool,
        all_pairs: f64,
    ) -> MatchModel {
        if !reestimate || compared.is_empty() {
            return self.model.clone();
        }
        let vectors: Vec<ComparisonVector> =
            compared.iter().map(|(_, _, vector)| *vector).collect();
        let (mut model, report) = self
            .model
            .with_m_from_em_sessions(&vectors, &self.config.em);
        model.set_prior_probability(report.expected_matches.max(1.0) / all_pairs.max(1.0));
        model
    }
}

fn scored_pair(left: u32, right: u32, score: &PairScore) -> ScoredPair {
    ScoredPair {
        left,
        right,
        score: score.probability,
        grade: score.grade,
        deterministic: score.deterministic,
    }
}

/// The certainty guards (see the module doc): `Certain` needs agreeing given names
/// (exact or nickname), birth dates equal up to a typing error, and at least one
/// corroborating contact field (same address or postal code, same or nearly the same
/// phone or email) — name and birth date alone are shared by namesakes.
pub fn passes_certainty_guards(vector: &ComparisonVector) -> bool {
    let given = vector[Field::GivenName.index()];
    let birth_date = vector[Field::BirthDate.index()];
    let corroborated = matches!(vector[Field::Household.index()], 0..=3)
        || matches!(vector[Field::Email.index()], 0 | 1);
    matches!(given, level::GIVEN_EXACT | level::GIVEN_NICKNAME)
        && matches!(
            birth_date,
            level::DATE_EXACT | level::DATE_SWAPPED | level::DATE_TYPO
        )
        && corroborated
}

fn trace(vector: &ComparisonVector, weights: &[f64]) -> Vec<FieldComparison> {
    Field::ALL
        .iter()
        .map(|field| {
            let level = vector[field.index()];
            FieldComparison {
                field: *field,
                level: if level == MISSING {
                    "missing"
                } else {
                    field.level_names()[usize::from(level)]
                },
                weight: weights[field.index()],
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::synthetic::{Population, clean_record};
    use crate::patient::Sex;
    use chrono::NaiveDate;

    /// A realistic known set (so that u and term frequencies mean something) plus the
    /// hand-written records under test.
    fn index_with(extra: Vec<PatientRecord>) -> MatchIndex {
        let mut known: Vec<PatientRecord> = Population::new(99)
            .people(3_000)
            .iter()
            .enumerate()
            .map(|(position, person)| clean_record(person, format!("P{position}")))
            .collect();
        known.extend(extra);
        let config = MatchConfig {
            u_sample_pairs: 30_000,
            ..MatchConfig::default()
        };
        MatchIndex::build_with(known, config).unwrap()
    }

    fn margaret() -> PatientRecord {
        PatientRecord {
            record_id: "margaret".into(),
            given_name: "Margaret".into(),
            family_name: "Okonkwo-Reyes".into(),
            birth_date: NaiveDate::from_ymd_opt(1961, 7, 4),
            sex: Some(Sex::Female),
            address_line: Some("4410 Willow Lane Apt 2".into()),
            city: Some("Omaha".into()),
            state: Some("NE".into()),
            postal_code: Some("68104".into()),
            phone: Some("402-555-0147".into()),
            email: Some("m.okonkwo@example.org".into()),
            identifiers: vec![Identifier {
                system: "urn:ehr".into(),
                value: "MRN-1".into(),
            }],
        }
    }

    fn twin_of_margaret() -> PatientRecord {
        PatientRecord {
            record_id: "twin".into(),
            given_name: "Daniel".into(),
            sex: Some(Sex::Male),
            email: Some("dan.okonkwo@example.org".into()),
            identifiers: vec![Identifier {
                system: "urn:ehr".into(),
                value: "MRN-2".into(),
            }],
            ..margaret()
        }
    }

    fn find<'a>(candidates: &'a [ScoredCandidate], id: &str) -> Option<&'a ScoredCandidate> {
        candidates
            .iter()
            .find(|candidate| candidate.record_id == id)
    }

    #[test]
    fn a_reformatted_record_with_a_nickname_links_certainly() {
        let index = index_with(vec![margaret(), twin_of_margaret()]);
        let intake = PatientRecord {
            record_id: "intake".into(),
            given_name: "PEGGY".into(),
            family_name: "okonkwo reyes".into(),
            address_line: Some("4410 WILLOW LN #2".into()),
            phone: Some("(402) 555 0147".into()),
            email: None,
            identifiers: vec![],
            ..margaret()
        };
        let candidates = index.match_one(&intake);
        let best = &candidates[0];
        assert_eq!(best.record_id, "margaret");
        assert_eq!(best.grade, MatchGrade::Certain);
        assert!(!best.deterministic);
        assert!(best.score > 0.999, "{best:?}");
        let levels: Vec<(&str, &str)> = best
            .trace
            .iter()
            .map(|comparison| (comparison.field.name(), comparison.level))
            .collect();
        assert_eq!(
            levels,
            [
                ("given_name", "nickname"),
                ("family_name", "exact"),
                ("birth_date", "exact"),
                ("sex", "agree"),
                ("household", "same_address_and_phone"),
                ("email", "missing"),
            ]
        );
        assert_eq!(best.trace[5].weight, 0.0);
        // The twin brother is a candidate, but never certain.
        let twin = find(&candidates, "twin").expect("twin is compared");
        assert_ne!(twin.grade, MatchGrade::Certain);
        match decide_outcome(candidates) {
            MatchOutcome::Link(candidate) => assert_eq!(candidate.record_id, "margaret"),
            other => panic!("expected a link, got {other:?}"),
        }
    }

    #[test]
    fn a_twin_is_never_linked_even_with_everything_else_shared() {
        let index = index_with(vec![margaret()]);
        let mut intake = twin_of_margaret();
        intake.email = None;
        intake.identifiers.clear();
        let candidates = index.match_one(&intake);
        let margaret = find(&candidates, "margaret").expect("compared");
        assert_eq!(margaret.grade, MatchGrade::Probable);
        assert!(matches!(index.outcome(&intake), MatchOutcome::Review(_)));
    }

    #[test]
    fn a_shared_mrn_is_deterministic_unless_demographics_contradict_it() {
        let index = index_with(vec![margaret()]);
        let sparse = PatientRecord {
            record_id: "intake".into(),
            given_name: "Margaret".into(),
            family_name: "Okonkwo-Reyes".into(),
            birth_date: NaiveDate::from_ymd_opt(1961, 7, 4),
            identifiers: vec![Identifier {
                system: " urn:ehr".into(),
                value: "mrn-1".into(),
            }],
            ..PatientRecord::default()
        };
        let best = &index.match_one(&sparse)[0];
        assert_eq!(
            (best.record_id.as_str(), best.grade, best.score),
            ("margaret", MatchGrade::Certain, 1.0)
        );
        assert!(best.deterministic);

        // Same MRN, but another person entirely: a data-entry error, sent to review.
        let contradicting = PatientRecord {
            record_id: "intake".into(),
            given_name: "Bartholomew".into(),
            family_name: "Zimmerman".into(),
            birth_date: NaiveDate::from_ymd_opt(2011, 1, 30),
            sex: Some(Sex::Male),
            identifiers: sparse.identifiers.clone(),
            ..PatientRecord::default()
        };
        let best = &index.match_one(&contradicting)[0];
        assert_eq!(best.grade, MatchGrade::Probable);
        assert!(best.deterministic && best.score < 0.3, "{best:?}");

        // Same MRN value from another assigning authority means nothing.
        let other_system = PatientRecord {
            identifiers: vec![Identifier {
                system: "urn:other-ehr".into(),
                value: "MRN-1".into(),
            }],
            ..contradicting
        };
        assert!(
            index
                .match_one(&other_system)
                .iter()
                .all(|candidate| candidate.record_id != "margaret")
        );
    }

    #[test]
    fn a_stranger_is_a_new_patient() {
        let index = index_with(vec![margaret()]);
        let stranger = PatientRecord {
            record_id: "intake".into(),
            given_name: "Xiomara".into(),
            family_name: "Vandersloot".into(),
            birth_date: NaiveDate::from_ymd_opt(1999, 12, 1),
            sex: Some(Sex::Female),
            postal_code: Some("99501".into()),
            ..PatientRecord::default()
        };
        assert_eq!(index.outcome(&stranger), MatchOutcome::New);
    }

    fn candidate(id: &str, score: f64, grade: MatchGrade) -> ScoredCandidate {
        ScoredCandidate {
            record_index: 0,
            record_id: id.into(),
            score,
            grade,
            total_weight: 0.0,
            deterministic: false,
            trace: vec![],
        }
    }

    #[test]
    fn outcomes_from_grades() {
        use MatchGrade::*;
        assert_eq!(decide_outcome(vec![]), MatchOutcome::New);
        assert_eq!(
            decide_outcome(vec![candidate("a", 0.1, CertainlyNot)]),
            MatchOutcome::New
        );
        assert_eq!(
            decide_outcome(vec![
                candidate("b", 0.5, Possible),
                candidate("a", 0.999, Certain)
            ]),
            MatchOutcome::Link(candidate("a", 0.999, Certain))
        );
        assert_eq!(
            decide_outcome(vec![
                candidate("b", 0.4, Possible),
                candidate("a", 0.9, Probable)
            ]),
            MatchOutcome::Review(vec![
                candidate("a", 0.9, Probable),
                candidate("b", 0.4, Possible)
            ])
        );
        // The certain candidate is outscored by one the guards held back (a twin):
        // never link to either silently (before, the top-scored one was linked).
        assert_eq!(
            decide_outcome(vec![
                candidate("twin", 0.9995, Probable),
                candidate("a", 0.999, Certain)
            ]),
            MatchOutcome::Review(vec![
                candidate("twin", 0.9995, Probable),
                candidate("a", 0.999, Certain)
            ])
        );
        // Two certain candidates: the known set has a duplicate; a human picks.
        assert_eq!(
            decide_outcome(vec![
                candidate("a", 0.995, Certain),
                candidate("b", 0.999, Certain)
            ]),
            MatchOutcome::Review(vec![
                candidate("b", 0.999, Certain),
                candidate("a", 0.995, Certain)
            ])
        );
    }

    #[test]
    fn certainty_guards() {
        // given, family, birth date, sex, household, email
        assert!(passes_certainty_guards(&[0, 0, 0, 0, 0, MISSING]));
        assert!(passes_certainty_guards(&[1, 2, 1, 1, 5, 0]));
        assert!(
            !passes_certainty_guards(&[2, 0, 0, 0, 0, 0]),
            "given name only close"
        );
        assert!(
            !passes_certainty_guards(&[3, 0, 0, 0, 0, 0]),
            "given name disagrees (twins)"
        );
        assert!(
            !passes_certainty_guards(&[MISSING, 0, 0, 0, 0, 0]),
            "no given name"
        );
        assert!(
            !passes_certainty_guards(&[0, 0, 3, 0, 0, 0]),
            "birth date disagrees (Jr/Sr)"
        );
        assert!(
            !passes_certainty_guards(&[0, 0, 0, 0, 4, 2]),
            "nothing corroborates (namesake)"
        );
        assert!(!passes_certainty_guards(&[0, 0, 0, 0, MISSING, MISSING]));
    }

    #[test]
    fn thresholds_from_the_config_grade_the_pairs() {
        let strict = MatchConfig {
            thresholds: GradeThresholds::new(1.0, 1.0, 1.0).unwrap(),
            ..MatchConfig::default()
        };
        let mut known: Vec<PatientRecord> = Population::new(5)
            .people(500)
            .iter()
            .enumerate()
            .map(|(position, person)| clean_record(person, format!("P{position}")))
            .collect();
        known.push(PatientRecord {
            identifiers: vec![],
            ..margaret()
        });
        let index = MatchIndex::build_with(known, strict).unwrap();
        let intake = PatientRecord {
            record_id: "intake".into(),
            identifiers: vec![],
            ..margaret()
        };
        // Nothing reaches probability 1.0 by weights: every candidate is certainly-not.
        assert_eq!(index.match_one(&intake), vec![]);
    }

    #[test]
    fn blocking_keeps_comparisons_far_below_all_pairs() {
        let index = index_with(vec![]);
        let result = index.dedupe(false);
        let all_pairs = index.len() * (index.len() - 1) / 2;
        assert!(result.pairs_compared > 0);
        assert!(
            (result.pairs_compared as usize) < all_pairs / 100,
            "{} of {all_pairs}",
            result.pairs_compared
        );
    }
}
