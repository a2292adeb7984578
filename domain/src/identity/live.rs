//! The identity service's matcher: one [`MatchIndex`] per tenant, kept up to date one
//! event at a time instead of rebuilt for every registration.
//!
//! Why it exists: rebuilding the index for each registration normalizes every known
//! patient and fits the model again — O(n) per registration, O(n²) per day; at about
//! 1,300 patients the reactor fell behind a load of 5 registrations/s
//! (`docs/soak.md`). Here a registration is matched against the live index (blocking,
//! O(block size)) and then inserted; identifier links replace the record in place;
//! merged charts are removed.
//!
//! The model (`m`, `u`) is the one thing that cannot be updated in place (EM and the
//! random-pair sample of `u` depend on the whole set). It is re-fitted at *fit
//! points* fixed by counts alone ([`RefitPolicy`]): when the changes since the last
//! fit reach `growth_percent` of the set the last fit saw. The fit runs on the live
//! records of that moment, in record-id order, exactly as `MatchIndex::build` would;
//! λ always follows the current number of records. So a decision is a function of the
//! event sequence alone:
//! - a restart that replays the log through [`LiveMatcher::observe_registration`]
//!   reaches the same fit points and the same model, and then decides exactly as the
//!   matcher that never stopped (only the snapshot is kept at a fit point; the fit
//!   itself waits until a registration has to be matched);
//! - with `growth_percent = 0` every registration is matched with a model fitted on
//!   the current set: the per-registration rebuild, bit for bit (the equivalence
//!   tests check both).

use std::collections::HashMap;

use super::index::{
    MatchConfig, MatchIndex, MatchIndexError, MatchOutcome, ScoredCandidate, decide_outcome,
};
use super::model::MatchModel;
use super::record::{NormalizedRecord, PatientRecord};

/// When the model is fitted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefitPolicy {
    /// Re-fit once the insertions, replacements and removals since the last fit reach
    /// this share (in percent) of the records the last fit saw. 0: before every
    /// registration that follows a change (the old per-registration rebuild).
    pub growth_percent: u32,
}

impl Default for RefitPolicy {
    /// 10 %: the model never lags the data by more than a tenth, and a fit (O(n))
    /// comes once per n/10 registrations.
    fn default() -> Self {
        RefitPolicy { growth_percent: 10 }
    }
}

/// A tenant's known patients, kept matchable as events arrive.
#[derive(Debug, Clone)]
pub struct LiveMatcher {
    index: MatchIndex,
    positions: HashMap<Box<str>, usize>,
    policy: RefitPolicy,
    changes_since_fit: usize,
    /// Records the last fit point saw.
    fitted_on: usize,
    /// The live records at the last fit point, until the model is fitted on them.
    pending_fit: Option<Vec<NormalizedRecord>>,
    fits: u64,
}

impl LiveMatcher {
    pub fn new(config: MatchConfig, policy: RefitPolicy) -> Self {
        LiveMatcher {
            index: MatchIndex::empty(config),
            positions: HashMap::new(),
            policy,
            changes_since_fit: 0,
            fitted_on: 0,
            pending_fit: None,
            fits: 0,
        }
    }

    /// Live (not removed) records.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, record_id: &str) -> bool {
        self.positions
            .get(record_id)
            .is_some_and(|position| !self.index.is_removed(*position))
    }

    /// The index as it stands (its model may lag a pending fit: see [`Self::model`]).
    pub fn index(&self) -> &MatchIndex {
        &self.index
    }

    /// The model a match would use now, or `None` while a fit is pending.
    pub fn model(&self) -> Option<&MatchModel> {
        self.pending_fit.is_none().then(|| self.index.model())
    }

    /// Models fitted so far (for benchmarks and tests).
    pub fn fits(&self) -> u64 {
        self.fits
    }

    /// A registration seen while replaying the log (nothing to decide): passes a fit
    /// point if one is due, then adds the record.
    pub fn observe_registration(&mut self, record: PatientRecord) -> Result<(), MatchIndexError> {
        self.register(record, false).map(|_| ())
    }

    /// A registration to decide: passes a fit point if due, matches the record
    /// against the others, then adds it. Returns the scored candidates (possible or
    /// better, best first).
    pub fn resolve_registration(
        &mut self,
        record: PatientRecord,
    ) -> Result<Vec<ScoredCandidate>, MatchIndexError> {
        self.register(record, true)
    }

    /// Both kinds of registration take the same steps, so a replay reaches the same
    /// fit points as the live run; only the matching (and the fit it needs) is skipped.
    fn register(
        &mut self,
        record: PatientRecord,
        decide: bool,
    ) -> Result<Vec<ScoredCandidate>, MatchIndexError> {
        self.reach_fit_point();
        let normalized = record.normalize();
        // A registration is matched against the *others* (a repeated one is not its
        // own candidate).
        self.remove(&normalized.record_id);
        let candidates = if decide && !self.index.is_empty() {
            self.fit_if_pending()?;
            self.index.match_normalized(&normalized)
        } else {
            Vec::new()
        };
        self.upsert_normalized(normalized)?;
        Ok(candidates)
    }

    /// [`Self::resolve_registration`] then [`decide_outcome`].
    pub fn resolve_outcome(
        &mut self,
        record: PatientRecord,
    ) -> Result<MatchOutcome, MatchIndexError> {
        self.resolve_registration(record).map(decide_outcome)
    }

    /// Adds a record, or replaces the one with the same id (new identifiers).
    pub fn upsert(&mut self, record: PatientRecord) -> Result<(), MatchIndexError> {
        self.upsert_normalized(record.normalize())
    }

    fn upsert_normalized(&mut self, record: NormalizedRecord) -> Result<(), MatchIndexError> {
        match self.positions.get(&record.record_id) {
            Some(position) => self.index.replace(*position, record),
            None => {
                let id = record.record_id.clone();
                let position = self.index.insert(record)?;
                self.positions.insert(id, position);
            }
        }
        self.changes_since_fit += 1;
        Ok(())
    }

    /// Takes a record out of matching (a merged chart). False if it was not live.
    pub fn remove(&mut self, record_id: &str) -> bool {
        match self.positions.get(record_id) {
            Some(position) if !self.index.is_removed(*position) => {
                self.index.remove(*position);
                self.changes_since_fit += 1;
                true
            }
            _ => false,
        }
    }

    fn reach_fit_point(&mut self) {
        let due = self.changes_since_fit > 0
            && self.changes_since_fit as u64 * 100
                >= self.fitted_on as u64 * u64::from(self.policy.growth_percent);
        if !due {
            return;
        }
        let mut snapshot: Vec<NormalizedRecord> = self.index.live_records().cloned().collect();
        snapshot.sort_unstable_by(|left, right| left.record_id.cmp(&right.record_id));
        self.fitted_on = snapshot.len();
        self.changes_since_fit = 0;
        self.pending_fit = Some(snapshot);
    }

    fn fit_if_pending(&mut self) -> Result<(), MatchIndexError> {
        if let Some(snapshot) = self.pending_fit.take()
            && !snapshot.is_empty()
        {
            let fitted = MatchIndex::from_normalized(snapshot, self.index.config().clone())?;
            self.index.set_model(fitted.model().clone());
            self.fits += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::identity::synthetic::{RegistryEvent, registry_events};
    use crate::patient::MatchGrade;

    /// Small enough for debug-build tests, with term frequencies switched on early.
    fn config() -> MatchConfig {
        MatchConfig {
            u_sample_pairs: 20_000,
            em_sample_records: 400,
            term_frequency_min_records: 50,
            ..MatchConfig::default()
        }
    }

    /// A candidate without its position (the one thing insertion order changes).
    fn decision(candidates: &[ScoredCandidate]) -> Vec<(String, u64, MatchGrade, bool, String)> {
        candidates
            .iter()
            .map(|c| {
                (
                    c.record_id.clone(),
                    c.score.to_bits(),
                    c.grade,
                    c.deterministic,
                    format!("{:?}", c.trace),
                )
            })
            .collect()
    }

    /// An outcome with `record_index` cleared (positions are insertion order).
    fn without_positions(outcome: MatchOutcome) -> MatchOutcome {
        let clear = |mut candidate: ScoredCandidate| {
            candidate.record_index = 0;
            candidate
        };
        match outcome {
            MatchOutcome::Link(candidate) => MatchOutcome::Link(clear(candidate)),
            MatchOutcome::Review(candidates) => {
                MatchOutcome::Review(candidates.into_iter().map(clear).collect())
            }
            MatchOutcome::New => MatchOutcome::New,
        }
    }

    /// Applies a non-registration event to both the matcher and the reference set.
    fn apply_change(
        event: &RegistryEvent,
        matcher: &mut LiveMatcher,
        reference: &mut BTreeMap<String, PatientRecord>,
    ) {
        match event {
            RegistryEvent::Registered(_) => unreachable!(),
            RegistryEvent::IdentifierLinked {
                record_id,
                identifier,
            } => {
                if let Some(record) = reference.get_mut(record_id) {
                    record.identifiers.push(identifier.clone());
                    matcher.upsert(record.clone()).unwrap();
                }
            }
            RegistryEvent::Merged { record_id } => {
                reference.remove(record_id);
                matcher.remove(record_id);
            }
        }
    }

    fn counts(events: &[RegistryEvent]) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for event in events {
            match event {
                RegistryEvent::Registered(_) => counts.0 += 1,
                RegistryEvent::IdentifierLinked { .. } => counts.1 += 1,
                RegistryEvent::Merged { .. } => counts.2 += 1,
            }
        }
        counts
    }

    /// `growth_percent = 0` is the old reactor: for every registration, a `MatchIndex`
    /// built from scratch (and fitted) on all other live patients in id order.
    #[test]
    fn refit_every_registration_equals_the_per_registration_rebuild() {
        let events = registry_events(11, 180);
        let (registrations, links, merges) = counts(&events);
        assert!(
            registrations > 200 && links > 80 && merges > 5,
            "{registrations} {links} {merges}"
        );
        let mut matcher = LiveMatcher::new(config(), RefitPolicy { growth_percent: 0 });
        let mut reference: BTreeMap<String, PatientRecord> = BTreeMap::new();
        let (mut links_decided, mut reviews) = (0, 0);
        for event in &events {
            let RegistryEvent::Registered(record) = event else {
                apply_change(event, &mut matcher, &mut reference);
                continue;
            };
            let others: Vec<PatientRecord> = reference.values().cloned().collect();
            let expected = if others.is_empty() {
                Vec::new()
            } else {
                MatchIndex::build_with(others, config())
                    .unwrap()
                    .match_one(record)
            };
            let actual = matcher.resolve_registration(record.clone()).unwrap();
            assert_eq!(
                decision(&actual),
                decision(&expected),
                "{}",
                record.record_id
            );
            assert_eq!(
                without_positions(decide_outcome(actual.clone())),
                without_positions(decide_outcome(expected))
            );
            match decide_outcome(actual) {
                MatchOutcome::Link(_) => links_decided += 1,
                MatchOutcome::Review(_) => reviews += 1,
                MatchOutcome::New => {}
            }
            reference.insert(record.record_id.clone(), record.clone());
        }
        // The sequence exercises every outcome (near-duplicates link, twins review).
        assert!(
            links_decided > 0 && reviews > 0,
            "{links_decided} {reviews}"
        );
    }

    /// The production policy: between fit points the index is updated in place, and
    /// answers exactly as an index built from scratch on the same records with the
    /// same model; a restart that replays any prefix decides the rest identically.
    #[test]
    fn incremental_equals_from_scratch_and_a_restart_continues_identically() {
        let events = registry_events(23, 700);
        let mut matcher = LiveMatcher::new(config(), RefitPolicy::default());
        let mut reference: BTreeMap<String, PatientRecord> = BTreeMap::new();
        let mut outcomes = Vec::new();
        for event in &events {
            let RegistryEvent::Registered(record) = event else {
                apply_change(event, &mut matcher, &mut reference);
                continue;
            };
            let actual = matcher.resolve_registration(record.clone()).unwrap();
            if reference.is_empty() {
                assert!(actual.is_empty());
            } else {
                let model = matcher.model().expect("fitted for the match").clone();
                let others = reference.values().map(PatientRecord::normalize).collect();
                let scratch = MatchIndex::with_model(others, model, config()).unwrap();
                let expected = scratch.match_one(record);
                assert_eq!(
                    decision(&actual),
                    decision(&expected),
                    "{}",
                    record.record_id
                );
            }
            outcomes.push(without_positions(decide_outcome(actual)));
            reference.insert(record.record_id.clone(), record.clone());
        }
        let fits = matcher.fits();
        assert!(
            (5..120).contains(&fits),
            "{fits} fits for {} registrations",
            outcomes.len()
        );

        for cut in [1, events.len() / 3, events.len() * 2 / 3 + 1] {
            let mut restarted = LiveMatcher::new(config(), RefitPolicy::default());
            let mut replayed: BTreeMap<String, PatientRecord> = BTreeMap::new();
            let mut decided = 0;
            for (position, event) in events.iter().enumerate() {
                let RegistryEvent::Registered(record) = event else {
                    apply_change(event, &mut restarted, &mut replayed);
                    continue;
                };
                replayed.insert(record.record_id.clone(), record.clone());
                if position < cut {
                    restarted.observe_registration(record.clone()).unwrap();
                } else {
                    let outcome =
                        without_positions(restarted.resolve_outcome(record.clone()).unwrap());
                    let expected = &outcomes[outcomes.len() - counts(&events[position..]).0];
                    assert_eq!(&outcome, expected, "restart at {cut}, event {position}");
                    decided += 1;
                }
            }
            assert!(decided > 0);
        }
    }

    #[test]
    fn thousands_of_insertions_equal_a_bulk_build() {
        // Past the 4,096 recent insertions that trigger a merge into the base.
        let events = registry_events(5, 5_000);
        let records: Vec<NormalizedRecord> = events
            .iter()
            .filter_map(|event| match event {
                RegistryEvent::Registered(record) => Some(record.normalize()),
                _ => None,
            })
            .collect();
        let (known, incoming) = records.split_at(records.len() - 300);
        let bulk = MatchIndex::from_normalized(known.to_vec(), config()).unwrap();
        let mut incremental = MatchIndex::empty(config());
        for record in known {
            incremental.insert(record.clone()).unwrap();
        }
        incremental.set_model(bulk.model().clone());
        assert_eq!(incremental.len(), bulk.len());
        for record in incoming {
            assert_eq!(
                decision(&incremental.match_normalized(record)),
                decision(&bulk.match_normalized(record))
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any mix of insertions, identifier changes and removals over a pool that is
        /// full of near-duplicates and twins, with tiny blocks (so that "block too
        /// large" flips back and forth): the index equals a from-scratch build.
        #[test]
        fn any_change_sequence_equals_a_from_scratch_index(
            operations in prop::collection::vec((0usize..3, 0usize..60), 1..120),
            max_block_size in 1usize..6,
        ) {
            let pool: Vec<PatientRecord> = registry_events(3, 45)
                .into_iter()
                .filter_map(|event| match event {
                    RegistryEvent::Registered(record) => Some(record),
                    _ => None,
                })
                .take(60)
                .collect();
            let config = MatchConfig { max_block_size, ..config() };
            let model = MatchIndex::build_with(pool.clone(), config.clone()).unwrap().model().clone();
            let mut index = MatchIndex::empty(config.clone());
            index.set_model(model.clone());
            let mut positions: HashMap<String, usize> = HashMap::new();
            let mut live: BTreeMap<String, NormalizedRecord> = BTreeMap::new();
            for (kind, which) in operations {
                let mut record = pool[which % pool.len()].clone();
                match kind {
                    0 | 1 => {
                        if kind == 1 {
                            record.identifiers.push(crate::patient::Identifier {
                                system: "urn:x".into(),
                                value: format!("M{}", which % 7),
                            });
                        }
                        let normalized = record.normalize();
                        match positions.get(&record.record_id) {
                            Some(position) => index.replace(*position, normalized.clone()),
                            None => {
                                let position = index.insert(normalized.clone()).unwrap();
                                positions.insert(record.record_id.clone(), position);
                            }
                        }
                        live.insert(record.record_id.clone(), normalized);
                    }
                    _ => {
                        if let Some(position) = positions.get(&record.record_id) {
                            index.remove(*position);
                        }
                        live.remove(&record.record_id);
                    }
                }
            }
            let scratch =
                MatchIndex::with_model(live.values().cloned().collect(), model, config).unwrap();
            prop_assert_eq!(index.len(), scratch.len());
            prop_assert_eq!(index.model(), scratch.model());
            for probe in &pool {
                let mut probe = probe.clone();
                probe.identifiers.push(crate::patient::Identifier {
                    system: "urn:x".into(),
                    value: "M3".into(),
                });
                let probe = probe.normalize();
                prop_assert_eq!(
                    decision(&index.match_normalized(&probe)),
                    decision(&scratch.match_normalized(&probe))
                );
            }
        }
    }
}
