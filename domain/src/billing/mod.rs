//! Billing rules: which CPT/HCPCS codes, modifiers and place of service a telehealth
//! visit or an RPM month is billed with, under the payer policy in force on the date of
//! service *as it was known* on a given day.
//!
//! Why a rules engine rather than a pick list: Medicare telehealth policy changed
//! retroactively twice in 2025–2026 (DOMAIN.md "US telehealth billing"), so the right
//! codes depend on two times — the date of service (valid time) and the day we ask
//! (recorded time). The policy is data ([`policy`], loaded from `policies/` by
//! `chartline-proto`), the interpretation is one pure function ([`evaluate()`]), and
//! every decision carries the policy version and the rules that fired, so a decision
//! made under an older version stays explainable after the policy moves on.
//!
//! Architecture invariant: no IO here — the policy files are parsed by `proto`, the
//! billing service records decisions on the encounter stream.

pub mod evaluate;
pub mod policy;
pub mod scenario;

#[cfg(test)]
mod tests;

pub use evaluate::{Decision, EvaluationError, Outcome, evaluate, evaluate_with_version};
pub use policy::{
    Conditions, Effect, Flexibility, LevelCode, PolicyChange, PolicyError, PolicyHistory,
    PolicyRule, PolicyVersion, Rule, RuleSet,
};
pub use scenario::{BillingService, RpmMonth, Scenario, ScenarioError, ServiceFacts, VisitKind};
