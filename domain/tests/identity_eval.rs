//! Accuracy of the identity matcher on synthetic data with known truth.
//!
//! Why it exists: the acceptance bar — certain (auto-linked) pairs precision
//! ≥ 0.999, recall of true pairs at certain+probable ≥ 0.95, twins never certain —
//! must be proven, not claimed. Prints precision, recall and F1 per grade
//! (`cargo test -p chartline-domain --test identity_eval -- --nocapture`).

use std::collections::{HashMap, HashSet};

use chartline_domain::identity::synthetic::{EvaluationSet, evaluation_set};
use chartline_domain::identity::{BatchResult, MatchConfig, MatchIndex};
use chartline_domain::patient::MatchGrade;

const GRADES: [MatchGrade; 4] = [
    MatchGrade::Certain,
    MatchGrade::Probable,
    MatchGrade::Possible,
    MatchGrade::CertainlyNot,
];

struct GradeFigures {
    grade: MatchGrade,
    pairs: usize,
    true_pairs: usize,
    /// Precision of this grade alone.
    precision: f64,
    /// Recall and F1 counting this grade and every better one as "match".
    cumulative_recall: f64,
    cumulative_f1: f64,
}

fn rank(grade: MatchGrade) -> usize {
    GRADES
        .iter()
        .position(|candidate| *candidate == grade)
        .unwrap_or(3)
}

fn evaluate(set: &EvaluationSet, result: &BatchResult) -> (Vec<GradeFigures>, usize) {
    let true_pairs_total: usize = {
        let mut known_per_person: HashMap<u64, usize> = HashMap::new();
        for person in &set.known_person {
            *known_per_person.entry(*person).or_insert(0) += 1;
        }
        set.incoming_person
            .iter()
            .map(|person| known_per_person.get(person).copied().unwrap_or(0))
            .sum()
    };
    let is_true = |left: u32, right: u32| {
        set.incoming_person[left as usize] == set.known_person[right as usize]
    };
    let figures = GRADES
        .iter()
        .map(|grade| {
            let in_grade: Vec<_> = result
                .pairs
                .iter()
                .filter(|pair| pair.grade == *grade)
                .collect();
            let true_in_grade = in_grade
                .iter()
                .filter(|pair| is_true(pair.left, pair.right))
                .count();
            let at_or_above: Vec<_> = result
                .pairs
                .iter()
                .filter(|pair| rank(pair.grade) <= rank(*grade))
                .collect();
            let true_at_or_above = at_or_above
                .iter()
                .filter(|pair| is_true(pair.left, pair.right))
                .count();
            let precision_at_or_above = true_at_or_above as f64 / at_or_above.len().max(1) as f64;
            let recall = true_at_or_above as f64 / true_pairs_total.max(1) as f64;
            GradeFigures {
                grade: *grade,
                pairs: in_grade.len(),
                true_pairs: true_in_grade,
                precision: true_in_grade as f64 / in_grade.len().max(1) as f64,
                cumulative_recall: recall,
                cumulative_f1: 2.0 * precision_at_or_above * recall
                    / (precision_at_or_above + recall).max(f64::MIN_POSITIVE),
            }
        })
        .collect();
    (figures, true_pairs_total)
}

#[test]
fn identity_synthetic_linkage_meets_the_accuracy_bar() {
    let set = evaluation_set(20_260_101, 4_000);
    let index = MatchIndex::build_with(set.known.clone(), MatchConfig::default()).expect("index");
    let result = index.link(&set.incoming, true);
    let (figures, true_pairs_total) = evaluate(&set, &result);

    println!(
        "known {} · incoming {} · true pairs {true_pairs_total} · compared pairs {} · twins {} · namesakes {}",
        set.known.len(),
        set.incoming.len(),
        result.pairs_compared,
        set.twins.len(),
        set.namesakes.len()
    );
    if let Some(em) = &result.model.em {
        println!(
            "EM: {} iterations, converged {}, {} patterns, expected matches {:.1}; prior λ {:.3e}",
            em.iterations,
            em.converged,
            em.distinct_patterns,
            em.expected_matches,
            result.model.prior_probability()
        );
    }
    println!("grade          pairs   true   precision   recall(≥grade)   F1(≥grade)");
    for figure in &figures {
        println!(
            "{:<13} {:>6} {:>6}   {:>9.5}   {:>14.4}   {:>10.4}",
            format!("{:?}", figure.grade),
            figure.pairs,
            figure.true_pairs,
            figure.precision,
            figure.cumulative_recall,
            figure.cumulative_f1
        );
    }

    let certain = &figures[0];
    let probable = &figures[1];
    assert!(
        certain.pairs > 1_000,
        "too few certain pairs to mean anything: {}",
        certain.pairs
    );
    assert!(
        certain.precision >= 0.999,
        "certain precision {:.5} < 0.999",
        certain.precision
    );
    assert!(
        probable.cumulative_recall >= 0.95,
        "recall at certain+probable {:.4} < 0.95",
        probable.cumulative_recall
    );

    // Twins: no incoming record of one twin is certain against the other's chart.
    let twin_pairs: HashSet<(u64, u64)> = set
        .twins
        .iter()
        .flat_map(|(first, second)| [(*first, *second), (*second, *first)])
        .collect();
    assert!(set.twins.len() >= 40, "only {} twin pairs", set.twins.len());
    let twins_compared = result
        .pairs
        .iter()
        .filter(|pair| {
            twin_pairs.contains(&(
                set.incoming_person[pair.left as usize],
                set.known_person[pair.right as usize],
            ))
        })
        .collect::<Vec<_>>();
    println!(
        "twin pairs compared {} · graded {:?}",
        twins_compared.len(),
        GRADES.map(|grade| twins_compared
            .iter()
            .filter(|pair| pair.grade == grade)
            .count())
    );
    assert!(
        twins_compared.len() >= set.twins.len(),
        "blocking should compare twins"
    );
    assert!(
        twins_compared
            .iter()
            .all(|pair| pair.grade != MatchGrade::Certain),
        "a twin was auto-linked"
    );
}

#[test]
fn identity_synthetic_dedupe_never_certifies_twins() {
    let set = evaluation_set(77, 2_000);
    let index = MatchIndex::build_with(set.known.clone(), MatchConfig::default()).expect("index");
    let result = index.dedupe(true);
    let twin_pairs: HashSet<(u64, u64)> = set
        .twins
        .iter()
        .flat_map(|(first, second)| [(*first, *second), (*second, *first)])
        .collect();
    let mut certain = 0;
    let mut certain_true = 0;
    for pair in &result.pairs {
        let people = (
            set.known_person[pair.left as usize],
            set.known_person[pair.right as usize],
        );
        assert!(
            !(twin_pairs.contains(&people) && pair.grade == MatchGrade::Certain),
            "twins {people:?} certified as one patient"
        );
        if pair.grade == MatchGrade::Certain {
            certain += 1;
            certain_true += usize::from(people.0 == people.1);
        }
    }
    println!("dedupe: {certain} certain pairs, {certain_true} true");
    assert!(certain > 0);
    assert!(certain_true as f64 / certain as f64 >= 0.999);
}
