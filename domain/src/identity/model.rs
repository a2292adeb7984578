//! The Fellegi–Sunter model: per-field `m` and `u` probabilities, their estimation
//! (random-pair sampling for `u`, expectation–maximisation for `m`), match weights
//! `log2(m/u)`, the posterior match probability and its grade.
//!
//! Why it exists: a hand-tuned score cannot say how much a given agreement is worth on
//! *this* population; Fellegi–Sunter can, and it yields a probability that thresholds
//! can be set against (Splink's formulation).
//!
//! * `m[level]` = P(field reaches `level` | the records are the same person)
//! * `u[level]` = P(field reaches `level` | two records picked at random)
//! * weight = `log2(m/u)`; the total weight is the sum over non-missing fields;
//!   posterior log-odds = total weight + `log2(λ/(1−λ))` with λ the prior probability
//!   that a compared pair matches.
//!
//! Estimation follows Splink: `u` from random pairs (they are almost all non-matches),
//! `m` by EM on blocked candidate pairs (where matches are common enough to be seen),
//! both smoothed towards starting priors with pseudo-counts so that small files and
//! empty levels never give infinite weights.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::compare::{ComparisonVector, FIELD_COUNT, Field, MISSING};
use crate::patient::MatchGrade;

/// Why thresholds were rejected (a configuration error: fix the flags).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThresholdError {
    #[error("threshold {name}={value} is not a probability in [0, 1]")]
    NotAProbability { name: &'static str, value: f64 },
    #[error(
        "thresholds must satisfy possible <= probable <= certain (got {possible} <= {probable} <= {certain})"
    )]
    OutOfOrder {
        possible: f64,
        probable: f64,
        certain: f64,
    },
}

/// Probability cut-offs for the grades. A pair is `Certain` at `score >= certain`,
/// `Probable` at `>= probable`, `Possible` at `>= possible`, otherwise `CertainlyNot`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradeThresholds {
    certain: f64,
    probable: f64,
    possible: f64,
}

impl Default for GradeThresholds {
    fn default() -> Self {
        GradeThresholds {
            certain: 0.99,
            probable: 0.80,
            possible: 0.30,
        }
    }
}

impl GradeThresholds {
    pub fn new(certain: f64, probable: f64, possible: f64) -> Result<Self, ThresholdError> {
        for (name, value) in [
            ("certain", certain),
            ("probable", probable),
            ("possible", possible),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ThresholdError::NotAProbability { name, value });
            }
        }
        if !(possible <= probable && probable <= certain) {
            return Err(ThresholdError::OutOfOrder {
                possible,
                probable,
                certain,
            });
        }
        Ok(GradeThresholds {
            certain,
            probable,
            possible,
        })
    }

    /// Certain and possible given, probable kept at its default when that still lies
    /// between them, otherwise moved to the nearest of the two.
    pub fn from_certain_and_possible(
        certain: Option<f64>,
        possible: Option<f64>,
    ) -> Result<Self, ThresholdError> {
        let defaults = GradeThresholds::default();
        let certain = certain.unwrap_or(defaults.certain);
        let possible = possible.unwrap_or(defaults.possible);
        let probable = defaults.probable.min(certain).max(possible);
        GradeThresholds::new(certain, probable, possible)
    }

    pub fn certain(&self) -> f64 {
        self.certain
    }
    pub fn probable(&self) -> f64 {
        self.probable
    }
    pub fn possible(&self) -> f64 {
        self.possible
    }

    pub fn grade(&self, probability: f64) -> MatchGrade {
        if probability >= self.certain {
            MatchGrade::Certain
        } else if probability >= self.probable {
            MatchGrade::Probable
        } else if probability >= self.possible {
            MatchGrade::Possible
        } else {
            MatchGrade::CertainlyNot
        }
    }
}

/// `m` and `u` for one field, one entry per level of [`Field::level_names`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldProbabilities {
    pub field: Field,
    pub m: Vec<f64>,
    pub u: Vec<f64>,
}

impl FieldProbabilities {
    pub fn weights(&self) -> Vec<f64> {
        self.m
            .iter()
            .zip(&self.u)
            .map(|(m, u)| (m / u).log2())
            .collect()
    }
}

/// How an EM run went (for logs, the bench report and docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmReport {
    pub iterations: usize,
    pub converged: bool,
    /// Candidate pairs the estimate was made on.
    pub candidate_pairs: u64,
    /// Distinct comparison vectors among them.
    pub distinct_patterns: usize,
    /// Σ P(match) over the candidate pairs.
    pub expected_matches: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmSettings {
    pub max_iterations: usize,
    /// Stop when no parameter moves more than this between iterations.
    pub tolerance: f64,
    /// Weight of the starting `m` as pseudo-observations (keeps `m` sane when a
    /// batch has few matches).
    pub m_pseudo_count: f64,
    /// Starting share of matches among candidate pairs.
    pub initial_match_share: f64,
}

impl Default for EmSettings {
    fn default() -> Self {
        EmSettings {
            max_iterations: 200,
            tolerance: 1e-7,
            m_pseudo_count: 20.0,
            initial_match_share: 0.1,
        }
    }
}

/// Pseudo-observations of the starting `u` blended into random-pair counts.
pub const U_PSEUDO_COUNT: f64 = 1000.0;
const PROBABILITY_FLOOR: f64 = 1e-9;

/// The model used to score pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchModel {
    pub fields: Vec<FieldProbabilities>,
    /// log2(λ/(1−λ)), λ = prior probability that a compared pair is a match.
    pub log2_prior_odds: f64,
    /// The EM run that produced `m`, if any.
    pub em: Option<EmReport>,
    #[serde(skip)]
    weights: Vec<Vec<f64>>,
}

impl MatchModel {
    /// Starting values: typical US registration data (used as EM start and as the
    /// pseudo-count target, never alone).
    pub fn starting_priors() -> Self {
        let field = |field: Field, m: &[f64], u: &[f64]| FieldProbabilities {
            field,
            m: m.to_vec(),
            u: u.to_vec(),
        };
        MatchModel::from_fields(
            vec![
                field(
                    Field::GivenName,
                    &[0.85, 0.05, 0.07, 0.03],
                    &[0.01, 0.001, 0.01, 0.979],
                ),
                field(
                    Field::FamilyName,
                    &[0.85, 0.07, 0.08],
                    &[0.005, 0.01, 0.985],
                ),
                field(
                    Field::BirthDate,
                    &[0.93, 0.015, 0.035, 0.02],
                    &[3e-5, 3e-7, 3e-4, 0.99967],
                ),
                field(Field::Sex, &[0.98, 0.02], &[0.5, 0.5]),
                field(
                    Field::Household,
                    &[0.45, 0.15, 0.1, 0.05, 0.1, 0.15],
                    &[1e-5, 1e-5, 1e-5, 0.001, 0.01, 0.98897],
                ),
                field(Field::Email, &[0.7, 0.05, 0.25], &[1e-6, 1e-5, 0.999989]),
            ],
            (1e-6f64 / (1.0 - 1e-6)).log2(),
        )
    }

    pub fn from_fields(fields: Vec<FieldProbabilities>, log2_prior_odds: f64) -> Self {
        debug_assert_eq!(fields.len(), FIELD_COUNT);
        // Levels are ordered from strongest to weakest agreement; a sparse `u` for a
        // rare level (a nickname, a one-digit phone typo) must not make the weaker
        // agreement outweigh the exact one.
        let weights = fields
            .iter()
            .map(|field| {
                let mut weights = field.weights();
                for level in 1..weights.len() {
                    weights[level] = weights[level].min(weights[level - 1]);
                }
                weights
            })
            .collect();
        MatchModel {
            fields,
            log2_prior_odds,
            em: None,
            weights,
        }
    }

    pub fn field(&self, field: Field) -> &FieldProbabilities {
        &self.fields[field.index()]
    }

    /// The weight of `level` on `field`; 0 for a missing field.
    pub fn weight(&self, field: Field, level: u8) -> f64 {
        if level == MISSING {
            return 0.0;
        }
        self.weights[field.index()][usize::from(level)]
    }

    pub fn total_weight(&self, vector: &ComparisonVector) -> f64 {
        Field::ALL
            .iter()
            .map(|field| self.weight(*field, vector[field.index()]))
            .sum()
    }

    /// Posterior probability of a match for a total weight (base-2 log-odds).
    pub fn probability(&self, total_weight: f64) -> f64 {
        let log2_odds = total_weight + self.log2_prior_odds;
        1.0 / (1.0 + (-log2_odds).exp2())
    }

    /// Sets λ, the prior probability that a compared pair matches.
    pub fn set_prior_probability(&mut self, prior: f64) {
        let prior = prior.clamp(1e-15, 0.5);
        self.log2_prior_odds = (prior / (1.0 - prior)).log2();
    }

    pub fn prior_probability(&self) -> f64 {
        let odds = self.log2_prior_odds.exp2();
        odds / (1.0 + odds)
    }

    fn with_m_and_u(&self, m: Option<&[Vec<f64>]>, u: Option<&[Vec<f64>]>) -> MatchModel {
        let fields = self
            .fields
            .iter()
            .enumerate()
            .map(|(index, field)| FieldProbabilities {
                field: field.field,
                m: m.map_or_else(|| field.m.clone(), |m| m[index].clone()),
                u: u.map_or_else(|| field.u.clone(), |u| u[index].clone()),
            })
            .collect();
        let mut model = MatchModel::from_fields(fields, self.log2_prior_odds);
        model.em = self.em.clone();
        model
    }

    /// This model with `u` re-estimated from comparisons of random pairs, smoothed
    /// towards the current `u` with [`U_PSEUDO_COUNT`] pseudo-observations.
    pub fn with_u_from_random_pairs(&self, random_pairs: &PatternHistogram) -> MatchModel {
        let u: Vec<Vec<f64>> = Field::ALL
            .iter()
            .map(|field| {
                let counts = random_pairs.level_counts(*field);
                let observed: f64 = counts.iter().sum();
                let floor = 0.5 / (observed + U_PSEUDO_COUNT);
                let smoothed: Vec<f64> = counts
                    .iter()
                    .zip(&self.field(*field).u)
                    .map(|(count, prior)| {
                        ((count + U_PSEUDO_COUNT * prior) / (observed + U_PSEUDO_COUNT)).max(floor)
                    })
                    .collect();
                normalized(smoothed)
            })
            .collect();
        self.with_m_and_u(None, Some(&u))
    }

    /// EM on candidate pairs: returns this model with `m` re-estimated (its `u` and
    /// prior untouched) and the report. Inside the candidate set the non-match
    /// distribution is not the random-pair `u` (blocking makes agreement common), so
    /// EM fits its own candidate-set `u` and λ, which are then discarded: only `m`
    /// carries over, as in Splink.
    ///
    /// Only the `m` of `estimated` fields is updated; the others stay fixed (an empty
    /// slice estimates λ alone).
    pub fn with_m_from_em(
        &self,
        candidates: &PatternHistogram,
        settings: &EmSettings,
        estimated: &[Field],
    ) -> (MatchModel, EmReport) {
        let patterns: Vec<(ComparisonVector, f64)> = candidates
            .counts
            .iter()
            .map(|(vector, count)| (*vector, *count as f64))
            .collect();
        let total: f64 = patterns.iter().map(|(_, count)| count).sum();
        let prior_m: Vec<Vec<f64>> = self.fields.iter().map(|field| field.m.clone()).collect();
        let mut m = prior_m.clone();
        let mut u: Vec<Vec<f64>> = self.fields.iter().map(|field| field.u.clone()).collect();
        let mut share = settings.initial_match_share;
        let mut iterations = 0;
        let mut converged = false;
        let mut expected_matches = 0.0;
        while iterations < settings.max_iterations && total > 0.0 {
            iterations += 1;
            // E-step: P(match | pattern), then expected level counts per class.
            let mut match_counts: Vec<Vec<f64>> = Field::ALL
                .iter()
                .map(|field| vec![0.0; field.level_count()])
                .collect();
            let mut non_match_counts = match_counts.clone();
            expected_matches = 0.0;
            for (vector, count) in &patterns {
                let mut match_likelihood = share;
                let mut non_match_likelihood = 1.0 - share;
                for (index, level) in vector.iter().enumerate() {
                    if *level != MISSING {
                        match_likelihood *= m[index][usize::from(*level)];
                        non_match_likelihood *= u[index][usize::from(*level)];
                    }
                }
                let posterior = match_likelihood / (match_likelihood + non_match_likelihood);
                expected_matches += posterior * count;
                for (index, level) in vector.iter().enumerate() {
                    if *level != MISSING {
                        match_counts[index][usize::from(*level)] += posterior * count;
                        non_match_counts[index][usize::from(*level)] += (1.0 - posterior) * count;
                    }
                }
            }
            // M-step, with pseudo-counts towards the starting m.
            let mut largest_change: f64 = 0.0;
            let new_share = (expected_matches / total).clamp(1e-9, 1.0 - 1e-9);
            largest_change = largest_change.max((new_share - share).abs());
            share = new_share;
            for index in 0..FIELD_COUNT {
                let unmatched: f64 = non_match_counts[index].iter().sum();
                let new_u = normalized(
                    non_match_counts[index]
                        .iter()
                        .map(|count| ((count + 1e-3) / (unmatched + 1e-3)).max(PROBABILITY_FLOOR))
                        .collect(),
                );
                for (old, new) in u[index].iter().zip(&new_u) {
                    largest_change = largest_change.max((old - new).abs());
                }
                u[index] = new_u;
                if !estimated.contains(&Field::ALL[index]) {
                    continue;
                }
                let matched: f64 = match_counts[index].iter().sum();
                let new_m = normalized(
                    match_counts[index]
                        .iter()
                        .zip(&prior_m[index])
                        .map(|(count, prior)| {
                            ((count + settings.m_pseudo_count * prior)
                                / (matched + settings.m_pseudo_count))
                                .max(PROBABILITY_FLOOR)
                        })
                        .collect(),
                );
                for (old, new) in m[index].iter().zip(&new_m) {
                    largest_change = largest_change.max((old - new).abs());
                }
                m[index] = new_m;
            }
            if largest_change < settings.tolerance {
                converged = true;
                break;
            }
        }
        let report = EmReport {
            iterations,
            converged,
            candidate_pairs: total as u64,
            distinct_patterns: patterns.len(),
            expected_matches,
        };
        let mut model = self.with_m_and_u(Some(&m), None);
        model.em = Some(report.clone());
        (model, report)
    }
}

impl MatchModel {
    /// Estimates `m` from candidate pairs in two EM sessions, each conditioned on
    /// agreement of fields it then does not estimate (Splink's training by blocking
    /// rule), followed by a λ-only pass:
    ///
    /// 1. pairs with the same birth date, birth date masked → `m` of every other field;
    /// 2. pairs with the same given (or nickname) and family name, names masked →
    ///    `m` of the birth date;
    /// 3. all pairs, `m` fixed → the expected number of matches.
    ///
    /// Why not one EM over all candidate pairs: household members (partners, children)
    /// agree on surname, address and phone and are as numerous as true duplicates among
    /// candidates; a single two-class EM happily calls "same household" the match class.
    /// Conditioning on birth date leaves out households (twins aside), conditioning on
    /// names leaves out everyone but namesakes.
    pub fn with_m_from_em_sessions(
        &self,
        candidates: &[ComparisonVector],
        settings: &EmSettings,
    ) -> (MatchModel, EmReport) {
        use super::compare::level;
        let masked = |vector: &ComparisonVector, fields: &[Field]| {
            let mut vector = *vector;
            for field in fields {
                vector[field.index()] = MISSING;
            }
            vector
        };
        let same_birth_date: PatternHistogram = candidates
            .iter()
            .filter(|vector| vector[Field::BirthDate.index()] == level::DATE_EXACT)
            .map(|vector| masked(vector, &[Field::BirthDate]))
            .collect();
        let not_birth_date: Vec<Field> = Field::ALL
            .into_iter()
            .filter(|field| *field != Field::BirthDate)
            .collect();
        let (first, first_report) =
            self.with_m_from_em(&same_birth_date, settings, &not_birth_date);

        let same_names: PatternHistogram = candidates
            .iter()
            .filter(|vector| {
                matches!(
                    vector[Field::GivenName.index()],
                    level::GIVEN_EXACT | level::GIVEN_NICKNAME
                ) && vector[Field::FamilyName.index()] == level::FAMILY_EXACT
            })
            .map(|vector| masked(vector, &[Field::GivenName, Field::FamilyName]))
            .collect();
        let (second, second_report) =
            first.with_m_from_em(&same_names, settings, &[Field::BirthDate]);

        let all_pairs: PatternHistogram = candidates.iter().copied().collect();
        let (mut model, last_report) = second.with_m_from_em(&all_pairs, settings, &[]);
        let report = EmReport {
            iterations: first_report.iterations + second_report.iterations + last_report.iterations,
            converged: first_report.converged && second_report.converged && last_report.converged,
            ..last_report
        };
        model.em = Some(report.clone());
        (model, report)
    }
}

fn normalized(mut values: Vec<f64>) -> Vec<f64> {
    let sum: f64 = values.iter().sum();
    if sum > 0.0 {
        values.iter_mut().for_each(|value| *value /= sum);
    }
    values
}

/// Comparison vectors of many pairs, counted by distinct pattern: EM runs over a few
/// thousand patterns instead of millions of pairs. Ordered (a `BTreeMap`, not a
/// randomly seeded `HashMap`): EM sums over the patterns in this order, and a
/// different order changed fitted weights in the last bit from one build of the same
/// records to the next.
#[derive(Debug, Clone, Default)]
pub struct PatternHistogram {
    counts: BTreeMap<ComparisonVector, u64>,
}

impl PatternHistogram {
    pub fn add(&mut self, vector: ComparisonVector) {
        *self.counts.entry(vector).or_insert(0) += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// Counts per level of `field` (missing excluded).
    fn level_counts(&self, field: Field) -> Vec<f64> {
        let mut counts = vec![0.0; field.level_count()];
        for (vector, count) in &self.counts {
            let level = vector[field.index()];
            if level != MISSING {
                counts[usize::from(level)] += *count as f64;
            }
        }
        counts
    }
}

impl FromIterator<ComparisonVector> for PatternHistogram {
    fn from_iter<I: IntoIterator<Item = ComparisonVector>>(iter: I) -> Self {
        let mut histogram = PatternHistogram::default();
        iter.into_iter().for_each(|vector| histogram.add(vector));
        histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::prng::SplitMix64;

    #[test]
    fn grades_follow_the_thresholds_inclusively() {
        let thresholds = GradeThresholds::new(0.99, 0.8, 0.3).unwrap();
        assert_eq!(thresholds.grade(1.0), MatchGrade::Certain);
        assert_eq!(thresholds.grade(0.99), MatchGrade::Certain);
        assert_eq!(thresholds.grade(0.989_999), MatchGrade::Probable);
        assert_eq!(thresholds.grade(0.8), MatchGrade::Probable);
        assert_eq!(thresholds.grade(0.799_999), MatchGrade::Possible);
        assert_eq!(thresholds.grade(0.3), MatchGrade::Possible);
        assert_eq!(thresholds.grade(0.299_999), MatchGrade::CertainlyNot);
        assert_eq!(thresholds.grade(0.0), MatchGrade::CertainlyNot);
    }

    #[test]
    fn thresholds_are_validated() {
        assert_eq!(
            GradeThresholds::new(1.5, 0.8, 0.3),
            Err(ThresholdError::NotAProbability {
                name: "certain",
                value: 1.5
            })
        );
        assert_eq!(
            GradeThresholds::new(0.5, 0.8, 0.3),
            Err(ThresholdError::OutOfOrder {
                possible: 0.3,
                probable: 0.8,
                certain: 0.5
            })
        );
        let moved = GradeThresholds::from_certain_and_possible(Some(0.7), Some(0.2)).unwrap();
        assert_eq!(
            (moved.certain(), moved.probable(), moved.possible()),
            (0.7, 0.7, 0.2)
        );
        let moved = GradeThresholds::from_certain_and_possible(None, Some(0.9)).unwrap();
        assert_eq!(
            (moved.certain(), moved.probable(), moved.possible()),
            (0.99, 0.9, 0.9)
        );
    }

    #[test]
    fn weights_are_log2_m_over_u_and_missing_is_neutral() {
        let model = MatchModel::starting_priors();
        assert!((model.weight(Field::Sex, 0) - (0.98f64 / 0.5).log2()).abs() < 1e-12);
        assert!((model.weight(Field::GivenName, 3) - (0.03f64 / 0.979).log2()).abs() < 1e-12);
        assert_eq!(model.weight(Field::Email, MISSING), 0.0);
        let all_missing = [MISSING; FIELD_COUNT];
        assert_eq!(model.total_weight(&all_missing), 0.0);
    }

    #[test]
    fn probability_combines_weight_and_prior() {
        let mut model = MatchModel::starting_priors();
        model.set_prior_probability(0.5);
        assert!((model.probability(0.0) - 0.5).abs() < 1e-12);
        assert!((model.probability(1.0) - 2.0 / 3.0).abs() < 1e-12);
        model.set_prior_probability(0.2); // prior odds 1/4 = 2^-2
        assert!((model.probability(2.0) - 0.5).abs() < 1e-12);
        assert!((model.prior_probability() - 0.2).abs() < 1e-12);
    }

    /// Simulates pairs from known m/u and checks EM recovers m and the match share.
    #[test]
    fn em_recovers_the_generating_parameters() {
        let truth_m: [&[f64]; FIELD_COUNT] = [
            &[0.8, 0.1, 0.05, 0.05],
            &[0.9, 0.05, 0.05],
            &[0.95, 0.01, 0.02, 0.02],
            &[0.97, 0.03],
            &[0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
            &[0.6, 0.1, 0.3],
        ];
        let truth_u: [&[f64]; FIELD_COUNT] = [
            &[0.05, 0.01, 0.04, 0.9],
            &[0.1, 0.1, 0.8],
            &[0.2, 0.01, 0.05, 0.74],
            &[0.5, 0.5],
            &[0.02, 0.03, 0.05, 0.1, 0.2, 0.6],
            &[0.01, 0.01, 0.98],
        ];
        let draw = |rng: &mut SplitMix64, probabilities: &[f64]| {
            let mut remaining = rng.unit();
            for (level, probability) in probabilities.iter().enumerate() {
                if remaining < *probability {
                    return level as u8;
                }
                remaining -= probability;
            }
            (probabilities.len() - 1) as u8
        };
        let mut rng = SplitMix64::new(42);
        let mut histogram = PatternHistogram::default();
        for pair in 0..100_000 {
            let table = if pair % 5 == 0 { &truth_m } else { &truth_u };
            let mut vector = [0u8; FIELD_COUNT];
            for (index, slot) in vector.iter_mut().enumerate() {
                *slot = draw(&mut rng, table[index]);
            }
            histogram.add(vector);
        }
        let (model, report) = MatchModel::starting_priors().with_m_from_em(
            &histogram,
            &EmSettings::default(),
            &Field::ALL,
        );
        assert!(report.converged, "{report:?}");
        let share = report.expected_matches / report.candidate_pairs as f64;
        assert!((share - 0.2).abs() < 0.01, "share {share}");
        for field in Field::ALL {
            for (estimated, truth) in model.field(field).m.iter().zip(truth_m[field.index()]) {
                assert!(
                    (estimated - truth).abs() < 0.02,
                    "{field:?}: {estimated} vs {truth}"
                );
            }
        }
        // u is untouched by EM (it comes from random pairs).
        assert_eq!(model.field(Field::Sex).u, vec![0.5, 0.5]);
    }

    #[test]
    fn u_from_random_pairs_is_smoothed_and_floored() {
        let histogram: PatternHistogram = (0..99_000)
            .map(|_| [3, 2, 3, 1, 5, 2])
            .chain((0..1_000).map(|_| [0, 2, 3, 0, 5, 2]))
            .collect();
        let model = MatchModel::starting_priors().with_u_from_random_pairs(&histogram);
        let given_u = &model.field(Field::GivenName).u;
        // (1000 + 1000 * 0.01) / (100000 + 1000)
        assert!(
            (given_u[0] - 1010.0 / 101_000.0).abs() < 1e-6,
            "{given_u:?}"
        );
        assert!(given_u.iter().all(|u| *u >= 0.5 / 101_000.0 - 1e-15));
        assert!((given_u.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
