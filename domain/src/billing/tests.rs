//! Evaluator, policy-history and scenario tests against small inline policies. The
//! table over the real shipped policy files lives in `chartline-proto`, which parses
//! them.

use chrono::{NaiveDate, TimeZone, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::encounter::{
    AppointmentType, AssignedCode, CodesAssigned, CodingOutcome, ConsultationEnded,
    ConsultationStarted, Encounter, EncounterEvent, Modality, PatientLocation, PatientStatus,
    Payer, Scheduled, ServiceKind, Site, VisitType,
};
use crate::testing::given;

fn day(text: &str) -> NaiveDate {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
}

fn change(value: Value) -> PolicyChange {
    serde_json::from_value(value).unwrap()
}

/// A miniature Medicare-like history: v1 grants the home flexibility through
/// 2025-09-30; v2 (known 2025-10-01) records a lapse; v3 (known 2025-11-12) restores it
/// retroactively through 2026-01-30 and retires the lapse.
fn history() -> PolicyHistory {
    let flexibility = |through: &str| {
        json!({"name": "flex", "valid_from": "2022-01-01", "valid_through": through,
               "then": {"kind": "grants_flexibilities", "flexibilities": ["home_originating_site"]}})
    };
    PolicyHistory::from_changes([
        change(json!({
            "version": 1, "recorded_at": "2025-01-01", "rule_set": "medicare", "summary": "base",
            "upsert": [
                {"name": "pos-10", "valid_from": "2022-01-01",
                 "when": {"patient_location": ["home"]}, "then": {"kind": "place_of_service", "pos": "10"}},
                {"name": "pos-02", "valid_from": "2022-01-01",
                 "when": {"patient_location": ["other"]}, "then": {"kind": "place_of_service", "pos": "02"}},
                {"name": "em-est", "valid_from": "2022-01-01",
                 "when": {"service": ["e_m_visit"], "patient_status": ["established"]},
                 "then": {"kind": "procedure_code", "levels": [{"level": 3, "code": "99213"},
                                                                {"level": 4, "code": "99214"}]}},
                {"name": "check-in-g2012", "valid_from": "2022-01-01", "valid_through": "2024-12-31",
                 "when": {"service": ["virtual_check_in"]}, "then": {"kind": "procedure_code", "code": "G2012"}},
                {"name": "check-in-98016", "valid_from": "2025-01-01",
                 "when": {"service": ["virtual_check_in"]}, "then": {"kind": "procedure_code", "code": "98016"}},
                {"name": "mod-95", "valid_from": "2022-01-01", "valid_through": "2023-12-31",
                 "when": {"modality": ["video"], "service": ["e_m_visit"]}, "then": {"kind": "modifier", "modifier": "95"}},
                {"name": "mod-93", "valid_from": "2025-01-01",
                 "when": {"modality": ["audio_only"]}, "then": {"kind": "modifier", "modifier": "93"}},
                {"name": "audio-needs-declined", "valid_from": "2025-01-01",
                 "when": {"modality": ["audio_only"], "patient_declined_video": false},
                 "then": {"kind": "deny", "reason": "patient did not decline video"}},
                {"name": "home-needs-flex", "valid_from": "2022-01-01",
                 "when": {"service": ["e_m_visit"], "patient_location": ["home"]},
                 "then": {"kind": "requires_flexibility", "flexibility": "home_originating_site"}},
                flexibility("2025-09-30"),
                {"name": "no-980xx", "valid_from": "2025-01-01",
                 "then": {"kind": "not_payable", "code_ranges": [["98000", "98015"]], "reason": "not paid"}},
            ]
        })),
        change(json!({
            "version": 2, "recorded_at": "2025-10-01", "rule_set": "medicare", "summary": "lapse",
            "upsert": [{"name": "lapse", "valid_from": "2025-10-01",
                        "then": {"kind": "flexibility_lapse", "flexibilities": ["home_originating_site"],
                                 "reason": "expired"}}]
        })),
        change(json!({
            "version": 3, "recorded_at": "2025-11-12", "rule_set": "medicare", "summary": "restore",
            "retire": ["lapse"],
            "upsert": [flexibility("2026-01-30")]
        })),
    ])
    .unwrap()
}

fn visit(dos: &str, modality: &str, location: &str) -> Value {
    json!({"date_of_service": dos, "payer": "medicare", "service": "e_m_visit",
           "patient_status": "established", "level": 3, "modality": modality,
           "patient_location": location, "site": "physician_office"})
}

fn decide(scenario: Value, known_at: &str) -> Decision {
    let scenario = Scenario::from_json(&scenario).unwrap();
    evaluate(&scenario, &history(), day(known_at)).unwrap()
}

fn line(code: &str, modifiers: &[&str], pos: &str, units: u32) -> AssignedCode {
    AssignedCode {
        code: code.into(),
        modifiers: modifiers.iter().map(|m| m.to_string()).collect(),
        pos: pos.into(),
        units,
    }
}

#[test]
fn picks_the_latest_version_recorded_on_or_before_known_at() {
    let history = history();
    assert_eq!(history.as_known_at(day("2024-12-31")), None);
    assert_eq!(history.as_known_at(day("2025-01-01")).unwrap().version, 1);
    assert_eq!(history.as_known_at(day("2025-09-30")).unwrap().version, 1);
    assert_eq!(history.as_known_at(day("2025-10-01")).unwrap().version, 2);
    assert_eq!(history.as_known_at(day("2025-11-11")).unwrap().version, 2);
    assert_eq!(history.as_known_at(day("2025-11-12")).unwrap().version, 3);
    assert_eq!(history.latest().unwrap().version, 3);
    // Folding: v3 retired the lapse and replaced the window in place.
    let v3 = history.latest().unwrap();
    assert!(v3.rules_of(RuleSet::Medicare).all(|r| r.name != "lapse"));
    let flex = v3
        .rules_of(RuleSet::Medicare)
        .find(|r| r.name == "flex")
        .unwrap();
    assert_eq!(flex.valid_through, Some(day("2026-01-30")));
    assert_eq!(v3.rule_count(RuleSet::Medicare), 11);
    assert_eq!(v3.rule_count(RuleSet::CommercialDefault), 0);
}

#[test]
fn a_lapse_holds_and_a_retroactive_restoration_makes_it_billable() {
    let scenario = visit("2025-10-15", "video", "home");
    let held = decide(scenario.clone(), "2025-10-15");
    assert_eq!(held.outcome, Outcome::Hold);
    assert_eq!(held.codes, vec![]);
    assert_eq!(held.policy_version, 2);
    assert_eq!(held.rule_trace, vec!["home-needs-flex", "lapse"]);
    assert!(
        held.reasons[0].contains("lapsed from 2025-10-01"),
        "{:?}",
        held.reasons
    );

    let billed = decide(scenario.clone(), "2025-11-20");
    assert_eq!(billed.outcome, Outcome::Billable);
    assert_eq!(billed.codes, vec![line("99213", &[], "10", 1)]);
    assert_eq!(billed.policy_version, 3);
    assert_eq!(billed.policy_recorded_at, day("2025-11-12"));
    assert_eq!(
        billed.rule_trace,
        vec!["home-needs-flex", "flex", "em-est", "pos-10"]
    );

    // Known before the lapse was recorded: the window had simply ended, no lapse known.
    let before = decide(scenario, "2025-09-01");
    assert_eq!(before.outcome, Outcome::NotBillable);
    assert_eq!(before.policy_version, 1);
    assert_eq!(
        before.reasons,
        vec![
            "requires the telehealth flexibility home_originating_site, which is not in force on 2025-10-15"
        ]
    );
}

#[test]
fn services_without_the_requirement_are_unaffected_by_the_lapse() {
    let other = decide(visit("2025-10-15", "video", "other"), "2025-10-15");
    assert_eq!(other.outcome, Outcome::Billable);
    assert_eq!(other.codes, vec![line("99213", &[], "02", 1)]);
}

#[test]
fn modifiers_follow_their_valid_time() {
    let before = decide(visit("2023-12-31", "video", "other"), "2025-11-20");
    assert_eq!(before.codes, vec![line("99213", &["95"], "02", 1)]);
    let after = decide(visit("2024-01-01", "video", "other"), "2025-11-20");
    assert_eq!(after.codes, vec![line("99213", &[], "02", 1)]);
}

#[test]
fn a_denial_beats_a_hold() {
    let mut scenario = visit("2025-10-15", "audio_only", "home");
    scenario["patient_declined_video"] = json!(false);
    let decision = decide(scenario.clone(), "2025-10-15");
    assert_eq!(decision.outcome, Outcome::NotBillable);
    assert_eq!(
        decision.rule_trace,
        vec!["audio-needs-declined", "home-needs-flex", "lapse"]
    );
    assert_eq!(decision.reasons[0], "patient did not decline video");

    scenario["patient_declined_video"] = json!(true);
    let decision = decide(scenario, "2025-11-20");
    assert_eq!(decision.codes, vec![line("99213", &["93"], "10", 1)]);
}

#[test]
fn the_check_in_code_changes_on_2025_01_01() {
    let check_in = |dos: &str| {
        json!({"date_of_service": dos, "payer": "medicare", "service": "virtual_check_in",
               "patient_status": "established", "modality": "audio_only",
               "patient_location": "other", "site": "physician_office",
               "patient_declined_video": true})
    };
    assert_eq!(
        decide(check_in("2024-12-31"), "2025-11-20").codes,
        vec![line("G2012", &[], "02", 1)]
    );
    assert_eq!(
        decide(check_in("2025-01-01"), "2025-11-20").codes,
        vec![line("98016", &["93"], "02", 1)]
    );
}

#[test]
fn not_payable_codes_are_refused_whatever_selected_them() {
    let mut history = history();
    history
        .append(change(json!({
            "version": 4, "recorded_at": "2025-12-01", "rule_set": "medicare",
            "summary": "a mistaken mapping to the CPT telemedicine codes",
            "upsert": [{"name": "em-est", "valid_from": "2022-01-01",
                        "when": {"service": ["e_m_visit"]},
                        "then": {"kind": "procedure_code", "levels": [{"level": 3, "code": "98006"}]}}]
        })))
        .unwrap();
    let scenario = Scenario::from_json(&visit("2025-06-01", "video", "other")).unwrap();
    let decision = evaluate(&scenario, &history, day("2025-12-01")).unwrap();
    assert_eq!(decision.outcome, Outcome::NotBillable);
    assert_eq!(decision.reasons, vec!["98006: not paid"]);
    assert_eq!(decision.rule_trace, vec!["em-est", "no-980xx"]);
}

#[test]
fn overlapping_single_slot_rules_are_a_policy_error() {
    let mut history = history();
    history
        .append(change(json!({
            "version": 4, "recorded_at": "2025-12-01", "rule_set": "medicare", "summary": "oops",
            "upsert": [{"name": "pos-11", "valid_from": "2022-01-01",
                        "then": {"kind": "place_of_service", "pos": "11"}}]
        })))
        .unwrap();
    let scenario = Scenario::from_json(&visit("2025-06-01", "video", "other")).unwrap();
    let error = evaluate(&scenario, &history, day("2025-12-01")).unwrap_err();
    assert_eq!(
        error,
        EvaluationError::ConflictingRules {
            policy_version: 4,
            kind: "place_of_service",
            rules: vec!["pos-02".into(), "pos-11".into()],
            date_of_service: day("2025-06-01"),
        }
    );
}

#[test]
fn no_policy_known_before_the_first_version() {
    let scenario = Scenario::from_json(&visit("2025-06-01", "video", "other")).unwrap();
    let error = evaluate(&scenario, &history(), day("2024-06-01")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "no billing policy was known on 2024-06-01 (the first version was recorded 2025-01-01)"
    );
}

fn rpm_history(extra: Vec<Value>) -> PolicyHistory {
    let mut rules = vec![
        json!({"name": "pos-11", "valid_from": "2022-01-01", "when": {"service": ["rpm_month"]},
               "then": {"kind": "place_of_service", "pos": "11"}}),
        json!({"name": "setup", "valid_from": "2022-01-01",
               "then": {"kind": "rpm_setup", "code": "99453", "min_days_with_readings": 16}}),
        json!({"name": "supply-99454", "valid_from": "2022-01-01",
               "then": {"kind": "rpm_device_supply", "code": "99454",
                        "min_days_with_readings": 16, "max_days_with_readings": 30}}),
        json!({"name": "supply-99445", "valid_from": "2026-01-01",
               "then": {"kind": "rpm_device_supply", "code": "99445",
                        "min_days_with_readings": 2, "max_days_with_readings": 15}}),
        json!({"name": "mgmt-99457", "valid_from": "2022-01-01",
               "then": {"kind": "rpm_management_first", "code": "99457", "min_minutes": 20,
                        "requires_interactive_communication": true}}),
        json!({"name": "mgmt-99470", "valid_from": "2026-01-01",
               "then": {"kind": "rpm_management_first", "code": "99470", "min_minutes": 10,
                        "max_minutes": 19, "requires_interactive_communication": true}}),
        json!({"name": "mgmt-99458", "valid_from": "2022-01-01",
               "then": {"kind": "rpm_management_additional", "code": "99458", "base_code": "99457",
                        "after_minutes": 20, "block_minutes": 20}}),
    ];
    rules.extend(extra);
    PolicyHistory::from_changes([change(json!({
        "version": 1, "recorded_at": "2025-01-01", "rule_set": "commercial_default",
        "summary": "rpm", "upsert": rules
    }))])
    .unwrap()
}

fn rpm(dos: &str, days: u32, minutes: u32, interactive: bool, setup: bool) -> Scenario {
    Scenario::from_json(&json!({
        "date_of_service": dos, "payer": "commercial", "service": "rpm_month",
        "site": "physician_office", "period_start": dos, "days_with_readings": days,
        "management_minutes": minutes, "interactive_communication": interactive,
        "setup_this_episode": setup
    }))
    .unwrap()
}

#[test]
fn rpm_thresholds_and_exclusivity() {
    let history = rpm_history(vec![]);
    let codes = |scenario: Scenario| {
        evaluate(&scenario, &history, day("2026-06-01"))
            .unwrap()
            .codes
    };
    assert_eq!(
        codes(rpm("2025-12-01", 16, 20, true, true)),
        vec![
            line("99453", &[], "11", 1),
            line("99454", &[], "11", 1),
            line("99457", &[], "11", 1)
        ]
    );
    assert_eq!(
        codes(rpm("2025-12-01", 15, 39, true, false)),
        vec![line("99457", &[], "11", 1)]
    );
    assert_eq!(
        codes(rpm("2025-12-01", 30, 40, true, false)),
        vec![
            line("99454", &[], "11", 1),
            line("99457", &[], "11", 1),
            line("99458", &[], "11", 1)
        ]
    );
    assert_eq!(
        codes(rpm("2026-01-01", 15, 19, true, false)),
        vec![line("99445", &[], "11", 1), line("99470", &[], "11", 1)]
    );
    assert_eq!(
        codes(rpm("2026-01-01", 2, 61, true, false)),
        vec![
            line("99445", &[], "11", 1),
            line("99457", &[], "11", 1),
            line("99458", &[], "11", 2)
        ]
    );
    let none = evaluate(
        &rpm("2025-12-01", 15, 19, true, false),
        &history,
        day("2026-06-01"),
    )
    .unwrap();
    assert_eq!(none.outcome, Outcome::NotBillable);
    assert_eq!(
        none.reasons,
        vec![
            "no device-supply code for 15 days of readings (in force: 99454 16-30 days)",
            "no treatment-management code for 19 minutes (in force: 99457 >= 20 min)",
        ]
    );
    let no_interaction = evaluate(
        &rpm("2025-12-01", 20, 45, false, false),
        &history,
        day("2026-06-01"),
    )
    .unwrap();
    assert_eq!(no_interaction.codes, vec![line("99454", &[], "11", 1)]);
    assert_eq!(
        no_interaction.reasons[1],
        "99457 not billed: no interactive communication with the patient this month"
    );
}

#[test]
fn overlapping_device_supply_ranges_are_a_policy_error() {
    let history = rpm_history(vec![json!({
        "name": "supply-overlap", "valid_from": "2026-01-01",
        "then": {"kind": "rpm_device_supply", "code": "99999",
                 "min_days_with_readings": 10, "max_days_with_readings": 20}})]);
    let error = evaluate(
        &rpm("2026-01-01", 16, 0, false, false),
        &history,
        day("2026-06-01"),
    )
    .unwrap_err();
    assert!(
        matches!(&error, EvaluationError::ConflictingRules { kind: "rpm_device_supply", rules, .. }
            if rules == &["supply-99454", "supply-overlap"]),
        "{error:?}"
    );
}

#[test]
fn history_rejects_malformed_changes() {
    let base = || {
        json!({"version": 1, "recorded_at": "2025-01-01", "rule_set": "medicare", "summary": "s",
               "upsert": [{"name": "a", "valid_from": "2025-01-01",
                           "then": {"kind": "modifier", "modifier": "95"}}]})
    };
    let mut gap = base();
    gap["version"] = json!(2);
    assert_eq!(
        PolicyHistory::from_changes([change(gap)]).unwrap_err(),
        PolicyError::VersionOutOfSequence {
            expected: 1,
            found: 2
        }
    );
    let mut backwards = base();
    backwards["version"] = json!(2);
    backwards["recorded_at"] = json!("2024-12-31");
    assert!(matches!(
        PolicyHistory::from_changes([change(base()), change(backwards)]).unwrap_err(),
        PolicyError::RecordedTimeWentBackwards { version: 2, .. }
    ));
    let mut reversed = base();
    reversed["upsert"][0]["valid_through"] = json!("2024-01-01");
    assert!(matches!(
        PolicyHistory::from_changes([change(reversed)]).unwrap_err(),
        PolicyError::InvalidRule { rule, .. } if rule == "a"
    ));
    let mut retire_unknown = base();
    retire_unknown["retire"] = json!(["nope"]);
    assert!(matches!(
        PolicyHistory::from_changes([change(retire_unknown)]).unwrap_err(),
        PolicyError::RetiresUnknownRule { rule, .. } if rule == "nope"
    ));
    let mut bad_pos = base();
    bad_pos["upsert"][0]["then"] = json!({"kind": "place_of_service", "pos": "1O"});
    assert!(matches!(
        PolicyHistory::from_changes([change(bad_pos)]).unwrap_err(),
        PolicyError::InvalidRule { .. }
    ));
    // Unknown keys in a rule are rejected when parsing, not silently ignored.
    let mut typo = base();
    typo["upsert"][0]["valid_thru"] = json!("2026-01-01");
    assert!(serde_json::from_value::<PolicyChange>(typo).is_err());
}

#[track_caller]
fn rejects(scenario: Value, field: &str, message: &str) {
    let error = Scenario::from_json(&scenario).unwrap_err();
    assert_eq!(error.field(), Some(field), "{error}");
    assert_eq!(error.to_string(), message);
}

#[test]
fn bad_input_names_the_field() {
    let good = visit("2025-06-01", "video", "home");
    assert!(Scenario::from_json(&good).is_ok());
    let with = |key: &str, value: Value| {
        let mut scenario = good.clone();
        scenario[key] = value;
        scenario
    };
    let without = |key: &str| {
        let mut scenario = good.clone();
        scenario.as_object_mut().unwrap().remove(key);
        scenario
    };
    rejects(
        with("service", json!("surgery")),
        "service",
        "field `service`: \"surgery\" is not one of e_m_visit, virtual_check_in, rpm_month",
    );
    rejects(
        with("level", json!(6)),
        "level",
        "field `level`: E/M level 6 is not 1-5",
    );
    rejects(
        with("level", json!(0)),
        "level",
        "field `level`: E/M level 0 is not 1-5",
    );
    rejects(
        with("level", json!("3")),
        "level",
        "field `level`: \"3\" is not a whole number 1-5",
    );
    rejects(
        with("patient_status", json!("new")).tap(|s| s["level"] = json!(1)),
        "level",
        "field `level`: new-patient E/M starts at level 2 (99201 was deleted in 2021)",
    );
    rejects(
        with("date_of_service", json!("2025-02-30")),
        "date_of_service",
        "field `date_of_service`: \"2025-02-30\" is not a calendar date YYYY-MM-DD",
    );
    rejects(
        with("date_of_service", json!("06/01/2025")),
        "date_of_service",
        "field `date_of_service`: \"06/01/2025\" is not a calendar date YYYY-MM-DD",
    );
    rejects(without("payer"), "payer", "field `payer` is missing");
    rejects(
        without("level"),
        "level",
        "field `level` is missing (required for e_m_visit)",
    );
    rejects(
        without("modality"),
        "modality",
        "field `modality` is missing (required for e_m_visit)",
    );
    rejects(
        with("payer", json!("medicaid")),
        "payer",
        "field `payer`: \"medicaid\" is not one of medicare, commercial",
    );
    rejects(
        with("levle", json!(3)),
        "levle",
        "field `levle` is not a scenario field",
    );
    rejects(
        with("days_with_readings", json!(20)),
        "days_with_readings",
        "field `days_with_readings` does not apply to e_m_visit",
    );
    rejects(
        with("patient_declined_video", json!("yes")),
        "patient_declined_video",
        "field `patient_declined_video`: \"yes\" is not true or false",
    );
    rejects(
        with("service", json!("virtual_check_in")),
        "level",
        "field `level` does not apply to virtual_check_in",
    );
    assert_eq!(
        Scenario::from_json(&json!([1])).unwrap_err(),
        ScenarioError::NotAnObject
    );
}

#[test]
fn bad_rpm_input_names_the_field() {
    let good = json!({"date_of_service": "2026-01-20", "payer": "medicare", "service": "rpm_month",
                      "site": "rhc", "period_start": "2026-01-01", "days_with_readings": 12,
                      "management_minutes": 15, "interactive_communication": true,
                      "setup_this_episode": false});
    let scenario = Scenario::from_json(&good).unwrap();
    assert_eq!(
        scenario.to_json(),
        good,
        "to_json is the inverse of from_json"
    );
    let with = |key: &str, value: Value| {
        let mut scenario = good.clone();
        scenario[key] = value;
        scenario
    };
    rejects(
        with("days_with_readings", json!(31)),
        "days_with_readings",
        "field `days_with_readings`: 31 days do not fit a 30-day period",
    );
    rejects(
        with("days_with_readings", json!(-1)),
        "days_with_readings",
        "field `days_with_readings`: -1 is not a whole number >= 0",
    );
    rejects(
        with("period_start", json!("2026-01-21")),
        "period_start",
        "field `period_start`: the period starts 2026-01-21 after the date of service 2026-01-20",
    );
    rejects(
        with("date_of_service", json!("2026-01-31")),
        "date_of_service",
        "field `date_of_service`: 2026-01-31 is outside the 30-day period 2026-01-01..=2026-01-30",
    );
    rejects(
        with("modality", json!("video")),
        "modality",
        "field `modality` does not apply to rpm_month",
    );
    let mut missing = good.clone();
    missing
        .as_object_mut()
        .unwrap()
        .remove("setup_this_episode");
    rejects(
        missing,
        "setup_this_episode",
        "field `setup_this_episode` is missing (required for rpm_month)",
    );
}

trait Tap: Sized {
    fn tap(mut self, change: impl FnOnce(&mut Self)) -> Self {
        change(&mut self);
        self
    }
}
impl Tap for Value {}

fn encounter_events(started_at: chrono::DateTime<Utc>, used: Modality) -> Vec<EncounterEvent> {
    let at = Utc.with_ymd_and_hms(2025, 10, 1, 9, 0, 0).unwrap();
    vec![
        EncounterEvent::Scheduled(Scheduled {
            encounter_id: Uuid::nil(),
            patient_id: Uuid::nil(),
            practitioner_id: "practitioner-synthetic-1".into(),
            visit_type: VisitType {
                service: ServiceKind::EMVisit,
                patient_status: PatientStatus::Established,
                level: Some(4),
                appointment_type: AppointmentType::Followup,
            },
            planned_modality: Modality::Video,
            window_start: started_at,
            window_end: started_at + chrono::Duration::minutes(30),
            patient_location: PatientLocation::Home,
            payer: Payer::Medicare,
            site: Site::PhysicianOffice,
            at,
        }),
        EncounterEvent::ConsultationStarted(ConsultationStarted {
            modality: Modality::Video,
            at: started_at,
        }),
        EncounterEvent::ConsultationEnded(ConsultationEnded {
            duration_seconds: 1200,
            video_seconds: if used == Modality::Video { 1200 } else { 0 },
            audio_only_seconds: if used == Modality::AudioOnly { 1200 } else { 0 },
            modality_used: used,
            at: started_at + chrono::Duration::minutes(20),
        }),
    ]
}

#[test]
fn an_encounter_becomes_a_scenario() {
    use crate::Aggregate;
    let started = Utc.with_ymd_and_hms(2025, 10, 15, 23, 30, 0).unwrap();
    let encounter = Encounter::replay(encounter_events(started, Modality::AudioOnly).iter());
    let scenario = Scenario::from_encounter(&encounter, true).unwrap();
    assert_eq!(
        scenario.to_json(),
        json!({"date_of_service": "2025-10-15", "payer": "medicare", "service": "e_m_visit",
               "site": "physician_office", "patient_status": "established", "level": 4,
               "modality": "audio_only", "patient_location": "home",
               "patient_declined_video": true})
    );
    let not_ended = Encounter::replay(encounter_events(started, Modality::Video)[..2].iter());
    assert_eq!(
        Scenario::from_encounter(&not_ended, false)
            .unwrap_err()
            .field(),
        Some("consultation_ended")
    );
    assert_eq!(
        Scenario::from_encounter(&Encounter::default(), false)
            .unwrap_err()
            .field(),
        Some("schedule")
    );
}

/// The bitemporal proof on the encounter stream: the decision made while the
/// lapse was known is recorded (hold), the one after the retroactive restoration is a
/// new CodesRevised event, and both stay in the history.
#[test]
fn the_encounter_history_keeps_both_decisions() {
    use crate::Aggregate;
    let started = Utc.with_ymd_and_hms(2025, 10, 15, 14, 0, 0).unwrap();
    let mut events = encounter_events(started, Modality::Video);
    // Billing needs a signed note first.
    let signed_at = started + chrono::Duration::minutes(40);
    events.push(EncounterEvent::NoteDrafted(crate::encounter::NoteDrafted {
        author: crate::encounter::NoteAuthor::Clinician {
            practitioner_id: "practitioner-synthetic-1".into(),
        },
        note_type: crate::encounter::NoteType::ProgressNote,
        sections: crate::encounter::SoapSections {
            subjective: "synthetic".into(),
            objective: "synthetic".into(),
            assessment: "synthetic".into(),
            plan: "synthetic".into(),
        },
        at: signed_at,
    }));
    events.push(EncounterEvent::NoteSigned(crate::encounter::NoteSigned {
        practitioner_id: "practitioner-synthetic-1".into(),
        ai_assisted: false,
        at: signed_at,
    }));
    let encounter = Encounter::replay(events.iter());
    let scenario = Scenario::from_encounter(&encounter, false).unwrap();

    let held = evaluate(&scenario, &history(), day("2025-10-15")).unwrap();
    let held_at = Utc.with_ymd_and_hms(2025, 10, 15, 18, 0, 0).unwrap();
    let after_hold = given::<Encounter>(events.clone())
        .when(held.assign_codes_command(held_at))
        .then(vec![EncounterEvent::CodesAssigned(CodesAssigned {
            outcome: CodingOutcome::Hold {
                reasons: held.reasons.clone(),
            },
            policy_version: 2,
            rule_trace: vec!["home-needs-flex".into(), "lapse".into()],
            at: held_at,
        })]);
    assert!(after_hold.coding.is_some());

    let billed = evaluate(&scenario, &history(), day("2025-11-20")).unwrap();
    let billed_at = Utc.with_ymd_and_hms(2025, 11, 20, 8, 0, 0).unwrap();
    let first = EncounterEvent::CodesAssigned(CodesAssigned {
        outcome: held.coding_outcome(),
        policy_version: held.policy_version,
        rule_trace: held.rule_trace.clone(),
        at: held_at,
    });
    events.push(first);
    given::<Encounter>(events)
        .when(billed.assign_codes_command(billed_at))
        .then(vec![EncounterEvent::CodesRevised(CodesAssigned {
            outcome: CodingOutcome::Billable {
                codes: vec![line("99214", &[], "10", 1)],
            },
            policy_version: 3,
            rule_trace: vec![
                "home-needs-flex".into(),
                "flex".into(),
                "em-est".into(),
                "pos-10".into(),
            ],
            at: billed_at,
        })]);
}
