//! The compliance map file (TOML) and the shipped default (`compliance/default.toml`),
//! parsed into the domain's [`ComplianceMap`] and validated.
//!
//! API boundary: the TOML shape (`[[component]]` with `id`, `name`, `kind`,
//! `handles_phi`, optional `endpoint` and `baa = { effective_from, effective_to,
//! reference }`; `[[flow]]` with `from`, `to`, `data`) is a contract with the people who
//! keep the BAA register; unknown keys are errors, so a misspelt `effective_to` cannot
//! silently extend coverage. The default is embedded, so a binary needs no file system
//! to know it.

use chartline_domain::compliance::{ComplianceMap, ComplianceMapError, Component, DataFlow};
use serde::Deserialize;

/// Path (relative to the repository) and text of the shipped default map.
pub const DEFAULT_MAP: (&str, &str) = (
    "compliance/default.toml",
    include_str!("../../compliance/default.toml"),
);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    #[serde(default, rename = "component")]
    components: Vec<Component>,
    #[serde(default, rename = "flow")]
    flows: Vec<DataFlow>,
}

/// Why a compliance map file was refused (a configuration error: fix the file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ComplianceMapFileError {
    #[error("not a valid compliance map: {0}")]
    Syntax(String),
    #[error(transparent)]
    Invalid(#[from] ComplianceMapError),
}

/// Parses and validates a compliance map file's text.
pub fn parse_compliance_map(text: &str) -> Result<ComplianceMap, ComplianceMapFileError> {
    let file: MapFile =
        toml::from_str(text).map_err(|e| ComplianceMapFileError::Syntax(e.to_string()))?;
    let map = ComplianceMap {
        components: file.components,
        flows: file.flows,
    };
    map.validate()?;
    Ok(map)
}

/// The shipped default map (embedded deployment: sandbox EHR, synthetic vendors).
pub fn default_compliance_map() -> ComplianceMap {
    parse_compliance_map(DEFAULT_MAP.1).expect("the shipped compliance map is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chartline_domain::compliance::{ComponentKind, DataClass};
    use chrono::TimeZone;

    #[test]
    fn the_default_map_covers_the_sandbox_ehr_and_every_kind() {
        let map = default_compliance_map();
        let at = chrono::Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap();
        assert_eq!(
            map.check("sandbox-ehr", DataClass::ClinicalDocumentation, at),
            Ok(())
        );
        for kind in [
            ComponentKind::Ehr,
            ComponentKind::AiScribe,
            ComponentKind::RecordingStorage,
            ComponentKind::VideoVendor,
        ] {
            assert!(map.components.iter().any(|c| c.kind == kind), "{kind:?}");
        }
        assert_eq!(map.flows_at(at).blocked_phi_flows, 0);
    }

    #[test]
    fn unknown_keys_and_dangling_flows_are_refused() {
        let misspelt = r#"
[[component]]
id = "ehr"
name = "EHR"
kind = "ehr"
handles_phi = true
baa = { effective_from = "2026-01-01", efective_to = "2026-02-01" }
"#;
        assert!(matches!(
            parse_compliance_map(misspelt),
            Err(ComplianceMapFileError::Syntax(_))
        ));
        let dangling = r#"
[[flow]]
from = "ehr-connector"
to = "nowhere"
data = ["billing"]
"#;
        assert!(matches!(
            parse_compliance_map(dangling),
            Err(ComplianceMapFileError::Invalid(
                ComplianceMapError::UnknownFlowTarget { .. }
            ))
        ));
    }
}
