//! The compliance map: every external component data can flow to (each EHR endpoint,
//! the AI scribe vendor, recording storage, the video vendor), whether it handles PHI,
//! its Business Associate Agreement coverage over time, and the data flows between
//! Chartline's services and those components.
//!
//! Why it exists: the commonest compliance gap in telehealth integrations is at the
//! joins — PHI sent to a vendor whose BAA lapsed, or to a component nobody declared. So
//! the rule here is deny by default: PHI may go only to a declared component that
//! handles PHI and whose BAA is in effect at the moment of sending
//! ([`ComplianceMap::check`]). Callers pass the moment; nothing here reads a clock.
//!
//! BAA dates are calendar days in UTC, both ends inclusive (`effective_to` is the last
//! covered day; absent means open-ended).
//!
//! The TOML shape and the shipped default live in `proto::compliance_map`.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// What kind of external component it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    Ehr,
    AiScribe,
    RecordingStorage,
    VideoVendor,
    Other,
}

impl ComponentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Ehr => "ehr",
            ComponentKind::AiScribe => "ai_scribe",
            ComponentKind::RecordingStorage => "recording_storage",
            ComponentKind::VideoVendor => "video_vendor",
            ComponentKind::Other => "other",
        }
    }
}

/// Classes of data that flow to components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataClass {
    /// Appointments and encounters tied to a patient (FHIR Appointment, Encounter).
    EncounterRecord,
    /// Notes, compositions, provenance, follow-up tasks.
    ClinicalDocumentation,
    /// Codes and charges tied to a patient (FHIR ChargeItem).
    Billing,
    /// Device readings tied to a patient.
    RpmReadings,
    /// Live audio and video of a visit.
    AudioVideo,
    /// Stored recordings of a visit.
    Recording,
    /// Visit transcripts (e.g. for an AI scribe).
    Transcript,
    /// Data with the identifiers removed (HIPAA Safe Harbor).
    Deidentified,
    /// Metrics, health checks and other data about the system, not about patients.
    Operational,
}

impl DataClass {
    /// Whether this class is protected health information.
    pub fn is_phi(self) -> bool {
        !matches!(self, DataClass::Deidentified | DataClass::Operational)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataClass::EncounterRecord => "encounter_record",
            DataClass::ClinicalDocumentation => "clinical_documentation",
            DataClass::Billing => "billing",
            DataClass::RpmReadings => "rpm_readings",
            DataClass::AudioVideo => "audio_video",
            DataClass::Recording => "recording",
            DataClass::Transcript => "transcript",
            DataClass::Deidentified => "deidentified",
            DataClass::Operational => "operational",
        }
    }
}

/// A Business Associate Agreement's effective period (UTC days, inclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baa {
    pub effective_from: NaiveDate,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_to: Option<NaiveDate>,
    /// Where the signed agreement is filed (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// One external component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Stable id used by flows and by the services that check (e.g. `sandbox-ehr`).
    pub id: String,
    pub name: String,
    pub kind: ComponentKind,
    /// Whether the component is meant to receive PHI at all.
    pub handles_phi: bool,
    /// The BAA, when one was signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baa: Option<Baa>,
    /// Where it is reached (informational; e.g. a FHIR base URL, or `sandbox`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// A declared flow: a Chartline service sends these data classes to a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFlow {
    /// The sending service, e.g. `ehr-connector`.
    pub from: String,
    /// A component id.
    pub to: String,
    pub data: Vec<DataClass>,
}

/// Why PHI may not go to a component at a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BlockReason {
    /// The component is not declared in the compliance map.
    UnknownComponent,
    /// Declared as not handling PHI.
    NotForPhi,
    /// No BAA was signed.
    NoBaa,
    /// The BAA starts later.
    BaaNotYetEffective { effective_from: NaiveDate },
    /// The BAA ended.
    BaaExpired { effective_to: NaiveDate },
}

impl std::fmt::Display for BlockReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockReason::UnknownComponent => f.write_str("not declared in the compliance map"),
            BlockReason::NotForPhi => f.write_str("declared as not handling PHI"),
            BlockReason::NoBaa => f.write_str("no BAA covers it"),
            BlockReason::BaaNotYetEffective { effective_from } => {
                write!(f, "its BAA is effective only from {effective_from}")
            }
            BlockReason::BaaExpired { effective_to } => {
                write!(f, "its BAA expired after {effective_to}")
            }
        }
    }
}

/// PHI was about to go to a component not covered at that moment. Not retryable as
/// is: a person must fix the BAA or the map (then replay the write).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("PHI transfer to {component} blocked at {at}: {reason}")]
pub struct TransferBlocked {
    pub component: String,
    pub data: DataClass,
    pub reason: BlockReason,
    pub at: DateTime<Utc>,
}

/// Why a compliance map is malformed (a configuration error: fix the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComplianceMapError {
    #[error("component id {0:?} is declared twice")]
    DuplicateComponent(String),
    #[error("component id must not be empty")]
    EmptyId,
    #[error("the BAA of {0} ends before it starts")]
    BaaEndsBeforeStart(String),
    #[error("a flow from {from} goes to {to}, which is not declared")]
    UnknownFlowTarget { from: String, to: String },
    #[error("a flow from {from} to {to} names no data class")]
    EmptyFlow { from: String, to: String },
}

/// Coverage of one component at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Coverage {
    /// May receive PHI now.
    Covered { baa_effective_to: Option<NaiveDate> },
    /// May not receive PHI now (non-PHI data may still flow).
    NotCovered { reason: BlockReason },
}

/// The map of components and flows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ComplianceMap {
    pub components: Vec<Component>,
    pub flows: Vec<DataFlow>,
}

/// One flow as of a moment, for `chartline compliance map` and the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowView {
    pub from: String,
    pub to: String,
    pub component_name: String,
    pub kind: ComponentKind,
    pub data: Vec<DataClass>,
    pub carries_phi: bool,
    pub coverage: Coverage,
    /// PHI flows to a component that is not covered now: these transfers are refused.
    pub blocked: bool,
}

/// One component as of a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentView {
    pub id: String,
    pub name: String,
    pub kind: ComponentKind,
    pub handles_phi: bool,
    pub endpoint: Option<String>,
    pub baa: Option<Baa>,
    pub coverage: Coverage,
}

/// The whole map evaluated at one moment (serializable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComplianceView {
    pub at: DateTime<Utc>,
    pub components: Vec<ComponentView>,
    pub flows: Vec<FlowView>,
    /// How many declared flows carry PHI to an uncovered component.
    pub blocked_phi_flows: usize,
}

impl ComplianceMap {
    /// Checks the map's own consistency.
    pub fn validate(&self) -> Result<(), ComplianceMapError> {
        let mut seen = std::collections::BTreeSet::new();
        for component in &self.components {
            if component.id.trim().is_empty() {
                return Err(ComplianceMapError::EmptyId);
            }
            if !seen.insert(component.id.as_str()) {
                return Err(ComplianceMapError::DuplicateComponent(component.id.clone()));
            }
            if let Some(Baa {
                effective_from,
                effective_to: Some(to),
                ..
            }) = &component.baa
                && to < effective_from
            {
                return Err(ComplianceMapError::BaaEndsBeforeStart(component.id.clone()));
            }
        }
        for flow in &self.flows {
            if !seen.contains(flow.to.as_str()) {
                return Err(ComplianceMapError::UnknownFlowTarget {
                    from: flow.from.clone(),
                    to: flow.to.clone(),
                });
            }
            if flow.data.is_empty() {
                return Err(ComplianceMapError::EmptyFlow {
                    from: flow.from.clone(),
                    to: flow.to.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn component(&self, id: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.id == id)
    }

    /// Whether `component_id` may receive PHI at `at`.
    pub fn coverage(&self, component_id: &str, at: DateTime<Utc>) -> Coverage {
        let Some(component) = self.component(component_id) else {
            return Coverage::NotCovered {
                reason: BlockReason::UnknownComponent,
            };
        };
        component_coverage(component, at)
    }

    /// May `data` go to `component_id` at `at`? Non-PHI data always may; PHI only to a
    /// declared, PHI-handling component whose BAA is in effect that day.
    pub fn check(
        &self,
        component_id: &str,
        data: DataClass,
        at: DateTime<Utc>,
    ) -> Result<(), TransferBlocked> {
        if !data.is_phi() {
            return Ok(());
        }
        match self.coverage(component_id, at) {
            Coverage::Covered { .. } => Ok(()),
            Coverage::NotCovered { reason } => Err(TransferBlocked {
                component: component_id.to_string(),
                data,
                reason,
                at,
            }),
        }
    }

    /// Every component and flow with its coverage at `at`.
    pub fn flows_at(&self, at: DateTime<Utc>) -> ComplianceView {
        let components: Vec<ComponentView> = self
            .components
            .iter()
            .map(|c| ComponentView {
                id: c.id.clone(),
                name: c.name.clone(),
                kind: c.kind,
                handles_phi: c.handles_phi,
                endpoint: c.endpoint.clone(),
                baa: c.baa.clone(),
                coverage: component_coverage(c, at),
            })
            .collect();
        let flows: Vec<FlowView> = self
            .flows
            .iter()
            .map(|flow| {
                let component = self.component(&flow.to);
                let coverage = self.coverage(&flow.to, at);
                let carries_phi = flow.data.iter().any(|d| d.is_phi());
                FlowView {
                    from: flow.from.clone(),
                    to: flow.to.clone(),
                    component_name: component.map(|c| c.name.clone()).unwrap_or_default(),
                    kind: component.map_or(ComponentKind::Other, |c| c.kind),
                    data: flow.data.clone(),
                    carries_phi,
                    blocked: carries_phi && !matches!(coverage, Coverage::Covered { .. }),
                    coverage,
                }
            })
            .collect();
        ComplianceView {
            at,
            blocked_phi_flows: flows.iter().filter(|f| f.blocked).count(),
            components,
            flows,
        }
    }
}

fn component_coverage(component: &Component, at: DateTime<Utc>) -> Coverage {
    if !component.handles_phi {
        return Coverage::NotCovered {
            reason: BlockReason::NotForPhi,
        };
    }
    let Some(baa) = &component.baa else {
        return Coverage::NotCovered {
            reason: BlockReason::NoBaa,
        };
    };
    let day = at.date_naive();
    if day < baa.effective_from {
        return Coverage::NotCovered {
            reason: BlockReason::BaaNotYetEffective {
                effective_from: baa.effective_from,
            },
        };
    }
    if let Some(effective_to) = baa.effective_to
        && day > effective_to
    {
        return Coverage::NotCovered {
            reason: BlockReason::BaaExpired { effective_to },
        };
    }
    Coverage::Covered {
        baa_effective_to: baa.effective_to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    fn map() -> ComplianceMap {
        let component = |id: &str, handles_phi, baa| Component {
            id: id.into(),
            name: id.into(),
            kind: ComponentKind::Ehr,
            handles_phi,
            baa,
            endpoint: None,
        };
        ComplianceMap {
            components: vec![
                component(
                    "ehr-a",
                    true,
                    Some(Baa {
                        effective_from: day(2026, 1, 1),
                        effective_to: Some(day(2026, 6, 30)),
                        reference: None,
                    }),
                ),
                component("ehr-no-baa", true, None),
                component(
                    "metrics",
                    false,
                    Some(Baa {
                        effective_from: day(2020, 1, 1),
                        effective_to: None,
                        reference: None,
                    }),
                ),
            ],
            flows: vec![
                DataFlow {
                    from: "ehr-connector".into(),
                    to: "ehr-a".into(),
                    data: vec![DataClass::EncounterRecord],
                },
                DataFlow {
                    from: "api".into(),
                    to: "metrics".into(),
                    data: vec![DataClass::Operational],
                },
            ],
        }
    }

    #[test]
    fn phi_goes_only_where_a_baa_is_in_effect_that_day() {
        let map = map();
        map.validate().unwrap();
        let phi = DataClass::ClinicalDocumentation;
        assert_eq!(map.check("ehr-a", phi, at(2026, 1, 1, 0)), Ok(()));
        assert_eq!(map.check("ehr-a", phi, at(2026, 6, 30, 23)), Ok(()));
        let blocked = |component: &str, when| map.check(component, phi, when).unwrap_err().reason;
        assert_eq!(
            blocked("ehr-a", at(2025, 12, 31, 23)),
            BlockReason::BaaNotYetEffective {
                effective_from: day(2026, 1, 1)
            }
        );
        assert_eq!(
            blocked("ehr-a", at(2026, 7, 1, 0)),
            BlockReason::BaaExpired {
                effective_to: day(2026, 6, 30)
            }
        );
        assert_eq!(blocked("ehr-no-baa", at(2026, 3, 1, 0)), BlockReason::NoBaa);
        assert_eq!(
            blocked("metrics", at(2026, 3, 1, 0)),
            BlockReason::NotForPhi
        );
        assert_eq!(
            blocked("undeclared", at(2026, 3, 1, 0)),
            BlockReason::UnknownComponent
        );
        // Non-PHI data is not gated.
        assert_eq!(
            map.check("metrics", DataClass::Operational, at(2026, 3, 1, 0)),
            Ok(())
        );
        assert_eq!(
            map.check("undeclared", DataClass::Deidentified, at(2026, 3, 1, 0)),
            Ok(())
        );
    }

    #[test]
    fn the_view_flags_uncovered_phi_flows_only() {
        let map = map();
        let inside = map.flows_at(at(2026, 3, 1, 0));
        assert_eq!(inside.blocked_phi_flows, 0);
        assert_eq!(inside.components.len(), 3);
        let after = map.flows_at(at(2026, 7, 1, 0));
        assert_eq!(after.blocked_phi_flows, 1);
        assert!(after.flows[0].blocked && after.flows[0].carries_phi);
        assert!(
            !after.flows[1].blocked,
            "operational data to metrics is fine"
        );
    }

    #[test]
    fn malformed_maps_are_refused() {
        let mut twice = map();
        twice.components.push(twice.components[0].clone());
        assert!(matches!(
            twice.validate(),
            Err(ComplianceMapError::DuplicateComponent(_))
        ));
        let mut dangling = map();
        dangling.flows[0].to = "nowhere".into();
        assert!(matches!(
            dangling.validate(),
            Err(ComplianceMapError::UnknownFlowTarget { .. })
        ));
        let mut backwards = map();
        backwards.components[0].baa.as_mut().unwrap().effective_to = Some(day(2025, 1, 1));
        assert!(matches!(
            backwards.validate(),
            Err(ComplianceMapError::BaaEndsBeforeStart(_))
        ));
    }
}
