//! The billing policy files (`policies/<rule-set>/NNNN-<recorded>-<what>.toml`) and
//! their parsing into the domain's [`PolicyChange`]s.
//!
//! API boundary: the TOML shape documented in docs/billing.md is a contract with the
//! people who maintain policy; the domain only sees validated changes. The shipped files
//! are embedded with `include_str!`, so a binary always carries the policy history it
//! was built with and evaluation needs no file system; the same changes are what the
//! billing service appends to the `policy-billing` stream (one event per version).

use chartline_domain::billing::{PolicyChange, PolicyError, PolicyHistory, Rule, RuleSet};
use chrono::NaiveDate;
use serde::Deserialize;

macro_rules! shipped {
    ($path:literal) => {
        ($path, include_str!(concat!("../../", $path)))
    };
}

/// The shipped policy files, in version order: (path relative to the repository, text).
pub const SHIPPED_POLICY_FILES: &[(&str, &str)] = &[
    shipped!("policies/medicare/0001-2025-01-01-baseline.toml"),
    shipped!("policies/commercial-default/0002-2025-01-01-baseline.toml"),
    shipped!("policies/medicare/0003-2025-03-15-extension-to-2025-09-30.toml"),
    shipped!("policies/medicare/0004-2025-10-01-lapse.toml"),
    shipped!("policies/medicare/0005-2025-10-31-cy2026-rpm.toml"),
    shipped!("policies/commercial-default/0006-2025-10-31-cpt-2026-rpm.toml"),
    shipped!("policies/medicare/0007-2025-11-12-restored-through-2026-01-30.toml"),
    shipped!("policies/medicare/0008-2026-01-31-lapse.toml"),
    shipped!("policies/medicare/0009-2026-02-03-restored-through-2027-12-31.toml"),
];

/// One policy file as written by a person. Everything the file does not say is an error
/// (`deny_unknown_fields`), so a misspelt key cannot silently drop a rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u64,
    recorded_at: NaiveDate,
    rule_set: RuleSet,
    summary: String,
    #[serde(default)]
    retire: Vec<String>,
    #[serde(default)]
    rule: Vec<Rule>,
}

/// Why the policy could not be loaded. Always a defect in a policy file: fix the named
/// file; nothing can be evaluated until then.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: declares rule_set {declared:?} but lives in the {folder:?} folder")]
    RuleSetMismatch {
        path: String,
        declared: &'static str,
        folder: String,
    },
    #[error("{path}: {source}")]
    InvalidHistory {
        path: String,
        #[source]
        source: PolicyError,
    },
}

/// The folder a rule set's files live in.
pub fn rule_set_folder(rule_set: RuleSet) -> &'static str {
    match rule_set {
        RuleSet::Medicare => "medicare",
        RuleSet::CommercialDefault => "commercial-default",
    }
}

/// Parses one policy file. `path` is used in errors and, when it has a parent folder,
/// checked against the declared rule set.
pub fn parse_policy_file(path: &str, text: &str) -> Result<PolicyChange, PolicyFileError> {
    let file: PolicyFile = toml::from_str(text).map_err(|error| PolicyFileError::Syntax {
        path: path.to_owned(),
        message: error.to_string().trim_end().to_owned(),
    })?;
    let folder = std::path::Path::new(path)
        .parent()
        .and_then(|parent| parent.file_name())
        .and_then(|name| name.to_str());
    if let Some(folder) = folder
        && folder != rule_set_folder(file.rule_set)
    {
        return Err(PolicyFileError::RuleSetMismatch {
            path: path.to_owned(),
            declared: file.rule_set.as_str(),
            folder: folder.to_owned(),
        });
    }
    Ok(PolicyChange {
        version: file.version,
        recorded_at: file.recorded_at,
        rule_set: file.rule_set,
        summary: file.summary,
        upsert: file.rule,
        retire: file.retire,
    })
}

/// Parses policy files (in any order) and folds them, by version, into a history.
pub fn load_policy_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<PolicyHistory, PolicyFileError> {
    let mut changes = files
        .into_iter()
        .map(|(path, text)| parse_policy_file(path, text).map(|change| (path, change)))
        .collect::<Result<Vec<_>, _>>()?;
    changes.sort_by_key(|(_, change)| change.version);
    let mut history = PolicyHistory::default();
    for (path, change) in changes {
        history
            .append(change)
            .map_err(|source| PolicyFileError::InvalidHistory {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(history)
}

/// The policy history shipped in this build.
pub fn shipped_policy_history() -> Result<PolicyHistory, PolicyFileError> {
    load_policy_files(SHIPPED_POLICY_FILES.iter().copied())
}

#[cfg(test)]
mod tests;
