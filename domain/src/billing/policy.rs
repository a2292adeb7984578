//! Billing policy as bitemporal data: rules with a valid time (the dates of service they
//! apply to), grouped into versions with a recorded time (the day the policy became
//! known).
//!
//! A [`PolicyChange`] is one fact on the `policy-billing` stream: "on `recorded_at` we
//! learned that these rules of this rule set now read so, and these are retired".
//! Folding the changes in version order gives a [`PolicyHistory`] of complete
//! [`PolicyVersion`] snapshots; [`PolicyHistory::as_known_at`] answers "which policy did
//! we believe on day T", which is what makes an old decision explainable after a
//! retroactive change.
//!
//! The interpretation of each [`Effect`] lives in the evaluator; what codes, modifiers,
//! thresholds and dates apply is data, so a policy change is a new file, never a code
//! change.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::encounter::{Modality, PatientLocation, PatientStatus, Payer, Site};

use super::scenario::BillingService;

/// A payer family with its own rules. Every payer maps to exactly one rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleSet {
    /// Medicare Physician Fee Schedule and the telehealth statute (42 U.S.C. 1395m(m)).
    Medicare,
    /// What most commercial payers accept when no contract-specific rule is known.
    CommercialDefault,
}

impl RuleSet {
    pub fn for_payer(payer: Payer) -> RuleSet {
        match payer {
            Payer::Medicare => RuleSet::Medicare,
            Payer::Commercial => RuleSet::CommercialDefault,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RuleSet::Medicare => "medicare",
            RuleSet::CommercialDefault => "commercial_default",
        }
    }
}

/// A temporary Medicare telehealth flexibility (DOMAIN.md: extended, lapsed and restored
/// retroactively several times). Rules *require* them; windows *grant* them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flexibility {
    /// The patient's home counts as an originating site for non-behavioral services.
    HomeOriginatingSite,
    /// No rural / HPSA restriction on the originating site.
    NoGeographicLimit,
    /// Audio-only telehealth for non-behavioral services.
    AudioOnlyNonBehavioral,
    /// RHCs and FQHCs may act as distant site for non-behavioral telehealth.
    FqhcRhcDistantSite,
}

impl Flexibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Flexibility::HomeOriginatingSite => "home_originating_site",
            Flexibility::NoGeographicLimit => "no_geographic_limit",
            Flexibility::AudioOnlyNonBehavioral => "audio_only_non_behavioral",
            Flexibility::FqhcRhcDistantSite => "fqhc_rhc_distant_site",
        }
    }
}

/// Which scenarios a rule applies to. Every listed field must match (AND); inside a
/// field any listed value matches (OR); an empty list or absent flag matches anything.
/// A condition on a fact the scenario does not have (e.g. `modality` on an RPM month)
/// does not match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service: Vec<BillingService>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patient_status: Vec<PatientStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modality: Vec<Modality>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patient_location: Vec<PatientLocation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub site: Vec<Site>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_declined_video: Option<bool>,
}

/// One E/M level and the code billed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelCode {
    pub level: u8,
    pub code: String,
}

/// What a rule does when it is in force and its conditions match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Effect {
    /// Selects the procedure code: `code` for services without levels, or the entry of
    /// `levels` for the scenario's E/M level. At most one may select a code.
    ProcedureCode {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        levels: Vec<LevelCode>,
    },
    /// CMS place-of-service code for the line. Exactly one must match.
    PlaceOfService { pos: String },
    /// Appends a modifier (in rule order, without duplicates).
    Modifier { modifier: String },
    /// The claim is not billable; `reason` says why.
    Deny { reason: String },
    /// The claim needs a human coder (hold, not deny): the engine does not code it.
    ManualReview { reason: String },
    /// Codes this payer never pays, whatever selected them.
    NotPayable {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        codes: Vec<String>,
        /// Inclusive numeric ranges of 5-digit CPT codes, e.g. `["98000", "98015"]`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        code_ranges: Vec<[String; 2]>,
        reason: String,
    },
    /// The matched scenario is only billable while `flexibility` is granted.
    RequiresFlexibility { flexibility: Flexibility },
    /// A window of dates of service during which the flexibilities are in force.
    GrantsFlexibilities { flexibilities: Vec<Flexibility> },
    /// Dates of service on which the flexibilities have lapsed but restoration is
    /// expected: claims needing them are held, not denied.
    FlexibilityLapse {
        flexibilities: Vec<Flexibility>,
        reason: String,
    },
    /// RPM initial set-up and patient education, once per episode.
    RpmSetup {
        code: String,
        min_days_with_readings: u32,
    },
    /// RPM device supply per 30-day period. At most one per period (the day ranges of
    /// the rules in force must not overlap).
    RpmDeviceSupply {
        code: String,
        min_days_with_readings: u32,
        max_days_with_readings: u32,
    },
    /// The first block of RPM treatment management per calendar month. At most one per
    /// month (the minute ranges of the rules in force must not overlap).
    RpmManagementFirst {
        code: String,
        min_minutes: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_minutes: Option<u32>,
        requires_interactive_communication: bool,
    },
    /// Each further full block of management minutes beyond `after_minutes`, billed as
    /// units of an add-on code, only together with `base_code`.
    RpmManagementAdditional {
        code: String,
        base_code: String,
        after_minutes: u32,
        block_minutes: u32,
    },
}

impl Effect {
    pub fn kind(&self) -> &'static str {
        match self {
            Effect::ProcedureCode { .. } => "procedure_code",
            Effect::PlaceOfService { .. } => "place_of_service",
            Effect::Modifier { .. } => "modifier",
            Effect::Deny { .. } => "deny",
            Effect::ManualReview { .. } => "manual_review",
            Effect::NotPayable { .. } => "not_payable",
            Effect::RequiresFlexibility { .. } => "requires_flexibility",
            Effect::GrantsFlexibilities { .. } => "grants_flexibilities",
            Effect::FlexibilityLapse { .. } => "flexibility_lapse",
            Effect::RpmSetup { .. } => "rpm_setup",
            Effect::RpmDeviceSupply { .. } => "rpm_device_supply",
            Effect::RpmManagementFirst { .. } => "rpm_management_first",
            Effect::RpmManagementAdditional { .. } => "rpm_management_additional",
        }
    }
}

/// One rule: a name (unique within its rule set, used in rule traces), a valid-time
/// range of dates of service (inclusive; open-ended when `valid_through` is absent),
/// conditions and an effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub valid_from: NaiveDate,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_through: Option<NaiveDate>,
    #[serde(default)]
    pub when: Conditions,
    pub then: Effect,
}

impl Rule {
    /// Whether the rule applies to this date of service (valid time).
    pub fn in_force_on(&self, date_of_service: NaiveDate) -> bool {
        self.valid_from <= date_of_service
            && self
                .valid_through
                .is_none_or(|through| date_of_service <= through)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a rule has an empty name".into());
        }
        if let Some(through) = self.valid_through
            && through < self.valid_from
        {
            return Err(format!(
                "valid_through {through} is before valid_from {}",
                self.valid_from
            ));
        }
        match &self.then {
            Effect::ProcedureCode { code, levels } => match (code, levels.is_empty()) {
                (Some(_), false) | (None, true) => {
                    Err("procedure_code needs exactly one of `code` or `levels`".into())
                }
                (Some(code), true) => non_empty_code(code),
                (None, false) => levels.iter().try_for_each(|entry| {
                    if (1..=5).contains(&entry.level) {
                        non_empty_code(&entry.code)
                    } else {
                        Err(format!("E/M level {} is not 1-5", entry.level))
                    }
                }),
            },
            Effect::PlaceOfService { pos } => {
                if pos.len() == 2 && pos.chars().all(|c| c.is_ascii_digit()) {
                    Ok(())
                } else {
                    Err(format!("place of service {pos:?} is not two digits"))
                }
            }
            Effect::Modifier { modifier } => {
                if modifier.len() == 2 && modifier.chars().all(|c| c.is_ascii_alphanumeric()) {
                    Ok(())
                } else {
                    Err(format!("modifier {modifier:?} is not two characters"))
                }
            }
            Effect::Deny { reason } | Effect::ManualReview { reason } => non_empty_reason(reason),
            Effect::NotPayable {
                codes,
                code_ranges,
                reason,
            } => {
                non_empty_reason(reason)?;
                if codes.is_empty() && code_ranges.is_empty() {
                    return Err("not_payable lists no codes".into());
                }
                for [low, high] in code_ranges {
                    match (numeric_code(low), numeric_code(high)) {
                        (Some(low), Some(high)) if low <= high => {}
                        _ => {
                            return Err(format!(
                                "code range {low}-{high} is not numeric or reversed"
                            ));
                        }
                    }
                }
                Ok(())
            }
            Effect::RequiresFlexibility { .. } => Ok(()),
            Effect::GrantsFlexibilities { flexibilities }
            | Effect::FlexibilityLapse { flexibilities, .. } => {
                if flexibilities.is_empty() {
                    Err("no flexibilities listed".into())
                } else {
                    Ok(())
                }
            }
            Effect::RpmSetup { code, .. } => non_empty_code(code),
            Effect::RpmDeviceSupply {
                code,
                min_days_with_readings,
                max_days_with_readings,
            } => {
                non_empty_code(code)?;
                if min_days_with_readings > max_days_with_readings || *max_days_with_readings > 30 {
                    Err(format!(
                        "day range {min_days_with_readings}-{max_days_with_readings} is reversed or beyond 30"
                    ))
                } else {
                    Ok(())
                }
            }
            Effect::RpmManagementFirst {
                code,
                min_minutes,
                max_minutes,
                ..
            } => {
                non_empty_code(code)?;
                match max_minutes {
                    Some(max) if max < min_minutes => {
                        Err(format!("minute range {min_minutes}-{max} is reversed"))
                    }
                    _ => Ok(()),
                }
            }
            Effect::RpmManagementAdditional {
                code,
                base_code,
                block_minutes,
                ..
            } => {
                non_empty_code(code)?;
                non_empty_code(base_code)?;
                if *block_minutes == 0 {
                    Err("block_minutes must be positive".into())
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn non_empty_code(code: &str) -> Result<(), String> {
    if code.len() == 5 && code.chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!("code {code:?} is not a 5-character CPT/HCPCS code"))
    }
}

fn non_empty_reason(reason: &str) -> Result<(), String> {
    if reason.trim().is_empty() {
        Err("reason is empty".into())
    } else {
        Ok(())
    }
}

/// The numeric value of an all-digit CPT code, for range checks.
pub(crate) fn numeric_code(code: &str) -> Option<u32> {
    if code.len() == 5 && code.chars().all(|c| c.is_ascii_digit()) {
        code.parse().ok()
    } else {
        None
    }
}

/// One appended policy fact: the changes to one rule set that became known on
/// `recorded_at`. Versions are numbered 1, 2, 3… across all rule sets, in the order they
/// were appended to the `policy-billing` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    pub version: u64,
    pub recorded_at: NaiveDate,
    pub rule_set: RuleSet,
    /// One line for `chartline billing policies` and the audit trail.
    pub summary: String,
    /// Rules added, or replacing the rule of the same name (whole-rule replacement).
    #[serde(default)]
    pub upsert: Vec<Rule>,
    /// Names of rules withdrawn from this version on.
    #[serde(default)]
    pub retire: Vec<String>,
}

/// A rule together with the rule set it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    pub rule_set: RuleSet,
    pub rule: Rule,
}

/// The complete policy as known from `recorded_at` until the next version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub recorded_at: NaiveDate,
    /// The rule set the change that produced this version touched.
    pub changed_rule_set: RuleSet,
    pub summary: String,
    pub rules: Vec<PolicyRule>,
}

impl PolicyVersion {
    pub fn rules_of(&self, rule_set: RuleSet) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .filter(move |r| r.rule_set == rule_set)
            .map(|r| &r.rule)
    }

    pub fn rule_count(&self, rule_set: RuleSet) -> usize {
        self.rules_of(rule_set).count()
    }
}

/// Every policy version, in version order. Invariant (checked by
/// [`PolicyHistory::from_changes`]): versions are 1..=n without gaps and `recorded_at`
/// never decreases, so "the latest version recorded on or before T" is well defined.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyHistory {
    versions: Vec<PolicyVersion>,
}

/// Why a list of policy changes does not form a valid history. Loading the policy must
/// stop: fix the policy file (the message names the version and rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy version {found} is out of sequence; expected version {expected}")]
    VersionOutOfSequence { expected: u64, found: u64 },
    #[error(
        "policy version {version} is recorded {recorded_at}, before version {previous_version} ({previous_recorded_at})"
    )]
    RecordedTimeWentBackwards {
        version: u64,
        recorded_at: NaiveDate,
        previous_version: u64,
        previous_recorded_at: NaiveDate,
    },
    #[error("policy version {version}, rule {rule:?}: {message}")]
    InvalidRule {
        version: u64,
        rule: String,
        message: String,
    },
    #[error("policy version {version} names rule {rule:?} twice")]
    DuplicateRule { version: u64, rule: String },
    #[error(
        "policy version {version} retires rule {rule:?}, which the {rule_set} rule set does not have"
    )]
    RetiresUnknownRule {
        version: u64,
        rule_set: &'static str,
        rule: String,
    },
    #[error("policy version {version} changes nothing")]
    EmptyChange { version: u64 },
}

impl PolicyHistory {
    /// Folds the changes (in the order given, which must be version order) into
    /// complete snapshots.
    pub fn from_changes(
        changes: impl IntoIterator<Item = PolicyChange>,
    ) -> Result<PolicyHistory, PolicyError> {
        let mut history = PolicyHistory::default();
        for change in changes {
            history.append(change)?;
        }
        Ok(history)
    }

    /// Appends one change (the `apply` of the `policy-billing` stream).
    pub fn append(&mut self, change: PolicyChange) -> Result<(), PolicyError> {
        let expected = self.versions.len() as u64 + 1;
        if change.version != expected {
            return Err(PolicyError::VersionOutOfSequence {
                expected,
                found: change.version,
            });
        }
        if let Some(previous) = self.versions.last()
            && change.recorded_at < previous.recorded_at
        {
            return Err(PolicyError::RecordedTimeWentBackwards {
                version: change.version,
                recorded_at: change.recorded_at,
                previous_version: previous.version,
                previous_recorded_at: previous.recorded_at,
            });
        }
        if change.upsert.is_empty() && change.retire.is_empty() {
            return Err(PolicyError::EmptyChange {
                version: change.version,
            });
        }
        let mut rules = self
            .versions
            .last()
            .map(|v| v.rules.clone())
            .unwrap_or_default();
        for name in &change.retire {
            let position = rules
                .iter()
                .position(|r| r.rule_set == change.rule_set && &r.rule.name == name)
                .ok_or_else(|| PolicyError::RetiresUnknownRule {
                    version: change.version,
                    rule_set: change.rule_set.as_str(),
                    rule: name.clone(),
                })?;
            rules.remove(position);
        }
        let mut seen = std::collections::BTreeSet::new();
        for rule in &change.upsert {
            if !seen.insert(rule.name.as_str()) || change.retire.contains(&rule.name) {
                return Err(PolicyError::DuplicateRule {
                    version: change.version,
                    rule: rule.name.clone(),
                });
            }
            rule.validate()
                .map_err(|message| PolicyError::InvalidRule {
                    version: change.version,
                    rule: rule.name.clone(),
                    message,
                })?;
            let replacement = PolicyRule {
                rule_set: change.rule_set,
                rule: rule.clone(),
            };
            match rules
                .iter_mut()
                .find(|r| r.rule_set == change.rule_set && r.rule.name == rule.name)
            {
                Some(existing) => *existing = replacement,
                None => rules.push(replacement),
            }
        }
        self.versions.push(PolicyVersion {
            version: change.version,
            recorded_at: change.recorded_at,
            changed_rule_set: change.rule_set,
            summary: change.summary,
            rules,
        });
        Ok(())
    }

    pub fn versions(&self) -> &[PolicyVersion] {
        &self.versions
    }

    pub fn latest(&self) -> Option<&PolicyVersion> {
        self.versions.last()
    }

    /// The policy as it was known on `known_at`: the highest version recorded on or
    /// before that day. `None` before the first version was recorded.
    pub fn as_known_at(&self, known_at: NaiveDate) -> Option<&PolicyVersion> {
        self.versions
            .iter()
            .rev()
            .find(|v| v.recorded_at <= known_at)
    }
}
