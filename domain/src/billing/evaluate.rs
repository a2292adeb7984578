//! The billing decision: (scenario, policy as known on day T) → billable codes, hold or
//! not billable, with the reasons, the names of the rules that fired and the policy
//! version used.
//!
//! Pure and total over valid input: the same scenario, history and `known_at` always
//! give the same decision, so replaying a claim under an older policy version explains
//! what was decided then. Precedence: a denial beats a hold (a restoration cannot make a
//! denied claim billable), a hold beats billing.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::encounter::{
    AssignedCode, CodingOutcome, EncounterCommand, Modality, PatientLocation, PatientStatus, Site,
};

use super::policy::{
    Effect, Flexibility, PolicyHistory, PolicyVersion, Rule, RuleSet, numeric_code,
};
use super::scenario::{BillingService, RpmMonth, Scenario, ScenarioError, ServiceFacts, VisitKind};

/// Which way the decision went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Billable,
    /// Not billable now but may become so (a flexibility lapse that may be restored
    /// retroactively, or a claim a human must code). Never released; re-evaluated when
    /// a new policy version is appended.
    Hold,
    NotBillable,
}

/// A billing decision. Invariant: `codes` is non-empty exactly when `outcome` is
/// `billable`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub codes: Vec<AssignedCode>,
    pub reasons: Vec<String>,
    /// Names of the rules that fired, in evaluation order, without duplicates.
    pub rule_trace: Vec<String>,
    pub policy_version: u64,
    pub policy_recorded_at: NaiveDate,
}

impl Decision {
    /// The outcome as the encounter stream records it.
    pub fn coding_outcome(&self) -> CodingOutcome {
        match self.outcome {
            Outcome::Billable => CodingOutcome::Billable {
                codes: self.codes.clone(),
            },
            Outcome::Hold => CodingOutcome::Hold {
                reasons: self.reasons.clone(),
            },
            Outcome::NotBillable => CodingOutcome::NotBillable {
                reasons: self.reasons.clone(),
            },
        }
    }

    /// The command the billing service sends to the encounter to record this decision.
    pub fn assign_codes_command(&self, at: DateTime<Utc>) -> EncounterCommand {
        EncounterCommand::AssignCodes {
            outcome: self.coding_outcome(),
            policy_version: self.policy_version,
            rule_trace: self.rule_trace.clone(),
            at,
        }
    }
}

/// Why no decision could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluationError {
    /// Bad input: fix the named field (HTTP 400, CLI exit 2).
    #[error(transparent)]
    InvalidScenario(#[from] ScenarioError),
    /// `known_at` is before the first policy version was recorded: ask about a later
    /// day, or load the policy history.
    #[error("no billing policy was known on {known_at}{}", first_recorded(.first_recorded_at))]
    NoPolicyKnown {
        known_at: NaiveDate,
        first_recorded_at: Option<NaiveDate>,
    },
    /// The policy is defective: several rules claim the same single slot. Fix the policy
    /// file; retrying will not help.
    #[error(
        "policy version {policy_version}: rules {rules:?} all apply as {kind} on {date_of_service}"
    )]
    ConflictingRules {
        policy_version: u64,
        kind: &'static str,
        rules: Vec<String>,
        date_of_service: NaiveDate,
    },
}

fn first_recorded(first: &Option<NaiveDate>) -> String {
    first
        .map(|day| format!(" (the first version was recorded {day})"))
        .unwrap_or_else(|| " (the policy history is empty)".into())
}

/// Evaluates `scenario` against the policy as it was known on `known_at`.
pub fn evaluate(
    scenario: &Scenario,
    history: &PolicyHistory,
    known_at: NaiveDate,
) -> Result<Decision, EvaluationError> {
    scenario.validate()?;
    let version = history
        .as_known_at(known_at)
        .ok_or_else(|| EvaluationError::NoPolicyKnown {
            known_at,
            first_recorded_at: history.versions().first().map(|v| v.recorded_at),
        })?;
    evaluate_with_version(scenario, version)
}

/// Evaluates `scenario` against one policy version (used by `evaluate`, and by the
/// billing service when it re-evaluates held claims for a newly appended version).
pub fn evaluate_with_version(
    scenario: &Scenario,
    version: &PolicyVersion,
) -> Result<Decision, EvaluationError> {
    scenario.validate()?;
    let facts = Facts::of(scenario);
    let date_of_service = scenario.date_of_service;
    let applicable: Vec<&Rule> = version
        .rules_of(RuleSet::for_payer(scenario.payer))
        .filter(|rule| rule.in_force_on(date_of_service) && facts.match_rule(rule))
        .collect();
    let mut run = Run {
        version,
        date_of_service,
        applicable,
        trace: Vec::new(),
        reasons: Vec::new(),
    };

    // 1. Denials, manual review and flexibility requirements decide whether to code.
    let mut denials = Vec::new();
    let mut holds = Vec::new();
    for rule in run.applicable.clone() {
        match &rule.then {
            Effect::Deny { reason } => {
                run.fired(rule);
                denials.push(reason.clone());
            }
            Effect::ManualReview { reason } => {
                run.fired(rule);
                holds.push(reason.clone());
            }
            Effect::RequiresFlexibility { flexibility } => {
                run.fired(rule);
                match run.check_flexibility(*flexibility) {
                    FlexibilityStatus::Granted => {}
                    FlexibilityStatus::Lapsed(reason) => holds.push(reason),
                    FlexibilityStatus::Absent(reason) => denials.push(reason),
                }
            }
            _ => {}
        }
    }
    if !denials.is_empty() {
        denials.extend(holds);
        return Ok(run.finish(Outcome::NotBillable, Vec::new(), denials));
    }
    if !holds.is_empty() {
        return Ok(run.finish(Outcome::Hold, Vec::new(), holds));
    }

    // 2. Codes.
    let lines = match &scenario.service {
        ServiceFacts::Visit { kind, .. } => run.visit_code(*kind, scenario.billing_service())?,
        ServiceFacts::RpmMonth(month) => run.rpm_codes(month)?,
    };
    if lines.is_empty() {
        let reasons = std::mem::take(&mut run.reasons);
        return Ok(run.finish(Outcome::NotBillable, Vec::new(), reasons));
    }

    // 3. Codes this payer never pays.
    let mut refused = Vec::new();
    for (code, _) in &lines {
        for rule in run.applicable.clone() {
            if let Effect::NotPayable {
                codes,
                code_ranges,
                reason,
            } = &rule.then
                && code_is_listed(code, codes, code_ranges)
            {
                run.fired(rule);
                refused.push(format!("{code}: {reason}"));
            }
        }
    }
    if !refused.is_empty() {
        return Ok(run.finish(Outcome::NotBillable, Vec::new(), refused));
    }

    // 4. Place of service.
    let pos_rules = run.matching(|effect| match effect {
        Effect::PlaceOfService { pos } => Some(pos.clone()),
        _ => None,
    });
    let pos = match pos_rules.as_slice() {
        [] => {
            let reason = format!(
                "no place-of-service rule is in force for this scenario on {date_of_service}"
            );
            return Ok(run.finish(Outcome::NotBillable, Vec::new(), vec![reason]));
        }
        [(rule, pos)] => {
            run.fired(rule);
            run.reasons.push(format!("place of service {pos}"));
            pos.clone()
        }
        several => return Err(run.conflict("place_of_service", several)),
    };

    // 5. Modifiers, in rule order.
    let mut modifiers: Vec<String> = Vec::new();
    for (rule, modifier) in run.matching(|effect| match effect {
        Effect::Modifier { modifier } => Some(modifier.clone()),
        _ => None,
    }) {
        run.fired(rule);
        if !modifiers.contains(&modifier) {
            run.reasons.push(format!("modifier {modifier}"));
            modifiers.push(modifier);
        }
    }

    let codes = lines
        .into_iter()
        .map(|(code, units)| AssignedCode {
            code,
            modifiers: modifiers.clone(),
            pos: pos.clone(),
            units,
        })
        .collect();
    let reasons = std::mem::take(&mut run.reasons);
    Ok(run.finish(Outcome::Billable, codes, reasons))
}

fn code_is_listed(code: &str, codes: &[String], ranges: &[[String; 2]]) -> bool {
    codes.iter().any(|listed| listed == code)
        || numeric_code(code).is_some_and(|value| {
            ranges.iter().any(|[low, high]| {
                matches!((numeric_code(low), numeric_code(high)),
                    (Some(low), Some(high)) if (low..=high).contains(&value))
            })
        })
}

/// The scenario facts conditions are matched against; `None` for facts the service
/// does not have.
struct Facts {
    service: BillingService,
    patient_status: Option<PatientStatus>,
    modality: Option<Modality>,
    patient_location: Option<PatientLocation>,
    site: Site,
    patient_declined_video: Option<bool>,
}

impl Facts {
    fn of(scenario: &Scenario) -> Facts {
        let mut facts = Facts {
            service: scenario.billing_service(),
            patient_status: None,
            modality: None,
            patient_location: None,
            site: scenario.site,
            patient_declined_video: None,
        };
        if let ServiceFacts::Visit {
            patient_status,
            modality,
            patient_location,
            patient_declined_video,
            ..
        } = &scenario.service
        {
            facts.patient_status = Some(*patient_status);
            facts.modality = Some(*modality);
            facts.patient_location = Some(*patient_location);
            facts.patient_declined_video = Some(*patient_declined_video);
        }
        facts
    }

    fn match_rule(&self, rule: &Rule) -> bool {
        fn listed<T: PartialEq>(list: &[T], fact: Option<T>) -> bool {
            list.is_empty() || fact.is_some_and(|fact| list.contains(&fact))
        }
        let when = &rule.when;
        listed(&when.service, Some(self.service))
            && listed(&when.patient_status, self.patient_status)
            && listed(&when.modality, self.modality)
            && listed(&when.patient_location, self.patient_location)
            && listed(&when.site, Some(self.site))
            && when
                .patient_declined_video
                .is_none_or(|wanted| self.patient_declined_video == Some(wanted))
    }
}

enum FlexibilityStatus {
    Granted,
    Lapsed(String),
    Absent(String),
}

/// One evaluation in progress: the rules in force that match, and what fired.
struct Run<'a> {
    version: &'a PolicyVersion,
    date_of_service: NaiveDate,
    applicable: Vec<&'a Rule>,
    trace: Vec<String>,
    reasons: Vec<String>,
}

impl<'a> Run<'a> {
    fn fired(&mut self, rule: &Rule) {
        if !self.trace.contains(&rule.name) {
            self.trace.push(rule.name.clone());
        }
    }

    fn matching<T>(&self, select: impl Fn(&Effect) -> Option<T>) -> Vec<(&'a Rule, T)> {
        self.applicable
            .iter()
            .filter_map(|rule| select(&rule.then).map(|value| (*rule, value)))
            .collect()
    }

    fn conflict<T>(&self, kind: &'static str, rules: &[(&Rule, T)]) -> EvaluationError {
        EvaluationError::ConflictingRules {
            policy_version: self.version.version,
            kind,
            rules: rules.iter().map(|(rule, _)| rule.name.clone()).collect(),
            date_of_service: self.date_of_service,
        }
    }

    fn finish(self, outcome: Outcome, codes: Vec<AssignedCode>, reasons: Vec<String>) -> Decision {
        debug_assert_eq!(outcome == Outcome::Billable, !codes.is_empty());
        Decision {
            outcome,
            codes,
            reasons,
            rule_trace: self.trace,
            policy_version: self.version.version,
            policy_recorded_at: self.version.recorded_at,
        }
    }

    fn check_flexibility(&mut self, flexibility: Flexibility) -> FlexibilityStatus {
        let name = flexibility.as_str();
        let day = self.date_of_service;
        let granted = self.matching(|effect| match effect {
            Effect::GrantsFlexibilities { flexibilities }
                if flexibilities.contains(&flexibility) =>
            {
                Some(())
            }
            _ => None,
        });
        if let Some((rule, ())) = granted.first() {
            self.fired(rule);
            let through = rule
                .valid_through
                .map_or_else(|| "open-ended".to_owned(), |d| format!("through {d}"));
            self.reasons
                .push(format!("flexibility {name} in force on {day} ({through})"));
            return FlexibilityStatus::Granted;
        }
        let lapsed = self.matching(|effect| match effect {
            Effect::FlexibilityLapse {
                flexibilities,
                reason,
            } if flexibilities.contains(&flexibility) => Some(reason.clone()),
            _ => None,
        });
        if let Some((rule, reason)) = lapsed.first() {
            self.fired(rule);
            return FlexibilityStatus::Lapsed(format!(
                "flexibility {name} is not in force on {day} (lapsed from {}): {reason}; held for a possible retroactive restoration",
                rule.valid_from
            ));
        }
        FlexibilityStatus::Absent(format!(
            "requires the telehealth flexibility {name}, which is not in force on {day}"
        ))
    }

    fn visit_code(
        &mut self,
        kind: VisitKind,
        service: BillingService,
    ) -> Result<Vec<(String, u32)>, EvaluationError> {
        let candidates = self.matching(|effect| match effect {
            Effect::ProcedureCode {
                code: Some(code), ..
            } => Some(code.clone()),
            Effect::ProcedureCode { code: None, levels } => match kind {
                VisitKind::EMVisit { level } => levels
                    .iter()
                    .find(|entry| entry.level == level)
                    .map(|entry| entry.code.clone()),
                VisitKind::VirtualCheckIn => None,
            },
            _ => None,
        });
        match candidates.as_slice() {
            [] => {
                let level = match kind {
                    VisitKind::EMVisit { level } => format!(" level {level}"),
                    VisitKind::VirtualCheckIn => String::new(),
                };
                self.reasons.push(format!(
                    "no procedure code is in force for {}{level} on {}",
                    service.as_str(),
                    self.date_of_service
                ));
                Ok(Vec::new())
            }
            [(rule, code)] => {
                self.fired(rule);
                self.reasons
                    .insert(0, format!("{code} ({})", service.as_str()));
                Ok(vec![(code.clone(), 1)])
            }
            several => Err(self.conflict("procedure_code", several)),
        }
    }

    fn rpm_codes(&mut self, month: &RpmMonth) -> Result<Vec<(String, u32)>, EvaluationError> {
        let mut lines = Vec::new();
        let days = month.days_with_readings;
        let minutes = month.management_minutes;

        if month.setup_this_episode {
            let setup = self.matching(|effect| match effect {
                Effect::RpmSetup {
                    code,
                    min_days_with_readings,
                } => Some((code.clone(), *min_days_with_readings)),
                _ => None,
            });
            match setup.as_slice() {
                [] => self.reasons.push(format!(
                    "no RPM set-up code is in force on {}",
                    self.date_of_service
                )),
                [(rule, (code, min_days))] => {
                    self.fired(rule);
                    if days >= *min_days {
                        self.reasons
                            .push(format!("{code}: set-up, {days} days of readings"));
                        lines.push((code.clone(), 1));
                    } else {
                        self.reasons.push(format!(
                            "{code} not billed: set-up needs at least {min_days} days of readings, {days} recorded"
                        ));
                    }
                }
                several => return Err(self.conflict("rpm_setup", several)),
            }
        }

        let supply = self.matching(|effect| match effect {
            Effect::RpmDeviceSupply {
                code,
                min_days_with_readings,
                max_days_with_readings,
            } => Some((
                code.clone(),
                *min_days_with_readings,
                *max_days_with_readings,
            )),
            _ => None,
        });
        let fitting: Vec<_> = supply
            .iter()
            .filter(|(_, (_, min, max))| (*min..=*max).contains(&days))
            .cloned()
            .collect();
        match fitting.as_slice() {
            [] => self.reasons.push(format!(
                "no device-supply code for {days} days of readings (in force: {})",
                describe_ranges(
                    supply
                        .iter()
                        .map(|(_, (code, min, max))| (code, *min, Some(*max))),
                    "days"
                )
            )),
            [(rule, (code, min, max))] => {
                self.fired(rule);
                self.reasons.push(format!(
                    "{code}: device supply, {days} days of readings ({min}-{max})"
                ));
                lines.push((code.clone(), 1));
            }
            several => return Err(self.conflict("rpm_device_supply", several)),
        }

        let first = self.matching(|effect| match effect {
            Effect::RpmManagementFirst {
                code,
                min_minutes,
                max_minutes,
                requires_interactive_communication,
            } => Some((
                code.clone(),
                *min_minutes,
                *max_minutes,
                *requires_interactive_communication,
            )),
            _ => None,
        });
        let fitting: Vec<_> = first
            .iter()
            .filter(|(_, (_, min, max, _))| minutes >= *min && max.is_none_or(|max| minutes <= max))
            .cloned()
            .collect();
        let base_code = match fitting.as_slice() {
            [] => {
                self.reasons.push(format!(
                    "no treatment-management code for {minutes} minutes (in force: {})",
                    describe_ranges(
                        first
                            .iter()
                            .map(|(_, (code, min, max, _))| (code, *min, *max)),
                        "min"
                    )
                ));
                None
            }
            [(rule, (code, _, _, needs_interaction))] => {
                self.fired(rule);
                if *needs_interaction && !month.interactive_communication {
                    self.reasons.push(format!(
                        "{code} not billed: no interactive communication with the patient this month"
                    ));
                    None
                } else {
                    self.reasons
                        .push(format!("{code}: treatment management, {minutes} minutes"));
                    lines.push((code.clone(), 1));
                    Some(code.clone())
                }
            }
            several => return Err(self.conflict("rpm_management_first", several)),
        };

        if let Some(base_code) = base_code {
            let additional = self.matching(|effect| match effect {
                Effect::RpmManagementAdditional {
                    code,
                    base_code: base,
                    after_minutes,
                    block_minutes,
                } if *base == base_code => Some((code.clone(), *after_minutes, *block_minutes)),
                _ => None,
            });
            match additional.as_slice() {
                [] => {}
                [(rule, (code, after, block))] => {
                    let units = minutes.saturating_sub(*after) / block;
                    if units > 0 {
                        self.fired(rule);
                        self.reasons.push(format!(
                            "{code} x{units}: each additional {block} minutes beyond {after}"
                        ));
                        lines.push((code.clone(), units));
                    }
                }
                several => return Err(self.conflict("rpm_management_additional", several)),
            }
        }
        Ok(lines)
    }
}

fn describe_ranges<'c>(
    ranges: impl Iterator<Item = (&'c String, u32, Option<u32>)>,
    unit: &str,
) -> String {
    let described: Vec<String> = ranges
        .map(|(code, min, max)| match max {
            Some(max) => format!("{code} {min}-{max} {unit}"),
            None => format!("{code} >= {min} {unit}"),
        })
        .collect();
    if described.is_empty() {
        "none".into()
    } else {
        described.join(", ")
    }
}
