//! The shipped policy files, evaluated: a table of scenarios over every rule and every
//! boundary date (the day before, of and after each change), each asserting the exact
//! codes, modifiers and place of service; the bitemporal lapse/restoration cases; and
//! the file-format errors.

use std::collections::BTreeSet;

use chartline_domain::billing::{Decision, Outcome, PolicyHistory, Scenario, evaluate};
use chartline_domain::encounter::AssignedCode;
use chrono::NaiveDate;
use serde_json::{Value, json};

use super::*;

/// A day after the last shipped version: the current knowledge.
const NOW: &str = "2026-03-01";

fn day(text: &str) -> NaiveDate {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
}

fn history() -> PolicyHistory {
    shipped_policy_history().unwrap()
}

/// Medicare, established patient, level 3, video, at home, physician office.
fn em(dos: &str) -> Value {
    json!({"date_of_service": dos, "payer": "medicare", "service": "e_m_visit",
           "patient_status": "established", "level": 3, "modality": "video",
           "patient_location": "home", "site": "physician_office"})
}

fn check_in(dos: &str) -> Value {
    json!({"date_of_service": dos, "payer": "medicare", "service": "virtual_check_in",
           "patient_status": "established", "modality": "audio_only",
           "patient_location": "home", "site": "physician_office"})
}

/// Medicare RPM month whose 30-day period starts on the date of service.
fn rpm(dos: &str, days: u32, minutes: u32) -> Value {
    json!({"date_of_service": dos, "payer": "medicare", "service": "rpm_month",
           "site": "physician_office", "period_start": dos, "days_with_readings": days,
           "management_minutes": minutes, "interactive_communication": true,
           "setup_this_episode": false})
}

fn with(mut scenario: Value, changes: &[(&str, Value)]) -> Value {
    for (key, value) in changes {
        scenario[*key] = value.clone();
    }
    scenario
}

fn medicare_audio(dos: &str) -> Value {
    with(
        em(dos),
        &[
            ("modality", json!("audio_only")),
            ("patient_declined_video", json!(true)),
        ],
    )
}

enum Expect {
    Billable(&'static [(&'static str, &'static [&'static str], &'static str, u32)]),
    Hold,
    NotBillable,
}
use Expect::*;

struct Row {
    name: &'static str,
    scenario: Value,
    known_at: &'static str,
    expect: Expect,
    /// The policy version the decision must cite.
    version: u64,
}

fn row(name: &'static str, scenario: Value, expect: Expect) -> Row {
    Row {
        name,
        scenario,
        known_at: NOW,
        expect,
        version: 9,
    }
}

fn known(
    name: &'static str,
    scenario: Value,
    known_at: &'static str,
    version: u64,
    expect: Expect,
) -> Row {
    Row {
        name,
        scenario,
        known_at,
        expect,
        version,
    }
}

fn table() -> Vec<Row> {
    let commercial = |scenario: Value| with(scenario, &[("payer", json!("commercial"))]);
    vec![
        // Place of service 02/10 and the start of coverage (2022-01-01).
        row(
            "dos before POS 02/10 existed",
            em("2021-12-31"),
            NotBillable,
        ),
        row(
            "POS 10 at home, first day, 95 then",
            em("2022-01-01"),
            Billable(&[("99213", &["95"], "10", 1)]),
        ),
        row(
            "POS 02 elsewhere, day after start",
            with(em("2022-01-02"), &[("patient_location", json!("other"))]),
            Billable(&[("99213", &["95"], "02", 1)]),
        ),
        // Modifier 95 on Medicare professional claims through 2023-12-31 only.
        row(
            "95 last day",
            em("2023-12-31"),
            Billable(&[("99213", &["95"], "10", 1)]),
        ),
        row(
            "no 95 from 2024",
            em("2024-01-01"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "no 95 day after, elsewhere",
            with(em("2024-01-02"), &[("patient_location", json!("other"))]),
            Billable(&[("99213", &[], "02", 1)]),
        ),
        row(
            "FQHC claims are institutional: no 95 even in 2023",
            with(em("2023-12-31"), &[("site", json!("fqhc"))]),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        // E/M code ranges.
        row(
            "new patient level 2",
            with(
                em("2025-06-01"),
                &[("patient_status", json!("new")), ("level", json!(2))],
            ),
            Billable(&[("99202", &[], "10", 1)]),
        ),
        row(
            "new patient level 5",
            with(
                em("2025-06-01"),
                &[("patient_status", json!("new")), ("level", json!(5))],
            ),
            Billable(&[("99205", &[], "10", 1)]),
        ),
        row(
            "established level 1",
            with(em("2025-06-01"), &[("level", json!(1))]),
            Billable(&[("99211", &[], "10", 1)]),
        ),
        row(
            "established level 5",
            with(em("2025-06-01"), &[("level", json!(5))]),
            Billable(&[("99215", &[], "10", 1)]),
        ),
        // Brief virtual check-in: G2012 through 2024, 98016 from 2025-01-01.
        row(
            "G2012 last day",
            check_in("2024-12-31"),
            Billable(&[("G2012", &[], "10", 1)]),
        ),
        row(
            "98016 first day",
            check_in("2025-01-01"),
            Billable(&[("98016", &[], "10", 1)]),
        ),
        row(
            "98016 day after, elsewhere",
            with(
                check_in("2025-01-02"),
                &[("patient_location", json!("other"))],
            ),
            Billable(&[("98016", &[], "02", 1)]),
        ),
        row(
            "check-in is for established patients",
            with(check_in("2025-06-01"), &[("patient_status", json!("new"))]),
            NotBillable,
        ),
        known(
            "check-ins do not need the flexibilities (inside the lapse)",
            check_in("2025-10-15"),
            "2025-10-15",
            4,
            Billable(&[("98016", &[], "10", 1)]),
        ),
        row(
            "check-in after 2027",
            check_in("2028-01-01"),
            Billable(&[("98016", &[], "10", 1)]),
        ),
        // Audio-only E/M: modifier 93 from 2025 with its conditions; FQ at RHC/FQHC.
        row(
            "audio-only before 2025: manual coding (99441-99443)",
            medicare_audio("2024-12-31"),
            Hold,
        ),
        row(
            "93 first day",
            medicare_audio("2025-01-01"),
            Billable(&[("99213", &["93"], "10", 1)]),
        ),
        row(
            "93 day after",
            medicare_audio("2025-01-02"),
            Billable(&[("99213", &["93"], "10", 1)]),
        ),
        row(
            "audio-only needs the patient to decline video",
            with(
                medicare_audio("2025-06-01"),
                &[("patient_declined_video", json!(false))],
            ),
            NotBillable,
        ),
        row(
            "audio-only needs the patient at home",
            with(
                medicare_audio("2025-06-01"),
                &[("patient_location", json!("other"))],
            ),
            NotBillable,
        ),
        row(
            "FQ at an FQHC",
            with(medicare_audio("2025-06-01"), &[("site", json!("fqhc"))]),
            Billable(&[("99213", &["FQ"], "10", 1)]),
        ),
        row(
            "FQ at an RHC",
            with(medicare_audio("2025-06-01"), &[("site", json!("rhc"))]),
            Billable(&[("99213", &["FQ"], "10", 1)]),
        ),
        // Flexibility windows as known now (both lapses restored retroactively).
        row(
            "last day before the first lapse",
            em("2025-09-30"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "first lapse day, restored",
            em("2025-10-01"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "day after, restored",
            em("2025-10-02"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "last day of the first restoration",
            em("2026-01-30"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "second lapse day, restored",
            em("2026-01-31"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "day after, restored",
            em("2026-02-01"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "last day of the flexibilities",
            em("2027-12-31"),
            Billable(&[("99213", &[], "10", 1)]),
        ),
        row(
            "home after the flexibilities end",
            em("2028-01-01"),
            NotBillable,
        ),
        row(
            "elsewhere after the flexibilities end",
            with(em("2028-01-02"), &[("patient_location", json!("other"))]),
            NotBillable,
        ),
        // Bitemporal: the same dates of service as known at each point in history.
        known(
            "known 2025-03-14: window ended 03-31",
            em("2025-06-01"),
            "2025-03-14",
            2,
            NotBillable,
        ),
        known(
            "known 2025-03-15: extension to 09-30",
            em("2025-06-01"),
            "2025-03-15",
            3,
            Billable(&[("99213", &[], "10", 1)]),
        ),
        known(
            "known before the lapse was recorded",
            em("2025-10-15"),
            "2025-09-30",
            3,
            NotBillable,
        ),
        known(
            "day before the lapse, known at the lapse",
            em("2025-09-30"),
            "2025-10-01",
            4,
            Billable(&[("99213", &[], "10", 1)]),
        ),
        known(
            "first lapse day, known then",
            em("2025-10-01"),
            "2025-10-01",
            4,
            Hold,
        ),
        known(
            "inside the lapse, known 2025-10-15",
            em("2025-10-15"),
            "2025-10-15",
            4,
            Hold,
        ),
        known(
            "inside the lapse, known the day before restoration",
            em("2025-10-15"),
            "2025-11-11",
            6,
            Hold,
        ),
        known(
            "inside the lapse, known on restoration day",
            em("2025-10-15"),
            "2025-11-12",
            7,
            Billable(&[("99213", &[], "10", 1)]),
        ),
        known(
            "inside the lapse, known 2025-11-20",
            em("2025-10-15"),
            "2025-11-20",
            7,
            Billable(&[("99213", &[], "10", 1)]),
        ),
        known(
            "last restored day, known at the second lapse",
            em("2026-01-30"),
            "2026-01-31",
            8,
            Billable(&[("99213", &[], "10", 1)]),
        ),
        known(
            "second lapse day, known then",
            em("2026-01-31"),
            "2026-01-31",
            8,
            Hold,
        ),
        known(
            "second lapse, known the day before restoration",
            em("2026-02-01"),
            "2026-02-02",
            8,
            Hold,
        ),
        known(
            "second lapse, known on restoration day",
            em("2026-02-01"),
            "2026-02-03",
            9,
            Billable(&[("99213", &[], "10", 1)]),
        ),
        // Commercial default: 95 for video on every date, 93 for audio-only, no lapse.
        known(
            "commercial video inside the Medicare lapse",
            commercial(em("2025-10-15")),
            "2025-10-15",
            4,
            Billable(&[("99213", &["95"], "10", 1)]),
        ),
        row(
            "commercial 95 in 2024",
            commercial(em("2024-01-01")),
            Billable(&[("99213", &["95"], "10", 1)]),
        ),
        row(
            "commercial audio-only elsewhere without declining video",
            commercial(with(
                em("2025-06-01"),
                &[
                    ("modality", json!("audio_only")),
                    ("patient_location", json!("other")),
                ],
            )),
            Billable(&[("99213", &["93"], "02", 1)]),
        ),
        row(
            "commercial G2012",
            commercial(check_in("2024-12-31")),
            Billable(&[("G2012", &[], "10", 1)]),
        ),
        row(
            "commercial 98016",
            commercial(check_in("2025-01-01")),
            Billable(&[("98016", &[], "10", 1)]),
        ),
        row(
            "commercial after 2027",
            commercial(em("2028-01-01")),
            Billable(&[("99213", &["95"], "10", 1)]),
        ),
        // RPM: 99454 16-30 days; 99445 2-15 days from 2026; 99457 20 min; 99470 10-19
        // min from 2026; 99458 per additional 20 min; 99453 set-up (16 days, 2 from 2026).
        row(
            "2025-12-31: 15 days and 19 minutes bill nothing",
            with(
                rpm("2025-12-31", 15, 19),
                &[("setup_this_episode", json!(true))],
            ),
            NotBillable,
        ),
        row(
            "2026-01-01: 99453, 99445 and 99470",
            with(
                rpm("2026-01-01", 15, 19),
                &[("setup_this_episode", json!(true))],
            ),
            Billable(&[
                ("99453", &[], "11", 1),
                ("99445", &[], "11", 1),
                ("99470", &[], "11", 1),
            ]),
        ),
        row(
            "2026-01-02: 2 days and 10 minutes",
            rpm("2026-01-02", 2, 10),
            Billable(&[("99445", &[], "11", 1), ("99470", &[], "11", 1)]),
        ),
        row(
            "1 day and 9 minutes bill nothing",
            rpm("2026-01-15", 1, 9),
            NotBillable,
        ),
        row(
            "16 days, 20 minutes, set-up",
            with(
                rpm("2025-06-01", 16, 20),
                &[("setup_this_episode", json!(true))],
            ),
            Billable(&[
                ("99453", &[], "11", 1),
                ("99454", &[], "11", 1),
                ("99457", &[], "11", 1),
            ]),
        ),
        row(
            "30 days, 40 minutes",
            rpm("2025-06-01", 30, 40),
            Billable(&[
                ("99454", &[], "11", 1),
                ("99457", &[], "11", 1),
                ("99458", &[], "11", 1),
            ]),
        ),
        row(
            "16 days, 60 minutes: two 99458 units",
            rpm("2026-03-01", 16, 60),
            Billable(&[
                ("99454", &[], "11", 1),
                ("99457", &[], "11", 1),
                ("99458", &[], "11", 2),
            ]),
        ),
        row(
            "no interactive communication: no management code",
            with(
                rpm("2025-06-01", 20, 25),
                &[("interactive_communication", json!(false))],
            ),
            Billable(&[("99454", &[], "11", 1)]),
        ),
        row(
            "RPM at an FQHC",
            with(rpm("2025-06-01", 20, 0), &[("site", json!("fqhc"))]),
            Billable(&[("99454", &[], "50", 1)]),
        ),
        row(
            "RPM at an RHC",
            with(rpm("2025-06-01", 20, 0), &[("site", json!("rhc"))]),
            Billable(&[("99454", &[], "72", 1)]),
        ),
        known(
            "2026 RPM codes unknown before the CY2026 rule was recorded",
            rpm("2026-01-10", 10, 15),
            "2025-10-30",
            4,
            NotBillable,
        ),
        row(
            "commercial new patient elsewhere",
            commercial(with(
                em("2025-06-01"),
                &[
                    ("patient_status", json!("new")),
                    ("level", json!(4)),
                    ("patient_location", json!("other")),
                ],
            )),
            Billable(&[("99204", &["95"], "02", 1)]),
        ),
        row(
            "commercial check-in is for established patients",
            commercial(with(
                check_in("2025-06-01"),
                &[("patient_status", json!("new"))],
            )),
            NotBillable,
        ),
        row(
            "commercial RPM at an FQHC, 2025",
            commercial(with(
                rpm("2025-06-01", 16, 20),
                &[("site", json!("fqhc")), ("setup_this_episode", json!(true))],
            )),
            Billable(&[
                ("99453", &[], "50", 1),
                ("99454", &[], "50", 1),
                ("99457", &[], "50", 1),
            ]),
        ),
        row(
            "commercial RPM at an RHC, 2026",
            commercial(with(
                rpm("2026-02-01", 20, 45),
                &[("site", json!("rhc")), ("setup_this_episode", json!(true))],
            )),
            Billable(&[
                ("99453", &[], "72", 1),
                ("99454", &[], "72", 1),
                ("99457", &[], "72", 1),
                ("99458", &[], "72", 1),
            ]),
        ),
        row(
            "commercial CPT 2026 RPM codes",
            commercial(rpm("2026-01-10", 10, 15)),
            Billable(&[("99445", &[], "11", 1), ("99470", &[], "11", 1)]),
        ),
    ]
}

fn run(row: &Row, history: &PolicyHistory) -> Decision {
    let scenario = Scenario::from_json(&row.scenario)
        .unwrap_or_else(|error| panic!("{}: bad scenario: {error}", row.name));
    evaluate(&scenario, history, day(row.known_at))
        .unwrap_or_else(|error| panic!("{}: {error}", row.name))
}

#[test]
fn every_rule_and_boundary_date_against_the_shipped_policy() {
    let history = history();
    let rows = table();
    assert!(
        rows.len() >= 40,
        "the table must stay at least 40 scenarios"
    );
    let mut failures = Vec::new();
    let mut fired = BTreeSet::new();
    for row in &rows {
        let decision = run(row, &history);
        fired.extend(decision.rule_trace.iter().cloned());
        let (outcome, codes) = match &row.expect {
            Billable(lines) => (
                Outcome::Billable,
                lines
                    .iter()
                    .map(|(code, modifiers, pos, units)| AssignedCode {
                        code: (*code).into(),
                        modifiers: modifiers.iter().map(|m| (*m).into()).collect(),
                        pos: (*pos).into(),
                        units: *units,
                    })
                    .collect(),
            ),
            Hold => (Outcome::Hold, vec![]),
            NotBillable => (Outcome::NotBillable, vec![]),
        };
        if decision.outcome != outcome
            || decision.codes != codes
            || decision.policy_version != row.version
        {
            failures.push(format!(
                "{}: expected {outcome:?} {codes:?} (v{}), got {:?} {:?} (v{}); reasons {:?}",
                row.name,
                row.version,
                decision.outcome,
                decision.codes,
                decision.policy_version,
                decision.reasons
            ));
        }
        if decision.outcome != Outcome::Billable && decision.reasons.is_empty() {
            failures.push(format!(
                "{}: a {:?} decision without reasons",
                row.name, decision.outcome
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );

    // Every rule that ever shipped fired in some row, except the 98000-98015 guard,
    // which no shipped Medicare rule can reach (see the next test).
    let mut every_rule: BTreeSet<String> = history
        .versions()
        .iter()
        .flat_map(|v| v.rules.iter().map(|r| r.rule.name.clone()))
        .collect();
    every_rule.remove("medicare-cpt-telemedicine-98000-98015-not-payable");
    let never_fired: Vec<_> = every_rule.difference(&fired).collect();
    assert!(
        never_fired.is_empty(),
        "rules no row exercises: {never_fired:?}"
    );
}

/// DOMAIN: 98000-98015 are not paid by Medicare. The guard is in every Medicare version
/// from v1, and no Medicare scenario of any shape yields one of those codes.
#[test]
fn medicare_never_bills_the_cpt_telemedicine_codes() {
    let history = history();
    for version in history.versions() {
        assert!(
            version
                .rules_of(chartline_domain::billing::RuleSet::Medicare)
                .any(|r| r.name == "medicare-cpt-telemedicine-98000-98015-not-payable"),
            "version {} lost the guard",
            version.version
        );
    }
    let mut evaluated = 0;
    for dos in ["2024-06-01", "2025-06-01", "2026-06-01"] {
        for (status, levels) in [("new", 2..=5), ("established", 1..=5)] {
            for level in levels {
                for modality in ["video", "audio_only"] {
                    for location in ["home", "other"] {
                        for site in ["physician_office", "fqhc", "rhc"] {
                            let scenario = json!({"date_of_service": dos, "payer": "medicare",
                                "service": "e_m_visit", "patient_status": status, "level": level,
                                "modality": modality, "patient_location": location, "site": site,
                                "patient_declined_video": true});
                            let decision = evaluate(
                                &Scenario::from_json(&scenario).unwrap(),
                                &history,
                                day(NOW),
                            )
                            .unwrap();
                            evaluated += 1;
                            for line in &decision.codes {
                                let numeric: u32 = line.code.parse().unwrap_or(0);
                                assert!(
                                    !(98000..=98015).contains(&numeric),
                                    "{scenario}: {line:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(evaluated, 3 * 9 * 2 * 2 * 3);
}

/// Issue 6's proof: a claim in the autumn-2025 lapse is held with the policy known on
/// 2025-10-15 and billable with the policy known on 2025-11-20; the decisions cite
/// different versions and rule traces.
#[test]
fn autumn_2025_lapse_hold_then_billable() {
    let history = history();
    let scenario = Scenario::from_json(&em("2025-10-15")).unwrap();
    let held = evaluate(&scenario, &history, day("2025-10-15")).unwrap();
    assert_eq!(held.outcome, Outcome::Hold);
    assert_eq!(held.codes, vec![]);
    assert_eq!(
        (held.policy_version, held.policy_recorded_at),
        (4, day("2025-10-01"))
    );
    assert_eq!(
        held.rule_trace,
        vec![
            "medicare-home-needs-home-originating-site",
            "medicare-telehealth-flexibilities-lapse-2025-10-01"
        ]
    );
    let billed = evaluate(&scenario, &history, day("2025-11-20")).unwrap();
    assert_eq!(billed.outcome, Outcome::Billable);
    assert_eq!(
        billed.codes,
        vec![AssignedCode {
            code: "99213".into(),
            modifiers: vec![],
            pos: "10".into(),
            units: 1
        }]
    );
    assert_eq!(
        (billed.policy_version, billed.policy_recorded_at),
        (7, day("2025-11-12"))
    );
    assert_eq!(
        billed.rule_trace,
        vec![
            "medicare-home-needs-home-originating-site",
            "medicare-telehealth-flexibilities",
            "medicare-em-established-patient",
            "medicare-pos-10-home",
        ]
    );
}

#[test]
fn the_shipped_history_is_the_documented_one() {
    let history = history();
    let listed: Vec<(u64, String)> = history
        .versions()
        .iter()
        .map(|v| (v.version, v.recorded_at.to_string()))
        .collect();
    let expected: Vec<(u64, String)> = [
        "2025-01-01",
        "2025-01-01",
        "2025-03-15",
        "2025-10-01",
        "2025-10-31",
        "2025-10-31",
        "2025-11-12",
        "2026-01-31",
        "2026-02-03",
    ]
    .iter()
    .enumerate()
    .map(|(i, d)| (i as u64 + 1, d.to_string()))
    .collect();
    assert_eq!(listed, expected);
    // The file name carries the version and recorded date; keep them honest.
    for ((path, _), version) in SHIPPED_POLICY_FILES.iter().zip(history.versions()) {
        let name = path.rsplit('/').next().unwrap();
        assert!(
            name.starts_with(&format!("{:04}-{}-", version.version, version.recorded_at)),
            "{path} does not match version {} recorded {}",
            version.version,
            version.recorded_at
        );
    }
}

#[test]
fn policy_file_errors_name_the_file_and_problem() {
    let ok = r#"
version = 1
recorded_at = "2025-01-01"
rule_set = "medicare"
summary = "s"
[[rule]]
name = "a"
valid_from = "2025-01-01"
then = { kind = "modifier", modifier = "95" }
"#;
    assert_eq!(
        load_policy_files([("policies/medicare/x.toml", ok)])
            .unwrap()
            .versions()
            .len(),
        1
    );

    let error = parse_policy_file("policies/commercial-default/x.toml", ok).unwrap_err();
    assert_eq!(
        error.to_string(),
        "policies/commercial-default/x.toml: declares rule_set \"medicare\" but lives in the \"commercial-default\" folder"
    );
    let typo = ok.replace("valid_from", "valid_form");
    let error = parse_policy_file("policies/medicare/x.toml", &typo)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("policies/medicare/x.toml: ") && error.contains("valid_form"),
        "{error}"
    );
    let unknown_kind = ok.replace("\"modifier\", modifier", "\"modifer\", modifier");
    let error = parse_policy_file("policies/medicare/x.toml", &unknown_kind)
        .unwrap_err()
        .to_string();
    assert!(error.contains("modifer"), "{error}");
    let bad_date = ok.replace(
        "recorded_at = \"2025-01-01\"",
        "recorded_at = \"2025-02-30\"",
    );
    assert_ne!(bad_date, ok);
    assert!(parse_policy_file("policies/medicare/x.toml", &bad_date).is_err());

    let second = ok.replace("version = 1", "version = 3");
    let error = load_policy_files([
        ("a/medicare/1.toml", ok),
        ("a/medicare/3.toml", second.as_str()),
    ])
    .unwrap_err()
    .to_string();
    assert_eq!(
        error,
        "a/medicare/3.toml: policy version 3 is out of sequence; expected version 2"
    );
}
